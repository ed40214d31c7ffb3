/* isr.S - interrupt and exception entry points of the virtio test kernel (32-bit protected mode).
 *
 * Interrupts (vectors IRQ_VECTOR_BASE + device index, and TIMER_VECTOR) are only ever taken in
 * core.c's `sti; hlt; cli`: the handlers return to the instruction after the HLT with interrupts
 * off. They return without IRET: KVM's instruction emulator implements IRET for real mode only,
 * and kvm_pvm emulates every CPL0 instruction, so a protected-mode IRET fails there (platform.c
 * does the same). EIP goes through one saved word; handlers cannot nest (IF stays clear from the
 * gate to the jump), so it cannot be overwritten before the jump.
 *
 * Exceptions (vectors 0-31) do not return: exception_entry(vector, error code, eip) FAILs.
 */
	.code32
	.text

	.globl	irq_stub_table, exception_stub_table, saved_eip

/* One stub per device slot: push the slot, then the common part calls irq_entry(slot). */
.macro IRQ_STUB n
irq_stub_\n:
	pushl	$\n
	jmp	irq_common
.endm

irq_common:
	pusha				/* 32 bytes: the slot is at 32(%esp) */
	cld
	pushl	32(%esp)
	call	irq_entry
	addl	$4, %esp
	popa
	addl	$4, %esp		/* the slot */
	popl	saved_eip
	addl	$4, %esp		/* CS: the same code segment */
	andl	$0xFFFFFDFF, (%esp)	/* return with IF clear: back into sti; hlt; cli */
	popfl
	jmp	*saved_eip

	IRQ_STUB 0
	IRQ_STUB 1
	IRQ_STUB 2
	IRQ_STUB 3
	IRQ_STUB 4
	IRQ_STUB 5
	IRQ_STUB 6
	IRQ_STUB 7
	IRQ_STUB 8		/* slot 8: the LAPIC timer */
	IRQ_STUB 9		/* slot 9: spurious or unexpected vectors */

/* Exceptions: those with an error code (8, 10-14, 17, 21, 29, 30) have it on the stack already. */
.macro EXC_STUB n
exc_stub_\n:
	.if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
	.else
	pushl	$0
	.endif
	pushl	$\n
	jmp	exc_common
.endm

exc_common:
	cld
	call	exception_entry		/* (vector, error code, eip): does not return */
1:	hlt
	jmp	1b

	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	EXC_STUB \n
	.endr

	.section .rodata
	.balign	4
irq_stub_table:
	.long	irq_stub_0, irq_stub_1, irq_stub_2, irq_stub_3, irq_stub_4, irq_stub_5, irq_stub_6, irq_stub_7
	.long	irq_stub_8, irq_stub_9
exception_stub_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long	exc_stub_\n
	.endr

	.bss
	.balign	4
saved_eip:
	.skip	4
