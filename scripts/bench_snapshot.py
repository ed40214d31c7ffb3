#!/usr/bin/env python3
"""bench_snapshot.py - what a snapshot, a restore and a fast reset cost, each against a reference
run in the same command.

  snapshot / restore   for each guest memory size (--sizes, 16 MiB to 1 GiB) twice: mostly idle (the
                       guest image and the set-up tables) and fully dirtied (every page written from
                       the host). Machine.snapshot() is set against copying the same RAM in memory
                       (bytes(ram): the floor of any full save) and Machine.from_snapshot() against
                       building a new Machine of that size (what a restore replaces). The file's size
                       on disk is printed (zero pages are holes).
  fast reset           guests/dirty_pages.S dirtying 1, 16 and 256 pages (--pages) a run: resets a
                       second with Machine.checkpoint() + run + Machine.reset(), against a full restore
                       from a file + run + close, and against a new Machine + load + run + close.

Speed is only ever a ratio against a reference in the same command: nothing here is a pass/fail
threshold. Firecracker's performance tests, quoted beside the figures, take about 8-9 ms to load a
2-vCPU, 256-512 MiB microVM snapshot on an m5d.metal host (kernel 4.14) as their baseline, and
160-300 ms to create a full snapshot of it (70-75 ms a diff snapshot).

Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm import argtypes  # noqa: E402
from pykvm.images import guest_image  # noqa: E402
from pykvm.ioctl import KvmError, KvmUnavailableError  # noqa: E402
from pykvm.machine import Machine  # noqa: E402
from pykvm.system import Kvm  # noqa: E402

MIB = 1 << 20


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _fill(m: Machine) -> None:
    """Write every page of RAM from the host, each differently (no zero page stays)."""
    ram = m.ram._map
    chunk = bytes(range(256)) * 16  # 4 KiB
    for off in range(0, len(ram), 4096):
        ram[off : off + 4096] = chunk[: 4088] + off.to_bytes(8, "little")


def bench_snapshot(kvm: Kvm, image: bytes, size: int, full: bool, repeat: int, tmp: str) -> dict:
    path = os.path.join(tmp, f"s{size}.snap")
    saves, copies, restores, builds = [], [], [], []
    for _ in range(repeat):
        with Machine(size, kvm=kvm) as m:
            m.load_flat(image, "long")
            if full:
                _fill(m)
            t = time.perf_counter()
            copy = bytes(m.ram._map)
            copies.append(time.perf_counter() - t)
            del copy
            t = time.perf_counter()
            sizes = m.snapshot(path)
            saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        with Machine.from_snapshot(path, kvm=kvm):
            restores.append(time.perf_counter() - t)
        t = time.perf_counter()
        with Machine(size, kvm=kvm):
            builds.append(time.perf_counter() - t)
    os.unlink(path)
    return {"size": size, "full": full, "snapshot_ms": _median_ms(saves), "ram_copy_ms": _median_ms(copies),
            "restore_ms": _median_ms(restores), "new_machine_ms": _median_ms(builds),
            "on_disk": sizes["on_disk"], "pages_saved": sizes["pages_saved"]}


def _run(m: Machine, pages: int) -> None:
    regs = m.vcpu.get_regs()
    regs.rcx = pages
    m.vcpu.set_regs(regs)
    if not m.run(timeout=60).ok:
        raise RuntimeError("dirty_pages did not end with DONE(0)")


def bench_reset(kvm: Kvm, image: bytes, pages: int, rounds: int, dirty: str, tmp: str) -> dict:
    path = os.path.join(tmp, "reset.snap")
    with Machine(kvm=kvm, dirty=dirty) as m:
        m.load_flat(image, "long")
        regs = m.vcpu.get_regs()
        regs.rcx = pages
        m.vcpu.set_regs(regs)
        m.snapshot(path)
        m.checkpoint()
        kind = m.dirty.kind
        restored = []
        t = time.perf_counter()
        for _ in range(rounds):
            assert m.run(timeout=60).ok
            restored.append(m.reset()["pages"])
        reset_rate = rounds / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(max(rounds // 10, 3)):
        with Machine.from_snapshot(path, kvm=kvm) as r:
            assert r.run(timeout=60).ok
    restore_rate = max(rounds // 10, 3) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(max(rounds // 10, 3)):
        with Machine(kvm=kvm) as n:
            n.load_flat(image, "long")
            _run(n, pages)
    new_rate = max(rounds // 10, 3) / (time.perf_counter() - t)
    os.unlink(path)
    return {"pages": pages, "tracking": kind, "pages_copied_back": statistics.median(restored),
            "resets_per_s": reset_rate, "restores_per_s": restore_rate, "new_machines_per_s": new_rate,
            "reset_vs_restore": reset_rate / restore_rate, "reset_vs_new": reset_rate / new_rate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python scripts/bench_snapshot.py\n"
                                       "  python scripts/bench_snapshot.py --sizes 16M,256M --pages 1,256 --json")
    p.add_argument("--sizes", default="16M,64M,256M,1G", help="guest memory sizes (default %(default)s)")
    p.add_argument("--pages", default="1,16,256", help="pages the reset guest dirties a run (default %(default)s)")
    p.add_argument("--repeat", type=argtypes.number(int, minimum=1, what="a count"), default=3,
                   help="snapshots and restores of each size (default %(default)s)")
    p.add_argument("--rounds", type=argtypes.number(int, minimum=10, what="a count"), default=200,
                   help="fast resets of each page count (default %(default)s)")
    p.add_argument("--dirty", choices=("auto", "bitmap", "ring"), default="auto", help="dirty tracking of the resets")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = p.parse_args(argv)
    try:
        sizes = [argtypes.size(s) for s in args.sizes.split(",")]
        pages = [int(n) for n in args.pages.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    if any(n < 0 or n > 512 for n in pages):
        p.error("--pages: 0 to 512 (dirty_pages writes from 2 MiB up, in 4 MiB of guest RAM)")
    try:
        kvm = Kvm()
    except KvmUnavailableError as e:
        print(f"bench_snapshot: {e.strerror}", file=sys.stderr)
        return 4
    image = guest_image("dirty_pages").read_bytes()
    doc = {"host": platform.processor() or platform.machine(), "python": platform.python_version(),
           "snapshots": [], "resets": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
            for size in sizes:
                for full in (False, True):
                    doc["snapshots"].append(bench_snapshot(kvm, image, size, full, args.repeat, tmp))
            for n in pages:
                doc["resets"].append(bench_reset(kvm, image, n, args.rounds, args.dirty, tmp))
    except (KvmError, RuntimeError, AssertionError) as e:
        print(f"bench_snapshot: a run failed: {e}", file=sys.stderr)
        return 1
    finally:
        kvm.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Snapshot and restore against guest memory size (median ms)")
    for col in ("RAM", "memory", "snapshot", "RAM copy", "snapshot / copy", "restore", "new Machine",
                "restore / new", "on disk"):
        t.add_column(col, justify="right")
    for r in doc["snapshots"]:
        t.add_row(f"{r['size'] // MIB} MiB", "fully dirtied" if r["full"] else "mostly idle",
                  f"{r['snapshot_ms']:.1f}", f"{r['ram_copy_ms']:.1f}",
                  f"{r['snapshot_ms'] / max(r['ram_copy_ms'], 1e-6):.1f}", f"{r['restore_ms']:.2f}",
                  f"{r['new_machine_ms']:.2f}", f"{r['restore_ms'] / max(r['new_machine_ms'], 1e-6):.2f}",
                  f"{r['on_disk'] // 1024} KiB")
    c = Console()
    c.print(t)
    t = Table(title="Fast reset against a full restore and a new Machine (each: run the guest once more)")
    for col in ("pages dirtied", "tracking", "copied back", "resets/s", "restores/s", "new Machines/s",
                "x restore", "x new"):
        t.add_column(col, justify="right")
    for r in doc["resets"]:
        t.add_row(str(r["pages"]), r["tracking"], f"{r['pages_copied_back']:.0f}", f"{r['resets_per_s']:.0f}",
                  f"{r['restores_per_s']:.0f}", f"{r['new_machines_per_s']:.0f}", f"{r['reset_vs_restore']:.1f}",
                  f"{r['reset_vs_new']:.1f}")
    c.print(t)
    c.print("Firecracker's performance tests: about 8-9 ms to load a 2-vCPU 256-512 MiB snapshot (m5d.metal, "
            "host 4.14), 160-300 ms to create a full one, 70-75 ms a diff one (their baselines, not a measurement here).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
