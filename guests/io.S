/* io.S - port I/O out and in (sizes 1, 2, 4), string I/O, MMIO and HLT, in that order, then DONE(0).
 * Mode: 32-bit protected mode, no paging    Load: flat at GPA 0x100000, entry = first byte
 * Exits: (a) IoOut(port=0x600): size 1 0x11, size 2 0x2222, size 4 0x33333333
 *        (b) IoIn(port=0x600): size 1, size 2, size 4; then IoOut(port=0x600, size 4) of their sum
 *            (zero-extended values, added modulo 2**32)
 *        (c) IoOut(port=0x600, size 1, count 8) b"STRINGIO" (rep outsb)
 *        (d) IoIn(port=0x600, size 1, count 4) (rep insb); IoOut(port=0x601, size 1, count 4) of
 *            the 4 bytes read
 *        (e) MmioWrite(0xD0000000, 4 bytes, 0x44444444); MmioRead(0xD0000008, 4 bytes);
 *            MmioWrite(0xD0000004, 4 bytes, the value read)
 *        (f) Hlt (IF = 0: with an in-kernel irqchip there is no HLT exit and the vCPU stays halted)
 *        (g) DONE(0) (IoOut port=0xEA)
 * A string instruction may reach the host as one exit with count > 1 or as several exits. */
#include "pykvm.h"

	.code32
	.section .text.entry, "ax"
	.globl	_start
_start:
	movw	$PYKVM_TEST_PORT, %dx

	/* (a) out, each size */
	movb	$0x11, %al
	outb	%al, %dx
	movw	$0x2222, %ax
	outw	%ax, %dx
	movl	$0x33333333, %eax
	outl	%eax, %dx

	/* (b) in, each size; then out the sum so the host sees what the guest read */
	inb	%dx, %al
	movzbl	%al, %ebx
	inw	%dx, %ax
	movzwl	%ax, %ecx
	addl	%ecx, %ebx
	inl	%dx, %eax
	addl	%ebx, %eax
	outl	%eax, %dx

	/* (c) string out */
	cld
	movl	$stringio, %esi
	movl	$8, %ecx
	rep outsb

	/* (d) string in to buffer (ES:EDI), then echo it to TEST_PORT + 1 */
	movl	$buffer, %edi
	movl	$4, %ecx
	rep insb
	movl	$buffer, %esi
	movl	$4, %ecx
	incw	%dx
	rep outsb

	/* (e) MMIO: write, read, write back what was read */
	movl	$0x44444444, PYKVM_MMIO_WINDOW
	movl	PYKVM_MMIO_WINDOW + 8, %eax
	movl	%eax, PYKVM_MMIO_WINDOW + 4

	/* (f) */
	hlt

	/* (g) */
	PYKVM_DONE 0

	.section .rodata
stringio:
	.ascii	"STRINGIO"		/* 8 bytes, no NUL */

	.section .bss
buffer:
	.skip	4
