/* msr.S - read, write and read again an MSR that the host emulates in Python (TEST_MSR), then read
 * one it refuses (TEST_MSR + 1: the host's handler returns None, so the guest takes #GP).
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: X86Rdmsr(TEST_MSR), SYNC(low 32 bits read), X86Wrmsr(TEST_MSR, 0x1122334455667788),
 *        X86Rdmsr(TEST_MSR), SYNC(low 32 bits read), X86Rdmsr(TEST_MSR + 1), then the #GP (vector 13)
 *        reported on EXCEPTION_PORT by pykvm's stub. */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$PYKVM_TEST_MSR, %ecx
	rdmsr
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	$PYKVM_TEST_MSR, %ecx
	movl	$0x55667788, %eax
	movl	$0x11223344, %edx
	wrmsr
	rdmsr
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	$(PYKVM_TEST_MSR + 1), %ecx
	rdmsr					/* #GP: no handler in the guest, so the stub reports it */
	PYKVM_DONE 0
