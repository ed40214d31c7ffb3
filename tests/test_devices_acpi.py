"""ACPI tables: checksums, pointers, the MADT's contents, and what ACPICA's tools make of them.

The iasl / acpiexec checks need Debian's ``acpica-tools`` (``apt-get install acpica-tools``);
they skip with that reason where it is missing.
"""

from __future__ import annotations

import itertools
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


@needs_iasl
@pytest.mark.parametrize("name", ["XSDT", "RSDT", "FACP", "DSDT", "APIC"])
def test_iasl_disassembles_each_table_without_complaint(tables, tmp_path, name):
    # (iasl cannot read a bare RSDP from a file: it wants a 4-character table signature.)
    path = tmp_path / f"{name.lower()}.dat"
    path.write_bytes(tables.table(name))
    run = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    dsl = path.with_suffix(".dsl").read_text()
    for word in COMPLAINTS:
        assert word not in output.lower(), output
        assert word not in dsl.lower(), dsl
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
