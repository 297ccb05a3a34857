/*
 * demo: the guest of `kvmcoal demo`.  A 16-bit real-mode program that
 * prints a banner through a UART, then streams writes into a framebuffer
 * and the UART, then halts.
 *
 * The host sets, before the first KVM_RUN:
 *   si     banner address (ds = 0)      cx   banner length (>= 1)
 *   dx     the UART's data port (THR)   es   framebuffer segment (64 KiB window)
 *   ebp    stream iterations (>= 1)
 * Stream iteration i: es:(4 * i mod 64 KiB) <- i (4 bytes, MMIO), then the
 * UART gets 'a' + i mod 26, with a newline after every 64 letters.
 *
 * Built with:  python -m kvmcoal.guests  (as --32, then objcopy -O binary)
 */
        .code16
        .text
        .globl _start
_start:
        cld
1:      lodsb
        outb    %al, %dx
        loop    1b

        xorl    %eax, %eax          /* i */
        xorw    %di, %di            /* framebuffer offset, wraps at 64 KiB */
        xorb    %bl, %bl            /* letter, 0..25 */
        xorb    %bh, %bh            /* column, 0..63 */
2:      movl    %eax, %es:(%di)
        addw    $4, %di
        movb    %bl, %cl
        addb    $'a', %cl
        xchgb   %al, %cl
        outb    %al, %dx
        xchgb   %al, %cl
        incb    %bl
        cmpb    $26, %bl
        jne     3f
        xorb    %bl, %bl
3:      incb    %bh
        cmpb    $64, %bh
        jne     4f
        xorb    %bh, %bh
        movb    $'\n', %cl
        xchgb   %al, %cl
        outb    %al, %dx
        xchgb   %al, %cl
4:      incl    %eax
        decl    %ebp
        jnz     2b
        hlt
