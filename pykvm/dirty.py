"""Dirty-page tracking through both interfaces KVM has, behind one: which guest pages were written
since the last look.

- :class:`BitmapTracker`: the dirty bitmap of a memory slot (KVM_GET_DIRTY_LOG). With
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the read no longer write-protects the whole slot again;
  KVM_CLEAR_DIRTY_LOG does it for the pages that were dirty only, as QEMU uses it.
- :class:`RingTracker`: a ring per vCPU (KVM_CAP_DIRTY_LOG_RING, enabled before the vCPUs exist):
  KVM appends each page a vCPU dirties, pykvm harvests the entries and hands them back with
  KVM_RESET_DIRTY_RINGS. A full ring stops that vCPU with KVM_EXIT_DIRTY_RING_FULL, which
  :meth:`RingTracker.ring_full` answers (Machine registers it). On kvm_pvm the ring loses pages
  once it has wrapped (the next lap's first entries are never marked dirty), so Machine refuses
  it there and ``dirty="auto"`` takes the bitmap.

KVM sees only what the guest writes. What pykvm itself writes into guest memory through
:class:`~pykvm.memory.GuestMemory` (a device's DMA, a loader) is marked there (``written``) and
folded in by :meth:`DirtyTracker.collect`.
"""

from __future__ import annotations

import threading

from .constants import MEM_LOG_DIRTY_PAGES, MEM_READONLY, Cap

PAGE_SHIFT = 12
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1
MANUAL_PROTECT_ENABLE = 1 << 0
RING_ENTRIES = 4096  # 64 KiB a vCPU: KVM_EXIT_DIRTY_RING_FULL after about 4,000 pages between harvests


def pages_of(bitmap: bytes):
    """The page numbers whose bits are set in ``bitmap`` (bit n of byte n // 8: page n), in order."""
    for i, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            yield i * 8 + low.bit_length() - 1
            byte ^= low


class DirtyRingStuck(RuntimeError):
    """KVM reports a vCPU's dirty ring full, but hands back no entry to harvest."""


def _log_dirty(vm, region) -> None:
    """Turn dirty logging on for ``region``'s slot (its flags, again through KVM_SET_USER_MEMORY_REGION)."""
    flags = MEM_LOG_DIRTY_PAGES | (MEM_READONLY if region.readonly else 0)
    vm.set_user_memory_region(region.slot, flags, region.gpa, region.size, region.hva)


class DirtyTracker:
    """The pages of one RAM region written since the last :meth:`collect` (guest and pykvm alike).
    Another consumer (a migration beside a fast reset) takes its own view with :meth:`watch`."""

    kind = ""

    def __init__(self, vm, region, memory) -> None:
        self.vm, self.region, self.memory = vm, region, memory
        self._lock = threading.Lock()
        self._mine: set[int] = set()  # gathered, not yet collected
        self._watches: list[DirtyWatch] = []
        memory.written = set()

    def _from_kvm(self) -> set[int]:
        raise NotImplementedError

    def _gather(self) -> None:
        pages = self._from_kvm()
        first, last = self.region.gpa >> PAGE_SHIFT, (self.region.end - 1) >> PAGE_SHIFT
        # swapped, then copied in one C call (a device thread may still add to the old set)
        written, self.memory.written = self.memory.written, set()
        pages.update(p - first for p in list(written) if first <= p <= last)
        self._mine |= pages
        for watch in self._watches:
            watch.pages |= pages

    def collect(self) -> set[int]:
        """Page numbers (from the region's start) written since the last call; tracking goes on.
        Callable from any thread, also while the vCPUs run."""
        with self._lock:
            self._gather()
            pages, self._mine = self._mine, set()
            return pages

    def watch(self) -> DirtyWatch:
        """Another consumer's view: its :meth:`DirtyWatch.collect` returns the pages written since
        the watch's last collect (or its start), whoever else collects meanwhile."""
        with self._lock:
            self._gather()  # what was written before the watch is not its business
            watch = DirtyWatch(self)
            self._watches.append(watch)
            return watch

    def close(self) -> None:
        self.memory.written = None


class DirtyWatch:
    """One consumer's view of a :class:`DirtyTracker` (see :meth:`DirtyTracker.watch`)."""

    def __init__(self, tracker: DirtyTracker) -> None:
        self.tracker = tracker
        self.pages: set[int] = set()

    def collect(self) -> set[int]:
        with self.tracker._lock:
            self.tracker._gather()
            pages, self.pages = self.pages, set()
            return pages

    def close(self) -> None:
        with self.tracker._lock:
            if self in self.tracker._watches:
                self.tracker._watches.remove(self)


