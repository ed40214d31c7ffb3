/* l1.c - the vendor-neutral part of pykvm's L1 hypervisors: console, multiboot, the blob, the
 * report protocol, and the L2 hypercalls both vendors answer alike.
 * Mode: 64-bit long mode at CPL 0 (boot.S brings it there)
 * Load: part of the L1 image at 0x100000 (l1.ld)
 * Exits: COM1 (0x3F8) carries the report, one "nested: ..." line per event; the run ends with
 *        "nested: end status=0x.." then isa-debug-exit (port 0xf4, value = status) for QEMU and
 *        pykvm, and "Shutdown" on port 0x8900 for Bochs.
 * Command line (multiboot): "probe" prints the VMX capability MSRs or the SVM CPUID leaf and stops;
 *        "fc-lock" locks IA32_FEATURE_CONTROL with VMX disabled before VMXON (a firmware that
 *        disabled VT-x). The first module is the scenario blob pykvm built (nested.h).
 */
#include "l1.h"
#include "multiboot.h"

#define COM1 0x3F8

struct multiboot_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
};
struct multiboot_module { u32 start, end, string, reserved; };

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

void putc(char c)
{
	if (c == '\n')
		putc('\r');
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (u8)c);
}

static void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0x07);	/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);	/* DTR, RTS */
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, unsigned long n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, unsigned long n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
	struct cpuid_regs r;
	__asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(subleaf));
	return r;
}

u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (u64)hi << 32 | lo;
}

void wrmsr(u32 msr, u64 value)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}

u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }
void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }

void report(const char *what)
{
	puts("nested: ");
	puts(what);
}

void report_kv(const char *key, u64 value)
{
	putc(' ');
	puts(key);
	putc('=');
	put_hex_min(value, 1);
}

void report_end(void)
{
	putc('\n');
}

void report_exit(u32 index, u64 reason, const char *name, u64 qual, u64 gpa, u64 rip)
{
	report("exit ");
	put_dec(index);
	report_kv("reason", reason);
	puts(" name=");
	puts(name);
	report_kv("qual", qual);
	report_kv("gpa", gpa);
	report_kv("rip", rip);
	report_end();
}

void report_l2(u64 a, u64 b, u64 c)
{
	report("l2 report");
	report_kv("a", a);
	report_kv("b", b);
	report_kv("c", c);
	report_end();
}

void l1_exit(u32 status)
{
	static const char shutdown[] = "Shutdown";
	report("end");
	report_kv("status", status);
	report_end();
	while (!(inb(COM1 + 5) & 0x40))			/* the UART has sent everything (TEMT): */
		;					/* Bochs drops what is left at its end */
	outl(0xF4, status);				/* QEMU, pykvm: isa-debug-exit */
	for (const char *p = shutdown; *p; p++)		/* Bochs */
		outb(0x8900, (u8)*p);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void __attribute__((noreturn)) fail(const char *code, const char *text, u32 status)
{
	report("error ");
	puts(code);
	puts(": ");
	puts(text);
	report_end();
	l1_exit(status);
}

void l1_error(const char *code, const char *text)
{
	fail(code, text, STATUS_ERROR);
}

void l1_unsupported(const char *code, const char *text)
{
	fail(code, text, STATUS_NO_EXTENSION);
}

void l1_exception(struct l1_frame *f)
{
	report("error l1-exception:");
	report_kv("vector", f->vector);
	report_kv("error_code", f->error_code);
	report_kv("rip", f->rip);
	report_kv("rsp", f->rsp);
	report_kv("rax", f->rax);
	report_kv("rcx", f->rcx);
	report_kv("cr2", ({ u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); v; }));
	report_end();
	l1_exit(STATUS_ERROR);
}

extern u8 l1_idt[];
extern u8 l1_exception_stubs[];

void l1_idt_init(void)
{
	for (int v = 0; v < 32; v++) {
		u64 handler = (u64)(l1_exception_stubs + 16 * v);
		u8 *e = l1_idt + 16 * v;
		memset(e, 0, 16);
		e[0] = (u8)handler;
		e[1] = (u8)(handler >> 8);
		e[2] = 0x08;			/* selector */
		e[5] = 0x8E;			/* present, DPL 0, 64-bit interrupt gate */
		e[6] = (u8)(handler >> 16);
		e[7] = (u8)(handler >> 24);
		e[8] = (u8)(handler >> 32);
		e[9] = (u8)(handler >> 40);
		e[10] = (u8)(handler >> 48);
		e[11] = (u8)(handler >> 56);
	}
}

