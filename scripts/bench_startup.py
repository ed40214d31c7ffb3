#!/usr/bin/env python3
"""bench_startup.py - how long `pykvm run`, `pykvm probe` and `pykvm probe --json` take from exec to exit,
as a ratio to the interpreter's own start-up (`python -c pass`) measured in the same command.

Each command is a fresh process, so what a user pays is what is timed: the interpreter's start,
the imports, the work (for `run`, a VM, the default guest's boot to DONE, and the close) and the
exit. The commands:

  floor       python -c pass                   the interpreter and site (the reference: ratio 1.00)
  import      python -c "import pykvm.machine" what a library user pays before making a Machine (most of
                                               what `pykvm run` imports: the rest of `run` is its work)
  run         pykvm run                        the default guest (long-mode hello), console to /dev/null
  probe       pykvm probe                      the human report (rich tables)
  probe_json  pykvm probe --json               the JSON document

`pykvm` is the console script beside the interpreter (`python -m pykvm` where there is none, or
with --module). Each command runs once untimed (so every .pyc is written), then --repeat times,
interleaved in a rotating order so that a slow spell of a shared host hits every command alike.
The table shows the median wall time (time.perf_counter around fork, exec and wait), the min-max
spread and the ratio of each median to the floor's. Speed is only ever a ratio against the floor
of the same command: no absolute number here is a pass/fail threshold.

Exit status: 0 ok, 1 a command failed (its stderr is shown), 2 usage, 4 this host cannot run
`pykvm run` (no /dev/kvm: only the commands that need no KVM are measured, with --no-kvm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4
PROBE_STATUSES = (0, 66)  # usable, not usable here: both are a probe that ran

EXAMPLES = """\
examples:
  python scripts/bench_startup.py                  every command, 21 runs each, a table
  python scripts/bench_startup.py -r 51 -c run,floor
  python scripts/bench_startup.py --json | jq '.commands.run.ratio'
"""


class BenchFailure(Exception):
    """A command failed (exit status 1)."""


def pykvm_command(python: str, module: bool) -> list[str]:
    """How to start `pykvm`: the console script beside ``python``, or ``python -m pykvm``."""
    script = Path(python).parent / "pykvm"
    if not module and script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [python, "-m", "pykvm"]


def commands(python: str, module: bool) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """name -> (argv, the exit statuses that mean it ran)."""
    pykvm = pykvm_command(python, module)
    return {
        "floor": ([python, "-c", "pass"], (0,)),
        "import": ([python, "-c", "import pykvm.machine"], (0,)),
        "run": ([*pykvm, "run"], (0,)),
        "probe": ([*pykvm, "probe"], PROBE_STATUSES),
        "probe_json": ([*pykvm, "probe", "--json"], PROBE_STATUSES),
    }


NAMES = ("floor", "import", "run", "probe", "probe_json")
KVM_NAMES = ("run",)


def time_once(argv: list[str], ok: tuple[int, ...], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` to its exit; raises BenchFailure on an unexpected status."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, cwd="/")  # not the checkout: `python -c` would import its pykvm
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok:
        raise BenchFailure(f"{' '.join(argv)}: exit status {proc.returncode}\n{proc.stderr.decode(errors='replace')}")
    return elapsed


def benchmark(names: list[str], repeat: int, python: str, module: bool, progress=None) -> dict:
    table = commands(python, module)
    env = dict(os.environ, COLUMNS="100")  # rich lays out the probe's tables for a fixed width
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: writes every .pyc, fills the page cache
        time_once(*table[name], env)
    for i in range(repeat):
        if progress is not None:
            progress(f"run {i + 1} of {repeat}")
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            runs[name].append(time_once(*table[name], env))
    floor = statistics.median(runs["floor"])
    doc: dict = {
        "repeat": repeat,
        "python": platform.python_version(),
        "interpreter": python,
        "cpu": _cpu_model(),
        "backend": _backend(),
        "floor_ms": floor * 1e3,
        "commands": {},
    }
    for name in names:
        median = statistics.median(runs[name])
        doc["commands"][name] = {
            "argv": table[name][0],
            "median_ms": median * 1e3,
            "min_ms": min(runs[name]) * 1e3,
            "max_ms": max(runs[name]) * 1e3,
            "ratio": median / floor,
            "over_floor_ms": (median - floor) * 1e3,
            "runs_ms": [t * 1e3 for t in runs[name]],
        }
    return doc


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _backend() -> str | None:
    try:
        sys.path.insert(0, str(ROOT))
        from pykvm.probe.host import kvm_backend
    except ImportError:
        return None
    return kvm_backend()


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Start-up, exec to exit: median of {doc['repeat']} runs each, interleaved",
        caption=f"ratio = median / the floor's median (python -c pass) in this command. "
                f"{doc['cpu'] or 'CPU unknown'}, KVM backend {doc['backend'] or 'unknown'}, Python {doc['python']}",
    )
    for col, justify in (("command", "left"), ("median ms", "right"), ("min-max ms", "right"),
                         ("over the floor ms", "right"), ("x floor", "right")):
        table.add_column(col, justify=justify)
    for name, r in doc["commands"].items():
        table.add_row(name, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
                      f"{r['over_floor_ms']:.1f}", f"{r['ratio']:.2f}")
    Console().print(table)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown command {', '.join(unknown) or '(none)'}; choose from {', '.join(NAMES)}")
    names = list(dict.fromkeys(names))
    return names if "floor" in names else ["floor", *names]  # the reference is always measured


def _repeat(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_startup.py",
        description="Wall time of `pykvm run` and `pykvm probe` from exec to exit, as a ratio to `python -c pass`.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", "-r", type=_repeat, default=21, help="timed runs of each command (default: 21)")
    parser.add_argument("--commands", "-c", type=_names, default=list(NAMES), metavar="A,B",
                        help=f"the commands to time (default: all; floor is always added): {', '.join(NAMES)}")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose pykvm is measured (default: this one)")
    parser.add_argument("--module", action="store_true", help="start pykvm as `python -m pykvm`, not the script")
    parser.add_argument("--no-kvm", action="store_true", help="leave out the commands that need /dev/kvm")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.commands
    if args.no_kvm:
        names = [name for name in names if name not in KVM_NAMES]
    elif any(name in KVM_NAMES for name in names) and not os.path.exists("/dev/kvm"):
        print("bench_startup: /dev/kvm does not exist: `pykvm run` cannot be measured here (try --no-kvm)",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if sys.stderr.isatty() and not args.json:
            from rich.console import Console

            with Console(stderr=True).status("measuring") as status:
                doc = benchmark(names, args.repeat, args.python, args.module, status.update)
        else:
            doc = benchmark(names, args.repeat, args.python, args.module)
    except BenchFailure as e:
        print(f"bench_startup: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bench_startup: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
