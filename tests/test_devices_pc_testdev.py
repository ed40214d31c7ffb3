"""QEMU's pc-testdev: the 0xE0 / 0xE8 data register, the flush-page port, the IRQ-line ports and
the 64 KiB I/O memory window, used as kvm-unit-tests uses them."""

from __future__ import annotations

from pykvm import exits
from pykvm.devices.harness import PortHarness
from pykvm.devices.pc_testdev import PcTestdev


def test_realmode_pio_round_trips_at_every_width():
    bus = PortHarness(PcTestdev())
    for size, value in ((1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)):  # x86/realmode.c test_io
        bus.out(0xE0, 0, 4)
        bus.out(0xE0, value, size)
        assert bus.inp(0xE0, size) == value


def test_the_data_register_is_shared_and_byte_addressed():
    dev = PcTestdev()
    bus = PortHarness(dev)
    bus.out(0xE0, 0x11223344, 4)
    assert [bus.inp(0xE0 + i) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]
    assert bus.inp(0xE2, 2) == 0x1122
    bus.out(0xE1, 0xAB)
    assert dev.data == 0x1122AB44
    assert bus.inp(0xE8, 4) == 0x1122AB44  # 0xE8 is the same register, in bytes
    bus.out(0xE9, 0xBEEF, 2)  # split into 0xE9 and 0xEA
    assert dev.data == 0x11BEEF44
    assert bus.inp(0xEA, 4) == 0xFFFF11BE  # bytes past 0xEB read 0xFF
    bus.out(0xE2, 0xCAFED00D, 4)  # QEMU's mask: only the upper half is reached from 0xE2
    assert dev.data == 0xD00DEF44 and bus.inp(0xE2, 4) == 0xD00D


def test_irq_line_ports_set_isa_lines_on_every_write():
    calls = []
    dev = PcTestdev(irq=lambda n: (lambda level: calls.append((n, level))))
    bus = PortHarness(dev)
    for line, level in ((0x0E, 1), (0x0E, 1), (0x0E, 0), (0x0D, 5), (0x17, 1)):
        bus.out(0x2000 + line, level)
    assert calls == [(0x0E, 1), (0x0E, 1), (0x0E, 0), (0x0D, 1), (0x17, 1)]  # !!v, repeats included
    assert dev.levels[0x0E] == 0 and dev.levels[0x0D] == 1
    bus.out(0x2000, 1, 2)  # only byte writes count
    assert calls[-1] == (0x17, 1) and dev.levels[0] == 0
    assert bus.inp(0x2005) == 0
    PortHarness(PcTestdev()).out(0x200E, 1)  # without irq: nothing to call, no error


def test_flush_page_takes_32_bit_writes_of_an_address():
    pages = []
    dev = PcTestdev(flush_page=pages.append)
    bus = PortHarness(dev)
    bus.out(0xE4, 0x0012_3ABC, 4)  # x86/eventinj.c: outl(phys, 0xe4)
    bus.out(0xE4, 0x5678, 2)  # dropped: QEMU takes 4-byte accesses only
    assert pages == [0x123000] and dev.flushed == [0x123000]
    assert bus.inp(0xE4, 4) == 0


def test_iomem_window_is_memory():
    dev = PcTestdev()
    bus = PortHarness(dev)
    handler = bus.bus.mmio_route(0xFF000000).handler
    assert bus.bus.mmio_route(0xFF00FFFF) is not None and bus.bus.mmio_route(0xFF010000) is None

    def read(gpa, size):
        buf = bytearray(size)
        handler(exits.MmioRead(gpa, memoryview(buf)), None)
        return int.from_bytes(buf, "little")

    assert read(0xFF000000, 8) == 0
    handler(exits.MmioWrite(0xFF000010, (0x1122334455667788).to_bytes(8, "little")), None)
    assert read(0xFF000010, 8) == 0x1122334455667788
    assert read(0xFF000012, 2) == 0x5566
    handler(exits.MmioWrite(0xFF00FFFF, b"\xAA"), None)
    assert read(0xFF00FFFF, 1) == 0xAA and dev.iomem[-1] == 0xAA


def test_ports_and_ranges():
    dev = PcTestdev()
    assert dev.ports == ((0xE0, 4), (0xE4, 4), (0xE8, 4), (0x2000, 24))
    assert dev.mmio_ranges == ((0xFF000000, 0x10000),)
