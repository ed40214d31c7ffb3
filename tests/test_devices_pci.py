"""PCI: mechanism #1 and ECAM, bus 0 as QEMU pc, BARs and their routes, firmware assignment,
INTx through PIIX3, MSI and MSI-X, and QEMU's pci-testdev driven as kvm-unit-tests drives it."""

from __future__ import annotations

import pytest

from pykvm import exits
from pykvm.devices.bus import Bus
from pykvm.devices.harness import PortHarness
from pykvm.devices.pci import (
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    ECAM_BASE,
    I440fxHostBridge,
    PciFunction,
    PciHost,
    Piix3IsaBridge,
    qemu_device_help,
)
from pykvm.devices.pci_testdev import IoEventFd, PciTestDev

ALL = 0xFFFFFFFF


class Dev(PciFunction):
    """A test endpoint: BARs and pin as asked; BAR reads return offset-derived bytes, writes are kept."""

    qemu_name = "test-dev"
    description = "Test device"
    vendor_id = 0x1234
    device_id = 0x5678
    class_code = 0x058000

    def __init__(self, bars=(), pin=0):
        super().__init__()
        self.config[0x3D] = pin
        for index, size, kind, *pf in bars:
            self.declare_bar(index, size, kind, bool(pf and pf[0]))
        self.writes = []

    def bar_read(self, index, offset, size):
        return int.from_bytes(bytes((index * 0x40 + offset + i) & 0xFF for i in range(size)), "little")

    def bar_write(self, index, offset, size, value):
        self.writes.append((index, offset, size, value))


