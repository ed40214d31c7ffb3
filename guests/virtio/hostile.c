/* hostile.c - a misbehaving virtio driver: the harness for hostile-driver tests.
 *
 * hostile=NAME does something the virtio spec forbids a driver to do, then looks at what the
 * device did: used the request with an error in its status byte, set DEVICE_NEEDS_RESET (0x40) in
 * Status, or used nothing. Then it resets the device, sets it up again and checks that it works.
 * It prints
 *   hostile NAME: device answered <what>[ (<case>)]      one line a case
 *   hostile NAME: device works after a reset
 * and FAILs only if the device did something forbidden: wrote memory it was not offered (canary
 * bytes around every buffer and after every ring), wrote a device-readable buffer, wrote after its
 * reset completed, or reported success for a request it cannot have carried out.
 *
 * The cases drive the virtio-blk device (sector 20 is the one the bad writes aim at: the host
 * checks it is unchanged), except `random`, which drives the device hostile-on=KIND names
 * (blk, console, rng, net; default blk):
 *   desc-outside-ram    a data buffer beyond RAM (read into it, write from it), a header beyond RAM
 *   desc-loop           a chain whose last descriptor points back to the first; the same in an
 *                       indirect table (if offered)
 *   oversized-len       a data descriptor of length 0xFFFFFFFF (read, and write to sector 20)
 *   used-ring-outside   QueueDevice (the used ring) beyond RAM
 *   reset-mid-request   Status = 0 right after a notify; nothing may change once Status reads 0
 *   avail-idx-jump      the avail idx moved 1000 past the last one (more than the queue holds)
 *   bad-queue-size      QueueNum above QueueNumMax and not a power of 2
 *   notify-bad-queue    QueueNotify with queues the device does not have
 *   indirect-nested     an indirect descriptor inside an indirect table
 *   write-to-readable   a read (IN) whose data descriptor is device-readable (it must stay unwritten;
 *                       the device may fail the request or read 0 sectors)
 *   random              rounds=N (default 40) chains of random descriptors, seed=N (default 1):
 *                       addresses in a scratch buffer or beyond RAM, random lengths, flags, nexts
 */
#include "pykvm.h"
#include "virtio.h"

#define OUTSIDE		(ram_end + 0x100000u)	/* above RAM, below the MMIO window */
#define WAIT_MS		300
#define BAD_SECTOR	20

struct observed {
	u32 used;		/* how far the used idx moved */
	u32 used_len;
	u8 status_byte;
	u32 dev_status;
};

static const char *hname;
static struct vdev *target;

static struct vdev *blk_device(void)
{
	struct vdev *d = find_device(VIRTIO_ID_BLOCK);
	CHECK(d, 0, "hostile: these cases need a blk device");
	return d;
}

static void init_blk(struct vdev *d)
{
	virtio_init(d, blk_wanted_features(), 1);
}

static void raw_desc(struct vq *q, u16 i, uptr addr, u32 len, u16 flags, u16 next)
{
	q->desc[i] = (struct vring_desc){addr, len, flags, next};
}

static void raw_table(struct vring_desc *t, u16 i, uptr addr, u32 len, u16 flags, u16 next)
{
	t[i] = (struct vring_desc){addr, len, flags, next};
}

/* Notify queue q after putting `head` in the avail ring, then watch for `ms`. */
static void submit_raw(struct vq *q, u16 head)
{
	vq_publish(q, head);
	vq_kick(q);
}

static void observe(struct vq *q, volatile u8 *status_byte, u32 ms, struct observed *o)
{
	u16 start = q->last_used;
	u32 t0 = ticks;
	u32 status = 0;
	u16 idx = start;
	for (;;) {
		idx = *(volatile u16 *)&q->used->idx;
		status = virtio_status(q->dev);
		if (idx != start || (status & VIRTIO_STATUS_NEEDS_RESET) || ticks - t0 >= MS(ms))
			break;
		idle();
	}
	o->used = (u16)(idx - start);
	o->used_len = o->used ? q->used->ring[start % q->num].len : 0;
	o->status_byte = status_byte ? *status_byte : 0xFF;
	o->dev_status = status;
}

