"""``pykvm tlb``: replay an access trace through the TLB model under three tagging policies.

The lead's ``pykvm/cli.py`` registers the command with :func:`add_parser` and runs it through
``args.func(args)`` (:func:`cmd_tlb`), which returns the exit status: 0 ok, 2 usage (bad options,
an unreadable or malformed trace), 4 the environment cannot do it (``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import argtypes
from .. import status as _status
from .tlb import Policy, ReplayStats, TLBConfig, default_pwc, replay
from .workload import TRACE_FORMAT, Trace, TraceError, Workload, parse_trace, read_trace

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = _status.OK, _status.USAGE, _status.UNAVAILABLE

POLICIES = tuple(p.value for p in Policy)
DEFAULT_SWEEP = (20000, 5000, 2000, 1000, 500, 200, 100, 50, 20)
PLOT_INSTALL_HINT = "pip install 'pykvm-driver[plot]' (or: pip install matplotlib)"

EXAMPLES = """\
examples:
  pykvm tlb                                    the default workload, the three policies, a table
  pykvm tlb --world-switch-every 50            a VM exit every ~50 guest accesses
  pykvm tlb --sweep --plot tlb.png             miss rate against world-switch rate, and its plot
  pykvm tlb --sweep --json | jq '.points[] | [.world_switches_per_1000, .results[].miss_rate]'
  pykvm tlb my.trace --levels 1 --sets 64 --ways 8
  pykvm tlb --accesses 5000 --write-trace small.trace   write the generated trace as a file

policies:
  untagged     no VPIDs/ASIDs: every world switch (VM entry or exit) flushes the TLB;
               every context switch (MOV to CR3) flushes the non-global entries
  tagged       VPID/ASID per VM: world switches keep the TLB; context switches in a guest
               flush that VM's non-global entries
  tagged+pcid  tagged, and each process has a PCID: MOV to CR3 with the no-flush bit

