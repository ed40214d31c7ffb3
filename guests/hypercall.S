/* hypercall.S - make hypercall TEST_HYPERCALL through the hypercall port, in KVM's register ABI
 * (number in EAX, arguments in RBX, RCX, RDX, RSI, the result back in RAX).
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: IoOut(port=HYPERCALL_PORT) with EAX=TEST_HYPERCALL and args 1, 2, 3, 4; SYNC(result);
 *        then DONE(0). */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$PYKVM_TEST_HYPERCALL, %eax
	movl	$1, %ebx
	movl	$2, %ecx
	movl	$3, %edx
	movl	$4, %esi
	outl	%eax, $PYKVM_HYPERCALL_PORT
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0
