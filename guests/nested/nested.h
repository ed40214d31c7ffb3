/* nested.h - what pykvm's L1 hypervisors (guests/nested/) share with the Python that builds their
 * data (pykvm/nested/layout.py mirrors every constant here; tests/test_nested_abi.py checks).
 *
 * The scenario blob: pykvm builds it (pykvm.nested.blob) and hands it to the L1 as the first
 * multiboot module. The L1 copies it to NESTED_BASE, the L1-physical address every pointer in it
 * assumes, and uses it as it is: the VMCS field table (VMX) or the VMCB (SVM), the EPT/NPT
 * tables, the I/O and MSR permission maps, and the L2's memory (code, page tables, data).
 *
 * The L2 sees guest-physical addresses 0 .. L2_MEM_SIZE; the EPT/NPT tables map them to
 * NESTED_BASE + L2_MEM_OFFSET onwards (not identity: the L2's GPA 0 is not the L1's PA 0).
 */
#ifndef NESTED_H
#define NESTED_H

#define NESTED_MAGIC		0x54534e4d564b5950ULL	/* "PYKVMNST" read as a little-endian u64 */
#define NESTED_VERSION		1
#define NESTED_BASE		0x01000000	/* 16 MiB: where the L1 copies the blob */
#define NESTED_MAX_SIZE		0x00400000	/* 4 MiB at most */
#define L2_MEM_OFFSET		0x00100000	/* the L2's memory starts 1 MiB into the blob */

#define VENDOR_VMX		1
#define VENDOR_SVM		2

/* flags */
#define NESTED_EXPECT_ENTRY_FAILURE	(1 << 0)	/* a deliberately broken image: report the failure */
#define NESTED_TRIPLE_FAULT		(1 << 1)	/* the L2 triple-faults at its first instruction */

/* The L2's guest-physical layout (identity-mapped linear addresses in its page tables). */
#define L2_MEM_SIZE		0x00080000	/* 512 KiB */
#define L2_GDT			0x00001000	/* GDT: 0x08 code64, 0x10 data, 0x18 TSS */
#define L2_TSS			0x00002000
#define L2_CR3_A		0x00010000	/* page tables A: the first frame of 0x10000-0x1ffff */
#define L2_CR3_B		0x00020000	/* page tables B: the first frame of 0x20000-0x2ffff */
#define L2_CODE			0x00030000	/* l2.S is linked here; entry = L2_CODE */
#define L2_RO_PAGE		0x00040000	/* mapped read-only by EPT/NPT (write -> EPT violation / #NPF) */
#define L2_PAGE_A		0x00050000	/* holds L2_VALUE_A */
#define L2_PAGE_B		0x00051000	/* holds L2_VALUE_B */
#define L2_STACK_TOP		0x00070000
#define L2_SWITCH_VA		0x00400000	/* tables A: -> L2_PAGE_A, tables B: -> L2_PAGE_B */
#define L2_TAG_VA		0x00401000	/* tables A: -> L2_PAGE_A; the L1 repoints it to L2_PAGE_B */
#define L2_VALUE_A		0xaaaa0001
#define L2_VALUE_B		0xbbbb0002

/* The L2's hypercalls (VMCALL / VMMCALL): RAX = number, RBX/RCX/RDX = arguments, RAX = result. */
#define HC_REPORT		1	/* print RBX, RCX, RDX as "l2 report" */
#define HC_REMAP		2	/* repoint L2_TAG_VA's PTE at L2_PAGE_B, without any TLB flush */
#define HC_FLUSH		3	/* flush the L2's tagged TLB entries (INVVPID / TLB_CONTROL) */
#define HC_ECHO			0x10	/* RAX = RBX + 1 */

/* I/O the L2 does (every port exits; the L1 answers IN with L2_IN_VALUE) */
#define L2_OUT_PORT		0x80
#define L2_OUT_VALUE		0x42
#define L2_IN_PORT		0x81
#define L2_IN_VALUE		0x5a

/* CPUID leaf the L1 answers itself (EBX, ECX, EDX = "pykvm L1 hv") */
#define L1_CPUID_LEAF		0x40000000

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* The blob's header, at offset 0 (every address is L1-physical, valid after the copy). */
struct nested_blob {
	u64 magic;		/* NESTED_MAGIC */
	u32 version;		/* NESTED_VERSION */
	u32 vendor;		/* VENDOR_VMX or VENDOR_SVM */
	u64 size;		/* bytes, header included */
	u64 base;		/* NESTED_BASE */
	u64 flags;		/* NESTED_* */
	/* VT-x */
	u64 vmcs_table;		/* {u64 encoding, u64 value} pairs to VMWRITE, in order */
	u64 vmcs_count;
	u64 vmxon_region;	/* 4 KiB, zero: the L1 writes the revision id */
	u64 vmcs_region;	/* 4 KiB, zero: the L1 writes the revision id */
	/* AMD-V */
	u64 vmcb;		/* the 4 KiB VMCB, used as it is */
	u64 hsave;		/* 4 KiB for VM_HSAVE_PA */
	/* the scenario */
	u64 tag_pte;		/* L1-physical address of L2_TAG_VA's PTE in tables A */
	u64 tag_pte_value;	/* what HC_REMAP writes there */
	u64 l2_rax;		/* the L2's RAX (SVM: in the VMCB; VMX: loaded by the L1) */
	u64 expected_exits;	/* how many L2 exits the scenario takes before its HLT */
	char name[32];		/* NUL-terminated, for the report */
};
#endif

#endif
