"""QEMU's ``isa-debug-exit``: a write ends the run with status ``(value << 1) | 1``.

Behaviour as QEMU's ``hw/misc/debugexit.c``: any write of 1 to 4 bytes anywhere in
``[iobase, iobase + iosize)`` ends the emulator with exit status ``(value << 1) | 1`` (so a guest
can never report 0, which tells a debug exit from QEMU's own success); a read returns 0.

QEMU's own property defaults are ``iobase=0x501, iosize=2``; the defaults here are the ones
almost every project passes on the command line (``-device isa-debug-exit,iobase=0xf4,
iosize=0x04``) and the issue asks for. Note that a process exit status keeps only the low
8 bits; :class:`~pykvm.outcome.Outcome` keeps the whole value.
"""

from __future__ import annotations

from ..outcome import Outcome
from .base import Device

DEBUG_EXIT_IOBASE = 0xF4
DEBUG_EXIT_IOSIZE = 4


class DebugExit(Device):
    """``isa-debug-exit`` at ``iobase`` (``iosize`` ports)."""

    byte_registers = False  # the written value is the whole access (outb/outw/outl)

    def __init__(self, iobase: int = DEBUG_EXIT_IOBASE, iosize: int = DEBUG_EXIT_IOSIZE) -> None:
        super().__init__()
        if iosize < 1:
            raise ValueError(f"iosize must be at least 1, not {iosize}")
        self.ports = ((iobase, iosize),)

    def save(self) -> dict:
        return {}  # a write ends the run; nothing is kept

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"a saved state is a dict, not {type(state).__name__}")
        if state:
            raise ValueError(f"isa-debug-exit keeps no state: no field {next(iter(state))!r}")

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> Outcome:
        return Outcome(status=(value << 1) | 1, via="isa-debug-exit")
