"""pykvm.model.paging: encodings, builders against walkers, the 2-D walk and its reference counts,
faults with their exit information, and the walker against KVM_TRANSLATE on real guests.

Sources of the numbers asserted here:
* entry and EPTP encodings: Intel SDM Vol. 3A Tables 4-4..4-20 and Vol. 3C 25.6.11 / Tables
  29-1..29-6, cross-checked with Linux arch/x86/include/asm/vmx.h (VMX_EPT_*, VMX_EPTP_*) and
  pykvm.x86.paging's own identity tables;
* #PF error codes: SDM Vol. 3A 4.7 (Linux PFERR_*); EPT-violation exit qualification: SDM Vol. 3C
  Table 28-7 (Linux EPT_VIOLATION_*: 0x181 is the familiar "read of an unmapped final gPA");
  #NPF EXITINFO1 bits 32/33: APM Vol. 2 15.25.6 (Linux PFERR_GUEST_FINAL_BIT / _PAGE_BIT);
* 24 references for a 4-level guest under 4-level nested tables: Bhargava et al., "Accelerating
  two-dimensional page walks for virtualized systems", ASPLOS 2008 (also quoted by Stojkovic et
  al., ASPLOS 2022: "up to twenty-four sequential memory accesses"); 35 for 5 under 5: the same
  (n+1)(m+1)-1 count, the figure cited from Intel's 5-level paging white paper (its text was not
  available to check here). The cache reductions follow Bhargava et al.'s structures (page-walk
  cache, nested TLB, nested page-walk cache).

This host's KVM (kvm_pvm) refuses CR0.PG outside long mode and offers no LA57, so 32-bit, PAE and
5-level walks are proved offline (against pykvm.x86.paging's tables and the builders); where a KVM
runs them, the live tests below do too.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm._ffi import ffi
from pykvm.ioctl import KvmUnsupportedError
from pykvm.model.paging import (
    EPT4, EPT5, EPT_MEMORY_TYPES, EQ_EXECUTABLE, EQ_FETCH, EQ_FINAL, EQ_GLA_VALID, EQ_READ, EQ_READABLE,
    EQ_USER_EXECUTABLE, EQ_WRITABLE, EQ_WRITE, LONG4, LONG5, NPF_FINAL, NPF_GUEST_PAGE, PAE, PF_ID, PF_P, PF_RSVD,
    PF_U, PF_W, PS, SIZE_1G, SIZE_2M, SIZE_4K, SIZE_4M, UC, WB, WC, WT, X86_32, XD, A, D, EPT_A, EPT_D, Ept,
    EptEntry, EptMisconfig, Eptp, EptViolation, Extent, FrameAllocator, GeneralProtection, GuestMemoryAdapter,
    GuestPhysicalView, NestedPageFault, Npt, PageFault, PagingContext, Permissions, SparseMemory, TableBuilder,
    TableError, WalkCaches, X86Entry, build_tables, check_tables, coalesce, context_from_sregs,
    effective_memory_type, extents_from_slots, guest_cpu_features, mappings, translate_gpa, walk, walk_live, walk_reference_count,
)
from pykvm.x86 import layout, paging as x86_paging
from pykvm.x86.modes import Mode, setup_sregs, system_tables

GUEST_FORMATS = (X86_32, PAE, LONG4, LONG5)
WALK_LEVELS = {X86_32: 2, PAE: 2, LONG4: 4, LONG5: 5}  # PAE's PDPTEs are registers: 2 levels from memory


# =================================================================================================
# Encodings, hand-checked against the manuals
# =================================================================================================


def test_a_2mib_pde_matches_pykvm_x86_identity_tables():
    # SDM Table 4-17: P | R/W | U/S | PS with the 2 MiB frame in bits 51:21.
    value = X86Entry(SIZE_2M, write=True, user=True, large=True).encode(LONG4, 2)
    assert value == 0x200087 == SIZE_2M | x86_paging.PS | x86_paging.PRW_USER
    assert X86Entry.decode(value, LONG4, 2) == X86Entry(SIZE_2M, write=True, user=True, large=True)


def test_a_4mib_pde_puts_pse36_address_bits_39_32_in_bits_20_13():
    # SDM Table 4-4: bits 31:22 = address 31:22, bits 20:13 = address 39:32.
    value = X86Entry(0x1_0040_0000, write=True, large=True).encode(X86_32, 2)
    assert value == 0x0040_2083
    assert X86Entry.decode(value, X86_32, 2).address == 0x1_0040_0000
    with pytest.raises(ValueError, match="PSE-36"):
        X86Entry(1 << 40, large=True).encode(X86_32, 2)
    with pytest.raises(ValueError, match="no execute-disable"):
        X86Entry(0x1000, xd=True).encode(X86_32, 1)


def test_pat_bit_moves_from_7_in_a_pte_to_12_in_a_large_page():
    assert X86Entry(0x5000, write=True, pat=True, global_=True, xd=True).encode(LONG4, 1) == 0x8000_0000_0000_5183
    assert X86Entry(SIZE_1G, pat=True, large=True).encode(LONG4, 3) == 0x4000_1081
    assert X86Entry(0x5000, pwt=True, pcd=True, pat=True).pat_index == 7


def test_a_pae_pdpte_may_set_only_p_pwt_pcd():
    assert X86Entry(0x23000, pwt=True).encode(PAE, 3) == 0x23009
    with pytest.raises(ValueError, match="PAE PDPTE may set only P, PWT and PCD, not write, user"):
        X86Entry(0x23000, write=True, user=True).encode(PAE, 3)


def test_ept_entries_have_the_sdm_and_linux_bit_positions():
    # VMX_EPT_{READABLE,WRITABLE,EXECUTABLE}_MASK 1/2/4, memory type << 3, IPAT bit 6, large bit 7,
    # A bit 8, D bit 9, user-executable bit 10, suppress-#VE bit 63.
    assert EptEntry(0x1000, read=True, write=True, execute=True, memory_type=WB).encode() == 0x1037
    assert EptEntry(0x1000, read=True, write=True, execute=True, memory_type=WB, ignore_pat=True).encode() == 0x1077
    assert EptEntry(SIZE_1G, read=True, write=True, execute=True, memory_type=WB, large=True).encode(3) == 0x4000_00B7
    assert EptEntry(0x2000, read=True, accessed=True, dirty=True, user_execute=True, suppress_ve=True,
                    memory_type=UC).encode() == 0x8000_0000_0000_2701
    assert EptEntry(0x3000, read=True, write=True, execute=True).encode(4) == 0x3007  # non-leaf: no memory type
    with pytest.raises(ValueError, match="bits 6:3 of a non-leaf EPT PML4E are reserved"):
        EptEntry(0x3000, read=True, memory_type=WB).encode(4)
    with pytest.raises(ValueError, match="memory type 2 .* is reserved"):
        EptEntry(0x1000, read=True, memory_type=2).encode()


def test_eptp_encodes_walk_length_memory_type_and_ad():
    # Linux: VMX_EPTP_MT_WB 6, VMX_EPTP_PWL_4 (3 << 3), VMX_EPTP_AD_ENABLE_BIT (1 << 6): root | 0x5e.
    assert Eptp(0x5000, 4, WB, ad=True).encode() == 0x505E
    assert Eptp(0x5000, 4, WB).encode() == 0x501E
    assert Eptp(0x5000, 5, UC).encode() == 0x5020
    assert Eptp.decode(0x505E) == Eptp(0x5000, 4, WB, ad=True)
    with pytest.raises(ValueError, match=r"bits 2:0 \(memory type\) = 1"):
        Eptp.decode(0x5019)
    with pytest.raises(ValueError, match=r"bits 5:3 \(page-walk length - 1\) = 2"):
        Eptp.decode(0x5016)
    with pytest.raises(ValueError, match="reserved bit 8"):
        Eptp.decode(0x511E)
    with pytest.raises(ValueError, match="reserved bits 51:48"):
        Eptp.decode(0x000F_0000_0000_501E, maxphyaddr=48)


def test_fault_bit_constants_match_the_kernels():
    assert (PF_P, PF_W, PF_U, PF_RSVD, PF_ID) == (1, 2, 4, 8, 16)  # PFERR_{PRESENT,WRITE,USER,RSVD,FETCH}_MASK
    assert (EQ_READ, EQ_WRITE, EQ_FETCH, EQ_READABLE, EQ_WRITABLE, EQ_EXECUTABLE, EQ_USER_EXECUTABLE, EQ_GLA_VALID,
            EQ_FINAL) == tuple(1 << b for b in range(9))  # EPT_VIOLATION_* bits 0..8
    assert (NPF_FINAL, NPF_GUEST_PAGE) == (1 << 32, 1 << 33)  # PFERR_GUEST_FINAL_BIT 32, PFERR_GUEST_PAGE_BIT 33


# =================================================================================================
# Builders and walkers agree (hypothesis)
# =================================================================================================


def _x86_perms(e: Extent) -> Permissions:
    return Permissions(read=True, write=e.write, execute=e.execute, user=e.user)


def _ept_perms(e: Extent) -> Permissions:
    return Permissions(read=e.read, write=e.write, execute=e.execute, user=False, user_execute=e.user_execute)


@st.composite
def extent_lists(draw, fmt, pa_limit=None):
    """Up to five non-overlapping extents, each in its own arena: 4 KiB runs, runs of middle pages
    (2 or 4 MiB), runs straddling a middle-page boundary (mixed sizes), and 1 GiB pages."""
    sizes = fmt.page_sizes
    mid = sizes[-2]
    arena = SIZE_1G if len(sizes) == 3 else 256 << 20
    arenas = min(512, (1 << fmt.address_bits) // arena)
    high_half = not fmt.ept and fmt.address_bits > 32
    if pa_limit is None:
        pa_limit = 1 << 32 if fmt is X86_32 else 1 << 40
    kinds = ["small", "large", "mixed"] + (["huge"] if len(sizes) == 3 and pa_limit >= 4 * SIZE_1G else [])
    count = draw(st.integers(1, 5))
    out = []
    for slot in draw(st.lists(st.integers(0, arenas - 1), min_size=count, max_size=count, unique=True)):
        base = slot * arena
        if high_half and slot >= arenas // 2:
            base = (1 << 64) - (arenas - slot) * arena
        kind = draw(st.sampled_from(kinds))
        if kind == "small":
            size = draw(st.integers(1, 20)) * SIZE_4K
            offset = draw(st.integers(0, (arena - size) // SIZE_4K)) * SIZE_4K
            align = SIZE_4K
        elif kind == "large":
            k = draw(st.integers(1, 2))
            size, offset, align = k * mid, draw(st.integers(0, arena // mid - k)) * mid, mid
        elif kind == "mixed":
            before, after = draw(st.integers(0, 3)), draw(st.integers(1, 3))
            offset = draw(st.integers(1, arena // mid - 2)) * mid - before * SIZE_4K
            size, align = (before + after) * SIZE_4K + mid, mid
        else:
            size, offset, align = SIZE_1G, 0, SIZE_1G
        top = (pa_limit - size - offset % align) // align
        if top < 0:  # the run does not fit below pa_limit: a short 4 KiB run instead
            size, offset, align = SIZE_4K, offset - offset % SIZE_4K, SIZE_4K
            top = (pa_limit - size) // align
        pa = draw(st.integers(0, top)) * align + (offset % align)
        if fmt.ept:
            r, w, x = draw(st.sampled_from([(1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1), (0, 0, 1)]))
            perms = dict(read=bool(r), write=bool(w), execute=bool(x), memory_type=draw(st.sampled_from(EPT_MEMORY_TYPES)),
                         ignore_pat=draw(st.booleans()))
        else:
            perms = dict(write=draw(st.booleans()), user=draw(st.booleans()),
                         execute=True if fmt is X86_32 else draw(st.booleans()), global_=draw(st.booleans()),
                         pat_index=draw(st.integers(0, 7)))
        out.append(Extent(base + offset, pa, size, **perms))
    return out


def _merge(extents, perms):
    return coalesce_expected(sorted(extents, key=lambda e: e.va), perms)


def coalesce_expected(extents, perms):
    out = []
    for e in extents:
        p = perms(e)
        if out and out[-1][0] + out[-1][2] == e.va and out[-1][1] + out[-1][2] == e.pa and out[-1][3] == p:
            out[-1][2] += e.size
        else:
            out.append([e.va, e.pa, e.size, p])
    return [tuple(x) for x in out]


def _paging(builder: TableBuilder):
    return Ept(builder.eptp()) if builder.fmt.ept else builder.context()


def _translate(builder: TableBuilder, address: int, e: Extent | None = None):
    if builder.fmt.ept:
        fetch = e is not None and not e.read
        return translate_gpa(builder.memory, address, Ept(builder.eptp()), fetch=fetch)
    return walk(builder.memory, address, builder.context())


@pytest.mark.parametrize("fmt", [X86_32, PAE, LONG4, LONG5, EPT4, EPT5], ids=str)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_builder_and_walker_agree_on_random_maps(fmt, data):
    extents = data.draw(extent_lists(fmt))
    builder = build_tables(fmt, extents)
    perms = _ept_perms if fmt.ept else _x86_perms
    for e in extents:
        for offset in {0, e.size - 1, data.draw(st.integers(0, e.size - 1))}:
            w = _translate(builder, e.va + offset, e)
            assert w.ok, w.fault
            assert w.address == e.pa + offset
            if fmt.ept:
                assert w.nested_permissions == perms(e) and w.memory_type == e.memory_type
            else:
                assert w.permissions == perms(e) and w.pat_index == e.pat_index
    top = 1 << fmt.address_bits
    probe = data.draw(st.integers(0, top - 1))
    if not fmt.ept and fmt.address_bits > 32 and probe >= top // 2:
        probe |= (1 << 64) - top  # the canonical high half
    if not any(e.va <= probe < e.va + e.size for e in extents):
        w = _translate(builder, probe)
        if fmt.ept:
            assert isinstance(w.fault, EptViolation) and w.fault.exit_qualification & 0x38 == 0
        else:
            assert isinstance(w.fault, PageFault) and not w.fault.error_code & PF_P
    assert coalesce(mappings(builder.memory, _paging(builder))) == _merge(extents, perms)


def test_the_builder_picks_the_largest_page_each_piece_allows():
    b = build_tables(LONG4, [Extent(SIZE_2M - 2 * SIZE_4K, SIZE_2M - 2 * SIZE_4K, SIZE_1G + SIZE_2M + 4 * SIZE_4K),
                             Extent(0x80_0000_0000, SIZE_1G, SIZE_1G)])
    sizes = [m.size for m in mappings(b.memory, b.context())]
    assert sizes == [SIZE_4K] * 2 + [SIZE_2M] * 513 + [SIZE_4K] * 2 + [SIZE_1G]
    b = build_tables(LONG4, [Extent(0, 0, SIZE_1G)], page_sizes=[SIZE_4K, SIZE_2M])
    assert {m.size for m in mappings(b.memory, b.context())} == {SIZE_2M}
    b = build_tables(X86_32, [Extent(0, 0, 2 * SIZE_4M)])
    assert [m.size for m in mappings(b.memory, b.context())] == [SIZE_4M, SIZE_4M]


def test_extents_from_memory_slots_build_an_ept_for_a_vm():
    class Slot:  # a pykvm MemoryRegion has these attributes
        def __init__(self, gpa, size, readonly=False):
            self.gpa, self.size, self.readonly = gpa, size, readonly

    slots = [Slot(0, 4 << 20), Slot(layout.TEST_ROM, SIZE_4K, readonly=True)]
    b = build_tables(EPT4, extents_from_slots(slots, hpa=lambda s: 0x7_0000_0000 + s.gpa))
    ept = Ept(b.eptp())
    assert translate_gpa(b.memory, 0x1234, ept).address == 0x7_0000_1234
    rom = translate_gpa(b.memory, layout.TEST_ROM, ept, write=True)
    assert isinstance(rom.fault, EptViolation) and rom.fault.exit_qualification == EQ_WRITE | EQ_READABLE | EQ_EXECUTABLE
    assert isinstance(translate_gpa(b.memory, layout.TEST_ROM + SIZE_4K, ept).fault, EptViolation)  # a hole


# =================================================================================================
# Bad input: clear errors naming the bad field
# =================================================================================================


@pytest.mark.parametrize(
    "fmt, extent, message",
    [
        (LONG4, Extent(0x1001, 0, SIZE_4K), "va=0x1001 .*: va is not a non-negative multiple of 4 KiB"),
        (LONG4, Extent(0x1000, 0x10, SIZE_4K), "pa is not a non-negative multiple of 4 KiB"),
        (LONG4, Extent(0x1000, 0, 0x800), "size is not a non-negative multiple of 4 KiB"),
        (LONG4, Extent(0x1000, 0, 0), "size is 0"),
        (LONG4, Extent(0x8000_0000_0000, 0, SIZE_4K), "not canonical for 4-level"),
        (LONG4, Extent(0x7FFF_FFFF_F000, 0, 2 * SIZE_4K), "not canonical"),
        (X86_32, Extent(0xFFFF_F000, 0, 2 * SIZE_4K), "beyond the 32-bit space"),
        (LONG4, Extent(0, 1 << 48, SIZE_4K), "beyond MAXPHYADDR"),
        (X86_32, Extent(0, 0, SIZE_4K, execute=False), "needs the XD bit"),
        (LONG4, Extent(0, 0, SIZE_4K, pat_index=8), "pat_index 8"),
        (EPT4, Extent(0, 0, SIZE_4K, read=False, write=True), "write without read is an EPT misconfiguration"),
        (EPT4, Extent(0, 0, SIZE_4K, read=False, write=False, execute=False), "grants no access"),
        (EPT4, Extent(0, 0, SIZE_4K, memory_type=2), "memory_type 2 is reserved"),
    ],
)
def test_bad_extents_are_refused_naming_the_field(fmt, extent, message):
    with pytest.raises(ValueError, match=message):
        build_tables(fmt, [extent], maxphyaddr=48)


def test_overlapping_extents_name_both():
    b = build_tables(LONG4, [Extent(0x10000, 0, 4 * SIZE_4K)])
    with pytest.raises(ValueError, match=r"extent va=0x12000 pa=0x0 size=0x1000 overlaps extent va=0x10000"):
        b.map(Extent(0x12000, 0, SIZE_4K))


def test_a_full_table_space_and_page_sizes_that_cannot_fit_are_errors():
    memory = SparseMemory()
    with pytest.raises(ValueError, match="table space 0x0-0x2000 is full"):
        TableBuilder(LONG4, memory, FrameAllocator(memory, 0, 2 * SIZE_4K)).map(Extent(0, 0, SIZE_4K))
    with pytest.raises(ValueError, match="no allowed page size"):
        build_tables(LONG4, [Extent(0, SIZE_4K, SIZE_2M)], page_sizes=[SIZE_2M])
    with pytest.raises(ValueError, match="pages are"):
        TableBuilder(PAE, page_sizes=[SIZE_1G])


def _long4_with(entries: dict[int, int]) -> tuple[SparseMemory, PagingContext]:
    """A PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x5000 for va 0, then
    ``entries`` ({address: value}) written over it."""
    memory = SparseMemory()
    for table, value in ((0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x4000, 0x5003)):
        memory.write_u64(table, value)
    for address, value in entries.items():
        memory.write_u64(address, value)
    return memory, PagingContext(LONG4, 0x1000, maxphyaddr=48)


@pytest.mark.parametrize(
    "entries, context, message",
    [
        ({0x1000: 0x2003 | PS}, {}, r"PML4E\[0\] at 0x1000 = 0x2083.*: bit 7 set; bit 7 \(PS\) of a PML4E is reserved"),
        ({0x4000: 0x5003 | 1 << 50}, {}, r"PTE\[0\] .*: bit 50 set; bits 51:48 \(above MAXPHYADDR\) are reserved"),
        ({0x4000: 0x5003 | XD}, {"nxe": False}, r"bit 63 set; bit 63 \(XD\) is reserved with EFER.NXE = 0"),
        ({0x3000: 0x20_0083 | 1 << 13}, {}, r"PDE\[0\] .*: bit 13 set; bits 20:13 of a 2 MiB PDE are reserved"),
        ({0x2000: 0x4000_0083}, {"gbpages": False}, r"1 GiB pages not offered \(CPUID 0x80000001 EDX\[26\] = 0\)"),
        ({0x2000: 0x4000_0083 | 1 << 20}, {}, r"bits 29:13 of a 1 GiB PDPTE are reserved"),
    ],
)
def test_reserved_bits_fault_with_rsvd_and_name_the_field(entries, context, message):
    memory, _ = _long4_with(entries)
    ctx = PagingContext(LONG4, 0x1000, maxphyaddr=48, **context)
    w = walk(memory, 0x0, ctx, write=True)
    assert isinstance(w.fault, PageFault)
    assert w.fault.error_code == PF_P | PF_W | PF_RSVD
    assert w.fault.address == 0
    assert re.search(message, w.fault.reason), w.fault.reason
    with pytest.raises(TableError, match=message):
        check_tables(memory, ctx)


def test_pae_pdptes_with_reserved_bits_are_a_gp_on_cr3_load():
    tables = system_tables(Mode.PAE)
    memory = SparseMemory(tables)
    memory.write_u64(layout.PDPT + 8, layout.PD + 0x1000 | x86_paging.P | x86_paging.RW)  # R/W is reserved in a PAE PDPTE
    w = walk(memory, 0x1234, PagingContext(PAE, layout.PDPT))
    assert isinstance(w.fault, GeneralProtection)
    assert "PDPTE[1]" in w.fault.reason and "bits 2:1 and 8:5 of a PAE PDPTE are reserved" in w.fault.reason


def test_a_non_canonical_address_is_a_gp_unless_asked_to_index_it_like_kvm():
    memory, ctx = _long4_with({})
    w = walk(memory, 0x00FF_0000_0000_0123, ctx)
    assert isinstance(w.fault, GeneralProtection) and "not canonical" in w.fault.reason
    assert walk(memory, 0x00FF_0000_0000_0123, ctx, check_canonical=False).address == 0x5123
    with pytest.raises(ValueError, match="does not fit PAE paging's 32 bits"):
        walk(memory, 1 << 32, PagingContext(PAE, 0x1000))
    with pytest.raises(ValueError, match="not both write and fetch"):
        walk(memory, 0, ctx, write=True, fetch=True)


@pytest.mark.parametrize(
    "value, level, message",
    [
        (0x2002, 4, "write-only"),
        (0x2004 | 0x80, 4, r"bit 7 set: bits 7:3 of an EPT PML4E are reserved"),
        (0x5000 | 7 | 2 << 3, 1, r"bits 5:3 \(memory type\) = 2: reserved"),
        (0x3000 | 7 | 7 << 3, 3, r"bits 5:3 set: bits 6:3 of a non-leaf EPT PDPTE are reserved"),
        (0x4000_0000 | 0x80 | 7 | 6 << 3 | 1 << 12, 3, r"bit 12 set: bits 29:12 of a 1 GiB EPT PDPTE are reserved"),
    ],
)
def test_ept_misconfigurations_name_the_entry_and_field(value, level, message):
    memory = SparseMemory()
    chain = {4: 0x1000, 3: 0x2000, 2: 0x3000, 1: 0x4000}
    for lv, table in chain.items():  # PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> 0x5000
        memory.write_u64(table, (table + 0x1000) | 7 | (6 << 3 if lv == 1 else 0))
    memory.write_u64(chain[level], value)
    ept = Ept(Eptp(0x1000).encode(), execute_only=True)
    w = translate_gpa(memory, 0x0, ept)
    assert isinstance(w.fault, EptMisconfig) and w.fault.level == level and w.fault.gpa == 0
    assert re.search(message, w.fault.reason), w.fault.reason
    with pytest.raises(TableError, match=message):
        check_tables(memory, ept)


def test_execute_only_ept_needs_the_capability():
    b = build_tables(EPT4, [Extent(0, 0x10000, SIZE_4K, read=False, write=False, execute=True)])
    assert translate_gpa(b.memory, 0x10, Ept(b.eptp()), fetch=True).address == 0x10010
    w = translate_gpa(b.memory, 0x10, Ept(b.eptp(), execute_only=False), fetch=True)
    assert isinstance(w.fault, EptMisconfig) and "execute-only" in w.fault.reason


# =================================================================================================
# Guest access rights and error codes (SDM Vol. 3A 4.6, 4.7)
# =================================================================================================


def _one_page(**perms) -> tuple[TableBuilder, int]:
    va = 0x4000_0000
    return build_tables(LONG4, [Extent(va, 0x9000, SIZE_4K, **perms)]), va


@pytest.mark.parametrize(
    "perms, access, context, error_code",
    [
        ({}, {}, {}, None),
        ({"write": False}, {"write": True, "user": True}, {}, PF_P | PF_W | PF_U),  # 0x7
        ({"write": False}, {"write": True}, {}, PF_P | PF_W),  # CR0.WP = 1
        ({"write": False}, {"write": True}, {"wp": False}, None),  # CR0.WP = 0: supervisor writes go through
        ({"user": False}, {"user": True}, {}, PF_P | PF_U),
        ({"execute": False}, {"fetch": True, "user": True}, {}, PF_P | PF_U | PF_ID),  # 0x15
        ({"execute": False}, {"fetch": True}, {}, PF_P | PF_ID),
        ({}, {"fetch": True}, {"smep": True}, PF_P | PF_ID),
        ({}, {}, {"smap": True}, PF_P),
        ({"user": False}, {"fetch": True}, {"smep": True}, None),
    ],
)
def test_access_rights_and_error_codes(perms, access, context, error_code):
    b, va = _one_page(**perms)
    w = walk(b.memory, va + 0x10, b.context(**context), **access)
    if error_code is None:
        assert w.ok and w.address == 0x9010
    else:
        assert isinstance(w.fault, PageFault) and w.fault.error_code == error_code and w.fault.address == va + 0x10


def test_a_not_present_supervisor_read_has_error_code_0():
    b, va = _one_page()
    w = walk(b.memory, va + SIZE_4K, b.context())
    assert isinstance(w.fault, PageFault) and w.fault.error_code == 0 and "PTE[1]" in w.fault.reason


def test_accessed_and_dirty_updates():
    b, va = _one_page()
    read = walk(b.memory, va, b.context(), set_ad=True)
    assert len(read.updates) == 4 and all(new == old | A for _, old, new in read.updates)
    again = walk(b.memory, va, b.context(), set_ad=True)
    assert again.updates == ()
    wrote = walk(b.memory, va, b.context(), write=True, set_ad=True)
    assert wrote.updates == ((wrote.references[-1].address, again.references[-1].value, again.references[-1].value | D),)


def test_memory_type_from_pat_and_ept():
    b = build_tables(LONG4, [Extent(0, 0x10000, SIZE_4K, pat_index=1), Extent(SIZE_4K, 0x20000, SIZE_4K, pat_index=3)])
    assert walk(b.memory, 0, b.context()).memory_type == WT  # DEFAULT_PAT entry 1
    assert walk(b.memory, SIZE_4K, b.context()).memory_type == UC  # DEFAULT_PAT entry 3
    assert effective_memory_type(WB, False, WT) == WT
    assert effective_memory_type(WB, False, 7) == UC  # UC- under WB
    assert effective_memory_type(WT, True, WB) == WT  # ignore PAT
    assert effective_memory_type(UC, False, WC) == WC
    assert effective_memory_type(WT, False, WB) is None  # not modelled: said, not guessed


# =================================================================================================
# The 2-D walk: reference counts, caches, faults
# =================================================================================================

GUEST_RAM = 8 << 20  # guest-physical [0, 8 MiB), nested-mapped to host-physical HPA_BASE
HPA_BASE = 0x2_0000_0000
GUEST_TABLES = 0x400000  # guest page tables live in guest RAM here
DATA_GPA = 0x200000
GUEST_VA = {X86_32: 0x4000_0000, PAE: 0x4000_0000, LONG4: 0x7F00_0000_0000, LONG5: 0x00FF_0000_0000_0000}
NESTED_KINDS = ("ept4", "ept5", "npt4", "npt5")
NESTED_LEVELS = {"ept4": 4, "ept5": 5, "npt4": 4, "npt5": 5}


def two_d(guest_fmt, nested_kind, *, guest_sizes=(SIZE_4K,), nested_sizes=(SIZE_4K,), ad=False, mbec=False,
          data=None, ram=None):
    """Host memory with nested tables mapping guest RAM, and guest tables (built in guest-physical
    memory through the nested tables) mapping GUEST_VA[guest_fmt] -> DATA_GPA (16 pages)."""
    host = SparseMemory()
    levels = NESTED_LEVELS[nested_kind]
    ram = ram or [Extent(0, HPA_BASE, GUEST_RAM, user_execute=mbec)]
    if nested_kind.startswith("ept"):
        nb = TableBuilder(EPT5 if levels == 5 else EPT4, host, FrameAllocator(host, 0x1000_0000, 1 << 20),
                          page_sizes=nested_sizes, mbec=mbec)
        nb.map_all(ram)
        nested = Ept(nb.eptp(ad=ad), mbec=mbec)
    else:
        nb = TableBuilder(LONG5 if levels == 5 else LONG4, host, FrameAllocator(host, 0x1000_0000, 1 << 20),
                          page_sizes=nested_sizes)
        nb.map_all(ram)
        nested = Npt(nb.root, levels)
    view = GuestPhysicalView(host, nested)
    gb = TableBuilder(guest_fmt, view, FrameAllocator(view, GUEST_TABLES, 1 << 20),
                      page_sizes=[s for s in guest_sizes if s in guest_fmt.page_sizes] or [SIZE_4K])
    gb.map_all(data or [Extent(GUEST_VA[guest_fmt], DATA_GPA, 16 * SIZE_4K)])
    return host, nested, gb.context(), gb, nb


def test_walk_reference_count_formula():
    assert walk_reference_count(4, 4) == 24  # Bhargava et al., ASPLOS 2008
    assert walk_reference_count(5, 5) == 35  # 5-level guest under 5-level EPT/NPT
    assert walk_reference_count(4, None) == 4 and walk_reference_count(5) == 5  # native 1-D walks
    assert walk_reference_count(4, 5) == walk_reference_count(5, 4) == 29  # symmetric in n and m
    assert walk_reference_count(2, 4) == 14  # a 32-bit or PAE guest under 4-level EPT
    assert walk_reference_count(0, 4) == 4  # an unpaged guest: one nested walk per access
    for bad in ((6, 4), (4, 0), (-1, None), (4.0, 4), (True, 4)):
        with pytest.raises(ValueError, match="levels must be an int"):
            walk_reference_count(*bad)


@pytest.mark.parametrize("nested_kind", NESTED_KINDS)
@pytest.mark.parametrize("guest_fmt", GUEST_FORMATS, ids=str)
def test_uncached_2d_walks_make_n_plus_1_times_m_plus_1_minus_1_references(guest_fmt, nested_kind):
    host, nested, ctx, _, _ = two_d(guest_fmt, nested_kind)
    w = walk(host, GUEST_VA[guest_fmt] + 0x1234, ctx, nested)
    assert w.ok and w.gpa == DATA_GPA + 0x1234 and w.address == HPA_BASE + DATA_GPA + 0x1234
    n, m = WALK_LEVELS[guest_fmt], NESTED_LEVELS[nested_kind]
    assert w.reference_count == walk_reference_count(n, m)
    # The 2-D grid: for each guest level, m nested references then the guest entry; then m for the data.
    expected = []
    for step in list(range(n, 0, -1)) + [0]:
        expected += [("nested", level, step) for level in range(m, 0, -1)]
        if step:
            expected.append(("guest", step, step))
    assert [(r.dimension, r.level, r.step) for r in w.references] == expected
    native = walk(GuestPhysicalView(host, nested), GUEST_VA[guest_fmt] + 0x1234, ctx)
    assert native.reference_count == walk_reference_count(n) and native.address == w.gpa


def test_24_and_35_the_published_figures():
    host, nested, ctx, _, _ = two_d(LONG4, "ept4")
    assert walk(host, GUEST_VA[LONG4], ctx, nested).reference_count == 24
    host, nested, ctx, _, _ = two_d(LONG5, "ept5")
    assert walk(host, GUEST_VA[LONG5], ctx, nested).reference_count == 35


def test_large_pages_shorten_both_dimensions():
    host, nested, ctx, _, _ = two_d(LONG4, "ept4", guest_sizes=(SIZE_2M, SIZE_4K), nested_sizes=(SIZE_2M, SIZE_4K),
                                    data=[Extent(GUEST_VA[LONG4], DATA_GPA, SIZE_2M)])
    w = walk(host, GUEST_VA[LONG4] + 0x12345, ctx, nested)
    assert (w.page_size, w.nested_page_size) == (SIZE_2M, SIZE_2M)
    assert w.reference_count == walk_reference_count(3, 3) == 15


@pytest.mark.parametrize("guest_fmt, nested_kind", [(LONG4, "ept4"), (LONG5, "ept5"), (LONG4, "npt4")])
def test_page_walk_caches_cut_the_2d_walk(guest_fmt, nested_kind):
    host, nested, ctx, _, _ = two_d(guest_fmt, nested_kind)
    va = GUEST_VA[guest_fmt] + 0x1234
    n, m = guest_fmt.levels, NESTED_LEVELS[nested_kind]
    full = walk_reference_count(n, m)

    def warm(caches, address=va):
        walk(host, va, ctx, nested, caches=caches)
        return walk(host, address, ctx, nested, caches=caches)

    # A nested TLB alone removes every nested reference: the 1-D cost (Bhargava et al.'s NTLB).
    assert warm(WalkCaches(pwc=False, nested_pwc=False)).reference_count == walk_reference_count(n)
    # A guest page-walk cache alone leaves one guest level: (1+1)(m+1)-1.
    assert warm(WalkCaches(ntlb=False, nested_pwc=False)).reference_count == walk_reference_count(1, m)
    # A nested page-walk cache alone: each nested walk reads only its leaf entry.
    assert warm(WalkCaches(pwc=False, ntlb=False)).reference_count == walk_reference_count(n, 1)
    # Everything but the leaf cached: one reference, the guest PTE, as a native walk with a PWC.
    caches = WalkCaches()
    first = walk(host, va, ctx, nested, caches=caches)
    assert first.ok and first.reference_count < full
    again = walk(host, va, ctx, nested, caches=caches)
    assert again.reference_count == 1 and [r.dimension for r in again.references] == ["guest"]
    assert again.address == first.address
    # Another data page under the same guest PT: the PTE, plus the data gPA's nested leaf.
    other = walk(host, va + SIZE_4K, ctx, nested, caches=caches)
    assert other.reference_count == 2 and other.address == first.address + SIZE_4K
    assert caches.hits["pwc"] and caches.hits["ntlb"] and caches.hits["nested_pwc"]
    caches.flush()
    assert walk(host, va, ctx, nested, caches=caches).reference_count == first.reference_count


@pytest.mark.parametrize("guest_fmt", GUEST_FORMATS, ids=str)
@pytest.mark.parametrize("nested_kind", NESTED_KINDS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_2d_walks_compose_the_guest_walk_and_the_nested_translation(guest_fmt, nested_kind, data):
    # Guest RAM in four 2 MiB chunks at random host addresses (some 2 MiB-aligned, some not).
    ram = [Extent(i * SIZE_2M, HPA_BASE + data.draw(st.integers(0, 4096)) * SIZE_2M + data.draw(st.sampled_from([0, 0x3000])),
                  SIZE_2M) for i in range(4)]
    extents = data.draw(extent_lists(guest_fmt, pa_limit=GUEST_TABLES))
    extents = [e for e in extents if e.pa + e.size <= GUEST_TABLES][:3] or [Extent(GUEST_VA[guest_fmt], DATA_GPA, SIZE_4K)]
    host, nested, ctx, _, _ = two_d(guest_fmt, nested_kind, guest_sizes=guest_fmt.page_sizes,
                                    nested_sizes=(SIZE_2M, SIZE_4K), data=extents, ram=ram)
    view = GuestPhysicalView(host, nested)
    for e in extents:
        va = e.va + data.draw(st.integers(0, e.size - 1))
        w = walk(host, va, ctx, nested)
        one_d = walk(view, va, ctx)
        final = translate_gpa(host, one_d.address, nested)
        assert w.ok and w.gpa == one_d.address == e.pa + (va - e.va) and w.address == final.address
        assert w.permissions == _x86_perms(e) and w.nested_permissions == final.nested_permissions
        cost = sum(translate_gpa(host, r.gpa, nested).reference_count + 1 for r in one_d.references)
        assert w.reference_count == cost + final.reference_count


# ---- faults in two dimensions ---------------------------------------------------------------------


def _unmap_nested(host, nested, gpa):
    """Clear the nested leaf that maps ``gpa``."""
    leaf = translate_gpa(host, gpa, nested).references[-1]
    host.write_u64(leaf.address, 0)
    return leaf


def test_a_guest_pf_is_not_an_ept_violation():
    host, nested, ctx, _, _ = two_d(LONG4, "ept4")
    w = walk(host, GUEST_VA[LONG4] + 16 * SIZE_4K, ctx, nested, write=True, user=True)
    assert isinstance(w.fault, PageFault) and w.fault.error_code == PF_W | PF_U and w.fault.level == 1
    assert w.reference_count == 4 * 5  # four guest levels read, each after its nested walk


@pytest.mark.parametrize("ad, qualification", [(False, 0x81), (True, 0x83)])
def test_an_ept_violation_on_a_guest_page_table_access(ad, qualification):
    host, nested, ctx, _, _ = two_d(LONG4, "ept4", ad=ad)
    va = GUEST_VA[LONG4] + 0x10
    pte_gpa = walk(GuestPhysicalView(host, nested), va, ctx).references[-1].gpa
    _unmap_nested(host, nested, pte_gpa)
    w = walk(host, va, ctx, nested)
    assert isinstance(w.fault, EptViolation)
    # read (and, with EPT A/D, write: guest paging-structure accesses count as writes) | GLA valid; not final
    assert w.fault.exit_qualification == qualification
    assert (w.fault.gpa, w.fault.gla) == (pte_gpa, va)


@pytest.mark.parametrize(
    "access, extent, qualification",
    [
        ({}, None, 0x181),  # read of an unmapped final gPA: the familiar KVM trace value
        ({"write": True}, Extent(DATA_GPA, HPA_BASE + DATA_GPA, SIZE_4K, write=False), 0x1AA),
        ({"fetch": True}, Extent(DATA_GPA, HPA_BASE + DATA_GPA, SIZE_4K, execute=False), 0x19C),
    ],
)
def test_an_ept_violation_on_the_final_translation(access, extent, qualification):
    ram = [Extent(0, HPA_BASE, DATA_GPA), Extent(DATA_GPA + SIZE_4K, HPA_BASE + DATA_GPA + SIZE_4K,
                                                 GUEST_RAM - DATA_GPA - SIZE_4K)] + ([extent] if extent else [])
    host, nested, ctx, _, _ = two_d(LONG4, "ept4", ram=ram)
    w = walk(host, GUEST_VA[LONG4] + 0x10, ctx, nested, **access)
    assert isinstance(w.fault, EptViolation)
    assert w.fault.exit_qualification == qualification
    assert w.fault.exit_qualification & (EQ_GLA_VALID | EQ_FINAL) == EQ_GLA_VALID | EQ_FINAL
    assert w.fault.gpa == DATA_GPA + 0x10 and w.fault.gla == GUEST_VA[LONG4] + 0x10


def test_mode_based_execute_control_checks_xu_for_user_mode_addresses():
    # With MBEC, X (bit 2) governs fetches from supervisor-mode linear addresses and XU (bit 10)
    # those from user-mode ones (U/S = 1 at every guest level), whatever the CPL.
    a, b = DATA_GPA, DATA_GPA + SIZE_4K
    ram = [Extent(0, HPA_BASE, a, user_execute=True),
           Extent(a, HPA_BASE + a, SIZE_4K, execute=True, user_execute=False),
           Extent(b, HPA_BASE + b, SIZE_4K, execute=False, user_execute=True),
           Extent(b + SIZE_4K, HPA_BASE + b + SIZE_4K, GUEST_RAM - b - SIZE_4K, user_execute=True)]
    va = GUEST_VA[LONG4]
    kernel = va + 0x10000
    host, nested, ctx, _, _ = two_d(LONG4, "ept4", mbec=True, ram=ram,
                                    data=[Extent(va, a, 2 * SIZE_4K, user=True), Extent(kernel, a, 2 * SIZE_4K, user=False)])
    assert walk(host, kernel, ctx, nested, fetch=True).ok  # supervisor address, X = 1
    assert walk(host, va + SIZE_4K, ctx, nested, fetch=True, user=True).ok  # user address, XU = 1
    w = walk(host, va, ctx, nested, fetch=True)  # user address, XU = 0: even at CPL0
    assert isinstance(w.fault, EptViolation)
    assert w.fault.exit_qualification == EQ_FETCH | EQ_READABLE | EQ_WRITABLE | EQ_EXECUTABLE | EQ_GLA_VALID | EQ_FINAL
    w = walk(host, kernel + SIZE_4K, ctx, nested, fetch=True)  # supervisor address, X = 0
    assert isinstance(w.fault, EptViolation)
    assert w.fault.exit_qualification == (EQ_FETCH | EQ_READABLE | EQ_WRITABLE | EQ_USER_EXECUTABLE | EQ_GLA_VALID
                                          | EQ_FINAL)
    assert walk(host, kernel + SIZE_4K, ctx, nested).ok  # reads need only R


def test_an_ept_misconfiguration_in_two_dimensions():
    host, nested, ctx, _, _ = two_d(LONG4, "ept4")
    leaf = translate_gpa(host, DATA_GPA, nested).references[-1]
    host.write_u64(leaf.address, leaf.value & ~(7 << 3) | 3 << 3)  # memory type 3: reserved
    w = walk(host, GUEST_VA[LONG4], ctx, nested)
    assert isinstance(w.fault, EptMisconfig) and w.fault.gpa == DATA_GPA and "memory type" in w.fault.reason


@pytest.mark.parametrize("final, exitinfo1", [(False, NPF_GUEST_PAGE | PF_U), (True, NPF_FINAL | PF_U | PF_W | PF_P)])
def test_a_nested_page_fault_reports_exitinfo1_and_2(final, exitinfo1):
    if final:
        data = 16 * SIZE_4K
        ram = [Extent(0, HPA_BASE, DATA_GPA), Extent(DATA_GPA, HPA_BASE + DATA_GPA, data, write=False),
               Extent(DATA_GPA + data, HPA_BASE + DATA_GPA + data, GUEST_RAM - DATA_GPA - data)]
    else:
        ram = None
    host, nested, ctx, _, _ = two_d(LONG4, "npt4", ram=ram)
    va = GUEST_VA[LONG4] + 0x10
    gpa = DATA_GPA + 0x10
    if not final:
        gpa = walk(GuestPhysicalView(host, nested), va, ctx).references[1].gpa  # the PDPTE
        _unmap_nested(host, nested, gpa)
    w = walk(host, va, ctx, nested, write=final)
    assert isinstance(w.fault, NestedPageFault)
    assert (w.fault.exitinfo1, w.fault.exitinfo2) == (exitinfo1, gpa)


def test_ept_accessed_and_dirty_flags():
    host, nested, ctx, _, _ = two_d(LONG4, "ept4", ad=True)
    va = GUEST_VA[LONG4]
    pt_gpa = walk(GuestPhysicalView(host, nested), va, ctx).references[-1].gpa
    assert walk(host, va, ctx, nested, write=True).updates == ()  # nothing written unless asked
    w = walk(host, va, ctx, nested, write=True, set_ad=True)
    assert w.ok and w.updates
    data_leaf = translate_gpa(host, DATA_GPA, nested).references[-1].value
    pt_leaf = translate_gpa(host, pt_gpa, nested).references[-1].value
    assert data_leaf & EPT_A and data_leaf & EPT_D  # a data write
    assert pt_leaf & EPT_A and pt_leaf & EPT_D  # guest paging-structure accesses count as writes with EPT A/D
    guest_leaf = walk(GuestPhysicalView(host, nested), va, ctx).references[-1].value
    assert guest_leaf & A and guest_leaf & D


# =================================================================================================
# pykvm.x86.paging's identity tables, offline (every paged mode, including those kvm_pvm refuses)
# =================================================================================================


@pytest.mark.parametrize("mode, la57", [(Mode.PAGED, False), (Mode.PAE, False), (Mode.LONG, False), (Mode.LONG, True)])
def test_the_setup_tables_identity_map_4gib_in_one_run(mode, la57):
    memory = SparseMemory(system_tables(mode, la57))
    sregs = ffi.new("struct kvm_sregs *")
    setup_sregs(sregs, mode, la57)
    context = context_from_sregs(sregs)
    assert context.fmt == {Mode.PAGED: X86_32, Mode.PAE: PAE, Mode.LONG: LONG5 if la57 else LONG4}[mode]
    everything = Permissions(read=True, write=True, execute=True, user=True)
    assert coalesce(mappings(memory, context)) == [(0, 0, layout.IDENTITY_MAP_SIZE, everything)]
    page = SIZE_4M if mode is Mode.PAGED else SIZE_2M
    assert {m.size for m in mappings(memory, context)} == {page}


def test_our_builders_reproduce_pykvm_x86_identity_tables_byte_for_byte():
    # pykvm.x86.paging uses 2 MiB pages in long mode (not every guest CPUID offers 1 GiB pages).
    for mode, fmt in ((Mode.PAGED, X86_32), (Mode.PAE, PAE), (Mode.LONG, LONG4)):
        sizes = [s for s in fmt.page_sizes if s != SIZE_1G]
        ours = build_tables(fmt, [Extent(0, 0, layout.IDENTITY_MAP_SIZE)], page_sizes=sizes)
        theirs = SparseMemory(system_tables(mode))
        sregs = ffi.new("struct kvm_sregs *")
        setup_sregs(sregs, mode)
        assert list(mappings(ours.memory, ours.context())) == list(mappings(theirs, context_from_sregs(sregs)))


# =================================================================================================
# Real guests: the walker against KVM_TRANSLATE
# =================================================================================================

ADDRESSES = st.one_of(
    st.integers(0, layout.IDENTITY_MAP_SIZE - 1),  # the identity map
    st.integers(layout.IDENTITY_MAP_SIZE, (1 << 47) - 1),  # unmapped low half
    st.integers((1 << 64) - (1 << 47), (1 << 64) - 1),  # unmapped high half
)


@pytest.fixture(scope="module")
def long_machine(guest):
    """A long-mode guest (pykvm's identity tables, not yet run): only tests marked kvm use it."""
    from pykvm.machine import Machine

    with Machine() as m:
        m.load_flat(guest("hello_long"), "long")
        yield m


def assert_agrees_with_kvm(machine, gva, check_canonical=True):
    w = walk_live(machine.vcpu, machine.memory, gva, check_canonical=check_canonical)
    tr = machine.vcpu.translate(gva)
    # KVM_TRANSLATE does a supervisor read and always reports writeable=1, usermode=0: only
    # valid and physical_address carry information.
    assert bool(tr.valid) == w.ok, (hex(gva), w.fault)
    if w.ok:
        assert tr.physical_address == w.address, hex(gva)
    else:
        assert isinstance(w.fault, PageFault) and not w.fault.error_code & PF_W
    return w


@pytest.mark.kvm
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gva=ADDRESSES)
def test_walker_agrees_with_kvm_translate_on_the_long_mode_identity_map(long_machine, gva):
    w = assert_agrees_with_kvm(long_machine, gva)
    assert w.ok == (gva < layout.IDENTITY_MAP_SIZE)


@pytest.mark.kvm
def test_walker_and_kvm_on_non_canonical_addresses(long_machine):
    gva = 0x00FF_0000_0000_1000  # KVM_TRANSLATE does not check canonical form: it indexes the low bits
    assert isinstance(walk_live(long_machine.vcpu, long_machine.memory, gva).fault, GeneralProtection)
    assert assert_agrees_with_kvm(long_machine, gva, check_canonical=False).address == 0x1000


@pytest.mark.kvm
def test_our_own_tables_under_the_real_kvm_mmu(guest):
    """Tables from the builder, loaded into a long-mode guest's RAM with CR3 pointed at them:
    KVM_TRANSLATE agrees with the walker on every extent, on holes, on a 1 GiB page this guest's
    CPUID does not offer and on reserved bits; then the guest runs to DONE on them."""
    from pykvm.machine import Machine

    with Machine() as m:
        m.load_flat(guest("hello_long"), "long")
        memory = GuestMemoryAdapter(m.memory)
        b = TableBuilder(LONG4, memory, FrameAllocator(memory, 0x300000, 0x100000))
        extents = [
            Extent(0, 0, 4 << 20),  # identity over RAM: the guest keeps running (2 MiB pages)
            Extent(0xFFFF_8000_0000_0000, 0, 4 << 20, write=False),  # a high-half alias
            Extent(0x7F00_0000_1000, 0x5000, 3 * SIZE_4K, user=False, execute=False),  # 4 KiB pages
            Extent(0x1234_5600_0000, 0x3_0000_0000, SIZE_2M + 5 * SIZE_4K, pat_index=3),  # beyond RAM: still translates
            Extent(0x40_0000_0000, SIZE_1G, SIZE_1G),  # a 1 GiB page
        ]
        b.map_all(extents)
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = b.root
        m.vcpu.set_sregs(sregs)
        assert m.vcpu.get_sregs().cr3 == b.root

        def compare_all():
            for e in extents:
                for offset in (0, 0x123, e.size // 2, e.size - 1, e.size):
                    assert_agrees_with_kvm(m, e.va + offset)
            for gva in (0x7F00_0000_0000, 0x1234_5640_5000, 0xFFFF_FFFF_FFFF_F000, 0x8000_0000):
                assert_agrees_with_kvm(m, gva)

        compare_all()
        w = walk_live(m.vcpu, m.memory, 0x7F00_0000_2ABC)
        assert w.address == 0x6ABC and not w.permissions.user and not w.permissions.execute
        huge = walk_live(m.vcpu, m.memory, 0x40_0000_0000)
        if not huge.ok:  # CPUID 0x80000001 EDX[26] clear: PS in a PDPTE is reserved, and KVM agrees (above)
            assert huge.fault.error_code & PF_RSVD and "1 GiB" in huge.fault.reason

        # Reserved bits, one entry at a time, restored after each check (MAXPHYADDR from the guest's CPUID).
        pte = w.references[-1].address
        maxphyaddr = guest_cpu_features(m.vcpu)[0]
        for target, bit, gva in ((pte, 1 << 51, 0x7F00_0000_2ABC), (pte, 1 << maxphyaddr, 0x7F00_0000_2ABC),
                                 (pte, 1 << (maxphyaddr - 1), 0x7F00_0000_2ABC), (b.root, PS, 0x1000)):
            original = memory.read_u64(target)
            memory.write_u64(target, original | bit)
            fault = assert_agrees_with_kvm(m, gva).fault
            assert bool(fault is not None and fault.error_code & PF_RSVD) == (bit != 1 << (maxphyaddr - 1))
            memory.write_u64(target, original)

        # KVM_TRANSLATE walks like the CPU: it sets the accessed bit of an entry it uses.
        fresh = walk_live(m.vcpu, m.memory, 0x1234_5620_1000)
        assert not fresh.references[-1].value & A
        m.vcpu.translate(0x1234_5620_1000)
        assert [memory.read_u64(r.address) for r in fresh.references] == [r.value | A for r in fresh.references]

        outcome = m.run(timeout=10)
        assert outcome.ok and m.console_output == b"Hello from long mode\n"
        compare_all()


@pytest.mark.kvm
@pytest.mark.parametrize("mode, name", [(Mode.PAGED, "hello_paged"), (Mode.PAE, "hello_pae")])
def test_walker_agrees_with_kvm_in_32bit_and_pae_paging(guest, mode, name):
    from pykvm.machine import Machine

    with Machine() as m:
        try:
            m.load_flat(guest(name), mode)
        except KvmUnsupportedError as e:
            pytest.skip(f"{e}: {mode.value} walks are checked offline instead "
                        "(test_the_setup_tables_identity_map_4gib_in_one_run, test_builder_and_walker_agree_on_random_maps)")
        for gva in (0, 0x1234, layout.PROTECTED_LOAD, 0x7FFF_FFFF, 0xD000_0000, 0xFFFF_FFFF):
            assert assert_agrees_with_kvm(m, gva).ok


@pytest.mark.kvm
def test_walker_agrees_with_kvm_in_5_level_paging(guest):
    from pykvm.machine import Machine
    from pykvm.x86.cpuid import has_la57

    with Machine() as m:
        if not has_la57(m.supported_cpuid):
            pytest.skip("this host's KVM offers no LA57: 5-level walks are checked offline instead "
                        "(test_the_setup_tables_identity_map_4gib_in_one_run, test_builder_and_walker_agree_on_random_maps)")
        try:
            m.load_flat(guest("hello_long"), "long", la57=True)
        except KvmUnsupportedError as e:  # offered in CPUID, refused by the backend (kvm_pvm on Intel)
            pytest.skip(f"{e}: 5-level walks are checked offline instead "
                        "(test_the_setup_tables_identity_map_4gib_in_one_run, test_builder_and_walker_agree_on_random_maps)")
        for gva in (0, 0x1234, layout.PROTECTED_LOAD, 0xFFFF_FFFF, 1 << 32, 1 << 48, (1 << 64) - 4096):
            assert_agrees_with_kvm(m, gva)
