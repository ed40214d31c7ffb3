"""The 0xE9 debug console and isa-debug-exit on a synthetic bus."""

from __future__ import annotations

import io

import pytest

from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.debugcon import DebugConsole
from pykvm.devices.harness import PortHarness
from pykvm.outcome import Outcome


def test_debugcon_writes_through_and_captures():
    stream = io.BytesIO()
    con = DebugConsole(stream)
    bus = PortHarness(con)
    for b in b"ok\n":
        assert bus.out(0xE9, b) is None
    bus.outs(0xE9, b"rep outsb\n")  # one exit, many bytes
    assert stream.getvalue() == b"ok\nrep outsb\n"
    assert con.captured == b"ok\nrep outsb\n" and con.dropped == 0


def test_debugcon_reads_return_0xe9_as_qemu():
    bus = PortHarness(DebugConsole())
    assert bus.inp(0xE9) == 0xE9
    assert bus.ins(0xE9, 3) == b"\xe9\xe9\xe9"
    assert PortHarness(DebugConsole(readback=0x00)).inp(0xE9) == 0


def test_debugcon_wide_writes_give_the_low_byte_of_each_item():
    con = DebugConsole()
    bus = PortHarness(con)
    bus.out(0xE9, 0x4241, size=2)
    bus.outs(0xE9, b"C\0D\0", size=2)
    assert con.captured == b"ACD"


def test_a_flooding_guest_keeps_only_the_newest_bytes():
    con = DebugConsole(limit=1 << 10)
    bus = PortHarness(con)
    chunk = bytes(range(256)) * 16  # 4 KiB per exit
    for _ in range(256):  # 1 MiB in all
        bus.outs(0xE9, chunk)
    assert len(con.captured) == 1 << 10
    assert con.captured == chunk[-(1 << 10):]
    assert con.dropped == (1 << 20) - (1 << 10)


def test_capture_limit_zero_keeps_nothing():
    con = DebugConsole(limit=0)
    PortHarness(con).outs(0xE9, b"abc")
    assert con.captured == b"" and con.dropped == 3


def test_debugcon_on_another_port():
    con = DebugConsole(port=0x402)
    bus = PortHarness(con)
    bus.out(0x402, ord("x"))
    assert con.captured == b"x"
    assert bus.bus.port_handler(0xE9) is None


@pytest.mark.parametrize("value, status", [(0, 1), (3, 7), (0x7F, 0xFF), (0x80, 0x101)])
def test_debug_exit_status_is_value_shifted_left_or_one(value, status):
    outcome = PortHarness(DebugExit()).out(0xF4, value)
    assert outcome == Outcome(status=status, via="isa-debug-exit")


def test_debug_exit_takes_the_whole_access_at_any_port_of_its_range():
    bus = PortHarness(DebugExit())
    assert bus.out(0xF4, 0x12345678, size=4).status == (0x12345678 << 1) | 1
    assert bus.out(0xF6, 0x0101, size=2).status == 0x203
    assert bus.out(0xF7, 1).status == 3
    assert bus.inp(0xF4, size=4) == 0
    assert bus.bus.port_handler(0xF8) is None


def test_debug_exit_iobase_and_iosize_like_qemu_properties():
    dev = DebugExit(iobase=0x501, iosize=2)  # QEMU's own defaults
    bus = PortHarness(dev)
    assert bus.out(0x502, 2).status == 5
    assert bus.bus.port_handler(0x503) is None
    with pytest.raises(ValueError):
        DebugExit(iosize=0)
