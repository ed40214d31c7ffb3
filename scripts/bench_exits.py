#!/usr/bin/env python3
"""bench_exits.py - the cost of each kind of VM exit handled in Python, as a ratio to the same loop in C.

One command runs guests/build/bench_io.bin (16-bit real mode) once per exit kind: the host puts a
loop number in EAX and N in ECX, and the guest makes N accesses of that kind in a tight loop, then
says DONE. Each kind runs four ways, with the same N and the same set-up:

  c        scripts/exit_loop.c: the reference loop in C (compiled here with `cc -O2`)
  raw      the floor of Python: KVM_RUN called through cffi, the exit reason read as an int from the
           kvm_run page and the least write that answers the exit (the data byte of a read, msr.data;
           KVM_GET_REGS / KVM_SET_REGS for the hypercall port), with no decoding into exit values and
           no dispatch: one specialised loop per kind
  bare     Vcpu.run() and the least Python can do to answer the exit (a type check, a reply)
  machine  Machine.run(): the policy loop, with handlers registered by on_port / on_mmio / on_msr /
           on_hypercall / on_exit (each counts the access and answers it)

Two kinds never exit to Python per access: `ioeventfd` (the port writes of `io_out`, answered by an
ioeventfd in the kernel) and `coalesced` (the MMIO writes of `mmio_write`, batched in KVM's coalesced
ring and drained at the next exit). They are shown apart, against the kind they replace.

Each run is timed from the first KVM_RUN to the DONE exit (CLOCK_MONOTONIC; VM set-up is not timed)
and divided by N: ns per access, which for the exit kinds is ns per exit (plus 1/N of the DONE exit).
Each is repeated --repeat times, interleaved in a rotating order after an untimed warm-up; the
median is reported, with the ratios raw/c, bare/c, machine/c and machine/raw (what pykvm adds
over the floor Python itself sets). Speed is only ever a ratio against the C
run of the same command: no absolute number here is a pass/fail threshold.

Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm, no compiler,
or none of the chosen kinds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvm import argtypes  # noqa: E402
from pykvm._ffi import ffi, lib  # noqa: E402
from pykvm.constants import ExitReason  # noqa: E402
from pykvm.exits import Hlt, IoIn, IoOut, MmioRead, MmioWrite, X86Rdmsr, X86Wrmsr  # noqa: E402
from pykvm.ioctl import REQUESTS, KvmError, KvmUnavailableError, KvmUnsupportedError  # noqa: E402
from pykvm.machine import GuestError, Machine, describe_exit  # noqa: E402
from pykvm.system import Kvm  # noqa: E402
from pykvm.x86 import layout  # noqa: E402

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4

GUESTS = ROOT / "guests"
IMAGE = GUESTS / "build" / "bench_io.bin"
C_SOURCE = ROOT / "scripts" / "exit_loop.c"
C_BUILD = ROOT / "scripts" / "build"  # git-ignored (the repository ignores every build/)
C_BINARY = C_BUILD / "exit_loop"
MEM_SIZE = layout.MIN_MEM_SIZE  # exit_loop.c maps the same 1 MiB; BENCH_MMIO lies just above it
REPLY = 0x2A  # what reads, RDMSR and the hypercall return (exit_loop.c's REPLY)
RING_SLOTS = (layout.PAGE_SIZE - 8) // 24  # KVM_COALESCED_MMIO_MAX: 24-byte entries after first, last

VARIANTS = ("c", "raw", "bare", "machine")
VARIANT_NAMES = {"c": "C", "raw": "raw cffi", "bare": "bare Python", "machine": "Machine"}
RATIOS = (("raw", "c"), ("bare", "c"), ("machine", "c"), ("bare", "raw"), ("machine", "raw"))

EXAMPLES = """\
examples:
  python scripts/bench_exits.py                       every kind, N = 20000, 5 repetitions, a table
  python scripts/bench_exits.py --kinds io_out,hypercall --iterations 100000 --repeat 9
  python scripts/bench_exits.py --json | jq '.kinds[] | .ratios'
"""


class Unavailable(Exception):
    """This host cannot run the benchmark, or one kind of it (exit status 4)."""


class BenchFailure(Exception):
    """A run went wrong (exit status 1)."""


# ---- the Python side of each kind ---------------------------------------------------------------------


class Seen:
    """The guest's accesses the host answered in one run (and an eventfd the kernel counted them in)."""

    __slots__ = ("eventfd", "n")

    def __init__(self) -> None:
        self.n = 0
        self.eventfd: int | None = None

    def total(self) -> int:
        """Accesses answered so far; reads and closes the eventfd, if any."""
        if self.eventfd is not None:
            fd, self.eventfd = self.eventfd, None
            try:
                self.n += os.eventfd_read(fd)
            except BlockingIOError:
                pass  # the counter is 0
            finally:
                os.close(fd)
        return self.n


def counting(seen: Seen):
    """A Machine handler that counts the access: writes, HLT."""

    def handler(exit, vcpu):
        seen.n += 1

    return handler


def replying(seen: Seen):
    """A Machine handler that answers a port or MMIO read with REPLY and counts it."""

    def handler(exit, vcpu):
        exit.reply(REPLY)
        seen.n += 1

    return handler


# Set-up for Python, used by both loops: Machine handlers (the machine loop calls them) and the
# kernel's side (MSR filter, ioeventfd, coalesced zone: what exit_loop.c's flags do).


def on_bench_port(m: Machine, seen: Seen, reply: bool) -> None:
    m.on_port(layout.BENCH_PORT, (replying if reply else counting)(seen), name="bench port")


def on_bench_mmio(m: Machine, seen: Seen, reply: bool) -> None:
    m.on_mmio(layout.BENCH_MMIO, 1, (replying if reply else counting)(seen), name="bench mmio")


def on_bench_msr(m: Machine, seen: Seen) -> None:
    def read(vcpu):
        seen.n += 1
        return REPLY

    def write(vcpu, value):
        seen.n += 1

    m.on_msr(layout.BENCH_MSR, read=read, write=write)  # enables user-space MSR exits + the filter


def on_bench_hypercall(m: Machine, seen: Seen) -> None:
    def hypercall(vcpu, args):
        seen.n += 1
        return REPLY

    m.on_hypercall(layout.BENCH_HYPERCALL, hypercall)


def with_ioeventfd(m: Machine, seen: Seen) -> None:
    seen.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    m.vm.ioeventfd(seen.eventfd, layout.BENCH_PORT, 1, pio=True)


def with_coalesced_mmio(m: Machine, seen: Seen) -> None:
    on_bench_mmio(m, seen, reply=False)  # the writes that find the ring full still exit
    m.coalesce_mmio(layout.BENCH_MMIO, 1)


# The bare loop's answers: given the vCPU and Seen, a function exit -> True if it answered a bench
# access (the loop counts those), False for anything else (the loop then looks for DONE).


def port_out(vcpu, seen):
    port = layout.BENCH_PORT
    return lambda exit: type(exit) is IoOut and exit.port == port


def port_in(vcpu, seen):
    port = layout.BENCH_PORT

    def answer(exit):
        if type(exit) is IoIn and exit.port == port:
            exit.reply(REPLY)
            return True
        return False

    return answer


def mmio_write(vcpu, seen):
    gpa = layout.BENCH_MMIO
    return lambda exit: type(exit) is MmioWrite and exit.gpa == gpa


def mmio_read(vcpu, seen):
    gpa = layout.BENCH_MMIO

    def answer(exit):
        if type(exit) is MmioRead and exit.gpa == gpa:
            exit.reply(REPLY)
            return True
        return False

    return answer


def rdmsr(vcpu, seen):
    index, complete = layout.BENCH_MSR, vcpu.complete_rdmsr

    def answer(exit):
        if type(exit) is X86Rdmsr and exit.index == index:
            complete(REPLY)
            return True
        return False

    return answer