"""


_count = argtypes.number(int, minimum=0, what="a whole number")
_positive = argtypes.number(int, minimum=1, what="a whole number")
_fraction = argtypes.number(float, minimum=0.0, maximum=1.0, what="a number")
_exponent = argtypes.number(float, minimum=0.0, what="a number")


def _rates(text: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        try:
            value = int(part.strip(), 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r} (example: 10000,1000,100)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"every rate must be at least 1 access: {text!r}")
        values.append(value)
    return tuple(values)


def _pwc(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("0", "none", "off"):
        return ()
    try:
        values = tuple(int(p, 0) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r} (example: 4,4,32; or none)") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"paging-structure cache sizes must be at least 1: {text!r}")
    return values


def add_parser(subparsers) -> None:
    """Register ``tlb`` on an ``argparse`` subparsers object."""
    w = Workload()
    p = subparsers.add_parser(
        "tlb",
        help="replay an access trace through a tagged-TLB model (untagged, VPID/ASID, +PCID)",
        description=textwrap.fill(
            "Replay an access trace (a file, or a generated workload of VMs and processes) through a model of a "
            "set-associative TLB with paging-structure caches, under three policies: untagged, tagged by "
            "VPID/ASID, and tagged + PCID. Reports hits, misses, flushes and the memory references of page walks "
            "(1-D on the host, 2-D in guests under EPT/NPT); with --sweep, the miss rate against the "
            "world-switch rate, which --plot draws.", 79),
        epilog=EXAMPLES + TRACE_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", nargs="?", metavar="TRACE",
                   help="a trace file in the format below ('-': standard input); default: a generated workload")
    g = p.add_argument_group("generated workload (without TRACE)")
    g.add_argument("--vms", type=_positive, default=w.vms, metavar="N", help=f"guests (default {w.vms})")
    g.add_argument("--procs", type=_positive, default=w.procs, metavar="N",
                   help=f"processes per guest, each with its own PCID (default {w.procs})")
    g.add_argument("--working-set", type=_positive, default=w.working_set, metavar="PAGES",
                   help=f"4K user pages per process (default {w.working_set})")
    g.add_argument("--kernel-pages", type=_count, default=w.kernel_pages, metavar="PAGES",
                   help=f"global kernel pages per guest (default {w.kernel_pages})")
    g.add_argument("--kernel-fraction", type=_fraction, default=w.kernel_fraction, metavar="F",
                   help=f"share of a process's accesses that go to kernel pages (default {w.kernel_fraction})")
    g.add_argument("--host-accesses", type=_count, default=w.host_accesses, metavar="N",
                   help=f"host accesses on each VM exit (default {w.host_accesses})")
    g.add_argument("--accesses", type=_positive, default=w.accesses, metavar="N",
                   help=f"accesses in the trace, host ones included (default {w.accesses})")
    g.add_argument("--world-switch-every", type=_count, default=w.world_switch_every, metavar="N",
                   help=f"mean guest accesses between VM exits; 0: never (default {w.world_switch_every})")
    g.add_argument("--context-switch-every", type=_count, default=w.context_switch_every, metavar="N",
                   help=f"mean accesses of a guest between its context switches; 0: never "
                        f"(default {w.context_switch_every})")
    g.add_argument("--zipf", type=_exponent, default=w.zipf, metavar="S",
                   help=f"Zipf exponent of page popularity (0: uniform; default {w.zipf})")
    g.add_argument("--seed", type=_count, default=w.seed, metavar="S", help=f"random seed (default {w.seed})")
    t = p.add_argument_group("TLB")
    c = TLBConfig()
    t.add_argument("--sets", type=_positive, default=c.sets, metavar="S", help=f"L1 sets (default {c.sets})")
    t.add_argument("--ways", type=_positive, default=c.ways, metavar="W", help=f"L1 ways (default {c.ways})")
    t.add_argument("--levels", type=int, choices=(1, 2), default=c.levels,
                   help=f"TLB levels: 1, or 2 with a second-level TLB (default {c.levels})")
    t.add_argument("--l2-sets", type=_positive, default=c.l2_sets, metavar="S",
                   help=f"L2 sets with --levels 2 (default {c.l2_sets})")
    t.add_argument("--l2-ways", type=_positive, default=c.l2_ways, metavar="W",
                   help=f"L2 ways with --levels 2 (default {c.l2_ways})")
    t.add_argument("--pwc", type=_pwc, default=None, metavar="SIZES",
                   help="paging-structure cache entries per upper level, top down, or 'none' "
                        f"(default {','.join(map(str, default_pwc(4)))} for PML4E,PDPTE,PDE)")
    t.add_argument("--paging-levels", type=int, choices=(4, 5), default=c.guest_levels,
                   help=f"guest (and host) paging levels (default {c.guest_levels})")
    t.add_argument("--nested-levels", type=int, choices=(4, 5), default=c.nested_levels,
                   help=f"EPT/NPT levels (default {c.nested_levels})")
    o = p.add_argument_group("runs and output")
    o.add_argument("--policy", action="append", choices=POLICIES, metavar="POLICY",
                   help=f"run this policy only (repeatable; {', '.join(POLICIES)}; default: all three)")
    o.add_argument("--sweep", action="store_true",
                   help="run the generated workload at each world-switch rate of --sweep-every")
    o.add_argument("--sweep-every", type=_rates, default=DEFAULT_SWEEP, metavar="N,N,...",
                   help=f"the --world-switch-every values of a sweep (default {','.join(map(str, DEFAULT_SWEEP))})")
    o.add_argument("--plot", metavar="FILE",
                   help="draw miss rate and walk references against world switches (.png or .svg; implies --sweep)")
    o.add_argument("--write-trace", metavar="FILE", help="also write the generated trace to FILE in the trace format")
    o.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_tlb)


# ---- running --------------------------------------------------------------------------------------


@dataclass
class Point:
    """The policies replayed on one trace."""

    world_switch_every: int | None
    results: list[ReplayStats] = field(default_factory=list)

    @property
    def accesses(self) -> int:
        return self.results[0].accesses if self.results else 0

    @property
    def world_switches_per_1000(self) -> float:
        return 1000.0 * self.results[0].world_switches / self.accesses if self.accesses else 0.0

    @property
    def context_switches_per_1000(self) -> float:
        return 1000.0 * self.results[0].context_switches / self.accesses if self.accesses else 0.0

    def result(self, policy: str) -> ReplayStats | None:
        return next((r for r in self.results if r.policy == policy), None)

    def to_json(self) -> dict:
        return {"world_switch_every": self.world_switch_every,
                "accesses": self.accesses,
                "world_switches_per_1000": self.world_switches_per_1000,
                "context_switches_per_1000": self.context_switches_per_1000,
                "results": [r.to_json() for r in self.results]}


def run_point(trace: Trace, policies, config: TLBConfig, every: int | None, progress=None) -> Point:
    point = Point(every)
    for policy in policies:
        start = time.perf_counter()
        stats = replay(trace, policy, config)
        stats.seconds = time.perf_counter() - start
        point.results.append(stats)
        if progress is not None:
            progress()
    return point


def sweep(workload: Workload, rates, policies, config: TLBConfig, progress=None) -> list[Point]:
    """The policies at each world-switch rate (``world_switch_every`` values), same seed each time."""
    points = []
    for every in rates:
        trace = Workload(**{**workload.to_json(), "world_switch_every": every}).generate()
        points.append(run_point(trace, policies, config, every, progress))
    return points


# ---- output ---------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"pykvm: error: {message}", file=sys.stderr)


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%" if x >= 0.001 or x == 0 else f"{100 * x:.3f}%"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "all of them"


def describe_tlb(config: TLBConfig) -> str:
    l2 = f", L2 {config.l2_sets} sets x {config.l2_ways} ways" if config.levels == 2 else ""
    pwc = config.pwc if config.pwc is not None else default_pwc(config.guest_levels)
    pwc_text = "/".join(map(str, pwc)) + " entries" if pwc else "none"
    return (f"L1 {config.sets} sets x {config.ways} ways{l2}; paging-structure caches {pwc_text}; "
            f"{config.guest_levels}-level paging, {config.nested_levels}-level EPT/NPT")


def plot_title(workload: Workload | None, trace_name: str | None, config: TLBConfig) -> str:
    """A short two-line title for the plot."""
    if workload is not None:
        what = (f"{workload.vms} VMs x {workload.procs} processes x {workload.working_set} pages, "
                f"{workload.accesses:,} accesses, context switch every ~{workload.context_switch_every}, "
                f"seed {workload.seed}")
    else:
        what = f"trace {trace_name}"
    pwc = config.pwc if config.pwc is not None else default_pwc(config.guest_levels)
    l2 = f", L2 {config.l2_sets}x{config.l2_ways}" if config.levels == 2 else ""
    tlb = (f"L1 {config.sets}x{config.ways}{l2}, PSC {'/'.join(map(str, pwc)) or 'none'}, "
           f"{config.guest_levels}-level paging under {config.nested_levels}-level EPT/NPT")
    return f"pykvm tlb: {what}\n{tlb}"


def describe_workload(w: Workload) -> str:
    ws = f"a VM exit every ~{w.world_switch_every} guest accesses" if w.world_switch_every else "no VM exits"
    cs = f"a context switch every ~{w.context_switch_every}" if w.context_switch_every else "no context switches"
    return (f"{w.vms} VMs x {w.procs} processes x {w.working_set} pages (+{w.kernel_pages} global kernel pages "
            f"per VM, {w.host_accesses} host accesses per exit), Zipf {w.zipf}; {w.accesses:,} accesses; "
            f"{ws}, {cs}; seed {w.seed}")


def closing_note(points: list[Point]) -> str | None:
    """What the runs show, in a sentence or two (the low and the high world-switch rate)."""
    lines = []
    chosen = [points[0]] if len(points) == 1 else [min(points, key=lambda p: p.world_switches_per_1000),
                                                   max(points, key=lambda p: p.world_switches_per_1000)]
    for point in chosen:
        rates = ", ".join(f"{r.policy} {_percent(r.miss_rate)}" for r in point.results)
        text = f"at {point.world_switches_per_1000:.3g} world switches per 1000 accesses, miss rate {rates}"
        u, t = point.result("untagged"), point.result("tagged")
        if u and t and t.misses:
            text += f" (tagging cuts misses {_ratio(u.misses, t.misses)}"
            text += f", walk references {_ratio(u.walk_refs, t.walk_refs)})" if t.walk_refs else ")"
        lines.append(text)
    return "; ".join(lines) + "." if lines else None


def print_tables(points: list[Point], header: list[str], sweep_mode: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 150  # piped: the whole table, not 80 columns of ellipses
    for line in header:
        console.print(line, highlight=False, soft_wrap=True)
    if not sweep_mode:
        point = points[0]
        table = Table(title=f"{point.accesses:,} accesses, {point.world_switches_per_1000:.3g} world switches and "
                            f"{point.context_switches_per_1000:.3g} context switches per 1000")
        for name in ("policy", "misses", "miss rate", "flushes", "entries flushed", "1-D walks", "1-D refs",
                     "2-D walks", "2-D refs", "refs/access"):
            table.add_column(name, justify="left" if name == "policy" else "right")
        for r in point.results:
            table.add_row(r.policy, f"{r.misses:,}", _percent(r.miss_rate), f"{r.flushes:,}",
                          f"{r.entries_flushed:,}", f"{r.walks_1d:,}", f"{r.walk_refs_1d:,}", f"{r.walks_2d:,}",
                          f"{r.walk_refs_2d:,}", f"{r.walk_refs / r.accesses:.3f}" if r.accesses else "-")
        console.print(table)
    else:
        policies = [r.policy for r in points[0].results]
        table = Table(title="miss rate (and page-walk memory references per access) against world-switch rate")
        table.add_column("switch every", justify="right")
        table.add_column("world sw./1000", justify="right")
        for policy in policies:
            table.add_column(f"{policy} misses", justify="right")
        for policy in policies:
            table.add_column(f"{policy} refs/acc", justify="right")
        for point in points:
            table.add_row(str(point.world_switch_every), f"{point.world_switches_per_1000:.3g}",
                          *(_percent(r.miss_rate) for r in point.results),
                          *(f"{r.walk_refs / r.accesses:.3f}" for r in point.results))
        console.print(table)
    note = closing_note(points)
    if note:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


def write_plot(points: list[Point], path: str, title: str) -> None:
    """Miss rate (left) and walk memory references per access (right) against world switches per
    1000 accesses, one line per policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    xs = [p.world_switches_per_1000 for p in points]
    styles = {"untagged": ("tab:red", "o"), "tagged": ("tab:blue", "s"), "tagged+pcid": ("tab:green", "^")}
    for policy in [r.policy for r in points[0].results]:
        color, marker = styles.get(policy, (None, "x"))
        miss = [100 * p.result(policy).miss_rate for p in points]
        refs = [p.result(policy).walk_refs / p.accesses for p in points]
        left.plot(xs, miss, marker=marker, color=color, label=policy)
        right.plot(xs, refs, marker=marker, color=color, label=policy)
    for ax, label in ((left, "TLB miss rate (%)"), (right, "page-walk memory references per access")):
        if min(xs) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("world switches per 1000 accesses")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)


