/* net.c - the virtio-net driver of the test kernel (virtio 1.2, 5.1): receiveq1 is queue 0,
 * transmitq1 queue 1; no offloads, no mergeable buffers, so every frame has the 12-byte
 * struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1) in front of it and receive buffers hold 1526 bytes.
 *
 * net=TARGET/OWN (dotted IPv4): broadcast an ARP request who-has TARGET tell OWN, from the MAC in
 * the config space (VIRTIO_NET_F_MAC) or 52:54:00:12:34:56, and wait for the reply on receiveq
 * (buffers posted beforehand); up to 5 requests a second apart. Prints
 *   net: mac xx:xx:xx:xx:xx:xx[, link up|down]
 *   net: arp reply from xx:xx:xx:xx:xx:xx
 */
#include "pykvm.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC	5
#define VIRTIO_NET_F_STATUS	16
#define VIRTIO_NET_S_LINK_UP	1
#define NET_HDR			12
#define RX_BUF			1536
#define RX_BUFS			8

static u8 *rx_buf[QUEUE_SIZE];

static void put_mac(const u8 *mac)
{
	static const char hex[] = "0123456789abcdef";
	for (u32 i = 0; i < 6; i++) {
		if (i)
			putc(':');
		putc(hex[mac[i] >> 4]);
		putc(hex[mac[i] & 15]);
	}
}

static u32 parse_ip(const char **s)
{
	u32 ip = 0;
	for (u32 i = 0; i < 4; i++) {
		if (i) {
			CHECK(**s == '.', i, "net: net=TARGET/OWN takes dotted IPv4 addresses");
			(*s)++;
		}
		u32 part = parse_number(s);
		CHECK(part < 256, part, "net: an IPv4 address part above 255");
		ip = ip << 8 | part;
	}
	return ip;
}

static void put_be32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }
static u32 get_be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

static void post_rx(struct vq *q, u8 *p)
{
	struct buf b = {(uptr)p, RX_BUF};
	int head = vq_add(q, &b, 0, 1);
	CHECK(head >= 0, 0, "net: no descriptor for a receive buffer");
	rx_buf[head] = p;
}

static void send_arp(struct vdev *d, const u8 *mac, u32 own, u32 target)
{
	u32 mark = dma_mark();
	u8 *hdr = dma_alloc(NET_HDR);		/* all zeros: no checksum, no GSO, num_buffers 0 */
	u8 *f = dma_alloc(60);			/* the minimum Ethernet frame, padded */
	memset(f, 0xFF, 6);			/* broadcast */
	memcpy(f + 6, mac, 6);
	f[12] = 0x08, f[13] = 0x06;		/* ARP */
	f[14] = 0, f[15] = 1;			/* Ethernet */
	f[16] = 0x08, f[17] = 0x00;		/* IPv4 */
	f[18] = 6, f[19] = 4;
	f[20] = 0, f[21] = 1;			/* request */
	memcpy(f + 22, mac, 6);
	put_be32(f + 28, own);
	memset(f + 32, 0, 6);
	put_be32(f + 38, target);
	struct buf bufs[2] = {{(uptr)hdr, NET_HDR}, {(uptr)f, 60}};
	vq_submit_wait(&d->q[1], bufs, 2, 0, 0);
	dma_release(mark);
}

void net_test(struct vdev *d, const char *arg)
{
	u32 mark = dma_mark();
	u32 target = 0x0A000202, own = 0x0A00020F;	/* 10.0.2.2, 10.0.2.15 */
	if (arg) {
		target = parse_ip(&arg);
		CHECK(*arg == '/', 0, "net: net=TARGET/OWN");
		arg++;
		own = parse_ip(&arg);
	}
	virtio_init(d, BIT(VIRTIO_NET_F_MAC) | BIT(VIRTIO_NET_F_STATUS), 2);
	u8 mac[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
	if (d->accepted & BIT(VIRTIO_NET_F_MAC))
		for (u32 i = 0; i < 6; i++)
			mac[i] = virtio_config8(d, i);
	puts("net: mac ");
	put_mac(mac);
	if (d->accepted & BIT(VIRTIO_NET_F_STATUS))
		puts(virtio_config16(d, 6) & VIRTIO_NET_S_LINK_UP ? ", link up" : ", link down");
	puts(", features ");
	put_hex_min(d->features, 1);
	putc('\n');
	struct vq *rxq = &d->q[0];
	u32 nrx = rxq->num < RX_BUFS ? rxq->num : RX_BUFS;
	for (u32 i = 0; i < nrx; i++)
		post_rx(rxq, dma_alloc(RX_BUF));
	vq_kick(rxq);
	u32 frames = 0;
	for (u32 attempt = 0; attempt < 5; attempt++) {
		send_arp(d, mac, own, target);
		u32 start = ticks;
		while (ticks - start < MS(1000)) {
			u32 len;
			int head = vq_wait(rxq, &len, MS(1000) - (ticks - start));
			if (head < 0)
				break;
			u8 *p = rx_buf[head];
			frames++;
			CHECK(len <= RX_BUF, len, "net: the device wrote more than the receive buffer holds");
			const u8 *f = p + NET_HDR;
			int reply = len >= NET_HDR + 42 && f[12] == 0x08 && f[13] == 0x06 && f[20] == 0 && f[21] == 2 &&
				    get_be32(f + 28) == target;
			u8 from[6];
			memcpy(from, f + 22, 6);
			vq_free_chain(rxq, (u16)head);
			post_rx(rxq, p);
			vq_kick(rxq);
			if (reply) {
				puts("net: arp reply from ");
				put_mac(from);
				puts(" after ");
				put_dec(attempt + 1);
				puts(" requests, ");
				put_dec(frames);
				puts(" frames received\n");
				put_counts("net: ", d);
				canary_check("net");
				virtio_reset(d);
				dma_release(mark);
				return;
			}
		}
	}
	FAIL(frames, "net: no ARP reply after 5 requests");
}
