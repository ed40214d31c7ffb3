"""scripts/bench_lifecycle.py runs Machine's whole life against lifecycle.c and reports numbers (never asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_lifecycle.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_lifecycle", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_lifecycles_is_a_usage_error(capsys):
    bench = load_script()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--lifecycles", "0"])
    assert stop.value.code == bench.EXIT_USAGE
    assert "--lifecycles" in capsys.readouterr().err


def test_breakdown_counts_exclusive_time_and_puts_everything_back():
    bench = load_script()
    inner_calls = []

    class Thing:
        def outer(self):
            return self.inner() + 1

        def inner(self):
            inner_calls.append(1)
            return 41

    helpers = types.SimpleNamespace(free=lambda: 0)  # no __dict__ entry problem: a plain namespace
    original_outer, original_inner = Thing.outer, Thing.inner
    b = bench.Breakdown()
    b.wrap(Thing, "outer", "outer", "run")
    b.wrap(Thing, "inner", "inner ({phase})", "setup")
    b.wrap(Thing, "no_such_method", "absent", "run")  # gone in this version: skipped
    b.wrap(helpers, "free", "free", "close")
    assert Thing().outer() == 42
    assert helpers.free() == 0
    b.restore()
    assert Thing.outer is original_outer and Thing.inner is original_inner
    assert dict(b.calls) == {"outer": 1, "inner (run)": 1, "free": 1}  # inner named after the outer call's phase
    assert b.phase_of == {"outer": "run", "inner (run)": "run", "free": "close"}
    assert all(ns >= 0 for ns in b.exclusive.values())
    assert "absent" not in b.exclusive and inner_calls == [1]


@pytest.mark.kvm
def test_lifecycles_report_both_sides_and_every_phase():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lifecycles", "5", "--repeat", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 4:
        pytest.skip(f"bench_lifecycle.py cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    bench = load_script()
    assert doc["python_us"] > 0 and doc["c_us"] > 0 and doc["ratio"] > 0
    assert len(doc["rounds"]) == 2 and all(r["ratio"] > 0 for r in doc["rounds"])
    assert doc["exits_per_run_c"] == 22  # hello_long: 21 console bytes, then DONE
    assert list(doc["c_phases_us"]) == list(bench.PHASES)
    assert all(us > 0 for us in doc["c_phases_us"].values())
    assert set(bench.PHASES) <= set(doc["python_breakdown_us"])
    for phase in bench.PHASES:
        assert doc["python_breakdown_us"][phase] > 0, phase
    assert doc["python_breakdown_mean_total_us"] > 0
    assert set(doc["python_calls_per_lifecycle"]) == set(doc["python_breakdown_detail_us"])
