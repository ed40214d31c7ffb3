/* blk.c - the virtio-blk driver of the test kernel (virtio 1.2, 5.2).
 *
 * Lines it prints (tests/test_virtio_guest.py reads them):
 *   blk: capacity N sectors, features 0x..., accepted 0x...
 *   blk: sector S reads 0xHH                      (blk-read=S:HH: a sector the host filled)
 *   blk: wrote sector 1                           (header / data / status: three descriptors)
 *   blk: wrote sectors 5-6 (two data descriptors)
 *   blk: wrote sector 9 (indirect)                (only if VIRTIO_F_INDIRECT_DESC was offered)
 *   blk: read back sectors 1, 5-6, 9 ok
 *   blk: wrote and read sector 12 framed as header+data, data+status   (blk-layout)
 *   blk: flush ok | blk: no flush feature
 *   blk: id '...' | blk: get-id unsupported
 *   blk: read past the end: status 1
 *   blk: write refused (read-only)                (blk-ro)
 * The pattern written to sector s, byte i, is blk_pattern(s, i) = (s * 37 + i * 3 + 0x5A) & 0xFF.
 */
#include "pykvm.h"
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX	1
#define VIRTIO_BLK_F_SEG_MAX	2
#define VIRTIO_BLK_F_RO		5
#define VIRTIO_BLK_F_BLK_SIZE	6
#define VIRTIO_BLK_F_FLUSH	9

#define VIRTIO_BLK_ID_BYTES	20


u64 blk_wanted_features(void)
{
	return BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_RO) | BIT(VIRTIO_BLK_F_BLK_SIZE) |
	       BIT(VIRTIO_BLK_F_SEG_MAX) | BIT(VIRTIO_BLK_F_SIZE_MAX);
}

u8 blk_pattern(u32 sector, u32 i)
{
	return (u8)(sector * 37 + i * 3 + 0x5A);
}

static void fill_pattern(u8 *data, u32 sector, u32 count)
{
	for (u32 s = 0; s < count; s++)
		for (u32 i = 0; i < SECTOR; i++)
			data[s * SECTOR + i] = blk_pattern(sector + s, i);
}

static int check_pattern(const u8 *data, u32 sector, u32 count)
{
	for (u32 s = 0; s < count; s++)
		for (u32 i = 0; i < SECTOR; i++)
			if (data[s * SECTOR + i] != blk_pattern(sector + s, i))
				return 0;
	return 1;
}

/* One request; returns the status byte the device wrote (0xFF: it wrote none). `len` bytes of
 * `data` go out (OUT) or come in (IN, GET_ID); used_len gets the used element's len. */
u8 blk_request(struct vdev *d, u32 type, u64 sector, u8 *data, u32 len, enum layout layout, u32 *used_len)
{
	u32 mark = dma_mark();
	struct vq *q = &d->q[0];
	int writes = type != VIRTIO_BLK_T_OUT && type != VIRTIO_BLK_T_FLUSH;	/* the device writes the data */
	struct buf bufs[5];
	u32 out = 0, in = 0;
	u8 *merged = 0;
	u8 *status;
	if (layout == MERGED && len && !writes) {	/* header and data in one device-readable descriptor */
		merged = dma_alloc(sizeof(struct blk_hdr) + len);
		*(struct blk_hdr *)merged = (struct blk_hdr){type, 0, sector};
		memcpy(merged + sizeof(struct blk_hdr), data, len);
		bufs[out++] = (struct buf){(uptr)merged, sizeof(struct blk_hdr) + len};
		status = dma_alloc(1);
		*status = 0xFF;
		bufs[out + in++] = (struct buf){(uptr)status, 1};
	} else if (layout == MERGED && len) {		/* data and status in one device-writable descriptor */
		struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
		*hdr = (struct blk_hdr){type, 0, sector};
		bufs[out++] = (struct buf){(uptr)hdr, sizeof(*hdr)};
		merged = dma_alloc(len + 1);
		merged[len] = 0xFF;
		status = merged + len;
		bufs[out + in++] = (struct buf){(uptr)merged, len + 1};
	} else {
		struct blk_hdr *hdr = dma_alloc(sizeof(*hdr));
		*hdr = (struct blk_hdr){type, 0, sector};
		bufs[out++] = (struct buf){(uptr)hdr, sizeof(*hdr)};
		u32 pieces = layout == DATA2 && len >= 2 ? 2 : 1;
		for (u32 p = 0; len && p < pieces; p++) {
			u32 off = p * (len / pieces), n = p + 1 == pieces ? len - off : len / pieces;
			bufs[writes ? out + in++ : out++] = (struct buf){(uptr)data + off, n};
		}
		status = dma_alloc(1);
		*status = 0xFF;
		bufs[out + in++] = (struct buf){(uptr)status, 1};
	}
	int head;
	if (layout == INDIRECT) {
		struct vring_desc *table = dma_alloc(sizeof(struct vring_desc) * (out + in));
		head = vq_add_indirect(q, table, bufs, out, in);
	} else {
		head = vq_add(q, bufs, out, in);
	}
	CHECK(head >= 0, q->num_free, "blk: no free descriptors");
	vq_kick(q);
	u32 got_len = 0;
	int got = vq_wait(q, &got_len, MS(5000));
	CHECK(got >= 0, type, "blk: the device did not answer a request within 5 s");
	CHECK(got == head, got, "blk: the device used another head than the one in flight");
	vq_free_chain(q, (u16)got);
	if (merged && writes)
		memcpy(data, merged, len);
	u8 result = *status;
	if (used_len)
		*used_len = got_len;
	dma_release(mark);
	return result;
}

