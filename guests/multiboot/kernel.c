/* kernel.c - pykvm's multiboot test kernel: report what the boot loader passed, then exit.
 * Mode: 32-bit protected mode, no paging, as the multiboot spec leaves it (boot.S sets the stack)
 * Load: ELF at GPA 0x100000 (kernel.ld); a multiboot loader enters _start with EAX = 0x2BADB002
 * Exits: console bytes on port 0xE9 (one putc below), then outl(status) to port 0xF4 (QEMU's
 *        isa-debug-exit: QEMU exits with (status << 1) | 1; pykvm's test maps it the same way)
 *
 * Status 0 means every check passed: the magic, the flags it asked for (memory info), the CPU state
 * the spec requires (CR0.PE=1, CR0.PG=0, EFLAGS.IF=0, EFLAGS.VM=0), a zeroed .bss, page-aligned
 * modules, and boot information (info, mmap, module list, strings, modules) outside the kernel.
 * Any failed check sets a bit (FAIL_*) and prints a line starting "FAIL".
 */
#include "pykvm.h"
#include "print.h"

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define EXIT_PORT 0xF4

#define INFO_MEMORY (1u << 0)
#define INFO_CMDLINE (1u << 2)
#define INFO_MODS (1u << 3)
#define INFO_MMAP (1u << 6)
#define INFO_BOOT_LOADER_NAME (1u << 9)

#define FAIL_MAGIC 0x01u
#define FAIL_FLAGS 0x02u
#define FAIL_STATE 0x04u
#define FAIL_BSS 0x08u
#define FAIL_ALIGN 0x10u
#define FAIL_OVERLAP 0x20u

struct multiboot_info {
	u32 flags;
	u32 mem_lower, mem_upper;
	u32 boot_device;
	u32 cmdline;
	u32 mods_count, mods_addr;
	u32 syms[4];
	u32 mmap_length, mmap_addr;
	u32 drives_length, drives_addr;
	u32 config_table;
	u32 boot_loader_name;
	u32 apm_table;
	u32 vbe[4];
} __attribute__((packed));

struct multiboot_module {
	u32 mod_start, mod_end;
	u32 string;
	u32 reserved;
} __attribute__((packed));

struct multiboot_mmap_entry {
	u32 size; /* of the rest of the entry: the next one is at (char *)this + size + 4 */
	u64 base_addr, length;
	u32 type;
} __attribute__((packed));

extern char __kernel_start[], __kernel_end[];
static volatile u32 bss_probe[256]; /* must read as zero: the loader zeroes the bss */
static u32 status;

/* ---- output: everything goes through putc (print.c formats on top of it) --------------------- */
void putc(char c)
{
	pykvm_outb(PYKVM_CONSOLE_PORT, (unsigned char)c);
}

static void put_hex32(u32 value)
{
	put_hex_min(value, 1);
}

static u32 str_size(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n + 1;
}

static void fail(u32 bit, const char *what)
{
	status |= bit;
	puts("FAIL: ");
	puts(what);
	putc('\n');
}

/* The range [addr, addr + size) must not touch the kernel's own [__kernel_start, __kernel_end). */
static void check_outside_kernel(u32 addr, u32 size, const char *what)
{
	u32 start = (u32)__kernel_start, end = (u32)__kernel_end;
	if (addr < end && start < addr + size) {
		status |= FAIL_OVERLAP;
		puts("FAIL: ");
		puts(what);
		puts(" at ");
		put_hex32(addr);
		puts(" overlaps the kernel\n");
	}
}

static void __attribute__((noreturn)) exit_with(u32 value)
{
	puts("multiboot: exit ");
	put_dec(value);
	putc('\n');
	pykvm_outl(EXIT_PORT, value);
	pykvm_halt_forever();
}

