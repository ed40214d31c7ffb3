"""scripts/bench_exits.py runs every exit kind four ways and reports numbers (never asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_exits.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_exits", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_unknown_kind_is_a_usage_error(capsys):
    bench = load_script()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--kinds", "io_out,warp_drive"])
    assert stop.value.code == bench.EXIT_USAGE
    assert "unknown kind warp_drive" in capsys.readouterr().err


@pytest.mark.kvm
def test_every_kind_reports_positive_numbers():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--iterations", "200", "--repeat", "1", "--json"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 4:
        pytest.skip(f"bench_exits.py cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    names = [kind.name for kind in load_script().KINDS]
    assert doc["skipped"] == {}, f"kinds this host could not run: {doc['skipped']}"
    assert list(doc["kinds"]) == names
    for name, result in doc["kinds"].items():
        for variant in ("c", "raw", "bare", "machine"):
            assert result["ns_per_access"][variant] > 0, (name, variant)
            assert result["exits_per_run"][variant] >= 1, (name, variant)  # DONE at least
        assert all(result["ratios"][r] > 0 for r in ("raw/c", "bare/c", "machine/c", "machine/raw")), name
        if result["exits_to_python"]:
            assert result["exits_per_run"]["c"] == 201, name  # one exit per access, then DONE
    assert set(doc["without_exits"]) == {"ioeventfd", "coalesced"}
    for saving in doc["without_exits"].values():
        assert all(value > 0 for value in saving["times_cheaper"].values())
    assert doc["machine_run_fixed_ns"] > 0


def test_bench_tlb_runs_and_reports_every_policy():
    """scripts/bench_tlb.py on a small trace: one JSON document, a positive time for each variant."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_tlb.py"), "-n", "20000", "-r", "1",
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    variants = json.loads(result.stdout)["variants"]
    assert set(variants) == {"bare", "untagged", "tagged", "tagged+pcid"}
    for name, v in variants.items():
        assert v["median_seconds"] > 0 and v["ratio_to_bare"] > 0
        assert (v["miss_rate"] is None) == (name == "bare")
