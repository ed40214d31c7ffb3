/* wild_write.S - write the byte 0x55 to GPA 0xE0000000 (no RAM, no device), then DONE(0).
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: MmioWrite(addr=0xE0000000, data=b"\x55") (len 1), then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

#define WILD_ADDRESS	0xE0000000	/* inside the 4 GiB identity map, outside every memory slot */

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$WILD_ADDRESS, %eax	/* zero-extends: a disp32 operand would sign-extend to 0xffffffffe0000000 */
	movb	$0x55, (%rax)
	PYKVM_DONE 0
