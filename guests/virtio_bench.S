/* virtio_bench.S - drive one virtio-mmio device's queue 0 from CPL3 for scripts/bench_virtio.py.
 * Mode: 64-bit long mode, then CPL3    Load: flat at GPA 0x100000, entry = first byte
 * Exits: MmioRead/MmioWrite on the transport while it sets the device up (CPL0, emulated), SYNC(1)
 *        when the timed loop starts (CPL3), then per loop: BLK none (QueueNotify is an ioeventfd,
 *        completions are polled), NOTIFY none, TRAPPED one MmioWrite per write; SYNC(2) when the
 *        loop ends, then DONE(errors).
 *
 * RDI holds the address of a parameter block of 64-bit words, filled by the host (bench_virtio.py):
 *   P_MMIO    the transport's GPA            P_LOOP   1 BLK, 2 NOTIFY, 3 TRAPPED
 *   P_N       requests (BLK) or writes       P_QSIZE  QueueNum to set (a power of 2)
 *   P_DESC, P_AVAIL, P_USED                  the GPAs of the split ring's three parts
 *   P_DEPTH   requests in flight at most     P_CHAINS K: chain j starts at descriptor 3 * j
 *   P_STATUS  GPA of K status bytes (chain j's status byte is the one at P_STATUS + j)
 *   P_REG     the register offset TRAPPED writes (0 is written)
 *   P_HEADERS GPA of the K request headers (16 bytes each; chain j's is the one at P_HEADERS + 16 * j)
 *   P_SECTORS 0, or the GPA of N 64-bit sectors: request i then reads sector P_SECTORS[i] (the
 *             guest writes it into its chain's header before making the chain available)
 *   P_TORN    written by the guest: how many times it read a used.idx that moved by more entries
 *             than it had in flight (a device's torn or backward store), which it then read again
 * The host builds the descriptor table: K chains of three descriptors (request header, data
 * buffer, status byte), and sets avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT (the guest polls).
 * The guest (CPL0) resets the device, accepts VIRTIO_F_VERSION_1 only, sets queue 0 up, sets
 * DRIVER_OK, then drops to CPL3 (IOPL 3 and the TSS I/O bitmap let it reach the call port) and runs
 * the loop. BLK keeps up to P_DEPTH requests in the avail ring, chain (i mod K) for request i,
 * notifies unless the device set VIRTQ_USED_F_NO_NOTIFY, and counts each completed chain whose
 * status byte is not VIRTIO_BLK_S_OK (0) as an error. SYNC(2), DONE(errors) at the end; FAIL if the device
 * is not a virtio-mmio version 2 device, refuses the features, or has a queue too small.
 */
#include "pykvm.h"

#define P_MMIO		0
#define P_LOOP		8
#define P_N		16
#define P_QSIZE		24
#define P_DESC		32
#define P_AVAIL		40
#define P_USED		48
#define P_DEPTH		56
#define P_CHAINS	64
#define P_STATUS	72
#define P_REG		80
#define P_HEADERS	88
#define P_SECTORS	96
#define P_TORN		104

#define LOOP_BLK	1
#define LOOP_NOTIFY	2
#define LOOP_TRAPPED	3

/* virtio-mmio version 2 registers */
#define R_MAGIC		0x000
#define R_VERSION	0x004
#define R_DRV_FEAT	0x020
#define R_DRV_FEAT_SEL	0x024
#define R_QUEUE_SEL	0x030
#define R_QUEUE_NUM_MAX	0x034
#define R_QUEUE_NUM	0x038
#define R_QUEUE_READY	0x044
#define R_QUEUE_NOTIFY	0x050
#define R_STATUS	0x070
#define R_DESC_LO	0x080
#define R_DESC_HI	0x084
#define R_AVAIL_LO	0x090
#define R_AVAIL_HI	0x094
#define R_USED_LO	0x0A0
#define R_USED_HI	0x0A4

#define S_ACK		1
#define S_DRIVER	2
#define S_DRIVER_OK	4
#define S_FEATURES_OK	8


	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movq	%rdi, %r15			/* R15 = the parameter block, for good */
	movq	P_MMIO(%r15), %rbx		/* RBX = the transport */
	cmpl	$0x74726976, R_MAGIC(%rbx)	/* "virt" */
	jne	bad_device
	cmpl	$2, R_VERSION(%rbx)
	jne	bad_device

	movl	$0, R_STATUS(%rbx)		/* reset */
	movl	$S_ACK, R_STATUS(%rbx)
	movl	$(S_ACK | S_DRIVER), R_STATUS(%rbx)
	movl	$0, R_DRV_FEAT_SEL(%rbx)
	movl	$0, R_DRV_FEAT(%rbx)
	movl	$1, R_DRV_FEAT_SEL(%rbx)
	movl	$1, R_DRV_FEAT(%rbx)		/* bit 32: VIRTIO_F_VERSION_1 */
	movl	$(S_ACK | S_DRIVER | S_FEATURES_OK), R_STATUS(%rbx)
	testl	$S_FEATURES_OK, R_STATUS(%rbx)
	jz	bad_features

	movl	$0, R_QUEUE_SEL(%rbx)
	movq	P_QSIZE(%r15), %rax
	cmpl	R_QUEUE_NUM_MAX(%rbx), %eax
	ja	bad_queue
	movl	%eax, R_QUEUE_NUM(%rbx)
	movq	P_DESC(%r15), %rax
	movl	%eax, R_DESC_LO(%rbx)
	shrq	$32, %rax
	movl	%eax, R_DESC_HI(%rbx)
	movq	P_AVAIL(%r15), %rax
	movl	%eax, R_AVAIL_LO(%rbx)
	shrq	$32, %rax
	movl	%eax, R_AVAIL_HI(%rbx)
	movq	P_USED(%r15), %rax
	movl	%eax, R_USED_LO(%rbx)
	shrq	$32, %rax
	movl	%eax, R_USED_HI(%rbx)
	movl	$1, R_QUEUE_READY(%rbx)
	movl	$(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%rbx)

	PYKVM_ENTER_CPL3 user

