/* main.c - pykvm's virtio test kernel: a virtio 1.x driver of its own for each virtio-mmio device.
 * Mode: 32-bit protected mode, no paging, entered by a multiboot loader (multiboot/boot.S sets the
 *       stack and calls kmain); needs the in-kernel irqchip (IOAPIC, LAPIC)
 * Load: ELF at GPA 0x100000 (multiboot/kernel.ld)
 * Exits: one PRINT call per line of output (the debug console), MMIO exits for the transport's
 *        registers (QueueNotify writes go to ioeventfds and do not exit), then DONE(0), or
 *        FAIL(line, value, message) at the first mismatch.
 *
 * Command line (multiboot), words separated by spaces:
 *   virtio_mmio.device=SIZE@ADDR:IRQ   a device (Linux's syntax; SIZE 4K or 0x1000), any number
 *   blk                 drive the virtio-blk device (capacity, writes, read back, flush, get-id)
 *   blk-read=S:HH       expect every byte of sector S (which the host filled) to be 0xHH
 *   blk-layout          also requests framed other ways: header+data in one descriptor, data+status
 *   blk-ro              the disk is read-only: a write must fail, VIRTIO_BLK_F_RO must be offered
 *   blk-hang-after-flush  after "blk: flush ok", stop (cli; hlt) so the host can kill pykvm
 *   console             print through virtio-console's transmitq
 *   console-read        then wait for a line on its receiveq and echo it
 *   rng                 read 64 bytes of entropy
 *   net=TARGET/OWN      ARP for TARGET (dotted IPv4) from OWN, wait for the reply
 *   hostile=NAME        a misbehaving driver (hostile.c has the list); may be repeated
 *   soak=N              N rounds of blk write / read back (and a console line each, if there is a
 *                       console device): the long deterministic workload of the snapshot tests
 *   no-event-idx        do not accept VIRTIO_F_EVENT_IDX
 *   no-indirect         do not accept VIRTIO_F_INDIRECT_DESC
 * Devices are probed (and their line printed) whatever the words; those that no word asks for are
 * left alone after the probe.
 */
#include "pykvm.h"
#include "virtio.h"

struct multiboot_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
} __attribute__((packed));

void interrupts_init(void);
void route_device_irq(const struct vdev *d);
u32 spurious_interrupts(void);

u32 ram_end;
int opt_no_event_idx, opt_no_indirect;
static const char *cmdline = "";

/* ---- output: whole lines through the PRINT call (one exit a line, not one a byte) ----------- */
static char line[160];
static u32 line_len;

void flush_line(void)
{
	if (!line_len)
		return;
	line[line_len] = 0;
	pykvm_print(line);
	line_len = 0;
}

void putc(char c)
{
	line[line_len++] = c;
	if (c == '\n' || line_len == sizeof(line) - 1)
		flush_line();
}

void fail_at(u32 line_no, u32 value, const char *msg)
{
	flush_line();
	puts("FAIL: ");
	puts(msg);
	puts(" (value ");
	put_hex_min(value, 1);
	puts(")\n");
	pykvm_fail(line_no, value, msg);
}

/* ---- the freestanding C library gcc may call ----------------------------------------------- */
void *memset(void *p, int c, unsigned int n)
{
	u8 *b = p;
	while (n--)
		*b++ = (u8)c;
	return p;
}

void *memcpy(void *d, const void *s, unsigned int n)
{
	u8 *out = d;
	const u8 *in = s;
	while (n--)
		*out++ = *in++;
	return d;
}

