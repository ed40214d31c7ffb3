"""scripts/bench_migrate.py migrates a paced guest at each rate and reports figures against its
references (it never asserts speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_migrate.py"


def test_a_region_outside_memory_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mem", "8M", "--region", "4096"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "do not fit in --mem 8 MiB" in proc.stderr


def test_a_rate_that_is_not_one_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rates", "0,fast-cpl3"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "each maybe ending in -cpl3, not '0,fast-cpl3'" in proc.stderr


@pytest.mark.kvm
def test_each_rate_is_migrated_and_reported_against_the_stop_and_copy():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mem", "16M", "--region", "1024", "--rates", "0,5000,max,max-cpl3",
                           "--repeat", "1", "--warmup", "0.05", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ref = doc["stop_and_copy"]
    assert ref["rounds"] == 1 and ref["pages"] >= 1024  # the whole region went in the stop
    assert ref["downtime_ms"] > 0 and doc["transport"]["mib"] >= ref["mib"] * 0.99
    idle, paced, _, _ = doc["live"]
    assert [(r["rate"], r["cpl"]) for r in doc["live"]] == [(0.0, 0), (5000.0, 0), (None, 0), (None, 3)]
    for r in doc["live"]:
        assert r["rounds"] >= 1 and r["downtime_ms"] > 0 and r["total_ms_median"] >= r["downtime_ms"]
        assert r["dirty"] in ("bitmap", "ring")
    assert idle["measured_pages_per_s"] < paced["measured_pages_per_s"] <= 5000 * 1.1
    assert all(r["measured_pages_per_s"] > idle["measured_pages_per_s"] for r in doc["live"][2:])  # unpaced
    assert idle["final_pages"] <= paced["final_pages"] or idle["final_pages"] <= 16  # one batch at most when idle