user:						/* CPL3 from here on */
	movq	P_MMIO(%r15), %rbx
	movq	P_N(%r15), %rcx
	movq	P_LOOP(%r15), %rax
	PYKVM_SYNC 1				/* the host starts its clock (clobbers EAX, EBX, DX) */
	movq	P_MMIO(%r15), %rbx
	movq	P_LOOP(%r15), %rax
	cmpq	$LOOP_NOTIFY, %rax
	je	notify_loop
	cmpq	$LOOP_TRAPPED, %rax
	je	trapped_loop

/* BLK. R8 = submitted, R9 = completed, R10 = errors, R11 = avail ring, R12 = used ring,
 * R13 = queue size - 1, R14 = the next used index to read, RBP = the status bytes. */
blk_loop:
	xorl	%r8d, %r8d
	xorl	%r9d, %r9d
	xorl	%r10d, %r10d
	xorl	%r14d, %r14d
	movq	P_AVAIL(%r15), %r11
	movq	P_USED(%r15), %r12
	movq	P_QSIZE(%r15), %r13
	decq	%r13
	movq	P_STATUS(%r15), %rbp
1:	cmpq	P_N(%r15), %r9			/* all completed? */
	jae	blk_done
	/* submit while submitted < N and submitted - completed < depth */
2:	cmpq	P_N(%r15), %r8
	jae	4f
	movq	%r8, %rax
	subq	%r9, %rax
	cmpq	P_DEPTH(%r15), %rax
	jae	4f
	movq	%r8, %rax
	xorl	%edx, %edx
	divq	P_CHAINS(%r15)			/* RDX = j = submitted mod K */
	movb	$0xFF, (%rbp,%rdx)		/* the device must overwrite it */
	movq	P_SECTORS(%r15), %rsi
	testq	%rsi, %rsi
	jz	3f
	movq	(%rsi,%r8,8), %rax		/* request i's sector */
	movq	%rdx, %rdi
	shlq	$4, %rdi
	addq	P_HEADERS(%r15), %rdi
	movq	%rax, 8(%rdi)			/* header.sector */
3:	leaq	(%rdx,%rdx,2), %rax		/* head descriptor 3 * j */
	movq	%r8, %rdx
	andq	%r13, %rdx
	movw	%ax, 4(%r11,%rdx,2)		/* avail.ring[submitted & (qsize - 1)] */
	incq	%r8
	jmp	2b
4:	movw	%r8w, 2(%r11)			/* avail.idx (x86 keeps the stores in order) */
	testw	$1, (%r12)			/* used.flags: VIRTQ_USED_F_NO_NOTIFY */
	jnz	5f
	movl	$0, R_QUEUE_NOTIFY(%rbx)	/* queue 0: an ioeventfd, no exit */
5:	movzwl	2(%r12), %edi			/* used.idx, read once */
	cmpw	%di, %r14w
	jne	6f
	pause
	jmp	5b
6:	movl	%edi, %eax			/* entries the device added: (used.idx - seen) mod 2^16 */
	subw	%r14w, %ax
	movzwl	%ax, %eax
	movq	%r8, %rdx
	subq	%r9, %rdx			/* requests in flight */
	cmpq	%rdx, %rax
	jbe	62f
	incq	P_TORN(%r15)			/* an impossible used.idx: count it, read again */
	jmp	5b
62:	movq	%r14, %rdx
	andq	%r13, %rdx
	movl	4(%r12,%rdx,8), %eax		/* used.ring[i].id: the head, 3 * j */
	xorl	%edx, %edx
	movl	$3, %esi
	divl	%esi
	cmpb	$0, (%rbp,%rax)			/* VIRTIO_BLK_S_OK */
	je	7f
	incq	%r10
7:	incq	%r14
	incq	%r9
	cmpw	%di, %r14w
	jne	62b
	jmp	1b
blk_done:
	PYKVM_SYNC 2				/* the host stops its clock */
	movq	%r10, %rbx
	PYKVM_CALL PYKVM_CALL_DONE
	PYKVM_HALT_FOREVER

/* NOTIFY: N writes of queue 0's index to QueueNotify (an ioeventfd with datamatch 0). */
notify_loop:
	testq	%rcx, %rcx
	jz	9f
	xorl	%eax, %eax
8:	movl	%eax, R_QUEUE_NOTIFY(%rbx)
	decq	%rcx
	jnz	8b
9:	PYKVM_SYNC 2
	PYKVM_DONE 0

/* TRAPPED: N writes of 0 to the register at P_REG, each an MMIO exit the host answers. */
trapped_loop:
	testq	%rcx, %rcx
	jz	9b
	addq	P_REG(%r15), %rbx
	xorl	%eax, %eax
10:	movl	%eax, (%rbx)
	decq	%rcx
	jnz	10b
	PYKVM_SYNC 2
	PYKVM_DONE 0

bad_device:
	PYKVM_FAIL __LINE__, 0, msg_device
bad_features:
	PYKVM_FAIL __LINE__, 0, msg_features
bad_queue:
	PYKVM_FAIL __LINE__, 0, msg_queue

	.section .data
msg_device:	.asciz	"not a virtio-mmio version 2 device"
msg_features:	.asciz	"the device refused VIRTIO_F_VERSION_1 alone (FEATURES_OK cleared)"
msg_queue:	.asciz	"queue 0 is smaller than the queue size asked for"