def wrmsr(vcpu, seen):
    index, complete = layout.BENCH_MSR, vcpu.complete_wrmsr

    def answer(exit):
        if type(exit) is X86Wrmsr and exit.index == index:
            complete()
            return True
        return False

    return answer


def hypercall_port(vcpu, seen):
    """What the hypercall port costs: KVM_GET_REGS for the number and arguments, KVM_SET_REGS for RAX."""
    port, nr, get_regs, set_regs = layout.HYPERCALL_PORT, layout.BENCH_HYPERCALL, vcpu.get_regs, vcpu.set_regs

    def answer(exit):
        if type(exit) is IoOut and exit.port == port:
            regs = get_regs()
            if regs.rax & 0xFFFFFFFF != nr:
                raise BenchFailure(f"bare loop: hypercall {regs.rax & 0xFFFFFFFF:#x}, expected {nr:#x}")
            regs.rax = REPLY
            set_regs(regs)
            return True
        return False

    return answer


def halt(vcpu, seen):
    return lambda exit: type(exit) is Hlt


def no_exit(vcpu, seen):
    return lambda exit: False  # the kernel answers every access


def ring_then_mmio_write(vcpu, seen):
    """Drain the coalesced ring at every exit (as QEMU and Machine do), then take a plain MMIO write."""
    ring, gpa, written = vcpu.coalesced_ring, layout.BENCH_MMIO, mmio_write(vcpu, seen)
    if ring is None:
        raise Unavailable("this KVM maps no coalesced MMIO ring page")

    def answer(exit):
        first = ring.first
        if first != ring.last:
            last, entries, n = ring.last, ring.coalesced_mmio, 0
            while first != last:
                if entries[first].phys_addr != gpa:
                    raise BenchFailure(f"bare loop: a coalesced write to {entries[first].phys_addr:#x}")
                first = (first + 1) % RING_SLOTS
                n += 1
            ring.first = first
            seen.n += n
        return written(exit)

    return answer


# ---- the kinds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # one access, as the table says it
    loop: int  # the guest's loop (layout.BENCH_LOOP_*), in EAX at entry
    setup: Callable[[Machine, Seen], None]  # Python set-up, for both loops
    answer: Callable  # the bare loop's answer: (vcpu, seen) -> (exit -> bool)
    raw: str  # the raw loop's answer (_raw_loop): what it checks and writes per exit
    c_flags: tuple[str, ...] = ()  # exit_loop.c's set-up flags
    c_counts: tuple[str, ...] = ()  # exit_loop.c's counters that add up to N
    instead_of: str | None = None  # a kind without exits to Python: the kind whose exits it saves


