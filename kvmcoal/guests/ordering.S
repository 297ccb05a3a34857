/*
 * ordering: a 16-bit real-mode guest that writes rounds of a counting
 * sequence to a data register, reads a status register after each round and
 * keeps what it read in RAM, then halts.
 *
 * The host sets, before the first KVM_RUN:
 *   eax    first value           ecx   values per round (>= 1)
 *   esi    rounds (>= 1)         es:di the data register; status at es:di+8
 *   bx     RAM address of the results (ds = 0): one dword per round
 * Round r writes eax.. to es:di (4 bytes each, MMIO), then reads 4 bytes
 * from es:di+8 (MMIO) and stores them at bx + 4 * r.
 *
 * Built with:  python -m kvmcoal.guests  (as --32, then objcopy -O binary)
 */
        .code16
        .text
        .globl _start
_start:
1:      movl    %ecx, %ebp
2:      movl    %eax, %es:(%di)
        incl    %eax
        decl    %ebp
        jnz     2b
        movl    %es:8(%di), %edx
        movl    %edx, (%bx)
        addw    $4, %bx
        decl    %esi
        jnz     1b
        hlt
