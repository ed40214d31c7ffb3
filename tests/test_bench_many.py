"""scripts/bench_many.py runs tiny guests every way on 1 and 2 cores and reports rates (never asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_many.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_many", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_mode_is_a_usage_error(capsys):
    bench = load_script()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--modes", "threads,carrier_pigeon"])
    assert stop.value.code == bench.EXIT_USAGE
    assert "unknown mode carrier_pigeon" in capsys.readouterr().err


def test_core_sets_are_taken_from_the_usable_cores():
    bench = load_script()
    sets = bench.core_sets()
    usable = os.sched_getaffinity(0)
    assert sets[1] <= usable and len(sets[1]) == 1
    assert (2 in sets) == (len(usable) >= 2)


@pytest.mark.kvm
def test_every_way_reports_a_rate_for_each_kind_and_core_count():
    bench = load_script()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--guests", "2", "--repeat", "1", "--compute-iterations", "1000",
                           "--exit-iterations", "20", "--json"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 4:
        pytest.skip(f"bench_many.py cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc["results"]) == list(bench.KINDS)
    cores = list(doc["cores"])  # JSON keys: "1", "2"
    assert cores[0] == "1"
    for kind, by_cores in doc["results"].items():
        assert list(by_cores) == cores, kind
        for n, rows in by_cores.items():
            assert list(rows) == list(bench.MODES), (kind, n)
            for mode, row in rows.items():
                assert row["guests_per_s"] > 0 and row["x_serial"] >= 0, (kind, n, mode)
                assert len(row["runs_s"]) == 1
            assert rows["serial"]["x_serial"] == 1.0
            for mode in ("pytest", "xdist"):
                assert rows[mode]["in_tests_guests_per_s"] > 0 and rows[mode]["outside_tests_s"] >= 0, (kind, n, mode)
    if "2" in cores:
        assert set(doc["scaling_2_over_1_core"]) == set(bench.KINDS)
    assert doc["serial_ms_per_guest"]["compute"]["1"] > 0
