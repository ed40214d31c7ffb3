"""The MC146818 RTC and CMOS: memory size as SeaBIOS reads it, the clock, status registers, and the
periodic / update-ended / alarm interrupts (with a fake timer and clocks, and once for real)."""

from __future__ import annotations

import calendar
import threading
import time

import pytest

from pykvm.devices.cmos import Cmos, DeadlineTimer, memory_size_registers, periodic_period
from pykvm.devices.harness import PortHarness
from fake_timer import FakeTimer

MiB, GiB = 1 << 20, 1 << 30
# 2024-02-29 13:45:56 UTC, a Thursday, half-way through the second
NOW = calendar.timegm((2024, 2, 29, 13, 45, 56, 0, 0, 0)) + 0.5


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def reg(bus: PortHarness, index: int) -> int:
    bus.out(0x70, index)
    return bus.inp(0x71)


def set_reg(bus: PortHarness, index: int, value: int) -> None:
    bus.out(0x70, index)
    bus.out(0x71, value)


def seabios_ram_size(bus: PortHarness) -> tuple[int, int]:
    """qemu_preinit() and qemu_cfg_e820() in SeaBIOS src/fw/paravirt.c, register for register."""
    rs = (reg(bus, 0x34) << 16) | (reg(bus, 0x35) << 24)
    if rs:
        rs += 16 * MiB
    else:
        rs = ((reg(bus, 0x17) << 10) | (reg(bus, 0x18) << 18)) + 1 * MiB
    high = (reg(bus, 0x5B) << 16) | (reg(bus, 0x5C) << 24) | (reg(bus, 0x5D) << 32)
    return rs, high


