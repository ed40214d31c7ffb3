"""scripts/bench_virtio.py runs each workload both ways and reports numbers (it never asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_virtio.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_virtio", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_bad_depth_is_a_usage_error(capsys):
    bench = load_script()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--depth", "0"])
    assert stop.value.code == bench.EXIT_USAGE
    assert "--depth" in capsys.readouterr().err


def test_offsets_are_aligned_and_inside_the_disk():
    bench = load_script()
    size = 16 * bench.MiB
    for w in bench.WORKLOADS:
        offs = bench.offsets(w, 300, size, seed=1)
        assert len(offs) == 300 and all(o % w.size == 0 and 0 <= o <= size - w.size for o in offs), w.name
    assert bench.offsets(bench.WORKLOADS[1], 20, size, 1)[16:18] == [0, bench.MiB]  # sequential, wrapping


@pytest.mark.kvm
def test_every_workload_reports_positive_numbers():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--random-reads", "50", "--seq-reads", "8", "--notifies", "200",
                           "--trapped", "20", "--disk-mib", "8", "--repeat", "1", "--json"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 4:
        pytest.skip(f"bench_virtio.py cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc["workloads"]) == [w.name for w in load_script().WORKLOADS]
    for name, w in doc["workloads"].items():
        for side in ("host", "guest"):
            assert w[side]["us_per_request"] > 0 and w[side]["iops"] > 0 and w[side]["mb_per_s"] > 0, (name, side)
        assert w["ratio"] > 0, name
        assert w["transport_stats"]["notifies (ioeventfd)"] >= 1, (name, w["transport_stats"])
        assert w["transport_stats"].get("notifies (trapped)", 0) == 0, (name, w["transport_stats"])
    notify = doc["notify"]
    assert notify["ioeventfd"]["ns_per_write"] > 0 and notify["trapped"]["ns_per_write"] > 0
    assert notify["ioeventfd"]["transport_stats"].get("notifies (trapped)", 0) == 0
    assert notify["trapped/ioeventfd"] > 0
