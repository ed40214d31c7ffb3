/* smp.S - start the second vCPU with INIT/SIPI, and take an IPI it sends back.
 * Mode: 64-bit long mode on the BSP, 2 vCPUs, the in-kernel irqchip    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=0xE9) x11 "ap: apic 1\n" from the AP (real mode), then from the BSP
 *        IoOut(port=0xE9) x16 "bsp: ipi 0x31 0\n" (the vector and the BSP's APIC id), then DONE(0).
 * The BSP copies a real-mode trampoline to TRAMPOLINE and sends INIT + SIPI (vector 0x08) to APIC 1.
 * The AP prints its APIC id, turns on x2APIC and sends a fixed IPI (vector 0x31) to APIC 0. */
#include "pykvm.h"
#include "apic.h"

#define TRAMPOLINE	0x8000
#define IPI_VECTOR	0x31

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	SET_GATE IPI_VECTOR, ipi
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF
	leaq	trampoline(%rip), %rsi		/* copy the AP's real-mode code below 1 MiB */
	movl	$TRAMPOLINE, %edi
	movl	$(trampoline_end - trampoline), %ecx
	cld
	rep movsb
	LAPIC_WRITE LAPIC_ICR_HI, $(1 << 24)	/* destination: APIC id 1 */
	LAPIC_WRITE LAPIC_ICR_LO, $0x4500	/* INIT, assert */
	LAPIC_WRITE LAPIC_ICR_LO, $(0x4600 | (TRAMPOLINE >> 12))	/* SIPI: start at TRAMPOLINE */
	sti
1:	hlt
	cmpl	$0, got_ipi(%rip)
	je	1b
	cli
	movl	$(LAPIC_BASE + LAPIC_ID), %edi
	movl	(%rdi), %eax
	shrl	$24, %eax
	addb	$'0', %al
	movb	%al, bsp_id(%rip)
	PYKVM_PUTS bsp_line
	PYKVM_DONE 0

ipi:
	movl	$1, got_ipi(%rip)
	pushq	%rdi
	LAPIC_WRITE LAPIC_EOI, $0
	popq	%rdi
	iretq

	.section .data
got_ipi:	.long	0
bsp_line:	.ascii	"bsp: ipi 0x31 "
bsp_id:		.asciz	"?\n"

/* The AP starts here in real mode with CS = TRAMPOLINE >> 4, IP = 0: position-independent code
 * whose data is addressed relative to the trampoline's start through DS = CS. */
	.section .text, "ax"
	.code16
trampoline:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	movl	$MSR_APIC_BASE, %ecx
	rdmsr
	orl	$0xC00, %eax			/* x2APIC mode (EXTD) with the APIC enabled (EN) */
	wrmsr
	movl	$0x802, %ecx			/* x2APIC ID register */
	rdmsr
	addb	$'0', %al
	movb	%al, (ap_id - trampoline)
	movw	$(ap_line - trampoline), %si
	movw	$PYKVM_CONSOLE_PORT, %dx
2:	lodsb
	testb	%al, %al
	jz	3f
	outb	%al, %dx
	jmp	2b
3:	movl	$X2APIC_MSR_SVR, %ecx
	movl	$0x1FF, %eax
	xorl	%edx, %edx
	wrmsr
	movl	$X2APIC_MSR_ICR, %ecx		/* fixed IPI, physical destination APIC 0 (EDX) */
	movl	$IPI_VECTOR, %eax
	xorl	%edx, %edx
	wrmsr
4:	hlt
	jmp	4b
ap_line:	.ascii	"ap: apic "
ap_id:		.asciz	"?\n"
trampoline_end:
