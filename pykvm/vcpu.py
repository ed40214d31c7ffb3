"""``Vcpu``: a vCPU file descriptor (run, registers, MSRs, CPUID, APIC, events, debug)."""

from __future__ import annotations

import mmap
import signal
import threading

from . import exits
from ._fd import FdObject
from ._ffi import ffi
from .constants import EXIT_IO_OUT, GUESTDBG_ENABLE, Cap, ExitReason
from .ioctl import KVM_RUN, KVM_RUN_CALL, run_error
from .system import CpuidEntry, cpuid_list, msrs_struct
from .vm import enable_cap_struct

_get_ident = threading.get_ident
_DECODERS, _decode_unknown, _INTR = exits.DECODERS, exits.decode_unknown, exits.Intr()
_EXIT_IO, _EXIT_MMIO = int(ExitReason.IO), int(ExitReason.MMIO)
_EXIT_RDMSR, _EXIT_WRMSR = int(ExitReason.X86_RDMSR), int(ExitReason.X86_WRMSR)
_IO_UNPACK, _IO_OFFSET = exits.IO_STRUCT.unpack_from, exits.IO_OFFSET
_MMIO_UNPACK, _MMIO_OFFSET, _MMIO_DATA = exits.MMIO_STRUCT.unpack_from, exits.MMIO_OFFSET, exits.MMIO_DATA
_MSR_UNPACK, _MSR_OFFSET = exits.MSR_STRUCT.unpack_from, exits.MSR_OFFSET
_io_exit, _mmio_exit, _msr_exit = exits.io_exit, exits.mmio_exit, exits.msr_exit
#: Exit values a vCPU keeps for reuse, per kind (then it starts again: a guest cannot grow them).
EXIT_CACHE_SIZE = 512

COALESCED_MMIO_PAGE_OFFSET = 2  # <asm/kvm.h> KVM_COALESCED_MMIO_PAGE_OFFSET: pages into the vCPU mmap

#: The signal :meth:`Vcpu.kick` sends to a thread blocked in KVM_RUN (a no-op handler is installed).
KICK_SIGNAL = signal.SIGRTMIN + 5


