"""What every device model shares: its port ranges, ``attach(bus)``, and register-level dispatch.

A device lists the ports it decodes in ``ports`` (``(first_port, count)`` pairs) and, where it
has any, its MMIO ranges in ``mmio_ranges`` (``(gpa, size)`` pairs, answered by its ``mmio``
method). :meth:`Device.attach` registers them all on a :class:`~pykvm.devices.bus.Bus`.

:meth:`Device.io` turns a port exit into register accesses: one :meth:`Device.read` or
:meth:`Device.write` per item of a string instruction (``rep insb`` / ``rep outsb`` arrive as one
exit with ``count`` items), and, for devices with 8-bit registers (``byte_registers``), one access
per byte at consecutive ports, as the ISA bus splits a 16- or 32-bit cycle to an 8-bit device
(QEMU does the same for regions whose ``impl.max_access_size`` is 1). A byte that falls outside
the device's own ports is dropped on write and reads as ``0xFF`` (nobody drives the bus).

Interrupts: a device that has any takes ``irq: Callable[[int], None] | None`` and calls it with
the new level of its interrupt line (1 raised, 0 lowered) only when the level changes; the
machine maps it to ``KVM_IRQ_LINE`` on a GSI.

Every access runs under the device's lock, so a device may be shared by several vCPU threads and
by a host thread (the UART's input feeder).
"""

from __future__ import annotations

import threading
from typing import BinaryIO, Callable

from .. import exits
from ..outcome import Outcome

Irq = Callable[[int], None]

DEFAULT_CAPTURE_LIMIT = 1 << 20  # bytes of guest output a console keeps in memory (the newest)


class Device:
    """A device model on the port / MMIO bus."""

    ports: tuple[tuple[int, int], ...] = ()
    mmio_ranges: tuple[tuple[int, int], ...] = ()
    byte_registers = True  # wider port accesses are split into byte accesses at consecutive ports

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # ---- wiring -------------------------------------------------------------------------------
    def attach(self, bus) -> None:
        """Register every port range (to :meth:`io`) and MMIO range (to :meth:`mmio`) on ``bus``."""
        for first, count in self.ports:
            bus.add_port(first, self.io, count)
        for gpa, size in self.mmio_ranges:
            bus.add_mmio(gpa, size, self.mmio)

    def owns_port(self, port: int) -> bool:
        return any(first <= port < first + count for first, count in self.ports)

    # ---- exits --------------------------------------------------------------------------------
    def io(self, exit, vcpu=None) -> Outcome | None:
        """Answer an :class:`~pykvm.exits.IoOut` / :class:`~pykvm.exits.IoIn` exit (a bus handler)."""
        size = exit.size
        with self._lock:
            if isinstance(exit, exits.IoOut):
                data = exit.data
                for i in range(0, size * exit.count, size):
                    value = int.from_bytes(data[i : i + size], "little")
                    result = self._write(exit.port, size, value)
                    if result is not None:
                        return result
                return None
            out = exit.data
            for i in range(0, size * exit.count, size):
                out[i : i + size] = self._read(exit.port, size).to_bytes(size, "little")
            return None

    def mmio(self, exit, vcpu=None) -> Outcome | None:
        """Answer an MMIO exit (devices with ``mmio_ranges`` override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no MMIO registers")

    def _write(self, port: int, size: int, value: int) -> Outcome | None:
        if size == 1 or not self.byte_registers:
            return self.write(port, size, value)
        for i in range(size):
            if self.owns_port(port + i):
                result = self.write(port + i, 1, (value >> (8 * i)) & 0xFF)
                if result is not None:
                    return result
        return None

    def _read(self, port: int, size: int) -> int:
        if size == 1 or not self.byte_registers:
            return self.read(port, size) & ((1 << (8 * size)) - 1)
        value = 0
        for i in range(size):
            byte = self.read(port + i, 1) & 0xFF if self.owns_port(port + i) else 0xFF
            value |= byte << (8 * i)
        return value

    # ---- state (snapshot, restore, migration) -------------------------------------------------
    def save(self) -> dict:
        """The device's state as plain data (what :func:`json.dumps` takes: ints, strings, bools,
        None, lists and dicts with string keys; bytes as hex strings), taken between exits. Not its
        configuration (ports, IRQ, the stream its output goes to): :meth:`restore` is called on a
        device built with the same arguments. Every device says what its state is; one that does
        not cannot be snapshotted, and the snapshot says so."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its state is (Device.save)")

    def restore(self, state: dict) -> None:
        """Put back a state :meth:`save` gave (on a device built with the same arguments); raises
        ValueError, naming the field, for a state this device cannot take."""
        raise NotImplementedError(f"{type(self).__name__} cannot take a saved state (Device.restore)")

    # ---- registers (subclasses) ---------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        """The value a read of ``size`` bytes at ``port`` returns (called with the lock held)."""
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> Outcome | None:
        """Take a write of ``value`` (``size`` bytes) at ``port``; an Outcome ends the run."""
        return None


