"""Split virtqueues (virtio-v1.2 §2.7) in guest memory, read as a device must read them: warily.

A queue of ``size`` entries (a power of two) has three parts the driver places in guest RAM:

- the descriptor table (``size`` x 16 bytes, 16-aligned): ``le64 addr, le32 len, le16 flags,
  le16 next``; flags NEXT (chain on at ``next``), WRITE (device-writable), INDIRECT (``addr``
  points at a table of ``len / 16`` descriptors);
- the available ring (driver area, 2-aligned): ``le16 flags, le16 idx, le16 ring[size],
  le16 used_event``;
- the used ring (device area, 4-aligned): ``le16 flags, le16 idx, {le32 id, le32 len}[size],
  le16 avail_event``.

:meth:`Virtqueue.pop` takes the next available chain and walks it into a :class:`Chain` of
(gpa, length) segments, readable ones first. Every address and length is checked against guest
RAM, and anything a well-behaved driver cannot produce is a :class:`VirtqueueError`: a head or
``next`` index out of range, a loop or a chain longer than the queue, an indirect table of bad
length, inside another one, or not negotiated, a readable descriptor after a writable one, an
``avail.idx`` more than ``size`` ahead of the device, rings outside RAM. The device turns that into
an error status or DEVICE_NEEDS_RESET; nothing here writes outside the ranges it checked.

With VIRTIO_F_RING_EVENT_IDX the device publishes ``avail_event`` (notify me when you pass this
entry) each time it finds the ring empty, and interrupts only when the driver's ``used_event``
lies among the entries added since the last interrupt (:func:`need_event`, the kernel's
``vring_need_event``); without it the driver's ``VRING_AVAIL_F_NO_INTERRUPT`` flag decides.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ..memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.7: the largest split queue

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

_fence_lock = threading.Lock()


def full_barrier() -> None:
    """A store-load fence between the device's ring writes and its next ring read (§2.7.7,
    the mb() in the kernel's virtqueue code): an uncontended lock is a locked read-modify-write on
    x86, which orders every earlier store before every later load."""
    with _fence_lock:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` passes ``event`` (the kernel's
    ``vring_need_event``; all 16-bit, wrapping)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class VirtqueueError(Exception):
    """A driver broke the virtqueue rules (the guest's error: the device reports it to the guest)."""


@dataclass
class Chain:
    """One descriptor chain taken from the available ring: the driver's buffers for one request.

    ``readable`` and ``writable`` are lists of (gpa, length) segments, each already checked to lie
    in guest RAM; the device reads the readable bytes as one stream and writes the writable ones as
    another (virtio 1.x lets the driver split them anywhere)."""

    head: int
    memory: GuestMemory
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    @staticmethod
    def _slice(segments: list[tuple[int, int]], offset: int, size: int) -> list[tuple[int, int]]:
        """The (gpa, length) pieces of bytes [offset, offset + size) of the segments' stream."""
        pieces = []
        for gpa, n in segments:
            if size <= 0:
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, size)
            pieces.append((gpa + offset, take))
            size -= take
            offset = 0
        return pieces

    def read_views(self, offset: int, size: int) -> list[memoryview]:
        """Views of readable bytes [offset, offset + size) (fewer bytes where the stream is shorter)."""
        return [self.memory.view(gpa, n) for gpa, n in self._slice(self.readable, offset, size)]

    def write_views(self, offset: int, size: int) -> list[memoryview]:
        """Views of writable bytes [offset, offset + size) (fewer bytes where the buffers are shorter)."""
        return [self.memory.view(gpa, n) for gpa, n in self._slice(self.writable, offset, size)]

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        """Readable bytes [offset, offset + size) (all from ``offset`` when ``size`` is None)."""
        if size is None:
            size = max(0, self.readable_len - offset)
        return b"".join(bytes(v) for v in self.read_views(offset, size))

    def write(self, offset: int, data: bytes) -> int:
        """Copy ``data`` into the writable buffers from ``offset``; returns how many bytes fit."""
        done = 0
        for view in self.write_views(offset, len(data)):
            view[:] = data[done : done + len(view)]
            done += len(view)
        return done


