"""The port-I/O and MMIO bus: which handler answers an exit.

A handler is ``handler(exit, vcpu)``; it answers reads by filling ``exit.data`` and returns
``None`` to let the guest go on, or a value (an :class:`~pykvm.machine.Outcome`) to end the run.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable

Handler = Callable[..., object]


class Bus:
    """Port ranges and MMIO ranges mapped to handlers. Ranges may not overlap."""

    def __init__(self) -> None:
        self._ports: dict[int, Handler] = {}
        self._mmio: list[tuple[int, int, Handler]] = []  # (start, end, handler), sorted

    def add_port(self, port: int, handler: Handler, count: int = 1) -> None:
        """Route ports [port, port + count) to ``handler``."""
        if not (0 <= port and count > 0 and port + count <= 0x10000):
            raise ValueError(f"port range {port:#x}+{count} is outside 0-0xffff")
        taken = [p for p in range(port, port + count) if p in self._ports]
        if taken:
            raise ValueError(f"port {taken[0]:#x} already has a handler")
        for p in range(port, port + count):
            self._ports[p] = handler

    def add_mmio(self, gpa: int, size: int, handler: Handler) -> None:
        """Route guest-physical [gpa, gpa + size) to ``handler``."""
        if size <= 0 or gpa < 0:
            raise ValueError(f"MMIO range {gpa:#x}+{size:#x} is empty or negative")
        for start, end, _ in self._mmio:
            if gpa < end and start < gpa + size:
                raise ValueError(f"MMIO range {gpa:#x}-{gpa + size:#x} overlaps {start:#x}-{end:#x}")
        self._mmio.append((gpa, gpa + size, handler))
        self._mmio.sort(key=lambda r: r[0])

    def port_handler(self, port: int) -> Handler | None:
        return self._ports.get(port)

    def mmio_handler(self, gpa: int) -> Handler | None:
        i = bisect_right([r[0] for r in self._mmio], gpa) - 1
        if i >= 0 and gpa < self._mmio[i][1]:
            return self._mmio[i][2]
        return None