static int has_word(const char *s, const char *word)
{
	while (s && *s) {
		while (*s == ' ')
			s++;
		const char *w = word;
		const char *t = s;
		while (*w && *t == *w)
			t++, w++;
		if (!*w && (*t == ' ' || !*t))
			return 1;
		while (*s && *s != ' ')
			s++;
	}
	return 0;
}

/* L2 CPUID: the L1's own leaf, or the processor's values with the virtualization bits hidden. */
u32 l1_cpuid_for_l2(u32 leaf, u32 subleaf, struct cpuid_regs *out)
{
	if (leaf == L1_CPUID_LEAF) {
		out->eax = L1_CPUID_LEAF;
		out->ebx = 0x766b7970;	/* "pykv" */
		out->ecx = 0x314c206d;	/* "m L1" */
		out->edx = 0x00766820;	/* " hv" */
		return 1;
	}
	*out = cpuid(leaf, subleaf);
	if (leaf == 1)
		out->ecx &= ~(1u << 5);		/* VMX */
	if (leaf == 0x80000001)
		out->ecx &= ~(1u << 2);		/* SVM */
	return 0;
}

u64 l1_hypercall(struct nested_blob *blob, u64 nr, u64 rbx, u64 rcx, u64 rdx, int *flush)
{
	*flush = 0;
	switch (nr) {
	case HC_REPORT:
		report_l2(rbx, rcx, rdx);
		return 0;
	case HC_REMAP:
		/* rewrite the PTE in the L2's memory; no invalidation: a tagged TLB may keep the old one */
		*(volatile u64 *)blob->tag_pte = blob->tag_pte_value;
		return 0;
	case HC_FLUSH:
		*flush = 1;
		return 0;
	case HC_ECHO:
		return rbx + 1;
	}
	return (u64)-1;
}

static const char *vendor_of(struct cpuid_regs r, char buf[13])
{
	memcpy(buf, &r.ebx, 4);
	memcpy(buf + 4, &r.edx, 4);
	memcpy(buf + 8, &r.ecx, 4);
	buf[12] = 0;
	return buf;
}

void l1_main(u32 magic, u32 info_addr)
{
	struct multiboot_info *info = (struct multiboot_info *)(u64)info_addr;
	struct l1_options opt = {0};
	char vendor[13];
	const char *cmdline = "";

	serial_init();
	report("start pykvm L1 hypervisor");
	vendor_of(cpuid(0, 0), vendor);
	puts(" cpu=");
	puts(vendor);
	report_end();
	if (magic != MULTIBOOT_BOOT_MAGIC)
		l1_error("boot", "not started by a multiboot loader (EAX is not 0x2BADB002)");
	if (info->flags & (1 << 2))
		cmdline = (const char *)(u64)info->cmdline;
	opt.probe = has_word(cmdline, "probe");
	opt.fc_lock = has_word(cmdline, "fc-lock");

	vendor_check(&opt);
	if (opt.probe) {
		struct cpuid_regs r = cpuid(0x80000008, 0);	/* address widths */
		report("cpuid");
		report_kv("leaf", 0x80000008);
		report_kv("eax", r.eax);
		report_end();
		l1_exit(vendor_probe());
	}

	if (!(info->flags & (1 << 3)) || info->mods_count < 1)
		l1_error("blob", "no scenario blob: pass it as the first multiboot module");
	struct multiboot_module *mod = (struct multiboot_module *)(u64)info->mods_addr;
	u64 size = mod->end - mod->start;
	struct nested_blob *src = (struct nested_blob *)(u64)mod->start;
	if (size < sizeof(struct nested_blob) || src->magic != NESTED_MAGIC)
		l1_error("blob", "the first module is not a pykvm scenario blob (bad magic)");
	if (src->version != NESTED_VERSION)
		l1_error("blob", "the blob's version is not the one this L1 was built for");
	if (src->size != size || size > NESTED_MAX_SIZE || src->base != NESTED_BASE)
		l1_error("blob", "the blob's size or base does not match the module");
	if (src->vendor != l1_vendor)
		l1_error("blob", "the blob was built for the other vendor's L1");
	memmove((void *)(u64)NESTED_BASE, src, size);
	struct nested_blob *blob = (struct nested_blob *)(u64)NESTED_BASE;
	report("blob name=");
	puts(blob->name);
	puts(" vendor=");
	puts(l1_vendor_name);
	report_kv("size", size);
	report_kv("flags", blob->flags);
	report_end();
	/* The L2 runs with external-interrupt exiting and the L1 with IF=0: a PIC line the firmware
	 * left unmasked would make every entry exit again at once. Nothing here needs IRQs. */
	outb(0x21, 0xFF);
	outb(0xA1, 0xFF);
	l1_exit(vendor_main(blob, &opt));
}
