"""A virtio driver in Python for the virtio tests: it lays split rings out in guest memory and
drives a :class:`~pykvm.virtio.mmio.VirtioMmio` through its MMIO handler, as a guest would.

No KVM needed: :func:`bare_memory` is a :class:`~pykvm.memory.GuestMemory` with one anonymous
region, and the transport is called with :mod:`pykvm.exits` values.
"""

from __future__ import annotations

import os
import select
import struct

from pykvm import exits
from pykvm.memory import GuestMemory, MemoryRegion
from pykvm.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    F_VERSION_1,
)
from pykvm.virtio import mmio as regs
from pykvm.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

RAM = 1 << 20
GPA = 0xD0000000


def bare_memory(size: int = RAM) -> GuestMemory:
    """Guest memory without a VM: one region of ``size`` bytes at GPA 0."""
    memory = GuestMemory()
    memory.add(MemoryRegion.allocate(0, 0, size))
    return memory


def close_memory(memory: GuestMemory) -> None:
    for region in list(memory):
        memory.remove(region)
        region.close()


def reg_write(t, offset: int, value: int, size: int = 4) -> None:
    t.mmio(exits.MmioWrite(t.gpa + offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")))


def reg_read(t, offset: int, size: int = 4) -> int:
    buf = bytearray(size)
    t.mmio(exits.MmioRead(t.gpa + offset, memoryview(buf)))
    return int.from_bytes(buf, "little")


class Ring:
    """One split queue laid out at ``base``: descriptor table, then available ring, then used ring."""

    def __init__(self, memory: GuestMemory, index: int, size: int, base: int) -> None:
        self.memory, self.index, self.size = memory, index, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.avail_idx = 0
        self.seen_used = 0
        memory.write(base, bytes(self.end - base))

    def program(self, t) -> None:
        """QueueSel, QueueNum, the three addresses, QueueReady (what a driver writes)."""
        reg_write(t, regs.QUEUE_SEL, self.index)
        reg_write(t, regs.QUEUE_NUM, self.size)
        for low, addr in ((regs.QUEUE_DESC_LOW, self.desc), (regs.QUEUE_DRIVER_LOW, self.avail),
                          (regs.QUEUE_DEVICE_LOW, self.used)):
            reg_write(t, low, addr & 0xFFFFFFFF)
            reg_write(t, low + 4, addr >> 32)
        reg_write(t, regs.QUEUE_READY, 1)

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, next))

    def chain(self, buffers, first: int = 0) -> int:
        """Descriptors first, first+1, ... for ``buffers`` of (gpa, length, writable); returns the head."""
        for k, (addr, length, writable) in enumerate(buffers):
            last = k == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.set_desc(first + k, addr, length, flags, first + k + 1)
        return first

    def offer(self, head: int) -> None:
        """Put ``head`` in the available ring and publish the new avail.idx."""
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(self.used + 4 + 8 * (i % self.size), 8))

    def take_used(self) -> list[tuple[int, int]]:
        """The used entries added since the last call."""
        out = []
        while self.seen_used != self.used_idx:
            out.append(self.used_elem(self.seen_used))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def set_avail_flags(self, value: int) -> None:
        self.memory.write_u16(self.avail, value)


def negotiate(t, features: int | None = None) -> int:
    """ACKNOWLEDGE, DRIVER, features (default: all offered), FEATURES_OK; returns the Status read back."""
    reg_write(t, regs.STATUS, STATUS_ACKNOWLEDGE)
    reg_write(t, regs.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    if features is None:
        features = 0
        for sel in (0, 1):
            reg_write(t, regs.DEVICE_FEATURES_SEL, sel)
            features |= reg_read(t, regs.DEVICE_FEATURES) << (32 * sel)
    for sel in (0, 1):
        reg_write(t, regs.DRIVER_FEATURES_SEL, sel)
        reg_write(t, regs.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    reg_write(t, regs.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    return reg_read(t, regs.STATUS)


def start(t, memory: GuestMemory, sizes=None, features: int | None = None, base: int = 0x1000) -> list[Ring]:
    """Negotiate, lay out and program every queue of ``t`` (one page apart from ``base``), DRIVER_OK."""
    status = negotiate(t, features)
    assert status & STATUS_FEATURES_OK, f"FEATURES_OK refused (status {status:#x})"
    rings = []
    for i, max_size in enumerate(t.device.queue_sizes):
        size = (sizes or {}).get(i, max_size)
        ring = Ring(memory, i, size, base)
        base = (ring.end + 0xFFF) & ~0xFFF
        ring.program(t)
        rings.append(ring)
    reg_write(t, regs.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    return rings


def notify(t, index: int) -> None:
    """A trapped notify: the driver's write to QueueNotify, handled by the transport's MMIO handler."""
    reg_write(t, regs.QUEUE_NOTIFY, index)


def kick(t, index: int) -> None:
    """A notify as KVM's ioeventfd delivers it: the queue's eventfd written."""
    os.eventfd_write(t.queue_fds[index], 1)


def wait_interrupt(t, timeout: float = 5.0) -> int:
    """Wait for the transport's interrupt eventfd; returns how many interrupts it counted (0: none)."""
    if not select.select([t.irq_fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(t.irq_fd)


def interrupts(t) -> int:
    """Interrupts signalled since the last call (non-blocking)."""
    try:
        return os.eventfd_read(t.irq_fd)
    except BlockingIOError:
        return 0


FEATURES_DEFAULT = F_VERSION_1


# ---- hostile drivers (the property tests) -------------------------------------------------------------
# Guest memory is split so that what the device may write never holds what it reads: descriptor
# tables and rings from 0x1000, indirect tables at TABLES, readable buffers in READ_AREAS,
# writable ones in WRITE_AREAS (and the used rings). Then the descriptors the device can ever see
# are exactly the generated ones, and so are the buffers it may write: the oracle is exact.
HOSTILE_SIZE = 8
TABLES = 0x8000  # 4 indirect tables of HOSTILE_SIZE entries, 0x200 apart
READ_AREAS = ((0x10000, 0x10000), (0x40000, 0x60000))  # (start, size)
WRITE_AREAS = ((0x20000, 0x10000), (0xA0000, 0x50000))
LENGTHS = (0, 1, 15, 16, 17, 511, 512, 513, 1024, 4096, 0x10000, 0xFFFFFFFF)


def hostile_strategy():
    """A hypothesis strategy: random descriptor tables, indirect tables and available rings, with
    some well-formed requests (header, data, status byte) among them so that the devices get past
    the ring checks often enough to read and write."""
    from hypothesis import strategies as st

    length = st.one_of(st.sampled_from(LENGTHS), st.integers(0, 0xFFFFFFFF))
    flags = st.sampled_from([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7])  # NEXT and WRITE more often than INDIRECT
    place = st.tuples(st.sampled_from(["pool", "pool", "pool", "edge", "outside", "huge", "used", "table", "desc"]),
                      st.integers(0, 1), st.integers(0, 0xFFFF))
    desc = st.tuples(place, length, flags, st.integers(0, HOSTILE_SIZE + 1))
    table = st.lists(desc, min_size=HOSTILE_SIZE, max_size=HOSTILE_SIZE)
    sector = st.one_of(st.integers(0, 56), st.integers(0, 56), st.integers(0, 70), st.just((1 << 64) - 1),
                       st.integers(0, (1 << 64) - 1))
    request = st.tuples(st.integers(0, HOSTILE_SIZE - 3), st.sampled_from([0, 0, 1, 1, 1, 4, 8, 11, 11, 99]), sector,
                        st.sampled_from([0, 16, 100, 512, 512, 1024, 4096, 4096]), st.integers(0, 70), st.integers(0, 0xFFF))
    queue = st.fixed_dictionaries({
        "descs": table,
        "indirect": st.lists(table, min_size=4, max_size=4),
        "requests": st.lists(request, min_size=1, max_size=2),
        "avail_idx": st.one_of(st.integers(1, 3), st.integers(0, HOSTILE_SIZE + 1), st.integers(0, 0xFFFF)),
        "heads": st.lists(st.integers(0, HOSTILE_SIZE + 1), min_size=HOSTILE_SIZE, max_size=HOSTILE_SIZE),
        "used_event": st.integers(0, 0xFFFF),
        "avail_flags": st.integers(0, 1),
    })
    return st.fixed_dictionaries({
        "queues": st.lists(queue, min_size=2, max_size=2),
        "seed": st.integers(0, 1 << 32),
        "features": st.sampled_from([None, None, F_VERSION_1, F_VERSION_1 | (1 << 28), F_VERSION_1 | (1 << 29)]),
    })


def _address(place, flags, ring, writable) -> int:
    """Where a generated descriptor points. Indirect tables lie only where the device never writes
    (the tables area, the queue's own descriptor table) or outside RAM; buffers in the areas of
    their direction, at the end of RAM, outside it, or (writable ones) on the used ring."""
    where, area, offset = place
    if flags & DESC_F_INDIRECT:
        if where in ("pool", "used", "table"):
            return TABLES + 0x200 * (offset % 4)
        if where == "desc":
            return ring.desc
    elif where in ("pool", "table", "desc") or (where == "used" and not writable):
        start, size = (WRITE_AREAS if writable else READ_AREAS)[area]
        return start + offset % size
    if where == "edge":  # across (or just inside) the end of RAM; readable ones a page lower
        return RAM - 1 - offset % 64 - (0 if writable else 0x1000)
    if where == "outside":
        return RAM + offset
    if where == "huge":
        return (1 << 64) - 1 - offset
    return ring.used


def lay_out_hostile(memory, t, case) -> list[tuple[int, int]]:
    """Write a generated case into guest memory and start the device on it. Returns the ranges
    the device may write: every WRITE descriptor's buffer the driver laid out, and the used rings."""
    import random

    rng = random.Random(case["seed"])
    for base, size in READ_AREAS:
        memory.write(base, rng.randbytes(size))
    n = len(t.device.queue_sizes)
    rings = start(t, memory, sizes={i: HOSTILE_SIZE for i in range(n)}, features=case["features"])
    allowed = []
    for ring, q in zip(rings, case["queues"]):
        allowed.append((ring.used, 6 + 8 * ring.size))
        tables = [(None, q["descs"])] + [(TABLES + 0x200 * k, table) for k, table in enumerate(q["indirect"])]
        for base, descs in tables:
            for i, (place, length, flags, nxt) in enumerate(descs):
                writable = bool(flags & DESC_F_WRITE) and not flags & DESC_F_INDIRECT
                addr = _address(place, flags, ring, writable)
                ring.set_desc(i, addr, length, flags, nxt, table=base)
                if writable:
                    allowed.append((addr, length))
        for k, (pos, kind, sector, size, count, offset) in enumerate(q["requests"]):
            # a well-formed request at descriptors pos..pos+2: header, data, status byte
            header = READ_AREAS[0][0] + 0x40 * (offset % 0x400)
            memory.write(header, struct.pack("<IIQ", kind, 0, sector))
            data_out = kind in (1, 11)
            data = (READ_AREAS[1][0] if data_out else WRITE_AREAS[1][0]) + 0x40 * offset
            if kind == 11:  # discard segments
                memory.write(data, struct.pack("<QII", sector, count, 0) * (size // 16))
            status = WRITE_AREAS[0][0] + 0x10 * offset
            ring.set_desc(pos, header, 16, DESC_F_NEXT, pos + 1)
            ring.set_desc(pos + 1, data, size, DESC_F_NEXT | (0 if data_out else DESC_F_WRITE), pos + 2)
            ring.set_desc(pos + 2, status, 1, DESC_F_WRITE)
            allowed += [(status, 1)] + ([] if data_out else [(data, size)])
            memory.write_u16(ring.avail + 4 + 2 * k, pos)
        for k, head in enumerate(q["heads"][len(q["requests"]):], start=len(q["requests"])):
            memory.write_u16(ring.avail + 4 + 2 * k, head)
        ring.set_used_event(q["used_event"])
        ring.set_avail_flags(q["avail_flags"])
        ring.set_avail_idx(q["avail_idx"])
    return allowed


def changed_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """Addresses where ``after`` differs from ``before`` outside every allowed (start, length) range."""
    bad = []
    for page in range(0, len(before), 4096):
        if before[page : page + 4096] == after[page : page + 4096]:
            continue
        for a in range(page, page + 4096):
            if before[a] != after[a] and not any(s <= a < s + n for s, n in allowed):
                bad.append(a)
    return bad


def readable_streams(memory, rings) -> list[bytes]:
    """For every possible head of every queue, the readable bytes of its chain, walked generously
    (no rule checked but bounds): a superset of what the device can have read as a request."""
    streams = []
    for ring in rings:
        for head in range(ring.size):
            stream, table, entries, index, nested = b"", ring.desc, ring.size, head, False
            for _ in range(4 * ring.size):
                addr, length, flags, nxt = struct.unpack("<QIHH", memory.read(table + 16 * index, 16))
                if flags & 4 and not nested and 16 <= length <= 16 * ring.size and memory.region_at(addr):
                    table, entries, index, nested = addr, length // 16, 0, True
                    continue
                if length and not flags & DESC_F_WRITE:
                    if memory.region_at(addr) is None or memory.region_at(addr + length - 1) is None:
                        break
                    stream += memory.read(addr, length)
                if not flags & DESC_F_NEXT or nxt >= entries:
                    break
                index = nxt
            streams.append(stream)
    return streams


def hostile_rings(memory, t) -> list[Ring]:
    """The Ring objects of a started transport (to read back what lay_out_hostile laid out)."""
    out = []
    for q in t.queues:
        ring = Ring.__new__(Ring)
        ring.memory, ring.index, ring.size = memory, q.index, q.size
        ring.desc, ring.avail, ring.used = q.desc_addr, q.driver_addr, q.device_addr
        out.append(ring)
    return out


def drive_hostile(t) -> None:
    """Notify every queue, trapped and through the eventfd, as a hostile driver would."""
    for i in range(len(t.queues)):
        notify(t, i)
        kick(t, i)
    t.process_pending()
    reg_write(t, regs.STATUS, 0)  # and reset it under the device