class Virtqueue:
    """One split virtqueue: its configuration (set by the transport's registers) and the device's
    position in its rings."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        if not (0 < max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise ValueError(f"queue {index}: the maximum size must be a power of two up to {MAX_QUEUE_SIZE}, "
                             f"not {max_size}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset: not ready, no rings, indices at 0."""
        self.size = self.max_size
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.ready = False
        self.halted = False  # set by a reset in progress: pop() hands out nothing more
        self.broken: str | None = None  # why the queue was given up (a VirtqueueError's message)
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0  # the next available-ring entry the device takes
        self.used_idx = 0  # the device's used.idx
        self._signalled = 0  # used.idx at the last interrupt decision
        self._desc = self._avail = self._used = self._used16 = None
        self._taken: dict[int, list[tuple[int, int]]] = {}  # head -> writable segments, popped and not pushed

    def __repr__(self) -> str:
        return (f"<Virtqueue {self.index} size={self.size} ready={self.ready} desc={self.desc_addr:#x} "
                f"avail={self.driver_addr:#x} used={self.device_addr:#x} last_avail={self.last_avail} "
                f"used_idx={self.used_idx}>")

    # ---- set-up -------------------------------------------------------------------------------
    def _view(self, gpa: int, size: int, what: str) -> memoryview:
        try:
            return self.memory.view(gpa, size)
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {what} at {gpa:#x}+{size:#x} is outside guest RAM ({e})") from None

    def enable(self, features: int = 0) -> None:
        """Check the driver's queue configuration and start using it (QueueReady = 1)."""
        from . import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

        size = self.size
        if not (0 < size <= self.max_size and size & (size - 1) == 0):
            raise VirtqueueError(f"queue {self.index}: size {size} is not a power of two in 1-{self.max_size}")
        for what, addr, align in (("descriptor table", self.desc_addr, 16), ("available ring", self.driver_addr, 2),
                                  ("used ring", self.device_addr, 4)):
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: the {what} at {addr:#x} is not {align}-byte aligned")
        self._desc = self._view(self.desc_addr, DESC_SIZE * size, "the descriptor table")
        self._avail = self._view(self.driver_addr, 6 + 2 * size, "the available ring")
        self._used = self._view(self.device_addr, 6 + 8 * size, "the used ring")
        # The fields a driver reads while the device writes them (used.idx, avail_event) are stored
        # through this 16-bit view: one 2-byte store each. struct.pack_into zero-fills its target
        # before it packs, so a driver polling on another CPU could read a torn 0 in between.
        self._used16 = self._used.cast("H")
        self.event_idx = bool(features & F_RING_EVENT_IDX)
        self.indirect = bool(features & F_RING_INDIRECT_DESC)
        self.ready = True

    def set_features(self, features: int) -> None:
        """Take the negotiated ring features (for a queue enabled before FEATURES_OK)."""
        from . import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

        self.event_idx = bool(features & F_RING_EVENT_IDX)
        self.indirect = bool(features & F_RING_INDIRECT_DESC)

    # ---- the available side -------------------------------------------------------------------
    @property
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not taken."""
        ahead = (self.avail_idx - self.last_avail) & 0xFFFF
        if ahead > self.size:
            raise VirtqueueError(f"queue {self.index}: avail.idx jumped {ahead} entries ahead of the device "
                                 f"(at most {self.size})")
        return ahead

    def pop(self) -> Chain | None:
        """The next available chain, walked and checked, or None when the ring is empty (or the
        queue is not in use). With the event index, an empty ring publishes ``avail_event``."""
        if not self.ready or self.halted or self.broken:
            return None
        if not self.pending():
            if not self.event_idx:
                return None
            self._used16[2 + 4 * self.size] = self.last_avail  # avail_event, after the size ring entries
            self._mark(self.device_addr + 4 + 8 * self.size, 2)
            full_barrier()
            if not self.pending():
                return None
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.last_avail % self.size))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = self.walk(head)
        self._taken[head] = chain.writable
        return chain

    def retake(self, head: int) -> Chain:
        """Chain ``head`` walked again, as the device held it when its state was saved (a chain
        popped and not yet pushed, such as virtio-net's receive buffer kept for the next frame)."""
        chain = self.walk(head)
        self._taken[head] = chain.writable
        return chain

    def __iter__(self):
        """Every available chain, until the ring is empty."""
        while (chain := self.pop()) is not None:
            yield chain

    def walk(self, head: int) -> Chain:
        """The chain that starts at descriptor ``head``, every rule checked (see the module text)."""
        size = self.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: the available ring names head {head}, the queue has {size} entries")
        chain = Chain(head, self.memory)
        table, entries, limit = self._desc, size, size
        index, seen, nested = head, 0, False
        while True:
            if seen >= limit:
                raise VirtqueueError(f"queue {self.index}: the chain at head {head} loops or is longer than "
                                     f"{'its indirect table' if nested else 'the queue'} ({limit} descriptors)")
            seen += 1
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: descriptor {index} is indirect, but "
                                         "VIRTIO_F_RING_INDIRECT_DESC was not negotiated")
                if nested:
                    raise VirtqueueError(f"queue {self.index}: an indirect table (head {head}) points at another one")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: descriptor {index} is indirect and has NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    raise VirtqueueError(f"queue {self.index}: an indirect table of {length} bytes (head {head}): "
                                         f"it must be a non-zero multiple of 16, at most {size} descriptors")
                table = self._view(addr, length, "an indirect descriptor table")
                entries = limit = length // DESC_SIZE
                index, seen, nested = 0, 0, True
                continue
            if length:
                if addr + length > 1 << 64:
                    raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} wraps the address space")
                self._view(addr, length, f"the buffer of descriptor {index}")
                if flags & DESC_F_WRITE:
                    chain.writable.append((addr, length))
                elif chain.writable:
                    raise VirtqueueError(f"queue {self.index}: readable descriptor {index} follows a writable one "
                                         f"(head {head})")
                else:
                    chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= entries:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} chains to {nxt}, "
                                     f"out of range (0-{entries - 1})")
            index = nxt

    # ---- the used side ------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, ``written`` bytes written into its buffers."""
        for gpa, n in self._taken.pop(head, ()):  # what the device wrote into the chain, for dirty tracking
            self._mark(gpa, n)
        slot = 4 + 8 * (self.used_idx % self.size)
        _USED_ELEM.pack_into(self._used, slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx  # used.idx, after the element: x86 keeps stores in order
        self._mark(self.device_addr, 4)
        self._mark(self.device_addr + slot, 8)

    def _mark(self, gpa: int, size: int) -> None:
        """Record a device write to guest RAM for dirty-page tracking (a migration's pre-copy, a
        fast reset): KVM sees only the guest's own writes. Marked after the bytes are written, so a
        collect in between sends the page again later rather than missing the write."""
        written = getattr(self.memory, "written", None)
        if written is not None and size:
            written.update(range(gpa >> 12, ((gpa + size - 1) >> 12) + 1))

    # ---- state (snapshot, restore, migration) -------------------------------------------------
    def save(self) -> dict:
        """The queue's configuration and the device's position in its rings, as plain data."""
        return {"size": self.size, "ready": self.ready, "desc": self.desc_addr, "driver": self.driver_addr,
                "device": self.device_addr, "last_avail": self.last_avail, "used_idx": self.used_idx,
                "signalled": self._signalled, "event_idx": self.event_idx, "indirect": self.indirect,
                "broken": self.broken}

    def restore(self, state: dict) -> None:
        """Put back what :meth:`save` gave (the rings are in the restored guest memory); raises
        ValueError naming the field or the ring that cannot be used."""
        from ..devices.base import field

        self.reset()
        what = f"queue {self.index}"
        try:
            size = field(state, "size", int, limit=self.max_size + 1)
            addrs = [field(state, name, int, limit=1 << 64) for name in ("desc", "driver", "device")]
            idx = [field(state, name, int, limit=1 << 16) for name in ("last_avail", "used_idx", "signalled")]
            flags = [field(state, name, bool) for name in ("ready", "event_idx", "indirect")]
            broken = field(state, "broken", (str, type(None)))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        self.size = size
        self.desc_addr, self.driver_addr, self.device_addr = addrs
        if flags[0]:
            try:
                self.enable()
            except VirtqueueError as e:
                raise ValueError(f"{what}: saved as ready, but {e}") from None
        self.event_idx, self.indirect = flags[1], flags[2]
        self.last_avail, self.used_idx, self._signalled = idx
        self.broken = broken

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last call
        (event index: ``used_event`` among them; else no VRING_AVAIL_F_NO_INTERRUPT)."""
        if not self.ready or self._used is None:
            return False
        full_barrier()
        new, old = self.used_idx, self._signalled
        self._signalled = new
        if new == old:
            return False
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT
