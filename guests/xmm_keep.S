/* xmm_keep.S - keep a pattern in XMM3 across an exit: a snapshot taken there must carry it.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Loads 16 bytes into XMM3 (and their complement into XMM15), prints "x" (the exit a test pauses
 * at), then stores both registers back and compares them with what was loaded: DONE(0) when both
 * came through, FAIL otherwise. tests/test_snapshot.py's guest for the XSAVE area.
 * Exits: IoOut(port=0xE9) once, then DONE(0) or FAIL (IoOut port=0xEA) */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movdqu	pattern(%rip), %xmm3
	movdqu	complement(%rip), %xmm15	/* ~pattern (KVM's emulator has no PCMPEQB or PXOR) */
	PYKVM_PUTC 'x'
	movdqu	%xmm3, out(%rip)
	movdqu	%xmm15, out + 16(%rip)
	movq	out(%rip), %rax
	cmpq	pattern(%rip), %rax
	jne	bad
	movq	out + 8(%rip), %rax
	cmpq	pattern + 8(%rip), %rax
	jne	bad
	movq	out + 16(%rip), %rax
	notq	%rax
	cmpq	pattern(%rip), %rax
	jne	bad
	PYKVM_DONE 0
bad:
	PYKVM_FAIL __LINE__, 0, lost

	.section .rodata
	.balign	16
lost:	.asciz	"an XMM register lost its value across the exit"
	.balign	16
pattern: .byte	0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf
complement: .byte	0x5f, 0x5e, 0x5d, 0x5c, 0x5b, 0x5a, 0x59, 0x58, 0x57, 0x56, 0x55, 0x54, 0x53, 0x52, 0x51, 0x50

	.section .data
	.balign	16
out:	.fill	32, 1, 0
