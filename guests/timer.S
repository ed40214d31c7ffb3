/* timer.S - take TICKS timer interrupts from the i8254 PIT through the IOAPIC and the local APIC.
 * Mode: 64-bit long mode, needs the in-kernel irqchip and PIT    Load: flat at GPA 0x100000, entry = first byte
 * Exits: SYNC(vector) for the first tick (0x30 if it came in on IOAPIC pin 0, 0x32 on pin 2),
 *        SYNC(ticks) after the last one (TICKS, or more where one lands before the cli), then
 *        DONE(0); HLT waits are handled in the kernel.
 * PIT channel 0 runs in mode 2 at 1193182 / 11932 Hz (about 100 Hz); the PICs are masked. */
#include "pykvm.h"
#include "apic.h"

#define TICKS	5

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	SET_GATE 0x30, tick_pin0
	SET_GATE 0x32, tick_pin2
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF		/* software-enable the local APIC, spurious vector 0xFF */
	IOAPIC_ROUTE 0, 0x30
	IOAPIC_ROUTE 2, 0x32
	movb	$0x34, %al			/* channel 0, lobyte/hibyte, mode 2 (rate generator) */
	outb	%al, $0x43
	movw	$11932, %ax
	outb	%al, $0x40
	movb	%ah, %al
	outb	%al, $0x40
	sti
1:	hlt
	cmpl	$TICKS, ticks(%rip)
	jb	1b
	cli
	movl	first_vector(%rip), %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	ticks(%rip), %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0

tick_pin0:
	pushq	%rax
	movl	$0x30, %eax
	jmp	tick
tick_pin2:
	pushq	%rax
	movl	$0x32, %eax
tick:
	cmpl	$0, first_vector(%rip)
	jne	2f
	movl	%eax, first_vector(%rip)
2:	incl	ticks(%rip)
	pushq	%rdi
	LAPIC_WRITE LAPIC_EOI, $0
	popq	%rdi
	popq	%rax
	iretq

	.section .data
ticks:		.long	0
first_vector:	.long	0