static void put_answer(const struct observed *o, const char *what, int must_fail)
{
	puts("hostile ");
	puts(hname);
	puts(": device answered ");
	if (o->dev_status & VIRTIO_STATUS_NEEDS_RESET)
		puts("DEVICE_NEEDS_RESET");
	if (o->used) {
		if (o->dev_status & VIRTIO_STATUS_NEEDS_RESET)
			puts(", ");
		switch (o->status_byte) {
		case VIRTIO_BLK_S_OK: puts("status OK"); break;
		case VIRTIO_BLK_S_IOERR: puts("IOERR"); break;
		case VIRTIO_BLK_S_UNSUPP: puts("UNSUPP"); break;
		case 0xFF: puts("used, no status byte"); break;
		default: puts("status "); put_dec(o->status_byte);
		}
		puts(" (used len ");
		put_dec(o->used_len);
		putc(')');
	} else if (!(o->dev_status & VIRTIO_STATUS_NEEDS_RESET)) {
		puts("nothing used");
	}
	if (what) {
		puts(" (");
		puts(what);
		putc(')');
	}
	putc('\n');
	if (must_fail && o->used && o->status_byte == VIRTIO_BLK_S_OK)
		FAIL(0, "hostile: the device reported success for a request it cannot have carried out");
	canary_check(hname);
}

/* Reset, set up again, and a read and a write that must work (the write to sector 21). */
static void works_after_reset(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	u8 *data = dma_alloc(SECTOR);
	u32 used_len;
	u8 s = blk_request(d, VIRTIO_BLK_T_IN, 0, data, SECTOR, SPLIT3, &used_len);
	CHECK(s == VIRTIO_BLK_S_OK && used_len == SECTOR + 1, s, "hostile: the device does not read after a reset");
	for (u32 i = 0; i < SECTOR; i++)
		data[i] = blk_pattern(BAD_SECTOR + 1, i);
	s = blk_request(d, VIRTIO_BLK_T_OUT, BAD_SECTOR + 1, data, SECTOR, SPLIT3, &used_len);
	CHECK(s == VIRTIO_BLK_S_OK, s, "hostile: the device does not write after a reset");
	memset(data, 0, SECTOR);
	s = blk_request(d, VIRTIO_BLK_T_IN, BAD_SECTOR + 1, data, SECTOR, SPLIT3, &used_len);
	CHECK(s == VIRTIO_BLK_S_OK, s, "hostile: the device does not read back after a reset");
	for (u32 i = 0; i < SECTOR; i++)
		CHECK(data[i] == blk_pattern(BAD_SECTOR + 1, i), i, "hostile: after a reset, sector 21 reads back otherwise");
	canary_check(hname);
	dma_release(mark);
}

/* A three-descriptor blk request with each part's address and length given. */
static void blk_chain(struct vq *q, struct blk_hdr *hdr, u32 type, u64 sector, uptr data, u32 len, u8 *status)
{
	*hdr = (struct blk_hdr){type, 0, sector};
	*status = 0xFF;
	u16 wflag = type == VIRTIO_BLK_T_OUT ? 0 : VRING_DESC_F_WRITE;
	raw_desc(q, 0, (uptr)hdr, sizeof(*hdr), VRING_DESC_F_NEXT, 1);
	raw_desc(q, 1, data, len, (u16)(wflag | VRING_DESC_F_NEXT), 2);
	raw_desc(q, 2, (uptr)status, 1, VRING_DESC_F_WRITE, 0);
}

