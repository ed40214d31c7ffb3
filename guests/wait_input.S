/* wait_input.S - wait for one byte on COM1's receiver, then end: a guest whose end the host decides.
 * Mode: 64-bit long mode, needs pykvm's PC devices (COM1 at 0x3F8; pykvm run feeds it stdin)    Load: flat at GPA 0x100000, entry = first byte
 * Prints "waiting\n" on the debug console, polls COM1's LSR until Data Ready, reads the byte from
 * RBR and prints "got X\n" (X the byte), then DONE(0). The migration tests use it to end a guest
 * at a moment they choose (while a migration is in progress).
 * Exits: IoOut(port=0xE9) x8, IoIn(port=0x3FD) until a byte is there, IoIn(port=0x3F8),
 *        IoOut(port=0xE9) x6, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

#define COM1		0x3F8
#define LSR_DR		0x01

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS waiting
	movw	$(COM1 + 5), %dx		/* LSR */
poll:
	inb	%dx, %al
	testb	$LSR_DR, %al
	jnz	ready
	pause
	jmp	poll
ready:
	movw	$COM1, %dx			/* RBR: the byte */
	inb	%dx, %al
	movb	%al, %bl
	PYKVM_PUTS got
	movb	%bl, %al
	outb	%al, $PYKVM_CONSOLE_PORT
	PYKVM_PUTC '\n'
	PYKVM_DONE 0

	.section .rodata
waiting:	.asciz	"waiting\n"
got:		.asciz	"got "
