"""The CPUID a guest is given: KVM_GET_SUPPORTED_CPUID with each vCPU's own APIC id."""

from __future__ import annotations

from dataclasses import replace

LEAF_FEATURES = 0x1
LEAF_TOPOLOGY = (0xB, 0x1F)
LEAF_EXT_FEATURES = 0x7
LA57_ECX_BIT = 1 << 16


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