static void one_bad_request(struct vdev *d, u32 type, u64 sector, uptr data, u32 len, const char *what, uptr hdr_at)
{
	u32 mark = dma_mark();
	init_blk(d);
	struct vq *q = &d->q[0];
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *status = dma_alloc(1);
	blk_chain(q, hdr, type, sector, data, len, status);
	if (hdr_at)
		q->desc[0].addr = hdr_at;
	submit_raw(q, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);
	put_answer(&o, what, 1);
	dma_release(mark);
}

static void desc_outside_ram(struct vdev *d)
{
	u8 *data = dma_alloc(SECTOR);
	one_bad_request(d, VIRTIO_BLK_T_IN, 0, OUTSIDE, SECTOR, "read into a buffer beyond RAM", 0);
	one_bad_request(d, VIRTIO_BLK_T_OUT, BAD_SECTOR, OUTSIDE, SECTOR, "write from a buffer beyond RAM", 0);
	one_bad_request(d, VIRTIO_BLK_T_IN, 0, (uptr)data, SECTOR, "header beyond RAM", OUTSIDE);
	one_bad_request(d, VIRTIO_BLK_T_IN, 0, ram_end - SECTOR / 2, SECTOR, "buffer across the end of RAM", 0);
	works_after_reset(d);
}

static void desc_loop(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	struct vq *q = &d->q[0];
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *data = dma_alloc(SECTOR), *status = dma_alloc(1);
	blk_chain(q, hdr, VIRTIO_BLK_T_IN, 0, (uptr)data, SECTOR, status);
	q->desc[2].flags |= VRING_DESC_F_NEXT;	/* status -> header: a loop */
	q->desc[2].next = 0;
	submit_raw(q, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);
	put_answer(&o, "chain in the ring", 1);
	if (d->accepted & BIT(VIRTIO_F_INDIRECT_DESC)) {
		init_blk(d);
		q = &d->q[0];
		struct vring_desc *t = dma_alloc(3 * sizeof(*t));
		*status = 0xFF;
		raw_table(t, 0, (uptr)hdr, sizeof(*hdr), VRING_DESC_F_NEXT, 1);
		raw_table(t, 1, (uptr)data, SECTOR, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
		raw_table(t, 2, (uptr)status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
		raw_desc(q, 0, (uptr)t, 3 * sizeof(*t), VRING_DESC_F_INDIRECT, 0);
		submit_raw(q, 0);
		observe(q, status, WAIT_MS, &o);
		put_answer(&o, "chain in an indirect table", 1);
	}
	dma_release(mark);
	works_after_reset(d);
}

static void oversized_len(struct vdev *d)
{
	u8 *data = dma_alloc(SECTOR);
	one_bad_request(d, VIRTIO_BLK_T_IN, 0, (uptr)data, 0xFFFFFFFFu, "read, data len 0xffffffff", 0);
	for (u32 i = 0; i < SECTOR; i++)
		data[i] = 0xEE;
	one_bad_request(d, VIRTIO_BLK_T_OUT, BAD_SECTOR, (uptr)data, 0xFFFFFFFFu, "write, data len 0xffffffff", 0);
	works_after_reset(d);
}

static void used_ring_outside(struct vdev *d)
{
	u32 mark = dma_mark();
	virtio_negotiate(d, blk_wanted_features());
	struct vq *q = virtio_setup_queue_at(d, 0, OUTSIDE);
	virtio_driver_ok(d);
	u32 ready = vreg(d, VIRTIO_MMIO_QUEUE_READY);
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *data = dma_alloc(SECTOR), *status = dma_alloc(1);
	blk_chain(q, hdr, VIRTIO_BLK_T_IN, 0, (uptr)data, SECTOR, status);
	submit_raw(q, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);	/* the used ring in our page stays untouched */
	CHECK(o.used == 0, o.used, "hostile: the device wrote a used ring where QueueDevice does not point");
	puts("hostile used-ring-outside: QueueReady read ");
	put_dec(ready);
	puts(" after the set-up, status byte ");
	put_hex(*status, 2);
	puts(", Status ");
	put_hex(o.dev_status, 2);
	putc('\n');
	put_answer(&o, "used ring beyond RAM", 0);
	dma_release(mark);
	works_after_reset(d);
}

static void reset_mid_request(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	struct vq *q = &d->q[0];
	u32 len = 8 * SECTOR;
	u8 *big = dma_alloc(len);
	u8 *w = dma_alloc(SECTOR);
	for (u32 i = 0; i < SECTOR; i++)
		w[i] = blk_pattern(BAD_SECTOR + 10, i);
	struct blk_hdr *h1 = dma_alloc(sizeof(*h1)), *h2 = dma_alloc(sizeof(*h2));
	u8 *s1 = dma_alloc(1), *s2 = dma_alloc(1);
	*h1 = (struct blk_hdr){VIRTIO_BLK_T_IN, 0, 0};
	*h2 = (struct blk_hdr){VIRTIO_BLK_T_OUT, 0, BAD_SECTOR + 10};	/* sector 30: may or may not land */
	*s1 = *s2 = 0xFF;
	struct buf r[3] = {{(uptr)h1, sizeof(*h1)}, {(uptr)big, len}, {(uptr)s1, 1}};
	struct buf wr[3] = {{(uptr)h2, sizeof(*h2)}, {(uptr)w, SECTOR}, {(uptr)s2, 1}};
	vq_add(q, r, 1, 2);
	vq_add(q, wr, 2, 1);
	vq_kick(q);
	vreg_write(d, VIRTIO_MMIO_STATUS, 0);
	u32 t0 = ticks;
	while (virtio_status(d) != 0) {
		CHECK(ticks - t0 < MS(2000), virtio_status(d), "hostile: Status did not read 0 after the reset");
		idle();
	}
	/* From here the device may not touch the rings or the buffers (2.4: after the reset). */
	u16 idx = *(volatile u16 *)&q->used->idx;
	u8 b1 = *s1, b2 = *s2;
	u32 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum = sum * 31 + big[i];
	wait_ticks(MS(WAIT_MS));
	u32 sum2 = 0;
	for (u32 i = 0; i < len; i++)
		sum2 = sum2 * 31 + big[i];
	CHECK(*(volatile u16 *)&q->used->idx == idx && *s1 == b1 && *s2 == b2 && sum == sum2, idx,
	      "hostile: the device wrote guest memory after its reset completed");
	puts("hostile reset-mid-request: device answered the reset (");
	put_dec(idx);
	puts(" of 2 requests used before Status read 0, status bytes ");
	put_hex(b1, 2);
	putc(' ');
	put_hex(b2, 2);
	puts(")\n");
	canary_check(hname);
	dma_release(mark);
	works_after_reset(d);
}

static void avail_idx_jump(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	struct vq *q = &d->q[0];
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *data = dma_alloc(SECTOR), *status = dma_alloc(1);
	blk_chain(q, hdr, VIRTIO_BLK_T_IN, 0, (uptr)data, SECTOR, status);
	for (u16 i = 0; i < q->num; i++)	/* every slot a harmless read, should the device take them */
		q->avail->ring[i] = 0;
	q->in_flight[0] = 1;
	barrier();
	q->avail_idx = (u16)(q->avail_idx + 1000);
	*(volatile u16 *)&q->avail->idx = q->avail_idx;
	vreg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);
	wait_ticks(MS(50));			/* let a device that takes them all finish */
	o.used = (u16)(*(volatile u16 *)&q->used->idx - q->last_used);
	o.dev_status = virtio_status(d);
	put_answer(&o, "avail idx 1000 ahead", 0);
	if (o.used) {
		puts("hostile avail-idx-jump: the used idx moved by ");
		put_dec(o.used);
		putc('\n');
	}
	dma_release(mark);
	works_after_reset(d);
}

static void bad_queue_size(struct vdev *d)
{
	virtio_negotiate(d, blk_wanted_features());
	struct vq *q = virtio_prepare_queue(d, 0);
	u32 max = vreg(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	u32 bad = max * 2 + 3;
	vreg_write(d, VIRTIO_MMIO_QUEUE_NUM, bad);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)q->desc);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)q->avail);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)q->used);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
	vreg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	u32 ready = vreg(d, VIRTIO_MMIO_QUEUE_READY);
	virtio_driver_ok(d);
	u32 status = virtio_status(d);
	puts("hostile bad-queue-size: device answered ");
	if (status & VIRTIO_STATUS_NEEDS_RESET)
		puts("DEVICE_NEEDS_RESET");
	else if (!ready)
		puts("QueueReady 0");
	else
		puts("nothing (it took the queue)");
	puts(" (QueueNum ");
	put_dec(bad);
	puts(", QueueNumMax ");
	put_dec(max);
	puts(", Status ");
	put_hex(status, 2);
	puts(")\n");
	canary_check(hname);
	works_after_reset(d);
}

