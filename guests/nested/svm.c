/* svm.c - the AMD-V part of pykvm's L1 hypervisor (image nested_svm.elf).
 * Mode: 64-bit long mode at CPL 0 with EFER.SVME set
 * Load: part of the L1 image at 0x100000 (l1.ld)
 * The VMCB is the one pykvm built (blob->vmcb): the L1 writes only run-time fields of it while it
 * handles an exit (RIP, RAX, TLB_CONTROL); VMRUN's own checks judge the rest. Host state VMRUN
 * does not restore (FS, GS, TR, LDTR, KernelGSBase, STAR...) goes through VMSAVE/VMLOAD on a page
 * of the L1's own (svm_host_save); the L2's GPRs other than RAX/RSP live in struct svm_gprs.
 */
#include "l1.h"

#define MSR_EFER		0xC0000080
#define EFER_SVME		(1ull << 12)
#define MSR_VM_CR		0xC0010114
#define VM_CR_SVMDIS		(1 << 4)
#define MSR_VM_HSAVE_PA		0xC0010117

/* CPUID 8000_000Ah EDX */
#define SVM_FEATURE_NPT		(1u << 0)
#define SVM_FEATURE_NRIPS	(1u << 3)
#define SVM_FEATURE_FLUSHBYASID	(1u << 6)

/* VMCB offsets (pykvm/model/vmcb.py) */
#define VMCB_GUEST_ASID		0x058	/* 4 bytes */
#define VMCB_TLB_CONTROL	0x05C	/* 1 byte */
#define VMCB_EXITCODE		0x070
#define VMCB_EXITINFO1		0x078
#define VMCB_EXITINFO2		0x080
#define VMCB_NRIP		0x0C8
#define VMCB_EFER		0x4D0
#define VMCB_RIP		0x578
#define VMCB_RSP		0x5D8
#define VMCB_RAX		0x5F8

/* EXITCODE values */
#define SVM_EXIT_EXCP_FIRST	0x040
#define SVM_EXIT_EXCP_LAST	0x05F
#define SVM_EXIT_INTR		0x060
#define SVM_EXIT_NMI		0x061
#define SVM_EXIT_CPUID		0x072
#define SVM_EXIT_HLT		0x078
#define SVM_EXIT_IOIO		0x07B
#define SVM_EXIT_MSR		0x07C
#define SVM_EXIT_SHUTDOWN	0x07F
#define SVM_EXIT_VMMCALL	0x081
#define SVM_EXIT_NPF		0x400
#define SVM_EXIT_INVALID	0xffffffffffffffffull	/* -1 */
#define SVM_EXIT_INVALID_32	0xffffffffull		/* -1 as QEMU 7.2's TCG writes it */

/* IOIO EXITINFO1 */
#define IOIO_TYPE_IN		(1u << 0)
#define IOIO_STR		(1u << 2)
#define IOIO_SZ8		(1u << 4)
#define IOIO_SZ16		(1u << 5)
#define IOIO_SZ32		(1u << 6)

#define TLB_CONTROL_NOTHING	0
#define TLB_CONTROL_FLUSH_ALL	1
#define TLB_CONTROL_FLUSH_ASID	3

#define MAX_EXITS		64

const u32 l1_vendor = VENDOR_SVM;
const char l1_vendor_name[] = "svm";

/* The L2's GPRs the VMCB does not hold (RAX and RSP are VMCB fields). Offsets used by svm_run. */
struct svm_gprs {
	u64 rbx, rcx, rdx, rsi, rdi, rbp;		/* 0x00 .. 0x28 */
	u64 r8, r9, r10, r11, r12, r13, r14, r15;	/* 0x30 .. 0x68 */
};

/* VMSAVE/VMLOAD area for the L1's own FS/GS/TR/LDTR/KernelGSBase/STAR/LSTAR/CSTAR/SFMASK/SYSENTER
 * (a VMCB-format page; only its save-area fields are used). */
static u8 svm_host_save[4096] __attribute__((aligned(4096)));

