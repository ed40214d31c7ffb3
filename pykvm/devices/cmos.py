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
* Status C (0x0C): interrupt flags, read-only, cleared by a read. This model raises no IRQ 8
  (no periodic, alarm or update-ended interrupts), so its flags stay 0.
* Status D (0x0D): bit 7 VRT (valid RAM and time) = 1, read-only.
* 0x0E-0x7F: battery-backed RAM, including what PC firmware leaves there for the OS and what
  QEMU puts there for SeaBIOS (:meth:`Cmos.set_memory_size`, :meth:`Cmos.set_cpu_count`).
"""

from __future__ import annotations

import calendar
import time
from typing import Callable

from .base import Device

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
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_RESET = REG_B_24H
REG_D_VRT = 0x80

UIP_BEFORE = 244e-6  # UIP rises this long before the update...
UPDATE_TIME = 1984e-6  # ...and stays up while the update runs

_TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


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
    ) -> None:
        super().__init__()
        self.ports = ((port, 2),)
        self.base = port
        self.clock = clock
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_A] = REG_A_RESET
        self.ram[REG_B] = REG_B_RESET
        self.ram[REG_D] = REG_D_VRT
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0  # guest time - host time, in seconds
        self._latched: dict[int, int] | None = None  # the time registers while SET stops the clock
        if below_4g is not None:
            self.set_memory_size(below_4g, above_4g)
        if ncpus is not None:
            self.set_cpu_count(ncpus)

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
        if self.ram[REG_B] & REG_B_SET or (self.ram[REG_A] & 0x70) != 0x20:
            return False  # no updates while SET, or with the divider held in reset
        fraction = now % 1
        return fraction >= 1 - UIP_BEFORE or fraction < UPDATE_TIME

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
            value = self.ram[REG_C]
            self.ram[REG_C] = 0
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
        elif index == REG_A:
            self.ram[REG_A] = value & 0x7F  # UIP is read-only
        elif index == REG_B:
            setting, was_setting = value & REG_B_SET, self.ram[REG_B] & REG_B_SET
            if setting and not was_setting:
                self._latched = self._time_registers(self.clock() + self.offset)
            self.ram[REG_B] = value
            if was_setting and not setting and self._latched is not None:
                self._set_time(self._latched)
                self._latched = None
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[index] = value
