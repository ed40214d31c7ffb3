/* lifecycle.c - the C reference for scripts/bench_lifecycle.py: what one VM's whole life costs.
 *
 * N times in one process: create a VM, give it guest memory, a vCPU with KVM's supported CPUID,
 * put the vCPU in 64-bit long mode at the guest's entry, run the guest (guests/hello_long.bin) to
 * its DONE(0) on the call port, and close everything, with the ioctls pykvm's Machine makes:
 *
 *   create VM   KVM_CREATE_VM                         (KVM_GET_VCPU_MMAP_SIZE once, as Kvm caches it)
 *   memory      mmap(MAP_PRIVATE | MAP_ANONYMOUS) of MEM_SIZE, KVM_SET_USER_MEMORY_REGION (slot 0, GPA 0)
 *   cpuid       KVM_GET_SUPPORTED_CPUID (asked once, as Kvm.supported_cpuid; a copy each lifecycle),
 *               the APIC id put in (as pykvm.x86.cpuid.guest_cpuid) ...
 *   vcpu        KVM_CREATE_VCPU(0), mmap of its kvm_run (shared)
 *   cpuid       ... KVM_SET_CPUID2
 *   set-up      the system tables and the image written into guest memory; KVM_GET_SREGS,
 *               KVM_SET_SREGS, KVM_GET_SREGS (pykvm checks what KVM kept), KVM_GET_REGS, KVM_SET_REGS
 *   run         KVM_RUN until DONE: console bytes (port 0xE9) kept, DONE on the call port (0xEA)
 *               read with KVM_GET_REGS (the status in EBX)
 *   close       munmap kvm_run, close the vCPU, close the VM, munmap guest memory
 *
 * The guest memory contents and the register values are not built here: bench_lifecycle.py writes
 * what pykvm's long-mode set-up writes (GDT, IDT, TSS, exception stubs, identity page tables, the
 * image) and the kvm_sregs / kvm_regs it loads into SETUP, so that both sides run the same state:
 *
 *   "PYKVMLC1" u64 mem_size  u64 chunks  { u64 gpa  u64 len  len bytes } x chunks
 *   u64 sizeof(struct kvm_sregs)  the sregs   u64 sizeof(struct kvm_regs)  the regs   (little-endian)
 *
 *   cc -O2 -Wall -o lifecycle scripts/lifecycle.c
 *   ./lifecycle scripts/build/lifecycle.setup 1000
 *   create_vm=74012 memory=11873 cpuid=78220 vcpu=86931 setup=21950 run=146310 close=155102 total=574398 exits=22
 *   (one line a lifecycle, nanoseconds, CLOCK_MONOTONIC)
 *
 * Only <linux/kvm.h> and libc. Exit status: 0 ok, 1 a failed ioctl or an unexpected exit,
 * 2 usage or a bad SETUP file, 4 /dev/kvm cannot be opened. Numbers mirror pykvm/x86/layout.py.
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

#define CONSOLE_PORT	0xE9		/* layout.CONSOLE_PORT */
#define CALL_PORT	0xEA		/* layout.CALL_PORT */
#define CALL_DONE	1		/* layout.CALL_DONE */
#define MAX_CHUNKS	64
#define CONSOLE_MAX	4096

