/* page_fault.S - read an address above the 4 GiB identity map: pykvm's exception stub reports #PF.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=0xEB) from the stub of vector 14 (#PF), error code 0 (not present, read,
 *        supervisor), faulting RIP 0x100000, CR2 = 0x100000000 */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movabsq	0x100000000, %rax
	PYKVM_DONE 0
