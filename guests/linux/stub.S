/* linux/stub.S - a tiny kernel of the Linux/x86 boot protocol: it checks what pykvm's Linux loader
 * handed it, reports it through the call port, then DONE(0).
 * Mode: built as a bzImage (linux_stub.bzImage: setup header + protected-mode part), entered at
 *       the 64-bit entry (load + 0x200): long mode, RSI = the zero page, CS = 0x10, DS/ES/SS = 0x18,
 *       IF = 0. Built as an ELF vmlinux (linux_stub_pvh.elf) with a PVH note: entered at pvh_start
 *       in 32-bit protected mode, paging off, EBX = struct hvm_start_info; or at e_entry (startup_64)
 *       like the bzImage entry.
 * Load: the protected-mode part at 0x100000 (pref_address; not relocatable), startup_64 at 0x100200.
 * Exits: IoOut(0xE9) "linux stub: 64-bit entry\n" (or "linux stub: PVH entry\n"), PRINT(the command
 *       line), SYNC(number of e820 / memmap entries), SYNC(MiB of RAM in the entry at 1 MiB),
 *       SYNC(initrd size), SYNC(the initrd's first 32-bit word, or 0), DONE(0). A failed check:
 *       FAIL(line, value). */
#include "pykvm.h"

#define ZP_E820_ENTRIES		0x1e8
#define ZP_BOOT_FLAG		0x1fe
#define ZP_HEADER		0x202
#define ZP_TYPE_OF_LOADER	0x210
#define ZP_LOADFLAGS		0x211
#define ZP_RAMDISK_IMAGE	0x218
#define ZP_RAMDISK_SIZE		0x21c
#define ZP_CMD_LINE_PTR		0x228
#define ZP_EXT_RAMDISK_IMAGE	0x0c0
#define ZP_EXT_RAMDISK_SIZE	0x0c4
#define ZP_EXT_CMD_LINE_PTR	0x0c8
#define ZP_E820_TABLE		0x2d0
#define E820_ENTRY		20
#define CAN_USE_HEAP		0x80

#define SI_MAGIC		0
#define SI_VERSION		4
#define SI_NR_MODULES		12
#define SI_MODLIST		16
#define SI_CMDLINE		24
#define SI_MEMMAP		40
#define SI_MEMMAP_ENTRIES	48
#define MEMMAP_ENTRY		24

#define STUB_CMDLINE_SIZE 255
#include "header.S"

/* ---- the protected-mode part, at 0x100000 ---------------------------------------------------- */
	.section .text.entry, "ax"
	.code32
	.globl	startup_32
startup_32:				/* the 32-bit entry: pykvm never uses it */
	PYKVM_FAIL __LINE__, 32, msg_entry32

	.org	0x200
	.code64
	.globl	startup_64
startup_64:
	movq	%rsi, %r12		/* the zero page (PYKVM_PUTS clobbers ESI) */
	PYKVM_PUTS banner64
	movw	%cs, %ax
	cmpw	$0x10, %ax
	jne	fail_cs
	movw	%ds, %ax
	cmpw	$0x18, %ax
	jne	fail_ds
	movw	%es, %ax
	cmpw	$0x18, %ax
	jne	fail_ds
	movw	%ss, %ax
	cmpw	$0x18, %ax
	jne	fail_ds
	pushfq
	popq	%rax
	testl	$0x200, %eax
	jnz	fail_if
	cmpw	$0xaa55, ZP_BOOT_FLAG(%r12)
	jne	fail_zp
	cmpl	$0x53726448, ZP_HEADER(%r12)
	jne	fail_zp
	cmpb	$0xff, ZP_TYPE_OF_LOADER(%r12)
	jne	fail_zp
	testb	$CAN_USE_HEAP, ZP_LOADFLAGS(%r12)
	jz	fail_zp

	movl	ZP_CMD_LINE_PTR(%r12), %eax	/* PRINT(the command line) */
	movl	ZP_EXT_CMD_LINE_PTR(%r12), %esi
	shlq	$32, %rsi
	orq	%rax, %rsi
	PYKVM_CALL PYKVM_CALL_PRINT

	movzbl	ZP_E820_ENTRIES(%r12), %ebx	/* SYNC(e820 entries) */
	movl	%ebx, %r13d
	PYKVM_CALL PYKVM_CALL_SYNC
	cmpq	$0, ZP_E820_TABLE(%r12)		/* entry 0: RAM from 0 */
	jne	fail_e820
	cmpl	$1, ZP_E820_TABLE + 16(%r12)
	jne	fail_e820
	leaq	ZP_E820_TABLE(%r12), %rdi	/* find RAM at 1 MiB: SYNC(its size in MiB) */
1:	testl	%r13d, %r13d
	jz	fail_e820
	cmpq	$0x100000, (%rdi)
	jne	2f
	cmpl	$1, 16(%rdi)
	je	3f
