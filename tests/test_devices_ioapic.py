"""The 82093AA I/O APIC model: registers through IOREGSEL/IOWIN as MMIO exits, the MSI it sends,
edge and level pins, remote IRR and EOI, masking; no KVM (``signal_msi`` is a fake)."""

from __future__ import annotations

import threading

import pytest

from pykvm import exits
from pykvm.devices.bus import Bus
from pykvm.devices.ioapic import IOAPIC_GPA, Ioapic, msi_message

BASE = IOAPIC_GPA
LEVEL, MASKED, LOGICAL = 1 << 15, 1 << 16, 1 << 11


class Guest:
    """An IOAPIC on a bus and the MMIO accesses a guest makes; the MSIs it sends in ``sent``."""

    def __init__(self, **kwargs) -> None:
        self.sent: list[tuple[int, int]] = []
        self.routes: list[list[tuple[int, int, int]]] = []
        kwargs.setdefault("set_routes", self.routes.append)
        self.ioapic = Ioapic(lambda address, data: self.sent.append((address, data)), **kwargs)
        self.bus = Bus()
        self.ioapic.attach(self.bus)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        gpa = BASE + offset
        self.bus.mmio_handler(gpa)(exits.MmioWrite(gpa, value.to_bytes(size, "little")), None)

    def read(self, offset: int, size: int = 4) -> int:
        gpa = BASE + offset
        buf = bytearray(size)
        self.bus.mmio_handler(gpa)(exits.MmioRead(gpa, memoryview(buf)), None)
        return int.from_bytes(buf, "little")

    def reg(self, index: int) -> int:
        self.write(0x00, index)
        return self.read(0x10)

    def set_reg(self, index: int, value: int) -> None:
        self.write(0x00, index)
        self.write(0x10, value)

    def route(self, pin: int, low: int, dest: int = 0) -> None:
        """As Linux's ioapic_write_entry: the high dword (destination) first, then the low one."""
        self.set_reg(0x11 + 2 * pin, dest << 24)
        self.set_reg(0x10 + 2 * pin, low)


@pytest.fixture
def guest():
    return Guest()


# ---- registers ---------------------------------------------------------------------------------
def test_id_version_and_arbitration_registers(guest):
    assert guest.reg(0x01) == 0x00170011  # version 0x11, max redirection entry 23
    assert guest.reg(0x00) == 0 and guest.reg(0x02) == 0
    guest.set_reg(0x00, 0x0F00_0000 | 0xFFFFFF)  # only bits 24-27 are the ID
    assert guest.reg(0x00) == 0x0F00_0000 and guest.reg(0x02) == 0x0F00_0000
    guest.set_reg(0x01, 0xFFFFFFFF)  # VER is read-only
    assert guest.reg(0x01) == 0x00170011
    assert Guest(version=0x20, id=3).reg(0x01) == 0x00170020 and Guest(id=3).reg(0x00) == 3 << 24


def test_ioregsel_reads_back_and_unknown_registers_read_zero(guest):
    guest.write(0x00, 0x12345678)
    assert guest.read(0x00) == 0x78  # IOREGSEL keeps bits 0-7
    guest.write(0x00, 0x11, size=1)  # a byte write selects too
    assert guest.read(0x00, size=1) == 0x11
    for index in (0x03, 0x0F, 0x40, 0xFF):
        guest.set_reg(index, 0xFFFFFFFF)
        assert guest.reg(index) == 0
    assert guest.read(0x20) == 0 and guest.read(0xFFC) == 0  # nothing else in the 4 KiB page
    guest.write(0x20, 0xFFFFFFFF)
    assert guest.read(0x00) == 0xFF


def test_redirection_entries_reset_masked_and_read_back(guest):
    for pin in range(24):
        assert guest.reg(0x10 + 2 * pin) == MASKED and guest.reg(0x11 + 2 * pin) == 0
    guest.route(7, LEVEL | 1 << 13 | LOGICAL | 1 << 8 | 0x41, dest=0xA5)
    assert guest.reg(0x1E) == LEVEL | 1 << 13 | LOGICAL | 1 << 8 | 0x41
    assert guest.reg(0x1F) == 0xA5 << 24
    assert guest.ioapic.redirection[7] == 0xA5 << 56 | LEVEL | 1 << 13 | LOGICAL | 1 << 8 | 0x41
    guest.set_reg(0x10, 1 << 12 | 1 << 14 | 0xFFFE0000 | 0x30)  # delivery status, remote IRR, reserved
    assert guest.reg(0x10) == 0x30  # are read-only
    guest.set_reg(0x11, 0x00FFFFFF)  # only bits 56-63 hold the destination
    assert guest.reg(0x11) == 0


