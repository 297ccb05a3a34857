/*
 * doorbell: a 16-bit real-mode guest that rings a doorbell register once
 * per round, each time the host asks for it through a counter in RAM,
 * without any exit in between, then halts.
 *
 * The host sets, before the first KVM_RUN:
 *   es:di  the doorbell register (MMIO)    ecx   rounds (>= 1)
 *   bx     RAM address of the host's round counter (ds = 0)
 * Round r = 1, 2, ...: wait until the counter holds r, then write r
 * (4 bytes) to the doorbell.
 *
 * Built with:  python -m kvmcoal.guests  (as --32, then objcopy -O binary)
 */
        .code16
        .text
        .globl _start
_start:
        xorl    %eax, %eax
1:      incl    %eax
2:      pause
        cmpl    %eax, (%bx)
        jne     2b
        movl    %eax, %es:(%di)
        decl    %ecx
        jnz     1b
        hlt
