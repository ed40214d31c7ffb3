/* exit_loop.c - the C reference for scripts/bench_exits.py: the cost of one exit to user space.
 *
 * Runs guests/build/bench_io.bin the way pykvm's Machine sets it up (1 MiB of RAM at GPA 0, one
 * vCPU with KVM_GET_SUPPORTED_CPUID's CPUID, 16-bit real mode, CS:IP = 0000:1000, SS:SP = 9000:F000),
 * with EAX = LOOP (layout.BENCH_LOOP_*: which access the guest repeats) and ECX = N. Every exit is
 * answered as a VMM would, whatever the loop: port writes to BENCH_PORT and MMIO writes to
 * BENCH_MMIO are counted; port and MMIO reads, RDMSR of BENCH_MSR and the hypercall port (KVM_GET_REGS,
 * EAX = the result, KVM_SET_REGS) are answered with REPLY; WRMSR is accepted; HLT is resumed. DONE on
 * the call port ends the run. The loop from the first KVM_RUN to the DONE exit is timed with
 * CLOCK_MONOTONIC. Set-up flags, before IMAGE:
 *
 *   --msr-filter      KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER) and a
 *                     KVM_X86_SET_MSR_FILTER that denies BENCH_MSR (read and write): both exit here
 *   --ioeventfd       KVM_IOEVENTFD: 1-byte writes to BENCH_PORT signal an eventfd (no exit); its
 *                     count is read after the run
 *   --coalesced-mmio  KVM_REGISTER_COALESCED_MMIO on BENCH_MMIO: writes there wait in the ring page
 *                     (KVM_COALESCED_MMIO_PAGE_OFFSET of the vCPU mmap); it is drained at every exit
 *
 *   cc -O2 -Wall -o exit_loop scripts/exit_loop.c
 *   ./exit_loop guests/build/bench_io.bin 1 20000
 *   exits=20001 seconds=0.201234567 io_out=20000 io_in=0 mmio_write=0 mmio_read=0 rdmsr=0 wrmsr=0 hypercall=0 hlt=0 eventfd=0 coalesced=0
 *
 * One line of key=value: `exits` counts every KVM_RUN return in the timed loop (DONE included),
 * the others what was answered. Only <linux/kvm.h> and libc. Exit status: 0 ok, 1 a failed ioctl or
 * an unexpected exit, 2 usage, 4 /dev/kvm cannot be opened or a capability is missing. Numbers
 * mirror pykvm/x86/layout.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE	0x100000	/* layout.MIN_MEM_SIZE */
#define REAL_LOAD	0x1000		/* layout.REAL_LOAD */
#define STACK_TOP	0x9F000		/* layout.STACK_TOP: SS = 0x9000, SP = 0xF000 */
#define CALL_PORT	0xEA		/* layout.CALL_PORT */
#define CALL_DONE	1		/* layout.CALL_DONE */
#define HYPERCALL_PORT	0xEC		/* layout.HYPERCALL_PORT */
#define BENCH_PORT	0x700		/* layout.BENCH_PORT */
#define BENCH_MMIO	0x10F000	/* layout.BENCH_MMIO */
#define BENCH_MSR	0x40001010	/* layout.BENCH_MSR */
#define BENCH_HYPERCALL	0x51		/* layout.BENCH_HYPERCALL */
#define REPLY		0x2A		/* what reads, RDMSR and the hypercall return (bench_exits.REPLY) */
#define PAGE		4096
#define RING_SLOTS	((PAGE - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio))
#define CR0_ET		(1u << 4)
#define RFLAGS_FIXED	(1u << 1)

