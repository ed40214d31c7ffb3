"""The PIIX4-style ACPI PM block (QEMU pc): PM1 status / enable / control, PM timer, GPE0, SCI,
S5 / S3, wake events. A fake clock and a fake timer stand in for time and the host thread."""

from __future__ import annotations

import pytest

from pykvm.devices.acpi_pm import PM_TIMER_FREQUENCY, AcpiPm, PowerOff, Suspend
from pykvm.devices.harness import PortHarness
from pykvm.outcome import Outcome
from fake_timer import FakeTimer

BASE, GPE = 0x600, 0xAFE0
STS, EN, CNT, TMR = BASE, BASE + 2, BASE + 4, BASE + 8


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(**kwargs):
    clock, levels, timers = Clock(), [], []

    def factory(cb):
        timers.append(FakeTimer(cb))
        return timers[-1]

    dev = AcpiPm(irq=levels.append, monotonic=clock, timer=factory, **kwargs)
    return dev, PortHarness(dev), clock, levels, timers


def test_pm_timer_counts_24_bits_at_3_579545_mhz():
    dev, bus, clock, _, _ = make()
    first = bus.inp(TMR, 4)
    assert first == int(1000.0 * PM_TIMER_FREQUENCY) & 0xFFFFFF
    clock.now += 0.001
    assert (bus.inp(TMR, 4) - first) & 0xFFFFFF in (3579, 3580)  # 1 ms of ticks
    clock.now = 1000.0 + 5 * (1 << 24) / PM_TIMER_FREQUENCY + 1e-9  # five wraps later
    assert bus.inp(TMR, 4) == first  # 24 bits: it wrapped back
    bus.out(TMR, 0x12345678, 4)  # writes are ignored
    assert bus.inp(TMR, 4) == int(clock.now * PM_TIMER_FREQUENCY) & 0xFFFFFF


def test_status_is_write_one_to_clear_and_enable_reads_back():
    dev, bus, clock, levels, _ = make()
    assert bus.inp(STS, 2) == 0 and bus.inp(EN, 2) == 0
    dev.pm1_sts = 0x8400 | 0x0100  # WAK_STS, RTC_STS, PWRBTN_STS
    bus.out(STS, 0x0400, 2)
    assert bus.inp(STS, 2) == 0x8100
    bus.out(STS, 0xFFFF, 2)
    assert bus.inp(STS, 2) == 0
    bus.out(EN, 0x0520, 2)
    assert bus.inp(EN, 2) == 0x0520 and bus.inp(EN + 1, 1) == 0x05
    assert bus.inp(BASE + 0x10, 1) == 0xFF  # nothing else decodes in the 64-port block


def test_timer_carry_sets_tmr_sts_and_raises_the_sci_with_tmr_en():
    dev, bus, clock, levels, timers = make()
    carry = ((int(clock.now * PM_TIMER_FREQUENCY) + (1 << 23)) & ~((1 << 23) - 1)) / PM_TIMER_FREQUENCY
    bus.out(EN, 0x0001, 2)  # TMR_EN: a timer is armed for the next bit-23 change
    (timer,) = timers
    assert timer.deadline == pytest.approx(carry)
    assert levels == [] and bus.inp(STS, 2) & 1 == 0
    clock.now = carry + 1e-6
    timer.fire()
    assert levels == [1] and bus.inp(STS, 2) & 1 == 1
    assert timer.deadline is None  # TMR_STS set: nothing more to wait for
    bus.out(STS, 0x0001, 2)  # clear it: the SCI drops, the next carry is 2^23 ticks on
    assert levels == [1, 0] and bus.inp(STS, 2) & 1 == 0
    assert timer.deadline == pytest.approx(carry + (1 << 23) / PM_TIMER_FREQUENCY, abs=1e-5)
    bus.out(EN, 0, 2)
    assert timer.deadline is None
    dev.close()
    assert timer.closed


