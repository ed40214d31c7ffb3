"""ACPI fixed hardware of QEMU's ``pc`` machine (the PIIX4 power-management function): PM1a event
and control blocks, the 24-bit PM timer, GPE0, and the SCI on IRQ 9.

Register behaviour after QEMU's ``hw/acpi/core.c`` (``acpi_pm1_evt_*``, ``acpi_pm1_cnt_*``,
``acpi_pm_tmr_*``, ``acpi_gpe_*``, ``acpi_update_sci``) and ``hw/acpi/piix4.c``, and the ACPI
Specification 6.5, 4.8 (fixed hardware registers):

Where it sits. The PIIX4 PM block is 64 ports at the base the firmware writes to PCI config
register 0x40 (PMBA) of function 00:01.3; QEMU itself leaves it disabled until then. The
SeaBIOS that QEMU 7.2 ships puts it at 0x600 on ``pc`` (seen: its FADT says PM1a_CNT 0x604 and
PM_TMR 0x608, and the monitor's ``info mtree`` shows ``piix4-pm 0x600-0x63f``), as on ``q35``.
GPE0 is fixed at 0xAFE0, 4 ports (piix4.c ``GPE_BASE`` / ``GPE_LEN``). pykvm has no firmware,
so the device is simply placed at ``base`` (default 0x600) and ``gpe0_base`` (default 0xAFE0);
the FADT that :func:`pykvm.x86.acpi.build_acpi` builds with ``platform="pc"`` says the same,
and guests (Linux, kvm-unit-tests' ``x86/vmexit.c`` and ``x86/s3.c``) read the ports from it.
Of the 64 ports only these decode (others read 0xFF, writes dropped):

* base + 0: PM1_STS (16 bit). 0 TMR_STS, 5 GBL_STS, 8 PWRBTN_STS, 9 SLPBTN_STS, 10 RTC_STS,
  15 WAK_STS. Write 1 to clear. TMR_STS is set whenever bit 23 of the PM timer has changed
  since it was last cleared (QEMU's ``overflow_time``).
* base + 2: PM1_EN (16 bit). 0 TMR_EN, 5 GBL_EN, 8 PWRBTN_EN, 9 SLPBTN_EN, 10 RTC_EN; read as
  written. RTC_EN also decides whether an RTC alarm wakes the machine (:meth:`AcpiPm.wakeup`).
* base + 4: PM1_CNT (16 bit). 0 SCI_EN, 1 BM_RLD, 2 GBL_RLS, 10-12 SLP_TYP, 13 SLP_EN. SLP_EN
  reads 0; writing it with SLP_TYP starts a sleep, as QEMU's ``acpi_pm1_cnt_write``:
  SLP_TYP 0 = S5 soft off, SLP_TYP 1 = S3, SLP_TYP ``s4_value`` (2) = S4, handled as S5 (QEMU
  powers off after sending a SUSPEND_DISK event); other types are ignored.
  The FADT has no SMI_CMD (0: no SMM, no ACPI enable handshake), so by the ACPI spec the
  system is always in ACPI mode: SCI_EN reads 1 from reset (``sci_enabled=False`` gives
  QEMU's reset value 0, for firmware that writes ACPI_ENABLE to an APM port of its own).
* base + 8: PM_TMR (32-bit reads): a 24-bit counter at 3.579545 MHz (ACPI's PM_TIMER_FREQUENCY),
  ``int(monotonic() * 3579545) & 0xFFFFFF`` (QEMU counts from its virtual clock the same way);
  writes are ignored.
* GPE0 (``gpe0_base``, 4 ports, byte registers as QEMU's ``acpi_gpe_ioport_*``): bytes 0-1
  GPE0_STS (write 1 to clear), bytes 2-3 GPE0_EN. Nothing here sets a GPE (QEMU uses them for
  hot plug), so they only hold what is written.

Narrower or wider accesses to PM1 registers are taken at their offset within the 16-bit register
(QEMU declares them 2-byte only and widens or splits other sizes the same way).

The SCI (``irq``, ISA IRQ 9 on ``pc``, level, active high): raised while
``PM1_STS & PM1_EN & (TMR | GBL | PWRBTN | RTC)`` (QEMU's ``ACPI_BITMASK_PM1_COMMON_ENABLED``) or
``GPE0_STS & GPE0_EN`` is non-zero, lowered otherwise. While TMR_EN is set and TMR_STS clear, a
host timer (:class:`pykvm.devices.cmos.DeadlineTimer`, started on first need, ended by
:meth:`AcpiPm.close`) fires when bit 23 next changes, so the timer-carry SCI comes on time, as
QEMU's ``acpi_pm_tmr_timer``.

How sleeping ends a run:

* S5 (and S4) returns :class:`PowerOff`, an :class:`~pykvm.outcome.Outcome` with status 0 -- what
  QEMU's process exits with when the guest powers off.
* S3 calls ``on_sleep(3)`` if the machine gave one and returns what it returns (an Outcome ends
  the run, None lets the vCPU go on, e.g. after the machine has parked its vCPUs until a wake
  event). ``on_sleep`` runs on the vCPU thread with the device's lock held: it must not call
  back into this device (wake-ups come later, from another thread); without ``on_sleep`` it returns :class:`Suspend` (status 0, ``state=3``), so a run
  ends with a value that says the guest went to S3 rather than a silent hang. QEMU instead
  keeps the process alive, suspended, until a wake event, and SeaBIOS then jumps to the FACS
  waking vector. To resume, the machine calls :meth:`AcpiPm.wakeup` (``"rtc"`` when the RTC
  alarm fires, see ``Cmos(wakeup=...)``), which sets WAK_STS and the reason's status bit and
  says whether the reason is enabled; the machine then restarts the CPUs at the waking vector.
  :attr:`AcpiPm.sleep_state` holds the last state entered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..outcome import Outcome
from .base import Device, Irq, IrqLine, field, hex_field
from .cmos import DeadlineTimer

PM_BASE = 0x600  # where QEMU 7.2's SeaBIOS puts the PIIX4 PM block on pc (and q35)
PM_SIZE = 64
GPE0_BASE = 0xAFE0  # QEMU hw/acpi/piix4.c GPE_BASE
GPE0_LEN = 4
SCI_IRQ = 9
PM_TIMER_FREQUENCY = 3579545  # Hz
PM_TIMER_MASK = 0xFFFFFF
PM_TIMER_CARRY = 1 << 23

PM1_STS, PM1_EN, PM1_CNT, PM_TMR = 0, 2, 4, 8  # offsets from the base
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4

TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15

TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
SCI_SOURCES = TMR_EN | GBL_EN | PWRBTN_EN | RTC_EN  # QEMU's ACPI_BITMASK_PM1_COMMON_ENABLED

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13

SLP_TYP_S5 = 0  # the values the DSDT's \_S5 and \_S3 give, as QEMU's pc DSDT
SLP_TYP_S3 = 1
SLP_TYP_S4 = 2  # QEMU's default s4_val

WAKE_STATUS = {"rtc": RTC_STS, "pmtimer": TMR_STS, "other": PWRBTN_STS}  # acpi_notify_wakeup
WAKE_ENABLE = {"rtc": RTC_EN, "pmtimer": TMR_EN, "other": 0}


@dataclass(frozen=True)
class PowerOff(Outcome):
    """The guest powered the machine off (ACPI S5, or S4 taken as S5)."""

    status: int = 0
    state: int = 5


@dataclass(frozen=True)
class Suspend(Outcome):
    """The guest entered ACPI S3 and nothing was there to keep it asleep and wake it."""

    status: int = 0
    state: int = 3


class AcpiPm(Device):
    """PIIX4-style PM1a event / control blocks and PM timer at ``base``, GPE0 at ``gpe0_base``."""

    def __init__(
        self,
        base: int = PM_BASE,
        *,
        gpe0_base: int | None = GPE0_BASE,
        irq: Irq | None = None,
        on_sleep: Callable[[int], Outcome | None] | None = None,
        sci_enabled: bool = True,
        s4_value: int = SLP_TYP_S4,
        monotonic: Callable[[], float] = time.monotonic,
        timer: Callable[[Callable[[], float | None]], DeadlineTimer] | None = None,
    ) -> None:
        super().__init__()
        if base % PM_SIZE or not 0 < base <= 0x10000 - PM_SIZE:
            raise ValueError(f"the PM block is 64 ports at a 64-port boundary, not at {base:#x}")
        self.base = base
        self.gpe0_base = gpe0_base
        self.ports = ((base, PM_SIZE),) + (((gpe0_base, GPE0_LEN),) if gpe0_base is not None else ())
        self.line = IrqLine(irq)
        self.on_sleep = on_sleep
        self.s4_value = s4_value
        self.monotonic = monotonic
        self._timer_factory = timer or (lambda cb: DeadlineTimer(cb, monotonic=monotonic, name="acpi-pm-timer"))
        self._timer: DeadlineTimer | None = None
        self._closed = False
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = SCI_EN if sci_enabled else 0
        self.gpe_sts = bytearray(GPE0_LEN // 2)
        self.gpe_en = bytearray(GPE0_LEN // 2)
        self.sleep_state: int | None = None
        self._tick_offset = 0  # PM timer ticks - host ticks: a restored timer goes on from its saved count
        self._overflow_tick = self._next_carry(self._ticks())

    # ---- the PM timer -------------------------------------------------------------------------
    def _ticks(self) -> int:
        return int(self.monotonic() * PM_TIMER_FREQUENCY) + self._tick_offset

    @staticmethod
    def _next_carry(ticks: int) -> int:
        return (ticks + PM_TIMER_CARRY) & ~(PM_TIMER_CARRY - 1)  # QEMU's acpi_pm_tmr_calc_overflow_time

    @property
    def timer_value(self) -> int:
        return self._ticks() & PM_TIMER_MASK

    def _status(self) -> int:
        if self._ticks() >= self._overflow_tick:
            self.pm1_sts |= TMR_STS
        return self.pm1_sts

    # ---- the SCI ------------------------------------------------------------------------------
    def _update_sci(self) -> None:
        sts = self._status()
        gpe = any(s & e for s, e in zip(self.gpe_sts, self.gpe_en))
        self.line.set(bool(sts & self.pm1_en & SCI_SOURCES) or gpe)
        if self.pm1_en & TMR_EN and not sts & TMR_STS and not self._closed:
            if self._timer is None:
                self._timer = self._timer_factory(self._on_timer)
            self._timer.arm((self._overflow_tick - self._tick_offset) / PM_TIMER_FREQUENCY)
        elif self._timer is not None:
            self._timer.cancel()

    def _on_timer(self) -> None:
        with self._lock:
            if not self._closed:
                self._update_sci()
        return None  # _update_sci re-arms it if needed

    def close(self) -> None:
        """Stop the timer thread, if one was started."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()

    # ---- state --------------------------------------------------------------------------------
    def save(self) -> dict:
        # The timer's count, not the host clock it came from: the guest's PM timer continues from
        # it after a restore, as QEMU's virtual clock does, however long the snapshot lay.
        with self._lock:
            return {"pm1_sts": self._status(), "pm1_en": self.pm1_en, "pm1_cnt": self.pm1_cnt,
                    "gpe_sts": self.gpe_sts.hex(), "gpe_en": self.gpe_en.hex(), "sleep_state": self.sleep_state,
                    "ticks": self._ticks(), "overflow_tick": self._overflow_tick}

    def restore(self, state: dict) -> None:
        pm1_sts = field(state, "pm1_sts", int, limit=0x10000)
        pm1_en = field(state, "pm1_en", int, limit=0x10000)
        pm1_cnt = field(state, "pm1_cnt", int, limit=0x10000)
        gpe_sts, gpe_en = hex_field(state, "gpe_sts", GPE0_LEN // 2), hex_field(state, "gpe_en", GPE0_LEN // 2)
        sleep_state = field(state, "sleep_state", (int, type(None)))
        if sleep_state not in (None, 3, 4, 5):
            raise ValueError(f"saved field 'sleep_state' is {sleep_state}, not None, 3, 4 or 5")
        ticks = field(state, "ticks", int, limit=1 << 63)
        overflow_tick = field(state, "overflow_tick", int, limit=1 << 63)
        with self._lock:
            self.pm1_sts, self.pm1_en, self.pm1_cnt = pm1_sts, pm1_en, pm1_cnt & ~SLP_EN
            self.gpe_sts[:], self.gpe_en[:], self.sleep_state = gpe_sts, gpe_en, sleep_state
            self._tick_offset = ticks - int(self.monotonic() * PM_TIMER_FREQUENCY)
            self._overflow_tick = overflow_tick
            self._update_sci()  # the SCI to its level, and the carry timer armed as a write arms it

    # ---- events from the machine --------------------------------------------------------------
    def wakeup(self, reason: str = "other") -> bool:
        """A wake event (``"rtc"``, ``"pmtimer"`` or ``"other"``): set WAK_STS and the reason's
        status bit (QEMU's ``acpi_notify_wakeup``: "other" is reported as the power button).
        Returns whether the event may wake a sleeping machine (its enable bit in PM1_EN is set;
        "other" always may) and clears :attr:`sleep_state` when it does."""
        with self._lock:
            enabled = reason == "other" or bool(self.pm1_en & WAKE_ENABLE[reason])
            if self.sleep_state is not None and enabled:
                self.pm1_sts |= WAK_STS | WAKE_STATUS[reason]
                self.sleep_state = None
                self._update_sci()
            return enabled

    def power_button(self) -> None:
        """Press the power button: PWRBTN_STS (and the SCI) if PWRBTN_EN is set, as QEMU."""
        with self._lock:
            if self.pm1_en & PWRBTN_EN:
                self.pm1_sts |= PWRBTN_STS
                self._update_sci()

    # ---- registers ----------------------------------------------------------------------------
    def _register(self, offset: int) -> tuple[int, int] | None:
        for start, width in ((PM1_STS, 2), (PM1_EN, 2), (PM1_CNT, 2), (PM_TMR, 4)):
            if start <= offset < start + width:
                return start, offset - start
        return None

    def _gpe_byte(self, index: int) -> int:
        half = GPE0_LEN // 2
        return self.gpe_sts[index] if index < half else self.gpe_en[index - half]

    def read(self, port: int, size: int) -> int:
        if self.gpe0_base is not None and self.gpe0_base <= port < self.gpe0_base + GPE0_LEN:
            return self._gpe_byte(port - self.gpe0_base)
        found = self._register(port - self.base)
        if found is None:
            return (1 << (8 * size)) - 1
        start, shift = found
        value = {PM1_STS: self._status, PM1_EN: lambda: self.pm1_en, PM1_CNT: lambda: self.pm1_cnt,
                 PM_TMR: lambda: self.timer_value}[start]()
        return (value >> (8 * shift)) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> Outcome | None:
        if self.gpe0_base is not None and self.gpe0_base <= port < self.gpe0_base + GPE0_LEN:
            index, half = port - self.gpe0_base, GPE0_LEN // 2
            if index < half:
                self.gpe_sts[index] &= ~value & 0xFF
            else:
                self.gpe_en[index - half] = value & 0xFF
            self._update_sci()
            return None
        found = self._register(port - self.base)
        if found is None or found[0] == PM_TMR:
            return None
        start, shift = found
        mask = (((1 << (8 * size)) - 1) << (8 * shift)) & 0xFFFF
        value = (value << (8 * shift)) & mask
        if start == PM1_STS:
            if self._status() & value & TMR_STS:  # clearing TMR_STS: the next carry counts anew
                self._overflow_tick = self._next_carry(self._ticks())
            self.pm1_sts &= ~value
            self._update_sci()
        elif start == PM1_EN:
            self.pm1_en = (self.pm1_en & ~mask) | value
            self._update_sci()
        else:
            return self._write_control((self.pm1_cnt & ~mask) | value)
        return None

    def _write_control(self, value: int) -> Outcome | None:
        self.pm1_cnt = value & ~SLP_EN
        if not value & SLP_EN:
            return None
        slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if slp_typ == SLP_TYP_S5 or slp_typ == self.s4_value:
            self.sleep_state = 5 if slp_typ == SLP_TYP_S5 else 4
            return PowerOff(state=self.sleep_state)
        if slp_typ == SLP_TYP_S3:
            self.sleep_state = 3
            if self.on_sleep is not None:
                return self.on_sleep(3)
            return Suspend()
        return None