class Guest:
    """Port and MMIO accesses on one bus, as a vCPU makes them; config accessors as kvm-unit-tests'
    lib/x86/asm/pci.h (CF8 gets the unaligned register number)."""

    def __init__(self, host: PciHost):
        self.host = host
        self.ports = PortHarness(host)
        self.bus = self.ports.bus

    # port / MMIO
    def out(self, port, value, size=1):
        return self.ports.out(port, value, size)

    def inp(self, port, size=1):
        return self.ports.inp(port, size)

    def mmio_read(self, gpa, size=4):
        handler = self.bus.mmio_handler(gpa)
        if handler is None:
            raise LookupError(f"no route at {gpa:#x}")
        buf = bytearray(size)
        handler(exits.MmioRead(gpa, memoryview(buf)), None)
        return int.from_bytes(buf, "little")

    def mmio_write(self, gpa, value, size=4):
        handler = self.bus.mmio_handler(gpa)
        if handler is None:
            raise LookupError(f"no route at {gpa:#x}")
        return handler(exits.MmioWrite(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")), None)

    # configuration, mechanism #1 (dev = devfn on bus 0, as pcidevaddr_t)
    def cfg_read(self, dev, reg, size=4):
        self.out(0xCF8, 0x80000000 | dev << 8 | reg, 4)
        return self.inp(0xCFC, size)

    def cfg_write(self, dev, reg, value, size=4):
        self.out(0xCF8, 0x80000000 | dev << 8 | reg, 4)
        self.out(0xCFC, value, size)

    # ECAM
    def ecam_read(self, bus, dev, reg, size=4):
        return self.mmio_read(ECAM_BASE + (bus << 20 | dev << 12 | reg), size)

    def ecam_write(self, bus, dev, reg, value, size=4):
        self.mmio_write(ECAM_BASE + (bus << 20 | dev << 12 | reg), value, size)

    # kvm-unit-tests lib/pci.c
    def find_dev(self, vendor, device):
        for dev in range(256):
            if self.cfg_read(dev, 0, 2) == vendor and self.cfg_read(dev, 2, 2) == device:
                return dev
        return None

    def bar_size(self, dev, bar):
        """pci_bar_size(): save, write ~0, read back, restore; 64-bit BARs size both halves."""
        def helper(n):
            off = 0x10 + 4 * n
            old = self.cfg_read(dev, off)
            self.cfg_write(dev, off, ALL)
            val = self.cfg_read(dev, off)
            self.cfg_write(dev, off, old)
            return val

        size = helper(bar)
        if not size:
            return 0
        raw = self.cfg_read(dev, 0x10 + 4 * bar)
        size &= ~0x3 if raw & 1 else ~0xF
        if not raw & 1 and raw & 0x6 == 0x4:
            return (~(helper(bar + 1) << 32 | size) + 1) & ((1 << 64) - 1)
        return (~size + 1) & ALL

    def bar_addr(self, dev, bar):
        raw = self.cfg_read(dev, 0x10 + 4 * bar)
        addr = raw & (~0x3 if raw & 1 else ~0xF) & ALL
        if not raw & 1 and raw & 0x6 == 0x4:
            addr |= self.cfg_read(dev, 0x10 + 4 * bar + 4) << 32
        return addr

    def cap_walk(self, dev):
        """pci_cap_walk(): (offset, id) of every capability."""
        caps, off = [], self.cfg_read(dev, 0x34, 1)
        while off:
            caps.append((off, self.cfg_read(dev, off, 1)))
            off = self.cfg_read(dev, off + 1, 1)
            assert len(caps) <= 255
        return caps


class Irqs:
    """irq(gsi) -> level callable; records (gsi, level) calls."""

    def __init__(self):
        self.calls = []
        self.level = {}

    def __call__(self, gsi):
        def set_level(level, gsi=gsi):
            self.calls.append((gsi, level))
            self.level[gsi] = level
        return set_level


def make(*devices, irq=None, msi=None, **kw):
    host = PciHost(irq=irq, signal_msi=msi, **kw)
    for d in devices:
        host.add(d)
    return host, Guest(host)


# ---- bus 0 and the two mechanisms ----------------------------------------------------------------

def test_bus0_enumerates_through_cf8_as_qemu_pc():
    host, g = make()
    assert g.cfg_read(0x00, 0x00) == 0x1237_8086
    assert g.cfg_read(0x00, 0x08) == 0x0600_0002  # class 06/00/00, revision 2
    assert g.cfg_read(0x00, 0x0E, 1) == 0x00
    assert g.cfg_read(0x08, 0x00) == 0x7000_8086
    assert g.cfg_read(0x08, 0x08) >> 8 == 0x060100
    assert g.cfg_read(0x08, 0x0E, 1) == 0x80  # multi-function, as QEMU creates PIIX3
    assert g.cfg_read(0x08, 0x2C) == 0x1100_1AF4
    present = [dev for dev in range(256) if g.cfg_read(dev, 0, 2) != 0xFFFF]
    assert present == [0x00, 0x08]
    assert all(g.cfg_read(dev, 0) == ALL for dev in range(0x09, 0x10))  # PIIX3's other functions
    assert isinstance(host.function_at(0), I440fxHostBridge) and isinstance(host.function_at(1), Piix3IsaBridge)


def test_ecam_gives_the_same_answers_as_cf8():
    d = Dev(bars=[(0, 0x1000, "mem32"), (1, 0x40, "io")], pin=1)
    host, g = make(d)
    d.add_msi(vectors=4)
    host.assign_resources()
    for dev in list(range(0x00, 0x20)) + [0xF8]:
        for reg in range(0, 0x100, 4):
            assert g.cfg_read(dev, reg) == g.ecam_read(0, dev, reg), (dev, reg)
    assert g.ecam_read(1, 0, 0) == ALL  # bus 1 has nothing
    assert g.ecam_read(0, 0x10, 0x00) == 0x5678_1234
    g.ecam_write(0, 0x10, 0x3C, 0x5A, 1)
    assert g.cfg_read(0x10, 0x3C, 1) == 0x5A


def test_ecam_fields_for_mcfg():
    host = PciHost()
    assert (host.ecam_base, host.ecam_size, host.ecam_bus_start, host.ecam_bus_end) == (0xE0000000, 256 << 20, 0, 255)
    assert host.mmio_ranges == ((0xE0000000, 256 << 20),)
    small = PciHost(ecam_base=0xB0000000, ecam_buses=16)
    assert (small.ecam_size, small.ecam_bus_end) == (16 << 20, 15)
    assert PciHost(ecam_base=None).mmio_ranges == ()
    with pytest.raises(ValueError):
        PciHost(ecam_base=0xE0100000)


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_data_port_every_width_and_offset(size, offset):
    host, g = make()
    dword = 0x1237_8086
    expect = (dword >> (8 * offset)) & ((1 << (8 * size)) - 1)
    if offset + size > 4:  # runs into the next register (class/revision at 0x08 is not reached: 0x04)
        nxt = host.host_bridge.config_read(4, 4)
        expect = ((dword | nxt << 32) >> (8 * offset)) & ((1 << (8 * size)) - 1)
    g.out(0xCF8, 0x80000000, 4)
    assert g.inp(0xCFC + offset, size) == expect
    assert g.ecam_read(0, 0, offset, size) == expect
    # the CF8 register's low bits are ORed with the port offset, as QEMU (kvm-unit-tests relies on it)
    g.out(0xCF8, 0x80000000 | offset, 4)
    assert g.inp(0xCFC, size) == expect


def test_unaligned_register_in_cf8_as_kvm_unit_tests_uses_it():
    host, g = make()
    assert g.cfg_read(0x08, 0x0E, 1) == 0x80  # PCI_CONF1_ADDRESS(dev, PCI_HEADER_TYPE) then inb 0xCFC
    assert g.cfg_read(0x00, 0x02, 2) == 0x1237
    assert g.cfg_read(0x08, 0x0A, 2) == 0x0601


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_data_port_writes_every_width_and_offset(size, offset):
    d = Dev()
    host, g = make(d)
    reg = 0x40  # device-specific, fully writable
    g.cfg_write(0x10, reg, 0, 4)
    g.out(0xCF8, 0x80000000 | 0x10 << 8 | reg, 4)
    g.out(0xCFC + offset, 0xA1B2C3D4, size)
    value = (0xA1B2C3D4 & ((1 << (8 * size)) - 1)) << (8 * offset)
    assert g.cfg_read(0x10, reg, 4) | g.cfg_read(0x10, reg + 4, 4) << 32 == value
    g.ecam_write(0, 0x10, 0x48 + offset, 0x11223344, size)
    assert g.ecam_read(0, 0x10, 0x48, 4) | g.ecam_read(0, 0x10, 0x4C, 4) << 32 == (
        (0x11223344 & ((1 << (8 * size)) - 1)) << (8 * offset))


def test_disabled_or_absent_reads_all_ones_and_writes_are_dropped():
    d = Dev()
    host, g = make(d)
    g.out(0xCF8, 0x00001040, 4)  # enable bit clear
    for size in (1, 2, 4):
        assert g.inp(0xCFC, size) == (1 << (8 * size)) - 1
    g.out(0xCFC, 0x55, 1)
    assert d.config[0x40] == 0
    for addr in (0x80002000, 0x80010000, 0x80FF0800):  # absent slot, bus 1, bus 255
        g.out(0xCF8, addr, 4)
        assert g.inp(0xCFC, 4) == ALL and g.inp(0xCFE, 2) == 0xFFFF and g.inp(0xCFD, 1) == 0xFF
        g.out(0xCFC, 0, 4)
    assert g.cfg_read(0x10, 0) == 0x5678_1234


def test_cf8_reads_back_what_was_written():
    host, g = make()
    g.out(0xCF8, 0x80123456, 4)
    assert g.inp(0xCF8, 4) == 0x80123456
    assert g.inp(0xCFA, 1) == 0x12 and g.inp(0xCF8, 2) == 0x3456
    g.out(0xCF8, 0xFFFF, 2)  # only 32-bit writes set it (QEMU)
    g.out(0xCFB, 0, 1)
    assert g.inp(0xCF8, 4) == 0x80123456
    g.out(0xCF8, 0, 4)
    assert g.inp(0xCF8, 4) == 0


def test_reset_control_register():
    calls = []
    host = PciHost(reset=lambda: calls.append("reset") or "outcome")
    g = Guest(host)
    g.out(0xCF9, 0x02)
    assert g.inp(0xCF9) == 0x02 and calls == []
    assert g.out(0xCF9, 0x06) == "outcome" and calls == ["reset"]


def test_read_only_writable_and_w1c_masks():
    d = Dev(pin=2)
    host, g = make(d)
    dev = 0x10
    before = [g.cfg_read(dev, r) for r in (0x00, 0x08, 0x2C)]
    g.cfg_write(dev, 0x00, ALL)
    g.cfg_write(dev, 0x08, ALL)
    g.cfg_write(dev, 0x2C, ALL)
    assert [g.cfg_read(dev, r) for r in (0x00, 0x08, 0x2C)] == before
    g.cfg_write(dev, 0x0C, ALL)  # cache line, latency, header type (RO), BIST (RO)
    assert g.cfg_read(dev, 0x0C) == 0x0000FFFF
    g.cfg_write(dev, 0x04, 0xFFFF, 2)
    assert g.cfg_read(dev, 0x04, 2) == COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | 1 << 8 | COMMAND_INTX_DISABLE
    g.cfg_write(dev, 0x3C, 0xFFFF, 2)
    assert g.cfg_read(dev, 0x3C, 1) == 0xFF and g.cfg_read(dev, 0x3D, 1) == 2  # line RW, pin RO
    d.config[0x06:0x08] = (0xF900 | 0x10).to_bytes(2, "little")  # error bits set, cap list
    g.cfg_write(dev, 0x06, 0x0900, 2)  # clear parity (8) and signalled target abort (11)
    assert g.cfg_read(dev, 0x06, 2) == 0xF010
    g.cfg_write(dev, 0x06, 0x0010, 2)  # cap-list bit is not W1C
    assert g.cfg_read(dev, 0x06, 2) == 0xF010
    assert g.cfg_read(dev, 0x34, 1) == 0
    g.cfg_write(dev, 0x34, 0x40, 1)
    assert g.cfg_read(dev, 0x34, 1) == 0


def test_extended_config_space_through_ecam_only():
    d = Dev()
    host, g = make(d)
    assert g.ecam_read(0, 0x10, 0x100) == 0  # empty extended capability list
    g.ecam_write(0, 0x10, 0x100, ALL)
    assert g.ecam_read(0, 0x10, 0x100) == 0
    d.config[0xFFC:0x1000] = b"\x01\x02\x03\x04"  # a device may define bytes there
    assert g.ecam_read(0, 0x10, 0xFFC) == 0x04030201
    assert g.ecam_read(0, 0x10, 0xFFE, 4) == 0x0403  # cut at the end of the space
    assert g.mmio_read(ECAM_BASE + (0x10 << 12) + 0xFF8, 8) == 0x04030201 << 32


# ---- BARs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, size, flags", [
    ("mem32", 0x1000, 0x0), ("mem32", 0x100000, 0x0), ("mem64", 0x4000, 0x4), ("mem64", 1 << 33, 0x4),
    ("io", 0x100, 0x1), ("io", 0x4, 0x1),
])
def test_bar_sizing(kind, size, flags):
    d = Dev(bars=[(0, size, kind)])
    host, g = make(d)
    g.cfg_write(0x10, 0x10, ALL)
    low = g.cfg_read(0x10, 0x10)
    assert low == ((~(size - 1)) & ALL) | flags
    if kind == "mem64":
        g.cfg_write(0x10, 0x14, ALL)
        assert g.cfg_read(0x10, 0x14) == (~(size - 1) >> 32) & ALL
        g.cfg_write(0x10, 0x14, 0)
    g.cfg_write(0x10, 0x10, 0)
    assert g.bar_size(0x10, 0) == size
    assert g.cfg_read(0x10, 0x10) == flags  # the type bits stay


