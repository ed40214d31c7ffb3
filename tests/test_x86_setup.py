"""The x86 set-up, offline: descriptors, stubs, and the identity page tables of every paged mode.

32-bit and PAE paging cannot run on kvm_pvm, so their tables are proved here by walking them the
way the CPU does (SDM Vol. 3A 4.3 and 4.4), with pykvm.model.paging's walker."""

from __future__ import annotations

import struct

import capstone
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm._ffi import ffi
from pykvm.model.paging import LONG4, LONG5, PAE, X86_32, SparseMemory, context_from_sregs, walk
from pykvm.x86 import layout, paging, tables
from pykvm.x86.modes import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, Mode, cpu_mode, \
    setup_sregs, system_tables


def qword(data: bytes) -> int:
    return struct.unpack("<Q", data)[0]


@pytest.mark.parametrize(
    "segment, expected",
    [
        (tables.CODE64, 0x00AF9B000000FFFF),  # the canonical flat 64-bit ring-0 code descriptor
        (tables.DATA, 0x00CF93000000FFFF),
        (tables.CODE32, 0x00CF9B000000FFFF),
        (tables.CODE16, 0x00009B000000FFFF),
        (tables.USER_CODE64, 0x00AFFB000000FFFF),
        (tables.USER_DATA, 0x00CFF3000000FFFF),
    ],
)
def test_segment_descriptors(segment, expected):
    assert qword(segment.descriptor()) == expected


def test_gdt_holds_every_segment_at_its_selector_and_a_16_byte_tss():
    gdt = tables.gdt_bytes()
    assert len(gdt) == 8 * layout.GDT_ENTRIES and gdt[:8] == bytes(8)
    for seg in tables.GDT_SEGMENTS:
        assert gdt[seg.selector : seg.selector + 8] == seg.descriptor()
    low, high = struct.unpack_from("<QQ", gdt, layout.SEL_TSS)
    limit = (low & 0xFFFF) | ((low >> 48) & 0xF) << 16
    base = ((low >> 16) & 0xFFFFFF) | ((low >> 56) & 0xFF) << 24 | high << 32
    assert (base, limit, (low >> 40) & 0xFF) == (layout.TSS, 0x68 + 0x2001 - 1, 0x8B)  # busy 64-bit TSS


def test_tss_io_bitmap_allows_every_port_and_fits_before_the_stubs():
    tss = tables.tss_bytes(long_mode=True)
    io_base = struct.unpack_from("<H", tss, 0x66)[0]
    assert tss[io_base:-1] == bytes(0x2000) and tss[-1] == 0xFF
    assert struct.unpack_from("<Q", tss, 4)[0] == layout.STACK_TOP
    assert layout.TSS + len(tss) <= layout.EXCEPTION_STUBS


@pytest.mark.parametrize("bits, mode", [(16, capstone.CS_MODE_16), (32, capstone.CS_MODE_32), (64, capstone.CS_MODE_64)])
@pytest.mark.parametrize("vector", [0, 6, 13, 14, 255])
def test_stubs_decode_the_same_in_every_code_width(bits, mode, vector):
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    listing = [(i.mnemonic, bytes(i.bytes)) for i in md.disasm(tables.stub_bytes(vector), 0)]
    dummy = [] if vector in tables.ERROR_CODE_VECTORS else [("push", b"\x6a\x00")]  # a 0 error code
    assert listing[: len(dummy) + 4] == dummy + [
        ("push", bytes([0x6A, vector])),  # imm8: sign-extended for vectors >= 0x80, the host masks it
        ("out", bytes([0xE6, layout.EXCEPTION_PORT])),
        ("hlt", b"\xf4"),
        ("jmp", b"\xeb\xfd"),  # back to the hlt
    ]


def test_idt_gates_point_at_the_stubs():
    idt64 = tables.idt_bytes(long_mode=True)
    low, sel, ist, attr, mid, high = struct.unpack_from("<HHBBHI", idt64, 16 * 14)
    assert (sel, ist, attr) == (layout.SEL_CODE64, 0, 0x8E)
    assert low | mid << 16 | high << 32 == layout.EXCEPTION_STUBS + 14 * tables.STUB_SIZE
    idt32 = tables.idt_bytes(long_mode=False)
    low, sel, _, attr, high = struct.unpack_from("<HHBBH", idt32, 8 * 6)
    assert (sel, attr, low | high << 16) == (layout.SEL_CODE32, 0x8E, layout.EXCEPTION_STUBS + 6 * tables.STUB_SIZE)


# ---- page tables: walk them as the CPU does (pykvm.model.paging) ------------------------------------


@pytest.mark.parametrize("mode, la57", [(Mode.PAGED, False), (Mode.PAE, False), (Mode.LONG, False), (Mode.LONG, True)])
@given(gva=st.integers(0, layout.IDENTITY_MAP_SIZE - 1))
def test_paged_modes_identity_map_4gib_writable_from_any_ring(mode, la57, gva):
    sregs = ffi.new("struct kvm_sregs *")
    setup_sregs(sregs, mode, la57)
    context = context_from_sregs(sregs)  # the mode as the CPU reads it from CR0/CR3/CR4/EFER
    memory = SparseMemory(system_tables(mode, la57))
    assert context.fmt is {Mode.PAGED: X86_32, Mode.PAE: PAE, Mode.LONG: LONG5 if la57 else LONG4}[mode]
    w = walk(memory, gva, context, write=True, user=True)
    assert w.ok, w.fault
    assert (w.address, w.permissions.write, w.permissions.user) == (gva, True, True)
    assert w.page_size == (paging.LARGE_4M if mode is Mode.PAGED else paging.LARGE_2M)


def test_tables_do_not_overlap_each_other():
    for mode in Mode:
        spans = sorted((gpa, gpa + len(data)) for gpa, data in system_tables(mode, la57=mode is Mode.LONG).items())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, f"{mode}: tables overlap at {start:#x}"
        assert spans[-1][1] <= min(layout.STACK_TOP - 0x10000, layout.PROTECTED_LOAD)


@pytest.mark.parametrize("mode", list(Mode))
def test_setup_sregs_sets_the_mode_bits(mode):
    sregs = ffi.new("struct kvm_sregs *")
    setup_sregs(sregs, mode)
    assert cpu_mode(sregs) is mode
    expect = {
        Mode.REAL: (0, 0, 0),
        Mode.PROTECTED: (CR0_PE, 0, 0),
        Mode.PAGED: (CR0_PE | CR0_PG, CR4_PSE, 0),
        Mode.PAE: (CR0_PE | CR0_PG, CR4_PAE, 0),
        Mode.LONG: (CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA),
    }[mode]
    assert (sregs.cr0 & (CR0_PE | CR0_PG), sregs.cr4 & (CR4_PSE | CR4_PAE | CR4_LA57), sregs.efer & (EFER_LME | EFER_LMA)) == expect


def test_la57_uses_the_5_level_root():
    sregs = ffi.new("struct kvm_sregs *")
    setup_sregs(sregs, Mode.LONG, la57=True)
    assert sregs.cr3 == layout.PML5 and sregs.cr4 & CR4_LA57


def test_system_tables_are_built_once_and_read_only():
    first = system_tables(Mode.LONG)
    assert system_tables(Mode.LONG) is first  # every machine's set-up shares them
    with pytest.raises(TypeError):
        first[0] = b"x"  # type: ignore[index]
    assert system_tables(Mode.LONG, la57=True) is not first
