/* boot.h - what boot.S and the C kernel share: POST codes and the boot_info layout.
 * Included from assembly (boot.S) and C (kernel.c), so only #defines and a guarded struct.
 */
#ifndef BOOT_H
#define BOOT_H

/* POST codes: one byte written to port 0x80 at each boot stage, as PC firmware does. */
#define POST_PORT		0x80
#define POST_ENTRY		0x01	/* _start reached */
#define POST_BSS_CLEAR		0x02	/* .bss zeroed, stack set */
#define POST_CPU_OK		0x03	/* the CPU has every feature the kernel needs */
#define POST_KERNEL		0x04	/* kernel_main entered */

/* CPUID feature bits the kernel cannot run without. */
#define CPUID_1_EDX_TSC		(1 << 4)
#define CPUID_1_EDX_PAE		(1 << 6)
#define CPUID_1_EDX_APIC	(1 << 9)
#define CPUID_80000001_EDX_NX	(1 << 20)
#define CPUID_80000001_EDX_LM	(1 << 29)
#define BOOT_NEEDS_1_EDX	(CPUID_1_EDX_TSC | CPUID_1_EDX_PAE | CPUID_1_EDX_APIC)

/* struct boot_info: filled by boot.S, read by kernel_main (offsets for the assembler). */
#define BOOT_INFO_MAGIC		0x4b4f4f42	/* "BOOK" */
#define BOOT_INFO_OFF_MAGIC	0
#define BOOT_INFO_OFF_MAX_LEAF	4
#define BOOT_INFO_OFF_VENDOR	8	/* 12 bytes + NUL */
#define BOOT_INFO_OFF_EDX_1	24	/* CPUID.1:EDX */
#define BOOT_INFO_OFF_ECX_1	28	/* CPUID.1:ECX */
#define BOOT_INFO_SIZE		32

#ifndef __ASSEMBLER__
struct boot_info {
	unsigned int magic;
	unsigned int max_leaf;
	char vendor[16];
	unsigned int edx_1;
	unsigned int ecx_1;
};
_Static_assert(sizeof(struct boot_info) == BOOT_INFO_SIZE, "boot.S and boot.h disagree");

extern struct boot_info boot_info;
int kernel_main(struct boot_info *info);
#endif

#endif /* BOOT_H */