def test_prefetchable_flag_and_unused_bars_read_zero():
    d = Dev(bars=[(0, 0x1000, "mem32", True), (2, 0x2000, "mem64", True)])
    host, g = make(d)
    assert g.cfg_read(0x10, 0x10) == 0x8 and g.cfg_read(0x10, 0x18) == 0xC
    for bar in (1, 4, 5):
        assert g.bar_size(0x10, bar) == 0
    with pytest.raises(ValueError):
        d.declare_bar(3, 0x1000)  # upper half of BAR 2
    with pytest.raises(ValueError):
        Dev(bars=[(0, 0x1800, "mem32")])


def placed_devices():
    devs = [Dev(bars=[(0, 0x1000, "mem32"), (1, 0x20, "io")], pin=1),
            Dev(bars=[(0, 0x100000, "mem32"), (2, 0x4000, "mem64"), (4, 0x100, "io")], pin=2),
            Dev(bars=[(0, 0x10, "mem32"), (1, 0x8, "io"), (3, 0x200000, "mem64", True)], pin=4),
            Dev(bars=[(5, 0x800, "mem32")])]
    return devs


def test_assign_resources_aligns_and_does_not_overlap():
    devs = placed_devices()
    host, g = make(*devs)
    placed = host.assign_resources()
    assert len(placed) == 9
    io, mem = [], []
    for f, index, address in placed:
        bar = f.bars[index]
        assert address % bar.size == 0
        assert f.bar_address(index) == address
        dev = f.slot << 3
        assert g.bar_addr(dev, index) == address  # as the guest reads it back
        (io if bar.is_io else mem).append((address, address + bar.size))
        route = host.routed(f, index)
        assert route is not None and route.address == address
        if bar.is_io:
            assert g.bus.port_route(address).start == address
        else:
            assert g.bus.mmio_route(address).start == address
    assert all(0xC000 <= a and b <= 0x10000 for a, b in io)
    assert all(0xD0000000 <= a and b <= 0xE0000000 for a, b in mem)
    for ranges in (io, mem):
        ranges.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
    assert min(a for a, _ in io) == 0xC000 and min(a for a, _ in mem) == 0xD0000000
    for f in devs:
        kinds = {b.is_io for b in f.bars if b}
        cmd = g.cfg_read(f.slot << 3, 0x04, 2)
        assert bool(cmd & COMMAND_IO) == (True in kinds) and bool(cmd & COMMAND_MEMORY) == (False in kinds)
        assert cmd & COMMAND_MASTER
    assert g.cfg_read(0x08, 0x60) == 0x0B0B0A0A  # PIRQA-D -> 10, 10, 11, 11
    # reaching the device through the routes
    f, index, address = next(p for p in placed if p[0] is devs[0] and p[1] == 1)
    assert g.inp(address + 3, 1) == 0x40 + 3
    g.out(address + 2, 0xBEEF, 2)
    assert devs[0].writes[-1] == (1, 2, 2, 0xBEEF)
    f, index, address = next(p for p in placed if p[0] is devs[0] and p[1] == 0)
    assert g.mmio_read(address + 0x10, 4) == 0x13121110


