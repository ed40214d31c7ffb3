/* vmx.c - the Intel VT-x part of pykvm's L1 hypervisor (image nested_vmx.elf).
 * Mode: 64-bit long mode at CPL 0, VMX root operation between VMXON and VMXOFF
 * Load: part of the L1 image at 0x100000 (l1.ld)
 *
 * The VMCS is pykvm's: the L1 VMWRITEs the blob's table (pykvm.model.hvm.VcpuState.to_vmcs) as it
 * is and writes no field of its own choosing; at run time it only moves the L2's RIP (past an
 * exiting instruction, or to R15 after the scenario's EPT violation) and answers MOV CR3 exits.
 * The host-state area names this file's vmx_exit_entry (HOST_RIP), boot.S's l1_host_stack_top
 * (HOST_RSP), l1_pml4, gdt, l1_idt and l1_tss, and CR0/CR4/EFER as boot.S leaves them plus
 * CR4.VMXE.
 *
 * vmx_run(regs, launched) saves the callee-saved registers and RSP, loads the L2's GPRs from
 * *regs and executes VMLAUNCH or VMRESUME. It returns 0 after a VM exit (vmx_exit_entry stored
 * the L2's GPRs back into *regs and switched from HOST_RSP to the saved RSP), or RFLAGS when the
 * instruction failed (CF: VMfailInvalid, ZF: VMfailValid).
 */
#include "l1.h"

#define IA32_FEATURE_CONTROL	0x3A
#define FC_LOCK			(1 << 0)
#define FC_VMX_OUTSIDE_SMX	(1 << 2)
#define IA32_VMX_BASIC		0x480
#define IA32_VMX_CR0_FIXED0	0x486
#define IA32_VMX_CR0_FIXED1	0x487
#define IA32_VMX_CR4_FIXED0	0x488
#define IA32_VMX_CR4_FIXED1	0x489

#define CR4_VMXE		(1ull << 13)
#define RFLAGS_CF		(1ull << 0)
#define RFLAGS_ZF		(1ull << 6)

/* VMCS field encodings (SDM Vol. 3D appendix B) */
#define VIRTUAL_PROCESSOR_ID	0x0000
#define GUEST_PHYSICAL_ADDRESS	0x2400
#define VM_INSTRUCTION_ERROR	0x4400
#define VM_EXIT_REASON		0x4402
#define VM_EXIT_INSTRUCTION_LEN	0x440C
#define EXIT_QUALIFICATION	0x6400
#define GUEST_CR3		0x6802
#define GUEST_RSP		0x681C
#define GUEST_RIP		0x681E
#define VMWRITE_TERMINATOR	(~0ull)

/* basic exit reasons */
#define EXIT_EXCEPTION_NMI	0
#define EXIT_EXTERNAL_INTERRUPT	1
#define EXIT_TRIPLE_FAULT	2
#define EXIT_CPUID		10
#define EXIT_HLT		12
#define EXIT_VMCALL		18
#define EXIT_CR_ACCESS		28
#define EXIT_IO			30
#define EXIT_MSR_READ		31
#define EXIT_MSR_WRITE		32
#define EXIT_EPT_VIOLATION	48
#define EXIT_EPT_MISCONFIG	49
#define EXIT_FAILED_ENTRY	(1u << 31)

#define MAX_EXITS		64

/* The L2's GPRs, indexed as the CR-access exit qualification numbers them (RSP's slot is unused:
 * the L2's RSP lives in the VMCS). vmx_run/vmx_exit_entry use these offsets. */
enum { R_RAX, R_RCX, R_RDX, R_RBX, R_RSP, R_RBP, R_RSI, R_RDI,
       R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15, NR_GPRS };
struct guest_regs { u64 r[NR_GPRS]; };

u64 vmx_run(struct guest_regs *regs, int launched);
u64 vmx_host_rsp;			/* RSP inside vmx_run, restored by vmx_exit_entry */
struct guest_regs *vmx_guest;		/* where vmx_exit_entry stores the L2's GPRs */

