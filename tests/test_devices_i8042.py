"""The 8042 keyboard controller: status, command byte, and the reset line."""

from __future__ import annotations

import dataclasses

import pytest

from pykvm.devices.harness import PortHarness
from pykvm.devices.i8042 import I8042, Reset
from pykvm.outcome import Outcome

DATA, CMD = 0x60, 0x64


@pytest.fixture
def kbc():
    levels = []
    dev = I8042(irq=levels.append)
    return dev, PortHarness(dev), levels


def test_status_says_both_buffers_are_empty(kbc):
    _, bus, _ = kbc
    status = bus.inp(CMD)
    assert status & 0x03 == 0  # OBF and IBF clear
    assert status == 0x18  # QEMU's power-on status
    assert bus.inp(DATA) == 0


@pytest.mark.parametrize("command", [0xFE, 0xF0, 0xFC, 0xF2])
def test_pulsing_output_port_bit_0_resets(kbc, command):
    _, bus, _ = kbc
    outcome = bus.out(CMD, command)
    assert isinstance(outcome, Reset) and isinstance(outcome, Outcome)
    assert outcome.status == 0 and outcome.failure is None
    assert f"{command:#04x}" in outcome.source


@pytest.mark.parametrize("command", [0xFF, 0xFD, 0xF1])
def test_pulses_that_leave_bit_0_alone_do_not_reset(kbc, command):
    _, bus, _ = kbc
    assert bus.out(CMD, command) is None


def test_writing_the_output_port_with_bit_0_clear_resets(kbc):
    dev, bus, _ = kbc
    assert bus.out(CMD, 0xD1) is None
    assert bus.out(DATA, 0x01) is None  # reset line high, A20 off
    assert not dev.a20
    bus.out(CMD, 0xD1)
    assert isinstance(bus.out(DATA, 0x02), Reset)


def test_self_test_and_command_byte(kbc):
    _, bus, levels = kbc
    bus.out(CMD, 0xAA)
    assert bus.inp(CMD) & 0x05 == 0x05  # OBF and SYS
    assert levels == [1]  # CCB bit 0: keyboard interrupt on output
    assert bus.inp(DATA) == 0x55
    assert bus.inp(CMD) & 0x01 == 0 and levels == [1, 0]
    bus.out(CMD, 0x60)
    bus.out(DATA, 0x44)
    bus.out(CMD, 0x20)
    assert bus.inp(DATA) == 0x44 and levels == [1, 0]  # interrupts now off: no raise
    bus.out(CMD, 0xAB)
    assert bus.inp(DATA) == 0x00


def test_a2_tracks_the_last_port_written(kbc):
    _, bus, _ = kbc
    bus.out(DATA, 0x00)  # to the (absent) keyboard
    assert bus.inp(CMD) & 0x08 == 0
    bus.out(CMD, 0xAE)
    assert bus.inp(CMD) & 0x08


def test_reset_keeps_its_type_through_dataclasses_replace():
    # The machine adds exits and seconds to an Outcome; replace() keeps the subclass and source.
    reset = dataclasses.replace(Reset(source="x"), exits=5, seconds=0.5)
    assert isinstance(reset, Reset) and reset.source == "x" and reset.exits == 5
