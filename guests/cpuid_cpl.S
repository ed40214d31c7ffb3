/* cpuid_cpl.S - print the CPUID vendor and the CPL, iretq to CPL3, print the CPL again, DONE(0) from CPL3.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: PRINT("vendor: <12 chars>\n") (IoOut port=0xEA), IoOut(port=0xE9) x7 "cpl: 0\n",
 *        x7 "cpl: 3\n" (at CPL3), then DONE(0) (IoOut port=0xEA, at CPL3)
 *
 * Needs from the host: SEL_USER_CODE64 and SEL_USER_DATA (DPL 3) in the GDT, and page tables
 * whose entries for this image and the user stack (PYKVM_ENTER_CPL3's) have the U/S bit set (no CR4.SMEP/SMAP).
 * The CPL3 part does port I/O under RFLAGS.IOPL = 3 and the host's TSS I/O bitmap (which is what
 * allows it on kvm_pvm, where IOPL reads 0 at CPL3).
 */
#include "pykvm.h"


	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	xorl	%eax, %eax
	cpuid				/* leaf 0: vendor in EBX, EDX, ECX */
	movl	%ebx, vendor + 0(%rip)
	movl	%edx, vendor + 4(%rip)
	movl	%ecx, vendor + 8(%rip)
	PYKVM_PRINT vendor_line		/* the whole line in one call exit */
	call	print_cpl

	PYKVM_ENTER_CPL3 user

user:					/* CPL3 from here on */
	call	print_cpl
	PYKVM_DONE 0

/* Print "cpl: N\n" with N = CS & 3, the current privilege level. Clobbers EAX, ESI. */
print_cpl:
	movl	%cs, %eax
	andl	$3, %eax
	addb	$0x30, %al		/* '0' + CPL */
	movb	%al, cpl_digit(%rip)
	PYKVM_PUTS cpl_line
	ret

	.section .data
vendor_line:
	.ascii	"vendor: "
vendor:	.ascii	"????????????"		/* the 12 vendor bytes, filled in at run time */
	.asciz	"\n"
cpl_line:
	.ascii	"cpl: "
cpl_digit:
	.ascii	"?"
	.asciz	"\n"
