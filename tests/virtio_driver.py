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
from pykvm.virtio.queue import DESC_F_NEXT, DESC_F_WRITE

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
