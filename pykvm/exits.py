"""VM exits as values: one frozen dataclass per ``KVM_EXIT_*`` reason the x86 kernel returns.

:meth:`pykvm.vcpu.Vcpu.run` decodes the ``kvm_run`` page in place and returns one of these. Names
are the CamelCase of the ``KVM_EXIT_*`` name (``KVM_EXIT_IO`` splits by direction into
:class:`IoOut` / :class:`IoIn`, ``KVM_EXIT_MMIO`` into :class:`MmioWrite` / :class:`MmioRead`).
Data an exit hands out as a ``memoryview`` (``IoIn.data``, ``MmioRead.data``) points into the
``kvm_run`` page: write the reply there before the next ``run()``; it is invalid after it. Data the
guest wrote (``IoOut.data``, ``MmioWrite.data``) is copied out as ``bytes`` (at most a page).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

from ._ffi import ffi
from .constants import EXIT_IO_OUT, ExitReason, InternalErrorSub, SystemEventType


@dataclass(frozen=True, slots=True)
class Unknown:
    """``KVM_EXIT_UNKNOWN`` or any reason pykvm does not decode (``reason`` says which)."""

    reason: int
    hardware_exit_reason: int = 0


@dataclass(frozen=True, slots=True)
class ExceptionExit:
    """``KVM_EXIT_EXCEPTION`` (named so as not to shadow the builtin ``Exception``)."""

    exception: int
    error_code: int


@dataclass(frozen=True, slots=True)
class IoOut:
    """``KVM_EXIT_IO``, direction out: ``count`` items of ``size`` bytes written to ``port``."""

    port: int
    size: int
    count: int
    data: bytes = field(repr=False)

    @property
    def value(self) -> int:
        """The first item as an unsigned little-endian integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, slots=True)