static void __attribute__((noreturn, format(printf, 2, 3))) die(int status, const char *fmt, ...)
{
	va_list ap;

	fputs("exit_loop: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

/* ioctl() that dies with the request's name and errno on failure. */
static int xioctl(int fd, unsigned long request, const char *name, void *arg)
{
	int ret = ioctl(fd, request, arg);

	if (ret < 0)
		die(1, "%s: %s", name, strerror(errno));
	return ret;
}

#define IOCTL(fd, req, arg) xioctl((fd), (req), #req, (void *)(arg))

static struct kvm_cpuid2 *supported_cpuid(int kvm)
{
	for (unsigned int n = 64; n <= 1u << 16; n *= 2) {
		struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(cpuid->entries[0]));

		if (!cpuid)
			die(1, "out of memory");
		cpuid->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			return cpuid;
		if (errno != E2BIG)
			die(1, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
		free(cpuid);
	}
	die(1, "KVM_GET_SUPPORTED_CPUID: more than 65536 entries");
}

/* As pykvm.x86.cpuid.guest_cpuid: the APIC id (vCPU 0) in leaf 1 EBX[31:24] and leaves 0xB/0x1F EDX. */
static void set_apic_id(struct kvm_cpuid2 *cpuid, unsigned int id)
{
	for (unsigned int i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		if (e->function == 0x1)
			e->ebx = (e->ebx & 0x00FFFFFF) | (id & 0xFF) << 24;
		else if (e->function == 0xB || e->function == 0x1F)
			e->edx = id;
	}
}

static void real_segment(struct kvm_segment *seg, uint16_t selector, int code)
{
	memset(seg, 0, sizeof(*seg));
	seg->base = (uint64_t)selector << 4;
	seg->limit = 0xFFFF;
	seg->selector = selector;
	seg->type = code ? 0xB : 0x3;	/* execute/read or read/write, accessed */
	seg->present = 1;
	seg->s = 1;
}

static size_t load_image(const char *path, uint8_t *mem)
{
	FILE *f = fopen(path, "rb");
	size_t size;

	if (!f)
		die(1, "%s: %s (run `make -C guests`)", path, strerror(errno));
	size = fread(mem + REAL_LOAD, 1, MEM_SIZE - REAL_LOAD, f);
	if (ferror(f))
		die(1, "%s: read error", path);
	if (!feof(f) && fgetc(f) != EOF)
		die(1, "%s: larger than guest memory above %#x", path, REAL_LOAD);
	fclose(f);
	if (size == 0)
		die(1, "%s: empty image", path);
	return size;
}

static double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
		die(1, "clock_gettime: %s", strerror(errno));
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}


/* What the loop answered, by kind; printed as key=value. */
struct counts {
	unsigned long long io_out, io_in, mmio_write, mmio_read, rdmsr, wrmsr, hypercall, hlt, eventfd, coalesced;
};

static unsigned long parse_count(const char *text, const char *what)
{
	unsigned long value;
	char *end;

	errno = 0;
	value = strtoul(text, &end, 0);
	if (errno || *end || !*text || text[0] == '-' || value > 0xFFFFFFFFul)
		die(2, "%s must be an integer from 0 to 4294967295, not '%s'", what, text);
	return value;
}

static void need_cap(int kvm, int cap, const char *name)
{
	if (ioctl(kvm, KVM_CHECK_EXTENSION, cap) <= 0)
		die(4, "this KVM lacks %s", name);
}

/* BENCH_MSR reads and writes exit to user space: the MSR filter denies them. */
static void setup_msr_filter(int kvm, int vm)
{
	static uint8_t deny = 0;	/* bit 0 clear: BENCH_MSR is denied, so it exits */
	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR, .args = { KVM_MSR_EXIT_REASON_FILTER } };
	struct kvm_msr_filter filter;

	need_cap(kvm, KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR");
	need_cap(kvm, KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER");
	IOCTL(vm, KVM_ENABLE_CAP, &cap);
	memset(&filter, 0, sizeof(filter));
	filter.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
	filter.ranges[0] = (struct kvm_msr_filter_range){
		.flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, .nmsrs = 1, .base = BENCH_MSR, .bitmap = &deny,
	};
	IOCTL(vm, KVM_X86_SET_MSR_FILTER, &filter);
}

/* 1-byte writes to BENCH_PORT signal an eventfd in the kernel instead of exiting. */
static int setup_ioeventfd(int kvm, int vm)
{
	struct kvm_ioeventfd ioeventfd;
	int fd;

	need_cap(kvm, KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD");
	fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (fd < 0)
		die(1, "eventfd: %s", strerror(errno));
	memset(&ioeventfd, 0, sizeof(ioeventfd));
	ioeventfd.addr = BENCH_PORT;
	ioeventfd.len = 1;
	ioeventfd.fd = fd;
	ioeventfd.flags = KVM_IOEVENTFD_FLAG_PIO;
	IOCTL(vm, KVM_IOEVENTFD, &ioeventfd);
	return fd;
}

/* Writes to BENCH_MMIO wait in the coalesced ring; returns the ring (in the vCPU's mmap). */
static struct kvm_coalesced_mmio_ring *setup_coalesced(int kvm, int vm, struct kvm_run *run, int mmap_size)
{
	struct kvm_coalesced_mmio_zone zone = { .addr = BENCH_MMIO, .size = 1 };
	int offset = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO);

	if (offset <= 0)
		die(4, "this KVM lacks KVM_CAP_COALESCED_MMIO");
	if (offset != KVM_COALESCED_MMIO_PAGE_OFFSET || (offset + 1) * PAGE > mmap_size)
		die(1, "KVM_CAP_COALESCED_MMIO: the ring is at page %d of a %d-byte mmap", offset, mmap_size);
	IOCTL(vm, KVM_REGISTER_COALESCED_MMIO, &zone);
	return (struct kvm_coalesced_mmio_ring *)((uint8_t *)run + offset * PAGE);
}

/* Take every write waiting in the ring, oldest first, as QEMU does after each KVM_RUN. */
static void drain(struct kvm_coalesced_mmio_ring *ring, struct counts *c)
{
	uint32_t first = ring->first;

	while (first != __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE)) {
		struct kvm_coalesced_mmio *entry = &ring->coalesced_mmio[first];

		if (entry->phys_addr != BENCH_MMIO || entry->len != 1 || entry->pio)
			die(1, "coalesced write to %#llx (%u bytes) is not BENCH_MMIO", (unsigned long long)entry->phys_addr,
			    entry->len);
		c->coalesced++;
		first = (first + 1) % RING_SLOTS;
	}
	__atomic_store_n(&ring->first, first, __ATOMIC_RELEASE);
}

static void answer_io(int vcpu, struct kvm_run *run, struct counts *c, int *done)
{
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	struct kvm_regs regs;

	if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == BENCH_PORT) {
		c->io_out++;
	} else if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == BENCH_PORT) {
		memset(data, 0, (size_t)run->io.size * run->io.count);
		data[0] = REPLY;
		c->io_in++;
	} else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == HYPERCALL_PORT && run->io.size == 4) {
		IOCTL(vcpu, KVM_GET_REGS, &regs);
		if ((uint32_t)regs.rax != BENCH_HYPERCALL)
			die(1, "hypercall %#x, expected %#x", (uint32_t)regs.rax, BENCH_HYPERCALL);
		regs.rax = REPLY;
		IOCTL(vcpu, KVM_SET_REGS, &regs);
		c->hypercall++;
	} else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == CALL_PORT) {
		*done = 1;
	} else {
		die(1, "unexpected port I/O: %s port %#x size %u", run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
		    run->io.port, run->io.size);
	}
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_coalesced_mmio_ring *ring = NULL;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_cpuid2 *cpuid;
	struct kvm_run *run;
	struct counts c = { 0 };
	unsigned long long exits = 0;
	unsigned long loop, n;
	int kvm, vm, vcpu, mmap_size, done = 0, efd = -1;
	int msr_filter = 0, ioeventfd = 0, coalesced = 0, arg = 1;
	double start, seconds;
	uint8_t *mem;

	for (; arg < argc && strncmp(argv[arg], "--", 2) == 0; arg++) {
		if (strcmp(argv[arg], "--msr-filter") == 0)
			msr_filter = 1;
		else if (strcmp(argv[arg], "--ioeventfd") == 0)
			ioeventfd = 1;
		else if (strcmp(argv[arg], "--coalesced-mmio") == 0)
			coalesced = 1;
		else
			die(2, "unknown option '%s'", argv[arg]);
	}
	if (argc - arg != 3)
		die(2, "usage: exit_loop [--msr-filter] [--ioeventfd] [--coalesced-mmio] IMAGE LOOP N\n"
		       "  IMAGE: guests/build/bench_io.bin, LOOP: layout.BENCH_LOOP_* (EAX), N: iterations (ECX)");
	loop = parse_count(argv[arg + 1], "LOOP");
	n = parse_count(argv[arg + 2], "N");

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die(4, "cannot open /dev/kvm: %s", strerror(errno));
	if (IOCTL(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die(1, "KVM_GET_API_VERSION: not %d", KVM_API_VERSION);
	vm = IOCTL(kvm, KVM_CREATE_VM, 0);

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die(1, "mmap of guest memory: %s", strerror(errno));
	region = (struct kvm_userspace_memory_region){
		.slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);
	load_image(argv[arg], mem);

	vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);
	mmap_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if ((size_t)mmap_size < sizeof(*run))
		die(1, "KVM_GET_VCPU_MMAP_SIZE: %d is smaller than struct kvm_run", mmap_size);
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die(1, "mmap of kvm_run: %s", strerror(errno));

	cpuid = supported_cpuid(kvm);
	set_apic_id(cpuid, 0);
	IOCTL(vcpu, KVM_SET_CPUID2, cpuid);
	free(cpuid);

	if (msr_filter)
		setup_msr_filter(kvm, vm);
	if (ioeventfd)
		efd = setup_ioeventfd(kvm, vm);
	if (coalesced)
		ring = setup_coalesced(kvm, vm, run, mmap_size);

	/* 16-bit real mode, as pykvm.x86.modes.setup_sregs / setup_regs do it. */
	IOCTL(vcpu, KVM_GET_SREGS, &sregs);
	real_segment(&sregs.cs, 0, 1);
	real_segment(&sregs.ds, 0, 0);
	real_segment(&sregs.es, 0, 0);
	real_segment(&sregs.fs, 0, 0);
	real_segment(&sregs.gs, 0, 0);
	real_segment(&sregs.ss, STACK_TOP >> 4 & 0xF000, 0);
	sregs.idt.base = 0;
	sregs.idt.limit = 0x3FF;
	sregs.cr0 = CR0_ET;
	sregs.cr4 = 0;
	sregs.efer = 0;
	IOCTL(vcpu, KVM_SET_SREGS, &sregs);
	memset(&regs, 0, sizeof(regs));
	regs.rflags = RFLAGS_FIXED;
	regs.rip = REAL_LOAD;
	regs.rsp = STACK_TOP & 0xFFFF;
	regs.rax = loop;	/* the bench guest's parameters */
	regs.rcx = n;
	IOCTL(vcpu, KVM_SET_REGS, &regs);

	start = now();
	while (!done) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die(1, "KVM_RUN: %s", strerror(errno));
		}
		exits++;
		if (ring)
			drain(ring, &c);
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			answer_io(vcpu, run, &c, &done);
			break;
		case KVM_EXIT_MMIO:
			if (run->mmio.phys_addr != BENCH_MMIO)
				die(1, "unexpected MMIO at %#llx", (unsigned long long)run->mmio.phys_addr);
			if (run->mmio.is_write) {
				c.mmio_write++;
			} else {
				memset(run->mmio.data, 0, sizeof(run->mmio.data));
				run->mmio.data[0] = REPLY;
				c.mmio_read++;
			}
			break;
		case KVM_EXIT_X86_RDMSR:
		case KVM_EXIT_X86_WRMSR:
			if (run->msr.index != BENCH_MSR)
				die(1, "unexpected MSR exit for %#x", run->msr.index);
			run->msr.error = 0;
			if (run->exit_reason == KVM_EXIT_X86_RDMSR) {
				run->msr.data = REPLY;
				c.rdmsr++;
			} else {
				c.wrmsr++;
			}
			break;
		case KVM_EXIT_HLT:
			c.hlt++;
			break;
		default:
			die(1, "unexpected exit reason %u after %llu exits", run->exit_reason, exits);
		}
	}
	seconds = now() - start;

	{
		uint32_t call;

		memcpy(&call, (uint8_t *)run + run->io.data_offset, 4);
		IOCTL(vcpu, KVM_GET_REGS, &regs);
		if (run->io.size != 4 || call != CALL_DONE || (uint32_t)regs.rbx != 0)
			die(1, "the guest did not say DONE(0) (call %#x, EBX %#x, ECX %#x)", call, (uint32_t)regs.rbx,
			    (uint32_t)regs.rcx);
	}
	if (efd >= 0) {
		uint64_t value = 0;

		if (read(efd, &value, sizeof(value)) < 0 && errno != EAGAIN)
			die(1, "read of the eventfd: %s", strerror(errno));
		c.eventfd = value;
		close(efd);
	}

	printf("exits=%llu seconds=%.9f io_out=%llu io_in=%llu mmio_write=%llu mmio_read=%llu rdmsr=%llu "
	       "wrmsr=%llu hypercall=%llu hlt=%llu eventfd=%llu coalesced=%llu\n",
	       exits, seconds, c.io_out, c.io_in, c.mmio_write, c.mmio_read, c.rdmsr, c.wrmsr, c.hypercall, c.hlt,
	       c.eventfd, c.coalesced);
	munmap(run, mmap_size);
	munmap(mem, MEM_SIZE);
	close(vcpu);
	close(vm);
	close(kvm);
	return 0;
}
