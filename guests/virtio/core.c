/* core.c - the virtio 1.x driver core of the test kernel: the MMIO transport (version 2), feature
 * negotiation, split virtqueues, interrupts (IOAPIC pin -> IDT vector -> InterruptStatus/ACK), the
 * LAPIC tick used for time-outs, and canary-guarded memory for buffers handed to devices.
 */
#include "pykvm.h"
#include "virtio.h"

#define LAPIC			0xFEE00000u
#define LAPIC_EOI		0x0B0
#define LAPIC_SVR		0x0F0
#define LAPIC_LVT_TIMER		0x320
#define LAPIC_TIMER_INIT	0x380
#define LAPIC_TIMER_DIV		0x3E0
#define IOAPIC			0xFEC00000u
#define IRQ_VECTOR_BASE		0x30	/* + device slot */
#define TIMER_VECTOR		0x28
#define SPURIOUS_VECTOR		0xFF
#define TIMER_SLOT		8
#define OTHER_SLOT		9
/* KVM's local APIC counts at 1 GHz (its bus cycle is 1 ns); divided by 16: 62.5 counts a µs. */
#define TIMER_COUNT		(62500u * TICK_MS)
#define POLL_SPINS		300	/* used-ring polls before waiting for the interrupt */

struct vdev devices[MAX_DEVICES];
u32 ndevices;
volatile u32 ticks;
static volatile u32 other_interrupts;

/* ---- interrupts ------------------------------------------------------------------------------ */
struct gate { u16 off_lo, sel; u8 zero, attr; u16 off_hi; } __attribute__((packed));
static struct gate idt[256];
extern const u32 irq_stub_table[10], exception_stub_table[32];

static void set_gate(u32 vector, u32 handler, u16 cs)
{
	idt[vector] = (struct gate){(u16)handler, cs, 0, 0x8E, (u16)(handler >> 16)};
}

void irq_entry(u32 slot)
{
	if (slot < MAX_DEVICES) {
		struct vdev *d = &devices[slot];
		u32 isr = vreg(d, VIRTIO_MMIO_INTERRUPT_STATUS);
		vreg_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
		d->isr_bits |= isr;
		d->interrupts++;
	} else if (slot == TIMER_SLOT) {
		ticks++;
	} else {
		other_interrupts++;
	}
	mmio_write32(LAPIC + LAPIC_EOI, 0);
}

void exception_entry(u32 vector, u32 error_code, u32 eip)
{
	flush_line();
	puts("exception ");
	put_dec(vector);
	puts(" error code ");
	put_hex_min(error_code, 1);
	puts(" at eip ");
	put_hex(eip, 8);
	putc('\n');
	fail_at(__LINE__, vector, "virtio: CPU exception in the test kernel");
}

static void ioapic_route(u32 pin, u32 vector)
{
	mmio_write32(IOAPIC, 0x10 + 2 * pin);
	mmio_write32(IOAPIC + 0x10, vector);	/* fixed, physical, edge, active high, unmasked */
	mmio_write32(IOAPIC, 0x11 + 2 * pin);
	mmio_write32(IOAPIC + 0x10, 0);		/* destination: APIC 0 */
}

void interrupts_init(void)
{
	u16 cs;
	__asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
	for (u32 v = 0; v < 256; v++)
		set_gate(v, irq_stub_table[OTHER_SLOT], cs);
	for (u32 v = 0; v < 32; v++)
		set_gate(v, exception_stub_table[v], cs);
	for (u32 i = 0; i < MAX_DEVICES; i++)
		set_gate(IRQ_VECTOR_BASE + i, irq_stub_table[i], cs);
	set_gate(TIMER_VECTOR, irq_stub_table[TIMER_SLOT], cs);
	struct { u16 limit; u32 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)idt};
	__asm__ __volatile__("lidt %0" : : "m"(idtr));
	pykvm_outb(0x21, 0xFF);		/* mask both 8259s: the IOAPIC delivers */
	pykvm_outb(0xA1, 0xFF);
	mmio_write32(LAPIC + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0x3);			/* divide by 16 */
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, (1u << 17) | TIMER_VECTOR);	/* periodic */
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, TIMER_COUNT);
}

