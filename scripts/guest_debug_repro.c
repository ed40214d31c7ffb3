/*
 * guest_debug_repro - KVM_SET_GUEST_DEBUG without pykvm: does the host's KVM report
 * a software breakpoint, a hardware breakpoint and single steps as KVM_EXIT_DEBUG?
 *
 *   gcc -O2 -static -o guest_debug_repro scripts/guest_debug_repro.c
 *   ./guest_debug_repro [real|long|user]
 *   make repro-amd          (each mode inside the kvm_amd reference host: scripts/refhost)
 *
 * A VM with 64 KiB of memory and one vCPU at 0x1000 (a new one for each case), in real mode,
 * or in 64-bit mode at CPL0 (as pykvm's default guest) or CPL3, running a few one-byte
 * instructions and HLT (at CPL3 a #GP: the expected HLT exit is then a SHUTDOWN). Each case sets its guest-debug controls, runs the vCPU and compares
 * the exits it sees with what KVM documents (Documentation/virt/kvm/api.rst, KVM_EXIT_DEBUG):
 *
 *   sw      KVM_GUESTDBG_USE_SW_BP, an INT3 at 0x1001:  DEBUG exception 3 at 0x1001
 *   step    KVM_GUESTDBG_SINGLESTEP over 32 NOPs, 100 times: DEBUG exception 1 after each
 *   stepio  the same over nop, out 0x80,al, nop, hlt: DEBUG at 0x1001, the IO exit, then (the
 *           next KVM_RUN completing the OUT) DEBUG at 0x1003, DEBUG at 0x1004, HLT
 *   stephlt the same over nop, hlt, nop, hlt, nop, hlt (not at CPL3): the HLT exit replaces
 *           the step's DEBUG exit (x86.c: kvm_emulate_halt after kvm_skip_emulated_instruction),
 *           so DEBUG at 0x1001, HLT, DEBUG at 0x1003, HLT, DEBUG at 0x1005, HLT
 *   stepemu the same over nop, a write past memory, nop, nop, hlt: KVM's emulator runs the
 *           write, which exits (MMIO) with RIP past it and no step exit of its own, so DEBUG at
 *           0x1001, MMIO, DEBUG at 0x1004, DEBUG at 0x1005, HLT. On VMX/SVM the emulator's
 *           write-back of RFLAGS goes through __kvm_set_rflags (x86.c), which keeps KVM's TF only
 *           at the RIP KVM_SET_GUEST_DEBUG saw: the steps after it are lost
 *   rearmed stepemu with KVM_SET_GUEST_DEBUG issued again before each KVM_RUN (as pykvm's
 *           tracer and gdb stub do): all steps
 *   hw      KVM_GUESTDBG_USE_HW_BP, DR0 = 0x1002, DR7 = L0 (execute): DEBUG exception 1 at 0x1002
 *
 * (Step before hw: a debug register left matching an address may set its DR6 bit on a step,
 * which the SDM allows even for a disabled breakpoint.)
 *
 * Prints one line per exit and one verdict per case; exit status 0 when every case behaved
 * as documented, 1 when one did not, 2 when KVM itself could not be used.
 * It is pykvm's proof that a failure of its gdb stub or tracer on a host is the host's.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE 0x1000

static int kvm, vm, vcpu;
static struct kvm_run *run;
static uint8_t *mem;

static void die(const char *what)
{
    fprintf(stderr, "guest_debug_repro: %s: %s\n", what, strerror(errno));
    exit(2);
}

static const char *reason_name(unsigned r)
{
    switch (r) {
    case KVM_EXIT_IO: return "IO";
    case KVM_EXIT_DEBUG: return "DEBUG";
    case KVM_EXIT_HLT: return "HLT";
    case KVM_EXIT_MMIO: return "MMIO";
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    default: return "other";
    }
}

static enum { REAL, LONG, USER } mode;
static int through_hlt; /* run_exits goes on after a HLT exit */
static uint32_t rearm;   /* guest-debug control run_exits sets again before each KVM_RUN */
static const char *const mode_names[] = {"real", "long", "user"};

/* A fresh vCPU state at CODE with the code copied there: real mode (CS:IP = 0:CODE), or
 * 64-bit mode at CPL0 ("long") or CPL3 ("user"), the first 2 MiB identity-mapped by one large
 * page that user code may use. */