static void __attribute__((noreturn, format(printf, 2, 3))) die(int status, const char *fmt, ...)
{
	va_list ap;

	fputs("lifecycle: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

static int xioctl(int fd, unsigned long request, const char *name, void *arg)
{
	int ret = ioctl(fd, request, arg);

	if (ret < 0)
		die(1, "%s: %s", name, strerror(errno));
	return ret;
}

#define IOCTL(fd, req, arg) xioctl((fd), (req), #req, (void *)(arg))

struct chunk {
	uint64_t gpa, len;
	uint8_t *data;
};

static struct {
	uint64_t mem_size;
	unsigned int nchunks;
	struct chunk chunks[MAX_CHUNKS];
	struct kvm_sregs sregs;
	struct kvm_regs regs;
} setup;

static uint64_t read_u64(FILE *f, const char *path)
{
	uint8_t b[8];
	uint64_t v = 0;

	if (fread(b, 1, 8, f) != 8)
		die(2, "%s: truncated", path);
	for (int i = 7; i >= 0; i--)
		v = v << 8 | b[i];
	return v;
}

static void read_exact(FILE *f, const char *path, void *out, uint64_t len)
{
	if (fread(out, 1, len, f) != len)
		die(2, "%s: truncated", path);
}

static void load_setup(const char *path)
{
	FILE *f = fopen(path, "rb");
	char magic[8];

	if (!f)
		die(2, "%s: %s", path, strerror(errno));
	read_exact(f, path, magic, 8);
	if (memcmp(magic, "PYKVMLC1", 8))
		die(2, "%s: not a lifecycle set-up file (written by scripts/bench_lifecycle.py)", path);
	setup.mem_size = read_u64(f, path);
	if (!setup.mem_size || setup.mem_size % 4096)
		die(2, "%s: bad memory size %#llx", path, (unsigned long long)setup.mem_size);
	uint64_t n = read_u64(f, path);
	if (n > MAX_CHUNKS)
		die(2, "%s: %llu chunks, at most %d", path, (unsigned long long)n, MAX_CHUNKS);
	setup.nchunks = n;
	for (unsigned int i = 0; i < setup.nchunks; i++) {
		struct chunk *c = &setup.chunks[i];

		c->gpa = read_u64(f, path);
		c->len = read_u64(f, path);
		if (c->gpa > setup.mem_size || c->len > setup.mem_size - c->gpa)
			die(2, "%s: chunk %u (%#llx + %#llx) is outside guest memory", path, i,
			    (unsigned long long)c->gpa, (unsigned long long)c->len);
		c->data = malloc(c->len ? c->len : 1);
		if (!c->data)
			die(1, "out of memory");
		read_exact(f, path, c->data, c->len);
	}
	if (read_u64(f, path) != sizeof(setup.sregs))
		die(2, "%s: kvm_sregs size differs from <linux/kvm.h>'s %zu", path, sizeof(setup.sregs));
	read_exact(f, path, &setup.sregs, sizeof(setup.sregs));
	if (read_u64(f, path) != sizeof(setup.regs))
		die(2, "%s: kvm_regs size differs from <linux/kvm.h>'s %zu", path, sizeof(setup.regs));
	read_exact(f, path, &setup.regs, sizeof(setup.regs));
	fclose(f);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* KVM_GET_SUPPORTED_CPUID into a buffer that grows until it fits (pykvm's cpuid_list does the same),
 * asked once per open /dev/kvm as pykvm's Kvm.supported_cpuid does; each lifecycle gets a copy. */
static struct kvm_cpuid2 *supported_cpuid(int kvm)
{
	static struct kvm_cpuid2 *cached;
	size_t size;
	struct kvm_cpuid2 *copy;

	for (unsigned int n = 64; !cached && n <= 1u << 16; n *= 2) {
		struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(cpuid->entries[0]));

		if (!cpuid)
			die(1, "out of memory");
		cpuid->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0) {
			cached = cpuid;
			break;
		}
		if (errno != E2BIG)
			die(1, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
		free(cpuid);
	}
	if (!cached)
		die(1, "KVM_GET_SUPPORTED_CPUID: more than 65536 entries");
	size = sizeof(*cached) + cached->nent * sizeof(cached->entries[0]);
	copy = malloc(size);
	if (!copy)
		die(1, "out of memory");
	return memcpy(copy, cached, size);
}

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

enum { CREATE_VM, MEMORY, CPUID, VCPU, SETUP, RUN, CLOSE, PHASES };
static const char *const phase_names[PHASES] = { "create_vm", "memory", "cpuid", "vcpu", "setup", "run", "close" };

/* One lifecycle; its phase times (ns) in t[], the exits to user space returned. */
static unsigned long lifecycle(int kvm, size_t run_size, uint64_t t[PHASES])
{
	uint64_t start = now_ns(), mark = start, stamp;
	unsigned long exits = 0;
	char console[CONSOLE_MAX];
	size_t console_len = 0;

#define PHASE(p) (stamp = now_ns(), t[p] += stamp - mark, mark = stamp)

	int vm = IOCTL(kvm, KVM_CREATE_VM, 0);
	PHASE(CREATE_VM);

	uint8_t *mem = mmap(NULL, setup.mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die(1, "mmap of guest memory: %s", strerror(errno));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = setup.mem_size, .userspace_addr = (uintptr_t)mem,
	};
	IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);
	PHASE(MEMORY);

	struct kvm_cpuid2 *cpuid = supported_cpuid(kvm);
	set_apic_id(cpuid, 0);
	PHASE(CPUID);

	int vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die(1, "mmap of kvm_run: %s", strerror(errno));
	PHASE(VCPU);

	IOCTL(vcpu, KVM_SET_CPUID2, cpuid);
	free(cpuid);
	PHASE(CPUID);

	struct kvm_sregs sregs;
	struct kvm_regs regs;

	for (unsigned int i = 0; i < setup.nchunks; i++)
		memcpy(mem + setup.chunks[i].gpa, setup.chunks[i].data, setup.chunks[i].len);
	IOCTL(vcpu, KVM_GET_SREGS, &sregs);
	IOCTL(vcpu, KVM_SET_SREGS, &setup.sregs);
	IOCTL(vcpu, KVM_GET_SREGS, &sregs);
	if ((sregs.cr0 & setup.sregs.cr0) != setup.sregs.cr0 || (sregs.cr4 & setup.sregs.cr4) != setup.sregs.cr4 ||
	    (sregs.efer & setup.sregs.efer) != setup.sregs.efer || sregs.cr3 != setup.sregs.cr3)
		die(1, "KVM did not keep the long-mode control registers");
	IOCTL(vcpu, KVM_GET_REGS, &regs);
	IOCTL(vcpu, KVM_SET_REGS, &setup.regs);
	PHASE(SETUP);

	for (;;) {
		IOCTL(vcpu, KVM_RUN, 0);
		exits++;
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT)
			die(1, "unexpected exit %u after %lu exits", run->exit_reason, exits);
		uint8_t *data = (uint8_t *)run + run->io.data_offset;

		if (run->io.port == CONSOLE_PORT) {
			if (console_len + run->io.count * run->io.size <= CONSOLE_MAX) {
				memcpy(console + console_len, data, run->io.count * run->io.size);
				console_len += run->io.count * run->io.size;
			}
		} else if (run->io.port == CALL_PORT) {
			uint32_t call;

			memcpy(&call, data, sizeof(call));
			IOCTL(vcpu, KVM_GET_REGS, &regs);
			if (call != CALL_DONE || (uint32_t)regs.rbx != 0)
				die(1, "the guest did not say DONE(0): call %#x, status %#x", call, (uint32_t)regs.rbx);
			break;
		} else {
			die(1, "unexpected port %#x", run->io.port);
		}
	}
	PHASE(RUN);
	if (console_len == 0)
		die(1, "the guest printed nothing");

	munmap(run, run_size);
	close(vcpu);
	close(vm);
	munmap(mem, setup.mem_size);
	PHASE(CLOSE);
#undef PHASE
	return exits;
}

int main(int argc, char **argv)
{
	char *end;
	unsigned long n;

	if (argc != 3)
		die(2, "usage: lifecycle SETUP N");
	errno = 0;
	n = strtoul(argv[2], &end, 0);
	if (errno || *end || !*argv[2] || argv[2][0] == '-' || n == 0)
		die(2, "N must be a positive integer, not '%s'", argv[2]);
	load_setup(argv[1]);

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die(4, "/dev/kvm: %s", strerror(errno));
	int run_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);

	for (unsigned long i = 0; i < n; i++) {
		uint64_t t[PHASES] = { 0 };
		unsigned long exits = lifecycle(kvm, run_size, t);
		uint64_t total = 0;

		for (int p = 0; p < PHASES; p++) {
			printf("%s=%llu ", phase_names[p], (unsigned long long)t[p]);
			total += t[p];
		}
		printf("total=%llu exits=%lu\n", (unsigned long long)total, exits);
	}
	close(kvm);
	return 0;
}
