/* bench_io.S - N accesses of one kind in a tight loop (scripts/bench_exits.py), then DONE(0).
 * Mode: 16-bit real mode    Load: flat at GPA 0x1000, entry = first byte (CS:IP = 0000:1000)
 * Entry: the host sets EAX = the loop (BENCH_LOOP_*) and ECX = N (0 or more) before the first run.
 * Exits: by loop (EAX), then DONE(0) (IoOut port=0xEA):
 *   BENCH_LOOP_OUT         IoOut(port=0x700, size 1) x N           (none: ioeventfd on the port)
 *   BENCH_LOOP_IN          IoIn(port=0x700, size 1) x N            (the host answers any byte)
 *   BENCH_LOOP_MMIO_WRITE  MmioWrite(gpa=BENCH_MMIO, 1 byte) x N   (few: coalesced MMIO zone)
 *   BENCH_LOOP_MMIO_READ   MmioRead(gpa=BENCH_MMIO, 1 byte) x N
 *   BENCH_LOOP_RDMSR       X86Rdmsr(BENCH_MSR) x N                 (the host's MSR filter)
 *   BENCH_LOOP_WRMSR       X86Wrmsr(BENCH_MSR) x N                 (the host's MSR filter)
 *   BENCH_LOOP_HYPERCALL   IoOut(port=HYPERCALL_PORT, size 4) x N  (EAX = BENCH_HYPERCALL)
 *   BENCH_LOOP_HLT         Hlt x N                                 (no in-kernel irqchip, IF = 0)
 *   another loop number    FAIL(line, the loop number)
 * BENCH_MMIO is FFFF:F010, above the 1 MiB of RAM the benchmark maps, so it exits as MMIO. Each
 * loop is the access, a `dec` and a `jnz`: the kernel emulates this CPL0 code on kvm_pvm. */
#include "pykvm.h"

	.code16
	.section .text.entry, "ax"
	.globl	_start
_start:
	movw	$0xFFFF, %bx
	movw	%bx, %es
	movw	$(PYKVM_BENCH_MMIO - 0xFFFF0), %di	/* ES:DI = BENCH_MMIO */
	movw	$PYKVM_BENCH_PORT, %dx
	testl	%ecx, %ecx
	jz	done
	cmpl	$PYKVM_BENCH_LOOP_OUT, %eax
	je	out_loop
	cmpl	$PYKVM_BENCH_LOOP_IN, %eax
	je	in_loop
	cmpl	$PYKVM_BENCH_LOOP_MMIO_WRITE, %eax
	je	mmio_write_loop
	cmpl	$PYKVM_BENCH_LOOP_MMIO_READ, %eax
	je	mmio_read_loop
	movl	%ecx, %ebp			/* the MSR and hypercall loops count in EBP */
	movl	$PYKVM_BENCH_MSR, %ecx
	cmpl	$PYKVM_BENCH_LOOP_RDMSR, %eax
	je	rdmsr_loop
	cmpl	$PYKVM_BENCH_LOOP_WRMSR, %eax
	je	wrmsr_loop
	cmpl	$PYKVM_BENCH_LOOP_HYPERCALL, %eax
	je	hypercall_loop
	movl	%ebp, %ecx
	cmpl	$PYKVM_BENCH_LOOP_HLT, %eax
	je	hlt_loop
	movl	%eax, %ecx			/* FAIL(line, the unknown loop number) */
	movl	$__LINE__, %ebx
	xorl	%esi, %esi
	PYKVM_CALL PYKVM_CALL_FAIL
	PYKVM_HALT_FOREVER

out_loop:
	movb	%cl, %al
	outb	%al, %dx
	decl	%ecx
	jnz	out_loop
	jmp	done

in_loop:
	inb	%dx, %al
	decl	%ecx
	jnz	in_loop
	jmp	done

mmio_write_loop:
	movb	%cl, %es:(%di)
	decl	%ecx
	jnz	mmio_write_loop
	jmp	done

mmio_read_loop:
	movb	%es:(%di), %al
	decl	%ecx
	jnz	mmio_read_loop
	jmp	done

rdmsr_loop:
	rdmsr
	decl	%ebp
	jnz	rdmsr_loop
	jmp	done

wrmsr_loop:
	movl	%ebp, %eax			/* EDX:EAX = the iteration number */
	xorl	%edx, %edx
	wrmsr
	decl	%ebp
	jnz	wrmsr_loop
	jmp	done

hypercall_loop:
	movl	$PYKVM_BENCH_HYPERCALL, %eax	/* the host puts its result in EAX */
	outl	%eax, $PYKVM_HYPERCALL_PORT
	decl	%ebp
	jnz	hypercall_loop
	jmp	done

hlt_loop:
	hlt
	decl	%ecx
	jnz	hlt_loop

done:
	PYKVM_DONE 0
