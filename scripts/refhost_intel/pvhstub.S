/* pvhstub.S - a multiboot (v1) front for a decompressed Linux vmlinux's PVH entry point.
 *
 * scripts/refhost-intel appends the kernel's PT_LOAD image (flat, from 16 MiB) to this stub and
 * fills in the a.out-kludge addresses and the PVH entry (the ELF note XEN_ELFNOTE_PHYS32_ENTRY).
 * GRUB's `multiboot` loads the whole file at STUB_BASE and jumps to `start` in 32-bit protected
 * mode; the stub turns the multiboot information (command line, first module = initrd, memory map)
 * into a struct hvm_start_info (version 1), finds the ACPI RSDP in the BIOS areas, and jumps to
 * the kernel with %ebx = the start info, as the PVH boot ABI wants.
 *
 * Built with:  as --32 -o pvhstub.o pvhstub.S
 *              ld -m elf_i386 -Ttext=0xffe000 --oformat binary -o pvhstub.bin pvhstub.o
 */
        .set STUB_BASE, 0xffe000
        .set STUB_SIZE, 0x2000
        .set MB_MAGIC, 0x1badb002
        .set MB_FLAGS, 0x00010003          /* page-aligned modules, memory info, a.out kludge */
        .set HVM_MAGIC, 0x336ec578
        .set MAX_MMAP, 64
        .set CMDLINE_MAX, 2047

        .text
        .code32
        .globl start
header:                                    /* offset 0: struct multiboot_header */
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .long STUB_BASE                    /* header_addr */
        .long STUB_BASE                    /* load_addr */
        .long 0                            /* load_end_addr: patched (0 = the whole file) */
        .long 0                            /* bss_end_addr: patched */
        .long start                        /* entry_addr */
pvh_entry:                                 /* offset 32: patched with the kernel's PVH entry */
        .long 0
        .ascii "PVHSTUB1"                  /* offset 36: identifies the patch layout */

start:
        cli
        cld
        cmpl $0x2badb002, %eax
        jne fail
        movl $stack_top, %esp
        movl %ebx, %ebp                    /* %ebp: multiboot info */

        /* command line (mbi flags bit 2) */
        movl $cmdline, %edi
        testl $4, (%ebp)
        jz 2f
        movl 16(%ebp), %esi
        movl $CMDLINE_MAX, %ecx
1:      lodsb
        testb %al, %al
        jz 2f
        stosb
        loop 1b
2:      movb $0, (%edi)
        /* first module (flags bit 3): the initrd */
        testl $8, (%ebp)
        jz 4f
        cmpl $0, 20(%ebp)
        je 4f
        movl 24(%ebp), %esi
        movl 0(%esi), %eax                 /* mod_start */
        movl 4(%esi), %edx                 /* mod_end */
        movl %eax, modlist
        subl %eax, %edx
        movl %edx, modlist+8
        movl $1, si_nr_modules
4:
        /* memory map (flags bit 6) */
        testl $0x40, (%ebp)
        jz fail
        movl 48(%ebp), %esi                /* mmap_addr */
        movl 44(%ebp), %ecx                /* mmap_length */
        leal (%esi,%ecx), %edx             /* end */
        movl $memmap, %edi
        xorl %ebx, %ebx                    /* entries */
5:      cmpl %edx, %esi
        jae 6f
        cmpl $MAX_MMAP, %ebx
        jae 6f
        movl 4(%esi), %eax                 /* base_addr */
        movl %eax, 0(%edi)
        movl 8(%esi), %eax
        movl %eax, 4(%edi)
        movl 12(%esi), %eax                /* length */
        movl %eax, 8(%edi)
        movl 16(%esi), %eax
        movl %eax, 12(%edi)
        movl 20(%esi), %eax                /* type: multiboot's numbers are e820's */
        movl %eax, 16(%edi)
        movl $0, 20(%edi)
        addl $24, %edi
        incl %ebx
        movl 0(%esi), %eax                 /* size of this entry, not counting the size field */
        leal 4(%esi,%eax), %esi
        jmp 5b
6:      movl %ebx, si_memmap_entries

        /* RSDP: the first KiB of the EBDA, then 0xe0000-0xfffff, on 16-byte boundaries */
        movzwl 0x40e, %esi
        shll $4, %esi
        leal 1024(%esi), %edx
        call scan
        jnc 7f
        movl $0xe0000, %esi
        movl $0x100000, %edx
        call scan
        jc 8f
7:      movl %esi, si_rsdp
8:
        movl pvh_entry, %eax
        movl $start_info, %ebx
        jmp *%eax

/* scan: look for "RSD PTR " from %esi to %edx; CF clear and %esi = it when found */
scan:   cmpl %edx, %esi
        jae 9f
        cmpl $0x20445352, (%esi)           /* "RSD " */
        jne 10f
        cmpl $0x20525450, 4(%esi)          /* "PTR " */
        jne 10f
        clc
        ret
10:     addl $16, %esi
        jmp scan
9:      stc
        ret

fail:   movw $0x3f8, %dx
        movb $'!', %al
        outb %al, %dx
11:     hlt
        jmp 11b

        .balign 8
start_info:                                /* struct hvm_start_info, version 1 */
        .long HVM_MAGIC
        .long 1                            /* version */
        .long 0                            /* flags */
si_nr_modules:
        .long 0
        .long modlist, 0                   /* modlist_paddr */
        .long cmdline, 0                   /* cmdline_paddr */
si_rsdp:
        .quad 0                            /* rsdp_paddr */
        .long memmap, 0                    /* memmap_paddr */
si_memmap_entries:
        .long 0
        .long 0
modlist:                                   /* struct hvm_modlist_entry */
        .quad 0                            /* paddr */
        .quad 0                            /* size */
        .quad 0                            /* cmdline_paddr */
        .quad 0
memmap:                                    /* struct hvm_memmap_table_entry[MAX_MMAP] */
        .fill MAX_MMAP * 24, 1, 0
cmdline:
        .fill CMDLINE_MAX + 1, 1, 0
        .balign 16
        .fill 512, 1, 0
stack_top:
end:                                       /* refhost-intel checks that it fits in STUB_SIZE */
