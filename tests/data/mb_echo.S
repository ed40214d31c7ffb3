/* mb_echo.S - a tiny multiboot (v1) kernel that echoes what its loader passed it on COM1.
 * Used by tests/test_nested_platforms.py to check pykvm.nested.platforms on QEMU TCG and Bochs.
 * Mode: 32-bit protected mode, as a multiboot loader leaves it (QEMU -kernel, GRUB)
 * Load: ELF at 0x100000 (tests/data/mb_echo.ld), entry _start
 * Build: gcc -m32 -nostdlib -static -no-pie -Wl,--build-id=none -T mb_echo.ld [-DRESET or -DHANG] mb_echo.S
 * Output on COM1 (0x3F8), one line each:
 *     mb-echo start
 *     cmdline: <the multiboot command line>
 *     module: <the first module's string>     (or "module: none")
 *     line: <the first module's bytes up to its first newline, at most 200>
 *     mb-echo end
 * Then: waits for the UART to drain (LSR bit 6),
 *       0x21 to isa-debug-exit (a 32-bit out to port 0xF4: QEMU exits with status 0x43),
 *       "Shutdown" byte by byte to port 0x8900 (ends Bochs), and cli; hlt forever.
 * With -DRESET: after the banner it loads a zero-limit IDT and executes int3 instead, a triple
 *       fault: the machine resets (Bochs, QEMU) or stops (QEMU -no-reboot).
 * With -DHANG: after "mb-echo end" it halts without the two exit writes: only a watchdog ends it.
 */

#define COM1        0x3F8
#define MB_MAGIC    0x1BADB002
#define MB_FLAGS    0x00000003          /* bit 0: page-aligned modules, bit 1: memory info */
#define MB_BOOTED   0x2BADB002          /* EAX at entry from a multiboot loader */
#define MAX_LINE    200

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        cli
        mov     $stack_top, %esp
        mov     %ebx, %esi              /* ESI: the multiboot information structure */
        cmp     $MB_BOOTED, %eax
        je      1f
        xor     %esi, %esi              /* not booted by a multiboot loader: no information */
1:      call    serial_init
        mov     $msg_start, %eax
        call    puts

#ifdef RESET
        call    serial_drain            /* a reset clears the UART: send the banner first */
        lidt    null_idtr               /* every vector is now outside the IDT: */
        int3                            /* #BP -> #GP -> #DF -> triple fault */
#endif

        mov     $msg_cmdline, %eax
        call    puts
        test    %esi, %esi
        jz      1f
        testl   $(1 << 2), (%esi)       /* flags bit 2: cmdline valid */
        jz      1f
        mov     16(%esi), %eax
        call    puts
1:      call    newline

        test    %esi, %esi
        jz      no_module
        testl   $(1 << 3), (%esi)       /* flags bit 3: mods_count, mods_addr valid */
        jz      no_module
        cmpl    $0, 20(%esi)
        je      no_module
        mov     24(%esi), %edi          /* EDI: the first module entry */
        mov     $msg_module, %eax
        call    puts
        mov     8(%edi), %eax           /* its string */
        test    %eax, %eax
        jz      1f
        call    puts
1:      call    newline
        mov     $msg_line, %eax
        call    puts
        mov     0(%edi), %ebx           /* mod_start */
        mov     4(%edi), %ecx           /* mod_end */
        lea     MAX_LINE(%ebx), %edx
        cmp     %edx, %ecx
        jbe     2f
        mov     %edx, %ecx              /* at most MAX_LINE bytes */
2:      cmp     %ecx, %ebx
        jae     3f
        movzbl  (%ebx), %eax
        cmp     $'\n', %al
        je      3f
        call    putc
        inc     %ebx
        jmp     2b
3:      call    newline
        jmp     finish

no_module:
        mov     $msg_no_module, %eax
        call    puts

finish:
        mov     $msg_end, %eax
        call    puts
        call    serial_drain
#ifndef HANG
        mov     $0xF4, %dx              /* isa-debug-exit: QEMU exits with (0x21 << 1) | 1 */
        mov     $0x21, %eax
        out     %eax, %dx
        mov     $msg_shutdown, %esi     /* Bochs: "Shutdown" on port 0x8900 ends the simulation */
        mov     $0x8900, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
#endif
2:      cli
        hlt
        jmp     2b

/* serial_init: COM1 at 115200 8N1, FIFOs on, interrupts off. Clobbers EAX, EDX. */
serial_init:
        mov     $COM1 + 1, %dx
        xor     %al, %al
        out     %al, %dx                /* IER = 0 */
        mov     $COM1 + 3, %dx
        mov     $0x80, %al
        out     %al, %dx                /* LCR: DLAB */
        mov     $COM1 + 0, %dx
        mov     $1, %al
        out     %al, %dx                /* divisor 1 = 115200 baud */
        mov     $COM1 + 1, %dx
        xor     %al, %al
        out     %al, %dx
        mov     $COM1 + 3, %dx
        mov     $0x03, %al
        out     %al, %dx                /* LCR: 8N1 */
        mov     $COM1 + 2, %dx
        mov     $0xC7, %al
        out     %al, %dx                /* FCR: enable and clear FIFOs */
        mov     $COM1 + 4, %dx
        mov     $0x03, %al
        out     %al, %dx                /* MCR: DTR, RTS */
        ret

/* putc: write AL to COM1 once the transmitter holding register is empty (LSR bit 5). */
putc:
        push    %edx
        push    %eax
        mov     $COM1 + 5, %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %eax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %edx
        ret

/* serial_drain: wait until COM1 has sent every byte (LSR bit 6, transmitter empty): Bochs
 * models the transmit time, and bytes still in the FIFO when it shuts down are lost. */
serial_drain:
        push    %edx
        push    %eax
        mov     $COM1 + 5, %dx
1:      in      %dx, %al
        test    $0x40, %al
        jz      1b
        pop     %eax
        pop     %edx
        ret

/* puts: write the NUL-terminated string at EAX. */
puts:
        push    %esi
        mov     %eax, %esi
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      pop     %esi
        ret

newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

        .section .rodata
msg_start:      .asciz "mb-echo start\n"
msg_cmdline:    .asciz "cmdline: "
msg_module:     .asciz "module: "
msg_no_module:  .asciz "module: none\n"
msg_line:       .asciz "line: "
msg_end:        .asciz "mb-echo end\n"
msg_shutdown:   .asciz "Shutdown"
        .align 8
null_idtr:      .word 0                 /* limit 0: no vector fits */
                .long 0

        .bss
        .align 16
        .space 4096
stack_top:

        .section .note.GNU-stack, "", @progbits