__asm__(
	"	.text\n"
	"	.globl	vmx_run\n"
	"	.type	vmx_run, @function\n"
	"vmx_run:\n"				/* rdi = regs, esi = launched */
	"	pushq	%rbp\n"
	"	pushq	%rbx\n"
	"	pushq	%r12\n"
	"	pushq	%r13\n"
	"	pushq	%r14\n"
	"	pushq	%r15\n"
	"	movq	%rsp, vmx_host_rsp(%rip)\n"
	"	movq	%rdi, vmx_guest(%rip)\n"
	"	testl	%esi, %esi\n"			/* ZF for the jump below; MOVs keep it */
	"	movq	0*8(%rdi), %rax\n"
	"	movq	1*8(%rdi), %rcx\n"
	"	movq	2*8(%rdi), %rdx\n"
	"	movq	3*8(%rdi), %rbx\n"
	"	movq	5*8(%rdi), %rbp\n"
	"	movq	6*8(%rdi), %rsi\n"
	"	movq	8*8(%rdi), %r8\n"
	"	movq	9*8(%rdi), %r9\n"
	"	movq	10*8(%rdi), %r10\n"
	"	movq	11*8(%rdi), %r11\n"
	"	movq	12*8(%rdi), %r12\n"
	"	movq	13*8(%rdi), %r13\n"
	"	movq	14*8(%rdi), %r14\n"
	"	movq	15*8(%rdi), %r15\n"
	"	movq	7*8(%rdi), %rdi\n"
	"	jnz	1f\n"
	"	vmlaunch\n"
	"	jmp	2f\n"
	"1:	vmresume\n"
	"2:	pushfq\n"				/* VMfail: CF or ZF says which */
	"	popq	%rax\n"
	"	popq	%r15\n"
	"	popq	%r14\n"
	"	popq	%r13\n"
	"	popq	%r12\n"
	"	popq	%rbx\n"
	"	popq	%rbp\n"
	"	ret\n"
	"	.size	vmx_run, . - vmx_run\n"
	"\n"
	"	.globl	vmx_exit_entry\n"		/* HOST_RIP; RSP = HOST_RSP = l1_host_stack_top */
	"	.type	vmx_exit_entry, @function\n"
	"vmx_exit_entry:\n"
	"	pushq	%rdi\n"
	"	movq	vmx_guest(%rip), %rdi\n"
	"	movq	%rax, 0*8(%rdi)\n"
	"	movq	%rcx, 1*8(%rdi)\n"
	"	movq	%rdx, 2*8(%rdi)\n"
	"	movq	%rbx, 3*8(%rdi)\n"
	"	movq	%rbp, 5*8(%rdi)\n"
	"	movq	%rsi, 6*8(%rdi)\n"
	"	movq	%r8, 8*8(%rdi)\n"
	"	movq	%r9, 9*8(%rdi)\n"
	"	movq	%r10, 10*8(%rdi)\n"
	"	movq	%r11, 11*8(%rdi)\n"
	"	movq	%r12, 12*8(%rdi)\n"
	"	movq	%r13, 13*8(%rdi)\n"
	"	movq	%r14, 14*8(%rdi)\n"
	"	movq	%r15, 15*8(%rdi)\n"
	"	popq	%rax\n"
	"	movq	%rax, 7*8(%rdi)\n"
	"	movq	vmx_host_rsp(%rip), %rsp\n"
	"	xorl	%eax, %eax\n"
	"	popq	%r15\n"
	"	popq	%r14\n"
	"	popq	%r13\n"
	"	popq	%r12\n"
	"	popq	%rbx\n"
	"	popq	%rbp\n"
	"	ret\n"
	"	.size	vmx_exit_entry, . - vmx_exit_entry\n"
);

const u32 l1_vendor = VENDOR_VMX;
const char l1_vendor_name[] = "vmx";

/* ---- the VMX instructions: 0 = VMsucceed, 1 = VMfailInvalid (CF), 2 = VMfailValid (ZF) ---- */

