/* sync.S - SYNC(1), SYNC(2), SYNC(3), then DONE(0).
 * Mode: 32-bit protected mode, no paging    Load: flat at GPA 0x100000, entry = first byte
 * Exits: SYNC(1), SYNC(2), SYNC(3) (each IoOut port=0xEA; the host resumes), then DONE(0) */
#include "pykvm.h"

	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_SYNC 1
	PYKVM_SYNC 2
	PYKVM_SYNC 3
	PYKVM_DONE 0
