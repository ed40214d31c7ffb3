"""Creating, running and closing 1,000 VMs in one process leaves fds and memory flat."""

from __future__ import annotations

import gc

import psutil
import pytest

from pykvm.machine import Machine
from pykvm.system import Kvm
from pykvm.x86 import layout

pytestmark = pytest.mark.kvm

WARMUP, ROUNDS = 100, 1000
RSS_SLACK = 4 << 20  # one guest's 1 MiB of RAM is mapped per round: a leak of it would add ~1 GiB


def cycle(kvm: Kvm, image: bytes) -> None:
    with Machine(layout.MIN_MEM_SIZE * 2, kvm=kvm) as m:
        m.load_flat(image, "long")
        assert m.run(timeout=10).ok


def test_thousand_vms_leave_fds_and_rss_flat(guest):
    image = guest("hello_long")
    proc = psutil.Process()
    with Kvm() as kvm:
        for _ in range(WARMUP):
            cycle(kvm, image)
        gc.collect()
        fds, rss = proc.num_fds(), proc.memory_info().rss
        for _ in range(ROUNDS):
            cycle(kvm, image)
        gc.collect()
        assert proc.num_fds() == fds
        grown = proc.memory_info().rss - rss
        assert grown < RSS_SLACK, f"RSS grew by {grown >> 10} KiB over {ROUNDS} VMs"


def test_closing_twice_and_closing_a_vm_with_live_exit_views_is_safe(guest):
    proc = psutil.Process()
    before = proc.num_fds()
    m = Machine()
    m.load_flat(guest("hello_long"), "long")
    exit = m.vcpu.run()  # holds a copy of its data, no view into kvm_run
    m.close()
    m.close()
    assert proc.num_fds() == before
    assert exit.data == b"H"


def test_an_exit_view_held_past_close_keeps_no_fd_once_dropped(guest):
    """An IoIn's data is a view into kvm_run: closing the VM while it is held must not leak the
    mapping (and the vCPU fd it pins) once the view is gone."""
    proc = psutil.Process()
    gc.collect()
    before = proc.num_fds()
    m = Machine()
    m.load_flat(guest("io"), "protected")
    exit = m.vcpu.run()
    while not hasattr(exit, "reply"):  # run up to the first IoIn
        exit = m.vcpu.run()
    m.close()
    del exit
    gc.collect()
    assert proc.num_fds() == before
