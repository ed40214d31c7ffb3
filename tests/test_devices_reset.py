"""The PIIX3 reset control register (0xCF9) and system control port B (0x61), the latter against
a fake PIT state and against KVM's in-kernel PIT (KVM_GET_PIT2 / KVM_SET_PIT2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pykvm.devices.harness import PortHarness
from pykvm.devices.i8042 import Reset
from pykvm.devices.reset import PIT_FREQ, ResetControl, SystemControlB, pit_output, reset_control_reset
from pykvm.system import Kvm


def test_cf9_resets_on_bit_2_whatever_bit_1_says():
    dev = ResetControl()
    bus = PortHarness(dev)
    assert bus.inp(0xCF9) == 0
    assert bus.out(0xCF9, 0x02) is None and bus.inp(0xCF9) == 0x02  # only the reset type is kept
    assert bus.out(0xCF9, 0xF9) is None and bus.inp(0xCF9) == 0x00  # bits other than 1 dropped
    for value in (0x04, 0x06, 0x0E):  # soft, hard (the FADT's RESET_VALUE), full
        result = bus.out(0xCF9, value)
        assert isinstance(result, Reset) and result.status == 0 and "0xcf9" in result.source
    assert isinstance(reset_control_reset(), Reset)


class FakePit:
    """Enough of kvm_pit_state2 for port B: channel 2's mode, count, gate and load time."""

    def __init__(self, mode=0, count=1000, gate=0, load=0):
        self.state = SimpleNamespace(channels=[None, None, SimpleNamespace(mode=mode, count=count, gate=gate,
                                                                             count_load_time=load)])
        self.sets = 0

    def get_pit2(self):
        return self.state

    def set_pit2(self, state):
        self.sets += 1
        self.state = state


def ns_for(ticks: int) -> int:
    return -(-ticks * 1_000_000_000 // PIT_FREQ)  # the first nanosecond at which that many ticks passed


def test_pit_output_by_mode_as_qemu_pit_get_out():
    assert [pit_output(0, 100, ns_for(t)) for t in (0, 99, 100, 500)] == [0, 0, 1, 1]
    assert [pit_output(1, 100, ns_for(t)) for t in (0, 99, 100)] == [1, 1, 0]
    assert [pit_output(2, 100, ns_for(t)) for t in (0, 1, 100, 101, 200)] == [0, 0, 1, 0, 1]
    assert [pit_output(3, 100, ns_for(t)) for t in (0, 49, 50, 99, 100)] == [1, 1, 0, 0, 1]
    assert [pit_output(4, 100, ns_for(t)) for t in (99, 100, 101)] == [0, 1, 0]
    assert pit_output(6, 100, ns_for(100)) == 1 and pit_output(7, 100, ns_for(50)) == 0  # 6, 7 = 2, 3
    assert pit_output(0, 0, ns_for(65535)) == 0 and pit_output(0, 0, ns_for(65536)) == 1  # 0 = 65536


def test_port_b_without_a_pit_latches_gate_and_speaker_and_toggles_refresh():
    dev = SystemControlB()
    bus = PortHarness(dev)
    reads = [bus.inp(0x61) for _ in range(3)]
    assert reads == [0x10, 0x00, 0x10]  # bit 4 flips on each read
    bus.out(0x61, 0xFF)
    assert bus.inp(0x61) & ~0x10 == 0x03  # gate and speaker; bit 5 stays 0 with no PIT


def test_port_b_reads_channel_2_of_the_pit():
    now = [0]
    pit = FakePit(mode=0, count=1000, gate=1, load=5_000)
    bus = PortHarness(SystemControlB(pit=pit, clock_ns=lambda: now[0]))
    now[0] = 5_000 + ns_for(999)
    assert bus.inp(0x61) & 0x21 == 0x01  # gate 1, out still 0
    now[0] = 5_000 + ns_for(1000)
    assert bus.inp(0x61) & 0x21 == 0x21  # terminal count: out 1


def test_port_b_gate_write_goes_to_the_pit_and_a_rising_gate_restarts_modes_1235():
    now = [777]
    pit = FakePit(mode=2, count=10, gate=0, load=0)
    bus = PortHarness(SystemControlB(pit=pit, clock_ns=lambda: now[0]))
    bus.out(0x61, 0x03)
    ch = pit.state.channels[2]
    assert (ch.gate, ch.count_load_time, pit.sets) == (1, 777, 1)
    now[0] = 999
    bus.out(0x61, 0x01)  # gate stays high: no restart
    assert ch.count_load_time == 777 and bus.inp(0x61) & 0x03 == 0x01
    pit0 = FakePit(mode=0, gate=0, load=5)
    PortHarness(SystemControlB(pit=pit0, clock_ns=lambda: 50)).out(0x61, 0x01)
    assert pit0.state.channels[2].gate == 1 and pit0.state.channels[2].count_load_time == 5  # mode 0: no restart


@pytest.mark.kvm
def test_port_b_against_kvms_in_kernel_pit():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        state = vm.get_pit2()
        ch = state.channels[2]
        ch.mode, ch.count, ch.gate = 0, 2000, 0
        vm.set_pit2(state)  # KVM loads the count: count_load_time = now
        after = vm.get_pit2()  # kept alive while its channel is read (cffi views do not own)
        loaded = after.channels[2]
        assert (loaded.mode, loaded.count) == (0, 2000)
        t0 = loaded.count_load_time
        clock = [t0 + ns_for(1999)]
        bus = PortHarness(SystemControlB(pit=vm, clock_ns=lambda: clock[0]))
        assert bus.inp(0x61) & 0x21 == 0x00
        clock[0] = t0 + ns_for(2000)
        assert bus.inp(0x61) & 0x20 == 0x20  # out follows KVM's count and load time
        bus.out(0x61, 0x01)
        after = vm.get_pit2()
        assert after.channels[2].gate == 1  # the gate reached KVM's PIT
        assert bus.inp(0x61) & 0x01 == 0x01
        bus.out(0x61, 0x00)
        after = vm.get_pit2()
        assert after.channels[2].gate == 0
