/* console.c - the virtio-console driver of the test kernel (virtio 1.2, 5.3), one port, no
 * VIRTIO_CONSOLE_F_MULTIPORT: receiveq is queue 0, transmitq queue 1.
 *
 * It writes "hello from virtio-console\n" (one descriptor) and "virtio-console: two descriptors\n"
 * (a chain of two) through transmitq. With console-read it prints "console: waiting for input"
 * on the debug console, collects what the device puts in receiveq (buffers posted beforehand) up
 * to a newline, prints "console: got '<line>'" and writes "echo: <line>\n" through transmitq.
 */
#include "pykvm.h"
#include "virtio.h"

#define VIRTIO_CONSOLE_F_SIZE	0
#define RX_BUFS			4
#define RX_BUF_SIZE		64
#define MAX_LINE		120

static u8 *rx_buf[QUEUE_SIZE];

static void tx(struct vdev *d, const char *a, const char *b)
{
	u32 mark = dma_mark();
	struct buf bufs[2];
	u32 n = 0;
	for (const char *s = a; s; s = s == a ? b : 0) {
		u32 len = 0;
		while (s[len])
			len++;
		u8 *p = dma_alloc(len);
		memcpy(p, s, len);
		bufs[n++] = (struct buf){(uptr)p, len};
	}
	u32 used_len;
	vq_submit_wait(&d->q[1], bufs, n, 0, &used_len);
	CHECK(used_len == 0, used_len, "console: the device says it wrote into a transmit buffer");
	dma_release(mark);
}

static void post_rx(struct vq *q, u8 *p)
{
	struct buf b = {(uptr)p, RX_BUF_SIZE};
	memset(p, 0, RX_BUF_SIZE);
	int head = vq_add(q, &b, 0, 1);
	CHECK(head >= 0, 0, "console: no descriptor for a receive buffer");
	rx_buf[head] = p;
}

static void read_line(struct vdev *d)
{
	struct vq *q = &d->q[0];
	static char text[MAX_LINE + 1];
	u32 n = 0;
	int done = 0;
	puts("console: waiting for input\n");
	while (!done) {
		u32 len;
		int head = vq_wait(q, &len, MS(30000));
		CHECK(head >= 0, n, "console: no input within 30 s");
		CHECK(len <= RX_BUF_SIZE, len, "console: the device wrote more than the receive buffer holds");
		u8 *p = rx_buf[head];
		for (u32 i = 0; i < len && !done; i++) {
			if (p[i] == '\n' || p[i] == '\r' || n == MAX_LINE)
				done = 1;
			else
				text[n++] = (char)p[i];
		}
		vq_free_chain(q, (u16)head);
		post_rx(q, p);
		vq_kick(q);
	}
	text[n] = 0;
	puts("console: got '");
	put_text(text, n);
	puts("'\n");
	tx(d, "echo: ", text);
	tx(d, "\n", 0);
}

void console_test(struct vdev *d)
{
	u32 mark = dma_mark();
	virtio_init(d, BIT(VIRTIO_CONSOLE_F_SIZE), 2);
	puts("console: features ");
	put_hex_min(d->features, 1);
	puts(", accepted ");
	put_hex_min(d->accepted, 1);
	if (d->accepted & BIT(VIRTIO_CONSOLE_F_SIZE)) {
		puts(", size ");
		put_dec(virtio_config16(d, 0));
		putc('x');
		put_dec(virtio_config16(d, 2));
	}
	putc('\n');
	struct vq *rxq = &d->q[0];
	u32 nrx = rxq->num < RX_BUFS ? rxq->num : RX_BUFS;
	for (u32 i = 0; i < nrx; i++)
		post_rx(rxq, dma_alloc(RX_BUF_SIZE));
	vq_kick(rxq);
	tx(d, "hello from virtio-console\n", 0);
	tx(d, "virtio-console: ", "two descriptors\n");
	puts("console: wrote 2 lines\n");
	if (has_word("console-read"))
		read_line(d);
	put_counts("console: ", d);
	canary_check("console");
	virtio_reset(d);
	dma_release(mark);
}