class BitmapTracker(DirtyTracker):
    """KVM_GET_DIRTY_LOG (and KVM_CLEAR_DIRTY_LOG where KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is offered)."""

    kind = "bitmap"

    def __init__(self, vm, region, memory) -> None:
        super().__init__(vm, region, memory)
        self.manual = vm.has_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2)
        if self.manual:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, MANUAL_PROTECT_ENABLE)
        _log_dirty(vm, region)
        self._from_kvm()  # from here on

    def _from_kvm(self) -> set[int]:
        bitmap = self.vm.get_dirty_log(self.region.slot)
        if self.manual and any(bitmap):
            self.vm.clear_dirty_log(self.region.slot, 0, bitmap)
        return set(pages_of(bitmap))


class RingTracker(DirtyTracker):
    """KVM's per-vCPU dirty rings (the VM must have had KVM_CAP_DIRTY_LOG_RING enabled, with
    ``entries`` * 16 bytes, before its first vCPU: :func:`enable_ring`)."""

    kind = "ring"

    def __init__(self, vm, region, memory, vcpus, entries: int = RING_ENTRIES) -> None:
        super().__init__(vm, region, memory)
        self.entries = entries
        self._rings = [(vcpu, vcpu.map_dirty_ring(entries)) for vcpu in vcpus]
        self._next = {vcpu.id: 0 for vcpu in vcpus}  # the first entry not yet harvested, per vCPU
        self._harvested: set[int] = set()  # harvested when a ring was full, not yet gathered
        _log_dirty(vm, region)
        self._from_kvm()

    def _harvest(self, vcpu, ring) -> set[int]:
        pages, i, slot = set(), self._next[vcpu.id], self.region.slot
        while True:
            entry = ring[i % self.entries]
            if not entry.flags & DIRTY_GFN_F_DIRTY:
                break
            if entry.slot == slot:
                pages.add(entry.offset)
            entry.flags = DIRTY_GFN_F_RESET  # harvested: KVM may reuse it after the reset
            i += 1
        self._next[vcpu.id] = i
        return pages

    def _from_kvm(self) -> set[int]:
        pages, self._harvested = self._harvested, set()
        for vcpu, ring in self._rings:
            pages |= self._harvest(vcpu, ring)
        self.vm.reset_dirty_rings()
        return pages

    def ring_full(self, exit, vcpu) -> None:
        """The exit handler of KVM_EXIT_DIRTY_RING_FULL: harvest that vCPU's ring, run on."""
        with self._lock:
            ring = next(r for v, r in self._rings if v is vcpu)
            start = self._next[vcpu.id]
            self._harvested |= self._harvest(vcpu, ring)
            if self._next[vcpu.id] == start:
                # KVM says full, but the entry it would hand back next was never marked dirty: its
                # reset cannot pass it, so every run would end here again (seen on kvm_pvm, with
                # dirty entries just after the empty one)
                raise DirtyRingStuck(
                    f"vCPU {vcpu.id}'s dirty ring is full but entry {start % self.entries} is not dirty: "
                    "KVM cannot go on (use the dirty bitmap: Machine(dirty='bitmap'))")
            self.vm.reset_dirty_rings()


def ring_offered(vm) -> int:
    """The largest dirty ring KVM offers, in bytes (0: none)."""
    return max(vm.check_extension(Cap.DIRTY_LOG_RING), 0)


def wants_ring(vm, dirty: str) -> bool:
    """Whether ``Machine(dirty=...)`` ("auto", "ring" or "bitmap") takes the ring on this VM's
    KVM: "auto" where a ring of RING_ENTRIES is offered, but not on kvm_pvm, whose ring loses
    pages; "ring" raises KvmUnsupportedError, with the reason, where it would not be taken."""
    from .ioctl import KvmUnsupportedError
    from .probe.host import kvm_backend  # only where asked: pykvm.probe is not light

    if dirty == "bitmap":
        return False
    if kvm_backend() == "kvm_pvm":
        if dirty == "ring":
            raise KvmUnsupportedError(
                "kvm_pvm's dirty ring loses pages once it has wrapped (after a KVM_EXIT_DIRTY_RING_FULL the "
                "next lap's first entries are never marked dirty): use the dirty bitmap (dirty='bitmap' or 'auto')")
        return False
    offered = ring_offered(vm) >= RING_ENTRIES * 16
    if dirty == "ring" and not offered:
        raise KvmUnsupportedError(f"this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING) of {RING_ENTRIES * 16} bytes")
    return offered


def enable_ring(vm, entries: int = RING_ENTRIES) -> None:
    """Turn the dirty ring on for a VM that has no vCPU yet (KVM refuses it later)."""
    vm.enable_cap(Cap.DIRTY_LOG_RING, entries * 16)
