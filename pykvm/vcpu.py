"""``Vcpu``: a vCPU file descriptor (run, registers, MSRs, CPUID, APIC, events, debug)."""

from __future__ import annotations

import mmap
import signal
import threading

from . import exits
from ._fd import FdObject
from ._ffi import ffi
from .constants import GUESTDBG_ENABLE, Cap
from .ioctl import ioctl_run
from .system import CpuidEntry, cpuid_list, msrs_struct
from .vm import enable_cap_struct

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
        self.coalesced_ring = (
            ffi.from_buffer("struct kvm_coalesced_mmio_ring *", self._page[ring_at : ring_at + mmap.PAGESIZE])
            if len(self._page) >= ring_at + mmap.PAGESIZE else None
        )
        self._thread: int | None = None
        _install_kick_handler()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd={self._fd}>"

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """Enter the guest until the next exit to user space; return it. Wraps ``KVM_RUN``.

        A kick (:meth:`kick`) or a signal ends the call with :class:`pykvm.exits.Intr`.
        """
        self._thread = threading.get_ident()
        try:
            if ioctl_run(self._fd) < 0:
                self.kvm_run.immediate_exit = 0
                return exits.Intr()
        finally:
            self._thread = None
        return exits.decode(self.kvm_run, self._page)

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

    def set_xsave(self, xsave) -> None:
        """Wraps ``KVM_SET_XSAVE``."""
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

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd. Idempotent."""
        run_map = getattr(self, "_run_map", None)
        if run_map is not None and not run_map.closed:
            ffi.release(self.kvm_run)
            if self.coalesced_ring is not None:
                ffi.release(self.coalesced_ring)
            self._page.release()
            try:
                run_map.close()
            except BufferError:
                pass  # an exit's data view is still held: the mapping goes with the last view
            self._run_map = self._page = None
        super().close()


_install_kick_handler()  # at import, which is usually in the main thread
