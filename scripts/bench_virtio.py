#!/usr/bin/env python3
"""bench_virtio.py - virtio-blk throughput and IOPS against the host's own reads, and the cost of a
queue notify through an ioeventfd against a trapped MMIO register write.

One command, everything measured in the same run:

  4k-random   N reads of 4 KiB at random 4 KiB-aligned offsets of a disk image (a temporary file,
              random bytes, read once beforehand so that it is in the page cache)
  1m-seq      N reads of 1 MiB, one after the other through the image (wrapping at its end)

each two ways: ``os.preadv`` of the same offsets and sizes into one buffer, in a Python loop on the
host (the reference), and by a guest through pykvm's VirtioBlk (``Machine.add_virtio``): the
guest (guests/virtio_bench.S) sets the device up at CPL0, then runs its request loop at CPL3 (on
kvm_pvm CPL0 code is emulated, CPL3 code runs natively, so the loop costs the guest little and the
figure is the device path: the notify through the ioeventfd, the worker thread, the pread into guest
memory, the used ring). It keeps up to --depth requests in the ring, notifies unless the device
suppressed notifications, and polls the used ring (VIRTQ_AVAIL_F_NO_INTERRUPT: no interrupts).
Guest time runs from the guest's SYNC(1) (its loop starts) to its SYNC(2) (its last request
completed), so neither the VM's set-up nor the device's (CPL0, emulated) is counted.

  notify      N writes of 0 to QueueNotify from CPL3: KVM signals the queue's ioeventfd, no exit to
              user space (the device's worker wakes, finds the ring empty)
  trapped     N writes of 0 to QueueSel from CPL3: each an MMIO exit that Machine.run() hands to the
              transport in Python, the path every register access takes

Each is run --repeat times, interleaved, after an untimed warm-up; medians are reported, with the
guest/host ratio (how many times the host's own pread the virtio path costs) and the ratio of a
trapped write to a notify. Speed is only ever a ratio within one command: nothing here is a
pass/fail threshold.

Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm, no compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvm import argtypes  # noqa: E402
from pykvm.ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError  # noqa: E402
from pykvm.machine import GuestError, Machine  # noqa: E402

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4

GUESTS = ROOT / "guests"
IMAGE = GUESTS / "build" / "virtio_bench.bin"
KiB, MiB = 1024, 1024 * 1024
SECTOR = 512

# guests/virtio_bench.S's parameter block (64-bit words, in this order) and loops
PARAMS = ("mmio", "loop", "n", "qsize", "desc", "avail", "used", "depth", "chains", "status", "reg",
          "headers", "sectors", "torn")
LOOP_BLK, LOOP_NOTIFY, LOOP_TRAPPED = 1, 2, 3

# where the host lays the guest's rings and buffers out (the image is at 1 MiB, its stack below 640 KiB)
P_BLOCK = 0x200000
DESC = 0x201000
AVAIL = 0x202000
USED = 0x203000
HEADERS = 0x204000
STATUS = 0x205000
SECTORS = 0x300000  # up to 1 MiB of 64-bit sectors: 131072 requests a run at most
MAX_REQUESTS = (1 * MiB) // 8
DATA = 0x400000
QUEUE_SIZE = 128  # VirtioBlk's QueueNumMax
TRAPPED_REGISTER = 0x030  # QueueSel: a write the transport takes in Python and that changes nothing here
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
DESC_F_NEXT, DESC_F_WRITE = 1, 2
T_IN = 0

EXAMPLES = """\
examples:
  python scripts/bench_virtio.py                         every workload, 5 repetitions, tables
  python scripts/bench_virtio.py --random-reads 20000 --seq-reads 500 --repeat 9
  python scripts/bench_virtio.py --depth 8 --json | jq '.workloads[] | .ratio'
"""


class Unavailable(Exception):
    """This host cannot run the benchmark (exit status 4)."""


class BenchFailure(Exception):
    """A run went wrong (exit status 1)."""


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    size: int  # bytes a request
    chains: int  # K: chains in the descriptor table (3 descriptors each)


WORKLOADS = (
    Workload("4k-random", "4 KiB reads at random 4 KiB-aligned offsets", 4 * KiB, 32),
    Workload("1m-seq", "1 MiB reads, sequential", 1 * MiB, 8),
)


# ---- building -------------------------------------------------------------------------------------------


def build() -> None:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise Unavailable("`make` and `gcc` are needed to build guests/virtio_bench.S")
    proc = subprocess.run(["make", "-s", "-C", str(GUESTS), "build/virtio_bench.bin"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BenchFailure(f"building the guest failed (make exit status {proc.returncode})")


def make_disk(directory: str, size: int) -> str:
    """A disk image of ``size`` random bytes, read once so that it is in the page cache."""
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    with open(path, "rb") as f:
        while f.read(MiB):
            pass
    return path


def offsets(workload: Workload, n: int, disk_size: int, seed: int) -> list[int]:
    """Byte offsets of the N requests: random and aligned, or sequential and wrapping."""
    if workload.name == "4k-random":
        rng = random.Random(seed)
        return [rng.randrange(disk_size // workload.size) * workload.size for _ in range(n)]
    return [(i * workload.size) % disk_size for i in range(n)]


# ---- the host's reference: preadv in a Python loop -------------------------------------------------------


def run_host(path: str, size: int, offs: list[int]) -> int:
    """ns for preadv of ``size`` bytes at each offset into one buffer."""
    buf = bytearray(size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        preadv, bufs = os.preadv, [buf]
        start = time.monotonic_ns()
        for off in offs:
            if preadv(fd, bufs, off) != size:
                raise BenchFailure(f"host: short read at {off}")
        return time.monotonic_ns() - start
    finally:
        os.close(fd)


# ---- the guest ------------------------------------------------------------------------------------------


def _guest_machine(path: str, image: bytes, mem: int):
    from pykvm.virtio import VirtioBlk

    machine = Machine(mem, irqchip=True)
    try:
        transport = machine.add_virtio(VirtioBlk(path, readonly=True))
        machine.load_flat(image, "long")
    except BaseException:
        machine.close()
        raise
    return machine, transport


def _params(machine: Machine, transport, **values: int) -> None:
    block = {name: 0 for name in PARAMS}
    block.update(mmio=transport.gpa, qsize=QUEUE_SIZE, desc=DESC, avail=AVAIL, used=USED, depth=1, chains=1,
                 status=STATUS, reg=TRAPPED_REGISTER, headers=HEADERS)
    block.update(values)
    machine.memory.write(P_BLOCK, struct.pack(f"<{len(PARAMS)}Q", *(block[name] for name in PARAMS)))
    regs = machine.vcpu.get_regs()
    regs.rdi = P_BLOCK
    machine.vcpu.set_regs(regs)


def _timed_run(machine: Machine, timeout: float) -> tuple[int, int]:
    """Run the guest to DONE; (its status, ns between its SYNC(1) and SYNC(2))."""
    marks: dict[int, int] = {}
    machine.on_sync = lambda value: marks.setdefault(value, time.monotonic_ns())
    outcome = machine.run(timeout=timeout)
    if outcome.failure is not None:
        raise BenchFailure(f"the guest failed: {outcome.failure}")
    if 1 not in marks or 2 not in marks:
        raise BenchFailure(f"the guest did not SYNC(1) and SYNC(2) (saw {sorted(marks)})")
    return outcome.status, marks[2] - marks[1]


def run_guest_blk(path: str, image: bytes, workload: Workload, offs: list[int], depth: int,
                  timeout: float) -> tuple[int, dict, int]:
    """ns for the guest's N requests through virtio-blk, the transport's counters, and how many
    impossible used.idx values the guest read (P_TORN)."""
    k = workload.chains
    mem = DATA + k * workload.size + 1 * MiB
    machine, transport = _guest_machine(path, image, mem)
    with machine:
        memory = machine.memory
        desc = bytearray()
        for j in range(k):
            desc += struct.pack("<QIHH", HEADERS + 16 * j, 16, DESC_F_NEXT, 3 * j + 1)
            desc += struct.pack("<QIHH", DATA + j * workload.size, workload.size, DESC_F_NEXT | DESC_F_WRITE, 3 * j + 2)
            desc += struct.pack("<QIHH", STATUS + j, 1, DESC_F_WRITE, 0)
        memory.write(DESC, bytes(desc))
        memory.write(HEADERS, b"".join(struct.pack("<IIQ", T_IN, 0, 0) for _ in range(k)))
        memory.write(AVAIL, struct.pack("<HH", VIRTQ_AVAIL_F_NO_INTERRUPT, 0))
        memory.write(SECTORS, struct.pack(f"<{len(offs)}Q", *(off // SECTOR for off in offs)))
        _params(machine, transport, loop=LOOP_BLK, n=len(offs), depth=min(depth, k), chains=k, sectors=SECTORS)
        errors, ns = _timed_run(machine, timeout)
        if errors:
            raise BenchFailure(f"{workload.name}: {errors} requests completed with a status other than VIRTIO_BLK_S_OK "
                               f"({transport.error or 'no device error'})")
        # the data the last request on each chain read is the image's at that offset
        with open(path, "rb") as f:
            for i in range(max(0, len(offs) - k), len(offs)):
                f.seek(offs[i])
                got, want = memory.read(DATA + (i % k) * workload.size, workload.size), f.read(workload.size)
                if got != want:
                    bad = [x for x in range(0, len(got), 4096) if got[x:x + 4096] != want[x:x + 4096]]
                    raise BenchFailure(f"{workload.name}: request {i} (offset {offs[i]}) read the wrong data "
                                       f"in {len(bad)} of its {len(got) // 4096} pages (first at +{bad[0]:#x})")
        torn = struct.unpack_from("<Q", memory.read(P_BLOCK + 8 * PARAMS.index("torn"), 8))[0]
        return ns, dict(transport.stats), torn


def run_guest_writes(path: str, image: bytes, loop: int, n: int, timeout: float) -> tuple[int, dict]:
    """ns for the guest's N writes to QueueNotify (ioeventfd) or to a trapped register."""
    machine, transport = _guest_machine(path, image, DATA + 1 * MiB)
    with machine:
        machine.memory.write(AVAIL, struct.pack("<HH", VIRTQ_AVAIL_F_NO_INTERRUPT, 0))
        _params(machine, transport, loop=loop, n=n)
        _, ns = _timed_run(machine, timeout)
        stats = dict(transport.stats)
        if loop == LOOP_NOTIFY and not transport.ioeventfd:
            raise Unavailable(f"no ioeventfd on QueueNotify here: {transport.error}")
        return ns, stats


