/* counter.S - count rounds; each round writes a pattern across 2 MiB of memory and prints the count.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte    Memory: at least 4 MiB
 * Round n (1 to COUNTER_ROUNDS): every page p of [COUNTER_BASE, COUNTER_BASE + 2 MiB) gets the
 * quadword n << 16 | p at offset (n % 512) * 8, then "count XXXXXXXX\n" (n in hex) goes to the
 * debug console. After the last round: DONE(0). Deterministic: two runs from the same state write
 * the same bytes, which is what the snapshot tests compare (a snapshot restored elsewhere goes on
 * counting where it stopped, and ends with the same memory).
 * Entry: RBX = the number of rounds, or 0 for COUNTER_ROUNDS (the migration tests run longer).
 * Exits: IoOut(port=0xE9) x15 a round, then DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

#define COUNTER_BASE	0x200000
#define COUNTER_PAGES	512
#ifndef COUNTER_ROUNDS
#define COUNTER_ROUNDS	200
#endif

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	xorl	%r12d, %r12d
	movq	$COUNTER_ROUNDS, %r13
	testq	%rbx, %rbx
	cmovnzq	%rbx, %r13
round:
	incq	%r12
	movq	%r12, %rax
	andq	$(COUNTER_PAGES - 1), %rax
	leaq	COUNTER_BASE(,%rax,8), %rdi
	xorl	%ecx, %ecx
page:
	movq	%r12, %rdx
	shlq	$16, %rdx
	orq	%rcx, %rdx
	movq	%rdx, (%rdi)
	addq	$PYKVM_PAGE_SIZE, %rdi
	incq	%rcx
	cmpq	$COUNTER_PAGES, %rcx
	jb	page
	PYKVM_PUTS label
	movl	%r12d, %edx
	movl	$8, %ecx
digit:
	roll	$4, %edx
	movl	%edx, %eax
	andl	$15, %eax
	movzbl	hex(%eax), %eax
	outb	%al, $PYKVM_CONSOLE_PORT
	decl	%ecx
	jnz	digit
	PYKVM_PUTC '\n'
	cmpq	%r13, %r12
	jb	round
	PYKVM_DONE 0

	.section .rodata
label:	.asciz	"count "
hex:	.ascii	"0123456789abcdef"