2:	addq	$E820_ENTRY, %rdi
	decl	%r13d
	jmp	1b
3:	movq	8(%rdi), %rbx
	shrq	$20, %rbx
	PYKVM_CALL PYKVM_CALL_SYNC

	movl	ZP_RAMDISK_SIZE(%r12), %ebx	/* SYNC(initrd size), SYNC(its first word) */
	movl	ZP_EXT_RAMDISK_SIZE(%r12), %eax
	shlq	$32, %rax
	orq	%rax, %rbx
	movq	%rbx, %r13
	PYKVM_CALL PYKVM_CALL_SYNC
	xorl	%ebx, %ebx
	testq	%r13, %r13
	jz	4f
	movl	ZP_RAMDISK_IMAGE(%r12), %edi
	movl	ZP_EXT_RAMDISK_IMAGE(%r12), %eax
	shlq	$32, %rax
	orq	%rax, %rdi
	movl	(%rdi), %ebx
4:	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0

fail_cs:	PYKVM_FAIL __LINE__, 0, msg_cs
fail_ds:	PYKVM_FAIL __LINE__, 0, msg_ds
fail_if:	PYKVM_FAIL __LINE__, 0, msg_if
fail_zp:	PYKVM_FAIL __LINE__, 0, msg_zp
fail_e820:	PYKVM_FAIL __LINE__, 0, msg_e820

/* ---- the PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) ---------------------------------------------- */
	.code32
	.globl	pvh_start
pvh_start:
	movl	%ebx, %ebp		/* struct hvm_start_info */
	PYKVM_PUTS banner_pvh
	movl	%cr0, %eax
	testl	$0x80000000, %eax	/* paging off */
	jnz	pvh_fail_cr0
	testl	$1, %eax		/* protected mode */
	jz	pvh_fail_cr0
	pushfl
	popl	%eax
	testl	$0x200, %eax
	jnz	pvh_fail_if
	cmpl	$0x336ec578, SI_MAGIC(%ebp)
	jne	pvh_fail_si
	cmpl	$1, SI_VERSION(%ebp)
	jne	pvh_fail_si

	movl	SI_CMDLINE(%ebp), %esi	/* PRINT(the command line) */
	PYKVM_CALL PYKVM_CALL_PRINT

	movl	SI_MEMMAP_ENTRIES(%ebp), %ebx	/* SYNC(memmap entries) */
	movl	%ebx, %ecx
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	SI_MEMMAP(%ebp), %edi		/* find RAM at 1 MiB: SYNC(its size in MiB) */
1:	testl	%ecx, %ecx
	jz	pvh_fail_memmap
	cmpl	$0x100000, (%edi)
	jne	2f
	cmpl	$0, 4(%edi)
	jne	2f
	cmpl	$1, 16(%edi)
	je	3f
2:	addl	$MEMMAP_ENTRY, %edi
	decl	%ecx
	jmp	1b
3:	movl	8(%edi), %ebx
	movl	12(%edi), %eax
	shrdl	$20, %eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC

	xorl	%ebx, %ebx			/* SYNC(initrd size), SYNC(its first word): module 0 */
	xorl	%edi, %edi
	cmpl	$0, SI_NR_MODULES(%ebp)
	je	4f
	movl	SI_MODLIST(%ebp), %eax
	movl	8(%eax), %ebx			/* size (low 32 bits) */
	movl	(%eax), %edi			/* paddr */
4:	PYKVM_CALL PYKVM_CALL_SYNC
	xorl	%ebx, %ebx
	testl	%edi, %edi
	jz	5f
	movl	(%edi), %ebx
5:	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0

pvh_fail_cr0:	PYKVM_FAIL __LINE__, 0, msg_cr0
pvh_fail_if:	PYKVM_FAIL __LINE__, 0, msg_if
pvh_fail_si:	PYKVM_FAIL __LINE__, 0, msg_si
pvh_fail_memmap: PYKVM_FAIL __LINE__, 0, msg_e820

	.section .rodata
banner64:	.asciz	"linux stub: 64-bit entry\n"
banner_pvh:	.asciz	"linux stub: PVH entry\n"
msg_entry32:	.asciz	"entered at the 32-bit entry"
msg_cs:		.asciz	"CS is not __BOOT_CS (0x10)"
msg_ds:		.asciz	"DS/ES/SS are not __BOOT_DS (0x18)"
msg_if:		.asciz	"interrupts are enabled"
msg_zp:		.asciz	"RSI does not point at a zero page pykvm filled"
msg_e820:	.asciz	"the memory map lacks RAM at 0 or at 1 MiB"
msg_cr0:	.asciz	"CR0: not protected mode without paging"
msg_si:		.asciz	"EBX does not point at a version-1 hvm_start_info"

/* ---- the PVH entry note (only the ELF keeps it) -------------------------------------------- */
	.section .note.Xen, "a"
	.p2align 2
	.long	4, 4, 18		/* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_start