int memcmp(const void *a, const void *b, unsigned int n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

/* ---- the command line ---------------------------------------------------------------------- */
static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

/* The next word at or after s: its start, its length in *n (0: no more words). */
static const char *next_word(const char *s, u32 *n)
{
	while (*s && is_space(*s))
		s++;
	u32 len = 0;
	while (s[len] && !is_space(s[len]))
		len++;
	*n = len;
	return s;
}

static int word_is(const char *w, u32 n, const char *word)
{
	u32 i = 0;
	while (i < n && word[i] && w[i] == word[i])
		i++;
	return i == n && !word[i];
}

static int word_starts(const char *w, u32 n, const char *prefix)
{
	u32 i = 0;
	while (prefix[i] && i < n && w[i] == prefix[i])
		i++;
	return !prefix[i];
}

int has_word(const char *word)
{
	u32 n;
	for (const char *w = next_word(cmdline, &n); n; w = next_word(w + n, &n))
		if (word_is(w, n, word))
			return 1;
	return 0;
}

/* The value of the first word `prefix...` after position `after` (0: from the start). */
const char *next_word_value(const char *prefix, const char *after)
{
	u32 n, plen = 0;
	while (prefix[plen])
		plen++;
	const char *s = cmdline;
	if (after)		/* past the end of the word that `after` points into */
		for (s = after; *s && !is_space(*s); s++)
			;
	for (const char *w = next_word(s, &n); n; w = next_word(w + n, &n))
		if (word_starts(w, n, prefix))
			return w + plen;
	return 0;
}

int value_is(const char *v, const char *name)
{
	while (*name && *v == *name)
		v++, name++;
	return !*name && (!*v || is_space(*v));
}

const char *word_value(const char *prefix)
{
	return next_word_value(prefix, 0);
}

u32 parse_hex(const char **s)
{
	u32 v = 0;
	for (;; (*s)++) {
		char c = **s;
		u32 digit = c >= '0' && c <= '9' ? (u32)(c - '0') : c >= 'a' && c <= 'f' ? (u32)(c - 'a' + 10)
			  : c >= 'A' && c <= 'F' ? (u32)(c - 'A' + 10) : 16;
		if (digit == 16)
			return v;
		v = v * 16 + digit;
	}
}

u32 parse_number(const char **s)
{
	if ((*s)[0] == '0' && ((*s)[1] == 'x' || (*s)[1] == 'X')) {
		*s += 2;
		return parse_hex(s);
	}
	u32 v = 0;
	while (**s >= '0' && **s <= '9')
		v = v * 10 + (u32)(*(*s)++ - '0');
	return v;
}

/* virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>] (Linux's drivers/virtio/virtio_mmio.c). */
static void parse_devices(void)
{
	static const char prefix[] = "virtio_mmio.device=";
	for (const char *v = word_value(prefix); v; v = next_word_value(prefix, v)) {
		const char *s = v;
		u32 size = parse_number(&s);
		if (*s == 'K' || *s == 'k')
			size <<= 10, s++;
		else if (*s == 'M' || *s == 'm')
			size <<= 20, s++;
		CHECK(*s == '@', (u32)(s - cmdline), "virtio: a virtio_mmio.device= entry without '@'");
		s++;
		u32 base = parse_number(&s);
		CHECK(*s == ':', (u32)(s - cmdline), "virtio: a virtio_mmio.device= entry without ':IRQ'");
		s++;
		u32 irq = parse_number(&s);
		CHECK(size >= 0x200 && base && irq > 0 && irq < 24, base, "virtio: a virtio_mmio.device= entry out of range");
		CHECK(ndevices < MAX_DEVICES, ndevices, "virtio: more devices than the kernel has slots for");
		struct vdev *d = &devices[ndevices];
		d->base = base;
		d->irq = irq;
		d->index = ndevices++;
	}
}

static void probe(struct vdev *d)
{
	u32 magic = vreg(d, VIRTIO_MMIO_MAGIC), version = vreg(d, VIRTIO_MMIO_VERSION);
	d->device_id = vreg(d, VIRTIO_MMIO_DEVICE_ID);
	d->name = device_name(d->device_id);
	puts("virtio");
	put_dec(d->index);
	puts(": ");
	put_hex(d->base, 8);
	puts(" irq ");
	put_dec(d->irq);
	puts(" magic ");
	put_hex(magic, 8);
	puts(" version ");
	put_dec(version);
	puts(" device ");
	put_dec(d->device_id);
	puts(" (");
	puts(d->name);
	puts(") vendor ");
	put_hex(vreg(d, VIRTIO_MMIO_VENDOR_ID), 8);
	putc('\n');
	CHECK(magic == VIRTIO_MAGIC, magic, "virtio: no virtio magic at the device's address");
	CHECK(version == 2, version, "virtio: not the version-2 (virtio 1.x) MMIO layout");
	route_device_irq(d);
}

struct vdev *find_device(u32 id)
{
	for (u32 i = 0; i < ndevices; i++)
		if (devices[i].device_id == id)
			return &devices[i];
	return 0;
}

static struct vdev *need_device(u32 id, const char *word)
{
	struct vdev *d = find_device(id);
	if (!d) {
		puts("virtio: the word '");
		puts(word);
		puts("' needs a ");
		puts(device_name(id));
		puts(" device\n");
		FAIL(id, "virtio: no device of the kind a word asks for");
	}
	return d;
}

void kmain(u32 magic, const struct multiboot_info *info)
{
	CHECK(magic == 0x2BADB002u, magic, "virtio: not started by a multiboot loader");
	CHECK(info->flags & 1, info->flags, "virtio: no memory information from the loader");
	ram_end = (info->mem_upper + 1024) << 10;
	if (info->flags & (1u << 2))
		cmdline = (const char *)info->cmdline;
	opt_no_event_idx = has_word("no-event-idx");
	opt_no_indirect = has_word("no-indirect");
	puts("virtio: ram ");
	put_dec(ram_end >> 20);
	puts(" MiB, command line '");
	puts(cmdline);
	puts("'\n");

	interrupts_init();
	parse_devices();
	for (u32 i = 0; i < ndevices; i++)
		probe(&devices[i]);
	puts("virtio: ");
	put_dec(ndevices);
	puts(" devices\n");

	if (has_word("blk") || word_value("blk-read=") || has_word("blk-layout") || has_word("blk-ro"))
		blk_test(need_device(VIRTIO_ID_BLOCK, "blk"));
	if (has_word("console") || has_word("console-read"))
		console_test(need_device(VIRTIO_ID_CONSOLE, "console"));
	if (has_word("rng"))
		rng_test(need_device(VIRTIO_ID_RNG, "rng"));
	const char *net = word_value("net=");
	if (net || has_word("net"))
		net_test(need_device(VIRTIO_ID_NET, "net"), net);
	const char *soak = word_value("soak=");
	if (soak)
		soak_test(parse_number(&soak));
	for (const char *h = word_value("hostile="); h; h = next_word_value("hostile=", h))
		hostile_test(h);

	canary_check("at the end");
	for (u32 i = 0; i < ndevices; i++)
		if (devices[i].nqueues)
			virtio_reset(&devices[i]);
	puts("virtio: ");
	put_dec(ticks);
	puts(" ticks, ");
	put_dec(spurious_interrupts());
	puts(" other interrupts\n");
	puts("virtio: all done\n");
	flush_line();
	pykvm_done(0);
}
