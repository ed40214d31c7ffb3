"""The CPUID a guest is given: KVM_GET_SUPPORTED_CPUID with each vCPU's own APIC id."""

from __future__ import annotations

from dataclasses import replace

from ..system import CpuidEntry

LEAF_FEATURES = 0x1
LEAF_TOPOLOGY = (0xB, 0x1F)
LEAF_EXT_FEATURES = 0x7
LA57_ECX_BIT = 1 << 16
X2APIC_ECX_BIT = 1 << 21  # CPUID.1:ECX[21]: KVM's in-kernel LAPIC emulates x2APIC on any host


def guest_cpuid(supported, vcpu_id: int) -> list:
    """Copy ``supported`` (CpuidEntry list) with the APIC id set to ``vcpu_id``."""
    entries = []
    for entry in supported:
        if entry.function == LEAF_FEATURES:
            entry = replace(entry, ebx=(entry.ebx & 0x00FFFFFF) | (vcpu_id & 0xFF) << 24)
        elif entry.function in LEAF_TOPOLOGY:
            entry = replace(entry, edx=vcpu_id)
        entries.append(entry)
    return entries


def has_la57(supported) -> bool:
    """Whether KVM lets a guest use 5-level paging (CPUID.(7,0):ECX[16])."""
    return any(e.function == LEAF_EXT_FEATURES and e.index == 0 and e.ecx & LA57_ECX_BIT for e in supported)


LEAF_EXT_MAX = 0x8000_0000
LEAF_EXT_FEATURES_AMD = 0x8000_0001
LEAF_SVM = 0x8000_000A
VMX_ECX_BIT = 1 << 5  # CPUID.1:ECX[5]
SVM_ECX_BIT = 1 << 2  # CPUID.8000_0001h:ECX[2]
#: What :func:`advertise` puts in leaf 8000_000Ah where KVM gave none: SVM revision 1, 16 ASIDs
#: (what kvm_amd on QEMU's TCG reports), no optional features (EDX 0: no nested paging, no NRIPS).
DEFAULT_SVM_LEAF = (1, 16, 0, 0)


def advertise(entries, extension: str, *, svm_leaf: tuple[int, int, int, int] | None = None) -> list:
    """A copy of ``entries`` (CpuidEntry list) that tells the guest it has VMX or SVM.

    For testing a guest's own detection code (an L1 hypervisor's "is there VT-x / AMD-V?" path)
    on a KVM that does not nest. Everything a guest reads on the way is made consistent, whatever
    the host's vendor: for ``"svm"`` the extended range is raised to 8000_000Ah (an Intel host's
    KVM stops at 8000_0008h), leaves 8000_0001h and 8000_000Ah exist, and the SVM bit is set;
    ``svm_leaf`` (EAX, EBX, ECX, EDX) replaces leaf 8000_000Ah, which otherwise keeps KVM's
    values or gets :data:`DEFAULT_SVM_LEAF`. For ``"vmx"`` CPUID.1:ECX[5] is set. The guest's
    MSRs are not touched: VMX's IA32_FEATURE_CONTROL and SVM's VM_CR are the caller's to emulate.
    """
    if extension not in ("vmx", "svm"):
        raise ValueError(f"extension must be 'vmx' or 'svm', not {extension!r}")
    out = list(entries)

    def index_of(leaf: int) -> int | None:
        return next((i for i, e in enumerate(out) if e.function == leaf and e.index == 0), None)

    def update(leaf: int, **regs) -> None:
        i = index_of(leaf)
        if i is None:
            out.append(CpuidEntry(leaf, 0, 0, 0, 0, 0, 0))
            i = len(out) - 1
        out[i] = replace(out[i], **{name: f(getattr(out[i], name)) for name, f in regs.items()})

    if extension == "vmx":
        if index_of(LEAF_FEATURES) is None:
            raise ValueError("the CPUID entries have no leaf 1 to carry the VMX bit")
        update(LEAF_FEATURES, ecx=lambda v: v | VMX_ECX_BIT)
        return out
    update(LEAF_EXT_MAX, eax=lambda v: max(v, LEAF_SVM))
    update(LEAF_EXT_FEATURES_AMD, ecx=lambda v: v | SVM_ECX_BIT)
    known = index_of(LEAF_SVM)
    if svm_leaf is None and known is not None and out[known].eax:
        return out  # KVM's own SVM leaf (kvm_amd with nested=1) stays as it is
    eax, ebx, ecx, edx = svm_leaf or DEFAULT_SVM_LEAF
    update(LEAF_SVM, eax=lambda _: eax, ebx=lambda _: ebx, ecx=lambda _: ecx, edx=lambda _: edx)
    return out


#: QEMU's names of CPUID feature flags (``-cpu host,+x2apic,-pcid``): name -> (leaf, subleaf, register, bit).
#: From the Intel SDM vol. 2A (CPUID) and AMD APM vol. 3 (appendix E); the names are QEMU's
#: (target/i386/cpu.c feature_word_info).
FEATURE_BITS: dict[str, tuple[int, int, str, int]] = {
    "vmx": (1, 0, "ecx", 5), "pcid": (1, 0, "ecx", 17), "x2apic": (1, 0, "ecx", 21),
    "tsc-deadline": (1, 0, "ecx", 24), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28),
    "rdrand": (1, 0, "ecx", 30), "pdcm": (1, 0, "ecx", 15), "movbe": (1, 0, "ecx", 22),
    "cx16": (1, 0, "ecx", 13), "popcnt": (1, 0, "ecx", 23), "aes": (1, 0, "ecx", 25),
    "fsgsbase": (7, 0, "ebx", 0), "smep": (7, 0, "ebx", 7), "invpcid": (7, 0, "ebx", 10),
    "rtm": (7, 0, "ebx", 11), "smap": (7, 0, "ebx", 20), "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22),
    "svm": (0x8000_0001, 0, "ecx", 2), "skinit": (0x8000_0001, 0, "ecx", 12), "nx": (0x8000_0001, 0, "edx", 20),
    "pdpe1gb": (0x8000_0001, 0, "edx", 26), "rdtscp": (0x8000_0001, 0, "edx", 27), "lm": (0x8000_0001, 0, "edx", 29),
    "npt": (0x8000_000A, 0, "edx", 0), "nrip-save": (0x8000_000A, 0, "edx", 3),
}


def edit_features(entries, changes: list[tuple[str, bool]]) -> tuple[list, list[str]]:
    """``entries`` with QEMU-named feature bits turned off (``("pcid", False)``) or on. A bit is
    turned on only where ``entries`` (KVM's supported CPUID) offers it, as QEMU does under KVM;
    each one it cannot turn on is named in the returned warnings."""
    out = list(entries)
    warnings = []
    for name, on in changes:
        if name not in FEATURE_BITS:
            raise ValueError(f"unknown CPU feature {name!r}")
        leaf, sub, reg, bit = FEATURE_BITS[name]
        for i, e in enumerate(out):
            if e.function == leaf and e.index == sub:
                value = getattr(e, reg)
                if on:
                    if not value >> bit & 1:
                        warnings.append(f"host doesn't support requested feature: CPUID.{leaf:02X}H:"
                                        f"{reg.upper()}.{name} [bit {bit}]")
                else:
                    out[i] = replace(e, **{reg: value & ~(1 << bit)})
                break
        else:
            if on:
                warnings.append(f"host doesn't support requested feature: CPUID.{leaf:02X}H:{reg.upper()}.{name} "
                                f"[bit {bit}] (no such leaf)")
    return out, warnings
