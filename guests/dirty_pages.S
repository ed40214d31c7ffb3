/* dirty_pages.S - write one quadword into each of RCX pages from DIRTY_BASE up, then DONE(0).
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Entry: the host sets RCX = the number of pages (0 or more; they must lie in guest RAM).
 * The quadword written is RCX's value at entry plus the page's index, so a reset that puts the
 * pages back is seen. scripts/bench_snapshot.py's guest: a fast reset copies back what it dirtied.
 * Exits: DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

#define DIRTY_BASE	0x200000

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	$DIRTY_BASE, %edi
	movq	%rcx, %rdx
	testq	%rcx, %rcx
	jz	done
page:
	movq	%rdx, (%rdi)
	incq	%rdx
	addq	$PYKVM_PAGE_SIZE, %rdi
	decq	%rcx
	jnz	page
done:
	PYKVM_DONE 0
