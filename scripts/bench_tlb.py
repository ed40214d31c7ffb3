#!/usr/bin/env python3
"""bench_tlb.py - how fast the TLB model replays a trace, as a ratio to a bare Python loop over it.

One command generates the default `pykvm tlb` workload with N accesses (1,000,000 by default;
a VM exit every ~1000 guest accesses, a context switch every ~2000, seed 1) and times, with the
same trace in memory:

  bare         `for a in trace.pages: x ^= a` - the reference: the least a Python loop over the
               trace can do
  untagged     pykvm.model.tlb.replay() under each policy: the default TLB (L1 16x4, L2 128x12,
  tagged       paging-structure caches 4/4/32), page walks counted, flushes as the policy does them
  tagged+pcid

Each is run --repeat times, interleaved in a rotating order, after one untimed warm-up of the
bare loop; the table shows the median seconds, the min-max spread, accesses per second and the
ratio to the bare loop. Generating the trace is timed once and shown apart. Speed is only ever a
ratio against the reference run of the same command: no number here is a pass/fail threshold.

Exit status: 0 ok, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvm import argtypes  # noqa: E402
from pykvm.model.tlb import Policy, TLBConfig, replay  # noqa: E402
from pykvm.model.workload import Workload  # noqa: E402

EXIT_OK, EXIT_USAGE = 0, 2
VARIANTS = ("bare", *(p.value for p in Policy))

EXAMPLES = """\
examples:
  python scripts/bench_tlb.py                          1,000,000 accesses, 3 repetitions, a table
  python scripts/bench_tlb.py --world-switch-every 50  the flush-heavy case
  python scripts/bench_tlb.py -n 200000 -r 5 --json | jq .variants
"""


def bare_loop(pages: list[int]) -> int:
    x = 0
    for a in pages:
        x ^= a
    return x


def run_variant(name: str, trace, config: TLBConfig) -> tuple[float, float | None]:
    """(seconds, miss rate or None for the bare loop)."""
    start = time.perf_counter()
    if name == "bare":
        bare_loop(trace.pages)
        return time.perf_counter() - start, None
    stats = replay(trace, name, config)
    return time.perf_counter() - start, stats.miss_rate


def benchmark(workload: Workload, repeat: int, progress=None) -> dict:
    config = TLBConfig()
    start = time.perf_counter()
    trace = workload.generate()
    generate_seconds = time.perf_counter() - start
    bare_loop(trace.pages)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    miss_rate: dict[str, float] = {}
    for i in range(repeat):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
        for name in order:
            seconds, rate = run_variant(name, trace, config)
            times[name].append(seconds)
            if rate is not None:
                miss_rate[name] = rate
            if progress:
                progress()
    n = trace.accesses
    bare = statistics.median(times["bare"])
    variants = {}
    for name in VARIANTS:
        median = statistics.median(times[name])
        variants[name] = {
            "median_seconds": median,
            "min_seconds": min(times[name]),
            "max_seconds": max(times[name]),
            "accesses_per_second": n / median if median else None,
            "ratio_to_bare": median / bare if bare else None,
            "miss_rate": miss_rate.get(name),
        }
    return {
        "accesses": n,
        "events": trace.counts(),
        "workload": workload.to_json(),
        "tlb": config.to_json(),
        "repeat": repeat,
        "generate_seconds": generate_seconds,
        "reference": "bare: `for a in trace.pages: x ^= a` over the same trace",
        "python": platform.python_version(),
        "variants": variants,
    }


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    w = doc["workload"]
    table = Table(title=f"TLB replay of {doc['accesses']:,} accesses ({w['vms']} VMs x {w['procs']} processes, "
                        f"VM exit every ~{w['world_switch_every']}, median of {doc['repeat']}; "
                        f"Python {doc['python']})")
    for name, justify in (("variant", "left"), ("median s", "right"), ("min-max s", "right"),
                          ("accesses/s", "right"), ("x bare loop", "right"), ("miss rate", "right")):
        table.add_column(name, justify=justify)
    for name, v in doc["variants"].items():
        rate = v["miss_rate"]
        table.add_row(name, f"{v['median_seconds']:.3f}", f"{v['min_seconds']:.3f}-{v['max_seconds']:.3f}",
                      f"{v['accesses_per_second']:,.0f}", f"{v['ratio_to_bare']:.1f}",
                      "-" if rate is None else f"{100 * rate:.2f}%")
    console.print(table)
    console.print(f"generating the trace took {doc['generate_seconds']:.3f} s (once, not in the table)", highlight=False)


_positive = argtypes.number(int, minimum=1, what="a whole number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_tlb.py",
        description="Time pykvm.model.tlb.replay() on a generated trace under each policy, as a ratio to a bare "
                    "Python loop over the same trace.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--accesses", type=_positive, default=1_000_000, help="accesses in the trace (1000000)")
    parser.add_argument("-r", "--repeat", type=_positive, default=3, help="runs of each variant (3)")
    parser.add_argument("--world-switch-every", type=_positive, default=Workload.world_switch_every, metavar="N",
                        help=f"mean guest accesses between VM exits ({Workload.world_switch_every})")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = Workload(accesses=args.accesses, world_switch_every=args.world_switch_every, seed=args.seed)
    progress = stop = None
    if sys.stderr.isatty() and not args.json:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("replaying", total=args.repeat * len(VARIANTS))
        progress, stop = (lambda: bar.advance(task)), bar.stop
    try:
        doc = benchmark(workload, args.repeat, progress)
    finally:
        if stop:
            stop()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
