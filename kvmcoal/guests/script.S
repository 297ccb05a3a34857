/*
 * script: a 64-bit guest that performs a list of writes the host laid out
 * in RAM, in order, then halts.  The tests drive the v2 scenarios and the
 * differential test (random zones, random writes) with it.
 *
 * Start it with Vcpu.setup_long_mode; the host sets:
 *   rsi    address of the first record      rcx   number of records (>= 1)
 * A record is 24 bytes: u64 address (or port), u64 value, u32 size
 * (1, 2, 4 or 8), u32 kind: 0, an MMIO store of size bytes; 1, an OUT of
 * size 1, 2 or 4 to the port; 2, no access but a busy loop of value
 * (>= 1) iterations, the guest running on without an exit.
 *
 * Built with:  python -m kvmcoal.guests  (as --64, then objcopy -O binary)
 */
        .code64
        .text
        .globl _start
_start:
1:      movq    (%rsi), %rdi
        movq    8(%rsi), %rax
        movl    16(%rsi), %ebx
        cmpl    $2, 20(%rsi)
        je      8f
        cmpl    $0, 20(%rsi)
        jne     5f
        cmpl    $1, %ebx
        jne     2f
        movb    %al, (%rdi)
        jmp     9f
2:      cmpl    $2, %ebx
        jne     3f
        movw    %ax, (%rdi)
        jmp     9f
3:      cmpl    $4, %ebx
        jne     4f
        movl    %eax, (%rdi)
        jmp     9f
4:      movq    %rax, (%rdi)
        jmp     9f
5:      movl    %edi, %edx
        cmpl    $1, %ebx
        jne     6f
        outb    %al, %dx
        jmp     9f
6:      cmpl    $2, %ebx
        jne     7f
        outw    %ax, %dx
        jmp     9f
7:      outl    %eax, %dx
        jmp     9f
8:      decq    %rax
        jnz     8b
9:      addq    $24, %rsi
        decq    %rcx
        jnz     1b
        hlt
