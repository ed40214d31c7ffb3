/* pykvm.h - the guest side of the pykvm host protocol.
 *
 * Include it from a GNU as source preprocessed by gcc (`gcc -c guest.S -Iinclude`) or from a
 * freestanding C guest (`-m64` or `-m32 -ffreestanding -nostdlib`).
 *
 * The numbers below mirror pykvm/x86/layout.py, the one place they are defined:
 * PYKVM_<NAME> here is <NAME> there, and tests/test_guest_abi.py checks that they agree.
 * Keep each value a plain literal so that the test can read it.
 *
 * Protocol:
 *   console  byte `out` to PYKVM_CONSOLE_PORT
 *   calls    `out %eax, %dx` with DX = PYKVM_CALL_PORT and EAX = PYKVM_CALL_*:
 *            DONE   EBX = status (0: success)                        the host stops the guest
 *            FAIL   EBX = line, ECX/RCX = value, ESI/RSI = linear
 *                   address of a NUL-terminated message or 0           the host stops the guest
 *            SYNC   EBX = value                                       the host resumes the guest
 *            PRINT  ESI/RSI = linear address of a NUL-terminated string
 *
 * Linear addresses: pykvm's paged modes identity-map the first 4 GiB, and real mode runs with
 * DS = 0, so the address of a label is the linear (and guest-physical) address the host reads.
 */
#ifndef PYKVM_GUEST_H
#define PYKVM_GUEST_H

/* ---- guest memory map (layout.py) ---------------------------------------------------------- */
#define PYKVM_PAGE_SIZE         0x1000
#define PYKVM_REAL_IVT          0x0
#define PYKVM_REAL_LOAD         0x1000      /* real-mode image, entered at CS:IP = 0000:1000 */
#define PYKVM_GDT               0x10000
#define PYKVM_IDT               0x11000
#define PYKVM_TSS               0x12000
#define PYKVM_EXCEPTION_STUBS   0x15000
#define PYKVM_PAGE_TABLES       0x20000
#define PYKVM_PML5              0x20000
#define PYKVM_PML4              0x21000
#define PYKVM_PDPT              0x22000
#define PYKVM_PD                0x23000
#define PYKVM_PD_COUNT          4
#define PYKVM_STACK_TOP         0x9F000     /* real mode: SS = 0x9000, SP = 0xF000 */
#define PYKVM_PROTECTED_LOAD    0x100000    /* protected/paged/PAE/long-mode image and entry */
#define PYKVM_IDENTITY_MAP_SIZE 0x100000000
#define PYKVM_MMIO_WINDOW       0xD0000000  /* no memory slot: accesses exit as MMIO */
#define PYKVM_DEFAULT_MEM_SIZE  0x400000
#define PYKVM_MIN_MEM_SIZE      0x100000

/* ---- ports and calls (layout.py) ----------------------------------------------------------- */
#define PYKVM_CONSOLE_PORT      0xE9        /* byte out: console (QEMU debugcon) */
#define PYKVM_CALL_PORT         0xEA        /* 32-bit out of a call number */
#define PYKVM_EXCEPTION_PORT    0xEB        /* written by the host's exception stubs */
#define PYKVM_HYPERCALL_PORT    0xEC        /* out of a hypercall number; args RBX, RCX, RDX, RSI; result in RAX */
#define PYKVM_TEST_PORT         0x600       /* io.S: port I/O tests (TEST_PORT and TEST_PORT + 1) */
#define PYKVM_TEST_ROM          0x400000    /* memory.S: a read-only slot the host maps (one page) */
#define PYKVM_TEST_RAM2         0x800000    /* memory.S: a second RAM slot the host maps (one page) */
#define PYKVM_EVENTFD_PORT      0x610       /* eventfd.S: writes answered by an ioeventfd in the kernel */
#define PYKVM_TEST_MSR          0x40001000  /* msr.S: an MSR emulated in Python */
#define PYKVM_TEST_HYPERCALL    0x50        /* hypercall.S: a hypercall answered by Python */
#define PYKVM_BENCH_PORT        0x700       /* bench_io.S: the port of its port-I/O loops */
#define PYKVM_BENCH_MMIO        0x10F000    /* bench_io.S: its MMIO byte (FFFF:F010), above 1 MiB of RAM */
#define PYKVM_BENCH_MSR         0x40001010  /* bench_io.S: the MSR its loops read or write */
#define PYKVM_BENCH_HYPERCALL   0x51        /* bench_io.S: its hypercall through HYPERCALL_PORT */

