/* uart_irq.S - send a line out of COM1 one THR-empty interrupt at a time (IRQ 4 through the IOAPIC).
 * Mode: 64-bit long mode, needs the in-kernel irqchip and pykvm's PC devices (COM1 at 0x3F8, IRQ 4)    Load: flat at GPA 0x100000, entry = first byte
 * Entry: RBX = 0: IOAPIC pin 4 edge-triggered, unmasked from the start; RBX = 1: level-triggered,
 *        masked until after "armed" (then unmasking it delivers the pending level).
 * Exits: with interrupts off (cli), COM1 set to 8N1 with OUT2 and IER = ETBEI: the THR-empty
 *        interrupt is pending at once; PRINT "armed\n"; (RBX = 1: pin 4 unmasked, PRINT "unmasked\n");
 *        then sti; hlt: each interrupt n PRINTs "isr NN", reads IIR, writes the next byte of MESSAGE
 *        to THR (which empties at once and raises the interrupt again), PRINTs " iir XX\n" (XX: the
 *        IIR it read, 02 = THR empty), EOIs the local APIC. The interrupt after the last byte sets
 *        IER = 0 instead. Then PRINT "done\n", TAIL_SPINS loops with interrupts on (an interrupt
 *        without a source would print its ISR line, IIR 01, and be counted), SYNC(interrupts: the
 *        message's length + 1 where none came too many), DONE(0). Before DONE it zeroes its stack
 *        page below RSP, so the memory at DONE does not depend on where an interrupt landed.
 *        COM1 gets MESSAGE ("sent by THRE irqs\n"), byte by byte. */
#include "pykvm.h"
#include "apic.h"

#define COM1		0x3F8
#define UART_VECTOR	0x24
#define UART_PIN	4
#define IOAPIC_LEVEL	0x8000
#define IOAPIC_MASKED	0x10000
#define TAIL_SPINS	100000

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	cli
	movl	%ebx, %r13d			/* 0 edge, 1 level */
	SET_GATE UART_VECTOR, isr
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF
	movl	$IOAPIC_BASE, %edi		/* pin 4 -> UART_VECTOR, physical destination APIC 0 */
	movl	$(0x11 + 2 * UART_PIN), (%rdi)
	movl	$0, IOAPIC_WIN(%rdi)
	movl	$(0x10 + 2 * UART_PIN), (%rdi)
	movl	$UART_VECTOR, %eax
	testl	%r13d, %r13d
	jz	1f
	orl	$(IOAPIC_LEVEL | IOAPIC_MASKED), %eax
1:	movl	%eax, IOAPIC_WIN(%rdi)
	movw	$(COM1 + 3), %dx		/* LCR: 8N1 */
	movb	$0x03, %al
	outb	%al, %dx
	movw	$(COM1 + 4), %dx		/* MCR: OUT2, the PC's interrupt gate */
	movb	$0x08, %al
	outb	%al, %dx
	movw	$(COM1 + 1), %dx		/* IER: THR empty; THR is empty, so the interrupt is pending now */
	movb	$0x02, %al
	outb	%al, %dx
	PYKVM_PRINT armed_line
	testl	%r13d, %r13d
	jz	wait
	movl	$IOAPIC_BASE, %edi
	movl	$(0x10 + 2 * UART_PIN), (%rdi)
	movl	$(UART_VECTOR | IOAPIC_LEVEL), IOAPIC_WIN(%rdi)	/* unmasked */
	PYKVM_PRINT unmasked_line
wait:
	cli
	cmpl	$0, finished(%rip)
	jne	out
	sti
	hlt
	jmp	wait
out:
	PYKVM_PRINT done_line
	sti					/* a while with interrupts on: one that comes now is one too many */
	movl	$TAIL_SPINS, %ecx
4:	decl	%ecx
	jnz	4b
	cli
	movl	$(PYKVM_STACK_TOP - PYKVM_PAGE_SIZE), %edi	/* wipe the stack below RSP: where */
	movq	%rsp, %rcx			/* the interrupt frames landed is no part of the result */
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	cld
	rep stosq
	movl	interrupts(%rip), %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0

/* HEX2 dest: the low byte of EAX as two hex digits at label `dest`. Clobbers EAX, ECX. */
.macro HEX2 dest
	movl	%eax, %ecx
	shrl	$4, %ecx
	andl	$15, %ecx
	movb	hex(%ecx), %cl
	movb	%cl, \dest(%rip)
	andl	$15, %eax
	movb	hex(%eax), %al
	movb	%al, \dest + 1(%rip)
.endm

isr:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	incl	interrupts(%rip)
	movl	interrupts(%rip), %eax
	HEX2	isr_count
	PYKVM_PRINT isr_line
	movw	$(COM1 + 2), %dx		/* IIR: reports (and so clears) THR empty */
	inb	%dx, %al
	movzbl	%al, %eax
	HEX2	iir_value
	movl	sent(%rip), %ecx
	cmpl	$(message_end - message), %ecx
	jae	2f
	movb	message(%rcx), %al
	movw	$COM1, %dx			/* THR: the next byte */
	outb	%al, %dx
	incl	sent(%rip)
	jmp	3f
2:	xorl	%eax, %eax			/* all sent: IER = 0, no more THR-empty interrupts */
	movw	$(COM1 + 1), %dx
	outb	%al, %dx
	movl	$1, finished(%rip)
3:	PYKVM_PRINT iir_line
	LAPIC_WRITE LAPIC_EOI, $0
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	iretq
isr_end:

	.section .rodata
armed_line:	.asciz	"armed\n"
unmasked_line:	.asciz	"unmasked\n"
done_line:	.asciz	"done\n"
hex:		.ascii	"0123456789abcdef"
message:	.ascii	"sent by THRE irqs\n"
message_end:

	.section .data
isr_line:	.ascii	"isr "
isr_count:	.asciz	"??"
iir_line:	.ascii	" iir "
iir_value:	.asciz	"??\n"
interrupts:	.long	0
sent:		.long	0
finished:	.long	0
