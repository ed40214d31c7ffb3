"""A minimal 8042 keyboard controller (ports 0x60 / 0x64): its status, its command byte, and the
reset line a guest pulses to reboot the machine.

After the IBM PC/AT Technical Reference ("Keyboard Controller": status register, commands) and
QEMU's ``hw/input/pckbd.c``; no keyboard or mouse is attached:

* 0x64 read: the status register. 0 OBF (a byte waits at 0x60), 1 IBF (always 0: the
  controller takes every byte at once), 2 SYS (set by the self-test), 3 A2 (the last write
  went to 0x64), 4 INH (1: keyboard not inhibited). Power-on value 0x18, as QEMU's.
* 0x64 write: a command. 0x20 read the command byte, 0x60 write it (the next byte at 0x60),
  0xA7 / 0xA8 disable / enable the aux port, 0xA9 test it (0x00), 0xAA self-test (0x55),
  0xAB test the keyboard port (0x00), 0xAD / 0xAE disable / enable the keyboard, 0xD0 read
  the output port, 0xD1 write it (the next byte at 0x60; bit 0 = 0 asserts reset), 0xD2 write
  the keyboard output buffer, 0xF0-0xFF pulse output-port bits 0-3 low for those bits that are
  0 in the command: 0xFE pulses bit 0, the CPU reset line. Other commands are ignored.
* 0x60 read: the output buffer (clears OBF); 0 when it is empty. 0x60 write: the data byte a
  0x60 / 0xD1 / 0xD2 command waits for; with no command waiting the byte would go to the
  keyboard, and there is none.

A reset ends the run with :class:`Reset`, an :class:`~pykvm.outcome.Outcome` (status 0) that
says where the reset came from. With the command byte's bit 0 set, a byte in the output buffer
raises IRQ 1 through ``irq``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..outcome import Outcome
from .base import Device, Irq, IrqLine, field

DATA_PORT = 0x60
STATUS_PORT = 0x64  # read: status; write: command
I8042_IRQ = 1

STAT_OBF = 0x01
STAT_IBF = 0x02
STAT_SYS = 0x04
STAT_CMD = 0x08  # A2: last write was to the command port
STAT_UNLOCKED = 0x10

CCB_KBD_INT = 0x01
CCB_AUX_INT = 0x02
CCB_SYS = 0x04
CCB_KBD_DISABLED = 0x10
CCB_AUX_DISABLED = 0x20

OUT_RESET = 0x01  # output port bit 0: the CPU reset line, active low
OUT_A20 = 0x02

CMD_READ_CCB = 0x20
CMD_WRITE_CCB = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_PULSE_FIRST = 0xF0
CMD_RESET = 0xFE


@dataclass(frozen=True)
class Reset(Outcome):
    """The guest reset the machine (``source`` says how: "i8042 command 0xfe", ...)."""

    status: int = 0
    source: str = "reset"


class I8042(Device):
    """The 8042 at ports 0x60 and 0x64."""

    def __init__(self, *, irq: Irq | None = None) -> None:
        super().__init__()
        self.ports = ((DATA_PORT, 1), (STATUS_PORT, 1))
        self.line = IrqLine(irq)
        self.status = STAT_CMD | STAT_UNLOCKED
        self.ccb = CCB_KBD_INT | CCB_AUX_INT  # QEMU's power-on mode
        self.outport = OUT_RESET | OUT_A20
        self._obuf: int | None = None
        self._pending: int | None = None  # a command waiting for its data byte

    @property
    def a20(self) -> bool:
        return bool(self.outport & OUT_A20)

    def save(self) -> dict:
        with self._lock:
            return {"status": self.status, "ccb": self.ccb, "outport": self.outport,
                    "obuf": self._obuf, "pending": self._pending}

    def restore(self, state: dict) -> None:
        values = [field(state, "status", int, limit=0x100), field(state, "ccb", int, limit=0x100),
                  field(state, "outport", int, limit=0x100), field(state, "obuf", (int, type(None)), limit=0x100),
                  field(state, "pending", (int, type(None)), limit=0x100)]
        with self._lock:
            self.status, self.ccb, self.outport, self._obuf, self._pending = values
            self._update()  # IRQ 1 to the level a waiting byte gives

    def _output(self, value: int) -> None:
        self._obuf = value & 0xFF
        self.status |= STAT_OBF
        self._update()

    def _update(self) -> None:
        self.line.set(self._obuf is not None and self.ccb & CCB_KBD_INT)

    def read(self, port: int, size: int) -> int:
        if port == STATUS_PORT:
            return self.status
        value, self._obuf = (self._obuf or 0), None
        self.status &= ~STAT_OBF
        self._update()
        return value

    def write(self, port: int, size: int, value: int):
        value &= 0xFF
        if port == STATUS_PORT:
            self.status |= STAT_CMD
            return self._command(value)
        self.status &= ~STAT_CMD
        command, self._pending = self._pending, None
        if command == CMD_WRITE_CCB:
            self.ccb = value
            self.status = (self.status & ~STAT_SYS) | (STAT_SYS if value & CCB_SYS else 0)
            self._update()
        elif command == CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & OUT_RESET:
                return Reset(source="i8042 output port write (bit 0 clear)")
        elif command == CMD_WRITE_KBD_OBUF:
            self._output(value)
        return None  # no keyboard attached to take the byte

    def _command(self, cmd: int):
        self._pending = None
        if cmd == CMD_READ_CCB:
            self._output(self.ccb)
        elif cmd in (CMD_WRITE_CCB, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OBUF):
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ccb |= CCB_AUX_DISABLED
        elif cmd == CMD_AUX_ENABLE:
            self.ccb &= ~CCB_AUX_DISABLED
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._output(0x00)
        elif cmd == CMD_SELF_TEST:
            self.status |= STAT_SYS
            self._output(0x55)
        elif cmd == CMD_KBD_DISABLE:
            self.ccb |= CCB_KBD_DISABLED
        elif cmd == CMD_KBD_ENABLE:
            self.ccb &= ~CCB_KBD_DISABLED
        elif cmd == CMD_READ_OUTPORT:
            self._output(self.outport)
        elif cmd >= CMD_PULSE_FIRST and not cmd & OUT_RESET:
            return Reset(source=f"i8042 command {cmd:#04x}")
        return None