/* bench_io.S's loops: the host puts one in EAX and N in ECX at entry */
#define PYKVM_BENCH_LOOP_OUT        1       /* N x outb to BENCH_PORT */
#define PYKVM_BENCH_LOOP_IN         2       /* N x inb from BENCH_PORT */
#define PYKVM_BENCH_LOOP_MMIO_WRITE 3       /* N x byte write to BENCH_MMIO */
#define PYKVM_BENCH_LOOP_MMIO_READ  4       /* N x byte read from BENCH_MMIO */
#define PYKVM_BENCH_LOOP_RDMSR      5       /* N x rdmsr of BENCH_MSR */
#define PYKVM_BENCH_LOOP_WRMSR      6       /* N x wrmsr of BENCH_MSR */
#define PYKVM_BENCH_LOOP_HYPERCALL  7       /* N x BENCH_HYPERCALL on HYPERCALL_PORT */
#define PYKVM_BENCH_LOOP_HLT        8       /* N x hlt */

#define PYKVM_CALL_DONE         1
#define PYKVM_CALL_FAIL         2
#define PYKVM_CALL_SYNC         3
#define PYKVM_CALL_PRINT        4

/* ---- GDT selectors (layout.py) ------------------------------------------------------------- */
#define PYKVM_SEL_CODE64        0x08
#define PYKVM_SEL_DATA          0x10
#define PYKVM_SEL_CODE32        0x18
#define PYKVM_SEL_CODE16        0x20
#define PYKVM_SEL_USER_CODE32   0x28        /* ring 3: load as selector | 3 */
#define PYKVM_SEL_USER_DATA     0x30
#define PYKVM_SEL_USER_CODE64   0x38
#define PYKVM_SEL_TSS           0x40
#define PYKVM_GDT_ENTRIES       10

#ifdef __ASSEMBLER__

/* ---- assembler macros ----------------------------------------------------------------------
 * Each one assembles in .code16, .code32 and .code64 (pick the mode before using them), except
 * PYKVM_ENTER_CPL3 (64-bit only).
 * Arguments are assembly-time constants or labels, written without `$`.
 * They clobber: PYKVM_PUTC AL; PYKVM_PUTS AL, ESI; PYKVM_CALL EAX, DX; the calls also the
 * registers they pass (EBX, ECX, ESI). In 64-bit mode a 32-bit write zero-extends, so RCX and
 * RSI hold the value and the address. In real mode PYKVM_PUTS reads DS:SI (DS = 0 at entry).
 */

/* Write one byte (a constant) to the console. */
.macro PYKVM_PUTC byte
	movb	$(\byte), %al
	outb	%al, $PYKVM_CONSOLE_PORT
.endm

/* Write the NUL-terminated string at `label` to the console, one `out` per byte. */
.macro PYKVM_PUTS label
	movl	$(\label), %esi
	cld
.Lpykvm_puts_next\@:
	lodsb
	testb	%al, %al
	jz	.Lpykvm_puts_end\@
	outb	%al, $PYKVM_CONSOLE_PORT
	jmp	.Lpykvm_puts_next\@
.Lpykvm_puts_end\@:
.endm

/* Issue call `nr` (PYKVM_CALL_*); the argument registers must already be loaded.
 * Clobbers EAX and DX (and the macros below load EBX, ECX, ESI as their arguments say). */
.macro PYKVM_CALL nr
	movl	$(\nr), %eax
	movw	$PYKVM_CALL_PORT, %dx
	outl	%eax, %dx
.endm

/* Halt for ever: what follows DONE and FAIL, in case a host resumes the guest after them. */
.macro PYKVM_HALT_FOREVER
.Lpykvm_halt\@:
	hlt
	jmp	.Lpykvm_halt\@
.endm

/* DONE(status): the guest finished; never returns. */
.macro PYKVM_DONE status
	movl	$(\status), %ebx
	PYKVM_CALL PYKVM_CALL_DONE
	PYKVM_HALT_FOREVER
.endm

/* Drop to CPL3 at `label`, in 64-bit mode only: an iretq to CS = the 64-bit user code selector,
 * SS:RSP = the user data selector and PYKVM_STACK_TOP - 0x8000, RFLAGS = 0x3002 (IOPL 3, so port
 * I/O stays allowed at CPL3; IF = 0). Every other register keeps its value. Needs page tables
 * that let CPL3 reach the image and that stack (pykvm's long mode identity map does). */