void route_device_irq(const struct vdev *d)
{
	ioapic_route(d->irq, IRQ_VECTOR_BASE + d->index);
}

/* Interrupts are on only here; STI's shadow covers the HLT, so an interrupt between the caller's
 * check and the HLT still wakes it. */
void idle(void)
{
	__asm__ __volatile__("sti; hlt; cli" : : : "memory");
}

void wait_ticks(u32 n)
{
	u32 start = ticks;
	while (ticks - start < n)
		idle();
}

u32 spurious_interrupts(void)
{
	return other_interrupts;
}

/* ---- buffers with canaries ------------------------------------------------------------------- */
#define POOL_SIZE	(512u << 10)
#define MAX_REGIONS	512
#define GUARD		16
static u8 pool[POOL_SIZE] __attribute__((aligned(4096)));
static struct { u8 *p; u32 n; } regions[MAX_REGIONS];
static u32 nregions, pool_top;

void *dma_alloc(u32 size)
{
	u32 rounded = (size + 15) & ~15u;
	CHECK(nregions < MAX_REGIONS && pool_top + rounded + 2 * GUARD <= POOL_SIZE, size, "virtio: out of buffer memory");
	u8 *p = pool + pool_top + GUARD;
	memset(p - GUARD, CANARY, GUARD);
	memset(p, 0, size);
	memset(p + size, CANARY, rounded - size + GUARD);
	regions[nregions].p = p;
	regions[nregions].n = size;
	nregions++;
	pool_top += rounded + GUARD;
	return p;
}

u32 dma_mark(void)
{
	return nregions;
}

void dma_release(u32 mark)
{
	if (mark >= nregions)
		return;
	pool_top = (u32)(regions[mark].p - GUARD - pool);
	nregions = mark;
}

static int guard_ok(const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (p[i] != CANARY)
			return 0;
	return 1;
}

int canaries_ok(void)
{
	for (u32 i = 0; i < nregions; i++) {
		u32 rounded = (regions[i].n + 15) & ~15u;
		if (!guard_ok(regions[i].p - GUARD, GUARD) ||
		    !guard_ok(regions[i].p + regions[i].n, rounded - regions[i].n + GUARD))
			return 0;
	}
	for (u32 i = 0; i < ndevices; i++)
		for (u32 j = 0; j < devices[i].nqueues; j++)
			if (!queue_tails_ok(&devices[i].q[j]))
				return 0;
	return 1;
}

void canary_check(const char *when)
{
	if (canaries_ok())
		return;
	flush_line();
	puts("virtio: a device wrote outside the buffers it was given (");
	puts(when);
	puts(")\n");
	FAIL(0, "virtio: a device wrote into memory the driver did not offer");
}

/* ---- the transport ----------------------------------------------------------------------------- */
const char *device_name(u32 id)
{
	switch (id) {
	case VIRTIO_ID_NET: return "net";
	case VIRTIO_ID_BLOCK: return "blk";
	case VIRTIO_ID_CONSOLE: return "console";
	case VIRTIO_ID_RNG: return "rng";
	default: return "unknown";
	}
}

u32 virtio_status(const struct vdev *d)
{
	return vreg(d, VIRTIO_MMIO_STATUS);
}