class IoIn:
    """``KVM_EXIT_IO``, direction in: fill ``data`` (``count * size`` bytes) before the next run."""

    port: int
    size: int
    count: int
    data: memoryview = field(repr=False, compare=False)

    def reply(self, value: int) -> None:
        """Answer every item of the read with ``value``."""
        item = (value & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")
        self.data[:] = item * self.count


@dataclass(frozen=True, slots=True)
class Hypercall:
    """``KVM_EXIT_HYPERCALL`` (with ``KVM_CAP_EXIT_HYPERCALL``)."""

    nr: int
    args: tuple[int, ...]
    longmode: bool


@dataclass(frozen=True, slots=True)
class Debug:
    """``KVM_EXIT_DEBUG``: a breakpoint, watchpoint or single step under guest debug."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Hlt:
    """``KVM_EXIT_HLT``: the guest executed HLT (only without an in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """``KVM_EXIT_MMIO``, a write of ``data`` to guest-physical ``gpa`` that no memory slot backs."""

    gpa: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class MmioRead:
    """``KVM_EXIT_MMIO``, a read of ``len(data)`` bytes: fill ``data`` before the next run."""

    gpa: int
    data: memoryview = field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    def reply(self, value: int) -> None:
        self.data[:] = (value & ((1 << (8 * len(self.data))) - 1)).to_bytes(len(self.data), "little")


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    """``KVM_EXIT_IRQ_WINDOW_OPEN``: the guest can take an interrupt now."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``KVM_EXIT_SHUTDOWN``: a triple fault (or another shutdown condition)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class Intr:
    """``KVM_EXIT_INTR``, or ``KVM_RUN`` interrupted by a signal / ``immediate_exit`` (a kick)."""


@dataclass(frozen=True, slots=True)
class SetTpr:
    """``KVM_EXIT_SET_TPR``."""


@dataclass(frozen=True, slots=True)
class TprAccess:
    """``KVM_EXIT_TPR_ACCESS``."""

    rip: int
    is_write: bool


@dataclass(frozen=True, slots=True)
class Nmi:
    """``KVM_EXIT_NMI``."""


@dataclass(frozen=True, slots=True)
class InternalError:
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not go on (``suberror``: a ``KVM_INTERNAL_ERROR_*``).

    For an emulation failure with instruction bytes, ``insn_bytes`` holds them.
    """

    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes = b""

    @property
    def suberror_name(self) -> str:
        try:
            return InternalErrorSub(self.suberror).name
        except ValueError:
            return f"suberror {self.suberror}"


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """``KVM_EXIT_SYSTEM_EVENT``: shutdown, reset, crash... (``type``: a ``KVM_SYSTEM_EVENT_*``)."""

    type: int
    data: tuple[int, ...]

    @property
    def type_name(self) -> str:
        try:
            return SystemEventType(self.type).name
        except ValueError:
            return f"type {self.type}"


@dataclass(frozen=True, slots=True)
class IoapicEoi:
    """``KVM_EXIT_IOAPIC_EOI`` (split irqchip)."""

    vector: int


@dataclass(frozen=True, slots=True)
class Hyperv:
    """``KVM_EXIT_HYPERV``: ``type`` and the raw union words."""

    type: int
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class X86Rdmsr:
    """``KVM_EXIT_X86_RDMSR``: answer with :meth:`pykvm.vcpu.Vcpu.complete_rdmsr`."""

    index: int
    reason: int


@dataclass(frozen=True, slots=True)
class X86Wrmsr:
    """``KVM_EXIT_X86_WRMSR``: accept or refuse with :meth:`pykvm.vcpu.Vcpu.complete_wrmsr`."""

    index: int
    reason: int
    data: int


@dataclass(frozen=True, slots=True)
class DirtyRingFull:
    """``KVM_EXIT_DIRTY_RING_FULL``."""


@dataclass(frozen=True, slots=True)
class ApResetHold:
    """``KVM_EXIT_AP_RESET_HOLD`` (SEV-ES)."""


@dataclass(frozen=True, slots=True)
class X86BusLock:
    """``KVM_EXIT_X86_BUS_LOCK``."""


@dataclass(frozen=True, slots=True)
class Xen:
    """``KVM_EXIT_XEN``: a Xen hypercall (``type``, ``longmode``, ``cpl``, ``input``, ``params``)."""

    type: int
    longmode: bool
    cpl: int
    input: int
    params: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Notify:
    """``KVM_EXIT_NOTIFY``: the guest was stuck in a non-interruptible window."""

    flags: int


@dataclass(frozen=True, slots=True)
class MemoryFault:
    """``KVM_EXIT_MEMORY_FAULT`` (kernel 6.8+): ``flags``, ``gpa``, ``size``."""

    flags: int
    gpa: int
    size: int


Exit = Union[
    Unknown, ExceptionExit, IoOut, IoIn, Hypercall, Debug, Hlt, MmioWrite, MmioRead, IrqWindowOpen,
    Shutdown, FailEntry, Intr, SetTpr, TprAccess, Nmi, InternalError, SystemEvent, IoapicEoi, Hyperv,
    X86Rdmsr, X86Wrmsr, DirtyRingFull, ApResetHold, X86BusLock, Xen, Notify, MemoryFault,
]

# ---- decoding the kvm_run page ---------------------------------------------------------------------

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()


# The hot decoders build their exit without calling the dataclass's __init__: a frozen dataclass
# sets each field through object.__setattr__, and on kvm_pvm, where every exit leaves the caches
# cold, that __init__ cost about 2.2 us an exit in a loop that builds one IoOut per exit, against
# about 1.2 us for object.__new__ and each slot's own descriptor (the same value, fields in order).
_new = object.__new__


def _slot_setters(cls, *names: str):
    return tuple(getattr(cls, name).__set__ for name in names)


_OUT_PORT, _OUT_SIZE, _OUT_COUNT, _OUT_DATA = _slot_setters(IoOut, "port", "size", "count", "data")
_IN_PORT, _IN_SIZE, _IN_COUNT, _IN_DATA = _slot_setters(IoIn, "port", "size", "count", "data")
_MW_GPA, _MW_DATA = _slot_setters(MmioWrite, "gpa", "data")
_MR_GPA, _MR_DATA = _slot_setters(MmioRead, "gpa", "data")
_RD_INDEX, _RD_REASON = _slot_setters(X86Rdmsr, "index", "reason")
_WR_INDEX, _WR_REASON, _WR_DATA = _slot_setters(X86Wrmsr, "index", "reason", "data")

IO_STRUCT = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
IO_OFFSET = ffi.offsetof("struct kvm_run", "io")


def io_exit(direction: int, size: int, port: int, count: int, data) -> IoOut | IoIn:
    """The exit of a ``KVM_EXIT_IO`` (``data``: the bytes written, or the view to fill)."""
    if direction == EXIT_IO_OUT:
        exit = _new(IoOut)
        _OUT_PORT(exit, port)
        _OUT_SIZE(exit, size)
        _OUT_COUNT(exit, count)
        _OUT_DATA(exit, data)
        return exit
    exit = _new(IoIn)
    _IN_PORT(exit, port)
    _IN_SIZE(exit, size)
    _IN_COUNT(exit, count)
    _IN_DATA(exit, data)
    return exit


def mmio_exit(gpa: int, is_write: int, data) -> MmioWrite | MmioRead:
    """The exit of a ``KVM_EXIT_MMIO`` (``data``: the bytes written, or the view to fill)."""
    if is_write:
        exit = _new(MmioWrite)
        _MW_GPA(exit, gpa)
        _MW_DATA(exit, data)
        return exit
    exit = _new(MmioRead)
    _MR_GPA(exit, gpa)
    _MR_DATA(exit, data)
    return exit


def msr_exit(exit_reason: int, reason: int, index: int, data: int) -> X86Rdmsr | X86Wrmsr:
    """The exit of a ``KVM_EXIT_X86_RDMSR`` / ``KVM_EXIT_X86_WRMSR`` (``reason``: the msr.reason)."""
    if exit_reason == ExitReason.X86_RDMSR:
        exit = _new(X86Rdmsr)
        _RD_INDEX(exit, index)
        _RD_REASON(exit, reason)
        return exit
    exit = _new(X86Wrmsr)
    _WR_INDEX(exit, index)
    _WR_REASON(exit, reason)
    _WR_DATA(exit, data)
    return exit


def _io(run, page: memoryview):
    # One unpack instead of five cffi field reads: this is the hottest decoder.
    direction, size, port, count, start = IO_STRUCT.unpack_from(page, IO_OFFSET)
    data = page[start : start + size * count]
    return io_exit(direction, size, port, count, data.tobytes() if direction == EXIT_IO_OUT else data)


MMIO_STRUCT = struct.Struct("<Q8xIB")  # kvm_run.mmio: phys_addr, (data[8]), len, is_write
MMIO_OFFSET = ffi.offsetof("struct kvm_run", "mmio")
MMIO_DATA = MMIO_OFFSET + 8  # mmio.data follows the 8-byte phys_addr


def _mmio(run, page: memoryview):
    gpa, size, is_write = MMIO_STRUCT.unpack_from(page, MMIO_OFFSET)
    data = page[MMIO_DATA : MMIO_DATA + size]
    return mmio_exit(gpa, is_write, data.tobytes() if is_write else data)


MSR_STRUCT = struct.Struct("<8xIIQ")  # kvm_run.msr: (error, pad[7]), reason, index, data
MSR_OFFSET = ffi.offsetof("struct kvm_run", "msr")


def _rdmsr(run, page: memoryview):
    return msr_exit(ExitReason.X86_RDMSR, *MSR_STRUCT.unpack_from(page, MSR_OFFSET))


def _wrmsr(run, page: memoryview):
    return msr_exit(ExitReason.X86_WRMSR, *MSR_STRUCT.unpack_from(page, MSR_OFFSET))


def _internal(run, page):
    sub = run.internal.suberror
    ndata = min(run.internal.ndata, 16)
    data = tuple(run.internal.data[0:ndata])
    insn = b""
    if sub == InternalErrorSub.EMULATION and ndata >= 2 and run.emulation_failure.flags & 1:
        n = min(run.emulation_failure.insn_size, 15)
        insn = bytes(run.emulation_failure.insn_bytes[0:n])
    return InternalError(sub, data, insn)


_UNION = ffi.offsetof("struct kvm_run", "hw")


def _memory_fault(run, page):
    flags, gpa, size = struct.unpack_from("<QQQ", page, _UNION)
    return MemoryFault(flags, gpa, size)


def _system_event(run, page):
    ev = run.system_event
    return SystemEvent(ev.type, tuple(ev.data[0 : min(ev.ndata, 16)]))


_DECODERS_BY_REASON = {
    ExitReason.UNKNOWN: lambda run, page: Unknown(0, run.hw.hardware_exit_reason),
    ExitReason.EXCEPTION: lambda run, page: ExceptionExit(run.ex.exception, run.ex.error_code),
    ExitReason.IO: _io,
    ExitReason.HYPERCALL: lambda run, page: Hypercall(
        run.hypercall.nr, tuple(run.hypercall.args), bool(run.hypercall.longmode)
    ),
    ExitReason.DEBUG: lambda run, page: Debug(
        run.debug.arch.exception, run.debug.arch.pc, run.debug.arch.dr6, run.debug.arch.dr7
    ),
    ExitReason.HLT: lambda run, page: _HLT,
    ExitReason.MMIO: _mmio,
    ExitReason.IRQ_WINDOW_OPEN: lambda run, page: IrqWindowOpen(),
    ExitReason.SHUTDOWN: lambda run, page: _SHUTDOWN,
    ExitReason.FAIL_ENTRY: lambda run, page: FailEntry(
        run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu
    ),
    ExitReason.INTR: lambda run, page: _INTR,
    ExitReason.SET_TPR: lambda run, page: SetTpr(),
    ExitReason.TPR_ACCESS: lambda run, page: TprAccess(run.tpr_access.rip, bool(run.tpr_access.is_write)),
    ExitReason.NMI: lambda run, page: Nmi(),
    ExitReason.INTERNAL_ERROR: _internal,
    ExitReason.SYSTEM_EVENT: _system_event,
    ExitReason.IOAPIC_EOI: lambda run, page: IoapicEoi(run.eoi.vector),
    ExitReason.HYPERV: lambda run, page: Hyperv(
        run.hyperv.type, bytes(page[_UNION : _UNION + ffi.sizeof("struct kvm_hyperv_exit")])
    ),
    ExitReason.X86_RDMSR: _rdmsr,
    ExitReason.X86_WRMSR: _wrmsr,
    ExitReason.DIRTY_RING_FULL: lambda run, page: DirtyRingFull(),
    ExitReason.AP_RESET_HOLD: lambda run, page: ApResetHold(),
    ExitReason.X86_BUS_LOCK: lambda run, page: X86BusLock(),
    ExitReason.XEN: lambda run, page: Xen(
        run.xen.type,
        bool(run.xen.u.hcall.longmode),
        run.xen.u.hcall.cpl,
        run.xen.u.hcall.input,
        tuple(run.xen.u.hcall.params),
    ),
    ExitReason.NOTIFY: lambda run, page: Notify(run.notify.flags),
    ExitReason.MEMORY_FAULT: _memory_fault,
}
_DECODERS = {int(reason): decoder for reason, decoder in _DECODERS_BY_REASON.items()}  # int keys hash faster


def _unknown(run, page) -> Unknown:
    return Unknown(run.exit_reason)


#: ``DECODERS.get(reason, decode_unknown)(run, page)`` is :func:`decode` without its own call (the run loops').
DECODERS = _DECODERS
decode_unknown = _unknown


def decode(run, page: memoryview) -> Exit:
    """Turn the ``kvm_run`` page after ``KVM_RUN`` returned into an exit value."""
    return _DECODERS.get(run.exit_reason, _unknown)(run, page)
