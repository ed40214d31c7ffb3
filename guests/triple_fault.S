/* triple_fault.S - load an IDT with limit 0 and execute ud2: #UD -> #GP -> #DF -> triple fault.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: Shutdown (KVM_EXIT_SHUTDOWN); never DONE or FAIL */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	lidt	empty_idt(%rip)
	ud2
	/* not reached: a CPU that came back here did not triple-fault */
	PYKVM_FAIL __LINE__, 0, not_reached

	.section .rodata
	.p2align 3
empty_idt:
	.word	0			/* limit 0: every vector is out of bounds */
	.quad	0			/* base */
not_reached:
	.asciz	"triple_fault.S: ud2 did not triple-fault"
