"""The port/MMIO bus: route lookups (no KVM)."""

from __future__ import annotations

from pykvm.devices.bus import Bus


def test_mmio_routes_looked_up_are_remembered_until_the_ranges_change():
    """The run loop reads Bus._mmio_hits first: it must never hand out a route that was removed."""
    bus = Bus()
    first, second = (lambda exit, vcpu: None), (lambda exit, vcpu: None)
    bus.add_mmio(0x1000, 0x100, first, name="a")
    assert bus.mmio_route(0x1010).handler is first and bus._mmio_hits[0x1010].handler is first
    bus.remove_mmio(0x1000, 0x100)  # a BAR moving
    assert 0x1010 not in bus._mmio_hits and bus.mmio_route(0x1010) is None
    bus.add_mmio(0x1000, 0x10, second, name="b")
    assert bus.mmio_route(0x1010) is None and bus.mmio_route(0x1008).handler is second
    assert 0x1010 not in bus._mmio_hits