def test_tmr_sts_without_tmr_en_sets_no_sci():
    dev, bus, clock, levels, timers = make()
    clock.now += 3.0  # past a carry (2^23 ticks is 2.34 s)
    assert bus.inp(STS, 2) & 1 == 1
    assert levels == [] and timers == []


def test_s5_powers_off_with_status_0():
    dev, bus, *_ = make()
    assert bus.inp(CNT, 2) == 0x0001  # SCI_EN: always in ACPI mode (no SMI_CMD)
    result = bus.out(CNT, 0x2000 | (0 << 10) | 1, 2)  # SLP_EN, SLP_TYP 0
    assert isinstance(result, PowerOff) and isinstance(result, Outcome)
    assert result.status == 0 and result.ok and result.state == 5
    assert bus.inp(CNT, 2) == 0x0001  # SLP_EN reads 0
    assert isinstance(bus.out(CNT, 0x2000 | (2 << 10), 2), PowerOff)  # S4 is a power-off too, as QEMU
    assert bus.out(CNT, 5 << 10, 2) is None and bus.inp(CNT, 2) == 5 << 10  # no SLP_EN: just stored
    assert bus.out(CNT, 0x2000 | (5 << 10), 2) is None  # an unknown sleep type does nothing


def test_s3_without_on_sleep_ends_the_run_with_suspend():
    dev, bus, *_ = make()
    result = bus.out(CNT, 0x2400, 2)  # x86/s3.c's write: SLP_EN | SLP_TYP 1
    assert isinstance(result, Suspend) and result.state == 3 and result.status == 0
    assert dev.sleep_state == 3


def test_s3_calls_on_sleep_and_rtc_wakeup_sets_wak_sts():
    calls = []
    dev, bus, clock, levels, _ = make(on_sleep=lambda state: calls.append(state))
    bus.out(EN, 0x0400, 2)  # x86/s3.c: RTC_EN
    assert bus.out(CNT, 0x2400, 2) is None and calls == [3] and dev.sleep_state == 3
    assert dev.wakeup("rtc") is True
    assert bus.inp(STS, 2) & 0x8400 == 0x8400  # WAK_STS | RTC_STS
    assert levels == [1] and dev.sleep_state is None  # RTC_STS & RTC_EN: the SCI


def test_a_wake_event_that_is_not_enabled_does_not_wake():
    dev, bus, *_ = make(on_sleep=lambda state: None)
    bus.out(CNT, 0x2400, 2)
    assert dev.wakeup("rtc") is False and dev.sleep_state == 3 and bus.inp(STS, 2) & 0x8400 == 0
    assert dev.wakeup() is True and bus.inp(STS, 2) & 0x8100 == 0x8100  # "other": the power button


def test_power_button_and_sci_en_reset_value():
    dev, bus, clock, levels, _ = make(sci_enabled=False)
    assert bus.inp(CNT, 2) == 0
    dev.power_button()
    assert bus.inp(STS, 2) & 0x100 == 0  # PWRBTN_EN clear
    bus.out(EN, 0x0100, 2)
    dev.power_button()
    assert bus.inp(STS, 2) & 0x100 and levels == [1]


def test_gpe0_status_clears_by_writing_one_and_raises_the_sci_when_enabled():
    dev, bus, clock, levels, _ = make()
    assert [bus.inp(GPE + i) for i in range(4)] == [0, 0, 0, 0]
    bus.out(GPE + 2, 0x04)
    assert bus.inp(GPE + 2) == 0x04 and levels == []
    dev.gpe_sts[0] = 0x06
    bus.out(GPE + 3, 0)  # any GPE write re-evaluates the SCI
    assert levels == [1]
    bus.out(GPE, 0x04)
    assert bus.inp(GPE) == 0x02 and levels == [1, 0]
    assert bus.inp(GPE, 4) == 0x00040002  # STS0, STS1, EN0, EN1


def test_layout_options():
    dev = AcpiPm(0x600, gpe0_base=None)
    assert dev.ports == ((0x600, 64),)
    with pytest.raises(ValueError):
        AcpiPm(0xB008)
