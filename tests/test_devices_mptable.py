"""Intel MP 1.4 tables, parsed back the way a kernel's MP-table reader walks them."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from pykvm.x86.mptable import MPTABLE_BASE, build_mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(table):
    memory = {}
    for gpa, data in table.blobs.items():
        for i, b in enumerate(data):
            memory[gpa + i] = b

    def read(gpa, n):
        return bytes(memory[gpa + i] for i in range(n))

    floating = read(table.floating, 16)
    sig, physptr, length, rev, _, f1, f2, f3, f4, f5 = struct.unpack("<4sIBBB5B", floating)
    assert sig == b"_MP_" and length == 1 and rev == 4 and (f1, f2, f3, f4, f5) == (0, 0, 0, 0, 0)
    assert sum(floating) % 256 == 0
    header = read(physptr, 44)
    pcmp, base_len, spec, _, _oem, _product, oem_ptr, oem_size, count, lapic, ext_len, ext_sum = struct.unpack(
        "<4sHBB8s12sIHHIHBx", header
    )
    assert pcmp == b"PCMP" and spec == 4 and (oem_ptr, oem_size, ext_len, ext_sum) == (0, 0, 0, 0)
    base = read(physptr, base_len)
    assert sum(base) % 256 == 0
    entries, off = [], 44
    for _ in range(count):
        kind = base[off]
        entries.append(base[off : off + ENTRY_SIZES[kind]])
        off += ENTRY_SIZES[kind]
    assert off == base_len
    return physptr, lapic, entries


@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_mptable_parses_back_with_checksums_and_counts(ncpus):
    table = build_mptable(ncpus)
    assert table.floating == MPTABLE_BASE and table.floating % 16 == 0
    assert 0xF0000 <= table.floating and table.end <= 0x100000
    physptr, lapic, entries = parse(table)
    assert physptr == table.config and lapic == 0xFEE00000
    assert Counter(e[0] for e in entries) == {0: ncpus, 1: 1, 2: 1, 3: 15, 4: 2}

    cpus = [struct.unpack("<BBBBII8x", e) for e in entries if e[0] == 0]
    assert [(apic, ver, flags) for _, apic, ver, flags, _, _ in cpus] == [
        (i, 0x14, 0x03 if i == 0 else 0x01) for i in range(ncpus)
    ]
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus == b"\x01\x00ISA   "
    (ioapic,) = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapic[1:] == (ncpus, 0x11, 1, 0xFEC00000)

    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    routes = {irq: pin for _, kind, flags, bus_id, irq, dest, pin in ints if kind == 0 and dest == ncpus}
    assert len(routes) == 15
    assert routes[0] == 2 and 2 not in routes  # IRQ0 -> pin 2; the cascade IRQ2 has no entry
    assert all(routes[irq] == irq for irq in range(3, 16)) and routes[1] == 1

    locals_ = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(kind, dest, lint) for _, kind, _, _, _, dest, lint in locals_] == [(3, 0, 0), (1, 0xFF, 1)]


def test_without_the_irq0_override_isa_irqs_map_one_to_one():
    _, _, entries = parse(build_mptable(2, irq0_override=False, ioapic_id=9))
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(irq, dest, pin) for *_, irq, dest, pin in ints] == [(i, 9, i) for i in range(16)]


def test_limits():
    for bad in (dict(ncpus=0), dict(ncpus=255), dict(ncpus=2, ioapic_id=1), dict(ncpus=1, base_gpa=0xF0004)):
        with pytest.raises(ValueError):
            build_mptable(**bad)
    assert parse(build_mptable(254))[2][0][0] == 0
