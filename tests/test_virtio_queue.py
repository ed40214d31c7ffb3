"""Split virtqueues (pykvm/virtio/queue.py): chains walked from guest memory, every rule checked.

No KVM: the rings live in a bare GuestMemory (tests/virtio_driver.py lays them out).
"""

from __future__ import annotations

import pytest

from pykvm.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC
from pykvm.virtio.queue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
    need_event,
)
from virtio_driver import RAM, Ring, bare_memory, close_memory

SIZE = 8
BASE = 0x1000
BUF = 0x10000
TABLE = 0x8000  # where the tests put indirect tables


@pytest.fixture
def memory():
    m = bare_memory()
    yield m
    close_memory(m)


def make(memory, features=F_RING_INDIRECT_DESC | F_RING_EVENT_IDX, size=SIZE):
    ring = Ring(memory, 0, size, BASE)
    q = Virtqueue(memory, 0, 16)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = size, ring.desc, ring.avail, ring.used
    q.enable(features)
    return ring, q


def test_a_chain_is_walked_into_readable_then_writable_segments(memory):
    ring, q = make(memory)
    ring.offer(ring.chain([(BUF, 16, False), (BUF + 0x100, 512, False), (BUF + 0x400, 513, True)], first=2))
    chain = q.pop()
    assert chain.head == 2
    assert chain.readable == [(BUF, 16), (BUF + 0x100, 512)] and chain.writable == [(BUF + 0x400, 513)]
    assert chain.readable_len == 528 and chain.writable_len == 513
    assert q.pop() is None and q.last_avail == 1


def test_chain_read_and_write_see_the_segments_as_one_stream(memory):
    ring, q = make(memory)
    memory.write(BUF, b"abc")
    memory.write(BUF + 0x100, b"defg")
    ring.offer(ring.chain([(BUF, 3, False), (BUF + 0x100, 4, False), (BUF + 0x200, 2, True), (BUF + 0x300, 3, True)]))
    chain = q.pop()
    assert chain.read() == b"abcdefg" and chain.read(2, 3) == b"cde"
    assert chain.write(1, b"WXYZ") == 4  # 1 byte in the first writable buffer, 3 in the second
    assert memory.read(BUF + 0x200, 2) == b"\0W" and memory.read(BUF + 0x300, 3) == b"XYZ"
    assert chain.write(4, b"too long") == 1  # only what fits
    assert memory.read(BUF + 0x303, 4) == bytes(4)


def test_indirect_descriptors(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 8, DESC_F_NEXT, 1, table=TABLE)
    ring.set_desc(1, BUF + 0x100, 4, DESC_F_WRITE, 0, table=TABLE)
    ring.set_desc(5, TABLE, 32, DESC_F_INDIRECT)
    ring.offer(5)
    chain = q.pop()
    assert chain.head == 5 and chain.readable == [(BUF, 8)] and chain.writable == [(BUF + 0x100, 4)]


def test_used_ring_push_and_wrap_of_the_16_bit_indices(memory):
    ring, q = make(memory, features=0)
    q.last_avail = q.used_idx = 0xFFFF
    ring.set_avail_idx(0xFFFF)
    ring.seen_used = 0xFFFF
    ring.set_desc(0, BUF, 1, DESC_F_WRITE)
    ring.offer(0)
    ring.offer(0)
    for _ in range(2):
        chain = q.pop()
        q.push(chain.head, 1)
    assert ring.avail_idx == 1 and q.last_avail == 1 and ring.used_idx == 1
    assert ring.take_used() == [(0, 1), (0, 1)]


# ---- malformed chains: each a VirtqueueError, nothing written -------------------------------------
def expect_error(q, match):
    with pytest.raises(VirtqueueError, match=match):
        q.pop()


def test_a_loop_in_a_chain(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 4, DESC_F_NEXT, 1)
    ring.set_desc(1, BUF, 4, DESC_F_NEXT, 0)
    ring.offer(0)
    expect_error(q, "loops or is longer than the queue")


def test_a_descriptor_chained_to_itself(memory):
    ring, q = make(memory)
    ring.set_desc(3, BUF, 4, DESC_F_NEXT, 3)
    ring.offer(3)
    expect_error(q, "loops")


def test_a_chain_as_long_as_the_queue_is_fine_one_more_is_not(memory):
    ring, q = make(memory)
    for i in range(SIZE):
        ring.set_desc(i, BUF + i, 1, DESC_F_NEXT if i < SIZE - 1 else 0, i + 1)
    ring.offer(0)
    assert len(q.pop().readable) == SIZE
    ring.set_desc(SIZE - 1, BUF, 1, DESC_F_NEXT, 0)  # the last one now points back: SIZE + 1 and more
    ring.offer(0)
    expect_error(q, "longer than the queue")


def test_a_next_index_out_of_range(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 4, DESC_F_NEXT, SIZE)
    ring.offer(0)
    expect_error(q, "chains to 8, out of range")


def test_a_head_out_of_range(memory):
    ring, q = make(memory)
    ring.offer(SIZE + 3)
    expect_error(q, "names head 11")


def test_an_avail_idx_that_jumps_more_than_the_queue_size(memory):
    ring, q = make(memory)
    ring.set_avail_idx(SIZE + 1)
    expect_error(q, "jumped 9 entries ahead")


def test_an_avail_idx_behind_the_device_is_a_jump_too(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 1)
    ring.offer(0)
    q.pop()
    ring.set_avail_idx(0)  # the driver took an entry back: 0 - 1 = 65535 ahead
    expect_error(q, "jumped 65535")


