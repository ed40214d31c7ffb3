"""The MC146818 real-time clock and its CMOS RAM (ports 0x70 / 0x71), as a PC has it.

Registers after the Motorola MC146818A datasheet ("Address Map", "Register A-D") and QEMU's
``hw/rtc/mc146818rtc.c``:

* Port 0x70 (write): the register index in bits 0-6; bit 7 set disables NMI (kept in
  :attr:`nmi_disabled`). A read of 0x70 returns 0xFF, as in QEMU.
* Port 0x71: the indexed register; 128 bytes (the AT's extended CMOS).
* 0x00-0x09: seconds, alarm seconds, minutes, alarm minutes, hours, alarm hours, day of week
  (1 = Sunday), day of month, month, year; century in 0x32 (where QEMU and ACPI's FADT.CENTURY
  put it). The time is the host's clock (UTC, QEMU's ``-rtc base=utc``) plus an offset the guest
  sets by writing the registers: in BCD unless status B.DM selects binary, in 24-hour form unless
  status B.24/12 is clear (then hours 1-12 with bit 7 = PM).
* Status A (0x0A): bit 7 UIP (read-only) is 1 from 244 us before each second's update until the
  update ends (1984 us after it), bits 0-6 divider and rate (reset 0x26: 32.768 kHz, 1024 Hz).
* Status B (0x0B): 7 SET (updates stop: the guest writes the time, which starts when SET is
  cleared), 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (binary), 1 24/12, 0 DSE; reset 0x02.
* Status C (0x0C): interrupt flags, read-only: 7 IRQF (an enabled flag is set: IRQ 8 is
  raised), 6 PF (periodic), 5 AF (alarm), 4 UF (update ended). A read returns them, clears them
  all and lowers IRQ 8 (QEMU's ``cmos_ioport_read``).
* Status D (0x0D): bit 7 VRT (valid RAM and time) = 1, read-only.
* 0x0E-0x7F: battery-backed RAM, including what PC firmware leaves there for the OS and what
  QEMU puts there for SeaBIOS (:meth:`Cmos.set_memory_size`, :meth:`Cmos.set_cpu_count`).

Interrupts (IRQ 8 through ``irq``, a level: raised while IRQF is set), as QEMU's model:

* Periodic: rate select RS = status A bits 0-3; RS 0 is off, RS 1 and 2 act as 8 and 9, and
  otherwise the period is ``2 ** (RS - 1)`` cycles of 32.768 kHz (RS 6, the reset value: 1024 Hz;
  RS 15: 2 Hz). As in QEMU (``rtc_periodic_clock_ticks``) the periodic timer runs only while
  PIE is set, and each tick sets PF and IRQF and raises IRQ 8. A host thread
  (:class:`DeadlineTimer`) runs the ticks; it starts when PIE is first set and rate is not 0,
  sleeps while PIE is clear, and ends at :meth:`Cmos.close`. Ticks the host could not deliver
  on time are dropped, not queued (QEMU's default ``lost_tick_policy=discard``).
* Update-ended and alarm: at each second's update (not while SET, and only with the divider
  bits 0x20, the 32.768 kHz time base) UF is set, and AF when seconds, minutes and hours equal
  their alarm registers (an alarm byte of 0xC0-0xFF matches any value). Their IRQF and IRQ 8
  follow UIE / AIE; the host thread wakes at the second boundary only while UIE or AIE is set.
  With those interrupts disabled the flags are still computed, when the guest reads status C.
  Writing B with an enable bit whose flag is already set raises IRQ 8 at once; setting SET
  clears UIE (QEMU does both). An alarm interrupt also calls ``wakeup()`` (if given): that is
  how an RTC alarm wakes a sleeping PC (ACPI RTC_STS / WAK_STS,
  :meth:`pykvm.devices.acpi_pm.AcpiPm.wakeup`), QEMU's ``QEMU_WAKEUP_REASON_RTC``.
* Square-wave output (SQWE) and daylight saving (DSE) are stored but have no effect.

Tests drive the interrupts without sleeping by passing ``timer`` (a factory taking the callback
and returning an object with ``arm(deadline)``, ``cancel()`` and ``close()``) and ``monotonic``.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from typing import Callable

from .base import Device, Irq, IrqLine, field, hex_field

CMOS_INDEX_PORT = 0x70
CMOS_DATA_PORT = 0x71
CMOS_SIZE = 128

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

# memory sizes, as pc_cmos_init() in QEMU's hw/i386/pc.c writes them and SeaBIOS reads them
BASE_MEM_LO, BASE_MEM_HI = 0x15, 0x16  # base memory in KiB (at most 640)
EXT_MEM_LO, EXT_MEM_HI = 0x17, 0x18  # memory from 1 MiB, in KiB (at most 65535: 1 MiB-65 MiB)
EXT_MEM2_LO, EXT_MEM2_HI = 0x30, 0x31  # the same again (the POST-reported copy)
MEM_ABOVE_16M_LO, MEM_ABOVE_16M_HI = 0x34, 0x35  # memory from 16 MiB to 4 GiB, in 64 KiB units
MEM_ABOVE_4G_LO, MEM_ABOVE_4G_MID, MEM_ABOVE_4G_HI = 0x5B, 0x5C, 0x5D  # memory above 4 GiB, 64 KiB units
SMP_COUNT = 0x5F  # number of CPUs - 1 (QEMU's x86_rtc_set_cpus_count(); 0 when more than 255)

REG_A_UIP = 0x80
REG_A_RESET = 0x26
REG_A_RATE = 0x0F
REG_A_DIVIDER = 0x70
DIVIDER_32K = 0x20  # DV2-0 = 010: the 32.768 kHz time base, the clock running
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_C_MASK = REG_C_PF | REG_C_AF | REG_C_UF  # the flags B's PIE / AIE / UIE enable (same bits)
ALARM_DONT_CARE = 0xC0  # an alarm register >= 0xC0 matches every value
RTC_IRQ = 8
RTC_BASE_HZ = 32768
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_RESET = REG_B_24H
REG_D_VRT = 0x80

UIP_BEFORE = 244e-6  # UIP rises this long before the update...
UPDATE_TIME = 1984e-6  # ...and stays up while the update runs

_TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def periodic_period(rate_select: int) -> float:
    """Seconds between periodic interrupts for status A's rate select (0: none), as QEMU's
    ``periodic_period_to_clock``: RS 1 and 2 act as RS 8 and 9."""
    rate_select &= REG_A_RATE
    if rate_select == 0:
        return 0.0
    if rate_select <= 2:
        rate_select += 7
    return (1 << (rate_select - 1)) / RTC_BASE_HZ


class DeadlineTimer:
    """A host thread that calls ``callback()`` at a deadline (``monotonic`` seconds).

    ``arm(deadline)`` sets (or moves) the deadline, ``cancel()`` disarms it, ``close()`` ends the
    thread. The callback runs on the timer's thread and returns the next deadline, or None to
    disarm. The thread starts at the first ``arm`` (a device that never arms one has no thread).
    """

    def __init__(self, callback: Callable[[], float | None], *, monotonic: Callable[[], float] = time.monotonic,
                 name: str = "device-timer") -> None:
        self._callback = callback
        self._monotonic = monotonic
        self._name = name
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float) -> None:
        with self._cond:
            if self._closed:
                return
            self._deadline = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                delay = self._deadline - self._monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._deadline = None
                self._cond.release()
                try:
                    following = self._callback()
                finally:
                    self._cond.acquire()
                if following is not None and self._deadline is None and not self._closed:
                    self._deadline = following


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _unbcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def memory_size_registers(below_4g: int, above_4g: int = 0) -> dict[int, int]:
    """The CMOS bytes for ``below_4g`` bytes of RAM from address 0 and ``above_4g`` from 4 GiB,
    as QEMU's ``pc_cmos_init()`` computes them (values clamped to their fields)."""
    if below_4g < 0 or above_4g < 0 or below_4g > 4 * GiB:
        raise ValueError(f"RAM sizes below 4 GiB ({below_4g:#x}) and above it ({above_4g:#x}) are invalid")
    base = min(below_4g // KiB, 640)
    ext = min(max(below_4g - 1 * MiB, 0) // KiB, 0xFFFF)
    above_16m = min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
    high = min(above_4g // (64 * KiB), 0xFFFFFF)
    return {
        BASE_MEM_LO: base & 0xFF, BASE_MEM_HI: base >> 8,
        EXT_MEM_LO: ext & 0xFF, EXT_MEM_HI: ext >> 8,
        EXT_MEM2_LO: ext & 0xFF, EXT_MEM2_HI: ext >> 8,
        MEM_ABOVE_16M_LO: above_16m & 0xFF, MEM_ABOVE_16M_HI: above_16m >> 8,
        MEM_ABOVE_4G_LO: high & 0xFF, MEM_ABOVE_4G_MID: (high >> 8) & 0xFF, MEM_ABOVE_4G_HI: high >> 16,
    }


class Cmos(Device):
    """The RTC and CMOS RAM at ports 0x70-0x71."""

    def __init__(
        self,
        *,
        below_4g: int | None = None,
        above_4g: int = 0,
        ncpus: int | None = None,
        clock: Callable[[], float] = time.time,
        port: int = CMOS_INDEX_PORT,
        irq: Irq | None = None,
        wakeup: Callable[[], object] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        timer: Callable[[Callable[[], float | None]], DeadlineTimer] | None = None,
    ) -> None:
        super().__init__()
        self.ports = ((port, 2),)
        self.base = port
        self.clock = clock
        self.monotonic = monotonic
        self.line = IrqLine(irq)
        self.wakeup = wakeup
        self._timer_factory = timer or (lambda cb: DeadlineTimer(cb, monotonic=monotonic, name="rtc-timer"))
        self._timer: DeadlineTimer | None = None
        self._next_tick: float | None = None  # monotonic time of the next periodic interrupt
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_A] = REG_A_RESET
        self.ram[REG_B] = REG_B_RESET
        self.ram[REG_D] = REG_D_VRT
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0  # guest time - host time, in seconds
        self._latched: dict[int, int] | None = None  # the time registers while SET stops the clock
        self._last_second = math.floor(self._guest_now())  # the last second whose update was counted
        if below_4g is not None:
            self.set_memory_size(below_4g, above_4g)
        if ncpus is not None:
            self.set_cpu_count(ncpus)

    def close(self) -> None:
        """Stop the interrupt thread (if one was started); the registers keep working."""
        with self._lock:
            timer, self._timer = self._timer, None
            self._next_tick = None
        if timer is not None:
            timer.close()

    # ---- state --------------------------------------------------------------------------------
    def save(self) -> dict:
        # The clock as its offset from the host's (the guest's time goes on with the host's, as
        # QEMU's -rtc clock=host), the periodic interrupt as the time left to its next tick.
        with self._lock:
            latched = None if self._latched is None else {str(k): v for k, v in self._latched.items()}
            periodic_in = None if self._next_tick is None else self._next_tick - self.monotonic()
            return {"ram": self.ram.hex(), "index": self.index, "nmi_disabled": self.nmi_disabled,
                    "offset": self.offset, "latched": latched, "last_second": self._last_second,
                    "periodic_in": periodic_in}

    def restore(self, state: dict) -> None:
        ram = hex_field(state, "ram", CMOS_SIZE)
        index = field(state, "index", int, limit=CMOS_SIZE)
        nmi_disabled = field(state, "nmi_disabled", bool)
        offset = field(state, "offset", float)
        latched = field(state, "latched", (dict, type(None)))
        if latched is not None:
            if sorted(latched) != sorted(str(r) for r in _TIME_REGS):
                raise ValueError("saved field 'latched' does not hold the time registers")
            latched = {int(k): field(latched, k, int, limit=0x100) for k in latched}
        last_second = field(state, "last_second", int)
        periodic_in = field(state, "periodic_in", (float, type(None)))
        with self._lock:
            self.ram[:], self.index, self.nmi_disabled = ram, index, nmi_disabled
            self.offset, self._latched, self._last_second = offset, latched, last_second
            self._next_tick = None if periodic_in is None else self.monotonic() + periodic_in
            self.line.set(self.ram[REG_C] & REG_C_IRQF)
            self._schedule()  # the timer armed as a register write arms it

    # ---- configuration ------------------------------------------------------------------------
    def set_memory_size(self, below_4g: int, above_4g: int = 0) -> None:
        """Store the RAM size the way QEMU does for SeaBIOS (see :func:`memory_size_registers`)."""
        for index, value in memory_size_registers(below_4g, above_4g).items():
            self.ram[index] = value

    def set_cpu_count(self, ncpus: int) -> None:
        """Register 0x5F = CPUs - 1, or 0 past 255 CPUs (then firmware must ask fw_cfg), as QEMU."""
        if ncpus < 1:
            raise ValueError(f"a machine has at least one CPU, not {ncpus}")
        self.ram[SMP_COUNT] = ncpus - 1 if ncpus <= 0xFF else 0

    # ---- time ---------------------------------------------------------------------------------
    def _encode(self, value: int) -> int:
        return value if self.ram[REG_B] & REG_B_DM_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.ram[REG_B] & REG_B_DM_BINARY else _unbcd(value)

    def _time_registers(self, now: float) -> dict[int, int]:
        t = time.gmtime(int(now // 1))
        hour = t.tm_hour
        if self.ram[REG_B] & REG_B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        return {
            SECONDS: self._encode(t.tm_sec),
            MINUTES: self._encode(t.tm_min),
            HOURS: hours,
            DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # tm_wday: Monday = 0; the RTC: Sunday = 1
            DAY_OF_MONTH: self._encode(t.tm_mday),
            MONTH: self._encode(t.tm_mon),
            YEAR: self._encode(t.tm_year % 100),
            CENTURY: self._encode(t.tm_year // 100),
        }

    def _epoch_of(self, regs: dict[int, int]) -> int | None:
        hours = regs[HOURS]
        if self.ram[REG_B] & REG_B_24H:
            hour = self._decode(hours)
        else:
            hour = self._decode(hours & 0x7F) % 12 + (12 if hours & 0x80 else 0)
        year = self._decode(regs[CENTURY]) * 100 + self._decode(regs[YEAR])
        fields = (year, self._decode(regs[MONTH]), self._decode(regs[DAY_OF_MONTH]), hour,
                  self._decode(regs[MINUTES]), self._decode(regs[SECONDS]))
        try:
            if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= calendar.monthrange(year, fields[1])[1]
                    and fields[3] < 24 and fields[4] < 60 and fields[5] < 60):
                return None
            return calendar.timegm(fields + (0, 0, 0))
        except (ValueError, OverflowError):
            return None

    def _set_time(self, regs: dict[int, int]) -> None:
        epoch = self._epoch_of(regs)
        if epoch is not None:  # an impossible date leaves the clock as it was
            now = self.clock()
            self.offset = epoch + (now % 1) - now

    def _update_in_progress(self, now: float) -> bool:
        if not self._running():
            return False  # no updates while SET, or with the divider held in reset
        fraction = now % 1
        return fraction >= 1 - UIP_BEFORE or fraction < UPDATE_TIME

    def _running(self) -> bool:
        return not self.ram[REG_B] & REG_B_SET and (self.ram[REG_A] & REG_A_DIVIDER) == DIVIDER_32K

    def _guest_now(self) -> float:
        return self.clock() + self.offset

    # ---- interrupts (called with the lock held) -----------------------------------------------
    def _set_flags(self, flags: int) -> None:
        self.ram[REG_C] |= flags
        if self.ram[REG_C] & self.ram[REG_B] & REG_C_MASK:
            self.ram[REG_C] |= REG_C_IRQF
            self.line.set(1)

    def _alarm_matches(self, second: int) -> bool:
        regs = self._time_registers(second)
        return all(
            self.ram[alarm] >= ALARM_DONT_CARE or self.ram[alarm] == regs[reg]
            for reg, alarm in ((SECONDS, SECONDS_ALARM), (MINUTES, MINUTES_ALARM), (HOURS, HOURS_ALARM))
        )

    def _catch_up(self) -> None:
        """Count the second updates since the last call: UF, and AF where the alarm matched."""
        now = math.floor(self._guest_now())
        if not self._running() or now <= self._last_second:
            self._last_second = now if not self._running() else max(self._last_second, now)
            return
        first = max(self._last_second + 1, now - 86399)  # at most a day's worth of alarm checks
        alarm = any(self._alarm_matches(second) for second in range(first, now + 1))
        self._last_second = now
        self._set_flags(REG_C_UF | (REG_C_AF if alarm else 0))
        if alarm and self.ram[REG_B] & REG_B_AIE and self.wakeup is not None:
            self.wakeup()

    def _next_deadline(self) -> float | None:
        deadlines = []
        if self._next_tick is not None:
            deadlines.append(self._next_tick)
        if self.ram[REG_B] & (REG_B_AIE | REG_B_UIE) and self._running():
            to_next_second = 1 - self._guest_now() % 1
            deadlines.append(self.monotonic() + to_next_second + 1e-4)
        return min(deadlines) if deadlines else None

    def _schedule(self, *, restart_periodic: bool = False) -> None:
        period = periodic_period(self.ram[REG_A])
        if not (self.ram[REG_B] & REG_B_PIE and period):
            self._next_tick = None
        elif self._next_tick is None or restart_periodic:
            self._next_tick = self.monotonic() + period
        deadline = self._next_deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
            return
        if self._timer is None:
            self._timer = self._timer_factory(self._on_timer)
        self._timer.arm(deadline)

    def _on_timer(self) -> float | None:
        """The timer thread's callback: deliver what is due, return the next deadline."""
        with self._lock:
            if self._timer is None:
                return None  # closed
            now = self.monotonic()
            period = periodic_period(self.ram[REG_A])
            if self._next_tick is not None and period and now >= self._next_tick:
                self._set_flags(REG_C_PF)
                self._next_tick += period
                if self._next_tick <= now:  # the host fell behind: drop the missed ticks
                    self._next_tick = now + period
            self._catch_up()
            return self._next_deadline()

    # ---- registers ----------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        if port == self.base:
            return 0xFF
        index = self.index
        if index in _TIME_REGS:
            if self._latched is not None:
                return self._latched[index]
            return self._time_registers(self.clock() + self.offset)[index]
        if index == REG_A:
            uip = REG_A_UIP if self._update_in_progress(self.clock() + self.offset) else 0
            return self.ram[REG_A] | uip
        if index == REG_C:
            self._catch_up()
            value = self.ram[REG_C]
            self.ram[REG_C] = 0
            self.line.set(0)
            return value
        return self.ram[index]

    def write(self, port: int, size: int, value: int):
        value &= 0xFF
        if port == self.base:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
            return
        index = self.index
        if index in _TIME_REGS:
            if self._latched is not None:
                self._latched[index] = value
            else:
                regs = self._time_registers(self.clock() + self.offset)
                regs[index] = value
                if index != DAY_OF_WEEK:  # the day of week is derived from the date here
                    self._set_time(regs)
                    self._last_second = math.floor(self._guest_now())  # a new time: no update passed
        elif index == REG_A:
            self._catch_up()
            old = self.ram[REG_A]
            self.ram[REG_A] = value & 0x7F  # UIP is read-only
            if (old ^ value) & REG_A_DIVIDER:
                self._last_second = math.floor(self._guest_now())
            self._schedule(restart_periodic=bool((old ^ value) & REG_A_RATE))
        elif index == REG_B:
            self._catch_up()
            setting, was_setting = value & REG_B_SET, self.ram[REG_B] & REG_B_SET
            if setting:
                value &= ~REG_B_UIE  # QEMU: SET ends update-ended interrupts
            if setting and not was_setting:
                self._latched = self._time_registers(self.clock() + self.offset)
            self.ram[REG_B] = value
            if was_setting and not setting and self._latched is not None:
                self._set_time(self._latched)
                self._latched = None
                self._last_second = math.floor(self._guest_now())
            if value & self.ram[REG_C] & REG_C_MASK:  # a flag already set becomes enabled
                self.ram[REG_C] |= REG_C_IRQF
                self.line.set(1)
            else:
                self.ram[REG_C] &= ~REG_C_IRQF
                self.line.set(0)
            self._schedule()
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[index] = value
