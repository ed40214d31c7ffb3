"""Which kernel module serves /dev/kvm here (kvm_intel, kvm_amd, or a software backend)."""

from __future__ import annotations

from pathlib import Path

SYS_MODULE = Path("/sys/module")
#: Vendor modules first: a host may load kvm_pvm beside kvm_intel/kvm_amd.
BACKENDS = ("kvm_intel", "kvm_amd", "kvm_pvm")


def kvm_backend(sys_module: Path = SYS_MODULE) -> str | None:
    """The loaded KVM vendor module's name, or None when none is loaded."""
    for name in BACKENDS:
        if (sys_module / name).is_dir():
            return name
    return None