def _install_kick_handler() -> bool:
    """Make KICK_SIGNAL harmless so that it only interrupts KVM_RUN (EINTR). Python lets only the
    main thread install handlers; returns whether one is in place."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):  # ignored survives exec
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        signal.siginterrupt(KICK_SIGNAL, True)
    return True


DIRTY_LOG_PAGE_OFFSET = 64  # <asm/kvm.h>: where a vCPU's dirty ring is in its mmap, in pages


class Vcpu(FdObject):
    """One virtual CPU. :meth:`run` enters the guest and returns the exit as a value."""

    def __init__(self, vm, fd: int, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self._fd = fd
        try:
            self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            self.close()
            raise
        self._page = memoryview(self._run_map)
        self.kvm_run = ffi.from_buffer("struct kvm_run *", self._run_map)
        ring_at = COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        #: The coalesced MMIO/PIO ring KVM shares with every vCPU of the VM (None where KVM has none).
        has_ring = len(self._page) >= ring_at + mmap.PAGESIZE
        #: The same page as bytes (what Machine's drain unpacks the entries from).
        self.coalesced_view = self._page[ring_at : ring_at + mmap.PAGESIZE] if has_ring else None
        self.coalesced_ring = (
            ffi.from_buffer("struct kvm_coalesced_mmio_ring *", self.coalesced_view) if has_ring else None
        )
        self._thread: int | None = None
        # Exit values are frozen: the same access (port, size, count, data written; gpa, length;
        # MSR) gives an equal value, so run() hands out the one it made before, keyed by the raw
        # fields, instead of building a new one per exit (the views of reads point at the same
        # bytes of the kvm_run page). On kvm_pvm this saves about 1.5 us of an exit's ~10.
        self._io_exits: dict = {}
        self._mmio_exits: dict = {}
        self._msr_exits: dict = {}
        _install_kick_handler()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd={self._fd}>"

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """Enter the guest until the next exit to user space; return it. Wraps ``KVM_RUN``.

        A kick (:meth:`kick`) or a signal ends the call with :class:`pykvm.exits.Intr`.
        """
        # The hot path: ioctl_run and exits.decode inlined (each call saved is measurable on kvm_pvm).
        self._thread = _get_ident()
        try:
            interrupted = KVM_RUN_CALL(self._fd, KVM_RUN, 0) < 0 and run_error() < 0
        finally:
            self._thread = None
        run = self.kvm_run
        if interrupted:
            run.immediate_exit = 0
            return _INTR
        reason = run.exit_reason
        if reason == _EXIT_IO:
            key = _IO_UNPACK(self._page, _IO_OFFSET)  # direction, size, port, count, data_offset
            if key[0] == EXIT_IO_OUT:
                key = (key, self._run_map[key[4] : key[4] + key[1] * key[3]])  # the bytes written
            exit = self._io_exits.get(key)
            if exit is None:
                exit = self._remember(self._io_exits, key, self._new_io(key))
            return exit
        if reason == _EXIT_MMIO:
            key = _MMIO_UNPACK(self._page, _MMIO_OFFSET)  # gpa, len, is_write
            if key[2]:
                key = (key, self._run_map[_MMIO_DATA : _MMIO_DATA + key[1]])
            exit = self._mmio_exits.get(key)
            if exit is None:
                exit = self._remember(self._mmio_exits, key, self._new_mmio(key))
            return exit
        if reason == _EXIT_RDMSR or reason == _EXIT_WRMSR:
            key = (reason, _MSR_UNPACK(self._page, _MSR_OFFSET))  # reason, index, data
            exit = self._msr_exits.get(key)
            if exit is None:
                exit = self._remember(self._msr_exits, key, _msr_exit(reason, *key[1]))
            return exit
        return _DECODERS.get(reason, _decode_unknown)(run, self._page)

    @staticmethod
    def _remember(cache: dict, key, exit):
        if len(cache) >= EXIT_CACHE_SIZE:
            cache.clear()
        cache[key] = exit
        return exit

    def _new_io(self, key):
        if len(key) == 2:  # a write: (fields, data)
            (direction, size, port, count, _), data = key
            return _io_exit(direction, size, port, count, data)
        direction, size, port, count, start = key
        return _io_exit(direction, size, port, count, self._page[start : start + size * count])

    def _new_mmio(self, key):
        if len(key) == 2:
            (gpa, _, _), data = key
            return _mmio_exit(gpa, 1, data)
        gpa, size, _ = key
        return _mmio_exit(gpa, 0, self._page[_MMIO_DATA : _MMIO_DATA + size])

    def kick(self) -> None:
        """Make the thread in (or about to enter) :meth:`run` return ``Intr`` soon. Thread-safe."""
        if self.closed:
            return
        self.kvm_run.immediate_exit = 1
        thread = self._thread
        if thread is not None:
            if not _install_kick_handler():
                raise RuntimeError(
                    "cannot interrupt KVM_RUN: create the first vCPU (or import pykvm.vcpu) in the main thread, "
                    "so that pykvm can install its kick signal handler"
                )
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def complete_rdmsr(self, data: int, error: bool = False) -> None:
        """Answer an :class:`~pykvm.exits.X86Rdmsr` exit (``error``: inject #GP instead)."""
        self.kvm_run.msr.data = data
        self.kvm_run.msr.error = int(error)

    def complete_wrmsr(self, error: bool = False) -> None:
        """Accept (or, with ``error``, refuse with #GP) an :class:`~pykvm.exits.X86Wrmsr` exit."""
        self.kvm_run.msr.error = int(error)

    def complete_hypercall(self, ret: int) -> None:
        """Set the return value of a :class:`~pykvm.exits.Hypercall` exit."""
        self.kvm_run.hypercall.ret = ret

    # ---- registers ----------------------------------------------------------------------------
    def _get(self, name: str, ctype: str):
        out = ffi.new(f"{ctype} *")
        self._ioctl(name, out)
        return out

    def get_regs(self):
        """General registers (``regs.rax`` ... ``regs.rip``, ``regs.rflags``). Wraps ``KVM_GET_REGS``."""
        return self._get("KVM_GET_REGS", "struct kvm_regs")

    def set_regs(self, regs) -> None:
        """Wraps ``KVM_SET_REGS``."""
        self._ioctl("KVM_SET_REGS", regs)

    def get_sregs(self):
        """Segment, descriptor-table and control registers, EFER, APIC base. Wraps ``KVM_GET_SREGS``."""
        return self._get("KVM_GET_SREGS", "struct kvm_sregs")

    def set_sregs(self, sregs) -> None:
        """Wraps ``KVM_SET_SREGS``."""
        self._ioctl("KVM_SET_SREGS", sregs)

    def get_sregs2(self):
        """As :meth:`get_sregs`, plus the PAE PDPTRs (``KVM_CAP_SREGS2``). Wraps ``KVM_GET_SREGS2``."""
        return self._get("KVM_GET_SREGS2", "struct kvm_sregs2")

    def set_sregs2(self, sregs2) -> None:
        """Wraps ``KVM_SET_SREGS2``."""
        self._ioctl("KVM_SET_SREGS2", sregs2)

    def get_fpu(self):
        """x87/SSE state in FXSAVE form. Wraps ``KVM_GET_FPU``."""
        return self._get("KVM_GET_FPU", "struct kvm_fpu")

    def set_fpu(self, fpu) -> None:
        """Wraps ``KVM_SET_FPU``."""
        self._ioctl("KVM_SET_FPU", fpu)

    def get_debugregs(self):
        """DR0-3, DR6, DR7. Wraps ``KVM_GET_DEBUGREGS``."""
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, debugregs) -> None:
        """Wraps ``KVM_SET_DEBUGREGS``."""
        self._ioctl("KVM_SET_DEBUGREGS", debugregs)

    def get_xsave(self):
        """The XSAVE area (first 4 KiB). Wraps ``KVM_GET_XSAVE``."""
        return self._get("KVM_GET_XSAVE", "struct kvm_xsave")

    def get_xsave2(self, size: int):
        """The whole XSAVE area, ``size`` bytes (what ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`` gives:
        more than 4 KiB once the guest may use AMX). Returns a ``char[size]``. Wraps ``KVM_GET_XSAVE2``."""
        buf = ffi.new("char[]", size)
        self._ioctl("KVM_GET_XSAVE2", ffi.cast("struct kvm_xsave *", buf))
        return buf

    def set_xsave(self, xsave) -> None:
        """Wraps ``KVM_SET_XSAVE``. Where KVM_CAP_XSAVE2 is offered KVM reads as many bytes as
        that capability gives: pass a buffer of that size (cast to ``struct kvm_xsave *``)."""
        self._ioctl("KVM_SET_XSAVE", xsave)

    def get_xcrs(self):
        """Extended control registers (XCR0). Wraps ``KVM_GET_XCRS``."""
        return self._get("KVM_GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, xcrs) -> None:
        """Wraps ``KVM_SET_XCRS``."""
        self._ioctl("KVM_SET_XCRS", xcrs)

    def get_lapic(self):
        """The local APIC's 1 KiB register page. Wraps ``KVM_GET_LAPIC``."""
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, lapic) -> None:
        """Wraps ``KVM_SET_LAPIC``."""
        self._ioctl("KVM_SET_LAPIC", lapic)

    def get_vcpu_events(self):
        """Pending/injected exception, interrupt, NMI, SMI and triple-fault state. Wraps ``KVM_GET_VCPU_EVENTS``."""
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, events) -> None:
        """Wraps ``KVM_SET_VCPU_EVENTS``."""
        self._ioctl("KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        """The vCPU's multiprocessing state (a ``MpState``). Wraps ``KVM_GET_MP_STATE``."""
        return self._get("KVM_GET_MP_STATE", "struct kvm_mp_state").mp_state

    def set_mp_state(self, state: int) -> None:
        """Wraps ``KVM_SET_MP_STATE``."""
        self._ioctl("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    # ---- MSRs and CPUID -----------------------------------------------------------------------
    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Values of ``indices``, up to the first MSR KVM refuses (the rest are left out). Wraps ``KVM_GET_MSRS``."""
        buf = msrs_struct(indices)
        done = self._ioctl("KVM_GET_MSRS", buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; returns how many were set before the first one KVM refused. Wraps ``KVM_SET_MSRS``."""
        return self._ioctl("KVM_SET_MSRS", msrs_struct(values))

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """The CPUID the guest sees. Wraps ``KVM_SET_CPUID2``."""
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, entry in enumerate(entries):
            entry.to_c(buf.entries[i])
        self._ioctl("KVM_SET_CPUID2", buf)

    def get_cpuid2(self) -> list[CpuidEntry]:
        """The CPUID entries set for this vCPU. Wraps ``KVM_GET_CPUID2``."""
        return cpuid_list(self, "KVM_GET_CPUID2")

    # ---- interrupts, debug, translation -------------------------------------------------------
    def interrupt(self, vector: int) -> None:
        """Inject an external interrupt (no in-kernel irqchip). Wraps ``KVM_INTERRUPT``."""
        self._ioctl("KVM_INTERRUPT", ffi.new("struct kvm_interrupt *", {"irq": vector}))

    def nmi(self) -> None:
        """Inject an NMI. Wraps ``KVM_NMI``."""
        self._ioctl("KVM_NMI")

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """Enable single-step/breakpoints (``GUESTDBG_*`` flags; 0 turns debugging off).

        Wraps ``KVM_SET_GUEST_DEBUG``."""
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        if debugreg is not None:
            if len(debugreg) != 8:
                raise ValueError("debugreg takes 8 values (DR0-DR7)")
            dbg.arch.debugreg = debugreg
        if control and not control & GUESTDBG_ENABLE:
            raise ValueError("guest debug flags need GUESTDBG_ENABLE")
        self._ioctl("KVM_SET_GUEST_DEBUG", dbg)

    def translate(self, gva: int):
        """Translate a linear address through the guest's current paging mode.

        Returns ``struct kvm_translation`` (``physical_address``, ``valid``, ``writeable``,
        ``usermode``). Wraps ``KVM_TRANSLATE``."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": gva})
        self._ioctl("KVM_TRANSLATE", tr)
        return tr

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """Turn on a vCPU capability. Wraps ``KVM_ENABLE_CAP`` on the vCPU fd."""
        self._ioctl("KVM_ENABLE_CAP", enable_cap_struct(cap, args, flags))

    def get_stats_fd(self) -> int:
        """A file descriptor of this vCPU's binary statistics. Wraps ``KVM_GET_STATS_FD``."""
        return self._ioctl("KVM_GET_STATS_FD")

    def map_dirty_ring(self, entries: int):
        """Map this vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING enabled on the VM with ``entries``
        * 16 bytes): an array of ``struct kvm_dirty_gfn`` at page KVM_DIRTY_LOG_PAGE_OFFSET (64 on
        x86) of the vCPU fd, shared with KVM, unmapped by :meth:`close`."""
        self._ring_map = mmap.mmap(self._fd, entries * 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.dirty_ring = ffi.from_buffer("struct kvm_dirty_gfn[]", self._ring_map)
        return self.dirty_ring

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd. Idempotent."""
        ring_map = getattr(self, "_ring_map", None)
        if ring_map is not None and not ring_map.closed:
            ffi.release(self.dirty_ring)
            ring_map.close()
        run_map = getattr(self, "_run_map", None)
        for cache in (getattr(self, "_io_exits", {}), getattr(self, "_mmio_exits", {}), getattr(self, "_msr_exits", {})):
            cache.clear()  # their views of reads would hold the mapping
        if run_map is not None and not run_map.closed:
            ffi.release(self.kvm_run)
            if self.coalesced_ring is not None:
                ffi.release(self.coalesced_ring)
                self.coalesced_view.release()
            self._page.release()
            try:
                run_map.close()
            except BufferError:
                pass  # an exit's data view is still held: the mapping goes with the last view
            self._run_map = self._page = None
        super().close()


_install_kick_handler()  # at import, which is usually in the main thread
