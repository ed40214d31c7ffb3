#!/usr/bin/env python3
"""bench_many.py - many independent tiny guests at once: threads, processes or pytest-xdist workers,
against the same guests run one by one, pinned to 1 core and to 2 cores, in one command.

A guest here is a whole job, as a test suite or a batch runs it: Machine create, long-mode or
real-mode set-up, Machine.run() to DONE (with a timeout), close. Two kinds:

  compute  guests/cpl3_loop.S: iretq to CPL3 and a `dec; jnz` loop of --compute-iterations there,
           then DONE: one exit to user space. kvm_pvm runs CPL3 natively: guest-bound work, with
           the GIL released in KVM_RUN for the whole loop.
  exits    guests/bench_io.S's io_out loop: --exit-iterations `outb`s, each an exit answered by a
           Machine.on_port handler in Python (CPL0 code, which kvm_pvm emulates): exit-bound work,
           where Python runs (holding the GIL) at every exit.

Ways to run --guests of them (--workers at a time, the same number in every concurrent way):

  serial     one after another in this process (the reference)
  threads    a ThreadPoolExecutor in this process, one Kvm shared
  processes  a multiprocessing pool (fork; each worker opens its own Kvm); the pool's start-up is
             timed apart and not in the rate
  pytest     `python -m pytest -n 0` of a generated file with one test per guest (one by one, in a
             fresh interpreter: start-up, collection and reporting included)
  xdist      the same file with `pytest -n WORKERS` (pytest-xdist): worker start-up included

Each way runs with this process's CPU affinity set to one core, then two (os.sched_setaffinity;
threads, pool workers and pytest inherit it). Rates are guests per second (guests / wall time),
the median of --repeat runs taken in a rotating order. The load average before and after is
recorded: on a shared host, say when it was busy.

Exit status: 0 ok, 1 a run failed, 2 usage, 4 this host cannot run it (no /dev/kvm, fewer than
2 usable cores for the 2-core runs is reported, not fatal; no make/gcc).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvm import argtypes  # noqa: E402
from pykvm.ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError  # noqa: E402
from pykvm.machine import GuestError, Machine  # noqa: E402
from pykvm.system import Kvm  # noqa: E402
from pykvm.x86 import layout  # noqa: E402

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4

GUESTS = ROOT / "guests"
BUILD = GUESTS / "build"
KINDS = {
    "compute": "guests/cpl3_loop.S: a loop at CPL3 (native on kvm_pvm), 1 exit",
    "exits": "guests/bench_io.S io_out: an outb exit per iteration, answered in Python",
}
IMAGES = {"compute": BUILD / "cpl3_loop.bin", "exits": BUILD / "bench_io.bin"}
MODES = ("serial", "threads", "processes", "pytest", "xdist")
MEM_SIZE = 2 * layout.MIN_MEM_SIZE
TIMEOUT = 120.0  # seconds a guest may run (Machine.run's timeout): a hang fails instead of blocking

EXAMPLES = """\
examples:
  python scripts/bench_many.py                         24 guests of each kind, 2 workers, 1 and 2 cores, 3 runs
  python scripts/bench_many.py --guests 48 --repeat 5 --modes serial,threads,processes
  python scripts/bench_many.py --json | jq '.results.compute'
