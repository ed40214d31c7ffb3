/* rng.c - the virtio-rng (entropy) driver of the test kernel (virtio 1.2, 5.4): requestq is queue 0.
 *
 * It asks for 64 bytes (a device may give fewer a request: it asks again for the rest; the
 * first request is split over two descriptors), checks they are not all zeros and prints
 *   rng: 64 bytes 0x<128 hex digits>
 */
#include "pykvm.h"
#include "virtio.h"

#define RNG_BYTES	64

void rng_test(struct vdev *d)
{
	u32 mark = dma_mark();
	virtio_init(d, 0, 1);
	u8 *pool = dma_alloc(RNG_BYTES);
	u32 have = 0, requests = 0;
	while (have < RNG_BYTES) {
		CHECK(requests++ < 64, have, "rng: 64 requests did not give 64 bytes");
		u32 want = RNG_BYTES - have, len;
		struct buf bufs[2] = {{(uptr)pool + have, want / 2}, {(uptr)pool + have + want / 2, want - want / 2}};
		if (want < 2)
			bufs[0].len = want;
		vq_submit_wait(&d->q[0], bufs, 0, want < 2 ? 1 : 2, &len);
		CHECK(len <= want, len, "rng: the device says it wrote more than the buffer holds");
		have += len;
	}
	u32 nonzero = 0;
	for (u32 i = 0; i < RNG_BYTES; i++)
		nonzero |= pool[i];
	puts("rng: 64 bytes 0x");
	static const char hex[] = "0123456789abcdef";
	for (u32 i = 0; i < RNG_BYTES; i++) {
		putc(hex[pool[i] >> 4]);
		putc(hex[pool[i] & 15]);
	}
	puts(" in ");
	put_dec(requests);
	puts(" requests\n");
	CHECK(nonzero, 0, "rng: 64 bytes of zeros");
	put_counts("rng: ", d);
	canary_check("rng");
	virtio_reset(d);
	dma_release(mark);
}