static void reset(const uint8_t *code, size_t len)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    memset(mem, 0xf4, MEM_SIZE); /* HLT everywhere, so a wild jump stops */
    memcpy(mem + CODE, code, len);
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = MEM_SIZE; /* real mode: DS:0 is the first byte past memory (MMIO) */
    sregs.ds.selector = MEM_SIZE >> 4;
    if (mode != REAL) {
        uint64_t *pml4 = (uint64_t *)(mem + 0x2000), *pdpt = (uint64_t *)(mem + 0x3000),
                 *pd = (uint64_t *)(mem + 0x4000);
        struct kvm_segment seg = {.base = 0, .limit = 0xffffffff, .present = 1, .s = 1,
                                  .g = 1, .dpl = mode == USER ? 3 : 0};

        memset(mem + 0x2000, 0, 0x3000);
        pml4[0] = 0x3000 | 0x7; /* present, writable, user */
        pdpt[0] = 0x4000 | 0x7;
        pd[0] = 0x0 | 0x87;     /* present, writable, user, 2 MiB page */
        sregs.cr3 = 0x2000;
        sregs.cr4 = 0x20;                  /* PAE */
        sregs.cr0 = 0x80000011;            /* PG, ET, PE */
        sregs.efer = 0x500;                /* LMA, LME */
        seg.type = 0xb, seg.l = 1, seg.selector = mode == USER ? 0x1b : 0x8;
        sregs.cs = seg;
        seg.type = 0x3, seg.l = 0, seg.db = 1, seg.selector = mode == USER ? 0x23 : 0x10;
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    memset(&regs, 0, sizeof regs);
    regs.rip = CODE;
    regs.rflags = mode == USER ? 0x3002 : 0x2; /* IOPL 3: OUT works at CPL3 */
    regs.rsp = 0x8000;
    regs.rbx = mode == REAL ? 0 : MEM_SIZE; /* [ds:bx] or [rbx]: MMIO past memory */
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

static void guest_debug(uint32_t control, uint64_t dr0, uint64_t dr7)
{
    struct kvm_guest_debug dbg;

    memset(&dbg, 0, sizeof dbg);
    dbg.control = control;
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    if (ioctl(vcpu, KVM_SET_GUEST_DEBUG, &dbg) < 0)
        die("KVM_SET_GUEST_DEBUG");
}

struct seen {
    unsigned reason;
    unsigned exception;
    uint64_t pc;
};

/* Run until an exit that is neither DEBUG nor IO, at most max exits; returns how many were seen. */
static int run_exits(struct seen *seen, int max)
{
    int n = 0;

    while (n < max) {
        struct kvm_regs regs;

        if (rearm)
            guest_debug(rearm, 0, 0);
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
            die("KVM_GET_REGS");
        seen[n].reason = run->exit_reason;
        seen[n].exception = 0;
        seen[n].pc = regs.rip;
        printf("    exit %-8s", reason_name(run->exit_reason));
        if (run->exit_reason == KVM_EXIT_DEBUG) {
            seen[n].exception = run->debug.arch.exception;
            seen[n].pc = run->debug.arch.pc;
            printf(" exception %u pc %#llx dr6 %#llx dr7 %#llx", run->debug.arch.exception,
                   (unsigned long long)run->debug.arch.pc,
                   (unsigned long long)run->debug.arch.dr6,
                   (unsigned long long)run->debug.arch.dr7);
        }
        printf(" (rip %#llx)\n", (unsigned long long)regs.rip);
        n++;
        if (run->exit_reason == KVM_EXIT_IO || run->exit_reason == KVM_EXIT_MMIO)
            continue; /* a write: nothing to answer; the next KVM_RUN completes it */
        if (run->exit_reason == KVM_EXIT_HLT && through_hlt)
            continue; /* KVM_RUN goes on after the HLT */
        if (run->exit_reason != KVM_EXIT_DEBUG)
            break;
        if (seen[n - 1].exception == 1 && (run->debug.arch.dr6 & 0xf)) {
            /* a hardware breakpoint: remove it to go on, as a debugger would */
            guest_debug(KVM_GUESTDBG_ENABLE, 0, 0);
        } else if (seen[n - 1].exception == 3) {
            /* resume past the INT3, as a debugger would after restoring the byte */
            regs.rip = seen[n - 1].pc + 1;
            if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
                die("KVM_SET_REGS");
        }
    }
    return n;
}

/* A new VM with one vCPU for each case, so that no state carries over from the one before. */
static void new_vm(void)
{
    struct kvm_userspace_memory_region region;
    int size;

    if (run) {
        munmap(run, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0));
        close(vcpu);
        close(vm);
        munmap(mem, MEM_SIZE);
    }
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    region = (struct kvm_userspace_memory_region){
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

}

/* KVM_GUESTDBG_SINGLESTEP over NOPS nops, ROUNDS times (a lost step can be rare): each step
 * must be a DEBUG exit (exception 1) at the next instruction. */
#define NOPS 32
#define ROUNDS 100
static int check_steps(void)
{
    uint8_t code[NOPS + 1];
    int round, i, lost = 0, shown = 0;

    memset(code, 0x90, NOPS);
    code[NOPS] = 0xf4;
    for (round = 0; round < ROUNDS; round++) {
        new_vm();
        reset(code, sizeof code);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
        for (i = 1; i <= NOPS; i++) {
            struct kvm_regs regs;

            if (ioctl(vcpu, KVM_RUN, 0) < 0)
                die("KVM_RUN");
            if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
                die("KVM_GET_REGS");
            if (run->exit_reason == KVM_EXIT_DEBUG && run->debug.arch.exception == 1 &&
                run->debug.arch.pc == CODE + i)
                continue;
            if (shown++ < 5)
                printf("    round %d step %d: exit %s exception %u pc %#llx (rip %#llx), "
                       "expected DEBUG exception 1 at %#x\n", round, i,
                       reason_name(run->exit_reason),
                       run->exit_reason == KVM_EXIT_DEBUG ? run->debug.arch.exception : 0,
                       run->exit_reason == KVM_EXIT_DEBUG ? (unsigned long long)run->debug.arch.pc : 0,
                       (unsigned long long)regs.rip, CODE + i);
            if (run->exit_reason != KVM_EXIT_DEBUG || regs.rip < CODE + i ||
                regs.rip > CODE + NOPS) {
                lost += NOPS + 1 - i; /* another exit, or it ran off: the rest are lost too */
                break;
            }
            /* the instructions it ran without a step exit (at least this one was wrong) */
            lost += regs.rip > CODE + i ? regs.rip - (CODE + i) : 1;
            i = regs.rip - CODE;
        }
    }
    if (lost)
        printf("step   NOT AS DOCUMENTED: %d of %d steps lost\n", lost, NOPS * ROUNDS);
    else
        printf("step   ok (%d steps)\n", NOPS * ROUNDS);
    return !lost;
}

static int check(const char *name, const struct seen *want, int nwant)
{
    struct seen got[16];
    int n, i, ok;

    n = run_exits(got, nwant);
    ok = n == nwant;
    for (i = 0; ok && i < n; i++)
        ok = (got[i].reason == want[i].reason ||
              /* HLT at CPL3 is a #GP, and with no IDT a triple fault */
              (mode == USER && want[i].reason == KVM_EXIT_HLT &&
               got[i].reason == KVM_EXIT_SHUTDOWN)) &&
             got[i].exception == want[i].exception &&
             (want[i].reason != KVM_EXIT_DEBUG || got[i].pc == want[i].pc);
    printf("%-7s %s\n", name, ok ? "ok" : "NOT AS DOCUMENTED");
    if (!ok) {
        printf("      expected:");
        for (i = 0; i < nwant; i++) {
            printf(" %s", reason_name(want[i].reason));
            if (want[i].reason == KVM_EXIT_DEBUG)
                printf("(%u@%#llx)", want[i].exception, (unsigned long long)want[i].pc);
        }
        printf("\n");
    }
    return ok;
}

int main(int argc, char **argv)
{
    static const uint8_t with_int3[] = {0x90, 0xcc, 0x90, 0x90, 0xf4}; /* nop int3 nop nop hlt */
    static const uint8_t plain[] = {0x90, 0x90, 0x90, 0xf4};           /* nop nop nop hlt */
    static const uint8_t with_hlts[] = {0x90, 0xf4, 0x90, 0xf4, 0x90, 0xf4};
    static const uint8_t with_out[] = {0x90, 0xe6, 0x80, 0x90, 0xf4};  /* nop out 0x80,al nop hlt */
    int ok = 1;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (mode = REAL; argc == 2 && mode <= USER && strcmp(argv[1], mode_names[mode]); mode++)
        ;
    if (argc > 2 || mode > USER) {
        fprintf(stderr, "usage: guest_debug_repro [real|long|user]\n");
        return 2;
    }
    printf("mode: %s\n", mode == REAL ? "real" : mode == LONG ? "long (64-bit, CPL0)"
                                                                : "user (64-bit, CPL3)");
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    printf("KVM_CAP_SET_GUEST_DEBUG %d, KVM_CAP_SET_GUEST_DEBUG2 %#x\n",
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG),
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG2));
    {
        const struct seen want[] = {{KVM_EXIT_DEBUG, 3, CODE + 1}, {KVM_EXIT_HLT, 0, 0}};
        printf("sw: KVM_GUESTDBG_USE_SW_BP, int3 at %#x\n", CODE + 1);
        new_vm();
        reset(with_int3, sizeof with_int3);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0, 0);
        ok &= check("sw", want, 2);
    }
    printf("step: KVM_GUESTDBG_SINGLESTEP over %d nops, %d times\n", NOPS, ROUNDS);
    ok &= check_steps();
    {
        const struct seen want[] = {{KVM_EXIT_DEBUG, 1, CODE + 1}, {KVM_EXIT_IO, 0, 0},
                                    {KVM_EXIT_DEBUG, 1, CODE + 3}, {KVM_EXIT_DEBUG, 1, CODE + 4},
                                    {KVM_EXIT_HLT, 0, 0}};
        printf("stepio: KVM_GUESTDBG_SINGLESTEP over nop, out 0x80,al, nop, hlt\n");
        new_vm();
        reset(with_out, sizeof with_out);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
        ok &= check("stepio", want, 5);
    }
    if (mode != USER) {
        const struct seen want[] = {{KVM_EXIT_DEBUG, 1, CODE + 1}, {KVM_EXIT_HLT, 0, 0},
                                    {KVM_EXIT_DEBUG, 1, CODE + 3}, {KVM_EXIT_HLT, 0, 0},
                                    {KVM_EXIT_DEBUG, 1, CODE + 5}, {KVM_EXIT_HLT, 0, 0}};
        printf("stephlt: KVM_GUESTDBG_SINGLESTEP over nop, hlt, nop, hlt, nop, hlt\n");
        new_vm();
        reset(with_hlts, sizeof with_hlts);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
        through_hlt = 1;
        ok &= check("stephlt", want, 6);
        through_hlt = 0;
    }
    {
        const struct seen want[] = {{KVM_EXIT_DEBUG, 1, CODE + 1}, {KVM_EXIT_MMIO, 0, 0},
                                    {KVM_EXIT_DEBUG, 1, CODE + 4}, {KVM_EXIT_DEBUG, 1, CODE + 5},
                                    {KVM_EXIT_HLT, 0, 0}};
        uint8_t code[] = {0x90, 0x88, mode == REAL ? 0x07 : 0x03, 0x90, 0x90, 0xf4};

        printf("stepemu: KVM_GUESTDBG_SINGLESTEP over nop, mov [%s],al (MMIO), nop, nop, hlt\n",
               mode == REAL ? "bx" : "rbx");
        new_vm();
        reset(code, sizeof code);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
        ok &= check("stepemu", want, 5);
        printf("stepemu, KVM_SET_GUEST_DEBUG again before each KVM_RUN:\n");
        new_vm();
        reset(code, sizeof code);
        rearm = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        ok &= check("rearmed", want, 5);
        rearm = 0;
    }
    {
        const struct seen want[] = {{KVM_EXIT_DEBUG, 1, CODE + 2}, {KVM_EXIT_HLT, 0, 0}};
        printf("hw: KVM_GUESTDBG_USE_HW_BP, DR0 %#x, DR7 L0 execute\n", CODE + 2);
        new_vm();
        reset(plain, sizeof plain);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, CODE + 2, 0x1);
        ok &= check("hw", want, 2);
    }
    printf("%s\n", ok ? "all as documented" : "some NOT AS DOCUMENTED");
    return ok ? 0 : 1;
}
