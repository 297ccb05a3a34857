/*
 * flat32: a 32-bit flat protected-mode guest that writes a counting
 * sequence to one MMIO register anywhere below 4 GiB and to one port.
 *
 * Start it with Vcpu.setup_protected_mode; the host sets:
 *   eax    first value           ecx   number of iterations (>= 1)
 *   edi    the MMIO register     dx    the I/O port
 * Iteration i (v = eax + i): [edi] <- v (4 bytes, MMIO), then port dx <- v & 0xff.
 *
 * Built with:  python -m kvmcoal.guests  (as --32, then objcopy -O binary)
 */
        .code32
        .text
        .globl _start
_start:
1:      movl    %eax, (%edi)
        outb    %al, %dx
        incl    %eax
        decl    %ecx
        jnz     1b
        hlt
