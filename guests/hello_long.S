/* hello_long.S - print "Hello from long mode\n" on the debug console, then DONE(0).
 * Mode: 64-bit long mode, 4- or 5-level paging (CR3/CR4 untouched)    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=0xE9) x21, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS hello
	PYKVM_DONE 0

	.section .rodata
hello:	.asciz	"Hello from long mode\n"
