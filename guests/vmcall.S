/* vmcall.S - KVM_HC_MAP_GPA_RANGE (12) with VMCALL, the hypercall KVM_CAP_EXIT_HYPERCALL sends to
 * user space: GPA 0x200000, 1 page, attributes 0.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: Hypercall(nr=12, args=(0x200000, 1, 0, ...)), SYNC(RAX after it), then DONE(0).
 * (On AMD hosts KVM rewrites VMCALL into VMMCALL as the CPU needs.) */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$12, %eax
	movl	$0x200000, %ebx
	movl	$1, %ecx
	xorl	%edx, %edx
	vmcall
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0
