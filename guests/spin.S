/* spin.S - print "spinning\n" on the debug console, then loop for ever (jmp .).
 * Mode: 16-bit real mode    Load: flat at GPA 0x1000, entry = first byte (CS:IP = 0000:1000)
 * Exits: IoOut(port=0xE9) x9, then none: the host must stop it (immediate_exit + signal, or a timeout) */
#include "pykvm.h"

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS spinning
	jmp	.

	.section .rodata
spinning:
	.asciz	"spinning\n"
