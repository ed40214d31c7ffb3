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
