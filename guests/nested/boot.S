/* boot.S - multiboot entry of pykvm's L1 hypervisors: 32-bit protected mode to 64-bit long mode.
 * Mode: entered in 32-bit protected mode by a multiboot loader (EAX = 0x2BADB002, EBX = info),
 *       runs l1_main(magic, info) in 64-bit long mode at CPL 0
 * Load: ELF segments at 0x100000 (l1.ld); the ELF64 link is converted to ELF32 for loaders that
 *       take only ELF32 (QEMU's -kernel)
 * It identity-maps the first 4 GiB with 2 MiB pages (l1_pml4 -> l1_pdpt -> l1_pd[4]), loads a GDT
 * whose selectors are the ones pykvm's VMCS host state names (0x08 code, 0x10 data, 0x18 TSS),
 * and an IDT whose 32 exception stubs call l1_exception(frame): an L1 fault is reported, not a
 * silent reset. A CPU without long mode gets a message on COM1 and the exit port.
 * CR0 = PE|MP|ET|NE|WP|PG and CR4 = PAE, EFER = LME: what pykvm.model.hvm.HostState assumes
 * (the VMX/SVM code adds CR4.VMXE or EFER.SVME itself).
 */
#include "nested.h"

#include "multiboot.h"

	MULTIBOOT_HEADER

	.section .text.entry, "ax"
	.code32
	.globl	_start
_start:
	movl	$boot_stack_top, %esp
	cld
	movl	%eax, mb_magic
	movl	%ebx, mb_info

	/* long mode? CPUID 0x80000001 EDX bit 29 */
	movl	$0x80000000, %eax
	cpuid
	cmpl	$0x80000001, %eax
	jb	no_long_mode
	movl	$0x80000001, %eax
	cpuid
	btl	$29, %edx
	jnc	no_long_mode

	/* page tables: PML4[0] -> PDPT, PDPT[0..3] -> PD[0..3], 2048 2 MiB pages */
	movl	$l1_pdpt, %eax
	orl	$3, %eax
	movl	%eax, l1_pml4
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$12, %eax
	addl	$l1_pd, %eax
	orl	$3, %eax
	movl	%eax, l1_pdpt(,%ecx,8)
	incl	%ecx
	cmpl	$4, %ecx
	jb	1b
	xorl	%ecx, %ecx
2:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$0x83, %eax			/* P | RW | PS */
	movl	%eax, l1_pd(,%ecx,8)
	movl	%ecx, %eax
	shrl	$11, %eax			/* bits 63:32 of the address: pages above 4 GiB none */
	movl	%eax, l1_pd+4(,%ecx,8)
	incl	%ecx
	cmpl	$2048, %ecx
	jb	2b

	movl	%cr4, %eax
	orl	$(1 << 5), %eax			/* PAE */
	movl	%eax, %cr4
	movl	$l1_pml4, %eax
	movl	%eax, %cr3
	movl	$0xC0000080, %ecx		/* EFER.LME */
	rdmsr
	orl	$(1 << 8), %eax
	wrmsr
	movl	$0x80010033, %eax		/* PG | WP | NE | ET | MP | PE */
	movl	%eax, %cr0
	lgdt	gdt_ptr
	ljmp	$0x08, $long_entry

no_long_mode:
	movl	$no_lm_msg, %esi
3:	lodsb
	testb	%al, %al
	jz	4f
	movl	%eax, %ebx
	movw	$0x3FD, %dx
5:	inb	%dx, %al
	testb	$0x20, %al
	jz	5b
	movl	%ebx, %eax
	movw	$0x3F8, %dx
	outb	%al, %dx
	jmp	3b
4:	movl	$0x7F, %eax			/* the L1's "no extension" status */
	movw	$0xF4, %dx
	outl	%eax, %dx
6:	cli
	hlt
	jmp	6b

	.code64
long_entry:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movq	$l1_stack_top, %rsp
	/* the TSS descriptor: base = l1_tss, limit 0x67, type 9 (available 64-bit TSS) */
	movq	$l1_tss, %rax
	movw	%ax, gdt+0x18+2
	shrq	$16, %rax
	movb	%al, gdt+0x18+4
	movb	%ah, gdt+0x18+7
	shrq	$16, %rax
	movl	%eax, gdt+0x18+8
	movw	$0x18, %ax
	ltr	%ax
	call	l1_idt_init
	lidt	idt_ptr
	movl	mb_magic, %edi
	movl	mb_info, %esi
	call	l1_main
7:	cli
	hlt
	jmp	7b

/* Exception stubs: push a fake error code where the CPU pushes none, then the vector. */
.macro stub vec
	.balign 16
	.if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq	$0
	.endif
	pushq	$\vec
	jmp	exception_common
.endm
	.balign	16
	.globl	l1_exception_stubs
l1_exception_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	stub \v
	.endr

exception_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	movq	%rsp, %rdi			/* struct l1_frame * */
	andq	$-16, %rsp
	call	l1_exception			/* reports and ends the run: does not return */
8:	cli
	hlt
	jmp	8b

	.data
	.balign	16
	.globl	gdt
gdt:	.quad	0
	.quad	0x00AF9A000000FFFF		/* 0x08: 64-bit code, DPL 0 */
	.quad	0x00CF92000000FFFF		/* 0x10: data */
	.quad	0x0000890000000067		/* 0x18: TSS (base filled in above) */
	.quad	0
gdt_end:
	.balign	8
	.word	0
	.globl	gdt_ptr
gdt_ptr:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.balign	8
	.word	0
	.globl	idt_ptr
idt_ptr:
	.word	32 * 16 - 1
	.quad	l1_idt
	.globl	mb_magic, mb_info
mb_magic: .long	0
mb_info: .long	0
no_lm_msg:
	.asciz	"nested: error no-long-mode: this CPU has no long mode (CPUID 0x80000001 EDX bit 29)\n"

	.bss
	.balign	4096
	.globl	l1_pml4, l1_pdpt, l1_pd, l1_idt, l1_tss, l1_stack_top, l1_host_stack_top
l1_pml4: .skip	4096
l1_pdpt: .skip	4096
l1_pd:	.skip	4 * 4096
l1_idt:	.skip	32 * 16
	.balign	16
l1_tss:	.skip	0x68
	.balign	16
boot_stack: .skip 4096
boot_stack_top:
	.balign	16
	.skip	32768
l1_stack_top:
	.skip	16384
l1_host_stack_top:			/* the stack VM exits land on (HOST_RSP) */
