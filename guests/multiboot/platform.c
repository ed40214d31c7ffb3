/* platform.c - pykvm's multiboot platform kernel: find the machine the way small kernels do.
 * Mode: 32-bit protected mode, no paging, entered by a multiboot loader (boot.S sets the stack)
 * Load: ELF at GPA 0x100000 (kernel.ld); needs the in-kernel irqchip and the PC devices
 * Exits: all output on the COM1 16550 UART (port 0x3F8), then outl(value) to isa-debug-exit
 *        (port 0xF4: the run ends with status (value << 1) | 1): value = the CPUs that came up, or
 *        0x40 | the FAIL_* bits of the checks that failed.
 *
 * It reads the CPU count and RAM size from fw_cfg, the CPUs and the IOAPIC from the ACPI MADT and
 * from the MP table, and the memory size from the CMOS; checks that they agree with each other and
 * with the multiboot memory information (as far as firmware allows: see the checks); starts every application processor with INIT/SIPI (each
 * AP counts itself in and halts); and, given "uart-irq" on its command line, waits for a byte on
 * the UART through its receive interrupt (IOAPIC pin 4, vector UART_VECTOR) and echoes it.
 */
#include "pykvm.h"
#include "print.h"

#define COM1		0x3F8
#define EXIT_PORT	0xF4
#define FW_CFG_SEL	0x510
#define FW_CFG_DATA	0x511
#define LAPIC		0xFEE00000u
#define AP_TRAMPOLINE	0x8000
#define UART_VECTOR	0x24
#define MAX_CPUS	16

#define FAIL_FWCFG	0x01u
#define FAIL_CPUS	0x02u
#define FAIL_RAM	0x04u
#define FAIL_SMP	0x08u
#define FAIL_UART	0x10u

struct multiboot_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
} __attribute__((packed));

extern char ap_trampoline[], ap_trampoline_end[];
volatile u32 ap_stack_top;		/* trampoline.S: each AP takes a stack from here */
static volatile u32 aps_up;
static volatile int uart_byte = -1;
static u8 ap_stacks[MAX_CPUS][4096] __attribute__((aligned(16)));
static u32 status;

/* ---- I/O ----------------------------------------------------------------------------------- */
static inline void mmio_write(u32 addr, u32 value) { *(volatile u32 *)addr = value; }
static inline u32 mmio_read(u32 addr) { return *(volatile u32 *)addr; }

void putc(char c)
{
	if (c == '\n')
		putc('\r');
	while (!(pykvm_inb(COM1 + 5) & 0x20))	/* LSR: transmitter holding register empty */
		;
	pykvm_outb(COM1, (u8)c);
}

static void uart_init(void)
{
	pykvm_outb(COM1 + 1, 0x00);	/* IER: no interrupts yet */
	pykvm_outb(COM1 + 3, 0x80);	/* LCR: DLAB, to set the divisor */
	pykvm_outb(COM1 + 0, 0x01);	/* 115200 baud */
	pykvm_outb(COM1 + 1, 0x00);
	pykvm_outb(COM1 + 3, 0x03);	/* 8N1 */
	pykvm_outb(COM1 + 2, 0xC7);	/* FCR: FIFOs on and cleared, 14-byte trigger */
	pykvm_outb(COM1 + 4, 0x0B);	/* MCR: DTR, RTS, OUT2 (the PC's interrupt gate) */
}

static void fail(u32 bit, const char *what)
{
	status |= bit;
	puts("FAIL: ");
	puts(what);
	putc('\n');
}

static void check(int ok, u32 bit, const char *what)
{
	if (!ok)
		fail(bit, what);
}

static int memeq(const void *a, const char *b, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (((const u8 *)a)[i] != (u8)b[i])
			return 0;
	return 1;
}

static u8 checksum(const void *p, u32 n)
{
	u8 sum = 0;
	for (u32 i = 0; i < n; i++)
		sum += ((const u8 *)p)[i];
	return sum;
}

/* ---- fw_cfg (QEMU's docs/specs/fw_cfg.rst: select with a 16-bit write, read bytes) ------------ */
static void fw_cfg_read(u16 key, void *buf, u32 n)
{
	pykvm_outw(FW_CFG_SEL, key);
	for (u32 i = 0; i < n; i++)
		((u8 *)buf)[i] = pykvm_inb(FW_CFG_DATA);
}

/* ---- ACPI: RSDP in the BIOS area, then XSDT/RSDT -> MADT ------------------------------------- */
static const u8 *find_rsdp(void)
{
	for (u32 p = 0xE0000; p < 0x100000; p += 16)
		if (memeq((const void *)p, "RSD PTR ", 8) && checksum((const void *)p, 20) == 0)
			return (const u8 *)p;
	return 0;
}

