/* bench_io.S - read an iteration count N, then do N byte writes to the bench port, then DONE(0).
 * Mode: 16-bit real mode    Load: flat at GPA 0x1000, entry = first byte (CS:IP = 0000:1000)
 * Exits: IoIn(port=0x700, size 4) (the host answers N), then IoOut(port=0x700, size 1) x N
 *        (the low byte of the iteration number, counting down from N), then DONE(0) (IoOut port=0xEA)
 * scripts/bench_exits.py and scripts/exit_loop.c time these exits; N = 0 gives no IoOut. */
#include "pykvm.h"

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	movw	$PYKVM_BENCH_PORT, %dx
	inl	%dx, %eax		/* N, chosen by the host */
	movl	%eax, %ecx
	jecxz	done
loop:
	movb	%cl, %al
	outb	%al, %dx		/* one port-I/O exit */
	decl	%ecx
	jnz	loop
done:
	PYKVM_DONE 0
