"""The Bochs / QEMU debug console on port 0xE9 (QEMU ``isa-debugcon``).

Behaviour as QEMU's ``hw/char/debugcon.c``: every byte written to the port goes to the console
(QEMU's ``valid.max_access_size`` is 1; a wider ``out`` here gives its low byte per item), and a
read returns the ``readback`` property, 0xE9 by default, which is how a guest detects the port
(``inb $0xe9`` == 0xE9). There are no other registers and no interrupts.

The bytes are written through to ``stream`` (flushed at each newline) and the newest ``limit``
bytes are kept in :attr:`captured` (older ones are counted in :attr:`dropped`), so a guest that
floods the console cannot grow host memory without bound.
"""

from __future__ import annotations

from typing import BinaryIO

from .. import exits
from .base import DEFAULT_CAPTURE_LIMIT, ConsoleDevice, ConsoleOutput

DEBUGCON_PORT = 0xE9
DEBUGCON_READBACK = 0xE9


class DebugConsole(ConsoleDevice):
    """Port 0xE9: bytes out to the console, ``readback`` (0xE9) in."""

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        port: int = DEBUGCON_PORT,
        limit: int = DEFAULT_CAPTURE_LIMIT,
        readback: int = DEBUGCON_READBACK,
    ) -> None:
        super().__init__()
        self.ports = ((port, 1),)
        self.readback = readback & 0xFF
        self.output = ConsoleOutput(stream, limit)



    def emit(self, data: bytes) -> None:
        """Put ``data`` on the console as if the guest had written it (the call port's PRINT)."""
        with self._lock:
            self.output.emit(data)

    def io(self, exit, vcpu=None):
        # The hot path of every console: one exit per byte, or one per `rep outsb`.
        if isinstance(exit, exits.IoOut):
            data = exit.data if exit.size == 1 else bytes(exit.data[:: exit.size])
            with self._lock:
                self.output.emit(data)
            return
        exit.reply(self.readback)

    def read(self, port: int, size: int) -> int:
        return self.readback

    def write(self, port: int, size: int, value: int):
        self.output.emit(bytes((value & 0xFF,)))
