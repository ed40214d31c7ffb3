"""The port-I/O and MMIO bus: which handler answers an exit.

A handler is ``handler(exit, vcpu)``; it answers reads by filling ``exit.data`` and returns
``None`` to let the guest go on, or an :class:`~pykvm.outcome.Outcome` to end the run. Every
range has a name (the device's) under which the machine counts its exits.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, NamedTuple

Handler = Callable[..., object]
MMIO_HITS = 4096  # MMIO addresses the bus remembers the route of


class Route(NamedTuple):
    """Where an exit goes: the handler, and the range it was registered for (``label`` names it in
    statistics; made once here, not on every exit)."""

    handler: Handler
    start: int
    size: int
    name: str
    label: str

    @classmethod
    def make(cls, handler: Handler, start: int, size: int, name: str) -> Route:
        span = f"{start:#x}" if size == 1 else f"{start:#x}-{start + size - 1:#x}"
        return cls(handler, start, size, name, f"{name} {span}")


def _name(handler: Handler) -> str:
    owner = getattr(handler, "__self__", None)
    return type(owner).__name__ if owner is not None else getattr(handler, "__name__", "handler")


class Bus:
    """Port ranges and MMIO ranges mapped to handlers. Ranges may not overlap."""

    def __init__(self) -> None:
        self._ports: dict[int, Route] = {}
        self._mmio: list[Route] = []  # sorted by start
        self._mmio_starts: list[int] = []
        #: gpa -> Route of the MMIO addresses looked up so far (a run loop reads it first); emptied
        #: in place whenever an MMIO range is added or removed.
        self._mmio_hits: dict[int, Route] = {}

    def save_routes(self) -> tuple:
        """Every route as it is now (for :meth:`restore_routes`)."""
        return dict(self._ports), list(self._mmio)

    def restore_routes(self, saved: tuple) -> None:
        """Put back the routes :meth:`save_routes` gave, in place (a run loop holds the dictionaries)."""
        ports, mmio = saved
        self._ports.clear()
        self._ports.update(ports)
        self._mmio[:] = mmio
        self._mmio_starts[:] = [r.start for r in mmio]
        self._mmio_hits.clear()

    def add_port(self, port: int, handler: Handler, count: int = 1, name: str | None = None) -> None:
        """Route ports [port, port + count) to ``handler``."""
        if not (port >= 0 and count > 0 and port + count <= 0x10000):
            raise ValueError(f"port range {port:#x}+{count} is outside 0-0xffff")
        route = Route.make(handler, port, count, name or _name(handler))
        taken = [p for p in range(port, port + count) if p in self._ports]
        if taken:
            raise ValueError(f"{route.label}: port {taken[0]:#x} already belongs to {self._ports[taken[0]].label}")
        for p in range(port, port + count):
            self._ports[p] = route

    def add_mmio(self, gpa: int, size: int, handler: Handler, name: str | None = None) -> None:
        """Route guest-physical [gpa, gpa + size) to ``handler``."""
        if size <= 0 or gpa < 0:
            raise ValueError(f"MMIO range {gpa:#x}+{size:#x} is empty or negative")
        route = Route.make(handler, gpa, size, name or _name(handler))
        for other in self._mmio:
            if gpa < other.start + other.size and other.start < gpa + size:
                raise ValueError(f"{route.label} overlaps {other.label}")
        self._mmio.append(route)
        self._mmio.sort(key=lambda r: r.start)
        self._mmio_starts = [r.start for r in self._mmio]
        self._mmio_hits.clear()

    def remove_port(self, port: int, count: int = 1) -> None:
        """Drop the route registered for exactly ports [port, port + count) (a PCI I/O BAR moving)."""
        route = self._ports.get(port)
        if route is None or route.start != port or route.size != count:
            raise ValueError(f"no route is registered for ports {port:#x}+{count}")
        for p in range(port, port + count):
            del self._ports[p]

    def remove_mmio(self, gpa: int, size: int) -> None:
        """Drop the route registered for exactly guest-physical [gpa, gpa + size) (a PCI memory BAR moving)."""
        for i, route in enumerate(self._mmio):
            if route.start == gpa and route.size == size:
                del self._mmio[i]
                del self._mmio_starts[i]
                self._mmio_hits.clear()
                return
        raise ValueError(f"no MMIO route is registered for {gpa:#x}+{size:#x}")

    def port_route(self, port: int) -> Route | None:
        return self._ports.get(port)

    def mmio_route(self, gpa: int) -> Route | None:
        i = bisect_right(self._mmio_starts, gpa) - 1
        if i >= 0 and gpa < self._mmio[i].start + self._mmio[i].size:
            route = self._mmio[i]
            if len(self._mmio_hits) >= MMIO_HITS:
                self._mmio_hits.clear()  # a guest scanning a large window (PCI ECAM) cannot grow it
            self._mmio_hits[gpa] = route
            return route
        return None

    def port_handler(self, port: int) -> Handler | None:
        route = self._ports.get(port)
        return route.handler if route else None

    def mmio_handler(self, gpa: int) -> Handler | None:
        route = self.mmio_route(gpa)
        return route.handler if route else None