@pytest.mark.parametrize("addr, length, what", [
    (RAM, 16, "outside guest RAM"),  # just past the end
    (RAM - 8, 16, "outside guest RAM"),  # across the end
    (0xD0000000, 4, "outside guest RAM"),  # MMIO
    ((1 << 64) - 8, 16, "wraps the address space"),
    (BUF, 0xFFFFFFFF, "outside guest RAM"),  # an oversized length
])
def test_buffers_outside_ram(memory, addr, length, what):
    ring, q = make(memory)
    ring.set_desc(0, addr, length, DESC_F_WRITE)
    ring.offer(0)
    expect_error(q, what)


def test_a_readable_descriptor_after_a_writable_one(memory):
    ring, q = make(memory)
    ring.offer(ring.chain([(BUF, 4, True), (BUF + 8, 4, False)]))
    expect_error(q, "follows a writable one")


@pytest.mark.parametrize("length", [0, 24, 16 * SIZE + 16])
def test_an_indirect_table_of_bad_length(memory, length):
    ring, q = make(memory)
    ring.set_desc(0, TABLE, length, DESC_F_INDIRECT)
    ring.offer(0)
    expect_error(q, f"indirect table of {length} bytes")


def test_a_nested_indirect_table(memory):
    ring, q = make(memory)
    ring.set_desc(0, TABLE + 0x100, 16, DESC_F_INDIRECT, table=TABLE)
    ring.set_desc(0, TABLE, 16, DESC_F_INDIRECT)
    ring.offer(0)
    expect_error(q, "points at another one")


def test_an_indirect_table_outside_ram(memory):
    ring, q = make(memory)
    ring.set_desc(0, RAM - 16, 32, DESC_F_INDIRECT)
    ring.offer(0)
    expect_error(q, "indirect descriptor table .* outside guest RAM")


def test_indirect_without_the_feature(memory):
    ring, q = make(memory, features=0)
    ring.set_desc(0, TABLE, 16, DESC_F_INDIRECT)
    ring.offer(0)
    expect_error(q, "was not negotiated")


def test_indirect_with_next(memory):
    ring, q = make(memory)
    ring.set_desc(0, TABLE, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    ring.offer(0)
    expect_error(q, "indirect and has NEXT")


def test_a_loop_and_a_next_out_of_range_inside_an_indirect_table(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 4, DESC_F_NEXT, 1, table=TABLE)
    ring.set_desc(1, BUF, 4, DESC_F_NEXT, 0, table=TABLE)
    ring.set_desc(0, TABLE, 32, DESC_F_INDIRECT)
    ring.offer(0)
    expect_error(q, "longer than its indirect table")
    ring.set_desc(1, BUF, 4, DESC_F_NEXT, 2, table=TABLE)  # a two-entry table: 2 is out of range
    ring.offer(0)
    expect_error(q, "chains to 2, out of range")


# ---- queue set-up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("size", 12, "not a power of two"),
    ("size", 32, "not a power of two in 1-16"),
    ("size", 0, "not a power of two"),
    ("desc_addr", RAM - 64, "descriptor table .* outside guest RAM"),
    ("driver_addr", 0xE0000000, "available ring .* outside guest RAM"),
    ("device_addr", RAM - 8, "used ring .* outside guest RAM"),
    ("device_addr", BASE + 0x402, "not 4-byte aligned"),
    ("desc_addr", BASE + 8, "not 16-byte aligned"),
])
def test_rings_that_do_not_fit_are_refused_at_enable(memory, field, value, match):
    ring = Ring(memory, 0, SIZE, BASE)
    q = Virtqueue(memory, 0, 16)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = SIZE, ring.desc, ring.avail, ring.used
    setattr(q, field, value)
    with pytest.raises(VirtqueueError, match=match):
        q.enable()
    assert not q.ready and q.pop() is None


def test_the_maximum_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Virtqueue(bare_memory(), 0, 100)


# ---- notification suppression -----------------------------------------------------------------------
def test_need_event_is_the_kernels_rule():
    assert need_event(0, 1, 0)  # used_event 0: interrupt when idx passes 0
    assert not need_event(5, 3, 0)  # not yet at 5
    assert need_event(5, 6, 0) and not need_event(5, 7, 6)  # passed at 6, not again at 7
    assert need_event(0xFFFF, 1, 0xFFFE)  # across the wrap


def test_event_idx_used_event_decides_the_interrupt_and_avail_event_is_published(memory):
    ring, q = make(memory)
    ring.set_desc(0, BUF, 1, DESC_F_WRITE)
    ring.set_used_event(1)  # interrupt me once the used idx passes entry 1
    for _ in range(3):
        ring.offer(0)
    decisions = []
    for _ in range(3):
        chain = q.pop()
        q.push(chain.head, 1)
        decisions.append(q.needs_interrupt())
    assert decisions == [False, True, False]
    assert q.pop() is None and ring.avail_event == 3  # told the driver: notify me for entry 3
    assert not q.needs_interrupt()  # nothing new


def test_without_event_idx_the_no_interrupt_flag_decides(memory):
    ring, q = make(memory, features=0)
    ring.set_desc(0, BUF, 1, DESC_F_WRITE)
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    ring.offer(0)
    q.push(q.pop().head, 1)
    assert not q.needs_interrupt()
    ring.set_avail_flags(0)
    ring.offer(0)
    q.push(q.pop().head, 1)
    assert q.needs_interrupt()
    assert q.pop() is None and ring.avail_event == 0  # no event index: the device does not publish one
