/* modeswitch.S - switch itself from real mode to protected mode to long mode, printing "R", "P", "L\n", then DONE(0).
 * Mode: 16-bit real mode, then its own 32-bit protected mode and 64-bit long mode    Load: flat at GPA 0x1000, entry = first byte (CS:IP = 0000:1000)
 * Exits: IoOut(port=0xE9) x4 ("RPL\n"), then DONE(0) (IoOut port=0xEA)
 *
 * Its own GDT (at the selectors of pykvm's: CODE64 0x08, DATA 0x10, CODE32 0x18) and its own page
 * tables (in the image: PML4 -> PDPT -> PD, one 2 MiB page identity-mapping the first 2 MiB).
 * From protected mode without paging it goes straight to long mode (CR3, CR4.PAE, EFER.LME, then
 * CR0.PG): kvm_pvm keeps CR0.PG only in long mode, so 32-bit paging is no stop on the way.
 * Each mode runs the same three bytes, 48 89 C3, which decode differently: `dec ax; mov bx, ax`
 * (16-bit), `dec eax; mov ebx, eax` (32-bit), `mov rbx, rax` (64-bit, 0x48 is a REX.W prefix):
 * an instruction trace (pykvm/trace.py) must show all three. */
#include "pykvm.h"

#define CR0_PE		0x1
#define CR0_PG		0x80000000
#define CR4_PAE		0x20
#define MSR_EFER	0xC0000080
#define EFER_LME	0x100
#define PTE_P_RW	0x3		/* present, writable */
#define PDE_2M		0x83		/* present, writable, 2 MiB page */

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	cli
	PYKVM_PUTC 'R'
	.byte	0x48, 0x89, 0xC3	/* dec %ax; mov %ax, %bx */
	lgdtl	gdt_desc		/* DS = 0: the label is the linear address */
	movl	%cr0, %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$PYKVM_SEL_CODE32, $protected

	.code32
protected:
	movw	$PYKVM_SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	PYKVM_PUTC 'P'
	.byte	0x48, 0x89, 0xC3	/* dec %eax; mov %eax, %ebx */
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$CR0_PG, %eax		/* with EFER.LME: long mode (compatibility mode until the far jump) */
	movl	%eax, %cr0
	ljmp	$PYKVM_SEL_CODE64, $long

	.code64
long:
	PYKVM_PUTC 'L'
	.byte	0x48, 0x89, 0xC3	/* mov %rax, %rbx */
	PYKVM_PUTC '\n'
	PYKVM_DONE 0

	.section .rodata
	.balign	8
gdt:
	.quad	0			/* null */
	.quad	0x00AF9A000000FFFF	/* 0x08: 64-bit code, DPL 0 */
	.quad	0x00CF92000000FFFF	/* 0x10: flat 4 GiB data */
	.quad	0x00CF9A000000FFFF	/* 0x18: flat 4 GiB 32-bit code */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt

	/* 64-bit entries written as two longs: this is an ELF32 object (R_386_32 relocations). */
	.section .data
	.balign	4096
pml4:
	.long	pdpt + PTE_P_RW, 0
	.fill	511, 8, 0
pdpt:
	.long	pd + PTE_P_RW, 0
	.fill	511, 8, 0
pd:
	.long	PDE_2M, 0		/* 0 - 2 MiB, identity */
	.fill	511, 8, 0