# ---- the benchmark --------------------------------------------------------------------------------------


def benchmark(args, progress=lambda text: None) -> dict:
    if not os.path.exists("/dev/kvm"):
        raise Unavailable("/dev/kvm does not exist: this host has no KVM, so there is nothing to measure")
    build()
    image = IMAGE.read_bytes()
    counts = {"4k-random": args.random_reads, "1m-seq": args.seq_reads}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_virtio.") as tmp:
        disk = make_disk(tmp, args.disk_mib * MiB)
        plan = {w.name: offsets(w, counts[w.name], args.disk_mib * MiB, args.seed) for w in WORKLOADS}
        times: dict[str, dict[str, list[int]]] = {w.name: {"host": [], "guest": []} for w in WORKLOADS}
        writes: dict[str, list[int]] = {"notify": [], "trapped": []}
        stats: dict[str, dict] = {}
        torn = {w.name: 0 for w in WORKLOADS}
        timeout = args.timeout
        # an untimed warm-up of each path (small N), then the timed repetitions, interleaved
        for w in WORKLOADS:
            run_host(disk, w.size, plan[w.name][:8])
            torn[w.name] += run_guest_blk(disk, image, w, plan[w.name][:8], args.depth, timeout)[2]
        run_guest_writes(disk, image, LOOP_NOTIFY, 100, timeout)
        run_guest_writes(disk, image, LOOP_TRAPPED, 10, timeout)
        for r in range(args.repeat):
            for w in WORKLOADS:
                progress(f"{w.name}: run {r + 1} of {args.repeat}")
                times[w.name]["host"].append(run_host(disk, w.size, plan[w.name]))
                ns, stats[w.name], bad = run_guest_blk(disk, image, w, plan[w.name], args.depth, timeout)
                times[w.name]["guest"].append(ns)
                torn[w.name] += bad
            progress(f"notify / trapped: run {r + 1} of {args.repeat}")
            ns, stats["notify"] = run_guest_writes(disk, image, LOOP_NOTIFY, args.notifies, timeout)
            writes["notify"].append(ns)
            ns, stats["trapped"] = run_guest_writes(disk, image, LOOP_TRAPPED, args.trapped, timeout)
            writes["trapped"].append(ns)

    for w in WORKLOADS:
        n = counts[w.name]
        entry = {"what": w.what, "requests": n, "request_bytes": w.size, "depth": min(args.depth, w.chains)}
        for side in ("host", "guest"):
            med = statistics.median(times[w.name][side])
            entry[side] = {
                "us_per_request": round(med / n / 1000, 2),
                "iops": round(n / (med / 1e9)),
                "mb_per_s": round(n * w.size / (med / 1e9) / 1e6, 1),
                "runs_ns": times[w.name][side],
            }
        entry["ratio"] = round(statistics.median(times[w.name]["guest"]) / statistics.median(times[w.name]["host"]), 2)
        entry["transport_stats"] = stats[w.name]
        entry["torn_used_idx_reads"] = torn[w.name]
        results[w.name] = entry
    notify_ns = statistics.median(writes["notify"]) / args.notifies
    trapped_ns = statistics.median(writes["trapped"]) / args.trapped
    return {
        "guest": str(IMAGE.relative_to(ROOT)),
        "guest_loop": "CPL3 (64-bit), after a CPL0 set-up of the device",
        "disk_bytes": args.disk_mib * MiB,
        "repeat": args.repeat,
        "host_cpu": _cpu_model(),
        "backend": _backend(),
        "python": platform.python_version(),
        "workloads": results,
        "notify": {
            "ioeventfd": {"writes": args.notifies, "ns_per_write": round(notify_ns, 1), "runs_ns": writes["notify"],
                          "transport_stats": stats["notify"]},
            "trapped": {"writes": args.trapped, "register": f"{TRAPPED_REGISTER:#05x} (QueueSel)",
                        "ns_per_write": round(trapped_ns, 1), "runs_ns": writes["trapped"],
                        "transport_stats": stats["trapped"]},
            "trapped/ioeventfd": round(trapped_ns / notify_ns, 2),
        },
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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

    console = Console()
    table = Table(title=f"virtio-blk reads by a CPL3 guest loop vs os.preadv on the host, median of {doc['repeat']}",
                  caption=", ".join(f"{name}: {w['requests']} reads, depth {w['depth']}" for name, w in doc["workloads"].items())
                  + f"; a {doc['disk_bytes'] // MiB} MiB image in the page cache; guest/host = how many times the "
                  f"host's read the virtio path costs. {doc['host_cpu']}, KVM backend: {doc['backend'] or 'unknown'}, "
                  f"Python {doc['python']}")
    table.add_column("workload", no_wrap=True)
    for label in ("µs/req", "IOPS", "MB/s"):
        table.add_column(f"host {label}", justify="right")
        table.add_column(f"guest {label}", justify="right")
    table.add_column("guest/ host", justify="right")
    for name, w in doc["workloads"].items():
        table.add_row(name,
                      *(f"{w[s][k]:.1f}" if k == "us_per_request" else f"{w[s][k]:,.0f}"
                        for k in ("us_per_request", "iops", "mb_per_s") for s in ("host", "guest")),
                      f"{w['ratio']:.2f}")
    console.print(table)
    n = doc["notify"]
    writes = Table(title="One guest write to the transport (CPL3), median ns per write",
                   caption="ioeventfd: QueueNotify, signalled in the kernel; trapped: QueueSel, an MMIO exit to Python")
    writes.add_column("write")
    writes.add_column("writes a run", justify="right")
    writes.add_column("ns / write", justify="right")
    writes.add_column("x a notify", justify="right")
    writes.add_row("QueueNotify (ioeventfd)", str(n["ioeventfd"]["writes"]), f"{n['ioeventfd']['ns_per_write']:.0f}", "1.00")
    writes.add_row("QueueSel (trapped)", str(n["trapped"]["writes"]), f"{n['trapped']['ns_per_write']:.0f}",
                   f"{n['trapped/ioeventfd']:.2f}")
    console.print(writes)


# ---- command line ---------------------------------------------------------------------------------------


_positive = argtypes.number(int, minimum=1, what="an integer")
_requests = argtypes.number(int, minimum=1, maximum=MAX_REQUESTS, what=f"an integer (at most {MAX_REQUESTS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_virtio.py",
        description="virtio-blk throughput and IOPS against os.preadv, and a notify against a trapped register write.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--random-reads", type=_requests, default=5000, metavar="N",
                        help="4 KiB random reads a run (default: 5000)")
    parser.add_argument("--seq-reads", type=_requests, default=200, metavar="N",
                        help="1 MiB sequential reads a run (default: 200)")
    parser.add_argument("--notifies", type=_positive, default=20000, metavar="N",
                        help="QueueNotify writes a run (default: 20000)")
    parser.add_argument("--trapped", type=_positive, default=2000, metavar="N",
                        help="trapped register writes a run (default: 2000)")
    parser.add_argument("--depth", type=argtypes.number(int, minimum=1, maximum=32, what="an integer"), default=1,
                        help="requests the guest keeps in flight, 1-32 (default: 1, as the host's loop)")
    parser.add_argument("--disk-mib", type=argtypes.number(int, minimum=1, maximum=4096, what="an integer"),
                        default=64, metavar="MIB", help="size of the disk image (default: 64)")
    parser.add_argument("--repeat", "-r", type=_positive, default=5, help="runs of each (default: 5)")
    parser.add_argument("--seed", type=int, default=15, help="seed of the random offsets (default: 15)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a guest run may take (default: 300)")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if sys.stderr.isatty() and not args.json:
            from rich.console import Console

            with Console(stderr=True).status("measuring") as status:
                doc = benchmark(args, lambda text: status.update(text))
        else:
            doc = benchmark(args)
    except (Unavailable, KvmUnsupportedError, KvmUnavailableError) as e:
        print(f"bench_virtio: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (BenchFailure, GuestError, KvmError) as e:
        print(f"bench_virtio: {e.report() if isinstance(e, GuestError) else e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bench_virtio: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
