"""Drive device models without KVM: port accesses become the exits a vCPU would produce.

``PortHarness(*devices)`` attaches the devices to a fresh :class:`~pykvm.devices.bus.Bus` and
offers ``out`` / ``inp`` (one ``out``/``in`` instruction) and ``outs`` / ``ins`` (``rep outs`` /
``rep ins``: one exit with ``count`` items), each built as the :mod:`pykvm.exits` value KVM's
exit would decode to (an ``IoIn`` answers into a bytearray, as it would into the ``kvm_run``
page) and dispatched through the bus, as the machine's run loop does.
"""

from __future__ import annotations

from .. import exits
from .bus import Bus


class PortHarness:
    """A bus with devices on it, and port accesses made as a guest makes them."""

    def __init__(self, *devices, vcpu=None) -> None:
        self.bus = Bus()
        self.vcpu = vcpu
        for device in devices:
            device.attach(self.bus)

    def _handler(self, port: int):
        handler = self.bus.port_handler(port)
        if handler is None:
            raise LookupError(f"no device answers port {port:#x}")
        return handler

    def outs(self, port: int, data: bytes, size: int = 1):
        """``rep outs``: ``len(data) // size`` items in one exit; returns the handler's result."""
        if not data or len(data) % size:
            raise ValueError(f"{len(data)} bytes are not a whole number of {size}-byte items")
        return self._handler(port)(exits.IoOut(port, size, len(data) // size, bytes(data)), self.vcpu)

    def out(self, port: int, value: int, size: int = 1):
        """``out``: write ``value`` (``size`` bytes); returns the handler's result (an Outcome or None)."""
        return self.outs(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), size)

    def ins(self, port: int, count: int, size: int = 1) -> bytes:
        """``rep ins``: ``count`` items read in one exit, as the bytes the guest receives."""
        buf = bytearray(count * size)
        self._handler(port)(exits.IoIn(port, size, count, memoryview(buf)), self.vcpu)
        return bytes(buf)

    def inp(self, port: int, size: int = 1) -> int:
        """``in``: the value a ``size``-byte read of ``port`` returns."""
        return int.from_bytes(self.ins(port, 1, size), "little")