KINDS = (
    Kind("io_out", "outb to a port", layout.BENCH_LOOP_OUT, lambda m, s: on_bench_port(m, s, reply=False),
         port_out, "io_out", c_counts=("io_out",)),
    Kind("io_in", "inb from a port, answered", layout.BENCH_LOOP_IN, lambda m, s: on_bench_port(m, s, reply=True),
         port_in, "io_in", c_counts=("io_in",)),
    Kind("mmio_write", "byte write to MMIO", layout.BENCH_LOOP_MMIO_WRITE,
         lambda m, s: on_bench_mmio(m, s, reply=False), mmio_write, "mmio_write", c_counts=("mmio_write",)),
    Kind("mmio_read", "byte read from MMIO, answered", layout.BENCH_LOOP_MMIO_READ,
         lambda m, s: on_bench_mmio(m, s, reply=True), mmio_read, "mmio_read", c_counts=("mmio_read",)),
    Kind("msr_read", "rdmsr, emulated (MSR filter)", layout.BENCH_LOOP_RDMSR, on_bench_msr, rdmsr, "msr_read",
         c_flags=("--msr-filter",), c_counts=("rdmsr",)),
    Kind("msr_write", "wrmsr, emulated (MSR filter)", layout.BENCH_LOOP_WRMSR, on_bench_msr, wrmsr, "msr_write",
         c_flags=("--msr-filter",), c_counts=("wrmsr",)),
    Kind("hypercall", "hypercall port (GET/SET_REGS)", layout.BENCH_LOOP_HYPERCALL, on_bench_hypercall,
         hypercall_port, "hypercall", c_counts=("hypercall",)),
    Kind("hlt", "hlt (no in-kernel irqchip)", layout.BENCH_LOOP_HLT, lambda m, s: m.on_exit(Hlt, counting(s)),
         halt, "hlt", c_counts=("hlt",)),
    Kind("ioeventfd", "outb answered by an ioeventfd", layout.BENCH_LOOP_OUT, with_ioeventfd, no_exit, "none",
         c_flags=("--ioeventfd",), c_counts=("eventfd",), instead_of="io_out"),
    Kind("coalesced", "byte write to coalesced MMIO", layout.BENCH_LOOP_MMIO_WRITE, with_coalesced_mmio,
         ring_then_mmio_write, "coalesced", c_flags=("--coalesced-mmio",), c_counts=("coalesced", "mmio_write"),
         instead_of="mmio_write"),
)
KIND_NAMES = {kind.name: kind for kind in KINDS}


# ---- building -------------------------------------------------------------------------------------------


