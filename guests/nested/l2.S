/* l2.S - the L2 guest of pykvm's nested scenario: one source, built twice (-DVMX: VMCALL,
 * -DSVM: VMMCALL) as nested_l2_vmx.bin and nested_l2_svm.bin.
 * Mode: 64-bit long mode at CPL 0, paging with the tables pykvm built (CR3 = L2_CR3_A), EPT/NPT
 *       underneath; no IDT (limit 0): any exception becomes a triple fault, a shutdown exit
 * Load: L2 guest-physical L2_CODE (0x30000); entry = L2_CODE; RSP = L2_STACK_TOP
 * Exits, in order (the L1 reports each): CPUID leaf 0x40000000 (the L1's own answer), OUT 0x80,
 * IN 0x81, hypercall HC_ECHO, a write to L2_RO_PAGE (EPT violation / #NPF; the L1 resumes at
 * R15), HC_REPORT (cpuid ebx, IN value, echo result), HC_REPORT (L2_SWITCH_VA read under tables
 * A, then B after MOV CR3, then A again), HC_REMAP, HC_REPORT (L2_TAG_VA before and after the
 * remap), HC_FLUSH, HC_REPORT (L2_TAG_VA after the flush), then HLT.
 * With NESTED_TRIPLE_FAULT the L1 starts it at l2_triple_fault instead.
 */
#include "nested.h"

#if defined(VMX)
#define HYPERCALL vmcall
#elif defined(SVM)
#define HYPERCALL vmmcall
#else
#error "build with -DVMX or -DSVM"
#endif

	.code64
	.section .text.entry, "ax"
	.globl	l2_start
l2_start:
	/* CPUID: answered by the L1 ("pykvm L1 hv") */
	movl	$L1_CPUID_LEAF, %eax
	xorl	%ecx, %ecx
	cpuid
	movl	%ebx, %r12d

	/* port I/O */
	movb	$L2_OUT_VALUE, %al
	outb	%al, $L2_OUT_PORT
	xorl	%eax, %eax
	inb	$L2_IN_PORT, %al
	movq	%rax, %r13

	/* a hypercall with an answer */
	movq	$HC_ECHO, %rax
	movq	$0x1234, %rbx
	HYPERCALL
	movq	%rax, %r14

	/* a write the EPT/NPT forbids: the L1 resumes at R15 */
	leaq	1f(%rip), %r15
	movl	$0xdead, L2_RO_PAGE + 0x10
1:
	movq	$HC_REPORT, %rax
	movq	%r12, %rbx
	movq	%r13, %rcx
	movq	%r14, %rdx
	HYPERCALL

	/* a page-table switch: the same linear address under tables A and B */
	movl	L2_SWITCH_VA, %r12d
	movl	$L2_CR3_B, %eax
	movq	%rax, %cr3
	movl	L2_SWITCH_VA, %r13d
	movl	$L2_CR3_A, %eax
	movq	%rax, %cr3
	movl	L2_SWITCH_VA, %r14d
	movq	$HC_REPORT, %rax
	movq	%r12, %rbx
	movq	%r13, %rcx
	movq	%r14, %rdx
	HYPERCALL

	/* tagging: a translation cached before an exit, its PTE changed by the L1 during the exit */
	movl	L2_TAG_VA, %r12d		/* fills the TLB: L2_PAGE_A */
	movq	$HC_REMAP, %rax
	HYPERCALL				/* the PTE now says L2_PAGE_B; nothing flushed */
	movl	L2_TAG_VA, %r13d		/* A if the tagged entry survived the exit, else B */
	movq	$HC_REPORT, %rax
	movq	%r12, %rbx
	movq	%r13, %rcx
	xorl	%edx, %edx
	HYPERCALL
	movq	$HC_FLUSH, %rax
	HYPERCALL				/* the L1 flushes this VPID/ASID */
	movl	L2_TAG_VA, %r14d		/* must be B */
	movq	$HC_REPORT, %rax
	movq	%r14, %rbx
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	HYPERCALL

2:	hlt
	jmp	2b

	/* No IDT: #UD -> #DF -> triple fault */
	.globl	l2_triple_fault
l2_triple_fault:
	ud2
	jmp	l2_triple_fault
