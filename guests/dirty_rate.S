/* dirty_rate.S - dirty guest memory until told to stop, a batch at a time, for the host to pace.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Entry: RCX = pages a batch (1 or more), R8 = pages in the region (1 or more), which starts at
 * DIRTY_BASE and must lie in guest RAM; RDX = 0 to run at CPL0, else at CPL3 (iretq first, with
 * IOPL 3 for its port writes: kvm_pvm runs CPL3 code natively, CPL0 code in KVM's emulator).
 * Batch b writes the quadword b << 32 | page into the next RCX pages of the region (round robin),
 * then outs b (32-bit) to PYKVM_BENCH_PORT: the host's handler paces the guest there (sleeping to
 * a dirtying rate) and may end the run. Before each batch the guest reads the quadword at
 * DIRTY_STOP (the last one below the region): when the host has made it non-zero, DONE(0).
 * scripts/bench_migrate.py's guest (migration downtime against the rate pages are dirtied at),
 * and tests/test_migration.py's guest that dirties memory at CPL3 while it is moved.
 * Exits: IoOut(port=0x700, size 4) after each batch, until DONE(0) (IoOut port=0xEA) */
#include "pykvm.h"

#define DIRTY_BASE	0x200000
#define DIRTY_STOP	(DIRTY_BASE - 8)

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	testq	%rdx, %rdx
	jz	start
	PYKVM_ENTER_CPL3 start
start:
	movq	%rcx, %r9		/* pages a batch */
	xorl	%r10d, %r10d		/* batch number */
	xorl	%r11d, %r11d		/* the next page of the region */
batch:
	cmpq	$0, DIRTY_STOP
	jne	stop
	incq	%r10
	movq	%r9, %rcx
page:
	movq	%r11, %rdi
	shlq	$12, %rdi
	addq	$DIRTY_BASE, %rdi
	movq	%r10, %rax
	shlq	$32, %rax
	orq	%r11, %rax
	movq	%rax, (%rdi)
	incq	%r11
	cmpq	%r8, %r11
	jb	1f
	xorl	%r11d, %r11d
1:	decq	%rcx
	jnz	page
	movl	%r10d, %eax
	movw	$PYKVM_BENCH_PORT, %dx
	outl	%eax, %dx
	jmp	batch
stop:
	PYKVM_DONE 0
