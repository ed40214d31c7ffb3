"""virtio-console (pykvm/virtio/console.py): output to a stream and the capture, input from an fd
or a stream into the receive queue, the emergency-write register."""

from __future__ import annotations

import io
import os

import pytest

from pykvm.virtio import VirtioConsole, VirtioMmio
from pykvm.virtio import console as con
from pykvm.virtio.queue import DESC_F_WRITE
from virtio_driver import GPA, bare_memory, close_memory, interrupts, notify, reg_read, reg_write, start, wait_interrupt

TX = 0x40000
RX = 0x60000


@pytest.fixture
def memory():
    m = bare_memory()
    yield m
    close_memory(m)


def test_output_goes_to_the_stream_and_the_capture(memory):
    out = io.BytesIO()
    with VirtioMmio(VirtioConsole(out), memory, GPA, threaded=False) as t:
        rx, tx = start(t, memory)
        memory.write(TX, b"Hello, ")
        memory.write(TX + 0x100, b"hvc0\n")
        tx.offer(tx.chain([(TX, 7, False), (TX + 0x100, 5, False)]))
        notify(t, con.TRANSMITQ)
        assert tx.take_used() == [(0, 0)] and interrupts(t) == 1
        assert out.getvalue() == b"Hello, hvc0\n" and t.device.captured == b"Hello, hvc0\n"


def test_the_capture_is_bounded(memory):
    with VirtioMmio(VirtioConsole(None, limit=4), memory, GPA, threaded=False) as t:
        rx, tx = start(t, memory)
        memory.write(TX, b"0123456789")
        tx.offer(tx.chain([(TX, 10, False)]))
        notify(t, con.TRANSMITQ)
        assert t.device.captured == b"6789" and t.device.dropped == 6


def test_input_waits_for_receive_buffers_and_fills_them(memory):
    c = VirtioConsole(None)
    with VirtioMmio(c, memory, GPA, threaded=False) as t:
        rx, tx = start(t, memory)
        c.feed(b"typed early")
        t.process_pending()  # no receive buffer yet: the input waits
        assert rx.used_idx == 0
        rx.offer(rx.chain([(RX, 5, True)]))
        rx.set_desc(1, RX + 0x100, 64, DESC_F_WRITE)
        rx.offer(1)
        notify(t, con.RECEIVEQ)
        assert rx.take_used() == [(0, 5), (1, 6)]
        assert memory.read(RX, 5) == b"typed" and memory.read(RX + 0x100, 6) == b" early"
        assert c.input_bytes == 11


def test_input_from_a_file_descriptor_through_the_feeder_thread(memory):
    r, w = os.pipe()
    c = VirtioConsole(None, input=r)
    t = VirtioMmio(c, memory, GPA, threaded=True)
    try:
        rx, tx = start(t, memory)
        rx.offer(rx.chain([(RX, 64, True)]))
        notify(t, con.RECEIVEQ)
        os.write(w, b"ls -l\n")
        assert wait_interrupt(t) >= 1
        assert rx.take_used() == [(0, 6)] and memory.read(RX, 6) == b"ls -l\n"
    finally:
        t.close()
        os.close(w)
        os.close(r)
    assert not c._feeder.is_alive()  # closing the device stops the feeder


def test_input_from_a_stream(memory):
    c = VirtioConsole(None, input=io.BytesIO(b"from a stream"))
    t = VirtioMmio(c, memory, GPA, threaded=True)
    try:
        rx, tx = start(t, memory)
        rx.offer(rx.chain([(RX, 64, True)]))
        notify(t, con.RECEIVEQ)
        while rx.used_idx == 0:
            assert wait_interrupt(t)
        assert memory.read(RX, 13) == b"from a stream"
    finally:
        t.close()


def test_emergency_write_and_config(memory):
    out = io.BytesIO()
    with VirtioMmio(VirtioConsole(out), memory, GPA, threaded=False) as t:
        assert t.device.device_features() == con.F_EMERG_WRITE
        assert reg_read(t, 0x100 + 4) == 1  # max_nr_ports
        reg_write(t, 0x100 + con.EMERG_WR, ord("!"))
        assert t.device.captured == b"!"


def test_a_malformed_transmit_chain_needs_reset_and_prints_nothing(memory):
    from pykvm.virtio import STATUS_DEVICE_NEEDS_RESET
    from pykvm.virtio import mmio as regs
    from pykvm.virtio.queue import DESC_F_NEXT

    out = io.BytesIO()
    with VirtioMmio(VirtioConsole(out), memory, GPA, threaded=False) as t:
        rx, tx = start(t, memory)
        tx.set_desc(0, TX, 4, DESC_F_NEXT, 77)
        tx.offer(0)
        notify(t, con.TRANSMITQ)
        assert reg_read(t, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET and out.getvalue() == b""


# ---- hostile drivers --------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pykvm.virtio import mmio as regs  # noqa: E402
from virtio_driver import RAM, changed_outside, drive_hostile, hostile_strategy, lay_out_hostile  # noqa: E402


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_strategy(), typed=st.binary(max_size=300))
def test_random_rings_never_raise_nor_write_outside_the_offered_buffers(case, typed):
    memory = bare_memory()
    try:
        c = VirtioConsole(None)
        with VirtioMmio(c, memory, GPA, threaded=False) as t:
            allowed = lay_out_hostile(memory, t, case)
            before = memory.read(0, RAM)
            c.feed(typed)
            drive_hostile(t)
            assert t.stats[regs.HOST_ERRORS] == 0, t.error
            assert changed_outside(before, memory.read(0, RAM), allowed) == []
    finally:
        close_memory(memory)
