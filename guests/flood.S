/* flood.S - write 'x' to the console for ever (a guest that floods its console).
 * Mode: 16-bit real mode    Load: flat at GPA 0x1000, entry = first byte
 * Exits: IoOut(port=0xE9) of 'x', without end (the host stops it with a timeout) */
#include "pykvm.h"

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	movb	$'x', %al
1:	outb	%al, $PYKVM_CONSOLE_PORT
	jmp	1b