static const u8 *find_madt(const u8 *rsdp)
{
	const u8 *sdt = (const u8 *)*(const u32 *)(rsdp + 16);	/* the RSDT (32-bit entries) */
	u32 length = *(const u32 *)(sdt + 4);
	if (!memeq(sdt, "RSDT", 4) || checksum(sdt, length))
		return 0;
	for (u32 off = 36; off + 4 <= length; off += 4) {
		const u8 *table = (const u8 *)*(const u32 *)(sdt + off);
		if (memeq(table, "APIC", 4) && checksum(table, *(const u32 *)(table + 4)) == 0)
			return table;
	}
	return 0;
}

/* Enabled local APICs (their ids in apic_ids) and the IOAPIC address, from the MADT. */
static u32 madt_cpus(const u8 *madt, u8 *apic_ids, u32 *ioapic)
{
	u32 length = *(const u32 *)(madt + 4), n = 0;
	for (u32 off = 44; off + 2 <= length; off += madt[off + 1]) {
		const u8 *e = madt + off;
		if (e[1] == 0)
			break;
		if (e[0] == 0 && (*(const u32 *)(e + 4) & 1) && n < MAX_CPUS)
			apic_ids[n++] = e[3];
		else if (e[0] == 1)
			*ioapic = *(const u32 *)(e + 4);
	}
	return n;
}

/* ---- the MP table (Intel MultiProcessor Specification 1.4) ----------------------------------- */
static u32 mptable_cpus(u32 *ioapic)
{
	for (u32 p = 0xF0000; p < 0x100000; p += 16) {
		const u8 *mpf = (const u8 *)p;
		if (!memeq(mpf, "_MP_", 4) || checksum(mpf, 16))
			continue;
		const u8 *cfg = (const u8 *)*(const u32 *)(mpf + 4);
		u16 length = *(const u16 *)(cfg + 4), count = *(const u16 *)(cfg + 34);
		if (!memeq(cfg, "PCMP", 4) || checksum(cfg, length))
			return 0;
		u32 cpus = 0;
		const u8 *e = cfg + 44;
		for (u16 i = 0; i < count; i++) {
			if (e[0] == 0) {		/* processor */
				cpus += e[3] & 1;
				e += 20;
			} else {
				if (e[0] == 2)		/* I/O APIC */
					*ioapic = *(const u32 *)(e + 4);
				e += 8;
			}
		}
		return cpus;
	}
	return 0;
}

static u8 cmos(u8 reg)
{
	pykvm_outb(0x70, reg);
	return pykvm_inb(0x71);
}

/* ---- SMP: INIT, SIPI, and the APs counting themselves in ------------------------------------ */
void ap_main(void)
{
	__atomic_add_fetch(&aps_up, 1, __ATOMIC_SEQ_CST);
}

static void lapic_ipi(u8 apic_id, u32 command)
{
	mmio_write(LAPIC + 0x310, (u32)apic_id << 24);
	mmio_write(LAPIC + 0x300, command);
	while (mmio_read(LAPIC + 0x300) & (1u << 12))	/* delivery status */
		;
}

static void start_aps(const u8 *apic_ids, u32 ncpus)
{
	u8 *dst = (u8 *)AP_TRAMPOLINE;
	for (const char *src = ap_trampoline; src < ap_trampoline_end; src++)
		*dst++ = (u8)*src;
	ap_stack_top = (u32)ap_stacks[1];
	mmio_write(LAPIC + 0xF0, 0x1FF);			/* software-enable the BSP's LAPIC */
	u32 self = mmio_read(LAPIC + 0x20) >> 24;
	for (u32 i = 0; i < ncpus; i++) {
		if (apic_ids[i] == self)
			continue;
		lapic_ipi(apic_ids[i], 0x4500);			/* INIT */
		lapic_ipi(apic_ids[i], 0x4600 | (AP_TRAMPOLINE >> 12));	/* SIPI */
	}
	for (u32 spin = 0; aps_up < ncpus - 1 && spin < 50000000; spin++)
		__asm__ __volatile__("pause");
}

/* ---- the UART's receive interrupt ------------------------------------------------------------ */
struct gate { u16 off_lo, sel; u8 zero, attr; u16 off_hi; } __attribute__((packed));
static struct gate idt[256];
void uart_isr(void);
void uart_interrupt(void)
{
	while (pykvm_inb(COM1 + 5) & 1)		/* LSR.DR: read every byte that came */
		uart_byte = pykvm_inb(COM1);
	mmio_write(LAPIC + 0xB0, 0);		/* EOI */
}
/* The return from the interrupt without IRET: KVM's instruction emulator implements IRET for real
 * mode only, and kvm_pvm emulates every CPL0 instruction, so a protected-mode IRET fails there
 * (KVM_EXIT_INTERNAL_ERROR). Popping EIP, CS and EFLAGS by hand does the same for a same-privilege
 * interrupt; only this one vector uses it, so saved_eip cannot be overwritten before the jump. */
u32 saved_eip;
__asm__(".text\nuart_isr:\n\tpusha\n\tcld\n\tcall uart_interrupt\n\tpopa\n"
	"\tpopl saved_eip\n\taddl $4, %esp\n\tpopfl\n\tjmp *saved_eip\n");

static void wait_for_uart_byte(u32 ioapic)
{
	u16 cs;
	__asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
	u32 handler = (u32)uart_isr;
	idt[UART_VECTOR] = (struct gate){(u16)handler, cs, 0, 0x8E, (u16)(handler >> 16)};
	struct { u16 limit; u32 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)idt};
	__asm__ __volatile__("lidt %0" : : "m"(idtr));
	pykvm_outb(0x21, 0xFF);			/* mask both PICs: the IOAPIC delivers */
	pykvm_outb(0xA1, 0xFF);
	mmio_write(ioapic, 0x10 + 2 * 4);	/* redirection entry of pin 4 (COM1) */
	mmio_write(ioapic + 0x10, UART_VECTOR);
	mmio_write(ioapic, 0x11 + 2 * 4);
	mmio_write(ioapic + 0x10, 0);
	pykvm_outb(COM1 + 1, 0x01);		/* IER: received data available */
	puts("uart: waiting for input\n");
	__asm__ __volatile__("sti");
	while (uart_byte < 0)
		__asm__ __volatile__("hlt");
	__asm__ __volatile__("cli");
	puts("uart: got '");
	putc((char)uart_byte);
	puts("' by interrupt\n");
}

static int has_word(const char *s, const char *word)
{
	for (; s && *s; s++) {
		u32 i = 0;
		while (word[i] && s[i] == word[i])
			i++;
		if (!word[i] && (s[i] == 0 || s[i] == ' '))
			return 1;
	}
	return 0;
}

void kmain(u32 magic, const struct multiboot_info *info)
{
	uart_init();
	if (magic != 0x2BADB002u) {
		puts("FAIL: not started by a multiboot loader\n");
		pykvm_outl(EXIT_PORT, 0x7F);
	}
	puts("platform: multiboot ok\n");

	char sig[4];
	u16 fw_cpus = 0;
	u64 fw_ram = 0;
	fw_cfg_read(0x0000, sig, 4);
	check(memeq(sig, "QEMU", 4), FAIL_FWCFG, "no fw_cfg signature");
	fw_cfg_read(0x0005, &fw_cpus, 2);
	fw_cfg_read(0x0003, &fw_ram, 8);
	puts("fw_cfg: cpus ");
	put_dec(fw_cpus);
	puts(", ram ");
	put_dec((u32)(fw_ram >> 20));
	puts(" MiB\n");

	u8 apic_ids[MAX_CPUS];
	u32 ioapic = 0, mp_ioapic = 0, acpi_cpus = 0;
	const u8 *rsdp = find_rsdp();
	const u8 *madt = rsdp ? find_madt(rsdp) : 0;
	check(madt != 0, FAIL_CPUS, "no ACPI MADT");
	if (madt)
		acpi_cpus = madt_cpus(madt, apic_ids, &ioapic);
	u32 mp_cpus = mptable_cpus(&mp_ioapic);
	puts("acpi: cpus ");
	put_dec(acpi_cpus);
	puts(", ioapic ");
	put_hex_min(ioapic, 8);
	puts("\nmptable: cpus ");
	put_dec(mp_cpus);
	puts(", ioapic ");
	put_hex_min(mp_ioapic, 8);
	putc('\n');
	/* SeaBIOS's MP table under QEMU lists the boot CPU alone, so the MP table only has to know one. */
	check(acpi_cpus == fw_cpus && mp_cpus >= 1 && mp_cpus <= fw_cpus && ioapic == mp_ioapic && ioapic,
	      FAIL_CPUS, "fw_cfg, ACPI and the MP table disagree about the CPUs");

	u32 cmos_mib = 16 + ((cmos(0x34) | cmos(0x35) << 8) >> 4);	/* 64 KiB units above 16 MiB */
	u32 mb_mib = (info->mem_upper + 1024) >> 10;
	puts("cmos: ram ");
	put_dec(cmos_mib);
	puts(" MiB; multiboot: ram ");
	put_dec(mb_mib);
	puts(" MiB\n");
	/* A firmware may keep the top of RAM for its tables (QEMU: 1 MiB less in mem_upper). */
	u32 fw_mib = (u32)(fw_ram >> 20);
	check(cmos_mib == fw_mib && mb_mib <= fw_mib && mb_mib + 1 >= fw_mib, FAIL_RAM,
	      "fw_cfg, the CMOS and multiboot disagree about the RAM");

	if (acpi_cpus > 1)
		start_aps(apic_ids, acpi_cpus);
	puts("smp: ");
	put_dec(aps_up + 1);
	puts(" of ");
	put_dec(acpi_cpus);
	puts(" cpus up\n");
	check(aps_up + 1 == acpi_cpus, FAIL_SMP, "not every application processor came up");

	if (has_word((const char *)info->cmdline, "uart-irq"))
		wait_for_uart_byte(ioapic);

	u32 value = status ? 0x40 | status : aps_up + 1;
	puts("platform: exit ");
	put_dec(value);
	putc('\n');
	pykvm_outl(EXIT_PORT, value);
	pykvm_halt_forever();
}