def test_narrow_accesses_touch_the_addressed_bytes(guest):
    guest.write(0x00, 0x10)
    guest.write(0x11, 0x01, size=1)  # byte 1 of IOWIN: delivery mode bits of entry 0
    guest.write(0x10, 0x33, size=1)
    assert guest.read(0x10) == MASKED | 0x0100 | 0x33
    assert guest.read(0x12, size=1) == 0x01 and guest.read(0x10, size=2) == 0x0133
    guest.write(0x12, 0x0000, size=2)  # unmask with a 16-bit write to bytes 2-3
    assert guest.read(0x10) == 0x0133


def test_bad_arguments():
    with pytest.raises(ValueError, match="version must be 0x11 or 0x20"):
        Ioapic(print, version=0x21)
    with pytest.raises(ValueError, match="ID must be 0-15"):
        Ioapic(print, id=16)
    with pytest.raises(ValueError, match="pin must be 0-23, not 24"):
        Ioapic(print).set_irq(24, 1)


# ---- the MSI -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry, address, data",
    [
        (0x35, 0xFEE00000, 0x4035),  # fixed, physical APIC 0, edge
        (3 << 56 | LEVEL | 0x41, 0xFEE03000, 0xC041),  # level: trigger bit 15
        (0xFF << 56 | LOGICAL | 1 << 8 | 0x50, 0xFEEFF004, 0x4150),  # lowest priority, logical, broadcast
        (1 << 56 | 4 << 8 | 1 << 13, 0xFEE01000, 0x4400),  # NMI; polarity is not part of the message
        (7 << 8 | 0x20, 0xFEE00000, 0x4720),  # ExtINT
    ],
)
def test_msi_address_and_data(entry, address, data):
    assert msi_message(entry) == (address, data)


def test_a_pin_sends_its_entrys_message(guest):
    guest.route(5, 0x35, dest=2)
    guest.ioapic.set_irq(5, 1)
    assert guest.sent == [(0xFEE02000, 0x4035)]


# ---- edge --------------------------------------------------------------------------------------
def test_edge_pins_interrupt_on_rising_edges_only(guest):
    guest.route(5, 0x35)
    io = guest.ioapic
    io.set_irq(5, 1)
    io.set_irq(5, 1)  # still high: no new edge
    assert len(guest.sent) == 1
    io.set_irq(5, 0)
    assert len(guest.sent) == 1
    io.set_irq(5, 1)
    assert guest.sent == [(0xFEE00000, 0x4035)] * 2
    assert guest.reg(0x1A) & (1 << 14) == 0  # no remote IRR for edge
    io.eoi(0x35)  # an EOI changes nothing
    assert len(guest.sent) == 2


def test_an_edge_on_a_masked_pin_is_lost(guest):
    guest.route(5, MASKED | 0x35)
    guest.ioapic.set_irq(5, 1)
    guest.route(5, 0x35)  # unmasked while the line is still high: no edge was latched
    assert guest.sent == []
    guest.ioapic.set_irq(5, 0)
    guest.ioapic.set_irq(5, 1)
    assert guest.sent == [(0xFEE00000, 0x4035)]


# ---- level, remote IRR and EOI -----------------------------------------------------------------
def test_level_pin_sets_remote_irr_until_eoi(guest):
    guest.route(9, LEVEL | 0x49)
    io = guest.ioapic
    io.set_irq(9, 1)
    assert guest.sent == [(0xFEE00000, 0xC049)]
    assert guest.reg(0x22) & (1 << 14)  # remote IRR
    io.set_irq(9, 0)
    io.set_irq(9, 1)  # a new assertion while remote IRR is set: held back
    assert len(guest.sent) == 1
    io.eoi(0x48)  # another vector's EOI
    assert len(guest.sent) == 1 and guest.reg(0x22) & (1 << 14)
    io.eoi(0x49)  # still asserted: delivered again, remote IRR set again
    assert len(guest.sent) == 2 and guest.reg(0x22) & (1 << 14)
    io.set_irq(9, 0)
    io.eoi(0x49)  # deasserted: remote IRR clears, nothing sent
    assert len(guest.sent) == 2 and guest.reg(0x22) & (1 << 14) == 0


