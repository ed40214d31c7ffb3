/* kernel.c - kernel_main: what the kernel does once boot.S hands over.
 *
 * It checks what boot.S promised (boot_info filled, .bss zero), says hello on the debug
 * console (port 0xE9) with the CPU vendor, and returns 0: boot.S ends the run with DONE(0).
 */
#include "pykvm.h"
#include "boot.h"
#include "lib.h"

struct boot_info boot_info;		/* in .bss: boot.S fills it after zeroing .bss */
unsigned char early_heap[4096];		/* in .bss: must be zero however dirty RAM was */

static void post(unsigned char code)
{
	pykvm_outb(POST_PORT, code);
}

int kernel_main(struct boot_info *info)
{
	char line[64];

	post(POST_KERNEL);
	PYKVM_ASSERT(info == &boot_info, info);
	PYKVM_ASSERT(info->magic == BOOT_INFO_MAGIC, info->magic);
	for (size_t i = 0; i < sizeof(early_heap); i++)
		PYKVM_ASSERT(early_heap[i] == 0, i);

	memcpy(line, "kernel: booted on ", 18);
	memcpy(line + 18, info->vendor, 12);
	memcpy(line + 30, "\n", 2);
	PYKVM_ASSERT(strlen(line) == 31, strlen(line));
	pykvm_puts(line);
	return 0;
}