def field(state: dict, name: str, kind=int, *, limit: int | None = None):
    """``state[name]`` for :meth:`Device.restore`, checked: a ``kind`` (an int is not a bool;
    a float may be an int, as JSON gives it) and, for an int with ``limit``, in ``range(limit)``.
    Raises ValueError naming the field."""
    if not isinstance(state, dict):
        raise ValueError(f"a saved state is a dict, not {type(state).__name__}")
    if name not in state:
        raise ValueError(f"saved state has no field {name!r}")
    value = state[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds += (int,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"saved field {name!r} is {type(value).__name__}, not {names}")
    if limit is not None and isinstance(value, int) and not 0 <= value < limit:
        raise ValueError(f"saved field {name!r} is {value}, not 0-{limit - 1}")
    return value


def hex_field(state: dict, name: str, length: int | None = None) -> bytes:
    """``state[name]``, bytes saved as a hex string (of ``length`` bytes if given)."""
    text = field(state, name, str)
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"saved field {name!r} is not a hex string") from None
    if length is not None and len(data) != length:
        raise ValueError(f"saved field {name!r} has {len(data)} bytes, not {length}")
    return data


def int_list(state: dict, name: str, length: int, limit: int | None = None) -> list[int]:
    """``state[name]``, a list of ``length`` ints (each in ``range(limit)`` if given)."""
    values = field(state, name, list)
    if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool)
                                        and (limit is None or 0 <= v < limit) for v in values):
        raise ValueError(f"saved field {name!r} is not {length} ints" + (f" in 0-{limit - 1}" if limit else ""))
    return list(values)


class IrqLine:
    """An interrupt output: remembers its level and calls ``irq(level)`` only on a change."""

    __slots__ = ("_irq", "level")

    def __init__(self, irq: Irq | None) -> None:
        self._irq = irq
        self.level = 0

    def set(self, level: int) -> None:
        level = 1 if level else 0
        if level != self.level:
            self.level = level
            if self._irq is not None:
                self._irq(level)


class BoundedCapture:
    """The newest ``limit`` bytes of an output stream; older bytes are dropped and counted.

    A guest that floods its console costs at most ``limit`` bytes of host memory here, however
    long it runs. ``total`` counts every byte ever appended, ``dropped`` those no longer kept.
    """

    def __init__(self, limit: int = DEFAULT_CAPTURE_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"capture limit must be >= 0, not {limit}")
        self.limit = limit
        self.total = 0
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.limit:
            self._buf[:] = data[len(data) - self.limit :]
            return
        self._buf += data
        excess = len(self._buf) - self.limit
        if excess > 0:
            del self._buf[:excess]  # cheap: CPython's bytearray drops a prefix by moving its start

    @property
    def dropped(self) -> int:
        return self.total - len(self._buf)

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def clear(self) -> None:
        self._buf.clear()

    def __len__(self) -> int:
        return len(self._buf)


class ConsoleOutput:
    """Where a console's bytes go: written through to ``stream`` (flushed at each newline) and
    kept in a :class:`BoundedCapture`."""

    def __init__(self, stream: BinaryIO | None, limit: int = DEFAULT_CAPTURE_LIMIT) -> None:
        self.stream = stream
        self.capture = BoundedCapture(limit)

    def emit(self, data: bytes) -> None:
        self.capture.append(data)
        if self.stream is not None:
            self.stream.write(data)
            if b"\n" in data:
                self.stream.flush()


class ConsoleDevice(Device):
    """A device whose guest output goes to a :class:`ConsoleOutput` in ``self.output``."""

    output: ConsoleOutput

    @property
    def captured(self) -> bytes:
        """The newest bytes the guest sent (at most the capture limit)."""
        return self.output.capture.getvalue()

    def save(self) -> dict:
        # Where the console is, not what it showed: the text went to the stream already.
        with self._lock:
            return {"written": self.output.capture.total}

    def restore(self, state: dict) -> None:
        with self._lock:
            self._restore_console(state)

    def _restore_console(self, state: dict) -> None:
        written = field(state, "written", int, limit=1 << 63)
        self.output.capture.clear()  # text from another history; the saved bytes count as dropped
        self.output.capture.total = written

    @property
    def dropped(self) -> int:
        """Bytes the guest sent that are no longer kept in :attr:`captured` (they did reach the stream)."""
        return self.output.capture.dropped
