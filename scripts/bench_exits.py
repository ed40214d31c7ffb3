#!/usr/bin/env python3
"""bench_exits.py - the cost of one port-I/O exit handled in Python, as a ratio to the same loop in C.

One command runs guests/build/bench_io.bin (16-bit real mode: an `inl` of the count N from
BENCH_PORT, then N `outb` to BENCH_PORT, then DONE) three ways, with the same N:

  c        scripts/exit_loop.c: the reference loop in C (compiled here with `cc -O2`)
  bare     Vcpu.run() + an isinstance check per exit, the IoIn answered with N
  machine  Machine.run(): the full policy loop, a no-op handler registered on BENCH_PORT

Each is timed from the first KVM_RUN to the DONE exit (CLOCK_MONOTONIC) and divided by the exits
in that window (N + 2). Each is repeated --repeat times, interleaved in a rotating order; the
median ns per exit is reported, with the ratios bare/c and machine/c. Speed is only ever a ratio
against the C run of the same command: no absolute number here is a pass/fail threshold.

Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm, no compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvm import exits  # noqa: E402
from pykvm.ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError  # noqa: E402
from pykvm.machine import GuestError, Machine, describe_exit  # noqa: E402
from pykvm.system import Kvm  # noqa: E402
from pykvm.x86 import layout  # noqa: E402

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4

GUESTS = ROOT / "guests"
IMAGE = GUESTS / "build" / "bench_io.bin"
C_SOURCE = ROOT / "scripts" / "exit_loop.c"
C_BUILD = ROOT / "scripts" / "build"  # git-ignored (the repository ignores every build/)
C_BINARY = C_BUILD / "exit_loop"
MEM_SIZE = layout.MIN_MEM_SIZE  # exit_loop.c maps the same 1 MiB

VARIANTS = ("c", "bare", "machine")
DESCRIPTIONS = {
    "c": "C loop (scripts/exit_loop.c, cc -O2)",
    "bare": "Python: Vcpu.run() + isinstance, IoIn answered",
    "machine": "Python: Machine.run() policy loop, no-op handler on BENCH_PORT",
}
LABELS = {"c": "c: exit_loop.c", "bare": "bare: Vcpu.run()", "machine": "machine: Machine.run()"}

EXAMPLES = """\
examples:
  python scripts/bench_exits.py                       N = 20000, 5 repetitions, a table
  python scripts/bench_exits.py --iterations 100000 --repeat 9
  python scripts/bench_exits.py --json | jq .ratios
"""


class Unavailable(Exception):
    """This host cannot run the benchmark (exit status 4)."""


class BenchFailure(Exception):
    """A run went wrong (exit status 1)."""


# ---- building ---------------------------------------------------------------------------------------


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


# ---- the three loops --------------------------------------------------------------------------------

_C_LINE = re.compile(r"exits=(\d+) io_out=(\d+) seconds=([0-9.]+) ns_per_exit=([0-9.]+)")


def run_c(n: int) -> tuple[int, int]:
    """(exits, nanoseconds) of one run of the C loop."""
    proc = subprocess.run([str(C_BINARY), str(IMAGE), str(n)], capture_output=True, text=True)
    if proc.returncode == EXIT_UNAVAILABLE:
        raise Unavailable(proc.stderr.strip())
    match = _C_LINE.fullmatch(proc.stdout.strip())
    if proc.returncode != 0 or not match:
        raise BenchFailure(f"exit_loop failed (exit status {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    exit_count, io_out = int(match[1]), int(match[2])
    if io_out != n:
        raise BenchFailure(f"exit_loop counted {io_out} writes, expected {n}")
    return exit_count, round(float(match[3]) * 1e9)


def new_machine(kvm: Kvm, image: bytes) -> Machine:
    machine = Machine(MEM_SIZE, kvm=kvm)
    try:
        machine.load_flat(image, "real")
    except BaseException:
        machine.close()
        raise
    return machine


def run_bare(kvm: Kvm, image: bytes, n: int) -> tuple[int, int]:
    """(exits, nanoseconds): the bare loop of Vcpu.run(), as exit_loop.c does it."""
    IoOut, IoIn = exits.IoOut, exits.IoIn
    bench, call = layout.BENCH_PORT, layout.CALL_PORT
    with new_machine(kvm, image) as machine:
        vcpu = machine.vcpu
        run = vcpu.run
        exit_count = io_out = 0
        start = time.monotonic_ns()
        while True:
            exit = run()
            exit_count += 1
            if isinstance(exit, IoOut):
                if exit.port == bench:
                    io_out += 1
                    continue
                if exit.port == call:
                    break
            elif isinstance(exit, IoIn) and exit.port == bench:
                exit.reply(n)
                continue
            raise BenchFailure(f"bare loop: unexpected exit {describe_exit(exit)} after {exit_count} exits")
        elapsed = time.monotonic_ns() - start
        status = vcpu.get_regs().rbx & 0xFFFFFFFF
        if exit.value != layout.CALL_DONE or status != 0:
            raise BenchFailure(f"bare loop: the guest did not say DONE(0) (call {exit.value:#x}, status {status:#x})")
    if io_out != n:
        raise BenchFailure(f"bare loop counted {io_out} writes, expected {n}")
    return exit_count, elapsed


def run_machine(kvm: Kvm, image: bytes, n: int) -> tuple[int, int]:
    """(exits, nanoseconds): Machine.run() with a no-op handler on BENCH_PORT (it answers the inl with N)."""
    IoIn = exits.IoIn

    def bench_port(exit, vcpu):
        if isinstance(exit, IoIn):
            exit.reply(n)

    with new_machine(kvm, image) as machine:
        machine.bus.add_port(layout.BENCH_PORT, bench_port)
        start = time.monotonic_ns()
        outcome = machine.run()
        elapsed = time.monotonic_ns() - start
    if not outcome.ok:
        raise BenchFailure(f"Machine.run: the guest ended with status {outcome.status} ({outcome.failure})")
    if outcome.exits != n + 2:
        raise BenchFailure(f"Machine.run saw {outcome.exits} exits, expected {n + 2}")
    return outcome.exits, elapsed


# ---- the benchmark ----------------------------------------------------------------------------------


def benchmark(n: int, repeat: int, progress=None) -> dict:
    """Run each variant ``repeat`` times (interleaved, after one short untimed warm-up round)."""
    try:
        kvm = Kvm()
    except KvmUnavailableError as e:
        raise Unavailable(e.strerror) from None
    image = IMAGE.read_bytes()
    runners = {
        "c": lambda count: run_c(count),
        "bare": lambda count: run_bare(kvm, image, count),
        "machine": lambda count: run_machine(kvm, image, count),
    }
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for name in VARIANTS:  # warm-up: page in the binaries, the code paths, the caches
            runners[name](min(n, 1000))
        for i in range(repeat):
            for name in VARIANTS[i % 3 :] + VARIANTS[: i % 3]:  # rotate: no loop always runs first
                if progress is not None:
                    progress(f"run {i + 1}/{repeat}: {DESCRIPTIONS[name]}")
                exit_count, ns = runners[name](n)
                samples[name].append(ns / exit_count)
    finally:
        kvm.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "guest": str(IMAGE.relative_to(ROOT)),
        "iterations": n,
        "exits_per_run": n + 2,
        "repeat": repeat,
        "backend": _backend(),
        "python": platform.python_version(),
        "results": {
            name: {
                "description": DESCRIPTIONS[name],
                "ns_per_exit": round(medians[name], 1),
                "runs_ns_per_exit": [round(v, 1) for v in samples[name]],
                "min_ns_per_exit": round(min(samples[name]), 1),
                "max_ns_per_exit": round(max(samples[name]), 1),
            }
            for name in VARIANTS
        },
        "ratios": {
            "bare/c": round(medians["bare"] / medians["c"], 3),
            "machine/c": round(medians["machine"] / medians["c"], 3),
        },
        "python_overhead_ns_per_exit": {
            "bare": round(medians["bare"] - medians["c"], 1),
            "machine": round(medians["machine"] - medians["c"], 1),
        },
    }


def _backend() -> str | None:
    try:
        from pykvm.probe.host import kvm_backend
    except ImportError:
        return None
    return kvm_backend()


# ---- output -----------------------------------------------------------------------------------------


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"One port-I/O exit: {doc['guest']}, N = {doc['iterations']} "
        f"({doc['exits_per_run']} exits a run), median of {doc['repeat']}",
        caption=f"vs C = median ns/exit / the C median, same command. "
        f"KVM backend: {doc['backend'] or 'unknown'}, Python {doc['python']}",
    )
    table.add_column("loop")
    table.add_column("ns/exit (median)", justify="right")
    table.add_column("min - max", justify="right")
    table.add_column("vs C", justify="right")
    table.add_column("Python adds", justify="right")
    for name in VARIANTS:
        r = doc["results"][name]
        ratio = "1.000" if name == "c" else f"{doc['ratios'][f'{name}/c']:.3f}"
        extra = "" if name == "c" else f"{doc['python_overhead_ns_per_exit'][name]:+.0f} ns"
        table.add_row(
            LABELS[name], f"{r['ns_per_exit']:.0f}", f"{r['min_ns_per_exit']:.0f} - {r['max_ns_per_exit']:.0f}",
            ratio, extra,
        )
    Console().print(table)


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _iterations(text: str) -> int:
    value = _positive(text)
    if value > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError("the guest counts in 32 bits: at most 4294967295")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_exits.py",
        description="Cost of one port-I/O exit handled in Python, as a ratio to the same loop in C.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--iterations", "-n", type=_iterations, default=20000, metavar="N",
                        help="port-I/O exits per run (default: 20000)")
    parser.add_argument("--repeat", "-r", type=_positive, default=5, help="runs of each loop (default: 5)")
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
                doc = benchmark(args.iterations, args.repeat, lambda text: status.update(text))
        else:
            doc = benchmark(args.iterations, args.repeat)
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
        print_table(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