def test_assign_resources_refuses_what_does_not_fit():
    host, g = make(Dev(bars=[(0, 1 << 28, "mem32"), (1, 1 << 28, "mem32")]))
    with pytest.raises(ValueError, match="does not fit"):
        host.assign_resources()


def test_moving_a_bar_moves_the_route():
    d = Dev(bars=[(0, 0x1000, "mem32"), (1, 0x100, "io")])
    host, g = make(d)
    host.assign_resources()
    old_mem, old_io = d.bar_address(0), d.bar_address(1)
    g.cfg_write(0x10, 0x10, 0xD8000000)
    g.cfg_write(0x10, 0x14, 0x7000)
    assert g.bus.mmio_route(old_mem) is None and g.bus.port_route(old_io) is None
    assert g.bus.mmio_route(0xD8000000).size == 0x1000 and g.bus.port_route(0x70FF).start == 0x7000
    assert g.mmio_read(0xD8000004, 1) == 0x04
    assert g.inp(0x7001, 1) == 0x41
    g.mmio_write(0xD8000ABC, 0x99, 1)
    assert d.writes[-1] == (0, 0xABC, 1, 0x99)


def test_sizing_a_live_bar_unmaps_it_until_it_is_written_back():
    d = Dev(bars=[(0, 0x1000, "mem32"), (2, 0x1000, "mem64"), (4, 0x100, "io")])
    host, g = make(d)
    host.assign_resources()
    addrs = [d.bar_address(i) for i in (0, 2, 4)]
    sizes = [g.bar_size(0x10, i) for i in (0, 2, 4)]  # pci_dev_init does this with decoding on
    assert sizes == [0x1000, 0x1000, 0x100]
    assert [d.bar_address(i) for i in (0, 2, 4)] == addrs
    assert g.bus.mmio_route(addrs[0]) and g.bus.mmio_route(addrs[1]) and g.bus.port_route(addrs[2])
    g.cfg_write(0x10, 0x10, ALL)
    assert g.bus.mmio_route(addrs[0]) is None and d.bar_address(0) is None  # 0xFFFFF000: not decoded
    g.cfg_write(0x10, 0x20, ALL)
    assert g.bus.port_route(addrs[2]) is None


def test_command_decode_off_removes_routes():
    d = Dev(bars=[(0, 0x1000, "mem32"), (1, 0x100, "io")])
    host, g = make(d)
    host.assign_resources()
    mem, io = d.bar_address(0), d.bar_address(1)
    g.cfg_write(0x10, 0x04, COMMAND_IO, 2)  # memory off
    assert g.bus.mmio_route(mem) is None and g.bus.port_route(io) is not None
    g.cfg_write(0x10, 0x04, 0, 2)
    assert g.bus.port_route(io) is None
    with pytest.raises(LookupError):
        g.inp(io)
    g.cfg_write(0x10, 0x04, COMMAND_IO | COMMAND_MEMORY, 2)
    assert g.bus.mmio_route(mem).start == mem and g.bus.port_route(io).start == io


def test_overlapping_bars_wait_for_the_other_to_move():
    a, b = Dev(bars=[(0, 0x1000, "mem32")]), Dev(bars=[(0, 0x1000, "mem32")])
    host, g = make(a, b)
    for dev in (0x10, 0x18):
        g.cfg_write(dev, 0x10, 0xD0000000)
        g.cfg_write(dev, 0x04, COMMAND_MEMORY, 2)
    assert host.routed(a, 0) is not None and host.routed(b, 0) is None
    assert g.mmio_read(0xD0000000, 1) == 0x00
    g.cfg_write(0x10, 0x10, 0xD0010000)  # a moves away: b gets the place
    assert host.routed(b, 0).address == 0xD0000000 and host.routed(a, 0).address == 0xD0010000
    g.mmio_write(0xD0000008, 1, 1)
    assert b.writes == [(0, 8, 1, 1)] and a.writes == []


def test_bars_route_when_attached_after_programming():
    d = Dev(bars=[(0, 0x1000, "mem32")])
    host = PciHost()
    host.add(d)
    host.assign_resources()
    bus = Bus()
    host.attach(bus)
    assert bus.mmio_route(d.bar_address(0)).start == d.bar_address(0)
    assert bus.mmio_route(0xE0000000).start == 0xE0000000 and bus.port_route(0xCFC).start == 0xCF8


# ---- slots --------------------------------------------------------------------------------------

def test_add_slots_and_functions():
    host = PciHost()
    a, b, c = Dev(), Dev(), Dev()
    assert host.add(a).slot == 2 and host.add(b).slot == 3
    host.add(c, slot=3, function=2)
    assert (c.slot, c.function) == (3, 2) and b.config[0x0E] & 0x80
    g = Guest(host)
    assert g.cfg_read(3 << 3 | 2, 0) == 0x5678_1234 and g.cfg_read(3 << 3 | 1, 0) == ALL
    with pytest.raises(ValueError):
        host.add(Dev(), slot=3)
    with pytest.raises(ValueError):
        host.add(Dev(), slot=9, function=1)  # no function 0
    with pytest.raises(ValueError):
        host.add(a)
    assert host.add(Dev(), slot=7).slot == 7 and host.add(Dev()).slot == 4


def test_descriptions():
    host, g = make(PciTestDev())
    assert host.describe() == ["00:00.0 0600: 8086:1237 i440FX (Host bridge)",
                               "00:01.0 0601: 8086:7000 PIIX3 (ISA bridge)",
                               "00:02.0 00ff: 1b36:0005 pci-testdev (PCI Test Device)"]
    assert qemu_device_help([PciTestDev, Dev]) == ['name "pci-testdev", bus PCI, desc "PCI Test Device"',
                                                   'name "test-dev", bus PCI, desc "Test device"']


# ---- INTx -----------------------------------------------------------------------------------------

def seabios_irq(slot, pin):
    """SeaBIOS piix_pci_slot_get_irq() for a device on the root bus."""
    return (10, 10, 11, 11)[(pin - 1 + slot - 1) & 3]


def test_intx_swizzle_and_interrupt_line():
    irqs = Irqs()
    devs = {(slot, pin): Dev(pin=pin) for slot in range(2, 7) for pin in (1, 2, 3, 4) if (slot + pin) % 2 == 0}
    host = PciHost(irq=irqs)
    for (slot, pin), d in devs.items():
        host.add(d, slot=slot) if host.function_at(slot) is None else host.add(d, slot=slot, function=pin)
    host.assign_resources()
    g = Guest(host)
    for (slot, pin), d in devs.items():
        assert host.pirq(d) == (pin - 1 + slot - 1) & 3
        assert host.intx_gsi(d) == seabios_irq(slot, pin)
        assert g.cfg_read(slot << 3 | d.function, 0x3C, 1) == seabios_irq(slot, pin)
        d.set_irq(1)
        assert irqs.level[seabios_irq(slot, pin)] == 1
        d.set_irq(0)
    assert irqs.level == {10: 0, 11: 0}


def test_no_interrupt_before_the_pirqs_are_routed():
    irqs = Irqs()
    d = Dev(pin=1)
    host = PciHost(irq=irqs)
    host.add(d)
    d.set_irq(1)
    assert irqs.calls == [] and host.intx_gsi(d) is None
    assert d.config[0x06] & 0x08  # status shows the raw level
    host.assign_resources()  # routing appears with the line asserted: it reaches the GSI
    assert irqs.calls == [(10, 1)]


def test_shared_line_is_the_or_of_its_functions():
    irqs = Irqs()
    a, b, c = Dev(pin=1), Dev(pin=1), Dev(pin=2)
    host = PciHost(irq=irqs)
    host.add(a, slot=2)  # pirq B -> 10
    host.add(b, slot=5)  # pirq A -> 10
    host.add(c, slot=4)  # pirq A -> 10
    host.assign_resources()
    assert {host.intx_gsi(x) for x in (a, b, c)} == {10}
    a.set_irq(1)
    b.set_irq(1)
    c.set_irq(1)
    a.set_irq(0)
    b.set_irq(0)
    assert irqs.calls == [(10, 1)]
    c.set_irq(0)
    assert irqs.calls == [(10, 1), (10, 0)]
    a.set_irq(1)
    g = Guest(host)
    g.cfg_write(a.slot << 3, 0x04, COMMAND_INTX_DISABLE, 2)  # INTx disable masks it
    assert irqs.calls[-1] == (10, 0) and a.config[0x06] & 0x08
    g.cfg_write(a.slot << 3, 0x04, 0, 2)
    assert irqs.calls[-1] == (10, 1)
    g.cfg_write(0x08, 0x61, 0x05, 1)  # re-route PIRQB (a's) to IRQ 5 at run time
    assert irqs.level == {10: 0, 5: 1}
    g.cfg_write(0x08, 0x61, 0x80, 1)  # disabled
    assert irqs.level == {10: 0, 5: 0}


# ---- MSI ----------------------------------------------------------------------------------------

def msi_dev(**kw):
    d = Dev(pin=1)
    d.add_msi(**kw)
    return d


def setup_msi(g, dev, addr, data):
    """kvm-unit-tests pci_setup_msi() + pci_enable_defaults()."""
    msi = next(off for off, cap in g.cap_walk(dev) if cap == 0x05)
    flags = g.cfg_read(dev, msi + 2, 2)
    g.cfg_write(dev, msi + 4, addr & ALL)
    if flags & 0x80:
        g.cfg_write(dev, msi + 8, addr >> 32)
        g.cfg_write(dev, msi + 12, data)
    else:
        g.cfg_write(dev, msi + 8, data)
    g.cfg_write(dev, msi + 2, g.cfg_read(dev, msi + 2, 2) | 1, 2)
    g.cfg_write(dev, 0x04, g.cfg_read(dev, 0x04, 2) | COMMAND_MASTER, 2)
    return msi


@pytest.mark.parametrize("address64", [True, False])
def test_msi_delivery(address64):
    sent, irqs = [], Irqs()
    d = msi_dev(address64=address64)
    host, g = make(d, irq=irqs, msi=lambda a, v: sent.append((a, v)))
    assert g.cfg_read(0x10, 0x06, 2) & 0x10
    assert d.notify() is False and sent == []  # not enabled
    msi = setup_msi(g, 0x10, 0xFEE01000, 0x4031)
    assert g.cap_walk(0x10) == [(0x40, 0x05)] and msi == 0x40
    assert bool(g.cfg_read(0x10, msi + 2, 2) & 0x80) == address64
    assert d.msi_notify() is True and sent == [(0xFEE01000, 0x4031)]
    g.cfg_write(0x10, msi + 4, 0xFEE00003)  # the low two address bits are read-only
    assert g.cfg_read(0x10, msi + 4) == 0xFEE00000
    g.cfg_write(0x10, 0x04, 0, 2)  # bus master off: the message write is dropped
    assert d.notify() is False and len(sent) == 1
    host.assign_resources()  # PIRQs routed: d's INTA# would reach IRQ 10
    d.set_irq(1)  # but INTx is silent while MSI is enabled
    assert irqs.calls == [] and host.intx_gsi(d) == 10
    g.cfg_write(0x10, msi + 2, 0, 2)  # MSI off: the asserted pin shows
    assert irqs.calls == [(10, 1)]


def test_msi_multiple_vectors_and_per_vector_mask():
    sent = []
    d = msi_dev(vectors=8, per_vector_mask=True)
    host, g = make(d, msi=lambda a, v: sent.append((a, v)))
    msi = setup_msi(g, 0x10, 0xFEE00000, 0x40)
    flags = g.cfg_read(0x10, msi + 2, 2)
    assert flags & 0x0E == 3 << 1 and flags & 0x100 and flags & 0x80
    g.cfg_write(0x10, msi + 2, flags | 7 << 4, 2)  # ask for 128: clamped to the 8 it can do
    assert (g.cfg_read(0x10, msi + 2, 2) >> 4) & 7 == 3
    assert d.msi_notify(5) and sent[-1] == (0xFEE00000, 0x45)
    g.cfg_write(0x10, msi + 0x10, 1 << 2)  # mask vector 2
    assert g.cfg_read(0x10, msi + 0x10) == 1 << 2
    assert d.msi_notify(2) is False and g.cfg_read(0x10, msi + 0x14) == 1 << 2  # pending
    g.cfg_write(0x10, msi + 0x14, 0)  # pending bits are read-only
    assert g.cfg_read(0x10, msi + 0x14) == 1 << 2
    g.cfg_write(0x10, msi + 0x10, 0)
    assert sent[-1] == (0xFEE00000, 0x42) and g.cfg_read(0x10, msi + 0x14) == 0
    g.cfg_write(0x10, msi + 2, (flags & ~0x70) | 1 << 4 | 1, 2)  # two vectors enabled
    assert d.msi_notify(3) is False and d.msi_notify(1) and sent[-1] == (0xFEE00000, 0x41)