/* void svm_run(u64 vmcb_pa, u64 host_save_pa, struct svm_gprs *gprs)
 * CLGI; VMSAVE host; VMLOAD guest; load the L2's GPRs; VMRUN; store them; VMSAVE guest;
 * VMLOAD host; STGI. VMRUN itself saves the host's RSP, RIP, RFLAGS, RAX, CR0/3/4, EFER, CS, SS,
 * DS, ES, GDTR and IDTR in the VM_HSAVE_PA area and restores them at #VMEXIT. */
void svm_run(u64 vmcb_pa, u64 host_save_pa, struct svm_gprs *gprs);
__asm__(
	"	.text\n"
	"	.globl	svm_run\n"
	"	.type	svm_run, @function\n"
	"svm_run:\n"
	"	pushq	%rbx\n"
	"	pushq	%rbp\n"
	"	pushq	%r12\n"
	"	pushq	%r13\n"
	"	pushq	%r14\n"
	"	pushq	%r15\n"
	"	pushq	%rdx\n"			/* 16(%rsp): gprs */
	"	pushq	%rsi\n"			/*  8(%rsp): host save page */
	"	pushq	%rdi\n"			/*  0(%rsp): VMCB */
	"	clgi\n"
	"	movq	%rsi, %rax\n"
	"	vmsave	%rax\n"
	"	movq	0(%rsp), %rax\n"
	"	vmload	%rax\n"
	"	movq	16(%rsp), %rax\n"
	"	movq	0x00(%rax), %rbx\n"
	"	movq	0x08(%rax), %rcx\n"
	"	movq	0x10(%rax), %rdx\n"
	"	movq	0x18(%rax), %rsi\n"
	"	movq	0x20(%rax), %rdi\n"
	"	movq	0x28(%rax), %rbp\n"
	"	movq	0x30(%rax), %r8\n"
	"	movq	0x38(%rax), %r9\n"
	"	movq	0x40(%rax), %r10\n"
	"	movq	0x48(%rax), %r11\n"
	"	movq	0x50(%rax), %r12\n"
	"	movq	0x58(%rax), %r13\n"
	"	movq	0x60(%rax), %r14\n"
	"	movq	0x68(%rax), %r15\n"
	"	movq	0(%rsp), %rax\n"
	"	vmrun	%rax\n"
	/* #VMEXIT: host RSP/RAX as they were at VMRUN; the L2's GPRs still in the registers */
	"	pushq	%rbx\n"			/* the L2's RBX; gprs now at 24(%rsp) */
	"	movq	24(%rsp), %rbx\n"
	"	movq	%rcx, 0x08(%rbx)\n"
	"	movq	%rdx, 0x10(%rbx)\n"
	"	movq	%rsi, 0x18(%rbx)\n"
	"	movq	%rdi, 0x20(%rbx)\n"
	"	movq	%rbp, 0x28(%rbx)\n"
	"	movq	%r8, 0x30(%rbx)\n"
	"	movq	%r9, 0x38(%rbx)\n"
	"	movq	%r10, 0x40(%rbx)\n"
	"	movq	%r11, 0x48(%rbx)\n"
	"	movq	%r12, 0x50(%rbx)\n"
	"	movq	%r13, 0x58(%rbx)\n"
	"	movq	%r14, 0x60(%rbx)\n"
	"	movq	%r15, 0x68(%rbx)\n"
	"	popq	%rax\n"
	"	movq	%rax, 0x00(%rbx)\n"
	"	movq	0(%rsp), %rax\n"
	"	vmsave	%rax\n"
	"	movq	8(%rsp), %rax\n"
	"	vmload	%rax\n"
	"	stgi\n"
	"	addq	$24, %rsp\n"
	"	popq	%r15\n"
	"	popq	%r14\n"
	"	popq	%r13\n"
	"	popq	%r12\n"
	"	popq	%rbp\n"
	"	popq	%rbx\n"
	"	ret\n"
	"	.size	svm_run, . - svm_run\n"
);

