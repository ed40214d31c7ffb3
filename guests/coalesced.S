/* coalesced.S - write 1..WRITES to a write-only MMIO register and to a write-only port, both
 * registered as coalesced zones: KVM batches the writes in its ring instead of exiting on each.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: few or none for the writes (the host reads them from the ring at the next exit, in order),
 *        then DONE(0) (IoOut port=0xEA). Register: 32-bit at MMIO_WINDOW; port TEST_PORT (16-bit). */
#include "pykvm.h"

#define WRITES	200

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$PYKVM_MMIO_WINDOW, %edi
	movw	$PYKVM_TEST_PORT, %dx
	movl	$1, %eax
1:	movl	%eax, (%rdi)
	outw	%ax, %dx
	incl	%eax
	cmpl	$WRITES, %eax
	jbe	1b
	PYKVM_DONE 0