static void set_status(struct vdev *d, u32 bits)
{
	vreg_write(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

void virtio_reset(struct vdev *d)
{
	vreg_write(d, VIRTIO_MMIO_STATUS, 0);
	u32 start = ticks;
	while (virtio_status(d) != 0) {		/* 4.2.3.1: reset is done when Status reads 0 */
		CHECK(ticks - start < MS(2000), virtio_status(d), "virtio: Status did not read 0 after a reset");
		idle();
	}
	d->accepted = 0;	/* the queues' pages and counters stay (canaries are still checked) */
}

static u8 queue_mem[MAX_DEVICES][MAX_QUEUES][3][4096] __attribute__((aligned(4096)));

void virtio_negotiate(struct vdev *d, u64 wanted)
{
	virtio_reset(d);
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);
	vreg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 features = vreg(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vreg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	features |= (u64)vreg(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	d->features = features;
	CHECK(features & BIT(VIRTIO_F_VERSION_1), (u32)(features >> 32), "virtio: the device does not offer VIRTIO_F_VERSION_1");
	wanted |= BIT(VIRTIO_F_VERSION_1);
	if (!opt_no_event_idx)
		wanted |= BIT(VIRTIO_F_EVENT_IDX);
	if (!opt_no_indirect)
		wanted |= BIT(VIRTIO_F_INDIRECT_DESC);
	u64 accepted = features & wanted;
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)accepted);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(accepted >> 32));
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	u32 status = virtio_status(d);
	CHECK(status & VIRTIO_STATUS_FEATURES_OK, status, "virtio: the device cleared FEATURES_OK");
	d->accepted = accepted;
}

static void fill_queue_pages(struct vq *q, u8 (*pages)[4096])
{
	memset(pages, CANARY, 3 * 4096);
	q->desc = (struct vring_desc *)pages[0];
	q->avail = (struct vring_avail *)pages[1];
	q->used = (struct vring_used *)pages[2];
	memset(q->desc, 0, 16u * q->num);
	memset(q->avail, 0, 6u + 2u * q->num);
	memset(q->used, 0, 6u + 8u * q->num);
	for (u16 i = 0; i < q->num; i++) {
		q->desc[i].next = (u16)(i + 1);
		q->in_flight[i] = 0;
	}
	q->free_head = 0;
	q->num_free = q->num;
	q->avail_idx = q->last_used = q->kicked_at = 0;
}

int queue_tails_ok(const struct vq *q)
{
	if (!q->num)
		return 1;
	return guard_ok((const u8 *)q->desc + 16u * q->num, 4096 - 16u * q->num) &&
	       guard_ok((const u8 *)q->avail + 6u + 2u * q->num, 4096 - 6u - 2u * q->num) &&
	       guard_ok((const u8 *)q->used + 6u + 8u * q->num, 4096 - 6u - 8u * q->num);
}

static void set_queue_addresses(struct vdev *d, u32 desc, u32 avail, u32 used)
{
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, avail);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, used);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
}

