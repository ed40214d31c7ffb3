#!/usr/bin/env python3
"""bench_migrate.py - live migration's downtime and total time against the rate the guest dirties
memory, each against references run in the same command.

The guest (guests/dirty_rate.S) writes one quadword into each page of a region (--region, from
2 MiB up) batch by batch (--batch pages), round robin; after each batch its OUT to BENCH_PORT
is answered by a handler that sleeps the guest to the asked dirtying rate (--rates, pages a
second; "max": no pacing, as fast as this backend runs the loop; a rate ending in "-cpl3", such
as "max-cpl3", runs the guest's loop at CPL3, which kvm_pvm runs natively, not in KVM's
emulator). For each rate the machine is migrated live (pykvm.migration.migrate, --downtime budget) to a destination in another process,
over a UNIX socket, and the figures are: pre-copy rounds, pages and MiB sent, total time, the
downtime (from the request to stop the vCPUs until the destination said it runs), whether the
last set fit the budget, and the dirtying rate measured while it ran.

References, in the same command:
  stop-and-copy      the same guest paused first, then migrated: all of memory is sent with the
                     guest stopped, so its downtime is the whole migration (what live
                     migration avoids);
  transport          the same bytes as that stop-and-copy, through the same kind of socket,
                     without pykvm (sendall against recv_into): the floor of any migration.
Each row's downtime is also given as a fraction of the stop-and-copy's.

Speed is only ever a ratio against a reference in the same command: nothing here is a pass/fail
threshold. Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm import argtypes  # noqa: E402
from pykvm.images import guest_image  # noqa: E402
from pykvm.ioctl import KvmError, KvmUnavailableError  # noqa: E402
from pykvm.machine import Machine, Paused  # noqa: E402
from pykvm.migration import MigrationError, migrate  # noqa: E402
from pykvm.outcome import Outcome  # noqa: E402
from pykvm.x86 import layout  # noqa: E402

MIB = 1 << 20
PAGE = 4096
REGION_BASE = 0x200000  # guests/dirty_rate.S

#: The destination: takes one migration after another on a UNIX socket, drops each machine at once.
DESTINATION = textwrap.dedent("""
    import sys
    from pykvm.migration import Incoming, MigrationError
    with Incoming(sys.argv[1]) as incoming:
        print(incoming.address, flush=True)
        for _ in range(int(sys.argv[2])):
            try:
                m, info = incoming.accept(timeout=60, wait=300)
            except MigrationError as e:
                print("error:", e, flush=True)
                continue
            m.close()
            print("ok", info["pages"], flush=True)
""")


class Pacer:
    """The BENCH_PORT handler: sleeps the guest so that it dirties at most ``rate`` pages a second
    (0: one batch, then nothing; None: no pacing). Machine.sleep wakes when the migration asks
    the vCPUs to stop, so the pacing does not add to the downtime."""

    def __init__(self, machine: Machine, batch: int, rate: float | None) -> None:
        self.machine, self.batch, self.rate = machine, batch, rate
        self.batches = 0
        self.start = None
        self.stop_after: int | None = None

    def __call__(self, exit, vcpu):
        now = time.monotonic()
        if self.start is None:
            self.start = now
        self.batches += 1
        if self.stop_after is not None and self.batches >= self.stop_after:
            return Outcome(0, via="bench")
        if self.rate == 0:
            self.machine.sleep(3600)
        elif self.rate:
            due = self.start + self.batches * self.batch / self.rate
            if due > now:
                self.machine.sleep(due - now)
        return None

    def measured_rate(self) -> float:
        elapsed = time.monotonic() - (self.start or time.monotonic())
        return self.batches * self.batch / elapsed if elapsed > 0 else 0.0


def _machine(image: bytes, mem: int, region: int, batch: int, rate: float | None, dirty: str | None,
             cpl3: bool = False):
    m = Machine(mem, dirty=dirty)
    m.load_flat(image, "long")
    regs = m.vcpu.get_regs()
    regs.rcx, regs.r8, regs.rdx = batch, region, int(cpl3)
    m.vcpu.set_regs(regs)
    pacer = Pacer(m, batch, rate)
    m.on_port(layout.BENCH_PORT, pacer, count=4, name="bench pacer")
    return m, pacer


def _destination(tmp: str, count: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", DESTINATION, f"unix:{tmp}/dest.sock", str(count)],
                            stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    if not address.startswith("unix:"):
        raise RuntimeError("the destination did not start")
    return proc, address


def _took(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline().strip()
    if not line.startswith("ok"):
        raise RuntimeError(f"the destination: {line or 'gone'}")


def bench_live(image: bytes, args, rate: float | None, cpl3: bool, proc, address: str) -> dict:
    m, pacer = _machine(image, args.mem, args.region, args.batch, rate, args.dirty, cpl3)
    with m:
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(outcome=m.run(timeout=300)))
        thread.start()
        time.sleep(args.warmup)  # the guest settles at its rate before the migration starts
        try:
            report = migrate(m, address, downtime=args.downtime / 1e3, max_rounds=args.max_rounds)
        finally:
            if m.migrated_to is None:
                m.stop("benchmark")
            thread.join()
        dirty_rate = pacer.measured_rate()
        _took(proc)
    return {"rate": rate, "cpl": 3 if cpl3 else 0, "measured_pages_per_s": dirty_rate, **_row(report)}


def _row(report) -> dict:
    return {"rounds": len(report.rounds), "pages": report.pages, "mib": report.bytes / MIB,
            "total_ms": report.seconds * 1e3, "downtime_ms": report.downtime * 1e3,
            "final_pages": report.final.pages if report.final else 0, "converged": report.converged,
            "dirty": report.dirty}


def bench_stop_and_copy(image: bytes, args, proc, address: str) -> dict:
    """The reference: the guest paused, then moved; every page it wrote goes in the stop."""
    m, pacer = _machine(image, args.mem, args.region, args.batch, None, args.dirty)
    with m:
        pacer.stop_after = max(args.region // args.batch, 1) + 1  # one pass over the whole region
        outcome = m.run(timeout=300)
        if isinstance(outcome, Paused) or outcome.via != "bench":
            raise RuntimeError(f"the reference guest ended with {outcome}")
        stopped = time.monotonic()
        # a request between runs is served at once: the whole migration is the stop
        report = migrate(m, address, downtime=args.downtime / 1e3, max_rounds=1)
        report.downtime = time.monotonic() - stopped
        _took(proc)
    return _row(report)


def bench_transport(nbytes: int, tmp: str) -> dict:
    """Send ``nbytes`` through a UNIX stream socket to another thread: the floor of the stream."""
    path = os.path.join(tmp, "floor.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got = [0]

    def sink():
        conn, _ = listener.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            k = conn.recv_into(view)
            if not k:
                break
            got[0] += k
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    chunk = os.urandom(1 << 20)
    start = time.monotonic()
    sent = 0
    while sent < nbytes:
        s.sendall(chunk[: min(len(chunk), nbytes - sent)])
        sent += min(len(chunk), nbytes - sent)
    s.close()
    t.join()
    seconds = time.monotonic() - start
    listener.close()
    return {"mib": got[0] / MIB, "ms": seconds * 1e3, "mib_per_s": got[0] / MIB / seconds if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python scripts/bench_migrate.py\n"
                                       "  python scripts/bench_migrate.py --rates 0,20000,max --region 4096 --json")
    p.add_argument("--mem", type=argtypes.size, default=64 * MIB, help="guest memory (default 64M)")
    p.add_argument("--region", type=argtypes.number(int, minimum=1, what="a page count"), default=8192,
                   help="pages the guest dirties round robin, from 2 MiB up (default %(default)s: 32 MiB)")
    p.add_argument("--batch", type=argtypes.number(int, minimum=1, what="a page count"), default=16,
                   help="pages a batch between two pacing exits (default %(default)s)")
    p.add_argument("--rates", default="0,1000,10000,50000,200000,max,max-cpl3",
                   help="dirtying rates in pages a second, 'max' unpaced; '-cpl3' after one: the loop at CPL3 "
                        "(default %(default)s)")
    p.add_argument("--downtime", type=argtypes.number(float, minimum=0.1, what="milliseconds"), default=10.0,
                   help="the downtime budget in ms (default %(default)s)")
    p.add_argument("--max-rounds", type=argtypes.number(int, minimum=1, what="a count"), default=30,
                   help="pre-copy rounds at most (default %(default)s)")
    p.add_argument("--repeat", type=argtypes.number(int, minimum=1, what="a count"), default=3,
                   help="migrations at each rate; the median is shown (default %(default)s)")
    p.add_argument("--warmup", type=argtypes.number(float, minimum=0.0, what="seconds"), default=0.2,
                   help="seconds the guest runs before the migration starts (default %(default)s)")
    p.add_argument("--dirty", choices=("auto", "bitmap", "ring"), default="auto", help="dirty tracking")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = p.parse_args(argv)
    try:
        rates = [_rate(r) for r in args.rates.split(",")]
    except ValueError:
        p.error(f"--rates: numbers or 'max', each maybe ending in -cpl3, not {args.rates!r}")
    if REGION_BASE + args.region * PAGE > args.mem:
        p.error(f"--region {args.region} pages from 2 MiB do not fit in --mem {args.mem // MIB} MiB")
    try:
        Machine(layout.MIN_MEM_SIZE).close()
    except KvmUnavailableError as e:
        print(f"bench_migrate: {e.strerror}", file=sys.stderr)
        return 4
    image = guest_image("dirty_rate").read_bytes()
    doc = {"host": platform.processor() or platform.machine(), "python": platform.python_version(),
           "mem": args.mem, "region_pages": args.region, "batch": args.batch, "downtime_budget_ms": args.downtime,
           "live": [], "stop_and_copy": None, "transport": None}
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
            proc, address = _destination(tmp, args.repeat * (len(rates) + 1))
            try:
                refs = [bench_stop_and_copy(image, args, proc, address) for _ in range(args.repeat)]
                doc["stop_and_copy"] = _median_row(refs)
                doc["transport"] = bench_transport(int(doc["stop_and_copy"]["mib"] * MIB), tmp)
                for rate, cpl3 in rates:
                    rows = [bench_live(image, args, rate, cpl3, proc, address)
                            for _ in range(args.repeat)]
                    row = _median_row(rows)
                    row["downtime_vs_stop_and_copy"] = row["downtime_ms"] / max(doc["stop_and_copy"]["downtime_ms"], 1e-9)
                    doc["live"].append(row)
            finally:
                proc.kill()
                proc.wait()
    except (KvmError, RuntimeError, MigrationError, OSError) as e:
        print(f"bench_migrate: a run failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print(doc)
    return 0


def _rate(token: str) -> tuple[float | None, bool]:
    """--rates' item: (pages a second or None for unpaced, whether the loop runs at CPL3)."""
    token = token.strip()
    cpl3 = token.endswith("-cpl3")
    token = token.removesuffix("-cpl3")
    return (None if token == "max" else float(token)), cpl3


def _median_row(rows: list[dict]) -> dict:
    """The row of the median downtime (its other figures with it), and how many converged."""
    ordered = sorted(rows, key=lambda r: r["downtime_ms"])
    row = dict(ordered[len(ordered) // 2])
    row["converged_runs"] = sum(1 for r in rows if r["converged"])
    row["runs"] = len(rows)
    row["total_ms_median"] = statistics.median(r["total_ms"] for r in rows)
    return row


def _print(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ref, floor = doc["stop_and_copy"], doc["transport"]
    t = Table(title=f"Live migration of a {doc['mem'] // MIB} MiB guest dirtying {doc['region_pages']} pages round "
                    f"robin (downtime budget {doc['downtime_budget_ms']:g} ms; medians)")
    for col in ("asked pages/s", "CPL", "measured pages/s", "rounds", "MiB sent", "total ms", "downtime ms", "last set",
                "fit budget", "downtime / stop-and-copy"):
        t.add_column(col, justify="right")
    for r in doc["live"]:
        t.add_row("idle" if r["rate"] == 0 else "max" if r["rate"] is None else f"{r['rate']:.0f}", str(r["cpl"]),
                  f"{r['measured_pages_per_s']:.0f}", str(r["rounds"]), f"{r['mib']:.1f}", f"{r['total_ms_median']:.0f}",
                  f"{r['downtime_ms']:.1f}", str(r["final_pages"]), f"{r['converged_runs']}/{r['runs']}",
                  f"{r['downtime_vs_stop_and_copy']:.3f}")
    c = Console(width=max(Console().width, 120))
    c.print(t)
    c.print(f"stop-and-copy reference (paused, then moved): {ref['mib']:.1f} MiB, downtime {ref['downtime_ms']:.1f} ms; "
            f"transport floor for the same bytes: {floor['ms']:.1f} ms ({floor['mib_per_s']:.0f} MiB/s), so pykvm's "
            f"stop-and-copy runs at {floor['ms'] / max(ref['downtime_ms'], 1e-9):.2f}x the bare socket.")


if __name__ == "__main__":
    sys.exit(main())
