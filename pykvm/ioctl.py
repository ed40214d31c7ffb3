"""KVM ioctl request numbers and the one function that issues an ioctl.

Request numbers are computed with :mod:`ioctl_opt` from the sizes cffi gives for the structures in
``cdefs/``, so a wrong declaration changes the number and ``tests/test_layout.py`` catches it.
The call goes through cffi (never ``fcntl.ioctl``, which caps buffers at 1024 bytes and parses an
integer argument as a C int), and ``errno`` is read straight after it.
"""

from __future__ import annotations

import errno as _errno
import os

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from ._ffi import ffi, lib

KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


#: Every request pykvm issues, by its <linux/kvm.h> name.
REQUESTS: dict[str, int] = {
    # /dev/kvm
    "KVM_GET_API_VERSION": _io(0x00),
    "KVM_CREATE_VM": _io(0x01),
    "KVM_GET_MSR_INDEX_LIST": _iowr(0x02, "struct kvm_msr_list"),
    "KVM_CHECK_EXTENSION": _io(0x03),
    "KVM_GET_VCPU_MMAP_SIZE": _io(0x04),
    "KVM_GET_SUPPORTED_CPUID": _iowr(0x05, "struct kvm_cpuid2"),
    "KVM_GET_EMULATED_CPUID": _iowr(0x09, "struct kvm_cpuid2"),
    "KVM_GET_MSR_FEATURE_INDEX_LIST": _iowr(0x0A, "struct kvm_msr_list"),
    # VM
    "KVM_CREATE_VCPU": _io(0x41),
    "KVM_GET_DIRTY_LOG": _iow(0x42, "struct kvm_dirty_log"),
    "KVM_CLEAR_DIRTY_LOG": _iowr(0xC0, "struct kvm_clear_dirty_log"),
    "KVM_RESET_DIRTY_RINGS": _io(0xC7),
    "KVM_SET_USER_MEMORY_REGION": _iow(0x46, "struct kvm_userspace_memory_region"),
    "KVM_SET_TSS_ADDR": _io(0x47),
    "KVM_SET_IDENTITY_MAP_ADDR": _iow(0x48, "__u64"),
    "KVM_CREATE_IRQCHIP": _io(0x60),
    "KVM_IRQ_LINE": _iow(0x61, "struct kvm_irq_level"),
    "KVM_GET_IRQCHIP": _iowr(0x62, "struct kvm_irqchip"),
    "KVM_SET_IRQCHIP": _ior(0x63, "struct kvm_irqchip"),
    "KVM_REGISTER_COALESCED_MMIO": _iow(0x67, "struct kvm_coalesced_mmio_zone"),
    "KVM_UNREGISTER_COALESCED_MMIO": _iow(0x68, "struct kvm_coalesced_mmio_zone"),
    "KVM_IRQ_LINE_STATUS": _iowr(0x67, "struct kvm_irq_level"),
    "KVM_SET_GSI_ROUTING": _iow(0x6A, "struct kvm_irq_routing"),
    "KVM_IRQFD": _iow(0x76, "struct kvm_irqfd"),
    "KVM_REINJECT_CONTROL": _io(0x71),  # takes a struct kvm_reinject_control *, declared _IO in <linux/kvm.h>
    "KVM_CREATE_PIT2": _iow(0x77, "struct kvm_pit_config"),
    "KVM_IOEVENTFD": _iow(0x79, "struct kvm_ioeventfd"),
    "KVM_SET_CLOCK": _iow(0x7B, "struct kvm_clock_data"),
    "KVM_GET_CLOCK": _ior(0x7C, "struct kvm_clock_data"),
    "KVM_GET_PIT2": _ior(0x9F, "struct kvm_pit_state2"),
    "KVM_SET_PIT2": _iow(0xA0, "struct kvm_pit_state2"),
    "KVM_ENABLE_CAP": _iow(0xA3, "struct kvm_enable_cap"),
    "KVM_SIGNAL_MSI": _iow(0xA5, "struct kvm_msi"),
    "KVM_X86_SET_MSR_FILTER": _iow(0xC6, "struct kvm_msr_filter"),
    "KVM_GET_STATS_FD": _io(0xCE),
    # vCPU
    "KVM_RUN": _io(0x80),
    "KVM_GET_REGS": _ior(0x81, "struct kvm_regs"),
    "KVM_SET_REGS": _iow(0x82, "struct kvm_regs"),
    "KVM_GET_SREGS": _ior(0x83, "struct kvm_sregs"),
    "KVM_SET_SREGS": _iow(0x84, "struct kvm_sregs"),
    "KVM_TRANSLATE": _iowr(0x85, "struct kvm_translation"),
    "KVM_INTERRUPT": _iow(0x86, "struct kvm_interrupt"),
    "KVM_GET_MSRS": _iowr(0x88, "struct kvm_msrs"),
    "KVM_SET_MSRS": _iow(0x89, "struct kvm_msrs"),
    "KVM_GET_FPU": _ior(0x8C, "struct kvm_fpu"),
    "KVM_SET_FPU": _iow(0x8D, "struct kvm_fpu"),
    "KVM_GET_LAPIC": _ior(0x8E, "struct kvm_lapic_state"),
    "KVM_SET_LAPIC": _iow(0x8F, "struct kvm_lapic_state"),
    "KVM_SET_CPUID2": _iow(0x90, "struct kvm_cpuid2"),
    "KVM_GET_CPUID2": _iowr(0x91, "struct kvm_cpuid2"),
    "KVM_GET_MP_STATE": _ior(0x98, "struct kvm_mp_state"),
    "KVM_SET_MP_STATE": _iow(0x99, "struct kvm_mp_state"),
    "KVM_NMI": _io(0x9A),
    "KVM_SET_GUEST_DEBUG": _iow(0x9B, "struct kvm_guest_debug"),
    "KVM_GET_VCPU_EVENTS": _ior(0x9F, "struct kvm_vcpu_events"),
    "KVM_SET_VCPU_EVENTS": _iow(0xA0, "struct kvm_vcpu_events"),
    "KVM_GET_DEBUGREGS": _ior(0xA1, "struct kvm_debugregs"),
    "KVM_SET_DEBUGREGS": _iow(0xA2, "struct kvm_debugregs"),
    "KVM_GET_XSAVE": _ior(0xA4, "struct kvm_xsave"),
    "KVM_SET_XSAVE": _iow(0xA5, "struct kvm_xsave"),
    "KVM_GET_XCRS": _ior(0xA6, "struct kvm_xcrs"),
    "KVM_SET_XCRS": _iow(0xA7, "struct kvm_xcrs"),
    "KVM_GET_SREGS2": _ior(0xCC, "struct kvm_sregs2"),
    "KVM_SET_SREGS2": _iow(0xCD, "struct kvm_sregs2"),
    "KVM_GET_XSAVE2": _ior(0xCF, "struct kvm_xsave"),
}