/* A request that must succeed, with the used length the spec asks for (2.7.8: the bytes written). */
static void blk_ok(struct vdev *d, u32 type, u64 sector, u8 *data, u32 len, enum layout layout, const char *what)
{
	u32 used_len;
	u8 status = blk_request(d, type, sector, data, len, layout, &used_len);
	if (status != VIRTIO_BLK_S_OK) {
		puts("blk: ");
		puts(what);
		puts(": status ");
		put_dec(status);
		putc('\n');
		FAIL(status, "blk: a request failed");
	}
	u32 expected = type == VIRTIO_BLK_T_IN ? len + 1 : 1;
	if (type != VIRTIO_BLK_T_GET_ID && used_len != expected) {
		puts("blk: ");
		puts(what);
		puts(": used len ");
		put_dec(used_len);
		puts(", expected ");
		put_dec(expected);
		putc('\n');
		FAIL(used_len, "blk: the used length is not the bytes the device wrote");
	}
}

static void read_expected(struct vdev *d, const char *arg, u64 capacity)
{
	u32 sector = parse_number(&arg);
	CHECK(*arg == ':', sector, "blk: blk-read=SECTOR:HEXBYTE");
	arg++;
	u32 byte = parse_hex(&arg);
	CHECK(sector < capacity, sector, "blk: blk-read= names a sector past the end");
	u8 *data = dma_alloc(SECTOR);
	blk_ok(d, VIRTIO_BLK_T_IN, sector, data, SECTOR, SPLIT3, "read");
	for (u32 i = 0; i < SECTOR; i++)
		if (data[i] != (u8)byte) {
			puts("blk: sector ");
			put_dec(sector);
			puts(" byte ");
			put_dec(i);
			puts(" reads ");
			put_hex(data[i], 2);
			putc('\n');
			FAIL(data[i], "blk: the sector the host filled reads otherwise");
		}
	puts("blk: sector ");
	put_dec(sector);
	puts(" reads ");
	put_hex(byte, 2);
	putc('\n');
}

static void write_and_read(struct vdev *d, int indirect)
{
	u8 *one = dma_alloc(SECTOR), *two = dma_alloc(2 * SECTOR), *nine = dma_alloc(SECTOR);
	fill_pattern(one, 1, 1);
	blk_ok(d, VIRTIO_BLK_T_OUT, 1, one, SECTOR, SPLIT3, "write sector 1");
	puts("blk: wrote sector 1\n");
	fill_pattern(two, 5, 2);
	blk_ok(d, VIRTIO_BLK_T_OUT, 5, two, 2 * SECTOR, DATA2, "write sectors 5-6");
	puts("blk: wrote sectors 5-6 (two data descriptors)\n");
	if (indirect) {
		fill_pattern(nine, 9, 1);
		blk_ok(d, VIRTIO_BLK_T_OUT, 9, nine, SECTOR, INDIRECT, "write sector 9");
		puts("blk: wrote sector 9 (indirect)\n");
	} else {
		puts("blk: no indirect descriptors\n");
	}
	memset(one, 0, SECTOR);
	memset(two, 0, 2 * SECTOR);
	memset(nine, 0, SECTOR);
	blk_ok(d, VIRTIO_BLK_T_IN, 1, one, SECTOR, SPLIT3, "read sector 1");
	CHECK(check_pattern(one, 1, 1), 1, "blk: sector 1 reads back otherwise");
	blk_ok(d, VIRTIO_BLK_T_IN, 5, two, 2 * SECTOR, SPLIT3, "read sectors 5-6");
	CHECK(check_pattern(two, 5, 2), 5, "blk: sectors 5-6 read back otherwise");
	if (indirect) {
		blk_ok(d, VIRTIO_BLK_T_IN, 9, nine, SECTOR, INDIRECT, "read sector 9");
		CHECK(check_pattern(nine, 9, 1), 9, "blk: sector 9 reads back otherwise");
		puts("blk: read back sectors 1, 5-6, 9 ok\n");
	} else {
		puts("blk: read back sectors 1, 5-6 ok\n");
	}
}