static void check_state(void)
{
	u32 cr0, eflags;
	__asm__ __volatile__("mov %%cr0, %0" : "=r"(cr0));
	__asm__ __volatile__("pushfl; popl %0" : "=r"(eflags));
	puts("state: cr0.pe=");
	put_dec(cr0 & 1);
	puts(" cr0.pg=");
	put_dec(cr0 >> 31);
	puts(" eflags.if=");
	put_dec((eflags >> 9) & 1);
	puts(" eflags.vm=");
	put_dec((eflags >> 17) & 1);
	putc('\n');
	if (!(cr0 & 1) || (cr0 >> 31) || (eflags & (1u << 9)) || (eflags & (1u << 17)))
		fail(FAIL_STATE, "the CPU state is not what the multiboot spec requires");
}

static void show_mmap(const struct multiboot_info *info)
{
	u32 addr = info->mmap_addr, end = info->mmap_addr + info->mmap_length;
	check_outside_kernel(info->mmap_addr, info->mmap_length, "the memory map");
	while (addr < end) {
		const struct multiboot_mmap_entry *e = (const void *)addr;
		puts("mmap: ");
		put_hex_min(e->base_addr, 9);
		putc('-');
		put_hex_min(e->base_addr + e->length, 9);
		puts(" type ");
		put_dec(e->type);
		putc('\n');
		addr += e->size + 4;
	}
}

static void show_modules(const struct multiboot_info *info)
{
	const struct multiboot_module *mods = (const void *)info->mods_addr;
	puts("modules: ");
	put_dec(info->mods_count);
	putc('\n');
	check_outside_kernel(info->mods_addr, info->mods_count * sizeof(*mods), "the module list");
	for (u32 i = 0; i < info->mods_count; i++) {
		const struct multiboot_module *m = &mods[i];
		u32 size = m->mod_end - m->mod_start;
		puts("module ");
		put_dec(i);
		puts(": ");
		put_dec(size);
		puts(" bytes, '");
		if (m->string) {
			put_text((const char *)m->string, 200);
			check_outside_kernel(m->string, str_size((const char *)m->string), "a module string");
		}
		puts("', data '");
		put_text((const char *)m->mod_start, size < 32 ? size : 32);
		puts("'\n");
		if (m->mod_start & 0xFFF)
			fail(FAIL_ALIGN, "a module is not page-aligned (the header asks for it)");
		check_outside_kernel(m->mod_start, size ? size : 1, "a module");
	}
}

void kmain(u32 magic, const struct multiboot_info *info)
{
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
		puts("FAIL: EAX is ");
		put_hex32(magic);
		puts(", not the multiboot magic 0x2badb002\n");
		exit_with(FAIL_MAGIC);
	}
	puts("multiboot: ok\n");
	check_state();
	for (u32 i = 0; i < sizeof(bss_probe) / sizeof(bss_probe[0]); i++)
		if (bss_probe[i]) {
			fail(FAIL_BSS, "the .bss is not zero");
			break;
		}
	check_outside_kernel((u32)info, sizeof(*info), "the boot information");

	puts("flags: ");
	put_hex32(info->flags);
	putc('\n');
	if (info->flags & INFO_BOOT_LOADER_NAME) {
		puts("boot loader: ");
		put_text((const char *)info->boot_loader_name, 64);
		putc('\n');
	}
	if (info->flags & INFO_CMDLINE) {
		puts("cmdline: '");
		put_text((const char *)info->cmdline, 200);
		puts("'\n");
		check_outside_kernel(info->cmdline, str_size((const char *)info->cmdline), "the command line");
	}
	if (info->flags & INFO_MEMORY) {
		puts("mem_lower: ");
		put_dec(info->mem_lower);
		puts(" KiB\nmem_upper: ");
		put_dec(info->mem_upper);
		puts(" KiB\n");
	} else {
		fail(FAIL_FLAGS, "no mem_lower/mem_upper, though the header asks for memory information");
	}
	if (info->flags & INFO_MMAP)
		show_mmap(info);
	if (info->flags & INFO_MODS)
		show_modules(info);
	exit_with(status);
}