KVM_RUN = REQUESTS["KVM_RUN"]


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed. ``.ioctl`` names the request.

    Reads like ``KVM_CREATE_VCPU: [Errno 17] File exists``.
    """

    def __init__(self, err: int, ioctl: str):
        super().__init__(err, os.strerror(err))
        self.ioctl = ioctl

    def __str__(self) -> str:
        return f"{self.ioctl}: {super().__str__()}"


class KvmUnavailableError(OSError):
    """``/dev/kvm`` could not be opened; the message always says how to fix it."""


class KvmUnsupportedError(RuntimeError):
    """This host's KVM cannot do what was asked (a missing capability, or a backend limit)."""


_ULONG = "unsigned long"


def ioctl(fd: int, name: str, arg=0) -> int:
    """Issue the KVM ioctl ``name`` on ``fd`` and return its non-negative result.

    ``arg`` is a cffi pointer (a structure the kernel reads or fills) or an integer (passed as an
    ``unsigned long``). A failure raises :class:`KvmError` with the errno read at once after the call.
    """
    request = REQUESTS[name]
    if not isinstance(arg, ffi.CData):
        if not isinstance(arg, int) or arg < 0:
            raise ValueError(f"{name}: argument must be a cffi pointer or a non-negative int, not {arg!r}")
        arg = ffi.cast(_ULONG, arg)
    ret = lib.ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(ffi.errno, name)
    return ret


_NOARG = ffi.cast(_ULONG, 0)
# The hot path calls ioctl through a fixed three-argument prototype: cffi's ABI-mode call of a
# variadic function costs about 0.35 us more per call. On x86-64 Linux an integer third argument
# is passed in the same register either way, and glibc's ioctl is a plain syscall wrapper.
_ioctl3 = ffi.cast("int(*)(int, unsigned long, unsigned long)", ffi.addressof(lib, "ioctl"))


def ioctl_run(fd: int) -> int:
    """``KVM_RUN`` on the hot path: returns 0, or ``-errno`` for EINTR/EAGAIN (a kicked vCPU)."""
    ret = _ioctl3(fd, KVM_RUN, 0)
    if ret < 0:
        err = ffi.errno
        if err in (_errno.EINTR, _errno.EAGAIN):
            return -err
        raise KvmError(err, "KVM_RUN")
    return ret


#: For a run loop that inlines :func:`ioctl_run` (one Python call less per exit): call
#: ``KVM_RUN_CALL(fd, KVM_RUN, 0)`` and, when it returns a negative value, :func:`run_error` at once
#: (before any other cffi call in the thread, which would replace the errno cffi saved).
KVM_RUN_CALL = _ioctl3


def run_error() -> int:
    """After ``KVM_RUN_CALL`` failed: ``-errno`` for EINTR/EAGAIN (a kicked vCPU); else raises KvmError."""
    err = ffi.errno
    if err in (_errno.EINTR, _errno.EAGAIN):
        return -err
    raise KvmError(err, "KVM_RUN")