@pytest.mark.parametrize(
    "below, above",
    [(4 * MiB, 0), (1 * GiB, 0), (3 * GiB, 3 * GiB), (2 * GiB, 4 * GiB)],  # 6 GiB: pc and q35 splits
)
def test_memory_size_as_seabios_reads_it(below, above):
    bus = PortHarness(Cmos(below_4g=below, above_4g=above))
    assert seabios_ram_size(bus) == (below, above)
    assert reg(bus, 0x15) | reg(bus, 0x16) << 8 == 640
    ext = min((below - MiB) // 1024, 0xFFFF)
    assert reg(bus, 0x17) | reg(bus, 0x18) << 8 == ext
    assert reg(bus, 0x30) | reg(bus, 0x31) << 8 == ext


def test_memory_size_register_values():
    assert memory_size_registers(4 * MiB) == {
        0x15: 0x80, 0x16: 0x02, 0x17: 0x00, 0x18: 0x0C, 0x30: 0x00, 0x31: 0x0C,
        0x34: 0, 0x35: 0, 0x5B: 0, 0x5C: 0, 0x5D: 0,
    }
    regs = memory_size_registers(3 * GiB, 3 * GiB)
    assert (regs[0x17], regs[0x18]) == (0xFF, 0xFF)  # 1 MiB-65 MiB field saturates
    assert (regs[0x34], regs[0x35]) == (0x00, 0xBF)  # (3 GiB - 16 MiB) / 64 KiB = 0xBF00
    assert (regs[0x5B], regs[0x5C], regs[0x5D]) == (0x00, 0xC0, 0x00)  # 3 GiB / 64 KiB = 0xC000
    assert memory_size_registers(512 * 1024)[0x15] == 0x00 and memory_size_registers(512 * 1024)[0x16] == 0x02
    with pytest.raises(ValueError):
        memory_size_registers(5 * GiB)


@pytest.mark.parametrize("ncpus, value", [(1, 0), (4, 3), (255, 254), (300, 0)])
def test_cpu_count_in_0x5f_as_qemu(ncpus, value):
    assert reg(PortHarness(Cmos(ncpus=ncpus)), 0x5F) == value


def test_clock_in_bcd_24h_by_default():
    bus = PortHarness(Cmos(clock=Clock()))
    got = [reg(bus, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    assert got == [0x56, 0x45, 0x13, 5, 0x29, 0x02, 0x24, 0x20]  # Thursday = 5 (Sunday = 1)


def test_clock_in_binary_and_12_hour_mode():
    bus = PortHarness(Cmos(clock=Clock()))
    set_reg(bus, 0x0B, 0x06)  # binary, 24 h
    assert [reg(bus, i) for i in (0, 2, 4, 9)] == [56, 45, 13, 24]
    set_reg(bus, 0x0B, 0x00)  # BCD, 12 h
    assert reg(bus, 4) == 0x81  # 1 PM


def test_guest_sets_the_time_with_the_set_bit():
    clock = Clock()
    bus = PortHarness(Cmos(clock=clock))
    set_reg(bus, 0x0B, 0x82)  # SET: updates stop
    for index, value in ((0, 0x00), (2, 0x30), (4, 0x08), (7, 0x01), (8, 0x01), (9, 0x99), (0x32, 0x19)):
        set_reg(bus, index, value)
    clock.now += 100  # frozen while SET
    assert reg(bus, 0) == 0x00 and reg(bus, 9) == 0x99
    set_reg(bus, 0x0B, 0x02)  # the clock starts from what the guest wrote
    clock.now += 10
    assert [reg(bus, i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [0x10, 0x30, 0x08, 0x01, 0x01, 0x99, 0x19]
    assert reg(bus, 6) == 6  # 1999-01-01 was a Friday


def test_writing_one_time_register_while_running_moves_the_clock():
    bus = PortHarness(Cmos(clock=Clock()))
    set_reg(bus, 2, 0x00)
    assert (reg(bus, 2), reg(bus, 4), reg(bus, 0)) == (0x00, 0x13, 0x56)


def test_status_registers():
    clock = Clock()
    dev = Cmos(clock=clock)
    bus = PortHarness(dev)
    assert reg(bus, 0x0A) == 0x26
    assert reg(bus, 0x0B) == 0x02
    assert reg(bus, 0x0C) == 0x00
    assert reg(bus, 0x0D) == 0x80  # valid RAM and time
    set_reg(bus, 0x0D, 0x00)
    set_reg(bus, 0x0C, 0xF0)
    assert (reg(bus, 0x0D), reg(bus, 0x0C)) == (0x80, 0x00)  # read-only
    clock.now = NOW - 0.5 + 0.9999  # 100 us before the next second: update in progress
    assert reg(bus, 0x0A) == 0xA6
    set_reg(bus, 0x0A, 0xA6)  # UIP is read-only
    clock.now = NOW
    assert reg(bus, 0x0A) == 0x26


def test_index_register_and_nmi_mask():
    dev = Cmos()
    bus = PortHarness(dev)
    bus.out(0x70, 0x8F)  # NMI off, index 0x0F
    assert dev.nmi_disabled and dev.index == 0x0F
    bus.out(0x71, 0x0A)
    assert reg(bus, 0x0F) == 0x0A and not dev.nmi_disabled
    assert bus.inp(0x70) == 0xFF
    set_reg(bus, 0x7F, 0x12)
    assert reg(bus, 0xFF) == 0x12  # index bit 7 is the NMI mask


def test_a_16_bit_out_writes_index_then_data():
    bus = PortHarness(Cmos())
    bus.out(0x70, 0x5540, size=2)  # outw: 0x40 to 0x70, 0x55 to 0x71
    assert reg(bus, 0x40) == 0x55


# ---- interrupts: periodic, update-ended, alarm ----------------------------------------------------


def rtc(**kwargs):
    wall, mono, levels, timers = Clock(), Clock(100.0), [], []

    def factory(cb):
        timers.append(FakeTimer(cb))
        return timers[-1]

    dev = Cmos(clock=wall, monotonic=mono, irq=levels.append, timer=factory, **kwargs)
    return dev, PortHarness(dev), wall, mono, levels, timers


def test_periodic_rates_as_qemu():
    assert periodic_period(0) == 0
    assert periodic_period(6) == 1 / 1024  # the reset value, 0x26
    assert periodic_period(15) == 0.5
    assert periodic_period(3) == 1 / 8192
    assert periodic_period(1) == periodic_period(8) == 1 / 256  # RS 1 and 2 act as 8 and 9
    assert periodic_period(2) == periodic_period(9)


def test_periodic_interrupt_runs_only_while_pie_is_set():
    dev, bus, wall, mono, levels, timers = rtc()
    set_reg(bus, 0x0A, 0x2F)  # 2 Hz
    assert timers == []  # no PIE: no timer, no thread
    set_reg(bus, 0x0B, 0x42)  # PIE
    (timer,) = timers
    assert timer.deadline == pytest.approx(100.5)
    mono.now = 100.5
    timer.fire()
    assert levels == [1] and timer.deadline == pytest.approx(101.0)
    assert reg(bus, 0x0C) == 0xC0  # IRQF | PF, and the read clears them and lowers IRQ 8
    assert levels == [1, 0] and reg(bus, 0x0C) == 0x00
    mono.now = 101.0
    timer.fire()
    assert levels == [1, 0, 1] and timer.deadline == pytest.approx(101.5)
    mono.now = 104.2  # the host fell behind: missed ticks are dropped, the next is a period away
    timer.fire()
    assert timer.deadline == pytest.approx(104.7)
    set_reg(bus, 0x0B, 0x02)  # PIE off: the timer is disarmed, IRQF and the line drop
    assert timer.deadline is None and levels[-1] == 0
    assert reg(bus, 0x0C) == 0x40  # PF stays until read
    dev.close()
    assert timer.closed


def test_changing_the_rate_restarts_the_period():
    dev, bus, wall, mono, levels, timers = rtc()
    set_reg(bus, 0x0B, 0x42)
    assert timers[0].deadline == pytest.approx(100 + 1 / 1024)
    mono.now = 100.0001
    set_reg(bus, 0x0A, 0x2F)
    assert timers[0].deadline == pytest.approx(100.5001)
    set_reg(bus, 0x0A, 0x20)  # rate 0: no periodic interrupt
    assert timers[0].deadline is None


def test_update_ended_and_alarm_flags_follow_the_seconds():
    dev, bus, wall, mono, levels, timers = rtc()
    assert reg(bus, 0x0C) == 0
    wall.now += 1  # a second's update passed
    assert reg(bus, 0x0C) == 0x10  # UF, no IRQF: UIE is clear
    for alarm in (1, 3, 5):
        set_reg(bus, alarm, 0xC0)  # don't care: every second matches (x86/s3.c)
    wall.now += 1
    assert reg(bus, 0x0C) == 0x30  # UF | AF
    set_reg(bus, 1, 0x59)  # alarm at hh:mm:59 -- the clock reads 13:45:58 now
    for alarm in (3, 5):
        set_reg(bus, alarm, 0xFF)
    wall.now += 1
    assert reg(bus, 0x0C) == 0x30  # 13:45:59: matched
    wall.now += 1
    assert reg(bus, 0x0C) == 0x10  # 13:46:00: no match
    set_reg(bus, 0x0B, 0x82)  # SET: no updates
    wall.now += 5
    assert reg(bus, 0x0C) == 0x00
    assert levels == []


def test_alarm_interrupt_raises_irq8_and_calls_wakeup():
    wakes = []
    dev, bus, wall, mono, levels, timers = rtc(wakeup=lambda: wakes.append(1))
    for alarm in (1, 3, 5):
        set_reg(bus, alarm, 0xC0)
    set_reg(bus, 0x0B, 0x22)  # AIE: the timer wakes at the next second boundary
    (timer,) = timers
    assert timer.deadline == pytest.approx(100.5, abs=1e-3)  # NOW is half-way through a second
    wall.now += 0.5
    mono.now += 0.5
    timer.fire()
    assert levels == [1] and wakes == [1]
    assert timer.deadline == pytest.approx(101.5, abs=1e-3)  # the next second
    assert reg(bus, 0x0C) == 0xB0 and levels == [1, 0]  # IRQF | AF | UF


def test_update_interrupt_and_enabling_a_pending_flag():
    dev, bus, wall, mono, levels, timers = rtc()
    wall.now += 1  # UF is pending (counted when B is written)
    set_reg(bus, 0x0B, 0x12)  # UIE with UF already set: IRQ 8 at once, as QEMU
    assert levels == [1]
    assert reg(bus, 0x0C) == 0x90 and levels == [1, 0]
    set_reg(bus, 0x0B, 0x92)  # SET clears UIE, as QEMU
    assert reg(bus, 0x0B) == 0x82


def test_deadline_timer_calls_back_on_its_thread_and_stops_on_close():
    fired, done = [], threading.Event()

    def callback():
        fired.append(threading.current_thread().name)
        if len(fired) == 3:
            done.set()
            return None
        return time.monotonic() + 0.001

    timer = DeadlineTimer(callback, name="test-timer")
    timer.arm(time.monotonic() + 0.001)
    assert done.wait(0.4)
    timer.close()
    assert fired == ["test-timer"] * 3
    assert timer._thread is not None and not timer._thread.is_alive()


def test_a_real_periodic_interrupt_reaches_irq():
    raised = threading.Event()
    dev = Cmos(irq=lambda level: level and raised.set())
    bus = PortHarness(dev)
    set_reg(bus, 0x0A, 0x23)  # 8192 Hz
    set_reg(bus, 0x0B, 0x42)
    try:
        assert raised.wait(0.4)
        assert reg(bus, 0x0C) & 0xC0 == 0xC0
    finally:
        dev.close()