# ---- MSI-X --------------------------------------------------------------------------------------

def msix_setup(vectors=4):
    sent = []
    d = Dev(bars=[(0, 0x1000, "mem32"), (2, 0x1000, "mem32")], pin=1)
    d.add_msix(vectors, table_bar=2, table_offset=0, pba_bar=2, pba_offset=0x800)
    host, g = make(d, msi=lambda a, v: sent.append((a, v)))
    host.assign_resources()
    return d, host, g, sent


def test_msix_capability_table_and_delivery():
    d, host, g, sent = msix_setup()
    (off, cap), = g.cap_walk(0x10)
    assert cap == 0x11
    assert g.cfg_read(0x10, off + 2, 2) == 3
    assert g.cfg_read(0x10, off + 4) == 0x000 | 2 and g.cfg_read(0x10, off + 8) == 0x800 | 2
    table = d.bar_address(2)
    for v in range(4):
        assert g.mmio_read(table + 16 * v + 12) == 1  # masked at reset
        g.mmio_write(table + 16 * v, 0xFEE00000 | v << 12)
        g.mmio_write(table + 16 * v + 4, 0)
        g.mmio_write(table + 16 * v + 8, 0x30 + v)
    assert g.mmio_read(table + 16, 8) == 0xFEE01000
    assert d.msix_notify(0) is False and sent == []  # MSI-X disabled: nothing, not even pending
    assert g.mmio_read(table + 0x800) == 0
    g.cfg_write(0x10, off + 2, 0x8000, 2)  # enable
    assert d.msix_notify(1) is False and g.mmio_read(table + 0x800) == 0b10  # entry masked: pending
    g.mmio_write(table + 16 + 12, 0)  # unmask: delivered, pending cleared
    assert sent == [(0xFEE01000, 0x31)] and g.mmio_read(table + 0x800) == 0
    assert d.notify(1) and sent[-1] == (0xFEE01000, 0x31)
    # the function mask
    g.cfg_write(0x10, off + 2, 0xC000, 2)
    assert d.msix_notify(1) is False and d.msix_pending(1)
    g.mmio_write(table + 0x800, 0)  # the PBA is read-only
    assert g.mmio_read(table + 0x800) == 0b10
    g.cfg_write(0x10, off + 2, 0x8000, 2)
    assert sent[-1] == (0xFEE01000, 0x31) and len(sent) == 3 and not d.msix_pending(1)
    # outside the table and the PBA the device answers its BARs itself
    assert g.mmio_read(d.bar_address(0) + 4, 1) == 4
    assert g.mmio_read(table + 0x400, 1) == (2 * 0x40 + 0x400) & 0xFF
    assert d.msix_entry(3) == (0xFEE03000, 0x33, True)


def test_msix_masked_vector_stays_pending_until_both_masks_clear():
    d, host, g, sent = msix_setup(vectors=70)
    off = g.cap_walk(0x10)[0][0]
    table = d.bar_address(2)
    g.mmio_write(table + 16 * 65, 0xFEE00000)
    g.mmio_write(table + 16 * 65 + 8, 0x99)
    g.cfg_write(0x10, off + 2, 0xC000, 2)  # enabled, function masked
    d.msix_notify(65)
    assert g.mmio_read(table + 0x808) == 0b10  # vector 65: second qword, bit 1
    g.mmio_write(table + 16 * 65 + 12, 0)  # entry unmasked, function still masked
    assert sent == []
    g.cfg_write(0x10, off + 2, 0x8000, 2)
    assert sent == [(0xFEE00000, 0x99)] and g.mmio_read(table + 0x808) == 0
    d.set_irq(1)
    assert host.gsi_level(10) == 0 and host.gsi_level(11) == 0  # INTx silent while MSI-X is on


# ---- pci-testdev --------------------------------------------------------------------------------

class DevOps:
    def __init__(self, g, base, io):
        self.g, self.base, self.io = g, base, io

    def read(self, off, size):
        return self.g.inp(self.base + off, size) if self.io else self.g.mmio_read(self.base + off, size)

    def write(self, off, value, size):
        if self.io:
            self.g.out(self.base + off, value, size)
        else:
            self.g.mmio_write(self.base + off, value, size)


def kut_testdev_one(ops, test_nr):
    """kvm-unit-tests pci_testdev_one()."""
    ops.write(0, test_nr, 1)
    if ops.read(12, 4) != 0:
        return False
    width = ops.read(1, 1)
    if width not in (1, 2, 4):
        return False
    sig, off = ops.read(8, 4), ops.read(4, 4)
    for _ in range(16):
        ops.write(off, sig, width)
    count = ops.read(12, 4)
    return count == 0 or count == 16


def kut_testdev_name(ops):
    name = bytearray()
    while (c := ops.read(16 + len(name), 1)) != 0:
        name.append(c)
    return name.decode()


