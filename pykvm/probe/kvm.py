"""What this host's KVM offers: the device, the backend module, capabilities, CPUID, MSRs, stats.

:func:`collect_kvm` gathers everything into one :class:`KvmInfo`. It never raises for an
environment problem: each step that fails records a one-line message in :attr:`KvmInfo.errors`
(keyed by step) and leaves its field ``None``; the other steps still run. When ``/dev/kvm`` cannot
be opened at all, the ioctl steps are not attempted and the open error (which says the fix) is
the only one recorded for them.

The binary statistics follow ``Documentation/virt/kvm/api.rst`` (``KVM_GET_STATS_FD``): a
``struct kvm_stats_header``, then ``num_desc`` descriptors of ``struct kvm_stats_desc`` each
followed by a ``name_size``-byte name, and the values as u64s at ``data_offset + desc.offset``.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from ..constants import Cap
from ..ioctl import KvmUnavailableError
from .. import system
from ..stats import StatDescriptor, Stats, read_stats, read_stats_of
from ..system import Kvm
from . import host
from .cpuid import CpuidTable, summarize

if TYPE_CHECKING:
    from ..vm import Vm

__all__ = [
    "VMX_MSR_FIRST",
    "VMX_MSR_LAST",
    "BackendInfo",
    "DeviceInfo",
    "KvmInfo",
    "StatDescriptor",
    "Stats",
    "collect_backend",
    "collect_device",
    "collect_kvm",
    "parse_bool",
    "read_stats",
]

#: IA32_VMX_BASIC .. IA32_VMX_PROCBASED_CTLS3: the VMX capability MSRs nested KVM gives an L1.
VMX_MSR_FIRST = 0x480
VMX_MSR_LAST = 0x492

T = TypeVar("T")


def _frozen(mapping: Mapping[Any, T]) -> Mapping[Any, T]:
    return MappingProxyType(dict(mapping))


def _plain(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, one level deep (``dataclasses.asdict`` cannot copy a mapping proxy)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _maybe(value: T | None, convert: Callable[[T], Any]) -> Any:
    return None if value is None else convert(value)


def _msr_json(msrs: Mapping[int, int]) -> list[dict[str, int]]:
    return [{"index": i, "value": v} for i, v in sorted(msrs.items())]


# ---------------------------------------------------------------------------------------------
# The device node
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """``/dev/kvm`` as a file: who may open it, and what opening it said."""

    path: str
    exists: bool
    mode: str | None  # permission bits in octal, e.g. "0660"
    owner: str | None
    group: str | None
    accessible: bool  # the invoking user may read and write it (os.access)
    in_group: bool | None  # the process holds the device's group now
    listed_in_group: bool | None  # the user is a member in the group database (maybe not logged in again yet)
    open_error: str | None  # KvmUnavailableError.strerror: what failed and how to fix it

    def to_json(self) -> dict[str, Any]:
        return _plain(self)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _listed_in_group(gid: int) -> bool | None:
    try:
        user = pwd.getpwuid(os.getuid())
    except KeyError:
        return None
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return None


def collect_device(path: str | None = None, open_error: str | None = None) -> DeviceInfo:
    """Stat ``path``: mode, owner, group, and whether this user can (or could, after a log-in) use it."""
    path = system.KVM_PATH if path is None else path
    try:
        st = os.stat(path)
    except OSError:
        return DeviceInfo(path, False, None, None, None, False, None, None, open_error)
    return DeviceInfo(
        path=path,
        exists=True,
        mode=f"{stat.S_IMODE(st.st_mode):04o}",
        owner=_user_name(st.st_uid),
        group=_group_name(st.st_gid),
        accessible=os.access(path, os.R_OK | os.W_OK),
        in_group=st.st_gid == os.getegid() or st.st_gid in os.getgroups(),
        listed_in_group=_listed_in_group(st.st_gid),
        open_error=open_error,
    )


# ---------------------------------------------------------------------------------------------
# The backend module and its parameters
# ---------------------------------------------------------------------------------------------


def parse_bool(value: str | None) -> bool | None:
    """A module parameter as a boolean: kvm_intel prints ``Y``/``N``, kvm_amd ``1``/``0``."""
    if value is None:
        return None
    text = value.strip()
    if text in ("Y", "y"):
        return True
    if text in ("N", "n"):
        return False
    try:
        return int(text) != 0
    except ValueError:
        return None


def read_params(module_dir: Path) -> dict[str, str | None]:
    """``/sys/module/<name>/parameters``: name -> stripped value, None where unreadable."""
    params: dict[str, str | None] = {}
    try:
        files = sorted((module_dir / "parameters").iterdir())
    except OSError:
        return params
    for file in files:
        try:
            params[file.name] = file.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            params[file.name] = None
    return params


@dataclass(frozen=True)
class BackendInfo:
    """The module serving ``/dev/kvm``, its parameters and the ``kvm`` module's.

    The booleans are ``None`` where the backend has no such parameter (kvm_amd has no ``ept``,
    kvm_intel no ``npt``, kvm_pvm none of them) or it could not be read.
    """

    module: str | None
    params: Mapping[str, str | None]
    kvm_params: Mapping[str, str | None]
    nested: bool | None
    ept: bool | None  # kvm_intel
    npt: bool | None  # kvm_amd
    vpid: bool | None  # kvm_intel
    unrestricted_guest: bool | None  # kvm_intel
    enable_apicv: bool | None  # kvm_intel
    avic: bool | None  # kvm_amd

    def to_json(self) -> dict[str, Any]:
        return {**_plain(self), "params": dict(self.params), "kvm_params": dict(self.kvm_params)}


_BOOL_PARAMS = ("nested", "ept", "npt", "vpid", "unrestricted_guest", "enable_apicv", "avic")


def collect_backend(sys_module: Path | None = None) -> BackendInfo:
    """Read the backend's and ``kvm``'s parameters under ``sys_module`` (default ``/sys/module``)."""
    root = host.SYS_MODULE if sys_module is None else sys_module
    module = host.kvm_backend(root)
    params = read_params(root / module) if module else {}
    flags = {name: parse_bool(params.get(name)) for name in _BOOL_PARAMS}
    return BackendInfo(module, _frozen(params), _frozen(read_params(root / "kvm")), **flags)


# ---------------------------------------------------------------------------------------------
# Binary statistics
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Everything
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmInfo:
    """What ``/dev/kvm`` offers. A field is ``None`` when its step failed or was not attempted."""

    device: DeviceInfo
    backend: BackendInfo
    api_version: int | None
    caps: Mapping[str, int] | None  # every Cap on the /dev/kvm fd, name -> KVM_CHECK_EXTENSION
    vm_caps: Mapping[str, int] | None  # on a VM fd, only those that answer differently there
    supported_cpuid: CpuidTable | None  # KVM_GET_SUPPORTED_CPUID
    guest_vmx: bool | None  # a guest may be offered VMX (leaf 1 ECX[5]): nested VT-x
    guest_svm: bool | None  # a guest may be offered SVM (0x80000001 ECX[2]): nested AMD-V
    msr_index_list: tuple[int, ...] | None
    msr_feature_index_list: tuple[int, ...] | None
    feature_msrs: Mapping[int, int] | None  # KVM_GET_MSRS on /dev/kvm
    vmx_msrs: Mapping[int, int] | None  # feature_msrs in 0x480-0x492: the VMX MSRs an L1 would see
    vm_stats: Stats | None
    vcpu_stats: Stats | None
    errors: Mapping[str, str]  # step -> one-line message

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data; integers stay numbers, MSRs are lists of ``{"index", "value"}``."""
        return {
            "device": self.device.to_json(),
            "backend": self.backend.to_json(),
            "api_version": self.api_version,
            "caps": _maybe(self.caps, dict),
            "vm_caps": _maybe(self.vm_caps, dict),
            "supported_cpuid": _maybe(self.supported_cpuid, CpuidTable.to_json),
            "guest_vmx": self.guest_vmx,
            "guest_svm": self.guest_svm,
            "msr_index_list": _maybe(self.msr_index_list, list),
            "msr_feature_index_list": _maybe(self.msr_feature_index_list, list),
            "feature_msrs": _maybe(self.feature_msrs, _msr_json),
            "vmx_msrs": _maybe(self.vmx_msrs, _msr_json),
            "vm_stats": _maybe(self.vm_stats, Stats.to_json),
            "vcpu_stats": _maybe(self.vcpu_stats, Stats.to_json),
            "errors": dict(self.errors),
        }