.macro PYKVM_ENTER_CPL3 label
	pushq	$(PYKVM_SEL_USER_DATA | 3)
	pushq	$(PYKVM_STACK_TOP - 0x8000)
	pushq	$0x3002
	pushq	$(PYKVM_SEL_USER_CODE64 | 3)
	pushq	$(\label)
	iretq
.endm

/* FAIL(line, value, msg): msg is a label of a NUL-terminated string, or 0; never returns.
 * Usage: PYKVM_FAIL __LINE__, 0x2a, my_message */
.macro PYKVM_FAIL line, value, msg
	movl	$(\line), %ebx
	movl	$(\value), %ecx
	movl	$(\msg), %esi
	PYKVM_CALL PYKVM_CALL_FAIL
	PYKVM_HALT_FOREVER
.endm

/* SYNC(value): report progress; the host resumes the guest. */
.macro PYKVM_SYNC value
	movl	$(\value), %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
.endm

/* PRINT(label): the host prints the NUL-terminated string at `label` in one exit. */
.macro PYKVM_PRINT label
	movl	$(\label), %esi
	PYKVM_CALL PYKVM_CALL_PRINT
.endm

#else /* C */

/* ---- C: static inline functions for freestanding guests (-m64, or -m32 -ffreestanding) -----
 * Compile with -ffreestanding -nostdlib -fno-pie -mgeneral-regs-only (no SSE: this machine's
 * KVM emulates CPL0 code and its emulator has no SSE/AVX) and link with guests/flat.ld.
 */

static inline void pykvm_outb(unsigned short port, unsigned char value)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void pykvm_outw(unsigned short port, unsigned short value)
{
	__asm__ __volatile__("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void pykvm_outl(unsigned short port, unsigned int value)
{
	__asm__ __volatile__("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned char pykvm_inb(unsigned short port)
{
	unsigned char value;
	__asm__ __volatile__("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline unsigned short pykvm_inw(unsigned short port)
{
	unsigned short value;
	__asm__ __volatile__("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline unsigned int pykvm_inl(unsigned short port)
{
	unsigned int value;
	__asm__ __volatile__("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void pykvm_putc(char c)
{
	pykvm_outb(PYKVM_CONSOLE_PORT, (unsigned char)c);
}

static inline void pykvm_puts(const char *s)
{
	while (*s)
		pykvm_putc(*s++);
}

/* One call: EAX = nr, EBX, RCX (ECX with -m32), RSI (ESI). "memory": the host may read a string. */
static inline void pykvm_call(unsigned int nr, unsigned int ebx, unsigned long rcx, const void *rsi)
{
	__asm__ __volatile__("outl %%eax, %%dx"
			     : : "a"(nr), "d"((unsigned short)PYKVM_CALL_PORT), "b"(ebx), "c"(rcx),
			       "S"(rsi)
			     : "memory");
}

static inline void __attribute__((noreturn)) pykvm_halt_forever(void)
{
	for (;;)
		__asm__ __volatile__("hlt");
}

static inline void __attribute__((noreturn)) pykvm_done(unsigned int status)
{
	pykvm_call(PYKVM_CALL_DONE, status, 0, 0);
	pykvm_halt_forever();
}

static inline void __attribute__((noreturn))
pykvm_fail(unsigned int line, unsigned long value, const char *msg)
{
	pykvm_call(PYKVM_CALL_FAIL, line, value, msg);
	pykvm_halt_forever();
}

static inline void pykvm_sync(unsigned int value)
{
	pykvm_call(PYKVM_CALL_SYNC, value, 0, 0);
}

static inline void pykvm_print(const char *s)
{
	pykvm_call(PYKVM_CALL_PRINT, 0, 0, s);
}

/* FAIL with this line, the value and the stringified condition unless `cond` holds. */
#define PYKVM_ASSERT(cond, value)                                                          \
	do {                                                                               \
		if (!(cond))                                                               \
			pykvm_fail(__LINE__, (unsigned long)(value),                       \
				   __FILE__ ": assertion failed: " #cond);                  \
	} while (0)

#endif /* __ASSEMBLER__ */
#endif /* PYKVM_GUEST_H */
