/* cdefs/net.h - x86-64 declarations of the <linux/if.h> and <linux/virtio_net.h> structures that
 * pykvm's TAP back end (pykvm/virtio/tap.py, pykvm/virtio/net.py) uses.
 *
 * cffi cdef text (ABI mode), as cdefs/kvm.h: the kernel's names and field order. The union of
 * struct ifreq is named ifr_ifru, as <linux/if.h> names it (ifr_flags is a macro for
 * ifr_ifru.ifru_flags there). tests/test_virtio_net.py compiles a C program against the installed
 * headers and checks every size and offset below.
 */

struct ifmap {
	unsigned long mem_start;
	unsigned long mem_end;
	unsigned short base_addr;
	unsigned char irq;
	unsigned char dma;
	unsigned char port;
};

struct ifreq {
	char ifr_name[16];		/* IFNAMSIZ, the terminating NUL included */
	union {
		short ifru_flags;
		int ifru_ivalue;
		int ifru_mtu;
		struct ifmap ifru_map;
		char ifru_newname[16];
		void *ifru_data;
	} ifr_ifru;
};

/* virtio 1.x: every buffer on a virtio-net queue starts with this 12-byte header. */
struct virtio_net_hdr_v1 {
	uint8_t flags;
	uint8_t gso_type;
	uint16_t hdr_len;
	uint16_t gso_size;
	uint16_t csum_start;
	uint16_t csum_offset;
	uint16_t num_buffers;
};
