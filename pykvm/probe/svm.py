"""AMD SVM: CPUID leaf 0x8000000A (SVM revision, number of ASIDs, SVM feature flags).

Leaf 0x8000000A is defined only when CPUID 0x80000001 ECX[2] (SVM) is set (AMD APM Vol. 3,
appendix E). EAX[7:0] is the SVM revision, EBX the number of address space identifiers (ASIDs),
EDX the feature flags.

EDX bits are named as the Linux kernel names them: the ``/proc/cpuinfo`` names of word 15 of
``arch/x86/include/asm/cpufeatures.h`` ("AMD SVM Feature Identification, CPUID level 0x8000000a
(EDX)"); for bits that word does not name, the short names of the kernel's CPUID database
``tools/arch/x86/kcpuid/cpuid.csv`` (``gmet``, ``sss_check``, ``ro_gpt``, ``h_mce_override``,
``tlbsync_int``, ``ibs_virt``, ``ext_lvt_off_chg``, ``svme_addr_chk``) or the lower-cased
cpufeatures.h macro name (``bus_lock_threshold``, ``idle_hlt``). Positions were checked against
both and the APM. A set bit with no such name is reported as ``bit<N>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .cpuid import CpuidTable

__all__ = ["SVM_FEATURES", "SVM_LEAF", "SvmInfo", "decode_svm", "decode_svm_leaf"]

SVM_LEAF = 0x8000_000A

#: EDX bit -> Linux kernel name.
SVM_FEATURES: Mapping[int, str] = MappingProxyType(
    {
        0: "npt",  # nested paging
        1: "lbrv",  # LBR virtualization
        2: "svm_lock",  # SVM lock (VM_CR.SVMDIS lockable)
        3: "nrip_save",  # next sequential RIP saved on #VMEXIT
        4: "tsc_scale",  # MSR-based TSC rate control
        5: "vmcb_clean",  # VMCB clean bits
        6: "flushbyasid",  # flush by ASID
        7: "decodeassists",  # decode assists
        10: "pausefilter",  # PAUSE intercept filter
        12: "pfthreshold",  # PAUSE filter threshold
        13: "avic",  # advanced virtual interrupt controller
        15: "v_vmsave_vmload",  # virtualized VMSAVE/VMLOAD
        16: "vgif",  # virtualized global interrupt flag
        17: "gmet",  # guest mode execute trap
        18: "x2avic",  # x2APIC mode of AVIC
        19: "sss_check",  # supervisor shadow stack restrictions
        20: "v_spec_ctrl",  # virtualized SPEC_CTRL
        21: "ro_gpt",  # read-only guest page tables
        23: "h_mce_override",  # host MCE override
        24: "tlbsync_int",  # TLBSYNC intercept, INVLPGB/TLBSYNC in VMCB
        25: "vnmi",  # NMI virtualization
        26: "ibs_virt",  # IBS virtualization
        27: "ext_lvt_off_chg",  # extended LVT AVIC access change
        28: "svme_addr_chk",  # guest SVME address check
        29: "bus_lock_threshold",  # bus lock threshold
        30: "idle_hlt",  # idle HLT intercept
    }
)
_NAME_TO_BIT = {name: bit for bit, name in SVM_FEATURES.items()}


@dataclass(frozen=True)
class SvmInfo:
    """The decoded SVM leaf."""

    revision: int  # EAX[7:0]
    nasid: int  # EBX: number of ASIDs
    features_raw: int  # EDX
    features: tuple[str, ...]  # names of the set EDX bits, ascending bit order; unknown -> bit<N>

    def has(self, name: str) -> bool:
        """Whether the feature called ``name`` (a kernel name, or ``bit<N>``) is set."""
        if name in _NAME_TO_BIT:
            return bool((self.features_raw >> _NAME_TO_BIT[name]) & 1)
        if name.startswith("bit") and name[3:].isdigit() and int(name[3:]) < 32:
            return bool((self.features_raw >> int(name[3:])) & 1)
        raise KeyError(f"unknown SVM feature {name!r}")

    @property
    def npt(self) -> bool:
        return self.has("npt")

    @property
    def unknown_bits(self) -> tuple[int, ...]:
        """Set EDX bits that have no name."""
        return tuple(b for b in range(32) if (self.features_raw >> b) & 1 and b not in SVM_FEATURES)

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "nasid": self.nasid,
            "features_raw": self.features_raw,
            "features": list(self.features),
        }


def decode_svm_leaf(regs: Sequence[int]) -> SvmInfo:
    """Decode the (eax, ebx, ecx, edx) output of CPUID 0x8000000A."""
    if len(regs) != 4:
        raise ValueError(f"CPUID 0x8000000A needs 4 registers, got {len(regs)}")
    eax, ebx, _ecx, edx = (int(r) for r in regs)
    for r in (eax, ebx, edx):
        if not 0 <= r <= 0xFFFF_FFFF:
            raise ValueError(f"CPUID register value out of range: {r:#x}")
    names = tuple(SVM_FEATURES.get(b, f"bit{b}") for b in range(32) if (edx >> b) & 1)
    return SvmInfo(revision=eax & 0xFF, nasid=ebx, features_raw=edx, features=names)


def decode_svm(table: CpuidTable) -> SvmInfo | None:
    """The SVM leaf of ``table``; None unless SVM is enumerated and the leaf was captured."""
    if table.bit(0x8000_0001, "ecx", 2) is not True or table.in_range(SVM_LEAF) is False:
        return None
    regs = table.get_regs(SVM_LEAF)
    return None if regs is None else decode_svm_leaf(regs)