def test_eoi_from_the_kvm_exit_and_from_the_eoi_register():
    guest = Guest(version=0x20)
    guest.route(9, LEVEL | 0x49)
    guest.ioapic.set_irq(9, 1)
    guest.ioapic.eoi_exit(exits.IoapicEoi(0x49))
    guest.write(0x40, 0x49)  # version 0x20's EOI register
    assert len(guest.sent) == 3
    old = Guest()  # version 0x11 has no EOI register: the write is dropped
    old.route(9, LEVEL | 0x49)
    old.ioapic.set_irq(9, 1)
    old.write(0x40, 0x49)
    assert len(old.sent) == 1


def test_one_eoi_serves_every_level_entry_with_its_vector(guest):
    guest.route(10, LEVEL | 0x50)
    guest.route(11, LEVEL | 0x50)  # a shared vector
    guest.ioapic.set_irq(10, 1)
    guest.ioapic.set_irq(11, 1)
    assert len(guest.sent) == 2
    guest.ioapic.set_irq(10, 0)
    guest.ioapic.eoi(0x50)
    assert len(guest.sent) == 3  # only pin 11 is still asserted
    assert guest.reg(0x24) & (1 << 14) == 0 and guest.reg(0x26) & (1 << 14)


def test_switching_an_entry_to_edge_clears_remote_irr(guest):
    guest.route(9, LEVEL | 0x49)
    guest.ioapic.set_irq(9, 1)
    guest.route(9, 0x49)
    assert guest.reg(0x22) & (1 << 14) == 0 and len(guest.sent) == 1


# ---- masking -----------------------------------------------------------------------------------
def test_a_masked_level_pin_remembers_its_level(guest):
    guest.route(9, MASKED | LEVEL | 0x49)
    io = guest.ioapic
    io.set_irq(9, 1)
    assert guest.sent == [] and guest.reg(0x22) & (1 << 14) == 0
    guest.route(9, LEVEL | 0x49)  # unmasked while asserted: delivered now
    assert guest.sent == [(0xFEE00000, 0xC049)]


def test_a_level_pin_deasserted_while_masked_sends_nothing(guest):
    guest.route(9, MASKED | LEVEL | 0x49)
    guest.ioapic.set_irq(9, 1)
    guest.ioapic.set_irq(9, 0)
    guest.route(9, LEVEL | 0x49)
    assert guest.sent == []


def test_masking_in_the_handler_then_eoi_holds_the_interrupt(guest):
    """Linux's mask-ack-unmask for level pins: the line stays high throughout."""
    guest.route(9, LEVEL | 0x49)
    guest.ioapic.set_irq(9, 1)
    guest.route(9, MASKED | LEVEL | 0x49)
    guest.ioapic.eoi(0x49)
    assert len(guest.sent) == 1  # masked: pending, not sent
    guest.route(9, LEVEL | 0x49)
    assert len(guest.sent) == 2


# ---- routes for KVM's EOI exits ----------------------------------------------------------------
def test_routes_follow_the_unmasked_and_level_entries(guest):
    assert guest.routes == []  # nothing published until an entry changes
    guest.route(5, 0x35, dest=1)
    guest.route(9, MASKED | LEVEL | 0x49)
    assert guest.routes[-1] == [(5, 0xFEE01000, 0x4035), (9, 0xFEE00000, 0xC049)]
    count = len(guest.routes)
    guest.route(9, MASKED | LEVEL | 0x49)  # no change: no new routing table
    assert len(guest.routes) == count
    guest.route(5, MASKED | 0x35, dest=1)
    assert guest.routes[-1] == [(9, 0xFEE00000, 0xC049)]


# ---- threads -----------------------------------------------------------------------------------
def test_lines_driven_from_host_threads(guest):
    for pin in range(24):
        guest.route(pin, 0x30 + pin)

    def toggle(pin):
        for _ in range(200):
            guest.ioapic.set_irq(pin, 1)
            guest.ioapic.set_irq(pin, 0)

    threads = [threading.Thread(target=toggle, args=(pin,)) for pin in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(guest.sent) == 24 * 200 and guest.ioapic.lines == 0
    assert sorted({data & 0xFF for _, data in guest.sent}) == list(range(0x30, 0x48))
