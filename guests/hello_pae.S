/* hello_pae.S - print "Hello from pae mode\n" on the debug console, then DONE(0).
 * Mode: 32-bit protected mode, PAE paging (2 MiB pages)    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=0xE9) x20, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_PUTS hello
	PYKVM_DONE 0

	.section .rodata
hello:	.asciz	"Hello from pae mode\n"