/* Select queue `index`, size it and fill its pages; the caller writes the addresses and Ready. */
struct vq *virtio_prepare_queue(struct vdev *d, u32 index)
{
	CHECK(index < MAX_QUEUES, index, "virtio: too many queues");
	vreg_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	CHECK(vreg(d, VIRTIO_MMIO_QUEUE_READY) == 0, index, "virtio: a queue is ready before the driver set it up");
	u32 max = vreg(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	CHECK(max != 0, index, "virtio: the device has no such queue (QueueNumMax 0)");
	struct vq *q = &d->q[index];
	q->dev = d;
	q->index = (u16)index;
	q->num = QUEUE_SIZE;
	while (q->num > max)
		q->num >>= 1;
	fill_queue_pages(q, queue_mem[d->index][index]);
	vreg_write(d, VIRTIO_MMIO_QUEUE_NUM, q->num);
	if (d->nqueues <= index)
		d->nqueues = index + 1;
	return q;
}

int virtio_setup_queue(struct vdev *d, u32 index)
{
	struct vq *q = virtio_prepare_queue(d, index);
	set_queue_addresses(d, (u32)q->desc, (u32)q->avail, (u32)q->used);
	vreg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	CHECK(vreg(d, VIRTIO_MMIO_QUEUE_READY) == 1, index, "virtio: QueueReady did not read back 1");
	return 0;
}

/* A queue whose used ring (QueueDevice) is at `used_gpa`, which need not be RAM (hostile.c). */
struct vq *virtio_setup_queue_at(struct vdev *d, u32 index, u32 used_gpa)
{
	struct vq *q = virtio_prepare_queue(d, index);
	set_queue_addresses(d, (u32)q->desc, (u32)q->avail, used_gpa);
	vreg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	return q;
}

void virtio_driver_ok(struct vdev *d)
{
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

void virtio_init(struct vdev *d, u64 wanted, u32 nqueues)
{
	virtio_negotiate(d, wanted);
	for (u32 i = 0; i < nqueues; i++)
		virtio_setup_queue(d, i);
	virtio_driver_ok(d);
	u32 status = virtio_status(d);
	CHECK(!(status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)), status, "virtio: the device needs a reset right after DRIVER_OK");
}

/* Device-specific configuration (4.2.2.2): natural widths, 64-bit fields as two 32-bit reads
 * inside a ConfigGeneration check. */
u8 virtio_config8(const struct vdev *d, u32 off)
{
	return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

u16 virtio_config16(const struct vdev *d, u32 off)
{
	return *(volatile u16 *)(d->base + VIRTIO_MMIO_CONFIG + off);
}

u32 virtio_config32(const struct vdev *d, u32 off)
{
	return vreg(d, VIRTIO_MMIO_CONFIG + off);
}

u64 virtio_config64(const struct vdev *d, u32 off)
{
	u32 gen = 0, lo, hi, tries = 0;
	do {
		CHECK(tries++ < 100, gen, "virtio: ConfigGeneration never settled");
		gen = vreg(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_config32(d, off);
		hi = virtio_config32(d, off + 4);
	} while (gen != vreg(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

/* ---- split virtqueues (2.7) ------------------------------------------------------------------- */
static int has_event_idx(const struct vq *q)
{
	return (q->dev->accepted & BIT(VIRTIO_F_EVENT_IDX)) != 0;
}

static volatile u16 *used_event(struct vq *q)
{
	return &q->avail->ring[q->num];
}

static volatile u16 *avail_event(struct vq *q)
{
	return (volatile u16 *)&q->used->ring[q->num];
}

void vq_publish(struct vq *q, u16 head)
{
	q->avail->ring[q->avail_idx % q->num] = head;
	q->in_flight[head] = 1;
	barrier();		/* the ring entry before the index that makes it visible */
	q->avail_idx++;
	*(volatile u16 *)&q->avail->idx = q->avail_idx;
}

int vq_add(struct vq *q, const struct buf *bufs, u32 out, u32 in)
{
	u32 n = out + in;
	if (n == 0 || n > q->num_free)
		return -1;
	u16 head = q->free_head, idx = head, last = head;
	for (u32 i = 0; i < n; i++) {
		struct vring_desc *d = &q->desc[idx];
		d->addr = bufs[i].addr;
		d->len = bufs[i].len;
		d->flags = (u16)((i >= out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
		last = idx;
		idx = d->next;		/* the free list's link is the chain's link */
	}
	q->free_head = q->desc[last].next;
	q->num_free = (u16)(q->num_free - n);
	q->chain_len[head] = (u16)n;
	vq_publish(q, head);
	return head;
}

int vq_add_indirect(struct vq *q, struct vring_desc *table, const struct buf *bufs, u32 out, u32 in)
{
	u32 n = out + in;
	if (!q->num_free)
		return -1;
	for (u32 i = 0; i < n; i++) {
		table[i].addr = bufs[i].addr;
		table[i].len = bufs[i].len;
		table[i].flags = (u16)((i >= out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
		table[i].next = (u16)(i + 1 < n ? i + 1 : 0);
	}
	u16 head = q->free_head;
	q->desc[head].addr = (uptr)table;
	q->desc[head].len = 16u * n;
	q->desc[head].flags = VRING_DESC_F_INDIRECT;
	q->free_head = q->desc[head].next;
	q->num_free--;
	q->chain_len[head] = 1;
	vq_publish(q, head);
	return head;
}

void vq_free_chain(struct vq *q, u16 head)
{
	u16 idx = head;
	for (u16 i = 1; i < q->chain_len[head]; i++)
		idx = q->desc[idx].next;
	q->desc[idx].next = q->free_head;
	q->free_head = head;
	q->num_free = (u16)(q->num_free + q->chain_len[head]);
	q->in_flight[head] = 0;
}

void vq_kick(struct vq *q)
{
	mb();			/* the avail idx before the device's avail_event / used flags */
	q->irq_mark = q->dev->interrupts;
	u16 new_idx = q->avail_idx, old_idx = q->kicked_at;
	int need;
	if (has_event_idx(q)) {
		u16 event = *avail_event(q);
		need = (u16)(new_idx - event - 1) < (u16)(new_idx - old_idx);	/* vring_need_event */
	} else {
		need = !(*(volatile u16 *)&q->used->flags & VRING_USED_F_NO_NOTIFY);
	}
	q->kicked_at = new_idx;
	if (need) {
		vreg_write(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
		q->notifies++;
	} else {
		q->notifies_skipped++;
	}
}

int vq_get_used(struct vq *q, u32 *len)
{
	u16 idx = *(volatile u16 *)&q->used->idx;
	if (idx == q->last_used)
		return -1;
	CHECK((u16)(idx - q->last_used) <= q->num, idx, "virtio: the device moved the used idx by more than the queue size");
	barrier();		/* the element after the index (x86 does not reorder loads) */
	struct vring_used_elem e = q->used->ring[q->last_used % q->num];
	q->last_used++;
	if (has_event_idx(q))
		*used_event(q) = q->last_used;	/* interrupt me for the next one */
	CHECK(e.id < q->num && q->in_flight[e.id], e.id, "virtio: the device used a head the driver did not give it");
	q->completions++;
	if (len)
		*len = e.len;
	return (int)e.id;
}

/* Every other wait polls the used idx; the others (and a poll that found nothing) sleep until the
 * device's interrupt has come and the used ring has the buffer: the driver always asks for an
 * interrupt (used_event = the next used idx, or no VRING_AVAIL_F_NO_INTERRUPT), so the device
 * must send one. Interrupts taken only here: one that came during a poll is still pending in
 * the LAPIC and is counted at the next sleep. */
int vq_wait(struct vq *q, u32 *len, u32 timeout_ticks)
{
	if (q->waits++ & 1)
		for (u32 spin = 0; spin < POLL_SPINS; spin++) {
			int head = vq_get_used(q, len);
			if (head >= 0) {
				q->by_poll++;
				return head;
			}
		}
	/* Counted from the kick, not from this wait: the device may coalesce this queue's interrupt
	 * with one another wait (e.g. the transmit before this receive) already took. */
	u32 start = ticks, interrupts = q->irq_mark;
	for (;;) {
		if (q->dev->interrupts != interrupts) {
			int head = vq_get_used(q, len);
			if (head >= 0) {
				q->by_interrupt++;
				return head;
			}
		}
		if (ticks - start >= timeout_ticks) {
			int head = vq_get_used(q, len);	/* used, but no interrupt came */
			CHECK(head < 0, head, "virtio: the device used a buffer but sent no interrupt");
			return -1;
		}
		idle();
	}
}

int vq_submit_wait(struct vq *q, const struct buf *bufs, u32 out, u32 in, u32 *len)
{
	int head = vq_add(q, bufs, out, in);
	CHECK(head >= 0, q->num_free, "virtio: no free descriptors");
	vq_kick(q);
	int got = vq_wait(q, len, MS(5000));
	CHECK(got >= 0, q->index, "virtio: the device did not answer within 5 s");
	CHECK(got == head, got, "virtio: the device used another head than the one in flight");
	vq_free_chain(q, (u16)got);
	return got;
}

void put_counts(const char *prefix, struct vdev *d)
{
	u32 completions = 0, notifies = 0, skipped = 0, polled = 0, woken = 0;
	for (u32 i = 0; i < d->nqueues; i++) {
		completions += d->q[i].completions;
		woken += d->q[i].by_interrupt;
		notifies += d->q[i].notifies;
		skipped += d->q[i].notifies_skipped;
		polled += d->q[i].by_poll;
	}
	puts(prefix);
	put_dec(completions);
	puts(" used buffers (");
	put_dec(polled);
	puts(" found by polling, ");
	put_dec(woken);
	puts(" after their interrupt), ");
	put_dec(notifies);
	puts(" notifies (");
	put_dec(skipped);
	puts(" suppressed), ");
	put_dec(d->interrupts);
	puts(" interrupts\n");
}
