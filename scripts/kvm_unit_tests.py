#!/usr/bin/env python3
"""Run kvm-unit-tests' x86 suite with its own runner under QEMU and under pykvm-qemu, side by side.

    scripts/kvm_unit_tests.py --kut ~/src/kvm-unit-tests              # build if needed, run both
    scripts/kvm_unit_tests.py --kut DIR --only pykvm-qemu msr realmode  # some tests, one binary
    scripts/kvm_unit_tests.py --kut DIR --json results.json

kvm-unit-tests is public only as source, so this needs a checkout (``--kut`` or $KUT_DIR); where
there is none it says so and exits 77 (the suite's own "skip" status). It runs
``ACCEL=kvm ./run_tests.sh`` once with ``QEMU=qemu-system-x86_64`` and once with
``QEMU=pykvm-qemu``, keeps each run's logs (``logs-qemu/``, ``logs-pykvm-qemu/``), parses the
runner's PASS / FAIL / SKIP lines and prints one table with both results and the reasons. Exit
status: 0 when every test QEMU passes also passes under pykvm-qemu, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SKIP_STATUS = 77
LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\S+)\s*(?:\((.*)\))?\s*$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROOT = Path(__file__).resolve().parents[1]


def pykvm_qemu() -> str:
    here = Path(sys.executable).with_name("pykvm-qemu")
    return str(here) if here.exists() else (shutil.which("pykvm-qemu") or "pykvm-qemu")


def parse(text: str) -> dict[str, tuple[str, str]]:
    """The runner's summary lines -> {test: (PASS|FAIL|SKIP, reason)}."""
    results = {}
    for raw in text.splitlines():
        m = LINE.match(ANSI.sub("", raw).strip())
        if m:
            results[m.group(2)] = (m.group(1), m.group(3) or "")
    return results


def build(kut: Path) -> None:
    if any(kut.glob("x86/*.flat")):
        return
    print(f"kvm_unit_tests: building {kut} (./configure --arch=x86_64 && make)", file=sys.stderr)
    subprocess.run(["./configure", "--arch=x86_64"], cwd=kut, check=True)
    subprocess.run(["make", f"-j{os.cpu_count() or 1}"], cwd=kut, check=True)


def run(kut: Path, label: str, binary: str, tests: list[str], timeout: str | None) -> tuple[dict, float, str]:
    env = dict(os.environ, QEMU=binary, ACCEL="kvm")
    if timeout:
        env["TIMEOUT"] = timeout
    shutil.rmtree(kut / "logs", ignore_errors=True)
    start = time.monotonic()
    proc = subprocess.run(["./run_tests.sh", *tests], cwd=kut, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    logs = kut / f"logs-{label}"
    shutil.rmtree(logs, ignore_errors=True)
    if (kut / "logs").exists():
        shutil.move(str(kut / "logs"), logs)
    logs.mkdir(exist_ok=True)
    (logs / "summary.txt").write_text(proc.stdout + proc.stderr)
    return parse(proc.stdout), seconds, str(logs)


def counts(results: dict) -> str:
    n = {k: sum(1 for s, _ in results.values() if s == k) for k in ("PASS", "FAIL", "SKIP")}
    return f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", help="test names (default: the whole x86 suite)")
    parser.add_argument("--kut", default=os.environ.get("KUT_DIR"), help="a kvm-unit-tests checkout ($KUT_DIR)")
    parser.add_argument("--only", choices=("qemu", "pykvm-qemu"), help="run under one binary only")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU to compare with")
    parser.add_argument("--timeout", help="TIMEOUT for each test (the runner's default: the cfg's, else 90s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not args.kut or not (Path(args.kut) / "run_tests.sh").exists():
        print("kvm_unit_tests: SKIPPED: no kvm-unit-tests checkout (give --kut DIR or set KUT_DIR; it is public "
              "only as source, not in a package registry)", file=sys.stderr)
        return SKIP_STATUS
    kut = Path(args.kut).resolve()
    build(kut)
    runs = {}
    binaries = {"qemu": args.qemu, "pykvm-qemu": pykvm_qemu()}
    for label, binary in binaries.items():
        if args.only and label != args.only:
            continue
        if shutil.which(binary) is None and not Path(binary).exists():
            print(f"kvm_unit_tests: {label}: {binary} not found, not run", file=sys.stderr)
            continue
        results, seconds, logs = run(kut, label, binary, args.tests, args.timeout)
        runs[label] = {"results": results, "seconds": seconds, "logs": logs}
        print(f"{label}: {counts(results)} in {seconds:.0f} s (logs: {logs})", file=sys.stderr)
    names = sorted({name for r in runs.values() for name in r["results"]})
    width = max([len(n) for n in names] + [4])
    labels = list(runs)
    print(f"{'test':<{width}}  " + "  ".join(f"{lab:<10}" for lab in labels) + "  reasons")
    for name in names:
        cells = [runs[lab]["results"].get(name, ("-", "")) for lab in labels]
        reasons = " | ".join(f"{lab}: {r}" for lab, (_, r) in zip(labels, cells) if r)
        print(f"{name:<{width}}  " + "  ".join(f"{s:<10}" for s, _ in cells) + f"  {reasons}")
    for label in labels:
        print(f"{label}: {counts(runs[label]['results'])} ({runs[label]['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    if len(runs) == 2:
        lost = [n for n in names if runs["qemu"]["results"].get(n, ("",))[0] == "PASS"
                and runs["pykvm-qemu"]["results"].get(n, ("",))[0] != "PASS"]
        if lost:
            print(f"passed under QEMU, not under pykvm-qemu: {', '.join(lost)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