def test_pci_testdev_as_kvm_unit_tests_drives_it():
    t = PciTestDev()
    host, g = make(t)
    host.assign_resources()
    dev = g.find_dev(0x1B36, 0x0005)
    assert dev == 0x10
    assert g.cfg_read(dev, 0x08) == 0x00FF0000 and g.cfg_read(dev, 0x3D, 1) == 0
    assert g.bar_size(dev, 0) == 4096 and g.bar_size(dev, 1) == 256 and g.bar_size(dev, 2) == 0
    mem = DevOps(g, g.bar_addr(dev, 0), io=False)
    io = DevOps(g, g.bar_addr(dev, 1), io=True)
    assert g.cfg_read(dev, 0x14) & 1 and not g.cfg_read(dev, 0x10) & 1
    names = []
    nr_tests = 0
    for ops in (mem, io):
        i = 0
        while kut_testdev_one(ops, i):
            names.append(kut_testdev_name(ops))
            i += 1
        nr_tests += i
    assert nr_tests == 6
    assert names == ["mmio-no-eventfd", "mmio-wildcard-eventfd", "mmio-datamatch-eventfd",
                     "portio-no-eventfd", "portio-wildcard-eventfd", "portio-datamatch-eventfd"]
    assert [t.count(i) for i in range(6)] == [16] * 6  # counted in Python (no ioeventfds wired)


def test_pci_testdev_header_and_counting_rules():
    t = PciTestDev()
    host, g = make(t)
    host.assign_resources()
    mem = DevOps(g, t.bar_address(0), io=False)
    io = DevOps(g, t.bar_address(1), io=True)
    assert mem.read(0, 4) == 0 and mem.read(12, 4) == 0  # nothing selected
    expect = {0: (0x800, 0xFA), 1: (0x801, 0xCE), 2: (0x802, 0xFA)}
    for n, (offset, data) in expect.items():
        mem.write(0, n, 1)
        assert (mem.read(0, 1), mem.read(1, 1), mem.read(4, 4), mem.read(8, 4)) == (n, 1, offset, data)
    for n in range(3):
        io.write(0, n, 1)
        assert io.read(0, 1) == 3 + n and io.read(4, 4) == 128 + 3 + n
    # datamatch: only a byte of the right value counts
    io.write(0, 2, 1)
    io.write(0x85, 0xFA, 1)
    io.write(0x85, 0xFB, 1)
    io.write(0x84, 0xFA, 1)
    assert io.read(12, 4) == 1
    io.write(0x85, 0x12FA, 2)  # split into bytes: 0xFA at 0x85 counts, 0x12 at 0x86 does not
    assert io.read(12, 4) == 2
    # wildcard: any value
    mem.write(0, 1, 1)
    mem.write(0x801, 0x00, 1)
    mem.write(0x801, 0x77, 1)
    assert mem.read(12, 4) == 2 and t.count(1) == 2
    # selecting restarts the count; >= 3 selects nothing
    mem.write(0, 1, 1)
    assert mem.read(12, 4) == 0
    mem.write(0x801, 1, 1)
    mem.write(0, 3, 1)
    assert mem.read(0, 4) == 0 and mem.read(16, 1) == 0
    mem.write(0x801, 1, 1)
    assert t.count(1) == 1
    # the name's terminator and beyond read 0
    mem.write(0, 0, 1)
    assert kut_testdev_name(mem) == "mmio-no-eventfd" and mem.read(16 + 15, 1) == 0 and mem.read(200, 1) == 0


def test_pci_testdev_ioeventfd_hook_and_membar():
    seen = []
    t = PciTestDev(membar=1 << 20, on_ioeventfds=seen.append)
    host, g = make(t)
    assert g.bar_size(0x10, 2) == 1 << 20 and g.cfg_read(0x10, 0x18) == 0xC
    host.assign_resources()
    mem, io = t.bar_address(0), t.bar_address(1)
    g.mmio_write(mem, 0, 1)  # no-eventfd: nothing to register
    assert t.ioeventfds() == [] and seen == []
    g.mmio_write(mem, 1, 1)
    assert seen[-1] == [IoEventFd(False, mem + 0x801, 1, None)]
    g.out(io, 2, 1)
    assert seen[-1] == [IoEventFd(True, io + 0x85, 1, 0xFA)]
    g.cfg_write(0x10, 0x14, 0x6000)  # the BAR moves: so does the eventfd
    assert seen[-1] == [IoEventFd(True, 0x6085, 1, 0xFA)]
    g.out(0x6000, 7, 1)
    assert seen[-1] == []
    assert g.mmio_read(t.bar_address(2) + 8, 4) == 0


# ---- the bus additions -------------------------------------------------------------------------

def test_bus_remove_port_and_mmio():
    bus = Bus()
    handler = lambda exit, vcpu=None: None  # noqa: E731
    bus.add_port(0x100, handler, 8, name="h")
    bus.add_mmio(0x1000, 0x100, handler, name="m")
    bus.add_mmio(0x2000, 0x100, handler, name="n")
    with pytest.raises(ValueError):
        bus.remove_port(0x100, 4)  # not the registered range
    with pytest.raises(ValueError):
        bus.remove_mmio(0x1000, 0x80)
    bus.remove_port(0x100, 8)
    assert all(bus.port_route(p) is None for p in range(0x100, 0x108))
    bus.remove_mmio(0x1000, 0x100)
    assert bus.mmio_route(0x1000) is None and bus.mmio_route(0x2080).name == "n"
    bus.add_port(0x104, handler, 1)
    bus.add_mmio(0x1000, 0x1000, handler)
    assert bus.port_route(0x104).start == 0x104 and bus.mmio_route(0x1FFF).start == 0x1000
    with pytest.raises(ValueError):
        bus.remove_port(0x200)
