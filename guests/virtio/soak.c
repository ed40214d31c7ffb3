/* soak.c - soak=N: a long, deterministic workload for snapshot, restore and migration tests.
 *
 * N rounds; round r writes sector s = 8 + r % 40 of the virtio-blk disk with soak_pattern(r, s, i)
 * (its own request: header / data / status, or one indirect descriptor on odd rounds where
 * VIRTIO_F_INDIRECT_DESC was accepted), reads it back into another buffer and compares, then, if
 * there is a virtio-console, writes "soak R sector S\n" through its transmitq, and prints
 * "soak: round R sector S ok" on the debug console. Every request is checked (its status, its used
 * length, the head the device returned), so a request lost or answered twice around a snapshot
 * FAILs here. The disk's end state depends only on N: sector 8 + k holds the pattern of the last
 * round r < N with r % 40 == k. At the end: a flush, "soak: N rounds done", the counts lines.
 */
#include "pykvm.h"
#include "virtio.h"

#define FIRST_SECTOR	8
#define SECTORS		40

static u8 soak_pattern(u32 round, u32 sector, u32 i)
{
	return (u8)(sector * 37 + i * 3 + round * 11 + 0x5A);
}

static u32 put_num(char *out, u32 v)
{
	char tmp[10];
	u32 n = 0, len = 0;
	do
		tmp[n++] = (char)('0' + v % 10);
	while (v /= 10);
	while (n)
		out[len++] = tmp[--n];
	return len;
}

static void console_line(struct vdev *con, u32 round, u32 sector)
{
	u32 mark = dma_mark();
	char *p = dma_alloc(40);
	u32 n = 0;
	const char *a = "soak ", *b = " sector ";
	while (*a)
		p[n++] = *a++;
	n += put_num(p + n, round);
	while (*b)
		p[n++] = *b++;
	n += put_num(p + n, sector);
	p[n++] = '\n';
	struct buf buf = {(uptr)p, n};
	u32 used_len = 1;
	vq_submit_wait(&con->q[1], &buf, 1, 0, &used_len);
	CHECK(used_len == 0, used_len, "soak: the console says it wrote into a transmit buffer");
	dma_release(mark);
}

static void request_ok(struct vdev *d, u32 type, u32 sector, u8 *data, u32 len, enum layout layout, u32 round)
{
	u32 used_len = 0;
	u8 status = blk_request(d, type, sector, data, len, layout, &used_len);
	if (status != VIRTIO_BLK_S_OK) {
		puts("soak: round ");
		put_dec(round);
		puts(": status ");
		put_dec(status);
		putc('\n');
		FAIL(status, "soak: a request failed");
	}
	u32 expected = type == VIRTIO_BLK_T_IN ? len + 1 : 1;
	CHECK(used_len == expected, used_len, "soak: the used length is not the bytes the device wrote");
}

void soak_test(u32 rounds)
{
	struct vdev *blk = find_device(VIRTIO_ID_BLOCK), *con = find_device(VIRTIO_ID_CONSOLE);
	CHECK(blk, 0, "soak: needs a virtio-blk device");
	u32 mark = dma_mark();
	virtio_init(blk, blk_wanted_features(), 1);
	u64 capacity = virtio_config64(blk, 0);
	CHECK(capacity >= FIRST_SECTOR + SECTORS, (u32)capacity, "soak: the disk needs 48 sectors or more");
	CHECK(!(blk->accepted & BIT(5)), 0, "soak: the disk is read-only");
	int indirect = (blk->accepted & BIT(VIRTIO_F_INDIRECT_DESC)) != 0;
	if (con)
		virtio_init(con, 0, 2);
	puts("soak: ");
	put_dec(rounds);
	puts(con ? " rounds on blk and console\n" : " rounds on blk\n");
	u8 *data = dma_alloc(SECTOR), *back = dma_alloc(SECTOR);
	for (u32 r = 0; r < rounds; r++) {
		u32 s = FIRST_SECTOR + r % SECTORS;
		for (u32 i = 0; i < SECTOR; i++)
			data[i] = soak_pattern(r, s, i);
		enum layout layout = indirect && (r & 1) ? INDIRECT : SPLIT3;
		request_ok(blk, VIRTIO_BLK_T_OUT, s, data, SECTOR, layout, r);
		memset(back, 0, SECTOR);
		request_ok(blk, VIRTIO_BLK_T_IN, s, back, SECTOR, layout, r);
		if (memcmp(back, data, SECTOR)) {
			puts("soak: round ");
			put_dec(r);
			puts(" sector ");
			put_dec(s);
			puts(" reads back otherwise\n");
			FAIL(r, "soak: a sector read back otherwise than written");
		}
		if (con)
			console_line(con, r, s);
		puts("soak: round ");
		put_dec(r);
		puts(" sector ");
		put_dec(s);
		puts(" ok\n");
	}
	if (blk->accepted & BIT(9))
		request_ok(blk, VIRTIO_BLK_T_FLUSH, 0, 0, 0, SPLIT3, rounds);
	puts("soak: ");
	put_dec(rounds);
	puts(" rounds done\n");
	put_counts("blk: ", blk);
	if (con)
		put_counts("console: ", con);
	canary_check("soak");
	virtio_reset(blk);
	if (con)
		virtio_reset(con);
	dma_release(mark);
}
