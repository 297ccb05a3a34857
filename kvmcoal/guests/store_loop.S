/*
 * store_loop: a 16-bit real-mode guest that writes a counting sequence to
 * two MMIO registers and one I/O port, then halts.
 *
 * The host sets, before the first KVM_RUN:
 *   eax    first value           ecx   number of iterations (>= 1)
 *   es:di  the MMIO registers    dx    the I/O port
 * Each iteration i (value v = eax + i) makes three writes, in this order:
 *   es:di      <- v             4 bytes, MMIO
 *   es:di+8    <- v & 0xffff    2 bytes, MMIO
 *   port dx    <- v & 0xff      1 byte,  PIO
 *
 * Built with:  python -m kvmcoal.guests  (as --32, then objcopy -O binary)
 */
        .code16
        .text
        .globl _start
_start:
1:      movl    %eax, %es:(%di)
        movw    %ax, %es:8(%di)
        outb    %al, %dx
        incl    %eax
        decl    %ecx
        jnz     1b
        hlt
