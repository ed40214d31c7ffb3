/* hello_real.S - print "Hello from real mode\n" on the debug console, then DONE(0).
 * Mode: 16-bit real mode    Load: flat at GPA 0x1000, entry = first byte (CS:IP = 0000:1000)
 * Exits: IoOut(port=0xE9) x21, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS hello
	PYKVM_DONE 0

	.section .rodata
hello:	.asciz	"Hello from real mode\n"
