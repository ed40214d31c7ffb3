"""Port 0x80, the PC's POST-code (and I/O-delay) port: writes are remembered, reads float high.

Firmware and kernels write progress codes here (a board shows them on two digits) and Linux uses
it for I/O delays; QEMU takes the writes and ignores them. This keeps the last code and a count,
so a test can see how far boot code got without each write being an "unexpected exit".
"""

from __future__ import annotations

from .base import Device, field

POST_PORT = 0x80


class PostCode(Device):
    """The last byte written to port 0x80, and how many writes there were."""

    def __init__(self, port: int = POST_PORT) -> None:
        super().__init__()
        self.ports = ((port, 1),)
        self.last: int | None = None
        self.writes = 0

    def save(self) -> dict:
        with self._lock:
            return {"last": self.last, "writes": self.writes}

    def restore(self, state: dict) -> None:
        last = field(state, "last", (int, type(None)), limit=0x100)
        writes = field(state, "writes", int, limit=1 << 63)
        with self._lock:
            self.last, self.writes = last, writes

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int):
        self.last = value & 0xFF
        self.writes += 1
        return None
