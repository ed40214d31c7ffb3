"""``Kvm``: the ``/dev/kvm`` file descriptor (system ioctls)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ._fd import FdObject
from ._ffi import ffi
from .constants import Cap
from .ioctl import KvmError, KvmUnavailableError

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12


def unavailable_message(path: str, err: OSError) -> str:
    """One line saying why ``path`` could not be opened and how to fix it."""
    code = err.errno
    if code == errno.ENOENT:
        return (
            f"{path} does not exist: this host has no KVM. Enable VT-x/AMD-V in the firmware and load the "
            "module (modprobe kvm_intel or modprobe kvm_amd); inside a VM, turn on nested virtualization"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied opening {path}: add your user to the 'kvm' group "
            "(sudo usermod -aG kvm $USER, then log in again) or run as root"
        )
    if code in (errno.ENXIO, errno.ENODEV):
        return (
            f"{path} exists but no KVM module serves it: load kvm_intel or kvm_amd and check that "
            "virtualization is enabled in the firmware (dmesg says why the module refused)"
        )
    return f"cannot open {path}: {os.strerror(code) if code else err}"


def get_list(obj: FdObject, name: str, ctype: str, count_field: str, items_field: str, count: int = 64, convert=int):
    """Issue a ``KVM_GET_*`` ioctl that fills a variable-length list, growing the buffer on E2BIG.

    Each item is passed through ``convert`` while the buffer is alive."""
    while True:
        buf = ffi.new(f"{ctype} *", {count_field: count, items_field: count})
        try:
            obj._ioctl(name, buf)
        except KvmError as e:
            if e.errno != errno.E2BIG or count >= 1 << 16:
                raise
            count = max(count * 2, getattr(buf, count_field))
            continue
        items = getattr(buf, items_field)
        return [convert(items[i]) for i in range(getattr(buf, count_field))]


def msrs_struct(entries: dict[int, int] | list[int]):
    """A ``struct kvm_msrs`` for KVM_GET_MSRS (a list of indices) or KVM_SET_MSRS (index -> value)."""
    items = list(entries.items()) if isinstance(entries, dict) else [(i, 0) for i in entries]
    buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
    for n, (index, value) in enumerate(items):
        if not 0 <= index < 1 << 32 or not 0 <= value < 1 << 64:
            raise ValueError(f"MSR {index:#x} = {value:#x} is out of range")
        buf.entries[n].index = index
        buf.entries[n].data = value
    return buf


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``: the registers CPUID returns for (function, index)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_c(cls, entry) -> CpuidEntry:
        return cls(entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx)

    def to_c(self, entry) -> None:
        for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            setattr(entry, name, getattr(self, name))


def cpuid_list(obj: FdObject, name: str) -> list[CpuidEntry]:
    """A ``KVM_*_CPUID`` list ioctl, as :class:`CpuidEntry` values."""
    return get_list(obj, name, "struct kvm_cpuid2", "nent", "entries", 128, CpuidEntry.from_c)


class Kvm(FdObject):
    """The KVM subsystem: ``/dev/kvm``. Creates VMs and answers what the host supports."""

    def __init__(self, path: str | None = None):
        path = KVM_PATH if path is None else path
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailableError(e.errno, unavailable_message(path, e)) from None
        version = self.get_api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                errno.EINVAL, f"{path} speaks KVM API version {version}, pykvm needs {KVM_API_VERSION}"
            )
        self._vcpu_mmap_size: int | None = None
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None

    def __repr__(self) -> str:
        return f"<Kvm {self.path} fd={self._fd}>"

    def get_api_version(self) -> int:
        """The KVM API version (12 on every kernel since 2.6.22). Wraps ``KVM_GET_API_VERSION``."""
        return self._ioctl("KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        """0 if ``cap`` is absent, else its value (often 1). Wraps ``KVM_CHECK_EXTENSION``."""
        return self._ioctl("KVM_CHECK_EXTENSION", int(cap))

    def has_cap(self, cap: Cap | int) -> bool:
        return self.check_extension(cap) > 0

    def get_vcpu_mmap_size(self) -> int:
        """Bytes to mmap from a vCPU fd (kvm_run and the pages after it). Wraps ``KVM_GET_VCPU_MMAP_SIZE``."""
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE")

    @property
    def vcpu_mmap_size(self) -> int:
        """Cached answer of :meth:`get_vcpu_mmap_size` (fetched once, at VM creation)."""
        if self._vcpu_mmap_size is None:
            raise ValueError("vcpu_mmap_size is known once a VM is created")
        return self._vcpu_mmap_size

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """CPUID entries KVM can give a guest. Wraps ``KVM_GET_SUPPORTED_CPUID``."""
        return cpuid_list(self, "KVM_GET_SUPPORTED_CPUID")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """:meth:`get_supported_cpuid`'s answer, asked once per open /dev/kvm (it cannot change
        while the module stays loaded, and this fd keeps it loaded): a new list each call, of
        immutable entries. Machines that share a ``Kvm`` save the ioctl and the decoding."""
        if self._supported_cpuid is None:
            self._supported_cpuid = tuple(self.get_supported_cpuid())
        return list(self._supported_cpuid)

    def get_emulated_cpuid(self) -> list[CpuidEntry]:
        """CPUID entries KVM emulates in software. Wraps ``KVM_GET_EMULATED_CPUID``."""
        return cpuid_list(self, "KVM_GET_EMULATED_CPUID")

    def get_msr_index_list(self) -> list[int]:
        """MSRs a vCPU's KVM_GET/SET_MSRS can save and restore. Wraps ``KVM_GET_MSR_INDEX_LIST``."""
        return get_list(self, "KVM_GET_MSR_INDEX_LIST", "struct kvm_msr_list", "nmsrs", "indices", 256)

    def get_msr_feature_index_list(self) -> list[int]:
        """Feature MSRs (VMX capabilities, ARCH_CAPABILITIES...) readable on /dev/kvm.

        Wraps ``KVM_GET_MSR_FEATURE_INDEX_LIST``."""
        return get_list(self, "KVM_GET_MSR_FEATURE_INDEX_LIST", "struct kvm_msr_list", "nmsrs", "indices", 64)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Values of feature MSRs, up to the first one KVM does not offer (the rest are left out).

        Wraps ``KVM_GET_MSRS``."""
        buf = msrs_struct(indices)
        done = self._ioctl("KVM_GET_MSRS", buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def create_vm(self, machine_type: int = 0):
        """A new, empty VM. Wraps ``KVM_CREATE_VM``."""
        from .vm import Vm

        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = self.get_vcpu_mmap_size()
        return Vm(self, self._ioctl("KVM_CREATE_VM", machine_type))
