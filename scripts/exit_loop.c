/* exit_loop.c - the C reference for scripts/bench_exits.py: the cost of one port-I/O exit.
 *
 * Runs guests/build/bench_io.bin the way pykvm's Machine sets it up (1 MiB of RAM at GPA 0, one
 * vCPU with KVM_GET_SUPPORTED_CPUID's CPUID, 16-bit real mode, CS:IP = 0000:1000, SS:SP = 9000:F000),
 * answers the guest's `inl` on BENCH_PORT with N, counts its N `outb` exits on BENCH_PORT and stops
 * at DONE on the call port. The loop from the first KVM_RUN to the DONE exit is timed with
 * CLOCK_MONOTONIC; every KVM_RUN return in it counts as an exit (N + 2: the inl, N outb, DONE).
 *
 *   cc -O2 -Wall -o exit_loop scripts/exit_loop.c
 *   ./exit_loop guests/build/bench_io.bin 20000
 *   exits=20002 io_out=20000 seconds=0.201234567 ns_per_exit=10060.7
 *
 * Only <linux/kvm.h> and libc. Exit status: 0 ok, 1 a failed ioctl or an unexpected exit, 2 usage,
 * 4 /dev/kvm cannot be opened. Numbers mirror pykvm/x86/layout.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE	0x100000	/* layout.MIN_MEM_SIZE */
#define REAL_LOAD	0x1000		/* layout.REAL_LOAD */
#define STACK_TOP	0x9F000		/* layout.STACK_TOP: SS = 0x9000, SP = 0xF000 */
#define CALL_PORT	0xEA		/* layout.CALL_PORT */
#define CALL_DONE	1		/* layout.CALL_DONE */
#define BENCH_PORT	0x700		/* layout.BENCH_PORT */
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

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_cpuid2 *cpuid;
	struct kvm_run *run;
	unsigned long long exits = 0, io_out = 0;
	unsigned long n;
	int kvm, vm, vcpu, mmap_size, done = 0;
	double start, seconds;
	uint8_t *mem;
	char *end;

	if (argc != 3)
		die(2, "usage: exit_loop IMAGE N   (IMAGE: guests/build/bench_io.bin, N: iterations)");
	errno = 0;
	n = strtoul(argv[2], &end, 0);
	if (errno || *end || !*argv[2] || argv[2][0] == '-' || n > 0xFFFFFFFFul)
		die(2, "N must be an integer from 0 to 4294967295, not '%s'", argv[2]);

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
	load_image(argv[1], mem);

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
	IOCTL(vcpu, KVM_SET_REGS, &regs);

	start = now();
	while (!done) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die(1, "KVM_RUN: %s", strerror(errno));
		}
		exits++;
		if (run->exit_reason != KVM_EXIT_IO)
			die(1, "unexpected exit reason %u after %llu exits", run->exit_reason, exits);
		if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == BENCH_PORT) {
			io_out++;
		} else if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == BENCH_PORT && run->io.size == 4) {
			uint32_t value = (uint32_t)n;

			memcpy((uint8_t *)run + run->io.data_offset, &value, 4);
		} else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == CALL_PORT) {
			done = 1;
		} else {
			die(1, "unexpected port I/O: %s port %#x size %u after %llu exits",
			    run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in", run->io.port, run->io.size, exits);
		}
	}
	seconds = now() - start;

	{
		uint32_t call;

		memcpy(&call, (uint8_t *)run + run->io.data_offset, 4);
		IOCTL(vcpu, KVM_GET_REGS, &regs);
		if (run->io.size != 4 || call != CALL_DONE || (uint32_t)regs.rbx != 0)
			die(1, "the guest did not say DONE(0) (call %#x, status %#x)", call, (uint32_t)regs.rbx);
	}
	if (io_out != n)
		die(1, "counted %llu writes to port %#x, expected %lu", io_out, BENCH_PORT, n);

	printf("exits=%llu io_out=%llu seconds=%.9f ns_per_exit=%.1f\n", exits, io_out, seconds,
	       seconds * 1e9 / exits);
	munmap(run, mmap_size);
	munmap(mem, MEM_SIZE);
	close(vcpu);
	close(vm);
	close(kvm);
	return 0;
}
