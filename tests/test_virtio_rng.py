"""virtio-rng (pykvm/virtio/rng.py): entropy into the driver's buffers; and the property test that
throws random descriptor tables at it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from pykvm.virtio import VirtioMmio, VirtioRng
from pykvm.virtio import mmio as regs
from pykvm.virtio import rng as rng_mod
from virtio_driver import (
    GPA, RAM, bare_memory, changed_outside, close_memory, drive_hostile, hostile_strategy, interrupts,
    lay_out_hostile, notify, start,
)

BUF = 0x40000


@pytest.fixture
def memory():
    m = bare_memory()
    yield m
    close_memory(m)


def test_requests_are_filled_from_the_source(memory):
    with VirtioMmio(VirtioRng(lambda n: bytes(range(n % 256)) * (n // 256 + 1)), memory, GPA, threaded=False) as t:
        ring, = start(t, memory)
        ring.offer(ring.chain([(BUF, 16, True), (BUF + 0x100, 16, True)]))
        notify(t, 0)
        assert ring.take_used() == [(0, 32)] and interrupts(t) == 1
        assert memory.read(BUF, 16) + memory.read(BUF + 0x100, 16) == bytes(range(32))
        assert t.device.bytes_given == 32


def test_a_request_is_capped(memory):
    with VirtioMmio(VirtioRng(), memory, GPA, threaded=False) as t:
        ring, = start(t, memory)
        ring.offer(ring.chain([(BUF, 0x80000, True)]))
        notify(t, 0)
        assert ring.take_used() == [(0, rng_mod.MAX_REQUEST)]
        assert memory.read(BUF + rng_mod.MAX_REQUEST, 16) == bytes(16)


def test_a_short_source_gives_what_it_has(memory):
    with VirtioMmio(VirtioRng(lambda n: b"\x01\x02"), memory, GPA, threaded=False) as t:
        ring, = start(t, memory)
        ring.offer(ring.chain([(BUF, 64, True)]))
        notify(t, 0)
        assert ring.take_used() == [(0, 2)]


def test_a_readable_only_chain_gets_nothing(memory):
    with VirtioMmio(VirtioRng(), memory, GPA, threaded=False) as t:
        ring, = start(t, memory)
        ring.offer(ring.chain([(BUF, 64, False)]))
        notify(t, 0)
        assert ring.take_used() == [(0, 0)] and memory.read(BUF, 64) == bytes(64)


def test_the_source_must_be_callable():
    with pytest.raises(TypeError, match="function of a byte count"):
        VirtioRng(b"not random")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_strategy())
def test_random_rings_never_raise_nor_write_outside_the_offered_buffers(case):
    memory = bare_memory()
    try:
        t = VirtioMmio(VirtioRng(lambda n: b"\xA5" * n), memory, GPA, threaded=False)
        with t:
            allowed = lay_out_hostile(memory, t, case)
            before = memory.read(0, RAM)
            drive_hostile(t)
            assert t.stats[regs.HOST_ERRORS] == 0, t.error
            assert changed_outside(before, memory.read(0, RAM), allowed) == []
    finally:
        close_memory(memory)
