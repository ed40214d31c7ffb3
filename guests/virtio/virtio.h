/* virtio.h - the virtio 1.x definitions (MMIO transport version 2, split virtqueues) and the
 * interfaces between the files of pykvm's virtio test kernel (guests/virtio/).
 *
 * Numbers from the virtio 1.2 specification: 4.2.2 (MMIO register layout), 2.1 (device status),
 * 2.7 (split virtqueues), 6 (reserved feature bits), 5.1-5.4 (net, blk, console, entropy).
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "print.h"

typedef unsigned long uptr;

/* ---- MMIO registers (4.2.2) ----------------------------------------------------------------- */
#define VIRTIO_MMIO_MAGIC		0x000	/* 0x74726976, "virt" */
#define VIRTIO_MMIO_VERSION		0x004	/* 2: the modern (virtio 1.x) layout */
#define VIRTIO_MMIO_DEVICE_ID		0x008
#define VIRTIO_MMIO_VENDOR_ID		0x00C
#define VIRTIO_MMIO_DEVICE_FEATURES	0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL	0x014
#define VIRTIO_MMIO_DRIVER_FEATURES	0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL	0x024
#define VIRTIO_MMIO_QUEUE_SEL		0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX	0x034
#define VIRTIO_MMIO_QUEUE_NUM		0x038
#define VIRTIO_MMIO_QUEUE_READY		0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY	0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS	0x060
#define VIRTIO_MMIO_INTERRUPT_ACK	0x064
#define VIRTIO_MMIO_STATUS		0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW	0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH	0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW	0x090	/* the available ring */
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH	0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW	0x0A0	/* the used ring */
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH	0x0A4
#define VIRTIO_MMIO_CONFIG_GENERATION	0x0FC
#define VIRTIO_MMIO_CONFIG		0x100

#define VIRTIO_MAGIC			0x74726976u

#define VIRTIO_INT_USED_RING		0x1	/* InterruptStatus bits */
#define VIRTIO_INT_CONFIG		0x2

/* ---- device status (2.1) -------------------------------------------------------------------- */
#define VIRTIO_STATUS_ACKNOWLEDGE	0x01
#define VIRTIO_STATUS_DRIVER		0x02
#define VIRTIO_STATUS_DRIVER_OK		0x04
#define VIRTIO_STATUS_FEATURES_OK	0x08
#define VIRTIO_STATUS_NEEDS_RESET	0x40
#define VIRTIO_STATUS_FAILED		0x80

/* ---- feature bits (6) ----------------------------------------------------------------------- */
#define VIRTIO_F_INDIRECT_DESC		28
#define VIRTIO_F_EVENT_IDX		29
#define VIRTIO_F_VERSION_1		32
#define BIT(n)				(1ull << (n))

/* ---- device ids (5) ------------------------------------------------------------------------- */
#define VIRTIO_ID_NET			1
#define VIRTIO_ID_BLOCK			2
#define VIRTIO_ID_CONSOLE		3
#define VIRTIO_ID_RNG			4

/* ---- split virtqueues (2.7) ----------------------------------------------------------------- */
#define VRING_DESC_F_NEXT		1
#define VRING_DESC_F_WRITE		2	/* device-writable (else device-readable) */
#define VRING_DESC_F_INDIRECT		4
#define VRING_AVAIL_F_NO_INTERRUPT	1
#define VRING_USED_F_NO_NOTIFY		1

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[];	/* num entries, then u16 used_event (with VIRTIO_F_EVENT_IDX) */
};

struct vring_used_elem {
	u32 id;
	u32 len;
};

struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[];	/* num entries, then u16 avail_event (with VIRTIO_F_EVENT_IDX) */
};

/* ---- the driver core (core.c) --------------------------------------------------------------- */
#define MAX_DEVICES	8
#define MAX_QUEUES	2
#define QUEUE_SIZE	16	/* what the driver asks for (less if QueueNumMax is less) */

struct vq {
	struct vdev *dev;
	u16 index, num;
	struct vring_desc *desc;	/* page 0 of the queue's three pages */
	struct vring_avail *avail;	/* page 1 */
	struct vring_used *used;	/* page 2 */
	u16 avail_idx;			/* the driver's copy of avail->idx */
	u16 last_used;			/* the used idx the driver has consumed up to */
	u16 free_head, num_free;
	u16 chain_len[QUEUE_SIZE];	/* descriptors of the chain that starts at each head */
	u16 kicked_at;			/* avail idx at the last notify (for the event index) */
	u32 irq_mark;			/* the device's interrupt count when buffers were last made available */
	u8 in_flight[QUEUE_SIZE];	/* heads the device holds */
	u32 waits, completions, by_poll, by_wait, by_interrupt, notifies, notifies_skipped;
};

struct vdev {
	u32 base, irq, index;
	u32 device_id;
	u64 features;			/* what the device offers */
	u64 accepted;			/* what the driver accepted (and FEATURES_OK confirmed) */
	u32 nqueues;
	struct vq q[MAX_QUEUES];
	volatile u32 interrupts;	/* counted by the interrupt handler */
	volatile u32 isr_bits;		/* InterruptStatus bits seen, ORed */
	const char *name;
};

struct buf {
	uptr addr;
	u32 len;
};

extern struct vdev devices[MAX_DEVICES];
extern u32 ndevices;
extern u32 ram_end;			/* first byte past guest RAM (from the multiboot memory information) */
extern volatile u32 ticks;		/* LAPIC timer ticks, TICK_MS apart */
#define TICK_MS		10
#define MS(n)		(((n) + TICK_MS - 1) / TICK_MS)

