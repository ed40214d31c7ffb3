"""fw_cfg as a guest (SeaBIOS's qemu_cfg_* code, Linux's qemu_fw_cfg driver) uses it."""

from __future__ import annotations

import struct

import pytest

from pykvm.devices import fw_cfg as f
from pykvm.devices.fw_cfg import FwCfg
from pykvm.devices.harness import PortHarness

SEL, DATA, DMA_HI, DMA_LO = 0x510, 0x511, 0x514, 0x518


class Ram:
    """Guest memory for DMA: read/write as pykvm.memory.GuestMemory (ValueError outside)."""

    def __init__(self, size: int = 0x10000):
        self.buf = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or gpa + size > len(self.buf):
            raise ValueError("outside RAM")
        return bytes(self.buf[gpa : gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.buf):
            raise ValueError("outside RAM")
        self.buf[gpa : gpa + len(data)] = data


def read_item(bus: PortHarness, key: int, n: int) -> bytes:
    bus.out(SEL, key, size=2)
    return bytes(bus.inp(DATA) for _ in range(n))


def read_dir(bus: PortHarness) -> dict[str, tuple[int, int]]:
    bus.out(SEL, f.FW_CFG_FILE_DIR, size=2)
    (count,) = struct.unpack(">I", bus.ins(DATA, 4))
    files = {}
    for _ in range(count):
        size, select, _reserved, name = struct.unpack(">IHH56s", bus.ins(DATA, 64))
        files[name.rstrip(b"\0").decode()] = (select, size)
    return files


@pytest.fixture
def cfg():
    dev = FwCfg(ram_size=6 << 30, ncpus=4, max_cpus=8)
    return dev, PortHarness(dev)


def test_signature_is_selected_at_reset_and_reads_qemu(cfg):
    _, bus = cfg
    assert bytes(bus.inp(DATA) for _ in range(4)) == b"QEMU"  # SeaBIOS's detection, no select
    assert read_item(bus, f.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"  # past the end: zeros


def test_id_without_dma_says_traditional_interface_only(cfg):
    _, bus = cfg
    assert struct.unpack("<I", read_item(bus, f.FW_CFG_ID, 4))[0] == 1
    assert bus.bus.port_handler(DMA_HI) is None


def test_ram_size_and_cpu_counts(cfg):
    _, bus = cfg
    assert struct.unpack("<Q", read_item(bus, f.FW_CFG_RAM_SIZE, 8))[0] == 6 << 30
    assert struct.unpack("<H", read_item(bus, f.FW_CFG_NB_CPUS, 2))[0] == 4
    assert struct.unpack("<H", read_item(bus, f.FW_CFG_MAX_CPUS, 2))[0] == 8
    assert read_item(bus, f.FW_CFG_UUID, 16) == bytes(16)
    assert struct.unpack("<H", read_item(bus, f.FW_CFG_NOGRAPHIC, 2))[0] == 1
    assert struct.unpack("<I", read_item(bus, f.FW_CFG_IRQ0_OVERRIDE, 4))[0] == 1


def test_file_directory_lists_files_sorted_and_selectors_read_them(cfg):
    dev, bus = cfg
    dev.add_file("opt/org.example/zeta", b"last")
    dev.add_file("etc/boot-fail-wait", struct.pack("<I", 5))
    files = read_dir(bus)
    assert files == {"etc/boot-fail-wait": (0x20, 4), "opt/org.example/zeta": (0x21, 4)}  # by name, as QEMU
    assert dev.selector("opt/org.example/zeta") == 0x21
    bus.out(SEL, files["opt/org.example/zeta"][0], size=2)
    assert bus.ins(DATA, 6) == b"last\0\0"  # rep insb, zeros past the end
    assert read_item(bus, 0x20, 4) == struct.pack("<I", 5)


def test_directory_of_no_files_has_count_zero(cfg):
    _, bus = cfg
    assert read_dir(bus) == {}


def test_selecting_restarts_at_offset_zero_and_unknown_keys_read_zero(cfg):
    dev, bus = cfg
    dev.add_file("a", b"0123456789")
    assert read_item(bus, 0x20, 3) == b"012"
    assert bus.inp(DATA) == ord("3")  # the offset moves on
    assert read_item(bus, 0x20, 2) == b"01"
    assert read_item(bus, 0x21, 4) == bytes(4)  # no such file
    assert read_item(bus, 0x3FFF, 2) == bytes(2)
    assert read_item(bus, 0x8020, 2) == bytes(2)
    assert read_item(bus, 0x4000, 4) == b"QEMU"  # bit 14 (write channel) is ignored for reads


def test_port_access_rules_follow_qemus_combined_region(cfg):
    _, bus = cfg
    bus.out(SEL, f.FW_CFG_ID, size=2)
    assert bus.inp(SEL) == 1  # an 8-bit read at 0x510 reads data too
    bus.out(SEL, 0x05)  # an 8-bit write is a (dropped) data write, not a select
    bus.out(DATA, 0x55)
    assert bus.inp(DATA) == 0  # still the ID item, offset 2
    assert bus.inp(DATA, size=2) == 0  # wider reads are invalid: 0, offset unchanged
    bus.out(DATA, f.FW_CFG_NB_CPUS, size=2)  # a 16-bit write at either port selects
    assert bus.inp(DATA) == 4


def test_cmdline_items():
    dev = FwCfg(ram_size=1 << 20)
    dev.set_cmdline("console=ttyS0")
    bus = PortHarness(dev)
    (size,) = struct.unpack("<I", read_item(bus, f.FW_CFG_CMDLINE_SIZE, 4))
    assert size == 14
    assert read_item(bus, f.FW_CFG_CMDLINE_DATA, size) == b"console=ttyS0\0"


def test_bad_names_and_duplicates_are_refused(cfg):
    dev, _ = cfg
    dev.add_file("x", b"")
    with pytest.raises(ValueError, match="duplicate"):
        dev.add_file("x", b"1")
    with pytest.raises(ValueError):
        dev.add_file("n" * 56, b"")
    with pytest.raises(ValueError):
        dev.add_item(0x20, b"")
    with pytest.raises(ValueError):
        dev.add_item(f.FW_CFG_FILE_DIR, b"")
    with pytest.raises(ValueError):
        FwCfg(ram_size=0, ncpus=4, max_cpus=2)


# ---- DMA ------------------------------------------------------------------------------------------
@pytest.fixture
def dma():
    ram = Ram()
    dev = FwCfg(ram_size=len(ram.buf), ncpus=2, memory=ram)
    return dev, PortHarness(dev), ram


def dma_op(bus: PortHarness, ram: Ram, at: int, control: int, length: int, address: int) -> int:
    ram.write(at, struct.pack(">IIQ", control, length, address))
    bus.out(DMA_HI, int.from_bytes((0).to_bytes(4, "big"), "little"), size=4)
    bus.out(DMA_LO, int.from_bytes(at.to_bytes(4, "big"), "little"), size=4)  # outl(cpu_to_be32(at))
    return struct.unpack(">I", ram.read(at, 4))[0]


def test_dma_is_announced_and_signed(dma):
    _, bus, _ = dma
    assert struct.unpack("<I", read_item(bus, f.FW_CFG_ID, 4))[0] == 3
    assert bus.inp(DMA_HI, size=4).to_bytes(4, "little") == b"QEMU"
    assert bus.inp(DMA_LO, size=4).to_bytes(4, "little") == b" CFG"


def test_dma_select_and_read_a_file(dma):
    dev, bus, ram = dma
    payload = bytes(range(256)) * 8
    sel = dev.add_file("etc/blob", payload)
    control = (sel << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ
    assert dma_op(bus, ram, 0x100, control, len(payload) + 16, 0x1000) == 0
    assert ram.read(0x1000, len(payload) + 16) == payload + bytes(16)  # zeros past the end


def test_dma_skip_then_read_and_write_is_an_error(dma):
    dev, bus, ram = dma
    sel = dev.add_file("etc/blob", b"abcdefgh")
    assert dma_op(bus, ram, 0x100, (sel << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_SKIP, 3, 0) == 0
    assert dma_op(bus, ram, 0x100, f.DMA_CTL_READ, 2, 0x2000) == 0
    assert ram.read(0x2000, 2) == b"de"
    assert bus.inp(DATA) == ord("f")  # DMA and the data port share the offset
    assert dma_op(bus, ram, 0x100, f.DMA_CTL_WRITE, 2, 0x2000) == f.DMA_CTL_ERROR


def test_dma_to_memory_that_is_not_there_reports_an_error(dma):
    _, bus, ram = dma
    assert dma_op(bus, ram, 0x100, (f.FW_CFG_SIGNATURE << 16) | 0x0A, 4, 0xFFFFFF00) == f.DMA_CTL_ERROR
