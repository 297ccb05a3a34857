/*
 * selftest: a 64-bit guest that interleaves 8-byte MMIO stores and 4-byte
 * port writes, as the kernel's coalesced_io_test does, then halts.  (64-bit
 * because KVM emulates no 8-byte MMIO store in real or protected mode except
 * through MMX/SSE registers, which its emulator refuses.)
 *
 * Start it with Vcpu.setup_long_mode; the host sets:
 *   rax    first value           rcx   number of iterations (>= 1)
 *   rdi    the MMIO register     rdx   the I/O port
 * Iteration i (v = rax + i, 32 bits) makes two writes, in this order:
 *   [rdi]   <- (v ^ 0x5a5a5a5a) << 32 | v    8 bytes, MMIO
 *   port dx <- v                             4 bytes, PIO
 *
 * Built with:  python -m kvmcoal.guests  (as --64, then objcopy -O binary)
 */
        .code64
        .text
        .globl _start
_start:
1:      movl    %eax, %esi
        xorl    $0x5a5a5a5a, %esi
        shlq    $32, %rsi
        orq     %rax, %rsi
        movq    %rsi, (%rdi)
        outl    %eax, %dx
        incl    %eax
        decl    %ecx
        jnz     1b
        hlt
