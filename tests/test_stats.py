"""KVM's binary statistics: the cheap counters Machine reads around each run agree with the full
parse (read_stats_of), and their fds go back when the machine closes."""

from __future__ import annotations

import psutil
import pytest

from pykvm.machine import Machine
from pykvm.stats import Counters, read_stats_of

pytestmark = pytest.mark.kvm


def _cumulative(stats) -> dict[str, int]:
    return {d.name: d.value for d in stats.descriptors if d.type == "cumulative" and d.size == 1}


def test_counters_agree_with_the_full_parse(guest):
    with Machine() as m:
        m.load_flat(guest("hello_long"), "long")
        assert m.run(timeout=30).ok
        for obj in (m.vm, m.vcpu):
            counters = Counters(obj)
            try:
                quick, full = counters.read(), _cumulative(read_stats_of(obj))
                assert quick and quick == full  # nothing runs in between: the same, counter for counter
            finally:
                counters.close()
            assert counters.fd == -1
        assert _cumulative(read_stats_of(m.vcpu))["exits"] >= m.exit_count


def test_kvm_stats_count_each_run_and_the_stats_fds_close_with_the_machine(guest):
    proc = psutil.Process()
    before = proc.num_fds()
    m = Machine()
    m.load_flat(guest("hello_long"), "long")
    assert m.run(timeout=30).ok
    assert m.kvm_stats.get("exits", 0) >= m.exit_count >= 1
    assert proc.num_fds() > before  # the stats fds stay open between runs
    m.close()
    assert proc.num_fds() == before