# ---- the command ----------------------------------------------------------------------------------


def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr when it is a terminal; (advance, stop)."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import Progress

    progress = Progress(console=Console(stderr=True), transient=True)
    progress.start()
    task = progress.add_task("replaying", total=total)
    return (lambda: progress.advance(task)), progress.stop


def cmd_tlb(args) -> int:
    """Run ``pykvm tlb``; returns the exit status."""
    policies = list(dict.fromkeys(args.policy)) if args.policy else list(POLICIES)
    sweep_mode = args.sweep or args.plot is not None
    if args.trace is not None and sweep_mode:
        _error("--sweep and --plot vary the generated workload's world-switch rate; they take no TRACE file")
        return EXIT_USAGE
    if args.trace is not None and args.write_trace:
        _error("--write-trace writes the generated workload; it takes no TRACE file")
        return EXIT_USAGE
    if sweep_mode and args.write_trace:
        _error("--write-trace writes one generated trace; leave out --sweep and --plot")
        return EXIT_USAGE
    if args.plot is not None:
        if Path(args.plot).suffix.lower() not in (".png", ".svg"):
            _error(f"--plot {args.plot}: the file name must end in .png or .svg")
            return EXIT_USAGE
        if importlib.util.find_spec("matplotlib") is None:
            _error(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL_HINT}")
            return EXIT_UNAVAILABLE
    try:
        config = TLBConfig(args.sets, args.ways, args.levels, args.l2_sets, args.l2_ways, args.pwc,
                           args.paging_levels, args.nested_levels)
        config.build()
        workload = None
        if args.trace is None:
            workload = Workload(vms=args.vms, procs=args.procs, working_set=args.working_set,
                                kernel_pages=args.kernel_pages, kernel_fraction=args.kernel_fraction,
                                host_accesses=args.host_accesses, zipf=args.zipf, accesses=args.accesses,
                                world_switch_every=args.world_switch_every,
                                context_switch_every=args.context_switch_every, seed=args.seed)
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE

    if args.trace is not None:
        try:
            trace = parse_trace(sys.stdin, "<stdin>") if args.trace == "-" else read_trace(args.trace)
        except TraceError as e:
            _error(f"malformed trace: {e}")
            return EXIT_USAGE
        except OSError as e:
            _error(f"cannot read the trace {args.trace}: {e.strerror or e}")
            return EXIT_USAGE
        if not trace.pages:
            _error(f"the trace {args.trace} has no accesses (A lines)")
            return EXIT_USAGE
        source = {"kind": "trace", "path": args.trace, "accesses": trace.accesses, "events": trace.counts()}
        header = [f"trace: {args.trace} ({trace.accesses:,} accesses)"]
        rates = [None]
    else:
        source = {"kind": "workload", "workload": workload.to_json()}
        header = [f"workload: {describe_workload(workload)}"]
        rates = list(args.sweep_every) if sweep_mode else [workload.world_switch_every]
        if sweep_mode:
            header[0] += " (the VM-exit interval varies)"
    header.append(f"TLB: {describe_tlb(config)}")

    advance, stop = _progress(len(rates) * len(policies), not args.json)
    try:
        if args.trace is not None:
            points = [run_point(trace, policies, config, None, advance)]
        elif sweep_mode:
            points = sweep(workload, rates, policies, config, advance)
        else:
            trace = workload.generate()
            if args.write_trace:
                try:
                    with open(args.write_trace, "w", encoding="utf-8") as fp:
                        trace.write(fp)
                except OSError as e:
                    _error(f"cannot write {args.write_trace}: {e.strerror or e}")
                    return EXIT_USAGE
            points = [run_point(trace, policies, config, workload.world_switch_every, advance)]
    finally:
        stop()

    if args.plot is not None:
        try:
            write_plot(points, args.plot, plot_title(workload, args.trace, config))
        except OSError as e:
            _error(f"cannot write the plot {args.plot}: {e.strerror or e}")
            return EXIT_USAGE

    if args.json:
        doc = {"source": source, "tlb": config.to_json(), "policies": policies, "sweep": sweep_mode,
               "points": [p.to_json() for p in points], "note": closing_note(points), "plot": args.plot}
        print(json.dumps(doc, indent=2))
    else:
        print_tables(points, header, sweep_mode)
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return EXIT_OK
