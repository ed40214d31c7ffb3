/* eventfd.S - write EVENTFD_PORT WRITES times (an ioeventfd: the kernel signals an eventfd, no exit
 * to user space), then wait for interrupt vector 0x35 on IOAPIC pin 5 (the host raises it with an
 * irqfd, again without a Python handler in the path).
 * Mode: 64-bit long mode, needs the in-kernel irqchip    Load: flat at GPA 0x100000, entry = first byte
 * Exits: none for the writes or the interrupt; SYNC(1) when the interrupt arrived, then DONE(0). */
#include "pykvm.h"
#include "apic.h"

#define WRITES	8

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	SET_GATE 0x35, irq5
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF
	IOAPIC_ROUTE 5, 0x35
	movl	$WRITES, %ecx
	movw	$PYKVM_EVENTFD_PORT, %dx
1:	movb	%cl, %al
	outb	%al, %dx
	loop	1b
	sti
2:	hlt
	cmpl	$0, got_irq(%rip)
	je	2b
	cli
	movl	got_irq(%rip), %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0

irq5:
	movl	$1, got_irq(%rip)
	pushq	%rdi
	LAPIC_WRITE LAPIC_EOI, $0
	popq	%rdi
	iretq

	.section .data
got_irq:	.long	0
