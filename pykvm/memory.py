"""Guest memory: anonymous host mappings that back KVM memory slots, addressed by GPA.

Every access from Python is bounds-checked against the region (or the set of regions) and goes
through a ``memoryview`` of a Python ``mmap``: an access past a region's end raises
:class:`GuestMemoryError` and can never touch other host memory, and a closed region refuses
access instead of dangling.
"""

from __future__ import annotations

import mmap
import struct
from bisect import bisect_right
from dataclasses import dataclass

from ._ffi import ffi
from .x86.layout import PAGE_SIZE


class GuestMemoryError(ValueError):
    """A guest-physical range that no memory region backs (or that crosses a region's end)."""


@dataclass(frozen=True)
class MemoryRegion:
    """One memory slot: ``size`` bytes of host memory mapped at guest-physical ``gpa``."""

    slot: int
    gpa: int
    size: int
    readonly: bool
    log_dirty: bool
    _map: mmap.mmap
    _pin: object  # the cffi buffer that pins _map and gives its host address

    @classmethod
    def allocate(cls, slot: int, gpa: int, size: int, *, readonly: bool = False, log_dirty: bool = False,
                 backing: mmap.mmap | None = None):
        """Map ``size`` bytes of zeroed anonymous memory for slot ``slot`` at ``gpa`` (or use
        ``backing``, a writable mapping of that size: a snapshot's memory, mapped copy-on-write)."""
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(
                f"memory region gpa={gpa:#x} size={size:#x}: both must be multiples of {PAGE_SIZE:#x}, size > 0"
            )
        if gpa < 0 or gpa + size > 1 << 52:
            raise ValueError(f"memory region gpa={gpa:#x} size={size:#x} is outside the 52-bit physical space")
        if backing is None:
            backing = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        elif len(backing) != size:
            raise ValueError(f"memory region gpa={gpa:#x}: the backing maps {len(backing):#x} bytes, not {size:#x}")
        pin = ffi.from_buffer(backing)
        return cls(slot, gpa, size, readonly, log_dirty, backing, pin)

    @property
    def hva(self) -> int:
        """The host virtual address KVM is given for this slot."""
        return int(ffi.cast("uintptr_t", self._pin))

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end and size >= 0

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``gpa`` (valid while the region is open)."""
        if not self.contains(gpa, size):
            raise GuestMemoryError(
                f"gpa range {gpa:#x}-{gpa + size:#x} is outside slot {self.slot} ({self.gpa:#x}-{self.end:#x})"
            )
        if self._map.closed:
            raise GuestMemoryError(f"memory slot {self.slot} is closed")
        offset = gpa - self.gpa
        return memoryview(self._map)[offset : offset + size]

    def close(self) -> None:
        """Unmap the host memory (after KVM has let go of the slot). Idempotent."""
        if self._map.closed:
            return
        ffi.release(self._pin)
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view: the mapping is freed when the last view goes.
            pass


class GuestMemory:
    """The guest-physical address space of a VM: its regions, sorted by GPA."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        #: Page numbers (GPA >> 12) pykvm wrote through :meth:`write` and the ``write_u*``
        #: methods, while dirty tracking (:mod:`pykvm.dirty`) is on; None otherwise.
        self.written: set[int] | None = None

    def __iter__(self):
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest memory."""
        return sum(r.size for r in self._regions)

    def free_slot(self) -> int:
        used = {r.slot for r in self._regions}
        return next(s for s in range(len(used) + 1) if s not in used)

    def check_free(self, slot: int, gpa: int, size: int) -> None:
        """Raise ValueError if ``slot`` is taken or [gpa, gpa+size) overlaps a region."""
        for r in self._regions:
            if r.slot == slot:
                raise ValueError(f"memory slot {slot} is already in use ({r.gpa:#x}-{r.end:#x})")
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(
                    f"memory region {gpa:#x}-{gpa + size:#x} overlaps slot {r.slot} ({r.gpa:#x}-{r.end:#x})"
                )

    def add(self, region: MemoryRegion) -> None:
        self.check_free(region.slot, region.gpa, region.size)
        i = bisect_right(self._starts, region.gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove(self, region: MemoryRegion) -> None:
        i = self._regions.index(region)
        del self._regions[i], self._starts[i]

    def region_at(self, gpa: int) -> MemoryRegion | None:
        """The region holding ``gpa``, or None (an MMIO address)."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and self._regions[i].contains(gpa):
            return self._regions[i]
        return None

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``gpa``; the range must lie in one region."""
        region = self.region_at(gpa)
        if region is None:
            raise GuestMemoryError(f"gpa {gpa:#x} is not backed by guest memory")
        return region.view(gpa, size)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data
        if self.written is not None and data:
            self.written.update(range(gpa >> 12, ((gpa + len(data) - 1) >> 12) + 1))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """Bytes at ``gpa`` up to (not including) a NUL, at most ``limit``, within one region."""
        region = self.region_at(gpa)
        if region is None:
            raise GuestMemoryError(f"gpa {gpa:#x} is not backed by guest memory")
        chunk = bytes(region.view(gpa, min(limit, region.end - gpa)))
        return chunk.split(b"\0", 1)[0]

    def _unpack(self, fmt: str, gpa: int) -> int:
        return struct.unpack(fmt, self.view(gpa, struct.calcsize(fmt)))[0]

    def _pack(self, fmt: str, gpa: int, value: int) -> None:
        size = struct.calcsize(fmt)
        struct.pack_into(fmt, self.view(gpa, size), 0, value)
        if self.written is not None:
            self.written.update((gpa >> 12, (gpa + size - 1) >> 12))

    def read_u8(self, gpa: int) -> int:
        return self._unpack("<B", gpa)

    def read_u16(self, gpa: int) -> int:
        return self._unpack("<H", gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack("<I", gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack("<Q", gpa)

    def write_u8(self, gpa: int, value: int) -> None:
        self._pack("<B", gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._pack("<H", gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._pack("<I", gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._pack("<Q", gpa, value)