static inline int vm_status(u8 cf, u8 zf)
{
	return cf ? 1 : zf ? 2 : 0;
}

static int vmxon(u64 pa)
{
	u8 cf, zf;
	__asm__ volatile("vmxon %2" : "=@ccc"(cf), "=@ccz"(zf) : "m"(pa) : "memory");
	return vm_status(cf, zf);
}

static int vmxoff(void)
{
	u8 cf, zf;
	__asm__ volatile("vmxoff" : "=@ccc"(cf), "=@ccz"(zf) : : "memory");
	return vm_status(cf, zf);
}

static int vmclear(u64 pa)
{
	u8 cf, zf;
	__asm__ volatile("vmclear %2" : "=@ccc"(cf), "=@ccz"(zf) : "m"(pa) : "memory");
	return vm_status(cf, zf);
}

static int vmptrld(u64 pa)
{
	u8 cf, zf;
	__asm__ volatile("vmptrld %2" : "=@ccc"(cf), "=@ccz"(zf) : "m"(pa) : "memory");
	return vm_status(cf, zf);
}

static int vmptrst(u64 *pa)
{
	u8 cf, zf;
	__asm__ volatile("vmptrst %2" : "=@ccc"(cf), "=@ccz"(zf), "=m"(*pa) : : "memory");
	return vm_status(cf, zf);
}

static int vmread_checked(u64 field, u64 *value)
{
	u8 cf, zf;
	u64 v = 0;
	__asm__ volatile("vmread %3, %2" : "=@ccc"(cf), "=@ccz"(zf), "=r"(v) : "r"(field) : "memory");
	*value = v;
	return vm_status(cf, zf);
}

static u64 vmread(u64 field)
{
	u64 v;
	return vmread_checked(field, &v) ? 0 : v;
}

static int vmwrite(u64 field, u64 value)
{
	u8 cf, zf;
	__asm__ volatile("vmwrite %3, %2" : "=@ccc"(cf), "=@ccz"(zf) : "r"(field), "rm"(value) : "memory");
	return vm_status(cf, zf);
}

static int invvpid(u64 type, u16 vpid)
{
	struct { u64 vpid, gla; } __attribute__((aligned(16))) desc = { vpid, 0 };
	u8 cf, zf;
	__asm__ volatile("invvpid %2, %3" : "=@ccc"(cf), "=@ccz"(zf) : "m"(desc), "r"(type) : "memory");
	return vm_status(cf, zf);
}

/* ---- feature control, probe ---------------------------------------------------------------- */

static void __attribute__((noreturn)) vmx_disabled(void)
{
	l1_unsupported("vmx-disabled",
		       "VMX is disabled by IA32_FEATURE_CONTROL (locked, bit 2 clear): enable VT-x in the firmware");
}

void vendor_check(const struct l1_options *opt)
{
	if (!(cpuid(1, 0).ecx & (1u << 5)))
		l1_unsupported("no-vmx", "this CPU has no VMX (CPUID.1:ECX[5] is 0)");
	u64 fc = rdmsr(IA32_FEATURE_CONTROL);
	if (fc & FC_LOCK) {
		if (!(fc & FC_VMX_OUTSIDE_SMX))
			vmx_disabled();
	} else if (opt->fc_lock) {
		wrmsr(IA32_FEATURE_CONTROL, FC_LOCK);	/* a firmware that turned VT-x off */
		vmx_disabled();
	} else {
		wrmsr(IA32_FEATURE_CONTROL, fc | FC_VMX_OUTSIDE_SMX | FC_LOCK);	/* as firmware would */
	}
}

