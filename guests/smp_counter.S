/* smp_counter.S - two vCPUs count rounds side by side, each writing a pattern across its own region.
 * Mode: 64-bit long mode on the BSP, 2 vCPUs, the in-kernel irqchip    Load: flat at GPA 0x100000, entry = first byte    Memory: at least 4 MiB
 * Exits: PRINT "bsp: start\n", INIT to APIC 1, PRINT "bsp: init sent\n", SIPI (vector 0x08),
 *        PRINT "bsp: sipi sent\n"; then each vCPU c (0 the BSP, 1 the AP) prints, one PRINT a
 *        round, "cpuC count XXXXXXXX\n" for rounds 1 to SMPC_ROUNDS (the two sequences interleave
 *        as the vCPUs run); the BSP waits for the AP's last round, PRINTs "bsp: both done\n", DONE(0).
 * Round n of vCPU c: every page p of its region [0x200000 + c * 1 MiB, + SMPC_PAGES pages) gets the
 * quadword c << 32 | n << 16 | p at offset (n % 512) * 8, and counters[c] = n. Deterministic: the
 * vCPUs share no written byte, so the memory at DONE is the same whatever the interleaving (the
 * snapshot tests compare every page's checksum with an uninterrupted run).
 * The AP starts in real mode at TRAMPOLINE (copied below 1 MiB), loads pykvm's GDT and goes through
 * 32-bit protected mode to long mode on the BSP's page tables (PYKVM_PML4), interrupts off. */
#include "pykvm.h"
#include "apic.h"

#define TRAMPOLINE	0x8000
#define SMPC_ROUNDS	100
#define SMPC_PAGES	256
#define SMPC_REGION	0x200000
#define CR0_PE		0x1
#define CR0_PG		0x80000000
#define CR4_PAE		0x20
#define MSR_EFER	0xC0000080
#define EFER_LME	0x100
#define EFER_NXE	0x800

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF
	leaq	trampoline(%rip), %rsi		/* copy the AP's real-mode code below 1 MiB */
	movl	$TRAMPOLINE, %edi
	movl	$(trampoline_end - trampoline), %ecx
	cld
	rep movsb
	PYKVM_PRINT start_line
	LAPIC_WRITE LAPIC_ICR_HI, $(1 << 24)	/* destination: APIC id 1 */
	LAPIC_WRITE LAPIC_ICR_LO, $0x4500	/* INIT, assert */
	PYKVM_PRINT init_line
	LAPIC_WRITE LAPIC_ICR_LO, $(0x4600 | (TRAMPOLINE >> 12))	/* SIPI: start at TRAMPOLINE */
	PYKVM_PRINT sipi_line
	xorl	%ebp, %ebp			/* vCPU 0 */
	jmp	count

/* count: SMPC_ROUNDS rounds for vCPU EBP (0 or 1), then the BSP waits for the AP and ends, the AP halts. */
count:
	xorl	%r12d, %r12d			/* the round */
	movl	%ebp, %r14d
	shll	$20, %r14d
	addl	$SMPC_REGION, %r14d		/* this vCPU's region */
	movl	%ebp, %r15d
	shll	$5, %r15d
	addl	$lines, %r15d			/* this vCPU's line */
round:
	incq	%r12
	movq	%r12, %rax
	andq	$511, %rax
	leaq	(%r14,%rax,8), %rdi
	movq	%rbp, %rbx
	shlq	$32, %rbx
	movq	%r12, %rax
	shlq	$16, %rax
	orq	%rax, %rbx			/* c << 32 | n << 16 */
	xorl	%ecx, %ecx
page:
	movq	%rbx, %rdx
	orq	%rcx, %rdx
	movq	%rdx, (%rdi)
	addq	$PYKVM_PAGE_SIZE, %rdi
	incq	%rcx
	cmpq	$SMPC_PAGES, %rcx
	jb	page
	movq	%r12, counters(,%rbp,8)
	movl	%r12d, %edx			/* the round in hex into "cpuC count XXXXXXXX\n" */
	leaq	11(%r15), %rdi
	movl	$8, %ecx
digit:
	roll	$4, %edx
	movl	%edx, %eax
	andl	$15, %eax
	movb	hex(%eax), %al
	movb	%al, (%rdi)
	incq	%rdi
	decl	%ecx
	jnz	digit
	movl	%r15d, %esi
	PYKVM_CALL PYKVM_CALL_PRINT
	cmpq	$SMPC_ROUNDS, %r12
	jb	round
	testl	%ebp, %ebp
	jnz	ap_done
1:	pause					/* the BSP: wait for the AP's last round */
	cmpl	$0, ap_finished(%rip)
	je	1b
	PYKVM_PRINT done_line
	PYKVM_DONE 0
ap_done:
	movl	$1, ap_finished(%rip)
2:	hlt
	jmp	2b

	.code32
ap_protected:
	movw	$PYKVM_SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movl	$PYKVM_PML4, %eax		/* the BSP's page tables */
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$(EFER_LME | EFER_NXE), %eax
	wrmsr
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0
	ljmp	$PYKVM_SEL_CODE64, $ap_long

	.code64
ap_long:
	movl	$ap_stack_top, %esp
	movl	$1, %ebp			/* vCPU 1 */
	jmp	count

/* The AP starts here in real mode with CS = TRAMPOLINE >> 4, IP = 0; DS = CS addresses its data. */
	.code16
trampoline:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	(gdt_desc - trampoline)
	movl	%cr0, %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$PYKVM_SEL_CODE32, $ap_protected
gdt_desc:
	.word	PYKVM_GDT_ENTRIES * 8 - 1
	.long	PYKVM_GDT
trampoline_end:

	.section .rodata
start_line:	.asciz	"bsp: start\n"
init_line:	.asciz	"bsp: init sent\n"
sipi_line:	.asciz	"bsp: sipi sent\n"
done_line:	.asciz	"bsp: both done\n"
hex:		.ascii	"0123456789abcdef"

	.section .data
	.balign	32
lines:
	.asciz	"cpu0 count 00000000\n"
	.balign	32
	.asciz	"cpu1 count 00000000\n"
	.balign	32
	.balign	8
counters:	.quad	0, 0
ap_finished:	.long	0
	.balign	16
ap_stack:	.space	512
ap_stack_top:
