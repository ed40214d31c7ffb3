/* boot.S - the multiboot (version 1) header and entry of pykvm's multiboot test kernel.
 * Mode: entered in 32-bit protected mode by a multiboot loader (EAX = 0x2BADB002, EBX = info)
 * Load: ELF segments at GPA 0x100000 (kernel.ld), entry = _start
 * It sets its own stack (the spec leaves ESP undefined) and calls kmain(magic, info).
 */
#include "multiboot.h"

	MULTIBOOT_HEADER

	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$stack_top, %esp	/* first: nothing may be pushed before this */
	cld
	pushl	%ebx			/* kmain(magic, info) */
	pushl	%eax
	call	kmain
1:	hlt
	jmp	1b

	.section .bss
	.balign	16
stack:	.skip	16384
stack_top:
