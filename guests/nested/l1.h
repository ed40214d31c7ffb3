/* l1.h - the vendor-neutral part of pykvm's L1 hypervisors (l1.c) as the vendor parts see it. */
#ifndef L1_H
#define L1_H

#include "nested.h"
#include "../multiboot/print.h"

#define NULL ((void *)0)

/* Exit statuses (isa-debug-exit value; QEMU exits with (value << 1) | 1). */
#define STATUS_DONE		0x10	/* the scenario ran to the L2's HLT */
#define STATUS_ENTRY_FAILED	0x11	/* VM entry / VMRUN refused the image */
#define STATUS_L2_SHUTDOWN	0x12	/* the L2 triple-faulted (shutdown exit) */
#define STATUS_PROBED		0x13	/* "probe": capabilities printed */
#define STATUS_ERROR		0x7e	/* a failure of the L1 or of the blob */
#define STATUS_NO_EXTENSION	0x7f	/* no VMX/SVM, or disabled */

struct l1_options {
	int probe;		/* print the capability MSRs / CPUID leaves and stop */
	int fc_lock;		/* lock IA32_FEATURE_CONTROL with VMX off before VMXON */
};

struct l1_frame {		/* what exception_common (boot.S) pushed */
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error_code;
	u64 rip, cs, rflags, rsp, ss;
};

struct cpuid_regs { u32 eax, ebx, ecx, edx; };

void l1_exit(u32 status) __attribute__((noreturn));
void l1_error(const char *code, const char *text) __attribute__((noreturn));	/* STATUS_ERROR */
void l1_unsupported(const char *code, const char *text) __attribute__((noreturn));	/* STATUS_NO_EXTENSION */
void report(const char *what);		/* "nested: <what>" without the newline */
void report_kv(const char *key, u64 value);	/* " key=0x..." */
void report_end(void);			/* the newline */
void report_exit(u32 index, u64 reason, const char *name, u64 qual, u64 gpa, u64 rip);
void report_l2(u64 a, u64 b, u64 c);

struct cpuid_regs cpuid(u32 leaf, u32 subleaf);
u64 rdmsr(u32 msr);
void wrmsr(u32 msr, u64 value);
u64 read_cr0(void);
u64 read_cr4(void);
void write_cr0(u64 v);
void write_cr4(u64 v);

void *memcpy(void *dst, const void *src, unsigned long n);
void *memmove(void *dst, const void *src, unsigned long n);
void *memset(void *dst, int c, unsigned long n);

/* The vendor part (vmx.c or svm.c: one L1 image each) */
extern const u32 l1_vendor;		/* VENDOR_VMX or VENDOR_SVM */
extern const char l1_vendor_name[];	/* "vmx" or "svm" */
void vendor_check(const struct l1_options *opt);	/* l1_unsupported() unless it can run */
u32 vendor_probe(void);			/* print "nested: msr"/"nested: cpuid" lines; a status */
u32 vendor_main(struct nested_blob *blob, const struct l1_options *opt);	/* the scenario */

/* For the L2 exits both vendors handle alike: the hypercall of the scenario. RAX in, RAX out. */
u64 l1_hypercall(struct nested_blob *blob, u64 nr, u64 rbx, u64 rcx, u64 rdx, int *flush);
u32 l1_cpuid_for_l2(u32 leaf, u32 subleaf, struct cpuid_regs *out);

#endif
