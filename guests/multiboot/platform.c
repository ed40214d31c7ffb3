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
 *
 * Words for QEMU's PC (QEMU itself, or pykvm-qemu; pykvm's own `pykvm run` has none of this, so
 * each check runs only when its word is on the command line):
 *   pci         enumerate bus 0 with configuration mechanism #1 ("pci 00:DD.F vvvv:dddd class
 *               cccccc"), then find QEMU's pci-testdev (1b36:0005), read and size its BARs and
 *               run its tests through BAR0 (memory) and BAR1 (ports) as kvm-unit-tests'
 *               lib/pci-testdev.c does; with "q35" too, read the same registers through the
 *               ECAM window of the ACPI MCFG and compare them with mechanism #1.
 *   acpi-pm     the FADT's PM1a_CNT_BLK, PM_TMR_BLK and FACS; the PM timer must advance.
 *   unassigned  an unclaimed port (0x1234) reads all ones, unclaimed MMIO (UNASSIGNED_MMIO) all
 *               ones or (QEMU's choice) all zeros, at every width, before and after writes.
 *   poweroff    end by ACPI S5 (SLP_TYP from the DSDT's \_S5, SLP_EN, to PM1a_CNT_BLK) instead of
 *               isa-debug-exit -- only when every check passed (a failure still exits through
 *               port 0xF4 with its bits, so it cannot look like a clean power-off, status 0).
 *
 * The exit value has 7 bits (isa-debug-exit's status (value << 1) | 1 is one byte): 0x40 marks a
 * failure, bits 0x01-0x10 are the first five checks', and 0x20 stands for any of the new ones
 * (FAIL_PCI and up); "platform: fail bits 0x..." on the UART gives the whole word.
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
#define FAIL_PCI	0x20u	/* mechanism #1 enumeration, pci-testdev BARs and tests */
/* 0x40 is the exit value's failure mark: the bits below do not fit in the exit value, which
 * shows them as FAIL_PCI (FAIL_QEMU_WORDS); the UART line has them all. */
#define FAIL_ECAM	0x080u	/* MCFG missing, or ECAM and mechanism #1 disagree */
#define FAIL_PM		0x100u	/* no FADT / FACS, or the PM timer did not advance */
#define FAIL_UNASSIGNED	0x200u	/* an unclaimed port not all ones, or unclaimed MMIO neither all ones nor all zeros */
#define FAIL_POWEROFF	0x400u	/* the S5 write returned */
#define FAIL_QEMU_WORDS	0x20u	/* what every bit from FAIL_PCI up shows as in the exit value */

#define UNASSIGNED_PORT	0x1234
/* Above RAM, below the IOAPIC (0xFEC00000), outside pykvm's BAR window (0xD0000000 up to the ECAM
 * at 0xE0000000) and outside where SeaBIOS put QEMU's BARs; the kernel checks it is no BAR it
 * found when "pci" enumerated. */
#define UNASSIGNED_MMIO	0xFEB00000u

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

static const u8 *table_at(u32 address, const char *sig)
{
	const u8 *table = (const u8 *)address;
	if (address && memeq(table, sig, 4) && checksum(table, *(const u32 *)(table + 4)) == 0)
		return table;
	return 0;
}

/* A table by signature: from the RSDT (32-bit entries), else, when the RSDP (revision 2 and up)
 * has one below 4 GiB, from the XSDT (64-bit entries; those above 4 GiB are out of reach here). */
static const u8 *find_table(const u8 *rsdp, const char *sig)
{
	const u8 *found = 0;
	const u8 *rsdt = table_at(*(const u32 *)(rsdp + 16), "RSDT");
	for (u32 off = 36; rsdt && !found && off + 4 <= *(const u32 *)(rsdt + 4); off += 4)
		found = table_at(*(const u32 *)(rsdt + off), sig);
	const u8 *xsdt = rsdp[15] >= 2 && *(const u32 *)(rsdp + 28) == 0 ? table_at(*(const u32 *)(rsdp + 24), "XSDT") : 0;
	for (u32 off = 36; xsdt && !found && off + 8 <= *(const u32 *)(xsdt + 4); off += 8)
		if (*(const u32 *)(xsdt + off + 4) == 0)
			found = table_at(*(const u32 *)(xsdt + off), sig);
	return found;
}

static const u8 *find_madt(const u8 *rsdp)
{
	return find_table(rsdp, "APIC");
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
	/* Interrupts stay off between the check and the HLT (STI's one-instruction shadow covers the
	 * HLT): an interrupt taken after the check and before the HLT would leave it asleep for ever. */
	while (uart_byte < 0)
		__asm__ __volatile__("sti; hlt; cli");
	puts("uart: got '");
	putc((char)uart_byte);
	puts("' by interrupt\n");
}

/* ---- hex without the 0x, as lspci prints numbers -------------------------------------------- */
static void put_hex_digits(u32 value, int digits)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = digits - 1; i >= 0; i--)
		putc(hex[(value >> (4 * i)) & 0xF]);
}

static inline u8 mmio_read8(u32 addr) { return *(volatile u8 *)addr; }
static inline u16 mmio_read16(u32 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write8(u32 addr, u8 value) { *(volatile u8 *)addr = value; }
static inline void mmio_write16(u32 addr, u16 value) { *(volatile u16 *)addr = value; }

/* ---- PCI: configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2) and ECAM (PCIe 3.0, 7.2.2) -- */
#define PCI_CONFIG_ADDRESS	0xCF8
#define PCI_CONFIG_DATA		0xCFC
#define MAX_FUNCTIONS		32

struct pci_fn { u8 dev, fn; };
static struct pci_fn pci_fns[MAX_FUNCTIONS];
static u32 pci_nfns;
static u32 testdev_bar0, testdev_bar1;		/* what the pci-testdev decodes (0: none found) */

static u32 conf1_addr(u8 dev, u8 fn, u8 reg)
{
	return 0x80000000u | (u32)dev << 11 | (u32)fn << 8 | (reg & 0xFCu);
}

static u32 conf1_read(u8 dev, u8 fn, u8 reg)
{
	pykvm_outl(PCI_CONFIG_ADDRESS, conf1_addr(dev, fn, reg));
	return pykvm_inl(PCI_CONFIG_DATA);
}

static void conf1_write(u8 dev, u8 fn, u8 reg, u32 value)
{
	pykvm_outl(PCI_CONFIG_ADDRESS, conf1_addr(dev, fn, reg));
	pykvm_outl(PCI_CONFIG_DATA, value);
}

/* The standard sizing of a 32-bit BAR: decoding off, all ones in, read back, the old value and
 * the command register back. Returns the size (0: no BAR). */
static u32 pci_bar_size(u8 dev, u8 fn, u8 bar)
{
	u8 reg = 0x10 + 4 * bar;
	u32 command = conf1_read(dev, fn, 0x04) & 0xFFFF;
	u32 old = conf1_read(dev, fn, reg);
	conf1_write(dev, fn, 0x04, command & ~3u);
	conf1_write(dev, fn, reg, 0xFFFFFFFFu);
	u32 mask = conf1_read(dev, fn, reg);
	conf1_write(dev, fn, reg, old);
	conf1_write(dev, fn, 0x04, command);
	mask &= (old & 1) ? ~3u : ~15u;
	if (old & 1)
		mask |= 0xFFFF0000u;	/* I/O BARs may hardwire the upper 16 bits to 0 */
	return mask ? ~mask + 1 : 0;
}

static void pci_enumerate(void)
{
	for (u8 dev = 0; dev < 32; dev++) {
		if ((conf1_read(dev, 0, 0x00) & 0xFFFF) == 0xFFFF)
			continue;
		u8 functions = (conf1_read(dev, 0, 0x0C) >> 16) & 0x80 ? 8 : 1;	/* header type bit 7 */
		for (u8 fn = 0; fn < functions; fn++) {
			u32 id = conf1_read(dev, fn, 0x00);
			if ((id & 0xFFFF) == 0xFFFF)
				continue;
			puts("pci 00:");
			put_hex_digits(dev, 2);
			putc('.');
			put_hex_digits(fn, 1);
			putc(' ');
			put_hex_digits(id & 0xFFFF, 4);
			putc(':');
			put_hex_digits(id >> 16, 4);
			puts(" class ");
			put_hex_digits(conf1_read(dev, fn, 0x08) >> 8, 6);
			putc('\n');
			if (pci_nfns < MAX_FUNCTIONS)
				pci_fns[pci_nfns++] = (struct pci_fn){dev, fn};
		}
	}
	/* Every PC has its host bridge at 00.0 and (i440FX / PIIX3) an ISA bridge at 01.0. */
	check(pci_nfns >= 1 && pci_fns[0].dev == 0 && pci_fns[0].fn == 0 && (conf1_read(0, 0, 0x08) >> 8) == 0x060000,
	      FAIL_PCI, "no host bridge at 00:00.0");
}

/* kvm-unit-tests' struct pci_test_dev_hdr, QEMU's PCITestDevHdr. */
#define TESTDEV_TEST	0x00
#define TESTDEV_WIDTH	0x01
#define TESTDEV_OFFSET	0x04
#define TESTDEV_DATA	0x08
#define TESTDEV_COUNT	0x0C
#define TESTDEV_NAME	0x10
#define TESTDEV_WRITES	16

static u32 td_read(int io, u32 base, u32 off, int width)
{
	if (io)
		return width == 1 ? pykvm_inb(base + off) : width == 2 ? pykvm_inw(base + off) : pykvm_inl(base + off);
	return width == 1 ? mmio_read8(base + off) : width == 2 ? mmio_read16(base + off) : mmio_read(base + off);
}

static void td_write(int io, u32 base, u32 off, int width, u32 value)
{
	if (io) {
		if (width == 1)
			pykvm_outb(base + off, (u8)value);
		else if (width == 2)
			pykvm_outw(base + off, (u16)value);
		else
			pykvm_outl(base + off, value);
	} else if (width == 1) {
		mmio_write8(base + off, (u8)value);
	} else if (width == 2) {
		mmio_write16(base + off, (u16)value);
	} else {
		mmio_write(base + off, value);
	}
}

/* kvm-unit-tests' pci_testdev_all over one BAR: select test n, check its count starts at 0, make
 * TESTDEV_WRITES writes of `data` at `offset`, and count: every write, or none (QEMU answers the
 * eventfd tests with an ioeventfd, which the device's count never sees). A "no-eventfd" test has
 * no ioeventfd, so there every write must count, and a write of other data must not. Returns how
 * many tests the BAR has (the first n whose header is no test ends the walk). */
static u32 testdev_run(int io, u32 base)
{
	u32 n;
	for (n = 0; n < 8; n++) {
		td_write(io, base, TESTDEV_TEST, 1, n);
		u32 count = td_read(io, base, TESTDEV_COUNT, 4);
		u32 width = td_read(io, base, TESTDEV_WIDTH, 1);
		if (width != 1 && width != 2 && width != 4)
			break;
		u32 data = td_read(io, base, TESTDEV_DATA, 4), off = td_read(io, base, TESTDEV_OFFSET, 4);
		char name[40];
		u32 len = 0;
		for (u8 c; len + 1 < sizeof(name) && (c = (u8)td_read(io, base, TESTDEV_NAME + len, 1)); len++)
			name[len] = (char)c;
		name[len] = 0;
		int no_eventfd = len >= 11 && memeq(name + len - 11, "-no-eventfd", 11);
		for (u32 i = 0; i < TESTDEV_WRITES; i++)
			td_write(io, base, off, (int)width, data);
		u32 counted = td_read(io, base, TESTDEV_COUNT, 4);
		u32 after_other = counted;
		if (no_eventfd) {
			td_write(io, base, off, (int)width, data ^ 0xFF);
			after_other = td_read(io, base, TESTDEV_COUNT, 4);
		}
		puts(io ? "pci-testdev  io: " : "pci-testdev mem: ");
		puts(name);
		puts(" (");
		put_dec(counted);
		puts(" of ");
		put_dec(TESTDEV_WRITES);
		puts(" writes counted)\n");
		check(count == 0, FAIL_PCI, "pci-testdev: a test's count does not start at 0");
		check(len > 0 && memeq(name, io ? "portio-" : "mmio-", io ? 7 : 5), FAIL_PCI,
		      "pci-testdev: a test's name is not of its BAR's kind");
		check(counted == TESTDEV_WRITES || (!no_eventfd && counted == 0), FAIL_PCI,
		      "pci-testdev: the count does not follow the writes");
		check(after_other == counted, FAIL_PCI, "pci-testdev: a write of other data counted");
	}
	td_write(io, base, TESTDEV_TEST, 1, 0xFF);	/* none selected */
	return n;
}

static void pci_testdev(void)
{
	u32 i;
	for (i = 0; i < pci_nfns; i++)
		if (conf1_read(pci_fns[i].dev, pci_fns[i].fn, 0x00) == 0x00051B36u)
			break;
	if (i == pci_nfns) {
		fail(FAIL_PCI, "no pci-testdev (1b36:0005)");
		return;
	}
	u8 dev = pci_fns[i].dev, fn = pci_fns[i].fn;
	u32 bar0 = conf1_read(dev, fn, 0x10), bar1 = conf1_read(dev, fn, 0x14);
	u32 command = conf1_read(dev, fn, 0x04) & 0xFFFF;
	u32 size0 = pci_bar_size(dev, fn, 0), size1 = pci_bar_size(dev, fn, 1);
	puts("pci-testdev: bar0 mem ");
	put_hex(bar0 & ~15u, 8);
	puts(" size ");
	put_dec(size0);
	puts(", bar1 io ");
	put_hex(bar1 & ~3u, 4);
	puts(" size ");
	put_dec(size1);
	putc('\n');
	check(conf1_read(dev, fn, 0x10) == bar0 && conf1_read(dev, fn, 0x14) == bar1 &&
	      (conf1_read(dev, fn, 0x04) & 0xFFFF) == command, FAIL_PCI, "pci-testdev: sizing did not restore the BARs");
	check((bar0 & 1) == 0 && (bar0 & 6) == 0 && (bar1 & 1) == 1, FAIL_PCI,
	      "pci-testdev: BAR0 is no 32-bit memory BAR or BAR1 no I/O BAR");
	check(size0 == 4096 && size1 == 256, FAIL_PCI, "pci-testdev: BAR sizes are not 4 KiB and 256 ports");
	check((bar0 & ~15u) % 4096 == 0 && (bar1 & ~3u) % 256 == 0 && (bar0 & ~15u) && (bar1 & ~3u), FAIL_PCI,
	      "pci-testdev: a BAR is unassigned or not naturally aligned");
	check((command & 3) == 3, FAIL_PCI, "pci-testdev: I/O or memory decoding is off");
	if ((bar0 & 1) || !(bar1 & 1) || (command & 3) != 3)
		return;
	testdev_bar0 = bar0 & ~15u;
	testdev_bar1 = bar1 & ~3u;
	u32 mem_tests = testdev_run(0, testdev_bar0);
	u32 io_tests = testdev_run(1, testdev_bar1);
	puts("pci-testdev: ");
	put_dec(mem_tests);
	puts(" mem tests, ");
	put_dec(io_tests);
	puts(" io tests\n");
	check(mem_tests == 3 && io_tests == 3, FAIL_PCI, "pci-testdev: not 3 tests in each BAR");
}

/* The MCFG (PCI Firmware Specification 3.0, 4.1.2): after the header and 8 reserved bytes, 16-byte
 * allocations of u64 base, u16 segment, u8 start bus, u8 end bus. The base is bus 0's. */
static void pci_ecam(const u8 *rsdp)
{
	const u8 *mcfg = rsdp ? find_table(rsdp, "MCFG") : 0;
	if (!mcfg || *(const u32 *)(mcfg + 4) < 44 + 16) {
		fail(FAIL_ECAM, "no ACPI MCFG");
		return;
	}
	const u8 *entry = mcfg + 44;
	u32 base = *(const u32 *)entry, base_hi = *(const u32 *)(entry + 4);
	u16 segment = *(const u16 *)(entry + 8);
	u8 start = entry[10], end = entry[11];
	puts("ecam: mcfg base ");
	put_hex(base, 8);
	puts(", segment ");
	put_dec(segment);
	puts(", buses ");
	put_dec(start);
	putc('-');
	put_dec(end);
	putc('\n');
	if (base_hi || segment || start != 0 || end < start || !base) {
		fail(FAIL_ECAM, "ecam: bus 0 of segment 0 is not below 4 GiB");
		return;
	}
	u32 agree = 0;
	for (u32 i = 0; i < pci_nfns; i++) {
		u8 dev = pci_fns[i].dev, fn = pci_fns[i].fn;
		u32 cfg = base + ((u32)dev << 15 | (u32)fn << 12);
		int same = 1;
		for (u8 reg = 0; reg < 0x40; reg += 4)
			same &= mmio_read(cfg + reg) == conf1_read(dev, fn, reg);
		agree += same;
	}
	/* A function's absence (all ones) must agree too: a device number no function answers. */
	u8 empty = 31;
	while (empty > 2 && (conf1_read(empty, 0, 0) & 0xFFFF) != 0xFFFF)
		empty--;
	u32 absent = mmio_read(base + ((u32)empty << 15));
	/* A write through ECAM reaches the register mechanism #1 reads: the interrupt line (0x3C, a
	 * plain read/write byte) of the last function found, put back afterwards. */
	int written = 0;
	if (pci_nfns) {
		u8 dev = pci_fns[pci_nfns - 1].dev, fn = pci_fns[pci_nfns - 1].fn;
		u32 line = base + ((u32)dev << 15 | (u32)fn << 12) + 0x3C;
		u8 old = mmio_read8(line);
		mmio_write8(line, (u8)(old ^ 0x5A));
		written = (conf1_read(dev, fn, 0x3C) & 0xFF) == (u8)(old ^ 0x5A);
		mmio_write8(line, old);
		written &= (conf1_read(dev, fn, 0x3C) & 0xFF) == old;
	}
	puts("ecam: ");
	put_dec(agree);
	puts(" of ");
	put_dec(pci_nfns);
	puts(" functions agree with mechanism #1, empty 00:");
	put_hex_digits(empty, 2);
	puts(".0 reads ");
	put_hex(absent, 8);
	puts(written ? ", writes reach mechanism #1\n" : ", a write did not reach mechanism #1\n");
	check(agree == pci_nfns && pci_nfns > 0 && absent == 0xFFFFFFFFu && written, FAIL_ECAM,
	      "ecam: ECAM and mechanism #1 disagree");
}

/* ---- ACPI fixed hardware from the FADT (ACPI 6.5, 5.2.9) -------------------------------------- */
struct fadt_info { u32 pm1a_cnt, pm_tmr, facs; u8 s5_typ; };

/* SLP_TYP for S5 from the DSDT's \_S5 object: NameOp "_S5_" PackageOp PkgLength NumElements, then
 * the first element (PM1a's value) as ZeroOp, OneOp or BytePrefix n. Returns -1 if not found. */
static int dsdt_s5(const u8 *dsdt)
{
	u32 length = *(const u32 *)(dsdt + 4);
	for (u32 i = 36; i + 8 < length; i++) {
		if (!memeq(dsdt + i, "_S5_", 4) || dsdt[i + 4] != 0x12)
			continue;
		const u8 *p = dsdt + i + 5;
		p += 1 + (p[0] >> 6);		/* PkgLength: bits 7-6 of its lead byte count the bytes after it */
		p += 1;				/* NumElements */
		if (p[0] == 0x00 || p[0] == 0x01)
			return p[0];
		if (p[0] == 0x0A)
			return p[1] & 7;
		return -1;
	}
	return -1;
}

static int read_fadt(const u8 *rsdp, struct fadt_info *f)
{
	const u8 *fadt = rsdp ? find_table(rsdp, "FACP") : 0;
	if (!fadt || *(const u32 *)(fadt + 4) < 116)
		return 0;
	u32 length = *(const u32 *)(fadt + 4);
	f->facs = *(const u32 *)(fadt + 36);
	if (!f->facs && length >= 140 && *(const u32 *)(fadt + 136) == 0)
		f->facs = *(const u32 *)(fadt + 132);	/* X_FIRMWARE_CTRL */
	f->pm1a_cnt = *(const u32 *)(fadt + 64);
	f->pm_tmr = *(const u32 *)(fadt + 76);
	const u8 *dsdt = (const u8 *)*(const u32 *)(fadt + 40);
	int s5 = dsdt && memeq(dsdt, "DSDT", 4) ? dsdt_s5(dsdt) : -1;
	/* QEMU's DSDT has \_S5 = Package {0, 0, 0, 0} (the PIIX4's and ICH9's S5 is SLP_TYP 0). */
	f->s5_typ = s5 < 0 ? 0 : (u8)s5;
	return 1;
}

static u32 pm_timer(u32 port)
{
	return pykvm_inl((u16)port) & 0xFFFFFF;
}

static void acpi_pm(const struct fadt_info *f, int have)
{
	if (!have) {
		fail(FAIL_PM, "no ACPI FADT");
		return;
	}
	puts("acpi-pm: pm1a_cnt ");
	put_hex_min(f->pm1a_cnt, 4);
	puts(", pm_tmr ");
	put_hex_min(f->pm_tmr, 4);
	puts(", facs ");
	put_hex_min(f->facs, 8);
	puts(", s5 slp_typ ");
	put_dec(f->s5_typ);
	putc('\n');
	check(f->facs && memeq((const void *)f->facs, "FACS", 4) && *(const u32 *)(f->facs + 4) >= 64, FAIL_PM,
	      "acpi-pm: no FACS where the FADT says");
	check(f->pm1a_cnt && f->pm1a_cnt < 0x10000 && f->pm_tmr && f->pm_tmr < 0x10000, FAIL_PM,
	      "acpi-pm: PM1a_CNT_BLK or PM_TMR_BLK is no port");
	if (!f->pm_tmr || f->pm_tmr >= 0x10000)
		return;
	u32 t0 = pm_timer(f->pm_tmr);
	for (volatile u32 spin = 0; spin < 20000; spin++)
		__asm__ __volatile__("pause");
	u32 t1 = pm_timer(f->pm_tmr);
	u32 ticks = (t1 - t0) & 0xFFFFFF;		/* the 24-bit counter may have wrapped once */
	puts("acpi-pm: timer ");
	put_hex(t0, 6);
	puts(" -> ");
	put_hex(t1, 6);
	puts(", advanced ");
	put_dec(ticks);
	puts(" ticks\n");
	check(ticks > 0, FAIL_PM, "acpi-pm: the PM timer did not advance");
}

/* ---- unassigned I/O: all ones in, writes dropped --------------------------------------------- */
/* Ports: all ones at every width, as on QEMU (ioport.c unassigned_io_read). */
static void unassigned(void)
{
	if (testdev_bar0 && UNASSIGNED_MMIO >= testdev_bar0 && UNASSIGNED_MMIO < testdev_bar0 + 4096) {
		fail(FAIL_UNASSIGNED, "unassigned: the MMIO address chosen is the pci-testdev's BAR0");
		return;
	}
	u32 ports = 0, mmio = 0, first_mmio = 0;
	for (int round = 0; round < 2; round++) {	/* before and after the writes */
		u8 b = pykvm_inb(UNASSIGNED_PORT);
		u16 w = pykvm_inw(UNASSIGNED_PORT);
		u32 l = pykvm_inl(UNASSIGNED_PORT);
		u8 mb = mmio_read8(UNASSIGNED_MMIO);
		u16 mw = mmio_read16(UNASSIGNED_MMIO + 2);
		u32 ml = mmio_read(UNASSIGNED_MMIO + 4);
		ports += b == 0xFF && w == 0xFFFF && l == 0xFFFFFFFFu;
		/* MMIO: all ones (a PCI master abort; pykvm-qemu), or all zeros: QEMU's own unassigned
		 * MMIO (memory.c unassigned_mem_read) reads 0, under TCG and KVM alike. Either way every
		 * width must read the same pattern, before and after the writes (no RAM, no register). */
		mmio += (mb == 0xFF && mw == 0xFFFF && ml == 0xFFFFFFFFu) || (mb == 0 && mw == 0 && ml == 0);
		if (round == 0)
			first_mmio = ml;
		else
			mmio -= ml != first_mmio;
		puts(round ? "unassigned: after writes, port " : "unassigned: port ");
		put_hex_min(UNASSIGNED_PORT, 4);
		puts(" reads ");
		put_hex(b, 2);
		putc(' ');
		put_hex(w, 4);
		putc(' ');
		put_hex(l, 8);
		puts(", mmio ");
		put_hex(UNASSIGNED_MMIO, 8);
		puts(" reads ");
		put_hex(mb, 2);
		putc(' ');
		put_hex(mw, 4);
		putc(' ');
		put_hex(ml, 8);
		putc('\n');
		if (!round) {
			pykvm_outb(UNASSIGNED_PORT, 0x12);
			pykvm_outw(UNASSIGNED_PORT, 0x3456);
			pykvm_outl(UNASSIGNED_PORT, 0x789ABCDEu);
			mmio_write8(UNASSIGNED_MMIO, 0x12);
			mmio_write16(UNASSIGNED_MMIO + 2, 0x3456);
			mmio_write(UNASSIGNED_MMIO + 4, 0x789ABCDEu);
		}
	}
	/* Nothing broke: the host bridge still answers (the UART does, or this line would not come). */
	u32 bridge = conf1_read(0, 0, 0x00);
	puts("unassigned: host bridge still ");
	put_hex_digits(bridge & 0xFFFF, 4);
	putc(':');
	put_hex_digits(bridge >> 16, 4);
	putc('\n');
	check(ports == 2, FAIL_UNASSIGNED, "unassigned: a port read was not all ones");
	check(mmio == 2, FAIL_UNASSIGNED, "unassigned: MMIO did not read all ones (or all zeros) at every width");
	check((bridge & 0xFFFF) != 0xFFFF && bridge != 0, FAIL_UNASSIGNED, "unassigned: the host bridge is gone");
}

/* ACPI S5: SLP_TYP | SLP_EN to PM1a_CNT. Returns only if the machine did not power off (QEMU
 * stops the vCPU soon after, not at once: give it half a second of PM timer). */
static void acpi_poweroff(const struct fadt_info *f)
{
	puts("platform: power off (s5)\n");
	pykvm_outw((u16)f->pm1a_cnt, (u16)((u32)f->s5_typ << 10 | 1u << 13));
	u32 waited = 0, last = pm_timer(f->pm_tmr);
	for (u32 spin = 0; waited < 3579545 / 2 && spin < 100000000; spin++) {
		u32 now = pm_timer(f->pm_tmr);
		waited += (now - last) & 0xFFFFFF;
		last = now;
	}
	fail(FAIL_POWEROFF, "the S5 write to PM1a_CNT_BLK returned");
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

	const char *cmdline = (const char *)info->cmdline;
	if (has_word(cmdline, "uart-irq"))
		wait_for_uart_byte(ioapic);

	if (has_word(cmdline, "pci")) {
		pci_enumerate();
		pci_testdev();
		if (has_word(cmdline, "q35"))
			pci_ecam(rsdp);
	}
	struct fadt_info fadt = {0, 0, 0, 0};
	int have_fadt = (has_word(cmdline, "acpi-pm") || has_word(cmdline, "poweroff")) && rsdp && read_fadt(rsdp, &fadt);
	if (has_word(cmdline, "acpi-pm"))
		acpi_pm(&fadt, have_fadt);
	if (has_word(cmdline, "unassigned"))
		unassigned();
	if (has_word(cmdline, "poweroff")) {
		if (!have_fadt || !fadt.pm1a_cnt || fadt.pm1a_cnt >= 0x10000 || !fadt.pm_tmr || fadt.pm_tmr >= 0x10000)
			fail(FAIL_POWEROFF, "poweroff: no FADT with PM1a_CNT_BLK and PM_TMR_BLK");
		else if (!status)	/* a failure exits through isa-debug-exit with its bits */
			acpi_poweroff(&fadt);
	}

	if (status) {
		puts("platform: fail bits ");
		put_hex_min(status, 3);
		putc('\n');
	}
	u32 value = status ? 0x40 | (status & 0x1F) | (status & ~0x1Fu ? FAIL_QEMU_WORDS : 0) : aps_up + 1;
	puts("platform: exit ");
	put_dec(value);
	putc('\n');
	pykvm_outl(EXIT_PORT, value);
	pykvm_halt_forever();
}