static void notify_bad_queue(struct vdev *d)
{
	init_blk(d);
	static const u32 bad[] = {1, 7, 0xFFFF, 0xFFFFFFFFu};
	for (u32 i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		vreg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, bad[i]);
	u32 status = virtio_status(d);
	puts("hostile notify-bad-queue: device answered ");
	puts(status & VIRTIO_STATUS_NEEDS_RESET ? "DEVICE_NEEDS_RESET" : "nothing");
	puts(" (notifies of queues 1, 7, 0xffff, 0xffffffff)\n");
	if (!(status & VIRTIO_STATUS_NEEDS_RESET)) {	/* it must still work without a reset */
		u32 mark = dma_mark();
		u8 *data = dma_alloc(SECTOR);
		u8 s = blk_request(d, VIRTIO_BLK_T_IN, 0, data, SECTOR, SPLIT3, 0);
		CHECK(s == VIRTIO_BLK_S_OK, s, "hostile: after notifies of missing queues the device does not read");
		puts("hostile notify-bad-queue: the device still reads without a reset\n");
		dma_release(mark);
	}
	canary_check(hname);
	works_after_reset(d);
}

static void indirect_nested(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	if (!(d->accepted & BIT(VIRTIO_F_INDIRECT_DESC))) {
		puts("hostile indirect-nested: device answered nothing (no VIRTIO_F_INDIRECT_DESC: skipped)\n");
		dma_release(mark);
		works_after_reset(d);
		return;
	}
	struct vq *q = &d->q[0];
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *data = dma_alloc(SECTOR), *status = dma_alloc(1);
	*hdr = (struct blk_hdr){VIRTIO_BLK_T_IN, 0, 0};
	*status = 0xFF;
	struct vring_desc *inner = dma_alloc(2 * sizeof(*inner)), *outer = dma_alloc(2 * sizeof(*outer));
	raw_table(inner, 0, (uptr)data, SECTOR, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
	raw_table(inner, 1, (uptr)status, 1, VRING_DESC_F_WRITE, 0);
	raw_table(outer, 0, (uptr)hdr, sizeof(*hdr), VRING_DESC_F_NEXT, 1);
	raw_table(outer, 1, (uptr)inner, 2 * sizeof(*inner), VRING_DESC_F_INDIRECT, 0);
	raw_desc(q, 0, (uptr)outer, 2 * sizeof(*outer), VRING_DESC_F_INDIRECT, 0);
	submit_raw(q, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);
	put_answer(&o, "an indirect descriptor in an indirect table", 1);
	dma_release(mark);
	works_after_reset(d);
}

static void write_to_readable(struct vdev *d)
{
	u32 mark = dma_mark();
	init_blk(d);
	struct vq *q = &d->q[0];
	struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
	u8 *data = dma_alloc(SECTOR), *status = dma_alloc(1);
	blk_chain(q, hdr, VIRTIO_BLK_T_IN, 0, (uptr)data, SECTOR, status);
	q->desc[1].flags &= (u16)~VRING_DESC_F_WRITE;
	memset(data, 0x3C, SECTOR);
	submit_raw(q, 0);
	struct observed o;
	observe(q, status, WAIT_MS, &o);
	for (u32 i = 0; i < SECTOR; i++)
		CHECK(data[i] == 0x3C, i, "hostile: the device wrote into a device-readable buffer");
	/* Success is allowed: the device may take the readable bytes as more of the header and read 0
	 * sectors; writing into them is what it must not do. */
	put_answer(&o, "read into a device-readable buffer", 0);
	dma_release(mark);
	works_after_reset(d);
}

/* ---- random descriptor tables ------------------------------------------------------------------ */
static u32 seed = 1;

static u32 rnd(void)
{
	seed ^= seed << 13;	/* xorshift32 */
	seed ^= seed >> 17;
	seed ^= seed << 5;
	return seed;
}

#define SCRATCH		0x4000

static void random_desc(struct vring_desc *d, u8 *scratch, u16 num)
{
	u32 r = rnd();
	u32 off = rnd() % SCRATCH;
	switch (r & 7) {
	case 0: d->addr = OUTSIDE + (rnd() & 0xFFFF); break;
	case 1: d->addr = ram_end - (rnd() & 0xFF); break;
	case 2: d->addr = 0xFFFFFFFFFFFFF000ull | (rnd() & 0xFFF); break;	/* far beyond anything */
	default: d->addr = (uptr)scratch + off; break;
	}
	switch ((r >> 3) & 7) {
	case 0: d->len = 0; break;
	case 1: d->len = 0xFFFFFFFFu - (rnd() & 0xFF); break;
	case 2: d->len = rnd(); break;
	default: d->len = d->addr >= (uptr)scratch && d->addr < (uptr)scratch + SCRATCH
			  ? rnd() % (SCRATCH - off + 1) : rnd() & 0xFFF; break;
	}
	d->flags = (u16)((r >> 6) & 7);		/* NEXT, WRITE, INDIRECT in any combination */
	if (((r >> 9) & 3) == 0)
		d->flags |= (u16)(rnd() & 0xFFF8);
	d->next = (u16)(((r >> 11) & 7) == 0 ? rnd() : rnd() % num);
}

static void random_tables(struct vdev *d, const char *kind)
{
	const char *v = word_value("seed=");
	if (v)
		seed = parse_number(&v) | 1;
	u32 rounds = 40;
	v = word_value("rounds=");
	if (v)
		rounds = parse_number(&v);
	u32 nq = d->device_id == VIRTIO_ID_BLOCK || d->device_id == VIRTIO_ID_RNG ? 1 : 2;
	u64 wanted = d->device_id == VIRTIO_ID_BLOCK ? blk_wanted_features() : 0;
	u32 first_seed = seed;
	u32 mark = dma_mark();
	u8 *scratch = dma_alloc(SCRATCH);
	u32 used = 0, resets = 0, silent = 0;
	virtio_init(d, wanted, nq);
	for (u32 round = 0; round < rounds; round++) {
		struct vq *q = &d->q[rnd() % nq];
		/* The scratch buffer: random bytes, with descriptor-shaped entries that point only into it
		 * or beyond RAM (read as an indirect table, they must not send the device elsewhere). */
		for (u32 i = 0; i < SCRATCH / 16; i++)
			random_desc((struct vring_desc *)scratch + i, scratch, q->num);
		for (u16 i = 0; i < q->num; i++)
			random_desc(&q->desc[i], scratch, q->num);
		u16 heads = (u16)(1 + rnd() % 3);
		for (u16 i = 0; i < heads; i++) {
			u16 head = (u16)(rnd() % q->num);
			q->avail->ring[q->avail_idx % q->num] = head;
			q->avail_idx++;
		}
		barrier();
		*(volatile u16 *)&q->avail->idx = q->avail_idx;
		vreg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
		u16 start = q->last_used;
		u32 t0 = ticks, status;
		u16 idx;
		do {
			idle();
			idx = *(volatile u16 *)&q->used->idx;
			status = virtio_status(d);
		} while (idx == start && !(status & VIRTIO_STATUS_NEEDS_RESET) && ticks - t0 < MS(30));
		canary_check("random descriptors");
		u16 moved = (u16)(idx - start);
		used += moved;
		if (!moved && !(status & VIRTIO_STATUS_NEEDS_RESET))
			silent++;
		if ((status & VIRTIO_STATUS_NEEDS_RESET) || moved > q->num || rnd() % 4 == 0) {
			resets++;
			virtio_init(d, wanted, nq);
		} else {
			q->last_used = idx;
		}
	}
	puts("hostile random: device answered ");
	put_dec(rounds);
	puts(" rounds on ");
	puts(kind);
	puts(": ");
	put_dec(used);
	puts(" buffers used, ");
	put_dec(silent);
	puts(" rounds nothing used, ");
	put_dec(resets);
	puts(" resets (seed ");
	put_dec(first_seed);
	puts(")\n");
	virtio_reset(d);
	dma_release(mark);
	if (d->device_id == VIRTIO_ID_BLOCK) {
		works_after_reset(d);
	} else {
		virtio_init(d, wanted, nq);	/* a request that must work: one buffer in queue 1 or 0 */
		u8 *b = dma_alloc(16);
		memcpy(b, "random: ok\n", 11);
		struct buf one = {(uptr)b, d->device_id == VIRTIO_ID_RNG ? 16u : 11u};
		u32 len;
		if (d->device_id == VIRTIO_ID_RNG)
			vq_submit_wait(&d->q[0], &one, 0, 1, &len);
		else if (d->device_id == VIRTIO_ID_CONSOLE)
			vq_submit_wait(&d->q[1], &one, 1, 0, &len);
		canary_check(hname);
		dma_release(mark);
	}
	virtio_reset(d);
}

static const struct {
	const char *name;
	void (*run)(struct vdev *d);
} cases[] = {
	{"desc-outside-ram", desc_outside_ram},
	{"desc-loop", desc_loop},
	{"oversized-len", oversized_len},
	{"used-ring-outside", used_ring_outside},
	{"reset-mid-request", reset_mid_request},
	{"avail-idx-jump", avail_idx_jump},
	{"bad-queue-size", bad_queue_size},
	{"notify-bad-queue", notify_bad_queue},
	{"indirect-nested", indirect_nested},
	{"write-to-readable", write_to_readable},
};

void hostile_test(const char *name)
{
	static char buf[40];
	u32 n = 0;
	while (name[n] && name[n] != ' ' && n + 1 < sizeof(buf)) {
		buf[n] = name[n];
		n++;
	}
	buf[n] = 0;
	hname = buf;
	u32 mark = dma_mark();
	if (value_is(name, "random")) {
		const char *on = word_value("hostile-on=");
		u32 id = VIRTIO_ID_BLOCK;
		if (on && value_is(on, "rng"))
			id = VIRTIO_ID_RNG;
		else if (on && value_is(on, "console"))
			id = VIRTIO_ID_CONSOLE;
		else if (on && value_is(on, "net"))
			id = VIRTIO_ID_NET;
		target = find_device(id);
		CHECK(target, id, "hostile: no device of the kind hostile-on= names");
		random_tables(target, device_name(id));
	} else {
		u32 i;
		for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
			if (value_is(name, cases[i].name))
				break;
		if (i == sizeof(cases) / sizeof(cases[0])) {
			puts("hostile: no case '");
			puts(buf);
			puts("'\n");
			FAIL(0, "hostile: an unknown hostile= case");
		}
		target = blk_device();
		cases[i].run(target);
		virtio_reset(target);
	}
	puts("hostile ");
	puts(buf);
	puts(": device works after a reset\n");
	canary_check(hname);
	dma_release(mark);
}