void vendor_check(const struct l1_options *opt)
{
	(void)opt;
	if (cpuid(0x80000000, 0).eax < 0x8000000A || !(cpuid(0x80000001, 0).ecx & (1u << 2)))
		l1_unsupported("no-svm", "this CPU has no SVM (CPUID 8000_0001h:ECX[2] is 0)");
	if (rdmsr(MSR_VM_CR) & VM_CR_SVMDIS)
		l1_unsupported("svm-disabled", "SVM is disabled by VM_CR.SVMDIS (firmware setting)");
}

u32 vendor_probe(void)
{
	struct cpuid_regs r = cpuid(0x8000000A, 0);
	report("cpuid");
	report_kv("leaf", 0x8000000A);
	report_kv("eax", r.eax);
	report_kv("ebx", r.ebx);
	report_kv("ecx", r.ecx);
	report_kv("edx", r.edx);
	report_end();
	report("msr");
	report_kv("index", MSR_VM_CR);
	report_kv("value", rdmsr(MSR_VM_CR));
	report_end();
	return STATUS_PROBED;
}

static inline u64 vmcb_read(volatile u8 *vmcb, u32 off) { return *(volatile u64 *)(vmcb + off); }
static inline void vmcb_write(volatile u8 *vmcb, u32 off, u64 v) { *(volatile u64 *)(vmcb + off) = v; }

static const char *exit_name(u64 code, u64 info1)
{
	switch (code) {
	case SVM_EXIT_CPUID: return "cpuid";
	case SVM_EXIT_HLT: return "hlt";
	case SVM_EXIT_IOIO: return "io";
	case SVM_EXIT_VMMCALL: return "hypercall";
	case SVM_EXIT_NPF: return "npf";
	case SVM_EXIT_SHUTDOWN: return "shutdown";
	case SVM_EXIT_INTR: return "external_interrupt";
	case SVM_EXIT_NMI: return "nmi";
	case SVM_EXIT_MSR: return info1 & 1 ? "msr_write" : "msr_read";
	}
	if (code >= SVM_EXIT_EXCP_FIRST && code <= SVM_EXIT_EXCP_LAST)
		return "exception";
	return "other";
}

static void svm_off(void)
{
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) & ~EFER_SVME);
	report("svm off");
	report_end();
}

static u32 __attribute__((noreturn)) fail_exit(const char *code, const char *what, u64 exitcode, u64 rip)
{
	/* l1_error's text is a fixed string: put the numbers on the line before its end */
	report("error ");
	puts(code);
	puts(": ");
	puts(what);
	report_kv("exitcode", exitcode);
	report_kv("rip", rip);
	report_end();
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) & ~EFER_SVME);
	l1_exit(STATUS_ERROR);
}