u32 vendor_probe(void)
{
	/* IA32_VMX_BASIC .. IA32_VMX_VMFUNC (0x480-0x491) and IA32_VMX_PROCBASED_CTLS3 (0x492) where
	 * the CPU has them: BASIC[55] says whether the TRUE MSRs exist, PROCBASED_CTLS[63] the
	 * secondary controls, and those the EPT/VPID, VMFUNC and tertiary MSRs. */
	u64 basic = rdmsr(IA32_VMX_BASIC);
	u64 proc = rdmsr(0x482);
	u64 proc2 = proc >> 63 ? rdmsr(0x48B) : 0;
	for (u32 msr = 0x480; msr <= 0x492; msr++) {
		if (msr >= 0x48D && msr <= 0x490 && !(basic >> 55 & 1))
			continue;
		if (msr == 0x48B && !(proc >> 63))
			continue;
		if (msr == 0x48C && !(proc2 >> 32 & ((1ull << 1) | (1ull << 5))))
			continue;
		if (msr == 0x491 && !(proc2 >> 32 & (1ull << 13)))
			continue;
		if (msr == 0x492 && !(proc >> 49 & 1))
			continue;
		report("msr");
		report_kv("index", msr);
		report_kv("value", rdmsr(msr));
		report_end();
	}
	report("msr");
	report_kv("index", IA32_FEATURE_CONTROL);
	report_kv("value", rdmsr(IA32_FEATURE_CONTROL));
	report_end();
	return STATUS_PROBED;
}

/* ---- the scenario -------------------------------------------------------------------------- */

extern u8 gdt_ptr[];
extern u8 idt_ptr[];

struct vmx_ctx {
	struct nested_blob *blob;
	int in_vmx;		/* after VMXON */
	int vmcs_loaded;	/* after VMPTRLD */
};

static const char *exit_name(u32 basic)
{
	switch (basic) {
	case EXIT_EXCEPTION_NMI:	return "exception";
	case EXIT_EXTERNAL_INTERRUPT:	return "external_interrupt";
	case EXIT_TRIPLE_FAULT:		return "shutdown";
	case EXIT_CPUID:		return "cpuid";
	case EXIT_HLT:			return "hlt";
	case EXIT_VMCALL:		return "hypercall";
	case EXIT_CR_ACCESS:		return "cr_access";
	case EXIT_IO:			return "io";
	case EXIT_MSR_READ:		return "msr_read";
	case EXIT_MSR_WRITE:		return "msr_write";
	case EXIT_EPT_VIOLATION:	return "npf";
	case EXIT_EPT_MISCONFIG:	return "npf_misconfig";
	}
	return "other";
}

static void report_vmfail(const char *what, int status)
{
	report("error ");
	puts(what);
	puts(status == 1 ? ": VMfailInvalid" : ": VMfailValid");
	if (status == 2)
		report_kv("error", vmread(VM_INSTRUCTION_ERROR));
	report_end();
}

/* Leave VMX operation: VMCLEAR the VMCS (if loaded), VMXOFF, CR4.VMXE off, the L1's own GDTR and
 * IDTR limits back (a VM exit sets both to 0xFFFF). */
static void vmx_leave(struct vmx_ctx *c)
{
	__asm__ volatile("lgdt (%0); lidt (%1)" : : "r"(gdt_ptr), "r"(idt_ptr) : "memory");
	if (c->vmcs_loaded) {
		u64 pa = c->blob->vmcs_region;
		int s = vmclear(pa);
		if (s)
			report_vmfail("vmclear", s);
		c->vmcs_loaded = 0;
	}
	if (c->in_vmx) {
		int s = vmxoff();
		if (s)
			report_vmfail("vmxoff", s);
		write_cr4(read_cr4() & ~CR4_VMXE);
		c->in_vmx = 0;
		report("vmxoff");
		report_end();
	}
}

static u32 vmx_fail(struct vmx_ctx *c, const char *what, int status)
{
	report_vmfail(what, status);
	vmx_leave(c);
	return STATUS_ERROR;
}

static void report_vmptrst(void)
{
	u64 ptr = 0;
	int s = vmptrst(&ptr);
	if (s) {
		report_vmfail("vmptrst", s);
		return;
	}
	report("vmptrst");
	report_kv("vmcs", ptr);
	report_end();
}

static int advance_rip(void)
{
	return vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(VM_EXIT_INSTRUCTION_LEN));
}


