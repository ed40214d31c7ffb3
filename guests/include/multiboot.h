/* multiboot.h - the multiboot (version 1) header pykvm's multiboot kernels carry (multiboot/,
 * nested/): MULTIBOOT_HEADER emits it into section .multiboot, which each linker script puts first
 * so that it lies in the image's first 8192 bytes. Flags: modules page-aligned, memory info wanted.
 */
#ifndef MULTIBOOT_H
#define MULTIBOOT_H

#define MULTIBOOT_HEADER_MAGIC	0x1BADB002
#define MULTIBOOT_BOOT_MAGIC	0x2BADB002	/* EAX at entry */
#define MULTIBOOT_PAGE_ALIGN	(1 << 0)	/* modules on 4 KiB boundaries */
#define MULTIBOOT_MEMORY_INFO	(1 << 1)	/* mem_lower/mem_upper (and the mmap) wanted */
#define MULTIBOOT_FLAGS		(MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO)

#ifdef __ASSEMBLER__
.macro MULTIBOOT_HEADER
	.pushsection .multiboot, "a"
	.balign	4
	.long	MULTIBOOT_HEADER_MAGIC
	.long	MULTIBOOT_FLAGS
	.long	-(MULTIBOOT_HEADER_MAGIC + MULTIBOOT_FLAGS)
	.popsection
.endm
#endif

#endif
