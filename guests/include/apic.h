/* apic.h - guest-side helpers (GNU as, 64-bit code) for interrupts: IDT gates, the local APIC,
 * the IOAPIC, the legacy PICs and the i8254 PIT. Include after pykvm.h. */
#ifndef PYKVM_APIC_H
#define PYKVM_APIC_H

#define LAPIC_BASE	0xFEE00000
#define LAPIC_ID	0x020
#define LAPIC_EOI	0x0B0
#define LAPIC_SVR	0x0F0
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define IOAPIC_BASE	0xFEC00000
#define IOAPIC_WIN	0x10
#define X2APIC_MSR_SVR	0x80F
#define X2APIC_MSR_ICR	0x830
#define MSR_APIC_BASE	0x1B

/* SET_GATE vector, handler: point the 64-bit interrupt gate for `vector` of pykvm's IDT at
 * `handler`. Clobbers RAX, RDI. */
.macro SET_GATE vector, handler
	leaq	\handler(%rip), %rax
	movl	$(PYKVM_IDT + (\vector) * 16), %edi
	movw	%ax, (%rdi)
	movw	$PYKVM_SEL_CODE64, 2(%rdi)
	movw	$0x8E00, 4(%rdi)	/* present, DPL 0, 64-bit interrupt gate, IST 0 */
	shrq	$16, %rax
	movw	%ax, 6(%rdi)
	shrq	$16, %rax
	movl	%eax, 8(%rdi)
	movl	$0, 12(%rdi)
.endm

/* LAPIC_WRITE reg, value: a 32-bit write to a local APIC register (xAPIC, MMIO). Clobbers RDI. */
.macro LAPIC_WRITE reg, value
	movl	$(LAPIC_BASE + \reg), %edi
	movl	\value, (%rdi)
.endm

/* IOAPIC_ROUTE pin, vector: redirection entry `pin` -> fixed `vector`, physical destination APIC 0,
 * edge, active high, unmasked. Clobbers RDI. */
.macro IOAPIC_ROUTE pin, vector
	movl	$IOAPIC_BASE, %edi
	movl	$(0x10 + 2 * (\pin)), (%rdi)
	movl	$(\vector), IOAPIC_WIN(%rdi)
	movl	$(0x11 + 2 * (\pin)), (%rdi)
	movl	$0, IOAPIC_WIN(%rdi)
.endm

/* MASK_PICS: mask every line of both 8259 PICs, so only the IOAPIC delivers interrupts. Clobbers AL. */
.macro MASK_PICS
	movb	$0xFF, %al
	outb	%al, $0x21
	outb	%al, $0xA1
.endm

#endif