u32 vendor_main(struct nested_blob *blob, const struct l1_options *opt)
{
	(void)opt;
	struct vmx_ctx ctx = { .blob = blob };
	struct vmx_ctx *c = &ctx;
	int s;

	/* CR0 and CR4 against the VMX fixed bits */
	u64 cr0 = read_cr0();
	u64 cr0_fixed0 = rdmsr(IA32_VMX_CR0_FIXED0), cr0_fixed1 = rdmsr(IA32_VMX_CR0_FIXED1);
	if ((cr0 & cr0_fixed0) != cr0_fixed0 || (cr0 & ~cr0_fixed1)) {
		report("error cr0-fixed: CR0 does not meet IA32_VMX_CR0_FIXED0/1:");
		report_kv("cr0", cr0);
		report_kv("fixed0", cr0_fixed0);
		report_kv("fixed1", cr0_fixed1);
		report_end();
		return STATUS_ERROR;
	}
	u64 cr4 = read_cr4() | CR4_VMXE;
	u64 cr4_fixed0 = rdmsr(IA32_VMX_CR4_FIXED0), cr4_fixed1 = rdmsr(IA32_VMX_CR4_FIXED1);
	if ((cr4 & cr4_fixed0) != cr4_fixed0 || (cr4 & ~cr4_fixed1)) {
		report("error cr4-fixed: CR4 does not meet IA32_VMX_CR4_FIXED0/1:");
		report_kv("cr4", cr4);
		report_kv("fixed0", cr4_fixed0);
		report_kv("fixed1", cr4_fixed1);
		report_end();
		return STATUS_ERROR;
	}
	write_cr4(cr4);

	/* VMXON, VMCLEAR, VMPTRLD: both regions start with the revision id */
	u32 revision = (u32)rdmsr(IA32_VMX_BASIC) & 0x7FFFFFFF;
	*(volatile u32 *)blob->vmxon_region = revision;
	*(volatile u32 *)blob->vmcs_region = revision;
	if ((s = vmxon(blob->vmxon_region))) {
		report_vmfail("vmxon", s);
		write_cr4(read_cr4() & ~CR4_VMXE);
		return STATUS_ERROR;
	}
	c->in_vmx = 1;
	if ((s = vmclear(blob->vmcs_region)))
		return vmx_fail(c, "vmclear", s);
	if ((s = vmptrld(blob->vmcs_region)))
		return vmx_fail(c, "vmptrld", s);
	c->vmcs_loaded = 1;

	/* pykvm's VMCS, as it is */
	const u64 *table = (const u64 *)blob->vmcs_table;
	if (table[2 * blob->vmcs_count] != VMWRITE_TERMINATOR) {
		vmx_leave(c);
		l1_error("blob", "the VMWRITE table does not end with its terminator after vmcs_count entries");
	}
	for (u64 i = 0; i < blob->vmcs_count; i++) {
		u64 field = table[2 * i], value = table[2 * i + 1];
		if ((s = vmwrite(field, value))) {
			report("error vmwrite:");
			report_kv("field", field);
			report_kv("value", value);
			if (s == 2)
				report_kv("error", vmread(VM_INSTRUCTION_ERROR));
			else
				puts(" VMfailInvalid");
			report_end();
			vmx_leave(c);
			return STATUS_ERROR;
		}
	}
	report_vmptrst();

	static struct guest_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.r[R_RAX] = blob->l2_rax;

	u32 status;
	for (u32 n = 0;; n++) {
		u64 rflags = vmx_run(&regs, n != 0);
		if (rflags) {
			if (rflags & RFLAGS_CF) {
				report("entry-failed kind=vmfail-invalid");
			} else {
				report("entry-failed kind=vmfail-valid");
				report_kv("error", vmread(VM_INSTRUCTION_ERROR));
			}
			report_end();
			status = STATUS_ENTRY_FAILED;
			break;
		}
		u64 reason = vmread(VM_EXIT_REASON);
		u64 qual = vmread(EXIT_QUALIFICATION);
		if (reason & EXIT_FAILED_ENTRY) {
			report("entry-failed kind=invalid-state");
			report_kv("reason", reason);
			report_kv("qual", qual);
			report_end();
			status = STATUS_ENTRY_FAILED;
			break;
		}
		u32 basic = reason & 0xFFFF;
		u64 gpa = (basic == EXIT_EPT_VIOLATION || basic == EXIT_EPT_MISCONFIG)
			? vmread(GUEST_PHYSICAL_ADDRESS) : 0;
		report_exit(n, basic, exit_name(basic), qual, gpa, vmread(GUEST_RIP));
		if (n + 1 > MAX_EXITS) {
			vmx_leave(c);
			l1_error("runaway", "more than 64 L2 exits without the scenario's HLT");
		}

		s = 0;
		switch (basic) {
		case EXIT_CPUID: {
			struct cpuid_regs out;
			l1_cpuid_for_l2((u32)regs.r[R_RAX], (u32)regs.r[R_RCX], &out);
			regs.r[R_RAX] = out.eax;
			regs.r[R_RBX] = out.ebx;
			regs.r[R_RCX] = out.ecx;
			regs.r[R_RDX] = out.edx;
			s = advance_rip();
			break;
		}
		case EXIT_IO:
			if (qual & (1 << 3)) {	/* IN: the scenario's value, in AL/AX/EAX by size */
				u32 size = (qual & 7) + 1;
				if (size == 1)
					regs.r[R_RAX] = (regs.r[R_RAX] & ~0xFFull) | L2_IN_VALUE;
				else if (size == 2)
					regs.r[R_RAX] = (regs.r[R_RAX] & ~0xFFFFull) | L2_IN_VALUE;
				else
					regs.r[R_RAX] = L2_IN_VALUE;
			}
			s = advance_rip();
			break;
		case EXIT_VMCALL: {
			int flush = 0;
			regs.r[R_RAX] = l1_hypercall(blob, regs.r[R_RAX], regs.r[R_RBX], regs.r[R_RCX],
						     regs.r[R_RDX], &flush);
			if (flush) {
				u64 vpid = vmread(VIRTUAL_PROCESSOR_ID);
				int fs = invvpid(1, (u16)vpid);
				if (fs) {
					vmx_fail(c, "invvpid", fs);
					return STATUS_ERROR;
				}
				report("flush invvpid");
				report_kv("type", 1);
				report_kv("vpid", vpid);
				report_end();
			}
			s = advance_rip();
			break;
		}
		case EXIT_EPT_VIOLATION:	/* l2.S put the resume address in R15 */
			s = vmwrite(GUEST_RIP, regs.r[R_R15]);
			break;
		case EXIT_CR_ACCESS: {
			u32 cr = qual & 15, type = qual >> 4 & 3, gpr = qual >> 8 & 15;
			if (cr != 3 || type > 1)
				goto unexpected;
			if (type == 0)	/* MOV to CR3 */
				s = vmwrite(GUEST_CR3, gpr == R_RSP ? vmread(GUEST_RSP) : regs.r[gpr]);
			else if (gpr == R_RSP)	/* MOV from CR3 */
				s = vmwrite(GUEST_RSP, vmread(GUEST_CR3));
			else
				regs.r[gpr] = vmread(GUEST_CR3);
			if (!s)
				s = advance_rip();
			break;
		}
		case EXIT_HLT:
			report_vmptrst();
			vmx_leave(c);
			return STATUS_DONE;
		case EXIT_TRIPLE_FAULT:
			report_vmptrst();
			vmx_leave(c);
			return STATUS_L2_SHUTDOWN;
		default:
		unexpected:
			vmx_leave(c);
			report("error unexpected-exit: the scenario has no such exit");
			report_kv("reason", reason);
			report_kv("qual", qual);
			report_end();
			return STATUS_ERROR;
		}
		if (s)
			return vmx_fail(c, "vmwrite", s);
	}
	vmx_leave(c);
	return status;
}