def _check_caps(obj: Kvm | Vm) -> tuple[dict[str, int], list[str]]:
    values: dict[str, int] = {}
    failed: list[str] = []
    for cap in Cap:
        try:
            values[cap.name] = obj.check_extension(cap)
        except OSError as e:
            failed.append(f"{cap.name}: {e.strerror}")
    return values, failed


def _read_feature_msrs(kvm: Kvm, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS stops at the first MSR it cannot read: skip that one and go on with the rest."""
    values: dict[int, int] = {}
    while indices:
        got = kvm.get_msrs(indices)
        values.update(got)
        indices = indices[len(got) + 1 :]
    return values


class _Collector:
    """Runs steps, recording each failure as ``errors[step]`` instead of raising."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def run(self, step: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except KvmUnavailableError as e:
            self.errors[step] = e.strerror or str(e)
        except (OSError, ValueError) as e:
            self.errors[step] = str(e)
        return None


#: The KvmInfo fields read from an open ``/dev/kvm`` (all None when it cannot be opened).
_IOCTL_FIELDS = (
    "api_version", "caps", "vm_caps", "supported_cpuid", "msr_index_list", "msr_feature_index_list",
    "feature_msrs", "vm_stats", "vcpu_stats",
)


def _vmx_subset(msrs: Mapping[int, int]) -> Mapping[int, int]:
    return _frozen({i: v for i, v in msrs.items() if VMX_MSR_FIRST <= i <= VMX_MSR_LAST})


def collect_kvm(path: str | None = None) -> KvmInfo:
    """Everything the probe reports about KVM on this host (see the module docstring)."""
    path = system.KVM_PATH if path is None else path  # looked up now: tests and callers may change it
    c = _Collector()
    found: dict[str, Any] = dict.fromkeys(_IOCTL_FIELDS)
    kvm = c.run("open", lambda: Kvm(path))
    if kvm is not None:
        with kvm:
            found.update(_collect_from(kvm, c))
    summary = _maybe(found["supported_cpuid"], summarize)
    return KvmInfo(
        device=collect_device(path, c.errors.get("open")),
        backend=collect_backend(),
        guest_vmx=None if summary is None else summary.vmx,
        guest_svm=None if summary is None else summary.svm,
        vmx_msrs=_maybe(found["feature_msrs"], _vmx_subset),
        errors=_frozen(c.errors),
        **found,
    )


def _collect_from(kvm: Kvm, c: _Collector) -> dict[str, Any]:
    """The ioctl steps on an open ``/dev/kvm``."""
    out: dict[str, Any] = {"api_version": c.run("api_version", kvm.get_api_version)}
    caps, failed = _check_caps(kvm)
    out["caps"] = _frozen(caps)
    if failed:
        c.errors["caps"] = "KVM_CHECK_EXTENSION failed for " + ", ".join(failed)
    entries = c.run("supported_cpuid", kvm.get_supported_cpuid)
    if entries is not None:
        out["supported_cpuid"] = CpuidTable(((e.function, e.index), (e.eax, e.ebx, e.ecx, e.edx)) for e in entries)
    out["msr_index_list"] = _maybe(c.run("msr_index_list", kvm.get_msr_index_list), tuple)
    features = c.run("msr_feature_index_list", kvm.get_msr_feature_index_list)
    if features is not None:
        out["msr_feature_index_list"] = tuple(features)
        out["feature_msrs"] = _maybe(c.run("feature_msrs", lambda: _read_feature_msrs(kvm, features)), _frozen)
    vm = c.run("create_vm", kvm.create_vm)
    if vm is None:
        return out
    with vm:
        vm_caps, failed = _check_caps(vm)
        out["vm_caps"] = _frozen({name: v for name, v in vm_caps.items() if caps.get(name) != v})
        if failed:
            c.errors["vm_caps"] = "KVM_CHECK_EXTENSION on a VM failed for " + ", ".join(failed)
        out["vm_stats"] = c.run("vm_stats", lambda: read_stats_of(vm))
        vcpu = c.run("create_vcpu", vm.create_vcpu)
        if vcpu is not None:
            out["vcpu_stats"] = c.run("vcpu_stats", lambda: read_stats_of(vcpu))
    return out
