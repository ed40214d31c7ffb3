"""Dirty-page tracking (pykvm/dirty.py) through the bitmap and the ring, and the fast reset built
on it (Machine.checkpoint / Machine.reset)."""

from __future__ import annotations

import hashlib

import pytest

from pykvm import dirty
from pykvm.ioctl import KvmUnsupportedError
from pykvm.machine import Machine, Paused

pytestmark = pytest.mark.kvm

COUNTER_BASE, COUNTER_PAGES = 0x200000, 512  # guests/counter.S (and dirty_pages.S's base)
PAGE = 4096


def _pause_at(m, count: int) -> None:
    text = f"count {count:08x}\n".encode()

    def after(exit, vcpu):
        if m.debugcon.captured.endswith(text):
            m.pause()

    m.after_exit = after


def _ram_digest(m) -> str:
    return hashlib.sha256(m.ram._map[:]).hexdigest()


def _ring_or_skip(mem: int = 4 << 20) -> Machine:
    try:
        return Machine(mem, dirty="ring")
    except KvmUnsupportedError as e:  # no ring of RING_ENTRIES, or kvm_pvm's, which loses pages
        pytest.skip(str(e))


def _machine(kind: str) -> Machine:
    return _ring_or_skip() if kind == "ring" else Machine(dirty="bitmap")


@pytest.mark.parametrize("kind", ["bitmap", "ring"])
def test_the_pages_a_guest_writes_are_the_pages_collected(guest, kind):
    with _machine(kind) as m:
        assert m.dirty.kind == kind
        m.load_flat(guest("counter"), "long")
        m.dirty.collect()  # the loader's writes are not the guest's
        _pause_at(m, 2)  # two rounds: 1,024 page writes, well inside one ring
        assert isinstance(m.run(timeout=60), Paused)
        pages = m.dirty.collect()
        pattern = set(range(COUNTER_BASE >> 12, (COUNTER_BASE >> 12) + COUNTER_PAGES))
        assert pattern <= pages  # every page of the pattern, each written twice, is there once
        assert len(pages - pattern) < 8  # and little else (the stack, KVM's own pages)
        assert m.dirty.collect() == set()  # nothing ran since
        m.memory.write(0x5000, b"host")  # pykvm's own writes are marked by GuestMemory
        m.memory.write_u64(0x7FF8, 1)
        assert m.dirty.collect() == {0x5, 0x7}


@pytest.mark.parametrize("kind", ["bitmap", "ring"])
def test_reset_puts_back_memory_registers_and_output_position(guest, kind):
    with _machine(kind) as m:
        m.load_flat(guest("counter"), "long")
        _pause_at(m, 2)
        m.run(timeout=60)
        m.checkpoint()
        at_checkpoint, rip = _ram_digest(m), m.vcpu.get_regs().rip
        _pause_at(m, 4)
        m.run(timeout=60)
        first = m.console_output[-30:]
        m.memory.write(0x300000, b"scribbled by the host")
        result = m.reset()
        assert 512 <= result["pages"] < m.ram.size >> 12  # the pattern pages, not all of RAM
        assert _ram_digest(m) == at_checkpoint and m.vcpu.get_regs().rip == rip
        m.run(timeout=60)  # the same two rounds again
        assert m.console_output[-30:] == first


def test_many_resets_in_a_row_each_start_from_the_checkpoint(guest):
    with Machine(dirty="bitmap") as m:
        m.load_flat(guest("counter"), "long")
        _pause_at(m, 1)
        m.run(timeout=60)
        m.checkpoint()
        at_checkpoint = _ram_digest(m)
        m.after_exit = None
        for _ in range(5):
            assert m.run(timeout=60).ok  # to the end (199 rounds)
            assert m.console_output.endswith(b"count 000000c8\n")
            m.reset()
            assert _ram_digest(m) == at_checkpoint


def test_reset_is_refused_without_a_checkpoint_and_while_a_vcpu_runs(guest):
    with Machine() as m:
        m.load_flat(guest("counter"), "long")
        with pytest.raises(RuntimeError, match="reset needs a checkpoint first"):
            m.reset()
        _pause_at(m, 1)
        m.run(timeout=60)
        m.checkpoint()
        errors = []

        def after(exit, vcpu):
            if not errors:
                try:
                    m.reset()
                except RuntimeError as e:
                    errors.append(str(e))

        m.after_exit = after
        assert m.run(timeout=60).ok  # refused, and the run goes on unharmed to DONE
        assert errors == ["a reset needs the vCPUs stopped: pause the machine first (Machine.pause)"]
        assert m.console_output.endswith(b"count 000000c8\n")


def test_unknown_tracking_is_refused():
    with pytest.raises(ValueError, match="dirty must be None, 'auto', 'ring' or 'bitmap'"):
        Machine(dirty="sometimes")


def test_full_rings_are_harvested_and_the_guest_runs_on(guest):
    """7,000 distinct pages overflow a 4,096-entry ring: the KVM_EXIT_DIRTY_RING_FULL is answered
    (harvest, KVM_RESET_DIRTY_RINGS), the guest ends, and every page it wrote is collected."""
    with _ring_or_skip(32 << 20) as m:
        m.load_flat(guest("dirty_pages"), "long")
        regs = m.vcpu.get_regs()
        regs.rcx = 7000
        m.vcpu.set_regs(regs)
        m.dirty.collect()
        assert m.run(timeout=300).ok
        assert m.stats.count["DirtyRingFull"] >= 1
        assert set(range(0x200, 0x200 + 7000)) <= m.dirty.collect()


class _Entry:
    def __init__(self, flags=0, slot=0, offset=0):
        self.flags, self.slot, self.offset = flags, slot, offset


class _Vm:
    resets = 0

    def reset_dirty_rings(self):
        self.resets += 1
        return 0


@pytest.mark.parametrize("stuck", [False, True])
def test_a_full_ring_is_harvested_in_order_or_reported_stuck(stuck):
    """RingTracker.ring_full on a ring of 8 entries (no KVM): dirty entries are taken in order from
    where the last harvest stopped and marked RESET; a full ring whose next entry is not dirty is
    an error, not an endless stream of exits."""
    vcpu = type("V", (), {"id": 0})()
    ring = [_Entry(dirty.DIRTY_GFN_F_DIRTY, 0, 100 + i) for i in range(8)]
    if stuck:
        ring[0].flags = 0
    t = dirty.RingTracker.__new__(dirty.RingTracker)
    t.vm, t.entries, t._rings, t._next, t._harvested = _Vm(), 8, [(vcpu, ring)], {0: 0}, set()
    t.region = type("R", (), {"slot": 0})()
    t._lock = __import__("threading").Lock()
    if stuck:
        with pytest.raises(dirty.DirtyRingStuck, match="entry 0 is not dirty"):
            t.ring_full(None, vcpu)
        return
    t.ring_full(None, vcpu)
    assert t._harvested == set(range(100, 108)) and t._next[0] == 8 and t.vm.resets == 1
    assert all(e.flags == dirty.DIRTY_GFN_F_RESET for e in ring)


@pytest.mark.kvm
def test_a_watch_sees_every_page_whoever_else_collects(guest):
    """DirtyTracker.watch (a migration beside a fast reset): pages the main consumer collected
    still reach the watch, and the watch's collects take nothing from the main consumer."""
    with Machine(dirty="bitmap") as m:
        m.load_flat(guest("dirty_pages"), "long")
        watch = m.dirty.watch()
        regs = m.vcpu.get_regs()
        regs.rcx = 3
        m.vcpu.set_regs(regs)
        assert m.run(timeout=30).ok
        first = COUNTER_BASE // PAGE
        assert m.dirty.collect() >= {first, first + 1, first + 2}
        assert watch.collect() >= {first, first + 1, first + 2}  # after the main consumer took them
        m.memory.write(COUNTER_BASE + 5 * PAGE, b"pykvm")  # pykvm's own write, marked by GuestMemory
        assert first + 5 in watch.collect()
        assert first + 5 in m.dirty.collect()  # the watch took nothing away
        watch.close()
        m.memory.write(COUNTER_BASE + 6 * PAGE, b"pykvm")
        assert watch.collect() == set() and first + 6 in m.dirty.collect()