"""


class Unavailable(Exception):
    """This host cannot run the benchmark (exit status 4)."""


class BenchFailure(Exception):
    """A run went wrong (exit status 1)."""


# ---- one guest --------------------------------------------------------------------------------------------

_images: dict[str, bytes] = {}
_kvm: Kvm | None = None


def _image(kind: str) -> bytes:
    if kind not in _images:
        _images[kind] = IMAGES[kind].read_bytes()
    return _images[kind]


def job(kind: str, iterations: int, kvm: Kvm | None = None) -> int:
    """Run one guest of ``kind`` from Machine create to close; returns its exits to user space."""
    image = _image(kind)
    with Machine(MEM_SIZE, kvm=kvm) as m:
        if kind == "compute":
            m.load_flat(image, "long")
            regs = m.vcpu.get_regs()
            regs.rcx = iterations
        else:
            m.load_flat(image, "real")
            seen = [0]

            def count(exit, vcpu):
                seen[0] += 1

            m.on_port(layout.BENCH_PORT, count, name="bench port")
            regs = m.vcpu.get_regs()
            regs.rax, regs.rcx = layout.BENCH_LOOP_OUT, iterations
        m.vcpu.set_regs(regs)
        outcome = m.run(timeout=TIMEOUT)
    if not outcome.ok:
        raise BenchFailure(f"{kind}: the guest ended with status {outcome.status} ({outcome.failure})")
    if kind == "exits" and seen[0] != iterations:
        raise BenchFailure(f"exits: the handler saw {seen[0]} writes, expected {iterations}")
    return outcome.exits


def _worker_init() -> None:
    global _kvm
    _kvm = Kvm()


def _worker_job(kind: str, iterations: int) -> int:
    return job(kind, iterations, _kvm)


# ---- the ways to run N guests: each returns wall seconds ------------------------------------------------


def run_serial(kvm: Kvm, kind: str, iterations: int, guests: int, workers: int) -> float:
    start = time.perf_counter()
    for _ in range(guests):
        job(kind, iterations, kvm)
    return time.perf_counter() - start


def run_threads(kvm: Kvm, kind: str, iterations: int, guests: int, workers: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda _: job(kind, iterations, kvm), range(guests)):
            pass
    return time.perf_counter() - start


class Pool:
    """A multiprocessing pool started (and warmed: each worker opened /dev/kvm) under the current affinity."""

    def __init__(self, workers: int):
        start = time.perf_counter()
        self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
        self.pool.starmap(_worker_job, [("compute", 0)] * workers, chunksize=1)  # warm: a guest each (likely)
        self.start_seconds = time.perf_counter() - start

    def run(self, kind: str, iterations: int, guests: int) -> float:
        start = time.perf_counter()
        self.pool.starmap(_worker_job, [(kind, iterations)] * guests, chunksize=1)
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


TEST_FILE = '''\
"""Generated by scripts/bench_many.py: one test per guest."""
import os
import sys
import time

import pytest

sys.path.insert(0, {scripts!r})
import bench_many  # noqa: E402

KIND, ITERATIONS = os.environ["BENCH_MANY_KIND"], int(os.environ["BENCH_MANY_ITERATIONS"])


@pytest.mark.parametrize("i", range(int(os.environ["BENCH_MANY_GUESTS"])))
def test_guest(i):
    start = time.time()
    bench_many.job(KIND, ITERATIONS)
    end = time.time()
    with open(os.path.join(os.environ["BENCH_MANY_TIMES"], f"{{os.getpid()}}.times"), "a") as f:
        f.write(f"{{start}} {{end}}\\n")
'''


def run_pytest(tmp: Path, kind: str, iterations: int, guests: int, workers: int | None) -> tuple[float, float]:
    """Wall seconds of `python -m pytest` on the generated file (-n 0: one by one; -n W: xdist), and
    the seconds from the first test's start to the last test's end (the tests' own time stamps)."""
    times = tmp / "times"
    shutil.rmtree(times, ignore_errors=True)
    times.mkdir()
    env = {**os.environ, "BENCH_MANY_KIND": kind, "BENCH_MANY_ITERATIONS": str(iterations),
           "BENCH_MANY_GUESTS": str(guests), "BENCH_MANY_TIMES": str(times), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp / "pytest.ini"),
           "--rootdir", str(tmp), "-n", str(workers or 0), str(tmp / "test_many.py")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BenchFailure(f"pytest {'-n ' + str(workers) if workers else '-n 0'} failed "
                           f"(exit status {proc.returncode}):\n{tail}")
    stamps = [tuple(map(float, line.split())) for f in times.iterdir() for line in f.read_text().splitlines()]
    if len(stamps) != guests:
        raise BenchFailure(f"pytest ran {len(stamps)} guests, expected {guests}")
    return elapsed, max(end for _, end in stamps) - min(start for start, _ in stamps)


def write_test_file(tmp: Path) -> None:
    (tmp / "pytest.ini").write_text("[pytest]\n")
    (tmp / "test_many.py").write_text(TEST_FILE.format(scripts=str(ROOT / "scripts")))


# ---- the benchmark ---------------------------------------------------------------------------------------


def xdist_available() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def build() -> None:
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` is not installed: it is needed to build the guests")
    proc = subprocess.run(["make", "-s", "-C", str(GUESTS), *(str(p.relative_to(GUESTS)) for p in IMAGES.values())],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BenchFailure("building the guests failed")


def _cpu_seconds() -> tuple[float, float, float]:
    """(host busy CPU seconds from /proc/stat, this process's and its waited-for children's CPU
    seconds, monotonic time): the difference of two samples says how much the others used."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    t = os.times()
    return (busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system,
            time.monotonic())


def others_busy(before, after) -> float:
    """Cores' worth of CPU that other processes on the host used between two samples (0 = idle)."""
    host, own, wall = (a - b for a, b in zip(after, before))
    return max(0.0, (host - own) / wall) if wall > 0 else 0.0


def core_sets() -> dict[int, set[int]]:
    """{1: one core, 2: two cores} from the cores this process may use (2 missing on a 1-core host)."""
    usable = sorted(os.sched_getaffinity(0))
    return {n: set(usable[:n]) for n in (1, 2) if len(usable) >= n}


def benchmark(kinds: list[str], modes: list[str], guests: int, workers: int, repeat: int,
              iterations: dict[str, int], progress=None) -> dict:
    try:
        kvm = Kvm()
    except KvmUnavailableError as e:
        raise Unavailable(e.strerror) from None
    if ("pytest" in modes or "xdist" in modes) and not xdist_available():
        raise Unavailable("pytest-xdist is not installed (pip install -e '.[test]'); or leave out --modes pytest,xdist")
    original = os.sched_getaffinity(0)
    cores = core_sets()
    load_before = os.getloadavg()
    cpu_before = _cpu_seconds()
    seconds: dict[str, dict[int, dict[str, list[float]]]] = {
        k: {c: {m: [] for m in modes} for c in cores} for k in kinds}
    spans: dict[str, dict[int, dict[str, list[float]]]] = {
        k: {c: {m: [] for m in modes} for c in cores} for k in kinds}
    pool_start: dict[int, float] = {}
    serial_guest_ms: dict[str, dict[int, float]] = {k: {} for k in kinds}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_many.") as tmpdir:
            tmp = Path(tmpdir)
            write_test_file(tmp)
            for kind in kinds:  # warm-up, unpinned: page in the images and code paths
                job(kind, min(iterations[kind], 1000), kvm)
            for ncores, cpus in cores.items():
                os.sched_setaffinity(0, cpus)
                pool = Pool(workers) if "processes" in modes else None
                try:
                    if pool is not None:
                        pool_start[ncores] = round(pool.start_seconds, 3)
                    runners = {
                        "serial": lambda k: run_serial(kvm, k, iterations[k], guests, workers),
                        "threads": lambda k: run_threads(kvm, k, iterations[k], guests, workers),
                        "processes": lambda k: pool.run(k, iterations[k], guests),
                        "pytest": lambda k: run_pytest(tmp, k, iterations[k], guests, None),
                        "xdist": lambda k: run_pytest(tmp, k, iterations[k], guests, workers),
                    }
                    for i in range(repeat):
                        order = modes[i % len(modes):] + modes[:i % len(modes)]
                        for kind in kinds:
                            for mode in order:
                                if progress is not None:
                                    progress(f"{ncores} core(s), run {i + 1}/{repeat}: {kind}, {mode}")
                                took = runners[mode](kind)
                                if isinstance(took, tuple):  # pytest: (wall, first test start to last end)
                                    took, span = took
                                    spans[kind][ncores][mode].append(span)
                                seconds[kind][ncores][mode].append(took)
                finally:
                    if pool is not None:
                        pool.close()
                    os.sched_setaffinity(0, original)
    finally:
        os.sched_setaffinity(0, original)
        kvm.close()
    load_after = os.getloadavg()
    others = others_busy(cpu_before, _cpu_seconds())

    results: dict = {}
    for kind in kinds:
        results[kind] = {}
        for ncores in cores:
            rows = {}
            for mode in modes:
                med = statistics.median(seconds[kind][ncores][mode])
                rows[mode] = {"guests_per_s": round(guests / med, 4), "median_s": round(med, 4),
                              "runs_s": [round(s, 4) for s in seconds[kind][ncores][mode]]}
                if spans[kind][ncores][mode]:  # pytest: the rate inside the tests, and what came around them
                    span = statistics.median(spans[kind][ncores][mode])
                    rows[mode]["in_tests_guests_per_s"] = round(guests / span, 4)
                    rows[mode]["outside_tests_s"] = round(statistics.median(
                        w - t for w, t in zip(seconds[kind][ncores][mode], spans[kind][ncores][mode])), 3)
            if "serial" in rows:
                base = rows["serial"]["guests_per_s"]
                for mode in modes:
                    rows[mode]["x_serial"] = round(rows[mode]["guests_per_s"] / base, 3)
                serial_guest_ms[kind][ncores] = round(1000 / base, 2)
            results[kind][ncores] = rows
    scaling = {kind: {mode: round(results[kind][2][mode]["guests_per_s"] / results[kind][1][mode]["guests_per_s"], 2)
                      for mode in modes}
               for kind in kinds if 1 in cores and 2 in cores}
    return {
        "guests": guests,
        "workers": workers,
        "repeat": repeat,
        "iterations": {k: iterations[k] for k in kinds},
        "kinds": {k: KINDS[k] for k in kinds},
        "modes": modes,
        "cores": {n: sorted(c) for n, c in cores.items()},
        "unit": "guests per second: guests / wall seconds (Machine create, set-up, run to DONE, close), "
                "median of the runs",
        "backend": _backend(),
        "cpu": _cpu(),
        "python": platform.python_version(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "others_cores_busy": round(others, 2),
        "host_cpus": os.cpu_count(),
        "pool_start_s": pool_start,
        "serial_ms_per_guest": serial_guest_ms,
        "results": results,
        "scaling_2_over_1_core": scaling,
    }


def _backend() -> str | None:
    try:
        from pykvm.probe.host import kvm_backend
    except ImportError:
        return None
    return kvm_backend()


def _cpu() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ---- output ---------------------------------------------------------------------------------------------


def print_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cores = list(doc["cores"])
    for kind, by_cores in doc["results"].items():
        table = Table(title=f"{kind}: {doc['guests']} guests ({doc['kinds'][kind]}, "
                            f"{doc['iterations'][kind]:,} iterations), {doc['workers']} workers",
                      caption=f"guests per second, median of {doc['repeat']}; x serial = against one by one "
                              f"on the same cores. {doc['cpu'] or '?'}, KVM backend {doc['backend'] or 'unknown'}")
        table.add_column("way")
        for n in cores:
            table.add_column(f"{n} core{'s' if n > 1 else ''} guests/s", justify="right")
            table.add_column("x serial", justify="right")
        if len(cores) == 2:
            table.add_column("2 cores / 1", justify="right")
        for mode in doc["modes"]:
            cells = []
            for n in cores:
                r = by_cores[n][mode]
                cells += [f"{r['guests_per_s']:.1f}", f"{r.get('x_serial', 0):.2f}"]
            if len(cores) == 2:
                cells.append(f"{doc['scaling_2_over_1_core'][kind][mode]:.2f}")
            table.add_row(mode, *cells)
        console.print(table)
        for mode in ("pytest", "xdist"):
            if mode in doc["modes"]:
                console.print(f"  {mode}, inside the tests (first start to last end): " + ", ".join(
                    f"{by_cores[n][mode]['in_tests_guests_per_s']:.1f} guests/s ({n} core{'s' if n > 1 else ''}; "
                    f"{by_cores[n][mode]['outside_tests_s']:.2f} s of start-up and collection around them)"
                    for n in cores))
        if doc["serial_ms_per_guest"].get(kind):
            console.print("  one guest, one by one: " + ", ".join(
                f"{ms:.1f} ms ({n} core{'s' if n > 1 else ''})" for n, ms in doc["serial_ms_per_guest"][kind].items()))
    if doc["pool_start_s"]:
        console.print("process pool start-up (not in the rates): " + ", ".join(
            f"{s * 1000:.0f} ms ({n} core{'s' if n > 1 else ''})" for n, s in doc["pool_start_s"].items()))
    console.print(f"load average before {doc['load_before']}, after {doc['load_after']}; other processes kept "
                  f"{doc['others_cores_busy']:.2f} of the host's {doc['host_cpus']} CPUs busy during the runs")


# ---- command line ---------------------------------------------------------------------------------------

_positive = argtypes.number(int, minimum=1, what="an integer")
_count = argtypes.number(int, minimum=0, maximum=0xFFFFFFFF, what="an integer (the guest counts in 32 bits)")


def _names(allowed, what):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                                             f"choose from {', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_many.py",
        description="Many tiny guests at once (threads, processes, pytest-xdist) against one by one, on 1 and 2 cores.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--guests", "-n", type=_positive, default=24, help="guests per run (default: 24)")
    parser.add_argument("--workers", "-w", type=_positive, default=2,
                        help="threads / processes / xdist workers at a time (default: 2)")
    parser.add_argument("--repeat", "-r", type=_positive, default=3, help="runs of each way (default: 3)")
    parser.add_argument("--kinds", "-k", type=_names(KINDS, "kind"), default=list(KINDS), metavar="A,B",
                        help=f"guest kinds (default: all): {', '.join(KINDS)}")
    parser.add_argument("--modes", "-m", type=_names(MODES, "mode"), default=list(MODES), metavar="A,B",
                        help=f"ways to run them (default: all): {', '.join(MODES)}")
    parser.add_argument("--compute-iterations", type=_count, default=100_000_000, metavar="N",
                        help="CPL3 loop iterations of a compute guest (default: 100000000, about 50 ms here)")
    parser.add_argument("--exit-iterations", type=_count, default=2000, metavar="N",
                        help="exits of an exits guest (default: 2000, about 25 ms here)")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    iterations = {"compute": args.compute_iterations, "exits": args.exit_iterations}
    try:
        if not os.path.exists("/dev/kvm"):
            raise Unavailable("/dev/kvm does not exist: this host has no KVM, so there is nothing to measure")
        build()
        run = lambda progress=None: benchmark(args.kinds, args.modes, args.guests, args.workers,  # noqa: E731
                                              args.repeat, iterations, progress)
        if sys.stderr.isatty() and not args.json:
            from rich.console import Console

            with Console(stderr=True).status("measuring") as status:
                doc = run(lambda text: status.update(text))
        else:
            doc = run()
    except (Unavailable, KvmUnsupportedError) as e:
        print(f"bench_many: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (BenchFailure, GuestError, KvmError) as e:
        print(f"bench_many: {e.report() if isinstance(e, GuestError) else e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bench_many: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