static void other_layouts(struct vdev *d)
{
	u8 *data = dma_alloc(SECTOR);
	fill_pattern(data, 12, 1);
	blk_ok(d, VIRTIO_BLK_T_OUT, 12, data, SECTOR, MERGED, "write sector 12 (header+data)");
	memset(data, 0, SECTOR);
	blk_ok(d, VIRTIO_BLK_T_IN, 12, data, SECTOR, MERGED, "read sector 12 (data+status)");
	CHECK(check_pattern(data, 12, 1), 12, "blk: sector 12 reads back otherwise");
	puts("blk: wrote and read sector 12 framed as header+data, data+status\n");
}

void blk_test(struct vdev *d)
{
	u32 mark = dma_mark();
	virtio_init(d, blk_wanted_features(), 1);
	u64 capacity = virtio_config64(d, 0);
	puts("blk: capacity ");
	put_dec((u32)capacity);
	puts(" sectors, features ");
	put_hex_min(d->features, 1);
	puts(", accepted ");
	put_hex_min(d->accepted, 1);
	putc('\n');
	if (d->accepted & BIT(VIRTIO_BLK_F_BLK_SIZE)) {
		puts("blk: block size ");
		put_dec(virtio_config32(d, 20));
		putc('\n');
	}
	CHECK(capacity >= 32 && capacity < (1ull << 32), (u32)capacity, "blk: the test needs a disk of 32 sectors or more");
	int ro = (d->accepted & BIT(VIRTIO_BLK_F_RO)) != 0;
	int indirect = (d->accepted & BIT(VIRTIO_F_INDIRECT_DESC)) != 0;
	CHECK(ro || !has_word("blk-ro"), 0, "blk: blk-ro, but the device does not offer VIRTIO_BLK_F_RO");

	const char *expect = word_value("blk-read=");
	if (expect)
		read_expected(d, expect, capacity);

	if (ro) {
		u8 *data = dma_alloc(SECTOR);
		fill_pattern(data, 1, 1);
		u8 status = blk_request(d, VIRTIO_BLK_T_OUT, 1, data, SECTOR, SPLIT3, 0);
		CHECK(status == VIRTIO_BLK_S_IOERR, status, "blk: a write to a read-only disk did not fail with IOERR");
		puts("blk: write refused (read-only)\n");
	} else {
		write_and_read(d, indirect);
		if (has_word("blk-layout"))
			other_layouts(d);
	}

	if (d->accepted & BIT(VIRTIO_BLK_F_FLUSH)) {
		blk_ok(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0, SPLIT3, "flush");
		puts("blk: flush ok\n");
		if (has_word("blk-hang-after-flush")) {
			puts("blk: hanging after the flush\n");
			for (;;)
				__asm__ __volatile__("cli; hlt");
		}
	} else {
		puts("blk: no flush feature\n");
	}

	u8 *id = dma_alloc(VIRTIO_BLK_ID_BYTES + 1);
	u8 status = blk_request(d, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES, SPLIT3, 0);
	if (status == VIRTIO_BLK_S_OK) {
		id[VIRTIO_BLK_ID_BYTES] = 0;
		puts("blk: id '");
		put_text((const char *)id, VIRTIO_BLK_ID_BYTES);
		puts("'\n");
	} else {
		CHECK(status == VIRTIO_BLK_S_UNSUPP, status, "blk: GET_ID failed otherwise than UNSUPP");
		puts("blk: get-id unsupported\n");
	}

	/* Past the end, and straddling it: both must fail, and nothing may come back as data. */
	u8 *past = dma_alloc(2 * SECTOR);
	memset(past, 0xA5, 2 * SECTOR);
	u8 s1 = blk_request(d, VIRTIO_BLK_T_IN, capacity, past, SECTOR, SPLIT3, 0);
	CHECK(s1 == VIRTIO_BLK_S_IOERR, s1, "blk: a read past the end did not fail with IOERR");
	u8 s2 = blk_request(d, VIRTIO_BLK_T_IN, capacity - 1, past, 2 * SECTOR, SPLIT3, 0);
	CHECK(s2 == VIRTIO_BLK_S_IOERR, s2, "blk: a read across the end did not fail with IOERR");
	puts("blk: read past the end: status ");
	put_dec(s1);
	puts(", across the end: status ");
	put_dec(s2);
	putc('\n');

	put_counts("blk: ", d);
	canary_check("blk");
	virtio_reset(d);
	dma_release(mark);
}
