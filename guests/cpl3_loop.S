/* cpl3_loop.S - iretq to CPL3, count RCX down to 0 there (compute only, no exit), DONE(0) from CPL3.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Entry: the host sets RCX = the number of loop iterations (0 or more) before the first run.
 * Exits: DONE(0) (IoOut port=0xEA, at CPL3), nothing before it: kvm_pvm runs CPL3 code natively,
 *        so this is a guest-bound job (scripts/bench_many.py's compute-bound guest).
 *
 * Needs from the host what cpuid_cpl.S needs: SEL_USER_CODE64 and SEL_USER_DATA (DPL 3) in the GDT,
 * user-accessible page tables, and the TSS I/O bitmap for the DONE port write at CPL3.
 */
#include "pykvm.h"


	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	PYKVM_ENTER_CPL3 user

user:					/* CPL3 from here on */
	testq	%rcx, %rcx
	jz	done
loop:
	decq	%rcx
	jnz	loop
done:
	PYKVM_DONE 0