def _check_call(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BenchFailure(f"{what} failed: {' '.join(cmd)} (exit status {proc.returncode})")


def build(cc: str) -> None:
    """Build the guest (make -C guests) and the C loop (cc -O2) into scripts/build/."""
    for tool in ("make", cc):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` is not installed: it is needed to build the guest and the C loop")
    _check_call(["make", "-s", "-C", str(GUESTS)], "building the guests")
    C_BUILD.mkdir(parents=True, exist_ok=True)
    _check_call([cc, "-O2", "-Wall", "-Wextra", "-o", str(C_BINARY), str(C_SOURCE)], "compiling exit_loop.c")


# ---- the three loops: each returns (exits, nanoseconds) of one run -------------------------------------


def _check_total(who: str, kind: Kind, n: int, total: int, exit_count: int) -> None:
    if total != n:
        raise BenchFailure(f"{kind.name}: {who} answered {total} accesses, expected {n}")
    if kind.instead_of is None and exit_count != n + 1:
        raise BenchFailure(f"{kind.name}: {who} saw {exit_count} exits, expected {n + 1} (N accesses, DONE)")


def run_c(kind: Kind, n: int) -> tuple[int, int]:
    proc = subprocess.run([str(C_BINARY), *kind.c_flags, str(IMAGE), str(kind.loop), str(n)],
                          capture_output=True, text=True)
    if proc.returncode == EXIT_UNAVAILABLE:
        raise Unavailable(proc.stderr.strip())
    try:
        fields = dict(item.split("=", 1) for item in proc.stdout.split())
        exit_count, seconds = int(fields["exits"]), float(fields["seconds"])
        total = sum(int(fields[name]) for name in kind.c_counts)
    except (KeyError, ValueError):
        fields = None
    if proc.returncode != 0 or fields is None:
        raise BenchFailure(f"exit_loop failed (exit status {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    _check_total("exit_loop", kind, n, total, exit_count)
    return exit_count, round(seconds * 1e9)


def new_machine(kvm: Kvm, image: bytes, kind: Kind, n: int, seen: Seen) -> Machine:
    """A Machine as exit_loop.c sets one up: the guest in real mode, EAX = the loop, ECX = N, the kind's set-up."""
    machine = Machine(MEM_SIZE, kvm=kvm)
    try:
        machine.load_flat(image, "real")
        regs = machine.vcpu.get_regs()
        regs.rax, regs.rcx = kind.loop, n
        machine.vcpu.set_regs(regs)
        kind.setup(machine, seen)
    except BaseException:
        machine.close()
        seen.total()  # closes the eventfd
        raise
    return machine


def run_bare(kvm: Kvm, image: bytes, kind: Kind, n: int) -> tuple[int, int]:
    """Vcpu.run() and the kind's answer, as exit_loop.c does it."""
    call = layout.CALL_PORT
    seen = Seen()
    exit_count = answered = 0
    with new_machine(kvm, image, kind, n, seen) as machine:
        try:
            vcpu = machine.vcpu
            run, answer = vcpu.run, kind.answer(vcpu, seen)
            start = time.monotonic_ns()
            while True:
                exit = run()
                exit_count += 1
                if answer(exit):
                    answered += 1
                elif type(exit) is IoOut and exit.port == call:
                    break
                else:
                    raise BenchFailure(f"{kind.name}: bare loop: unexpected exit {describe_exit(exit)} "
                                       f"after {exit_count} exits")
            elapsed = time.monotonic_ns() - start
            status = vcpu.get_regs().rbx & 0xFFFFFFFF
            if exit.value != layout.CALL_DONE or status != 0:
                raise BenchFailure(f"{kind.name}: the guest did not say DONE(0) (call {exit.value:#x}, {status:#x})")
        finally:
            total = answered + seen.total()
    _check_total("the bare loop", kind, n, total, exit_count)
    return exit_count, elapsed


# The raw loop: what any Python loop over KVM_RUN pays, whatever library it uses. KVM_RUN through a
# cffi pointer to ioctl (fixed three-argument prototype, as pykvm's hot path), the exit reason read
# as an int through cffi, then per kind the least check and write that answers: no exit value is
# built and nothing is looked up. Each kind has its own loop, so that no dispatch is measured.

_IOCTL3 = ffi.cast("int(*)(int, unsigned long, unsigned long)", ffi.addressof(lib, "ioctl"))
_KVM_RUN, _GET_REGS, _SET_REGS = REQUESTS["KVM_RUN"], REQUESTS["KVM_GET_REGS"], REQUESTS["KVM_SET_REGS"]
_IO, _HLT, _MMIO, _RDMSR, _WRMSR = (int(r) for r in (ExitReason.IO, ExitReason.HLT, ExitReason.MMIO,
                                                      ExitReason.X86_RDMSR, ExitReason.X86_WRMSR))
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio") + 8  # kvm_run.mmio.data, after the 8-byte phys_addr


def _raw_loop(how: str, fd: int, run, page: memoryview, ring, n_exits: list[int]) -> int:
    """One timed raw run; returns the ns from the first KVM_RUN to the exit that is not the kind's
    (DONE, checked after), and leaves the exits seen and the writes drained in ``n_exits``."""
    enter, kvm_run = _IOCTL3, _KVM_RUN
    exits = drained = 0
    if how in ("io_out", "io_in", "hypercall"):
        port = layout.HYPERCALL_PORT if how == "hypercall" else layout.BENCH_PORT
        io = run.io
    start = time.monotonic_ns()
    if how == "io_out":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _IO or io.port != port:
                break
    elif how == "io_in":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _IO or io.port != port:
                break
            page[io.data_offset] = REPLY
    elif how == "mmio_write":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _MMIO:
                break
    elif how == "mmio_read":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _MMIO:
                break
            page[_MMIO_DATA] = REPLY
    elif how == "msr_read":
        msr = run.msr
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _RDMSR:
                break
            msr.data = REPLY  # KVM zeroed msr.error before the exit
    elif how == "msr_write":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _WRMSR:
                break
    elif how == "hypercall":
        regs = ffi.new("struct kvm_regs *")
        addr = int(ffi.cast("uintptr_t", regs))
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _IO or io.port != port:
                break
            if enter(fd, _GET_REGS, addr) < 0 or regs.rax & 0xFFFFFFFF != layout.BENCH_HYPERCALL:
                raise BenchFailure("raw loop: KVM_GET_REGS failed or the wrong hypercall")
            regs.rax = REPLY
            if enter(fd, _SET_REGS, addr) < 0:
                raise BenchFailure(f"raw loop: KVM_SET_REGS: errno {ffi.errno}")
    elif how == "hlt":
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            if run.exit_reason != _HLT:
                break
    elif how == "none":
        if enter(fd, kvm_run, 0) < 0:
            raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
        exits += 1
    elif how == "coalesced":
        if ring is None:
            raise Unavailable("this KVM maps no coalesced MMIO ring page")
        while True:
            if enter(fd, kvm_run, 0) < 0:
                raise BenchFailure(f"raw loop: KVM_RUN: errno {ffi.errno}")
            exits += 1
            first, last = ring.first, ring.last
            if first != last:
                drained += (last - first) % RING_SLOTS
                ring.first = last
            if run.exit_reason != _MMIO:
                break
    else:
        raise ValueError(f"no raw loop {how!r}")
    elapsed = time.monotonic_ns() - start
    n_exits[:] = [exits, drained]
    return elapsed


def run_raw(kvm: Kvm, image: bytes, kind: Kind, n: int) -> tuple[int, int]:
    """KVM_RUN through cffi and the least answer, with no exit values and no dispatch (the floor)."""
    seen = Seen()
    counts = [0, 0]
    with new_machine(kvm, image, kind, n, seen) as machine:
        try:
            vcpu = machine.vcpu
            run = vcpu.kvm_run
            elapsed = _raw_loop(kind.raw, vcpu.fileno(), run, memoryview(vcpu._run_map), vcpu.coalesced_ring, counts)
            exit_count, drained = counts
            io = run.io
            call = int.from_bytes(vcpu._run_map[io.data_offset : io.data_offset + 4], "little")
            status = vcpu.get_regs().rbx & 0xFFFFFFFF
            if not (run.exit_reason == _IO and io.port == layout.CALL_PORT and call == layout.CALL_DONE
                    and status == 0):
                raise BenchFailure(f"{kind.name}: raw loop: the run did not end in DONE(0) (exit reason "
                                   f"{run.exit_reason}, after {exit_count} exits)")
        finally:
            total = seen.total() + drained + (exit_count - 1 if kind.raw not in ("none",) else 0)
    _check_total("the raw loop", kind, n, total, exit_count)
    return exit_count, elapsed


def run_machine(kvm: Kvm, image: bytes, kind: Kind, n: int) -> tuple[int, int]:
    """Machine.run() with the kind's handlers."""
    seen = Seen()
    with new_machine(kvm, image, kind, n, seen) as machine:
        try:
            start = time.monotonic_ns()
            outcome = machine.run()
            elapsed = time.monotonic_ns() - start
        finally:
            total = seen.total()
    if not outcome.ok:
        raise BenchFailure(f"{kind.name}: Machine.run: the guest ended with status {outcome.status} ({outcome.failure})")
    _check_total("Machine.run", kind, n, total, outcome.exits)
    return outcome.exits, elapsed


# ---- the benchmark --------------------------------------------------------------------------------------


def benchmark(kinds: list[Kind], n: int, repeat: int, progress=None) -> dict:
    """Run each kind's three loops ``repeat`` times (interleaved, after a short untimed warm-up)."""
    try:
        kvm = Kvm()
    except KvmUnavailableError as e:
        raise Unavailable(e.strerror) from None
    image = IMAGE.read_bytes()
    runners = {
        "c": lambda kind, count: run_c(kind, count),
        "raw": lambda kind, count: run_raw(kvm, image, kind, count),
        "bare": lambda kind, count: run_bare(kvm, image, kind, count),
        "machine": lambda kind, count: run_machine(kvm, image, kind, count),
    }
    ns: dict[str, dict[str, list[float]]] = {k.name: {v: [] for v in VARIANTS} for k in kinds}
    exit_counts: dict[str, dict[str, list[int]]] = {k.name: {v: [] for v in VARIANTS} for k in kinds}
    skipped: dict[str, str] = {}
    fixed: list[int] = []
    try:
        for kind in kinds:  # warm-up: page in the binaries and code paths; find what this host lacks
            try:
                for variant in VARIANTS:
                    runners[variant](kind, min(n, 1000))
            except (Unavailable, KvmUnsupportedError) as e:
                skipped[kind.name] = str(e)
        kinds = [k for k in kinds if k.name not in skipped]
        if not kinds:
            raise Unavailable("this host can run none of the chosen kinds: " + "; ".join(skipped.values()))
        for i in range(repeat):
            order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]  # rotate: no loop always runs first
            for kind in kinds:
                for variant in order:
                    if progress is not None:
                        progress(f"run {i + 1}/{repeat}: {kind.name}, {VARIANT_NAMES[variant]}")
                    exit_count, elapsed = runners[variant](kind, n)
                    ns[kind.name][variant].append(elapsed / n)
                    exit_counts[kind.name][variant].append(exit_count)
            fixed.append(run_machine(kvm, image, kinds[0], 0)[1])  # Machine.run's cost apart from exits
    finally:
        kvm.close()

    results = {kind.name: _kind_result(kind, ns[kind.name], exit_counts[kind.name]) for kind in kinds}
    return {
        "guest": str(IMAGE.relative_to(ROOT)),
        "iterations": n,
        "repeat": repeat,
        "unit": "ns per access: the run (first KVM_RUN to the DONE exit) / N; one exit per access "
                "except for ioeventfd and coalesced",
        "backend": _backend(),
        "python": platform.python_version(),
        "kinds": results,
        "machine_run_fixed_ns": round(statistics.median(fixed)),
        "without_exits": {
            kind.name: _saving(kind, results[kind.name], results[kind.instead_of])
            for kind in kinds if kind.instead_of in results
        },
        "skipped": skipped,
    }


def _kind_result(kind: Kind, ns: dict[str, list[float]], exit_counts: dict[str, list[int]]) -> dict:
    medians = {v: statistics.median(ns[v]) for v in VARIANTS}
    return {
        "what": kind.what,
        "loop": kind.loop,
        "c_flags": list(kind.c_flags),
        "exits_to_python": kind.instead_of is None,
        "exits_per_run": {v: round(statistics.median(exit_counts[v])) for v in VARIANTS},
        "ns_per_access": {v: round(medians[v], 1) for v in VARIANTS},
        "min_ns_per_access": {v: round(min(ns[v]), 1) for v in VARIANTS},
        "max_ns_per_access": {v: round(max(ns[v]), 1) for v in VARIANTS},
        "runs_ns_per_access": {v: [round(x, 1) for x in ns[v]] for v in VARIANTS},
        "ratios": {f"{a}/{b}": round(medians[a] / medians[b], 3) for a, b in RATIOS},
        "python_adds_ns": {v: round(medians[v] - medians["c"], 1) for v in ("raw", "bare", "machine")},
    }


def _saving(kind: Kind, result: dict, plain: dict) -> dict:
    """A kind without exits against the kind it replaces: ns per write each way, and how many times cheaper."""
    return {
        "instead_of": kind.instead_of,
        "ns_per_write": result["ns_per_access"],
        "plain_ns_per_write": plain["ns_per_access"],
        "times_cheaper": {v: round(plain["ns_per_access"][v] / result["ns_per_access"][v], 2) for v in VARIANTS},
    }


def _backend() -> str | None:
    try:
        from pykvm.probe.host import kvm_backend
    except ImportError:
        return None
    return kvm_backend()


# ---- output ---------------------------------------------------------------------------------------------


def print_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=150)  # piped: room for every column
    table = Table(
        title=f"One exit handled in Python vs in C: {doc['guest']}, N = {doc['iterations']}, "
        f"median of {doc['repeat']}",
        caption="ns per access: the run / N; one exit to user space per access, except ioeventfd and "
        f"coalesced (exits a run). KVM backend: {doc['backend'] or 'unknown'}, Python {doc['python']}",
    )
    table.add_column("kind")
    for v in VARIANTS:
        table.add_column(f"{VARIANT_NAMES[v]} ns", justify="right")
    for a, b in RATIOS:
        table.add_column(f"{VARIANT_NAMES[a].split()[0]}/{VARIANT_NAMES[b].split()[0]}", justify="right")
    table.add_column("exits a run", justify="right")
    rows = list(doc["kinds"].items())
    for i, (name, r) in enumerate(rows):
        last_with_exits = r["exits_to_python"] and i + 1 < len(rows) and not rows[i + 1][1]["exits_to_python"]
        table.add_row(
            name, *(f"{r['ns_per_access'][v]:.0f}" for v in VARIANTS),
            *(f"{r['ratios'][f'{a}/{b}']:.2f}" for a, b in RATIOS), str(r["exits_per_run"]["c"]),
            end_section=last_with_exits,
        )
    console.print(table)
    fixed = doc["machine_run_fixed_ns"]
    console.print(f"Machine.run() of a guest that only says DONE (N = 0) takes {fixed / 1000:.0f} µs "
                  f"(median), so {fixed / doc['iterations']:.0f} ns of each Machine figure above is that fixed cost.")

    if doc["without_exits"]:
        saving = Table(title="Writes kept in the kernel, against the same writes exiting to user space",
                       caption="ns per write, median, same command; x cheaper = exiting / kept in the kernel")
        saving.add_column("writes")
        for v in VARIANTS:
            saving.add_column(f"{VARIANT_NAMES[v]} ns", justify="right")
        for name, s in doc["without_exits"].items():
            saving.add_row(f"{s['instead_of']}: an exit each", *(f"{s['plain_ns_per_write'][v]:.0f}" for v in VARIANTS))
            saving.add_row(f"{name}", *(f"{s['ns_per_write'][v]:.0f}" for v in VARIANTS))
            saving.add_row("  x cheaper", *(f"{s['times_cheaper'][v]:.1f}" for v in VARIANTS), end_section=True)
        console.print(saving)
    for name, reason in doc["skipped"].items():
        print(f"bench_exits: skipped {name}: {reason}", file=sys.stderr)


# ---- command line ---------------------------------------------------------------------------------------


_positive = argtypes.number(int, minimum=1, what="an integer")
_iterations = argtypes.number(int, minimum=1, maximum=0xFFFFFFFF, what="an integer (the guest counts in 32 bits)")


def _kinds(text: str) -> list[Kind]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KIND_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(unknown) or '(none)'}; choose from {', '.join(KIND_NAMES)}")
    return [KIND_NAMES[name] for name in dict.fromkeys(names)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_exits.py",
        description="Cost of each kind of VM exit handled in Python, as a ratio to the same loop in C.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--iterations", "-n", type=_iterations, default=20000, metavar="N",
                        help="guest accesses per run (default: 20000)")
    parser.add_argument("--repeat", "-r", type=_positive, default=5, help="runs of each loop (default: 5)")
    parser.add_argument("--kinds", "-k", type=_kinds, default=list(KINDS), metavar="A,B",
                        help=f"the kinds to measure (default: all): {', '.join(KIND_NAMES)}")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    parser.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler (default: $CC or cc)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.exists("/dev/kvm"):
            raise Unavailable("/dev/kvm does not exist: this host has no KVM, so there is nothing to measure")
        build(args.cc)
        if sys.stderr.isatty() and not args.json:
            from rich.console import Console

            with Console(stderr=True).status("measuring") as status:
                doc = benchmark(args.kinds, args.iterations, args.repeat, lambda text: status.update(text))
        else:
            doc = benchmark(args.kinds, args.iterations, args.repeat)
    except (Unavailable, KvmUnsupportedError) as e:
        print(f"bench_exits: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (BenchFailure, GuestError, KvmError) as e:
        print(f"bench_exits: {e.report() if isinstance(e, GuestError) else e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bench_exits: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