/* Words that change how the driver negotiates. */
extern int opt_no_event_idx, opt_no_indirect;

static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u32 addr, u32 value) { *(volatile u32 *)addr = value; }
static inline u8 mmio_read8(u32 addr) { return *(volatile u8 *)addr; }
static inline u32 vreg(const struct vdev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vreg_write(const struct vdev *d, u32 reg, u32 value) { mmio_write32(d->base + reg, value); }
/* Ordering between the driver's ring writes and the device thread: x86 keeps stores in order, so a
 * compiler barrier does for writes; a store followed by a load of another location (avail idx,
 * then the device's avail_event or used flags) needs a full barrier (a locked add, as Linux's mb). */
#define barrier()	__asm__ __volatile__("" : : : "memory")
#define mb()		__asm__ __volatile__("lock; addl $0, (%%esp)" : : : "memory", "cc")

const char *device_name(u32 id);
void virtio_negotiate(struct vdev *d, u64 wanted);	/* reset .. FEATURES_OK (FAILs if refused) */
void virtio_init(struct vdev *d, u64 wanted, u32 nqueues);	/* negotiate, queues, DRIVER_OK */
int virtio_setup_queue(struct vdev *d, u32 index);	/* after FEATURES_OK, before DRIVER_OK */
void virtio_driver_ok(struct vdev *d);
void virtio_reset(struct vdev *d);			/* Status = 0, wait until it reads 0 */
u32 virtio_status(const struct vdev *d);
u8 virtio_config8(const struct vdev *d, u32 off);
u16 virtio_config16(const struct vdev *d, u32 off);
u32 virtio_config32(const struct vdev *d, u32 off);
u64 virtio_config64(const struct vdev *d, u32 off);
int vq_add(struct vq *q, const struct buf *bufs, u32 out, u32 in);		/* head, or -1 */
int vq_add_indirect(struct vq *q, struct vring_desc *table, const struct buf *bufs, u32 out, u32 in);
void vq_publish(struct vq *q, u16 head);			/* put head in the avail ring */
void vq_kick(struct vq *q);					/* notify unless the device said not to */
int vq_get_used(struct vq *q, u32 *len);			/* head, or -1 if nothing new */
int vq_wait(struct vq *q, u32 *len, u32 timeout_ticks);	/* poll, then wait for the interrupt */
int vq_submit_wait(struct vq *q, const struct buf *bufs, u32 out, u32 in, u32 *len);
void vq_free_chain(struct vq *q, u16 head);
void wait_ticks(u32 n);					/* sleep (sti; hlt; cli) for n ticks */
void idle(void);					/* one sti; hlt; cli */

/* Memory handed to devices: 16 canary bytes on each side of every buffer (dma.c in core.c). */
#define CANARY		0xC5
void *dma_alloc(u32 size);
u32 dma_mark(void);
void dma_release(u32 mark);			/* free everything allocated after the mark */
int canaries_ok(void);				/* 1: no device wrote outside what it was offered */
void canary_check(const char *when);		/* FAIL if a canary changed */
int queue_tails_ok(const struct vq *q);		/* the queue's pages past its rings untouched */

/* ---- helpers (main.c) ----------------------------------------------------------------------- */
void *memset(void *p, int c, unsigned int n);
void *memcpy(void *d, const void *s, unsigned int n);
int memcmp(const void *a, const void *b, unsigned int n);
void fail_at(u32 line, u32 value, const char *msg) __attribute__((noreturn));
#define FAIL(value, msg)	fail_at(__LINE__, (u32)(value), (msg))
#define CHECK(cond, value, msg)	do { if (!(cond)) FAIL((value), (msg)); } while (0)
void flush_line(void);
struct vdev *find_device(u32 id);
const char *word_value(const char *prefix);	/* the text after `prefix` of the first matching word */
const char *next_word_value(const char *prefix, const char *after);
int has_word(const char *word);
int value_is(const char *value, const char *name);	/* a word's value is exactly name */
u32 parse_number(const char **s);	/* decimal, or hex with 0x */
u32 parse_hex(const char **s);

/* ---- the devices (blk.c, console.c, rng.c, net.c) and the hostile driver (hostile.c) --------- */
#define VIRTIO_BLK_T_IN		0
#define VIRTIO_BLK_T_OUT	1
#define VIRTIO_BLK_T_FLUSH	4
#define VIRTIO_BLK_T_GET_ID	8
#define VIRTIO_BLK_S_OK		0
#define VIRTIO_BLK_S_IOERR	1
#define VIRTIO_BLK_S_UNSUPP	2
#define SECTOR			512
struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};
enum layout { SPLIT3, DATA2, INDIRECT, MERGED };
u8 blk_request(struct vdev *d, u32 type, u64 sector, u8 *data, u32 len, enum layout layout, u32 *used_len);
u8 blk_pattern(u32 sector, u32 i);
struct vq *virtio_setup_queue_at(struct vdev *d, u32 index, u32 used_gpa);
struct vq *virtio_prepare_queue(struct vdev *d, u32 index);	/* QueueSel, QueueNum, pages; no addresses */
void blk_test(struct vdev *d);
void console_test(struct vdev *d);
void rng_test(struct vdev *d);
void net_test(struct vdev *d, const char *arg);
void hostile_test(const char *name);
void soak_test(u32 rounds);
u64 blk_wanted_features(void);
void put_counts(const char *prefix, struct vdev *d);

#endif