u32 vendor_main(struct nested_blob *blob, const struct l1_options *opt)
{
	(void)opt;
	struct cpuid_regs feat = cpuid(0x8000000A, 0);
	if (!(feat.edx & SVM_FEATURE_NPT))
		l1_unsupported("no-npt", "this CPU has no nested paging (CPUID 8000_000Ah:EDX[0] is 0)");
	int nrips = !!(feat.edx & SVM_FEATURE_NRIPS);
	u8 flush_control = feat.edx & SVM_FEATURE_FLUSHBYASID ? TLB_CONTROL_FLUSH_ASID
							       : TLB_CONTROL_FLUSH_ALL;
	if (!blob->vmcb || (blob->vmcb & 0xFFF) || !blob->hsave || (blob->hsave & 0xFFF))
		l1_error("blob", "the blob's VMCB or host-save area is missing or not page-aligned");

	volatile u8 *vmcb = (volatile u8 *)blob->vmcb;
	struct svm_gprs gprs;
	memset(&gprs, 0, sizeof(gprs));

	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
	wrmsr(MSR_VM_HSAVE_PA, blob->hsave);
	report("svm on");
	report_kv("vmcb", blob->vmcb);
	report_kv("hsave", blob->hsave);
	report_kv("asid", *(volatile u32 *)(vmcb + VMCB_GUEST_ASID));
	report_kv("nrips", nrips);
	report_end();

	for (u32 i = 0;; i++) {
		int flushing = vmcb[VMCB_TLB_CONTROL] != TLB_CONTROL_NOTHING;
		svm_run(blob->vmcb, (u64)svm_host_save, &gprs);
		if (flushing)
			vmcb[VMCB_TLB_CONTROL] = TLB_CONTROL_NOTHING;

		u64 code = vmcb_read(vmcb, VMCB_EXITCODE);
		u64 info1 = vmcb_read(vmcb, VMCB_EXITINFO1);
		u64 info2 = vmcb_read(vmcb, VMCB_EXITINFO2);
		u64 rip = vmcb_read(vmcb, VMCB_RIP);
		u64 nrip = vmcb_read(vmcb, VMCB_NRIP);

		/* #VMEXIT(INVALID): VMRUN refused the VMCB. QEMU 7.2 (TCG) stores the 32-bit -1 zero-extended
		 * (0x00000000ffffffff); no valid exit code has bits 31:0 all ones. The line gives the value
		 * the VMCB holds. */
		if (code == SVM_EXIT_INVALID || code == SVM_EXIT_INVALID_32) {
			report("entry-failed kind=vmexit-invalid");
			report_kv("code", code);
			report_end();
			svm_off();
			return STATUS_ENTRY_FAILED;
		}
		report_exit(i, code, exit_name(code, info1), info1, code == SVM_EXIT_NPF ? info2 : 0, rip);
		if (i >= MAX_EXITS)
			fail_exit("runaway", "the L2 exited more than 64 times", code, rip);

		u64 rax = vmcb_read(vmcb, VMCB_RAX);
		switch (code) {
		case SVM_EXIT_CPUID: {
			struct cpuid_regs out;
			l1_cpuid_for_l2((u32)rax, (u32)gprs.rcx, &out);
			vmcb_write(vmcb, VMCB_RAX, out.eax);
			gprs.rbx = out.ebx;
			gprs.rcx = out.ecx;
			gprs.rdx = out.edx;
			vmcb_write(vmcb, VMCB_RIP, nrips ? nrip : rip + 2);
			break;
		}
		case SVM_EXIT_IOIO:
			if (info1 & IOIO_STR)
				fail_exit("unexpected-exit", "string I/O (INS/OUTS) is not part of the scenario",
					  code, rip);
			if (info1 & IOIO_TYPE_IN) {
				if (info1 & IOIO_SZ32)
					rax = L2_IN_VALUE;	/* a 32-bit write zero-extends */
				else if (info1 & IOIO_SZ16)
					rax = (rax & ~0xFFFFull) | L2_IN_VALUE;
				else
					rax = (rax & ~0xFFull) | L2_IN_VALUE;
				vmcb_write(vmcb, VMCB_RAX, rax);
			}
			vmcb_write(vmcb, VMCB_RIP, info2);	/* EXITINFO2: the next RIP */
			break;
		case SVM_EXIT_VMMCALL: {
			int flush;
			rax = l1_hypercall(blob, rax, gprs.rbx, gprs.rcx, gprs.rdx, &flush);
			vmcb_write(vmcb, VMCB_RAX, rax);
			if (flush) {
				u32 asid = *(volatile u32 *)(vmcb + VMCB_GUEST_ASID);
				__asm__ volatile("invlpga %%rax, %%ecx"
						 : : "a"((u64)L2_TAG_VA), "c"(asid) : "memory");
				vmcb[VMCB_TLB_CONTROL] = flush_control;
				report("flush invlpga");
				report_kv("va", L2_TAG_VA);
				report_kv("asid", asid);
				report_kv("tlb_control", flush_control);
				report_end();
			}
			vmcb_write(vmcb, VMCB_RIP, nrips ? nrip : rip + 3);
			break;
		}
		case SVM_EXIT_NPF:
			vmcb_write(vmcb, VMCB_RIP, gprs.r15);	/* l2.S: the resume address */
			break;
		case SVM_EXIT_HLT:
			svm_off();
			return STATUS_DONE;
		case SVM_EXIT_SHUTDOWN:
			svm_off();
			return STATUS_L2_SHUTDOWN;
		default:
			fail_exit("unexpected-exit", "an L2 exit the scenario does not have", code, rip);
		}
	}
}
