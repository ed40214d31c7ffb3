/* fail.S - call FAIL(line, 0x2a, "fail.S: expected failure"), then halt for ever.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: FAIL(line=12, value=0x2a, msg="fail.S: expected failure") (IoOut port=0xEA); never DONE
 *        (a host that resumes it gets Hlt) */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	/* line 12 (the header says so): */
	PYKVM_FAIL __LINE__, 0x2a, message

	.section .rodata
message:
	.asciz	"fail.S: expected failure"
