"""ACPI tables: checksums, pointers, the MADT's contents, and what ACPICA's tools make of them.

The iasl / acpiexec checks need Debian's ``acpica-tools`` (``apt-get install acpica-tools``);
they skip with that reason where it is missing.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess

import pytest

from pykvm.x86.acpi import ACPI_BASE, AcpiTables, build_acpi


def sdt_entries(table: bytes, width: int) -> list[int]:
    length = struct.unpack_from("<I", table, 4)[0]
    fmt = "<Q" if width == 8 else "<I"
    return [struct.unpack_from(fmt, table, off)[0] for off in range(36, length, width)]


def madt_entries(table: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(table):
        kind, length = table[off], table[off + 1]
        assert length >= 2
        out.append((kind, table[off : off + length]))
        off += length
    assert off == len(table)
    return out


@pytest.fixture(scope="module")
def tables() -> AcpiTables:
    return build_acpi(4)


def test_rsdp_is_in_the_bios_area_aligned_with_both_checksums(tables):
    rsdp = tables.table("RSDP")
    assert 0xE0000 <= tables.rsdp < 0x100000 and tables.rsdp % 16 == 0
    assert tables.rsdp == ACPI_BASE
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    rsdt, length, xsdt = struct.unpack_from("<IIQ", rsdp, 16)
    assert (rsdt, length, xsdt) == (tables.tables["RSDT"], 36, tables.tables["XSDT"])


def test_every_table_sums_to_zero_and_says_its_length(tables):
    for name, gpa in tables.tables.items():
        data = tables.blobs[gpa]
        assert sum(data) % 256 == 0, name
        if name != "RSDP":
            assert data[:4] == name.encode()
            assert struct.unpack_from("<I", data, 4)[0] == len(data)


def test_tables_do_not_overlap_and_fit_below_1_mib(tables):
    spans = sorted((gpa, gpa + len(data)) for gpa, data in tables.blobs.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert tables.end <= 0x100000


def test_xsdt_and_rsdt_point_at_fadt_and_madt_and_fadt_at_dsdt(tables):
    at = tables.tables
    assert sdt_entries(tables.table("XSDT"), 8) == [at["FACP"], at["APIC"]]
    assert sdt_entries(tables.table("RSDT"), 4) == [at["FACP"], at["APIC"]]
    fadt = tables.table("FACP")
    assert struct.unpack_from("<I", fadt, 40)[0] == at["DSDT"]
    assert struct.unpack_from("<Q", fadt, 140)[0] == at["DSDT"]
    assert struct.unpack_from("<I", fadt, 112)[0] & (1 << 20)  # hardware-reduced
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, 0x64) and fadt[128] == 0xFE  # reset: 0xFE to 0x64


def test_madt_lists_cpus_ioapic_and_irq0_override(tables):
    madt = tables.table("APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [(i, i, 1) for i in range(4)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic[2:] == (4, 0, 0xFEC00000, 0)
    (iso,) = [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2]
    assert iso[2:] == (0, 0, 2, 0)  # ISA IRQ 0 -> GSI 2, conforming (edge, high)
    (nmi,) = [struct.unpack("<BBBHB", e) for k, e in entries if k == 4]
    assert nmi[2:] == (0xFF, 0, 1)


def test_options_and_limits():
    t = build_acpi(1, 0xF0000, ioapic_id=8, irq0_override=False)
    kinds = [k for k, _ in madt_entries(t.table("APIC"))]
    assert kinds == [0, 1, 4]
    assert t.table("APIC")[44 + 8 + 2] == 8
    assert len([k for k, _ in madt_entries(build_acpi(254).table("APIC")) if k == 0]) == 254
    for bad in (dict(ncpus=0), dict(ncpus=255), dict(ncpus=4, ioapic_id=2), dict(ncpus=1, base_gpa=0xE0008)):
        with pytest.raises(ValueError):
            build_acpi(**bad)
    with pytest.raises(ValueError, match="would pass"):
        build_acpi(254, 0xFFF00)


def test_write_copies_every_table_into_memory(tables):
    class Mem:
        def __init__(self):
            self.writes = {}

        def write(self, gpa, data):
            self.writes[gpa] = data

    mem = Mem()
    tables.write(mem)
    assert mem.writes == tables.blobs


needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None, reason="needs iasl (apt-get install acpica-tools)")
needs_acpiexec = pytest.mark.skipif(
    shutil.which("acpiexec") is None, reason="needs acpiexec (apt-get install acpica-tools)"
)
COMPLAINTS = ("error", "warning", "incorrect", "invalid")


def iasl_disassemble(table: bytes, path) -> str:
    """``iasl -d`` of one table written to ``path``: its .dsl text, after checking iasl exited 0
    and neither it nor the text complains."""
    path.write_bytes(table)
    run = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=path.parent, timeout=60,
                         check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    dsl = path.with_suffix(".dsl").read_text()
    for word in COMPLAINTS:
        assert word not in output.lower(), output
        assert word not in dsl.lower(), dsl
    return dsl


@needs_iasl
@pytest.mark.parametrize("name", ["XSDT", "RSDT", "FACP", "DSDT", "APIC"])
def test_iasl_disassembles_each_table_without_complaint(tables, tmp_path, name):
    # (iasl cannot read a bare RSDP from a file: it wants a 4-character table signature.)
    dsl = iasl_disassemble(tables.table(name), tmp_path / f"{name.lower()}.dat")
    if name == "APIC":
        assert dsl.count("[Processor Local APIC]") == 4
        assert dsl.count("[I/O APIC]") == 1 and dsl.count("[Interrupt Source Override]") == 1
    if name == "FACP":
        assert "Hardware Reduced (V5) : 1" in dsl


@needs_acpiexec
def test_acpiexec_loads_the_fadt_dsdt_and_madt(tables, tmp_path):
    paths = []
    for name in ("FACP", "DSDT", "APIC"):
        path = tmp_path / f"{name.lower()}.dat"
        path.write_bytes(tables.table(name))
        paths.append(str(path))
    run = subprocess.run(["acpiexec", "-b", "tables", *paths], capture_output=True, text=True, timeout=60, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "1 ACPI AML tables successfully acquired and loaded" in output, output
    assert "error" not in output.lower() and "warning" not in output.lower(), output


# ---- platform="pc": full FADT, FACS, DSDT sleep packages, MCFG ---------------------------------

ECAM = 0xE0000000


@pytest.fixture(scope="module")
def pc_tables() -> AcpiTables:
    return build_acpi(4, platform="pc", ecam_base=ECAM)


def find_like_kvm_unit_tests(memory: dict[int, bytes], signature: bytes) -> int | None:
    """lib/acpi.c's find_acpi_table_addr() over a flat view of guest memory."""
    flat = bytearray(0x100000)
    for gpa, data in memory.items():
        flat[gpa : gpa + len(data)] = data

    def u32(at):
        return struct.unpack_from("<I", flat, at)[0]

    rsdp = next((a for a in range(0xE0000, 0x100000, 16) if flat[a : a + 8] == b"RSD PTR "), None)
    if rsdp is None:
        return None
    if signature == b"FACS":
        fadt = find_like_kvm_unit_tests(memory, b"FACP")
        return u32(fadt + 36) if fadt else None
    if signature == b"RSDP":
        return rsdp
    xsdt = struct.unpack_from("<Q", flat, rsdp + 24)[0] if flat[rsdp + 15] >= 2 else 0
    if xsdt and flat[xsdt : xsdt + 4] != b"XSDT":
        xsdt = 0
    for entry in range(xsdt + 36, xsdt + u32(xsdt + 4), 8):
        table = struct.unpack_from("<Q", flat, entry)[0]
        if table and flat[table : table + 4] == signature:
            return table
    return None


def test_pc_tables_are_found_the_way_kvm_unit_tests_looks(pc_tables):
    mem = pc_tables.blobs
    for name in ("RSDP", "FACP", "APIC", "MCFG", "FACS"):
        assert find_like_kvm_unit_tests(mem, name.encode()) == pc_tables.tables[name], name
    assert find_like_kvm_unit_tests(build_acpi(2).blobs, b"FACS") == 0  # reduced: no FACS


def test_pc_fadt_fields_as_qemu_pc(pc_tables):
    f = pc_tables.table("FACP")
    assert len(f) == 276 and f[8] == 6 and f[131] == 5
    assert struct.unpack_from("<II", f, 36) == (pc_tables.tables["FACS"], pc_tables.tables["DSDT"])
    assert f[44] == 1 and struct.unpack_from("<H", f, 46)[0] == 9  # INT_MODEL, SCI_INT
    assert struct.unpack_from("<IBB", f, 48) == (0, 0, 0)  # SMI_CMD, ACPI_ENABLE, ACPI_DISABLE
    assert struct.unpack_from("<8I", f, 56) == (0x600, 0, 0x604, 0, 0, 0x608, 0xAFE0, 0)
    assert tuple(f[88:95]) == (4, 2, 0, 4, 4, 0, 0)
    assert struct.unpack_from("<HH", f, 96) == (0xFFF, 0xFFF)
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags == (1 << 0) | (1 << 2) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 15)
    assert not flags & (1 << 20)  # not hardware-reduced
    assert f[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, 0xCF9) and f[128] == 0x06
    assert struct.unpack_from("<QQ", f, 132) == (0, pc_tables.tables["DSDT"])
    assert f[148:160] == struct.pack("<BBBBQ", 1, 32, 0, 2, 0x600)  # X_PM1a_EVT_BLK
    assert f[172:184] == struct.pack("<BBBBQ", 1, 16, 0, 2, 0x604)  # X_PM1a_CNT_BLK
    assert f[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 3, 0x608)  # X_PM_TMR_BLK
    assert f[220:232] == struct.pack("<BBBBQ", 1, 32, 0, 1, 0xAFE0)  # X_GPE0_BLK
    many = build_acpi(9, platform="pc").table("FACP")
    assert struct.unpack_from("<I", many, 112)[0] & (1 << 18)  # cluster model past 8 CPUs, as QEMU
    moved = build_acpi(1, platform="pc", pm_base=0x600, gpe0_base=0x620, sci_irq=10).table("FACP")
    assert struct.unpack_from("<H", moved, 46)[0] == 10 and struct.unpack_from("<III", moved, 76) == (0x608, 0x620, 0)


def test_pc_facs_is_64_byte_aligned_with_a_waking_vector_at_12(pc_tables):
    at = pc_tables.tables["FACS"]
    facs = pc_tables.table("FACS")
    assert at % 64 == 0 and len(facs) == 64 and facs[:4] == b"FACS"
    assert struct.unpack_from("<IIII", facs, 4) == (64, 0, 0, 0)  # length, hw signature, waking vector, lock
    assert facs[32] == 2


def test_pc_dsdt_has_s3_and_s5_packages(pc_tables):
    aml = pc_tables.table("DSDT")[36:]
    assert aml == bytes.fromhex("085f53335f1206040101 0000 085f53355f1206040000 0000".replace(" ", ""))
    assert build_acpi(1).table("DSDT")[36:] == b""  # the reduced DSDT stays empty


def test_pc_madt_has_level_overrides_for_the_sci_and_pci_irqs(pc_tables):
    isos = [struct.unpack("<BBBBIH", e)[2:] for k, e in madt_entries(pc_tables.table("APIC")) if k == 2]
    assert isos == [(0, 0, 2, 0), (0, 5, 5, 0xD), (0, 9, 9, 0xD), (0, 10, 10, 0xD), (0, 11, 11, 0xD)]


def test_mcfg_and_its_place_in_the_xsdt(pc_tables):
    at = pc_tables.tables
    assert sdt_entries(pc_tables.table("XSDT"), 8) == [at["FACP"], at["APIC"], at["MCFG"]]
    assert sdt_entries(pc_tables.table("RSDT"), 4) == [at["FACP"], at["APIC"], at["MCFG"]]
    m = pc_tables.table("MCFG")
    assert len(m) == 60 and m[44:60] == struct.pack("<QHBB4x", ECAM, 0, 0, 255)
    reduced = build_acpi(1, ecam_base=0xB0000000, ecam_buses=(0, 63))
    assert reduced.table("MCFG")[44:60] == struct.pack("<QHBB4x", 0xB0000000, 0, 0, 63)
    assert "MCFG" not in build_acpi(1).tables and "FACS" not in build_acpi(1).tables
    with pytest.raises(ValueError):
        build_acpi(1, ecam_base=0xE0000800)
    with pytest.raises(ValueError, match="platform"):
        build_acpi(1, platform="q35")


def test_pc_tables_checksums_overlap_and_fit(pc_tables):
    for name, gpa in pc_tables.tables.items():
        data = pc_tables.blobs[gpa]
        if name != "FACS":  # the FACS has no checksum
            assert sum(data) % 256 == 0, name
    spans = sorted((gpa, gpa + len(data)) for gpa, data in pc_tables.blobs.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert pc_tables.end <= 0x100000


@needs_iasl
@pytest.mark.parametrize("name", ["FACP", "FACS", "DSDT", "APIC", "MCFG", "XSDT"])
def test_iasl_disassembles_the_pc_tables(pc_tables, tmp_path, name):
    dsl = iasl_disassemble(pc_tables.table(name), tmp_path / f"{name.lower()}.dat")
    if name == "FACP":
        for line in ("PM1A Event Block Address : 00000600", "PM1A Control Block Address : 00000604",
                     "PM Timer Block Address : 00000608", "GPE0 Block Address : 0000AFE0",
                     "SCI Interrupt : 0009", "Hardware Reduced (V5) : 0", "Reset Register Supported (V2) : 1",
                     "Value to cause reset : 06", "Address : 0000000000000CF9"):
            assert line in dsl, line
    if name == "FACS":
        assert "32 Firmware Waking Vector : 00000000" in dsl and "Length : 00000040" in dsl
    if name == "DSDT":
        assert "Name (_S3, Package (0x04)" in dsl and "Name (_S5, Package (0x04)" in dsl
    if name == "MCFG":
        assert "Base Address : 00000000E0000000" in dsl and "End Bus Number : FF" in dsl


@needs_acpiexec
def test_acpiexec_evaluates_the_sleep_packages(pc_tables, tmp_path):
    paths = []
    for name in ("FACP", "DSDT", "APIC", "FACS"):
        path = tmp_path / f"{name.lower()}.dat"
        path.write_bytes(pc_tables.table(name))
        paths.append(str(path))
    for state, typ in (("_S3", "0000000000000001"), ("_S5", "0000000000000000")):
        run = subprocess.run(["acpiexec", "-b", f"evaluate \\{state}", *paths], capture_output=True, text=True,
                             timeout=60, check=False)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "1 ACPI AML tables successfully acquired and loaded" in output, output
        assert "error" not in output.lower() and "warning" not in output.lower(), output
        package = output.split(f"Evaluation of \\{state} returned object")[1]
        assert package.count(f"[Integer] = {typ}") >= 2 and "Contains 4 Elements" in package, output


# ---- virtio-mmio devices in the DSDT (what Linux's virtio_mmio driver matches: LNRO0005) -------

VIRTIO = ((0xD0000000, 0x1000, 5), (0xD0001000, 0x1000, 6), (0xD0002000, 0x1000, 7))


@needs_iasl
def test_iasl_reads_virtio_mmio_devices(tmp_path):
    tables = build_acpi(1, platform="pc", virtio_mmio=VIRTIO)
    dsl = iasl_disassemble(tables.table("DSDT"), tmp_path / "dsdt.dat")
    assert dsl.count('Name (_HID, "LNRO0005")') == 3
    for index, (gpa, size, irq) in enumerate(VIRTIO):
        device = dsl.split(f"Device (VR{index:02X})")[1].split("Device (")[0]
        assert f"0x{gpa:08X},         // Address Base" in device
        assert f"0x{size:08X},         // Address Length" in device
        assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive" in device
        assert f"0x{irq:08X}," in device


@needs_acpiexec
def test_acpiexec_evaluates_a_virtio_device_resources(tmp_path):
    tables = build_acpi(1, platform="pc", virtio_mmio=VIRTIO)
    paths = []
    for name in ("FACP", "DSDT", "APIC", "FACS"):
        path = tmp_path / f"{name.lower()}.dat"
        path.write_bytes(tables.table(name))
        paths.append(str(path))
    run = subprocess.run(["acpiexec", "-b", "evaluate \\_SB.VR02._CRS", *paths], capture_output=True, text=True,
                         timeout=60, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "error" not in output.lower(), output
    dump = output.split("_CRS returned object")[1]
    data = bytes.fromhex("".join(m.group(1) for m in re.finditer(r"^\s*[0-9A-F]{4}: ([0-9A-F ]+?)\s*//", dump, re.M)))
    assert data == (bytes.fromhex("86 09 00 01 00 20 00 D0 00 10 00 00")  # Memory32Fixed (RW) at 0xD0002000
                    + bytes.fromhex("89 06 00 03 01 07 00 00 00")  # Interrupt (consumer, edge), IRQ 7
                    + b"\x79\x00"), output


def test_a_large_dsdt_uses_multi_byte_package_lengths():
    from pykvm.x86.acpi import _pkg_length

    assert _pkg_length(0x3E) == b"\x3f"
    assert _pkg_length(0x3F) == bytes([0x40 | 0x01, 0x04])  # 0x41 total: low nibble 1, then 0x04
    assert _pkg_length(0x1000) == bytes([0x80 | 0x03, 0x00, 0x01])  # 0x1003 total, 2 extra bytes
    tables = build_acpi(1, platform="pc", virtio_mmio=tuple((0xD0000000 + i * 0x1000, 0x1000, 5) for i in range(8)))
    assert tables.table("DSDT").count(b"LNRO0005") == 8
