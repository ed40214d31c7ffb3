/* hello_paged.S - print "Hello from paged mode\n" on the debug console, then DONE(0).
 * Mode: 32-bit protected mode, 32-bit paging (4 MiB pages)    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=0xE9) x22, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS hello
	PYKVM_DONE 0

	.section .rodata
hello:	.asciz	"Hello from paged mode\n"
