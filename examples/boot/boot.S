/* boot.S - the kernel's 64-bit entry.
 *
 * Entered at _start in 64-bit long mode with the low 4 GiB identity-mapped (the state a UEFI
 * loader hands over in, and what `pykvm run --mode long` sets up), interrupts off, RSP unknown.
 * It writes a POST code to port 0x80 at each stage, sets its own stack, zeroes .bss (the loader
 * only copies the file), checks the CPU for what the kernel needs, fills boot_info and calls
 * kernel_main(&boot_info). A CPU without a needed feature stops the boot with FAIL and the
 * missing feature's name (pykvm.h's call port; a real kernel would print and halt instead).
 *
 * Mode: 64-bit long mode    Load: kernel.ld, at GPA 0x100000, entry = _start
 * Exits: IoOut(port=0x80) x4 (POST codes 1-4), IoOut(port=0xE9) x31 (kernel.c's console line),
 *        then DONE(0); or FAIL(line, leaf, "boot.S: ...") after POST code 2 on a CPU that lacks
 *        a feature
 */
#include "pykvm.h"
#include "boot.h"

.macro POST code
	movb	$(\code), %al
	outb	%al, $POST_PORT
.endm

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	cli
	cld
	POST	POST_ENTRY
	leaq	boot_stack_top(%rip), %rsp

	/* .bss: zero from __bss_start to __bss_end (kernel.ld keeps it out of the image). */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq
	POST	POST_BSS_CLEAR

	/* CPUID 0: the highest basic leaf and the vendor string. */
	leaq	boot_info(%rip), %rbp
	movl	$BOOT_INFO_MAGIC, BOOT_INFO_OFF_MAGIC(%rbp)
	xorl	%eax, %eax
	cpuid
	movl	%eax, BOOT_INFO_OFF_MAX_LEAF(%rbp)
	movl	%ebx, BOOT_INFO_OFF_VENDOR(%rbp)
	movl	%edx, BOOT_INFO_OFF_VENDOR + 4(%rbp)
	movl	%ecx, BOOT_INFO_OFF_VENDOR + 8(%rbp)

	/* CPUID 1: TSC, PAE and a local APIC. */
	movl	$1, %eax
	cpuid
	movl	%edx, BOOT_INFO_OFF_EDX_1(%rbp)
	movl	%ecx, BOOT_INFO_OFF_ECX_1(%rbp)
	andl	$BOOT_NEEDS_1_EDX, %edx
	cmpl	$BOOT_NEEDS_1_EDX, %edx
	jne	no_basic_features

	/* CPUID 0x80000001: long mode and NX (the kernel maps its data no-execute). */
	movl	$0x80000000, %eax
	cpuid
	cmpl	$0x80000001, %eax
	jb	no_extended_leaf
	movl	$0x80000001, %eax
	cpuid
	testl	$CPUID_80000001_EDX_LM, %edx
	jz	no_long_mode
	testl	$CPUID_80000001_EDX_NX, %edx
	jz	no_nx
	POST	POST_CPU_OK

	movq	%rbp, %rdi
	call	kernel_main
	/* kernel_main returned: its value is the status the boot ends with. */
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_DONE
	PYKVM_HALT_FOREVER

no_basic_features:
	PYKVM_FAIL __LINE__, 1, msg_basic
no_extended_leaf:
	PYKVM_FAIL __LINE__, 0x80000000, msg_extended
no_long_mode:
	PYKVM_FAIL __LINE__, 0x80000001, msg_long_mode
no_nx:
	PYKVM_FAIL __LINE__, 0x80000001, msg_nx

	.section .rodata
msg_basic:	.asciz	"boot.S: the CPU lacks TSC, PAE or an APIC"
msg_extended:	.asciz	"boot.S: no CPUID leaf 0x80000001"
msg_long_mode:	.asciz	"boot.S: the CPU has no long mode"
msg_nx:		.asciz	"boot.S: the CPU has no NX"

	.section .bss
	.balign	16
boot_stack:	.skip	16384
boot_stack_top:
