"""Guest memory from Python: GPA lookup across slots, and bounds that never let an access leave a region."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.memory import GuestMemory, GuestMemoryError, MemoryRegion

PAGE = 0x1000


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add(MemoryRegion.allocate(0, 0, 4 * PAGE))
    mem.add(MemoryRegion.allocate(1, 0x10000, PAGE, readonly=True))
    yield mem
    for region in list(mem):
        region.close()


def test_reads_and_writes_by_gpa(memory):
    memory.write(0x10, b"hello")
    memory.write_u64(0x10000, 0x1122334455667788)
    assert memory.read(0x10, 5) == b"hello"
    assert memory.read_u32(0x10004) == 0x11223344
    assert memory.region_at(0x10FFF).slot == 1 and memory.region_at(0x4000) is None
    memory.write(0x100, b"ab\0cd")
    assert memory.read_cstring(0x100) == b"ab"


@pytest.mark.parametrize(
    "gpa, size, message",
    [
        (4 * PAGE - 2, 4, r"gpa range 0x3ffe-0x4002 is outside slot 0 \(0x0-0x4000\)"),
        (0x4000, 1, "gpa 0x4000 is not backed by guest memory"),
        (0x10FFF, 2, "outside slot 1"),
        (-1, 1, "gpa -0x1 is not backed"),
    ],
)
def test_accesses_past_a_region_raise(memory, gpa, size, message):
    with pytest.raises(GuestMemoryError, match=message):
        memory.write(gpa, b"x" * size)
    with pytest.raises(GuestMemoryError, match=message):
        memory.read(gpa, size)


@given(gpa=st.integers(-(1 << 20), 1 << 20), size=st.integers(0, 3 * PAGE))
def test_no_access_leaves_its_region(gpa, size):
    region = MemoryRegion.allocate(0, 2 * PAGE, 2 * PAGE)
    try:
        inside = region.contains(gpa, size)
        try:
            view = region.view(gpa, size)
        except GuestMemoryError:
            assert not inside
        else:
            assert inside and len(view) == size
            view.release()
    finally:
        region.close()


def test_a_closed_region_refuses_access():
    region = MemoryRegion.allocate(0, 0, PAGE)
    region.close()
    region.close()
    with pytest.raises(GuestMemoryError, match="slot 0 is closed"):
        region.view(0, 1)


@pytest.mark.parametrize("gpa, size", [(0x1001, PAGE), (0, 0), (0, PAGE + 1), (1 << 52, PAGE)])
def test_bad_regions_are_refused(gpa, size):
    with pytest.raises(ValueError):
        MemoryRegion.allocate(0, gpa, size)


def test_overlaps_and_slot_reuse_are_refused(memory):
    with pytest.raises(ValueError, match="overlaps slot 0"):
        memory.check_free(5, 0x3000, 2 * PAGE)
    with pytest.raises(ValueError, match="slot 1 is already in use"):
        memory.check_free(1, 0x20000, PAGE)
    assert memory.free_slot() == 2
