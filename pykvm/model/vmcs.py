"""The Intel VMCS: every field with its encoding, VM-exit reasons, an image and the VM-entry checks.

Sources (facts checked against each other, no code copied):

* Intel SDM Vol. 3D appendix B "Field Encoding in VMCS" (the field list and encodings), Vol. 3C
  "Virtual Machine Control Structures" (table "Structure of VMCS Component Encoding"), appendix C
  "VMX Basic Exit Reasons", and the chapter "VM Entries" for the checks (chapter 27 in the
  2023-era SDM, whose numbering the rules cite; it is chapter 26 in older and 28 in newer
  editions, with the same subsections).
* Linux ``arch/x86/include/asm/vmx.h`` (``enum vmcs_field``) and ``uapi/asm/vmx.h``
  (``EXIT_REASON_*``): field and exit names are the kernel's where it has one
  (:attr:`VmcsField.linux_name`); the few SDM fields the kernel does not name get a name in the
  same style.

A field encoding is 32 bits::

    bit 0       access type: 0 full, 1 high (the upper 32 bits of a 64-bit field)
    bits 9:1    index
    bits 11:10  type: 0 control, 1 VM-exit information (read-only), 2 guest state, 3 host state
    bit 12      reserved (0)
    bits 14:13  width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural width
    bits 31:15  reserved (0)

The memory layout of a VMCS is implementation-specific: software reads and writes fields with
VMREAD/VMWRITE only. A :class:`VmcsImage` is therefore a mapping field -> value, and its
:meth:`~VmcsImage.to_vmwrite_table` (or the packed :meth:`~VmcsImage.to_bytes`) is what an L1
hypervisor replays with VMWRITE. :func:`check_vmcs` applies the SDM's VM-entry checks to an image
before it is used, naming each violated rule.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from types import MappingProxyType

from ..probe.vmx import (  # bit names shared with the probe
    _CR0_BITS,
    _CR4_BITS,
    CONTROL_NAMES,
    DEFAULT1,
    MSR_NAMES,
    ControlGroup,
    ControlMsr,
    VmxCapabilities,
    _bits,
)
from .paging import PAE_PDPTE_RESERVED

__all__ = [
    "VMCS_FIELDS",
    "VMCS_RULES",
    "VMWRITE_ENTRY",
    "VMWRITE_TERMINATOR",
    "VMX_EXIT_REASONS",
    "Access",
    "Area",
    "Encoding",
    "ExitReason",
    "FieldType",
    "Rule",
    "Violation",
    "VmcsField",
    "VmcsImage",
    "Width",
    "check_vmcs",
    "control_bit",
    "decode_encoding",
    "decode_exit_reason",
    "encode",
    "field",
    "lookup",
]

_U64 = (1 << 64) - 1

# ---------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------


class Access(IntEnum):
    """Bit 0 of an encoding."""

    FULL = 0
    HIGH = 1


class FieldType(IntEnum):
    """Bits 11:10 of an encoding."""

    CONTROL = 0
    EXIT_INFORMATION = 1  # "VM-exit information", also called read-only data
    GUEST_STATE = 2
    HOST_STATE = 3


class Width(IntEnum):
    """Bits 14:13 of an encoding."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3

    @property
    def bits(self) -> int:
        """Value bits in 64-bit mode (natural width is 64 bits on Intel 64 processors)."""
        return {Width.BITS16: 16, Width.BITS64: 64, Width.BITS32: 32, Width.NATURAL: 64}[self]


_RESERVED_ENCODING_BITS = (1 << 12) | (~0x7FFF & 0xFFFF_FFFF)


@dataclass(frozen=True)
class Encoding:
    """A decoded VMCS component encoding."""

    access: Access
    index: int
    type: FieldType
    width: Width

    def encode(self) -> int:
        return encode(self.access, self.index, self.type, self.width)


def encode(access: int, index: int, type: int, width: int) -> int:
    """The 32-bit encoding of a field from its parts (see the module docstring)."""
    if access not in (0, 1):
        raise ValueError(f"access type must be 0 (full) or 1 (high), got {access!r}")
    if not 0 <= index <= 0x1FF:
        raise ValueError(f"index must fit bits 9:1 (0..511), got {index!r}")
    if type not in (0, 1, 2, 3):
        raise ValueError(f"type must be 0..3, got {type!r}")
    if width not in (0, 1, 2, 3):
        raise ValueError(f"width must be 0..3, got {width!r}")
    if access == Access.HIGH and width != Width.BITS64:
        raise ValueError("access type 'high' exists only for 64-bit fields")
    return access | (index << 1) | (type << 10) | (width << 13)


def decode_encoding(encoding: int) -> Encoding:
    """Split a field encoding into access type, index, type and width.

    Raises ValueError for bits the SDM reserves (12 and 31:15) and for a 'high' access to a
    field that is not 64 bits wide (such encodings name no field).
    """
    if (isinstance(encoding, bool) or not isinstance(encoding, int)
            or not 0 <= encoding <= 0xFFFF_FFFF):
        raise ValueError(f"a VMCS field encoding is a 32-bit unsigned integer, got {encoding!r}")
    if encoding & _RESERVED_ENCODING_BITS:
        bad = [b for b in range(32) if (encoding & _RESERVED_ENCODING_BITS) >> b & 1]
        raise ValueError(f"encoding {encoding:#x} sets reserved bit(s) {bad} (bit 12, bits 31:15)")
    access = Access(encoding & 1)
    width = Width((encoding >> 13) & 3)
    if access == Access.HIGH and width != Width.BITS64:
        raise ValueError(
            f"encoding {encoding:#x}: access type 'high' with a {width.bits}-bit width")
    return Encoding(access, (encoding >> 1) & 0x1FF, FieldType((encoding >> 10) & 3), width)


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------


class Area(str, Enum):
    """The six areas of the VMCS data (SDM 3C "Overview" of the VMCS format)."""

    GUEST_STATE = "guest-state area"
    HOST_STATE = "host-state area"
    EXECUTION_CONTROLS = "VM-execution control fields"
    EXIT_CONTROLS = "VM-exit control fields"
    ENTRY_CONTROLS = "VM-entry control fields"
    EXIT_INFORMATION = "VM-exit information fields"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VmcsField:
    """One VMCS field (64-bit fields are one field; :attr:`high` is its high-half encoding)."""

    name: str
    encoding: int  # the full-access encoding
    area: Area
    description: str  # the SDM's name of the field
    linux_name: bool  # True: Linux's name (enum vmcs_field; FRED fields: the KVM FRED series)

    @property
    def decoded(self) -> Encoding:
        return decode_encoding(self.encoding)

    @property
    def width(self) -> Width:
        return Width((self.encoding >> 13) & 3)

    @property
    def type(self) -> FieldType:
        return FieldType((self.encoding >> 10) & 3)

    @property
    def index(self) -> int:
        return (self.encoding >> 1) & 0x1FF

    @property
    def bits(self) -> int:
        return self.width.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def high(self) -> int | None:
        """The encoding of the high 32 bits (64-bit fields only): encoding + 1."""
        return self.encoding + 1 if self.width == Width.BITS64 else None

    @property
    def read_only(self) -> bool:
        """VM-exit information fields: VMWRITE fails unless IA32_VMX_MISC[29] is 1."""
        return self.type == FieldType.EXIT_INFORMATION


# Control-type fields that belong to the VM-exit and VM-entry control areas; every other
# control-type field is a VM-execution control (SDM 3C "VM-Exit Control Fields",
# "VM-Entry Control Fields").
_EXIT_CONTROL_FIELDS = frozenset({
    "VM_EXIT_CONTROLS", "SECONDARY_VM_EXIT_CONTROLS", "VM_EXIT_MSR_STORE_COUNT",
    "VM_EXIT_MSR_STORE_ADDR", "VM_EXIT_MSR_LOAD_COUNT", "VM_EXIT_MSR_LOAD_ADDR",
})  # fmt: skip
_ENTRY_CONTROL_FIELDS = frozenset({
    "VM_ENTRY_CONTROLS", "VM_ENTRY_MSR_LOAD_COUNT", "VM_ENTRY_MSR_LOAD_ADDR",
    "VM_ENTRY_INTR_INFO_FIELD", "VM_ENTRY_EXCEPTION_ERROR_CODE", "VM_ENTRY_INSTRUCTION_LEN",
    "INJECTED_EVENT_DATA",
})  # fmt: skip

# (name, full encoding, SDM description, name is Linux's). Order: SDM appendix B.
_SEGS = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")
_FIELD_TABLE: list[tuple[str, int, str, bool]] = [
    # B.1.1 16-bit control fields
    ("VIRTUAL_PROCESSOR_ID", 0x0000, "Virtual-processor identifier (VPID)", True),
    ("POSTED_INTR_NV", 0x0002, "Posted-interrupt notification vector", True),
    ("EPTP_INDEX", 0x0004, "EPTP index", False),
    ("HLAT_PREFIX_SIZE", 0x0006, "HLAT prefix size", False),
    ("LAST_PID_POINTER_INDEX", 0x0008, "Last PID-pointer index", True),
    # B.1.2 16-bit guest-state fields
    *[(f"GUEST_{s}_SELECTOR", 0x0800 + 2 * i, f"Guest {s} selector", True)
      for i, s in enumerate(_SEGS)],
    ("GUEST_INTR_STATUS", 0x0810, "Guest interrupt status", True),
    ("GUEST_PML_INDEX", 0x0812, "PML index", True),
    ("GUEST_UINV", 0x0814, "Guest UINV", False),
    # B.1.3 16-bit host-state fields
    *[(f"HOST_{s}_SELECTOR", 0x0C00 + 2 * i, f"Host {s} selector", True)
      for i, s in enumerate(("ES", "CS", "SS", "DS", "FS", "GS", "TR"))],
    # B.2.1 64-bit control fields
    ("IO_BITMAP_A", 0x2000, "Address of I/O bitmap A", True),
    ("IO_BITMAP_B", 0x2002, "Address of I/O bitmap B", True),
    ("MSR_BITMAP", 0x2004, "Address of MSR bitmaps", True),
    ("VM_EXIT_MSR_STORE_ADDR", 0x2006, "VM-exit MSR-store address", True),
    ("VM_EXIT_MSR_LOAD_ADDR", 0x2008, "VM-exit MSR-load address", True),
    ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A, "VM-entry MSR-load address", True),
    ("EXECUTIVE_VMCS_POINTER", 0x200C, "Executive-VMCS pointer", False),
    ("PML_ADDRESS", 0x200E, "PML address", True),
    ("TSC_OFFSET", 0x2010, "TSC offset", True),
    ("VIRTUAL_APIC_PAGE_ADDR", 0x2012, "Virtual-APIC address", True),
    ("APIC_ACCESS_ADDR", 0x2014, "APIC-access address", True),
    ("POSTED_INTR_DESC_ADDR", 0x2016, "Posted-interrupt descriptor address", True),
    ("VM_FUNCTION_CONTROL", 0x2018, "VM-function controls", True),
    ("EPT_POINTER", 0x201A, "EPT pointer (EPTP)", True),
    *[(f"EOI_EXIT_BITMAP{i}", 0x201C + 2 * i, f"EOI-exit bitmap {i}", True) for i in range(4)],
    ("EPTP_LIST_ADDRESS", 0x2024, "EPTP-list address", True),
    ("VMREAD_BITMAP", 0x2026, "VMREAD-bitmap address", True),
    ("VMWRITE_BITMAP", 0x2028, "VMWRITE-bitmap address", True),
    ("VE_INFORMATION_ADDRESS", 0x202A, "Virtualization-exception information address", True),
    ("XSS_EXIT_BITMAP", 0x202C, "XSS-exiting bitmap", True),
    ("ENCLS_EXITING_BITMAP", 0x202E, "ENCLS-exiting bitmap", True),
    ("SPPT_POINTER", 0x2030, "Sub-page-permission-table pointer", False),
    ("TSC_MULTIPLIER", 0x2032, "TSC multiplier", True),
    ("TERTIARY_VM_EXEC_CONTROL", 0x2034, "Tertiary processor-based VM-execution controls", True),
    ("ENCLV_EXITING_BITMAP", 0x2036, "ENCLV-exiting bitmap", False),
    ("LOW_PASID_DIRECTORY_ADDR", 0x2038, "Low PASID directory address", False),
    ("HIGH_PASID_DIRECTORY_ADDR", 0x203A, "High PASID directory address", False),
    ("SHARED_EPT_POINTER", 0x203C, "Shared EPT pointer", False),
    ("PCONFIG_EXITING_BITMAP", 0x203E, "PCONFIG-exiting bitmap", False),
    ("HLAT_POINTER", 0x2040, "Hypervisor-managed linear-address translation pointer", False),
    ("PID_POINTER_TABLE", 0x2042, "PID-pointer table address", True),
    ("SECONDARY_VM_EXIT_CONTROLS", 0x2044, "Secondary VM-exit controls", True),
    ("IA32_SPEC_CTRL_MASK", 0x204A, "IA32_SPEC_CTRL mask", False),
    ("IA32_SPEC_CTRL_SHADOW", 0x204C, "IA32_SPEC_CTRL shadow", False),
    ("INJECTED_EVENT_DATA", 0x2052, "Injected-event data (FRED)", True),
    # B.2.2 64-bit read-only data fields
    ("GUEST_PHYSICAL_ADDRESS", 0x2400, "Guest-physical address", True),
    ("ORIGINAL_EVENT_DATA", 0x2404, "Original-event data (FRED)", True),
    # B.2.3 64-bit guest-state fields
    ("VMCS_LINK_POINTER", 0x2800, "VMCS link pointer", True),
    ("GUEST_IA32_DEBUGCTL", 0x2802, "Guest IA32_DEBUGCTL", True),
    ("GUEST_IA32_PAT", 0x2804, "Guest IA32_PAT", True),
    ("GUEST_IA32_EFER", 0x2806, "Guest IA32_EFER", True),
    ("GUEST_IA32_PERF_GLOBAL_CTRL", 0x2808, "Guest IA32_PERF_GLOBAL_CTRL", True),
    *[(f"GUEST_PDPTR{i}", 0x280A + 2 * i, f"Guest PDPTE{i}", True) for i in range(4)],
    ("GUEST_BNDCFGS", 0x2812, "Guest IA32_BNDCFGS", True),
    ("GUEST_IA32_RTIT_CTL", 0x2814, "Guest IA32_RTIT_CTL", True),
    ("GUEST_IA32_LBR_CTL", 0x2816, "Guest IA32_LBR_CTL", False),
    ("GUEST_IA32_PKRS", 0x2818, "Guest IA32_PKRS", False),
    ("GUEST_IA32_FRED_CONFIG", 0x281A, "Guest IA32_FRED_CONFIG", True),
    ("GUEST_IA32_FRED_RSP1", 0x281C, "Guest IA32_FRED_RSP1", True),
    ("GUEST_IA32_FRED_RSP2", 0x281E, "Guest IA32_FRED_RSP2", True),
    ("GUEST_IA32_FRED_RSP3", 0x2820, "Guest IA32_FRED_RSP3", True),
    ("GUEST_IA32_FRED_STKLVLS", 0x2822, "Guest IA32_FRED_STKLVLS", True),
    ("GUEST_IA32_FRED_SSP1", 0x2824, "Guest IA32_FRED_SSP1", True),
    ("GUEST_IA32_FRED_SSP2", 0x2826, "Guest IA32_FRED_SSP2", True),
    ("GUEST_IA32_FRED_SSP3", 0x2828, "Guest IA32_FRED_SSP3", True),
    # B.2.4 64-bit host-state fields
    ("HOST_IA32_PAT", 0x2C00, "Host IA32_PAT", True),
    ("HOST_IA32_EFER", 0x2C02, "Host IA32_EFER", True),
    ("HOST_IA32_PERF_GLOBAL_CTRL", 0x2C04, "Host IA32_PERF_GLOBAL_CTRL", True),
    ("HOST_IA32_PKRS", 0x2C06, "Host IA32_PKRS", False),
    ("HOST_IA32_FRED_CONFIG", 0x2C08, "Host IA32_FRED_CONFIG", True),
    ("HOST_IA32_FRED_RSP1", 0x2C0A, "Host IA32_FRED_RSP1", True),
    ("HOST_IA32_FRED_RSP2", 0x2C0C, "Host IA32_FRED_RSP2", True),
    ("HOST_IA32_FRED_RSP3", 0x2C0E, "Host IA32_FRED_RSP3", True),
    ("HOST_IA32_FRED_STKLVLS", 0x2C10, "Host IA32_FRED_STKLVLS", True),
    ("HOST_IA32_FRED_SSP1", 0x2C12, "Host IA32_FRED_SSP1", True),
    ("HOST_IA32_FRED_SSP2", 0x2C14, "Host IA32_FRED_SSP2", True),
    ("HOST_IA32_FRED_SSP3", 0x2C16, "Host IA32_FRED_SSP3", True),
    # B.3.1 32-bit control fields
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000, "Pin-based VM-execution controls", True),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002, "Primary processor-based VM-execution controls", True),
    ("EXCEPTION_BITMAP", 0x4004, "Exception bitmap", True),
    ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006, "Page-fault error-code mask", True),
    ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008, "Page-fault error-code match", True),
    ("CR3_TARGET_COUNT", 0x400A, "CR3-target count", True),
    ("VM_EXIT_CONTROLS", 0x400C, "Primary VM-exit controls", True),
    ("VM_EXIT_MSR_STORE_COUNT", 0x400E, "VM-exit MSR-store count", True),
    ("VM_EXIT_MSR_LOAD_COUNT", 0x4010, "VM-exit MSR-load count", True),
    ("VM_ENTRY_CONTROLS", 0x4012, "VM-entry controls", True),
    ("VM_ENTRY_MSR_LOAD_COUNT", 0x4014, "VM-entry MSR-load count", True),
    ("VM_ENTRY_INTR_INFO_FIELD", 0x4016, "VM-entry interruption-information field", True),
    ("VM_ENTRY_EXCEPTION_ERROR_CODE", 0x4018, "VM-entry exception error code", True),
    ("VM_ENTRY_INSTRUCTION_LEN", 0x401A, "VM-entry instruction length", True),
    ("TPR_THRESHOLD", 0x401C, "TPR threshold", True),
    ("SECONDARY_VM_EXEC_CONTROL", 0x401E, "Secondary processor-based VM-execution controls", True),
    ("PLE_GAP", 0x4020, "PLE_Gap", True),
    ("PLE_WINDOW", 0x4022, "PLE_Window", True),
    ("NOTIFY_WINDOW", 0x4024, "Instruction-timeout control (notify window)", True),
    # B.3.2 32-bit read-only data fields
    ("VM_INSTRUCTION_ERROR", 0x4400, "VM-instruction error", True),
    ("VM_EXIT_REASON", 0x4402, "Exit reason", True),
    ("VM_EXIT_INTR_INFO", 0x4404, "VM-exit interruption information", True),
    ("VM_EXIT_INTR_ERROR_CODE", 0x4406, "VM-exit interruption error code", True),
    ("IDT_VECTORING_INFO_FIELD", 0x4408, "IDT-vectoring information field", True),
    ("IDT_VECTORING_ERROR_CODE", 0x440A, "IDT-vectoring error code", True),
    ("VM_EXIT_INSTRUCTION_LEN", 0x440C, "VM-exit instruction length", True),
    ("VMX_INSTRUCTION_INFO", 0x440E, "VM-exit instruction information", True),
    # B.3.3 32-bit guest-state fields
    *[(f"GUEST_{s}_LIMIT", 0x4800 + 2 * i, f"Guest {s} limit", True) for i, s in enumerate(_SEGS)],
    ("GUEST_GDTR_LIMIT", 0x4810, "Guest GDTR limit", True),
    ("GUEST_IDTR_LIMIT", 0x4812, "Guest IDTR limit", True),
    *[(f"GUEST_{s}_AR_BYTES", 0x4814 + 2 * i, f"Guest {s} access rights", True)
      for i, s in enumerate(_SEGS)],
    ("GUEST_INTERRUPTIBILITY_INFO", 0x4824, "Guest interruptibility state", True),
    ("GUEST_ACTIVITY_STATE", 0x4826, "Guest activity state", True),
    ("GUEST_SMBASE", 0x4828, "Guest SMBASE", False),
    ("GUEST_SYSENTER_CS", 0x482A, "Guest IA32_SYSENTER_CS", True),
    ("VMX_PREEMPTION_TIMER_VALUE", 0x482E, "VMX-preemption timer value", True),
    # B.3.4 32-bit host-state field
    ("HOST_IA32_SYSENTER_CS", 0x4C00, "Host IA32_SYSENTER_CS", True),
    # B.4.1 natural-width control fields
    ("CR0_GUEST_HOST_MASK", 0x6000, "CR0 guest/host mask", True),
    ("CR4_GUEST_HOST_MASK", 0x6002, "CR4 guest/host mask", True),
    ("CR0_READ_SHADOW", 0x6004, "CR0 read shadow", True),
    ("CR4_READ_SHADOW", 0x6006, "CR4 read shadow", True),
    *[(f"CR3_TARGET_VALUE{i}", 0x6008 + 2 * i, f"CR3-target value {i}", True) for i in range(4)],
    # B.4.2 natural-width read-only data fields
    ("EXIT_QUALIFICATION", 0x6400, "Exit qualification", True),
    ("EXIT_IO_RCX", 0x6402, "I/O RCX", False),
    ("EXIT_IO_RSI", 0x6404, "I/O RSI", False),
    ("EXIT_IO_RDI", 0x6406, "I/O RDI", False),
    ("EXIT_IO_RIP", 0x6408, "I/O RIP", False),
    ("GUEST_LINEAR_ADDRESS", 0x640A, "Guest-linear address", True),
    # B.4.3 natural-width guest-state fields
    ("GUEST_CR0", 0x6800, "Guest CR0", True),
    ("GUEST_CR3", 0x6802, "Guest CR3", True),
    ("GUEST_CR4", 0x6804, "Guest CR4", True),
    *[(f"GUEST_{s}_BASE", 0x6806 + 2 * i, f"Guest {s} base", True) for i, s in enumerate(_SEGS)],
    ("GUEST_GDTR_BASE", 0x6816, "Guest GDTR base", True),
    ("GUEST_IDTR_BASE", 0x6818, "Guest IDTR base", True),
    ("GUEST_DR7", 0x681A, "Guest DR7", True),
    ("GUEST_RSP", 0x681C, "Guest RSP", True),
    ("GUEST_RIP", 0x681E, "Guest RIP", True),
    ("GUEST_RFLAGS", 0x6820, "Guest RFLAGS", True),
    ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822, "Guest pending debug exceptions", True),
    ("GUEST_SYSENTER_ESP", 0x6824, "Guest IA32_SYSENTER_ESP", True),
    ("GUEST_SYSENTER_EIP", 0x6826, "Guest IA32_SYSENTER_EIP", True),
    ("GUEST_S_CET", 0x6828, "Guest IA32_S_CET", False),
    ("GUEST_SSP", 0x682A, "Guest SSP", False),
    ("GUEST_INTR_SSP_TABLE", 0x682C, "Guest IA32_INTERRUPT_SSP_TABLE_ADDR", False),
    # B.4.4 natural-width host-state fields
    ("HOST_CR0", 0x6C00, "Host CR0", True),
    ("HOST_CR3", 0x6C02, "Host CR3", True),
    ("HOST_CR4", 0x6C04, "Host CR4", True),
    ("HOST_FS_BASE", 0x6C06, "Host FS base", True),
    ("HOST_GS_BASE", 0x6C08, "Host GS base", True),
    ("HOST_TR_BASE", 0x6C0A, "Host TR base", True),
    ("HOST_GDTR_BASE", 0x6C0C, "Host GDTR base", True),
    ("HOST_IDTR_BASE", 0x6C0E, "Host IDTR base", True),
    ("HOST_IA32_SYSENTER_ESP", 0x6C10, "Host IA32_SYSENTER_ESP", True),
    ("HOST_IA32_SYSENTER_EIP", 0x6C12, "Host IA32_SYSENTER_EIP", True),
    ("HOST_RSP", 0x6C14, "Host RSP", True),
    ("HOST_RIP", 0x6C16, "Host RIP", True),
    ("HOST_S_CET", 0x6C18, "Host IA32_S_CET", False),
    ("HOST_SSP", 0x6C1A, "Host SSP", False),
    ("HOST_INTR_SSP_TABLE", 0x6C1C, "Host IA32_INTERRUPT_SSP_TABLE_ADDR", False),
]  # fmt: skip


def _area(name: str, encoding: int) -> Area:
    kind = FieldType((encoding >> 10) & 3)
    if kind == FieldType.GUEST_STATE:
        return Area.GUEST_STATE
    if kind == FieldType.HOST_STATE:
        return Area.HOST_STATE
    if kind == FieldType.EXIT_INFORMATION:
        return Area.EXIT_INFORMATION
    if name in _EXIT_CONTROL_FIELDS:
        return Area.EXIT_CONTROLS
    if name in _ENTRY_CONTROL_FIELDS:
        return Area.ENTRY_CONTROLS
    return Area.EXECUTION_CONTROLS


#: Every field of SDM appendix B, by name (the high halves of 64-bit fields are not separate).
VMCS_FIELDS: Mapping[str, VmcsField] = MappingProxyType(
    {n: VmcsField(n, e, _area(n, e), d, k) for n, e, d, k in _FIELD_TABLE}
)
_BY_ENCODING: Mapping[int, VmcsField] = MappingProxyType(
    {f.encoding: f for f in VMCS_FIELDS.values()}
)

FieldKey = str | int | VmcsField


def field(key: FieldKey) -> VmcsField:
    """The field named ``key`` (kernel name, e.g. ``"GUEST_RIP"``), or with full encoding ``key``.

    A high-half encoding or ``NAME_HIGH`` is refused here: use :func:`lookup` for those.
    """
    if isinstance(key, VmcsField):
        return key
    if isinstance(key, str):
        try:
            return VMCS_FIELDS[key]
        except KeyError:
            raise KeyError(f"no VMCS field named {key!r}") from None
    if isinstance(key, int) and not isinstance(key, bool):
        f = _BY_ENCODING.get(key)
        if f is None:
            decode_encoding(key)  # a clearer error for malformed encodings
            raise KeyError(f"no VMCS field has the full encoding {key:#06x}")
        return f
    raise TypeError(f"a VMCS field is named by str, int encoding or VmcsField, got {key!r}")


def lookup(encoding: int) -> tuple[VmcsField, Access]:
    """The field an encoding accesses and how: ``(GUEST_IA32_EFER, Access.HIGH)`` for 0x2807."""
    dec = decode_encoding(encoding)
    f = _BY_ENCODING.get(encoding & ~1)
    if f is None:
        raise KeyError(f"encoding {encoding:#06x} names no VMCS field of SDM appendix B")
    return f, dec.access


# ---------------------------------------------------------------------------------------------
# Exit reasons
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitReason:
    """A basic VM-exit reason (bits 15:0 of the exit-reason field), SDM appendix C."""

    number: int
    name: str  # Linux's EXIT_REASON_<name> where the kernel defines it
    description: str
    linux_name: bool


_EXIT_TABLE: list[tuple[int, str, str, bool]] = [
    (0, "EXCEPTION_NMI", "Exception or non-maskable interrupt (NMI)", True),
    (1, "EXTERNAL_INTERRUPT", "External interrupt", True),
    (2, "TRIPLE_FAULT", "Triple fault", True),
    (3, "INIT_SIGNAL", "INIT signal", True),
    (4, "SIPI_SIGNAL", "Start-up IPI (SIPI)", True),
    (5, "IO_SMI", "I/O system-management interrupt (SMI)", False),
    (6, "OTHER_SMI", "Other SMI", True),
    (7, "INTERRUPT_WINDOW", "Interrupt window", True),
    (8, "NMI_WINDOW", "NMI window", True),
    (9, "TASK_SWITCH", "Task switch", True),
    (10, "CPUID", "CPUID", True),
    (11, "GETSEC", "GETSEC", False),
    (12, "HLT", "HLT", True),
    (13, "INVD", "INVD", True),
    (14, "INVLPG", "INVLPG", True),
    (15, "RDPMC", "RDPMC", True),
    (16, "RDTSC", "RDTSC", True),
    (17, "RSM", "RSM", False),
    (18, "VMCALL", "VMCALL", True),
    (19, "VMCLEAR", "VMCLEAR", True),
    (20, "VMLAUNCH", "VMLAUNCH", True),
    (21, "VMPTRLD", "VMPTRLD", True),
    (22, "VMPTRST", "VMPTRST", True),
    (23, "VMREAD", "VMREAD", True),
    (24, "VMRESUME", "VMRESUME", True),
    (25, "VMWRITE", "VMWRITE", True),
    (26, "VMOFF", "VMXOFF", True),
    (27, "VMON", "VMXON", True),
    (28, "CR_ACCESS", "Control-register accesses", True),
    (29, "DR_ACCESS", "MOV DR", True),
    (30, "IO_INSTRUCTION", "I/O instruction", True),
    (31, "MSR_READ", "RDMSR", True),
    (32, "MSR_WRITE", "WRMSR", True),
    (33, "INVALID_STATE", "VM-entry failure due to invalid guest state", True),
    (34, "MSR_LOAD_FAIL", "VM-entry failure due to MSR loading", True),
    (36, "MWAIT_INSTRUCTION", "MWAIT", True),
    (37, "MONITOR_TRAP_FLAG", "Monitor trap flag", True),
    (39, "MONITOR_INSTRUCTION", "MONITOR", True),
    (40, "PAUSE_INSTRUCTION", "PAUSE", True),
    (41, "MCE_DURING_VMENTRY", "VM-entry failure due to machine-check event", True),
    (43, "TPR_BELOW_THRESHOLD", "TPR below threshold", True),
    (44, "APIC_ACCESS", "APIC access", True),
    (45, "EOI_INDUCED", "Virtualized EOI", True),
    (46, "GDTR_IDTR", "Access to GDTR or IDTR", True),
    (47, "LDTR_TR", "Access to LDTR or TR", True),
    (48, "EPT_VIOLATION", "EPT violation", True),
    (49, "EPT_MISCONFIG", "EPT misconfiguration", True),
    (50, "INVEPT", "INVEPT", True),
    (51, "RDTSCP", "RDTSCP", True),
    (52, "PREEMPTION_TIMER", "VMX-preemption timer expired", True),
    (53, "INVVPID", "INVVPID", True),
    (54, "WBINVD", "WBINVD or WBNOINVD", True),
    (55, "XSETBV", "XSETBV", True),
    (56, "APIC_WRITE", "APIC write", True),
    (57, "RDRAND", "RDRAND", True),
    (58, "INVPCID", "INVPCID", True),
    (59, "VMFUNC", "VMFUNC", True),
    (60, "ENCLS", "ENCLS", True),
    (61, "RDSEED", "RDSEED", True),
    (62, "PML_FULL", "Page-modification log full", True),
    (63, "XSAVES", "XSAVES", True),
    (64, "XRSTORS", "XRSTORS", True),
    (65, "PCONFIG", "PCONFIG", False),
    (66, "SPP_EVENT", "SPP-related event", False),
    (67, "UMWAIT", "UMWAIT", True),
    (68, "TPAUSE", "TPAUSE", True),
    (69, "LOADIWKEY", "LOADIWKEY", False),
    (70, "ENCLV", "ENCLV", False),
    (71, "SGX_CONFLICT", "SGX conflict", False),
    (72, "ENQCMD_PASID_FAIL", "ENQCMD PASID translation failure", False),
    (73, "ENQCMDS_PASID_FAIL", "ENQCMDS PASID translation failure", False),
    (74, "BUS_LOCK", "Bus lock", True),
    (75, "NOTIFY", "Instruction timeout (notify)", True),
    (76, "SEAMCALL", "SEAMCALL", True),
    (77, "TDCALL", "TDCALL", True),
    (78, "RDMSRLIST", "RDMSRLIST", False),
    (79, "WRMSRLIST", "WRMSRLIST", False),
    (80, "URDMSR", "URDMSR", False),
    (81, "UWRMSR", "UWRMSR", False),
    (84, "MSR_READ_IMM", "RDMSR with immediate operand", True),
    (85, "MSR_WRITE_IMM", "WRMSRNS with immediate operand", True),
]

#: Basic exit reason -> :class:`ExitReason`.
VMX_EXIT_REASONS: Mapping[int, ExitReason] = MappingProxyType(
    {n: ExitReason(n, name, d, k) for n, name, d, k in _EXIT_TABLE}
)

_EXIT_REASON_FLAGS = {
    26: "bus lock asserted",
    27: "enclave mode",
    28: "pending MTF VM exit",
    29: "VM exit from VMX root operation",
    31: "VM-entry failure",
}


def decode_exit_reason(value: int) -> tuple[ExitReason | None, tuple[str, ...]]:
    """Split the 32-bit exit-reason field into the basic reason (None if unknown) and the names
    of the flag bits that are set (26 bus lock, 27 enclave mode, 28 pending MTF VM exit, 29 VM
    exit from VMX root operation, 31 VM-entry failure)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"the exit-reason field is 32 bits, got {value!r}")
    flags = tuple(n for b, n in _EXIT_REASON_FLAGS.items() if value >> b & 1)
    return VMX_EXIT_REASONS.get(value & 0xFFFF), flags


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------

#: One packed VMWRITE entry: the encoding and the value, both little-endian u64.
VMWRITE_ENTRY = struct.Struct("<QQ")
#: The encoding of the entry that ends a packed table (no field has it).
VMWRITE_TERMINATOR = _U64


class VmcsImage(MutableMapping[str, int]):
    """Field values to VMWRITE into a VMCS: a mapping field name -> value.

    Keys may be given as a name, a full encoding or a :class:`VmcsField`; iteration yields names
    in encoding order. A value wider than its field raises ValueError naming the field. Fields not
    in the image are not written (a VMCS has no defined contents after VMCLEAR: an L1 must write
    every field its entry depends on).
    """

    def __init__(
        self, values: Mapping[FieldKey, int] | Iterable[tuple[FieldKey, int]] = ()
    ) -> None:
        self._values: dict[str, int] = {}
        items = values.items() if isinstance(values, Mapping) else values
        for k, v in items:
            self[k] = v

    # MutableMapping -----------------------------------------------------------------------
    def __getitem__(self, key: FieldKey) -> int:
        return self._values[field(key).name]

    def __setitem__(self, key: FieldKey, value: int) -> None:
        f = field(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{f.name}: a VMCS field value is an int, got {value!r}")
        if not 0 <= value <= f.mask:
            raise ValueError(
                f"{f.name} ({f.encoding:#06x}) is a {f.bits}-bit field: {value:#x} does not fit"
            )
        self._values[f.name] = value

    def __delitem__(self, key: FieldKey) -> None:
        del self._values[field(key).name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._values, key=lambda n: VMCS_FIELDS[n].encoding))

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        try:
            return field(key).name in self._values  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={v:#x}" for n, v in self.items())
        return f"VmcsImage({body})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VmcsImage):
            return self._values == other._values
        return NotImplemented

    def copy(self) -> VmcsImage:
        return VmcsImage(self._values)

    def get(self, key: FieldKey, default: int = 0) -> int:  # type: ignore[override]
        """The value of ``key``, or ``default`` (0) when the image does not write it."""
        name = field(key).name
        return self._values.get(name, default)

    # Views ----------------------------------------------------------------------------------
    def by_area(self) -> dict[Area, dict[str, int]]:
        out: dict[Area, dict[str, int]] = {a: {} for a in Area}
        for name, value in self.items():
            out[VMCS_FIELDS[name].area][name] = value
        return out

    def to_vmwrite_table(
        self, *, split_64: bool = False, include_read_only: bool = False
    ) -> list[tuple[int, int]]:
        """``[(encoding, value), ...]`` in encoding order, for an L1 that replays VMWRITEs.

        ``split_64``: write each 64-bit field as two 32-bit halves (full, then high = encoding+1),
        as 32-bit software must. Exit-information fields are left out unless
        ``include_read_only`` (VMWRITE to them needs IA32_VMX_MISC[29]).
        """
        table: list[tuple[int, int]] = []
        for name, value in self.items():
            f = VMCS_FIELDS[name]
            if f.read_only and not include_read_only:
                continue
            if split_64 and f.width == Width.BITS64:
                table.append((f.encoding, value & 0xFFFF_FFFF))
                table.append((f.encoding + 1, value >> 32))
            else:
                table.append((f.encoding, value))
        return table

    def to_bytes(
        self, *, terminated: bool = True, split_64: bool = False, include_read_only: bool = False
    ) -> bytes:
        """The VMWRITE table packed as 16-byte little-endian entries ``(u64 encoding, u64 value)``.

        With ``terminated`` a last entry with encoding :data:`VMWRITE_TERMINATOR` (all ones) ends
        the table, so a loop in the L1 can run until it sees it::

            1: mov (%rsi), %rax ; cmp $-1, %rax ; je 2f
               vmwrite 8(%rsi), %rax ; add $16, %rsi ; jmp 1b
        """
        table = self.to_vmwrite_table(split_64=split_64, include_read_only=include_read_only)
        out = b"".join(VMWRITE_ENTRY.pack(e, v) for e, v in table)
        if terminated:
            out += VMWRITE_ENTRY.pack(VMWRITE_TERMINATOR, 0)
        return out

    @classmethod
    def from_vmwrite_table(cls, table: Iterable[tuple[int, int]]) -> VmcsImage:
        """The inverse of :meth:`to_vmwrite_table` (high-half entries set the upper 32 bits)."""
        image = cls()
        for encoding, value in table:
            f, access = lookup(encoding)
            if access == Access.HIGH:
                if not 0 <= value <= 0xFFFF_FFFF:
                    raise ValueError(f"{f.name}_HIGH ({encoding:#06x}) is 32 bits: {value:#x}")
                image[f] = (image.get(f) & 0xFFFF_FFFF) | (value << 32)
            else:
                image[f] = value
        return image

    @classmethod
    def from_bytes(cls, data: bytes) -> VmcsImage:
        """The inverse of :meth:`to_bytes` (stops at a terminator entry if there is one)."""
        if len(data) % VMWRITE_ENTRY.size:
            raise ValueError(
                f"a packed VMWRITE table is a multiple of {VMWRITE_ENTRY.size} bytes, "
                f"got {len(data)}"
            )
        table = []
        for encoding, value in VMWRITE_ENTRY.iter_unpack(data):
            if encoding == VMWRITE_TERMINATOR:
                break
            table.append((encoding, value))
        return cls.from_vmwrite_table(table)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A consistency rule of a manual: its id, the section that states it, and a summary."""

    id: str
    section: str
    summary: str


@dataclass(frozen=True)
class Violation:
    """One broken rule: which rule, the field it is about, what exactly is wrong."""

    rule_id: str
    section: str  # e.g. "SDM 27.2.1.1" or "APM 15.5.1"
    message: str  # short, specific: "reserved bit 0 of the primary ... controls is 1"
    field: str  # the field (VMCS field name / VMCB field name) holding the bad value
    value: int | None = None

    @property
    def rule(self) -> str:
        """``"<section>: <message>"``, e.g. ``"SDM 27.2.1.1: VPID is 0 with 'enable VPID' 1"``."""
        return f"{self.section}: {self.message}"

    def __str__(self) -> str:
        value = "" if self.value is None else f" = {self.value:#x}"
        return f"{self.rule} [{self.field}{value}]"


def _rules(section_prefix: str, table: list[tuple[str, str, str]]) -> Mapping[str, Rule]:
    return MappingProxyType({i: Rule(i, f"{section_prefix} {s}", t) for i, s, t in table})


_C, _X, _E = "27.2.1.1", "27.2.1.2", "27.2.1.3"
_HC, _HS, _HA = "27.2.2", "27.2.3", "27.2.4"
_GC, _GS, _GD = "27.3.1.1", "27.3.1.2", "27.3.1.3"
_GR, _GN, _GP = "27.3.1.4", "27.3.1.5", "27.3.1.6"

#: Every VM-entry check :func:`check_vmcs` applies: rule id -> :class:`Rule`.
VMCS_RULES: Mapping[str, Rule] = _rules("SDM", [
    # VM-execution controls
    ("exec.reserved", _C, "pin/processor-based controls obey their capability MSRs"),
    ("exec.cr3_target_count", _C, "CR3-target count <= IA32_VMX_MISC[24:16]"),
    ("exec.io_bitmap", _C, "I/O bitmap addresses 4-KByte aligned and within the address width"),
    ("exec.msr_bitmap", _C, "MSR-bitmap address 4-KByte aligned and within the address width"),
    ("exec.tpr_shadow", _C, "virtual-APIC address and TPR threshold rules with 'use TPR shadow'"),
    ("exec.no_tpr_shadow", _C, "x2APIC/APIC-register/virtual-interrupt controls need TPR shadow"),
    ("exec.virtual_nmis", _C, "virtual NMIs need NMI exiting, NMI-window exiting virtual NMIs"),
    ("exec.apic_access", _C, "APIC-access address 4-KByte aligned and within the address width"),
    ("exec.x2apic", _C, "virtualize x2APIC mode excludes virtualize APIC accesses"),
    ("exec.vid", _C, "virtual-interrupt delivery needs external-interrupt exiting"),
    ("exec.posted", _C, "posted-interrupt processing prerequisites"),
    ("exec.vpid", _C, "VPID is not 0 when 'enable VPID' is 1"),
    ("exec.eptp", _C, "EPTP memory type, walk length, A/D flag and reserved bits"),
    ("exec.pml", _C, "'enable PML' needs EPT and an aligned PML address"),
    ("exec.unrestricted", _C, "'unrestricted guest' needs 'enable EPT'"),
    ("exec.ept_only", _C, "mode-based execute control / sub-page permissions need 'enable EPT'"),
    ("exec.vmfunc", _C, "VM-function controls obey IA32_VMX_VMFUNC; EPTP switching needs EPT"),
    ("exec.shadowing", _C, "VMREAD/VMWRITE bitmap addresses aligned with VMCS shadowing"),
    ("exec.ve", _C, "#VE information address aligned with 'EPT-violation #VE'"),
    # VM-exit controls
    ("exit.reserved", _X, "VM-exit controls obey IA32_VMX_(TRUE_)EXIT_CTLS"),
    ("exit.preemption", _X, "saving the preemption timer needs the preemption timer"),
    ("exit.msr_lists", _X, "VM-exit MSR-store/load addresses 16-byte aligned and within width"),
    # VM-entry controls
    ("entry.reserved", _E, "VM-entry controls obey IA32_VMX_(TRUE_)ENTRY_CTLS"),
    ("entry.event", _E, "the VM-entry interruption-information field is consistent"),
    ("entry.msr_list", _E, "VM-entry MSR-load address 16-byte aligned and within width"),
    ("entry.smm", _E, "entry to SMM / deactivate dual-monitor treatment only in SMM"),
    # Host state
    ("host.cr0", _HC, "host CR0 obeys IA32_VMX_CR0_FIXED0/1"),
    ("host.cr4", _HC, "host CR4 obeys IA32_VMX_CR4_FIXED0/1"),
    ("host.cr3", _HC, "host CR3 has no bit beyond the physical-address width"),
    ("host.canonical", _HC, "host SYSENTER ESP/EIP canonical"),
    ("host.pat", _HC, "host IA32_PAT holds valid memory types"),
    ("host.efer", _HC, "host IA32_EFER reserved bits 0, LMA = LME = host address-space size"),
    ("host.selector", _HS, "host selectors have RPL = 0 and TI = 0"),
    ("host.cs_tr", _HS, "host CS and TR selectors are not 0"),
    ("host.ss", _HS, "host SS selector not 0 with a 32-bit host"),
    ("host.bases", _HS, "host FS/GS/GDTR/IDTR/TR bases canonical"),
    ("host.address_space", _HA, "host address-space size, IA-32e mode guest, PAE/PCIDE, RIP"),
    # Guest state
    ("guest.cr0", _GC, "guest CR0 obeys IA32_VMX_CR0_FIXED0/1 (PE/PG free when unrestricted)"),
    ("guest.cr0_pg_pe", _GC, "guest CR0.PG = 1 needs CR0.PE = 1"),
    ("guest.cr4", _GC, "guest CR4 obeys IA32_VMX_CR4_FIXED0/1"),
    ("guest.ia32e", _GC, "IA-32e mode guest needs CR0.PG = 1 and CR4.PAE = 1; else CR4.PCIDE = 0"),
    ("guest.cr3", _GC, "guest CR3 has no bit beyond the physical-address width"),
    ("guest.debugctl", _GC, "guest IA32_DEBUGCTL reserved bits and DR7[63:32] are 0"),
    ("guest.canonical", _GC, "guest SYSENTER ESP/EIP canonical"),
    ("guest.pat", _GC, "guest IA32_PAT holds valid memory types"),
    ("guest.efer", _GC, "guest IA32_EFER reserved bits 0, LMA = IA-32e mode guest, LME if paging"),
    ("guest.seg.selector", _GS, "TR/LDTR TI = 0; SS.RPL = CS.RPL"),
    ("guest.seg.base", _GS, "segment bases canonical / upper 32 bits 0"),
    ("guest.seg.v8086", _GS, "virtual-8086 segments: base = selector << 4, limit FFFFh, AR F3h"),
    ("guest.seg.type", _GS, "segment types (CS, SS, data segments, TR, LDTR)"),
    ("guest.seg.s_p", _GS, "S and P flags of usable segments"),
    ("guest.seg.dpl", _GS, "segment DPL rules (CS vs SS, SS vs RPL, data DPL >= RPL)"),
    ("guest.seg.reserved", _GS, "access-rights reserved bits 11:8 and 31:17 are 0"),
    ("guest.seg.cs_l_db", _GS, "CS.L = 1 needs CS.D/B = 0 in IA-32e mode"),
    ("guest.seg.g", _GS, "limit and granularity agree"),
    ("guest.seg.unusable", _GS, "CS and TR are usable"),
    ("guest.dtr", _GD, "GDTR/IDTR bases canonical and limits 16 bits"),
    ("guest.rip", _GR, "guest RIP upper bits (32-bit mode) / canonical (64-bit mode)"),
    ("guest.rflags", _GR, "RFLAGS reserved bits 0, bit 1 = 1, VM = 0 in IA-32e or real mode"),
    ("guest.rflags_if", _GR, "RFLAGS.IF = 1 when injecting an external interrupt"),
    ("guest.activity", _GN, "activity state supported and compatible with SS.DPL and blocking"),
    ("guest.interruptibility", _GN, "interruptibility-state reserved bits and STI/MOV-SS rules"),
    ("guest.pending_dbg", _GN, "pending debug exceptions reserved bits are 0"),
    ("guest.link_pointer", _GN, "VMCS link pointer is all ones or aligned within width"),
    ("guest.pdpte", _GP, "PAE PDPTEs (loaded from the VMCS with EPT) have no reserved bit set"),
])  # fmt: skip


class _Out:
    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = rules
        self.items: list[Violation] = []

    def add(self, rule_id: str, field_name: str, message: str, value: int | None = None) -> None:
        section = self.rules[rule_id].section
        self.items.append(Violation(rule_id, section, message, field_name, value))


def control_bit(group: ControlGroup | str, name: str) -> int:
    """The mask of the control called ``name`` (its SDM name, as in
    :data:`pykvm.probe.vmx.CONTROL_NAMES`) in ``group``."""
    group = ControlGroup(group)
    for bit, n in CONTROL_NAMES[group].items():
        if n == name:
            return 1 << bit
    raise KeyError(f"no {group} control named {name!r}")


_PIN, _PROC, _PROC2 = ControlGroup.PINBASED, ControlGroup.PROCBASED, ControlGroup.PROCBASED2
_PROC3, _EXIT, _ENTRY = ControlGroup.PROCBASED3, ControlGroup.EXIT, ControlGroup.ENTRY

PIN_EXT_INTR = control_bit(_PIN, "external-interrupt exiting")
PIN_NMI = control_bit(_PIN, "NMI exiting")
PIN_VIRTUAL_NMIS = control_bit(_PIN, "virtual NMIs")
PIN_PREEMPTION_TIMER = control_bit(_PIN, "activate VMX-preemption timer")
PIN_POSTED = control_bit(_PIN, "process posted interrupts")
PROC_HLT = control_bit(_PROC, "HLT exiting")
PROC_TERTIARY = control_bit(_PROC, "activate tertiary controls")
PROC_TPR_SHADOW = control_bit(_PROC, "use TPR shadow")
PROC_NMI_WINDOW = control_bit(_PROC, "NMI-window exiting")
PROC_UNCOND_IO = control_bit(_PROC, "unconditional I/O exiting")
PROC_IO_BITMAPS = control_bit(_PROC, "use I/O bitmaps")
PROC_MSR_BITMAPS = control_bit(_PROC, "use MSR bitmaps")
PROC_SECONDARY = control_bit(_PROC, "activate secondary controls")
PROC2_APIC_ACCESS = control_bit(_PROC2, "virtualize APIC accesses")
PROC2_EPT = control_bit(_PROC2, "enable EPT")
PROC2_X2APIC = control_bit(_PROC2, "virtualize x2APIC mode")
PROC2_VPID = control_bit(_PROC2, "enable VPID")
PROC2_UNRESTRICTED = control_bit(_PROC2, "unrestricted guest")
PROC2_APIC_REG = control_bit(_PROC2, "APIC-register virtualization")
PROC2_VID = control_bit(_PROC2, "virtual-interrupt delivery")
PROC2_VMFUNC = control_bit(_PROC2, "enable VM functions")
PROC2_SHADOWING = control_bit(_PROC2, "VMCS shadowing")
PROC2_PML = control_bit(_PROC2, "enable PML")
PROC2_VE = control_bit(_PROC2, "EPT-violation #VE")
PROC2_MBEC = control_bit(_PROC2, "mode-based execute control for EPT")
PROC2_SPP = control_bit(_PROC2, "sub-page write permissions for EPT")
EXIT_SAVE_DEBUG = control_bit(_EXIT, "save debug controls")
EXIT_HOST_64 = control_bit(_EXIT, "host address-space size")
EXIT_ACK_INTR = control_bit(_EXIT, "acknowledge interrupt on exit")
EXIT_SAVE_PAT = control_bit(_EXIT, "save IA32_PAT")
EXIT_LOAD_PAT = control_bit(_EXIT, "load IA32_PAT")
EXIT_SAVE_EFER = control_bit(_EXIT, "save IA32_EFER")
EXIT_LOAD_EFER = control_bit(_EXIT, "load IA32_EFER")
EXIT_SAVE_PREEMPTION = control_bit(_EXIT, "save VMX-preemption timer value")
ENTRY_LOAD_DEBUG = control_bit(_ENTRY, "load debug controls")
ENTRY_IA32E = control_bit(_ENTRY, "IA-32e mode guest")
ENTRY_SMM = control_bit(_ENTRY, "entry to SMM")
ENTRY_DEACT_DUAL = control_bit(_ENTRY, "deactivate dual-monitor treatment")
ENTRY_LOAD_PAT = control_bit(_ENTRY, "load IA32_PAT")
ENTRY_LOAD_EFER = control_bit(_ENTRY, "load IA32_EFER")

_GROUP_FIELD = {
    _PIN: ("PIN_BASED_VM_EXEC_CONTROL", "pin-based VM-execution controls"),
    _PROC: ("CPU_BASED_VM_EXEC_CONTROL", "primary processor-based VM-execution controls"),
    _PROC2: ("SECONDARY_VM_EXEC_CONTROL", "secondary processor-based VM-execution controls"),
    _PROC3: ("TERTIARY_VM_EXEC_CONTROL", "tertiary processor-based VM-execution controls"),
    _EXIT: ("VM_EXIT_CONTROLS", "primary VM-exit controls"),
    _ENTRY: ("VM_ENTRY_CONTROLS", "VM-entry controls"),
}

# CR bits
CR0_PE, CR0_NE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 5, 1 << 29, 1 << 30, 1 << 31
CR4_PAE, CR4_VMXE, CR4_PCIDE = 1 << 5, 1 << 13, 1 << 17
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
_EFER_RESERVED = _U64 & ~(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE)  # Intel: 63:12, 9, 7:1
_RFLAGS_RESERVED = (_U64 & ~((1 << 22) - 1)) | (1 << 15) | (1 << 5) | (1 << 3)
RFLAGS_FIXED1, RFLAGS_IF, RFLAGS_VM = 1 << 1, 1 << 9, 1 << 17
_PAT_TYPES = {0, 1, 4, 5, 6, 7}


def _canonical(value: int, bits: int) -> bool:
    top = value >> (bits - 1)
    return top == 0 or top == (_U64 >> (bits - 1))


_CAPS_MSR = {_PIN: 0x481, _PROC: 0x482, _PROC2: 0x48B, _PROC3: 0x492, _EXIT: 0x483,
             _ENTRY: 0x484}  # fmt: skip


def _group_masks(caps: VmxCapabilities | None, group: ControlGroup) -> tuple[int, int, str]:
    """(must be 1, may be 1, what says so) for a control group."""
    part: ControlMsr | None = None
    if caps is not None:
        part = {_PIN: caps.pinbased, _PROC: caps.procbased, _PROC2: caps.procbased2,
                _PROC3: caps.procbased3, _EXIT: caps.exit, _ENTRY: caps.entry}[group]  # fmt: skip
    if part is not None:
        msr = part.true_msr if part.true_msr is not None else part.msr
        return part.must_be_1, part.may_be_1, MSR_NAMES[msr]
    if caps is not None and _CAPS_MSR[group] not in caps.missing_msrs:
        # the processor has no such controls (e.g. no secondary controls on Core 2)
        return 0, 0, f"this processor (it has no {MSR_NAMES[_CAPS_MSR[group]]})"
    must = DEFAULT1.get(group, 0)
    named = sum(1 << b for b in CONTROL_NAMES[group])
    return must, named | must, ""


def _check_controls(out: _Out, image: VmcsImage, caps: VmxCapabilities | None,
                    group: ControlGroup, rule_id: str) -> None:  # fmt: skip
    name, label = _GROUP_FIELD[group]
    value = image.get(name)
    must, may, source = _group_masks(caps, group)
    names = CONTROL_NAMES[group]
    for bit in _bits(value & ~may):
        if bit in names:
            msg = f"bit {bit} ({names[bit]}) of the {label} is 1, which {source} does not allow"
        else:
            msg = f"reserved bit {bit} of the {label} is 1"
        out.add(rule_id, name, msg, value)
    for bit in _bits(must & ~value):
        what = f" ({names[bit]})" if bit in names else ""
        why = (f"{source} requires 1" if source
               else "it is in the default-1 class (no capability MSRs given)")
        out.add(rule_id, name, f"bit {bit}{what} of the {label} is 0 but {why}", value)


def _check_address(out: _Out, image: VmcsImage, rule_id: str, name: str, align: int,
                   width: int, what: str, size: int = 1) -> None:  # fmt: skip
    value = image.get(name)
    if value & (align - 1):
        out.add(rule_id, name, f"{what} {value:#x} is not {align}-byte aligned", value)
    if (value + size - 1) >> width:
        out.add(rule_id, name,
                f"{what} {value:#x} is beyond the {width}-bit physical-address width", value)


def check_vmcs(
    image: VmcsImage,
    caps: VmxCapabilities | None = None,
    *,
    maxphyaddr: int | None = None,
    linear_address_bits: int = 48,
    host_in_ia32e_mode: bool = True,
    in_smm: bool = False,
) -> list[Violation]:
    """The VM-entry checks of the SDM ("VM Entries", 27.2 and 27.3.1) that ``image`` fails.

    ``caps`` gives the allowed control settings, fixed CR bits, CR3-target count, EPT features and
    activity states; without it the checks use what the SDM fixes for every processor (the
    default-1 control classes, the controls it defines, CR0.PE/NE/PG and CR4.VMXE fixed to 1).
    ``maxphyaddr`` is the physical-address width (CPUID 80000008H:EAX[7:0]; 52 when unknown,
    32 for VMX structures when IA32_VMX_BASIC[48] is 1). ``host_in_ia32e_mode``: the L1 executes
    VMLAUNCH in 64-bit mode. A field the image does not hold is taken as 0.

    Checks that need memory (the virtual-APIC page, MSR-load lists, the PDPTEs when EPT is off)
    or MSRs outside ``caps`` (IA32_VMX_EXIT_CTLS2, reserved bits of PERF_GLOBAL_CTRL, BNDCFGS,
    RTIT_CTL, CET and FRED state) are not made.
    """
    out = _Out(VMCS_RULES)
    phys = 52 if maxphyaddr is None else maxphyaddr
    vmx_phys = min(phys, 32) if caps is not None and caps.basic.phys_addr_32bit else phys
    lin = linear_address_bits
    get = image.get

    pin, proc, exit_, entry = (get(n) for n in (
        "PIN_BASED_VM_EXEC_CONTROL", "CPU_BASED_VM_EXEC_CONTROL", "VM_EXIT_CONTROLS",
        "VM_ENTRY_CONTROLS"))  # fmt: skip
    proc2 = get("SECONDARY_VM_EXEC_CONTROL") if proc & PROC_SECONDARY else 0
    unrestricted = bool(proc2 & PROC2_UNRESTRICTED)
    ia32e_guest = bool(entry & ENTRY_IA32E)
    host_64 = bool(exit_ & EXIT_HOST_64)

    # 27.2.1.1 VM-execution control fields ------------------------------------------------------
    _check_controls(out, image, caps, _PIN, "exec.reserved")
    _check_controls(out, image, caps, _PROC, "exec.reserved")
    if proc & PROC_SECONDARY:
        _check_controls(out, image, caps, _PROC2, "exec.reserved")
    if proc & PROC_TERTIARY:
        _check_controls(out, image, caps, _PROC3, "exec.reserved")

    max_targets = caps.misc.cr3_targets if caps is not None and caps.misc is not None else 4
    count = get("CR3_TARGET_COUNT")
    if count > max_targets:
        out.add("exec.cr3_target_count", "CR3_TARGET_COUNT",
                f"CR3-target count {count} is above the {max_targets} the processor supports",
                count)
    if proc & PROC_IO_BITMAPS:
        for n in ("IO_BITMAP_A", "IO_BITMAP_B"):
            _check_address(out, image, "exec.io_bitmap", n, 4096, vmx_phys,
                           "I/O-bitmap address", 4096)
    if proc & PROC_MSR_BITMAPS:
        _check_address(out, image, "exec.msr_bitmap", "MSR_BITMAP", 4096, vmx_phys,
                       "MSR-bitmap address", 4096)
    if proc & PROC_TPR_SHADOW:
        _check_address(out, image, "exec.tpr_shadow", "VIRTUAL_APIC_PAGE_ADDR", 4096, vmx_phys,
                       "virtual-APIC address", 4096)
        tpr = get("TPR_THRESHOLD")
        if not proc2 & PROC2_VID and tpr & ~0xF:
            out.add("exec.tpr_shadow", "TPR_THRESHOLD",
                    "TPR threshold bits 31:4 are not 0 (without virtual-interrupt delivery)", tpr)
    else:
        for bit, what in ((PROC2_X2APIC, "virtualize x2APIC mode"),
                          (PROC2_APIC_REG, "APIC-register virtualization"),
                          (PROC2_VID, "virtual-interrupt delivery")):  # fmt: skip
            if proc2 & bit:
                out.add("exec.no_tpr_shadow", "SECONDARY_VM_EXEC_CONTROL",
                        f"'{what}' is 1 while 'use TPR shadow' is 0", proc2)
    if pin & PIN_VIRTUAL_NMIS and not pin & PIN_NMI:
        out.add("exec.virtual_nmis", "PIN_BASED_VM_EXEC_CONTROL",
                "'virtual NMIs' is 1 while 'NMI exiting' is 0", pin)
    if proc & PROC_NMI_WINDOW and not pin & PIN_VIRTUAL_NMIS:
        out.add("exec.virtual_nmis", "CPU_BASED_VM_EXEC_CONTROL",
                "'NMI-window exiting' is 1 while 'virtual NMIs' is 0", proc)
    if proc2 & PROC2_APIC_ACCESS:
        _check_address(out, image, "exec.apic_access", "APIC_ACCESS_ADDR", 4096, vmx_phys,
                       "APIC-access address", 4096)
        if proc2 & PROC2_X2APIC:
            out.add("exec.x2apic", "SECONDARY_VM_EXEC_CONTROL",
                    "'virtualize x2APIC mode' and 'virtualize APIC accesses' are both 1", proc2)
    if proc2 & PROC2_VID and not pin & PIN_EXT_INTR:
        out.add("exec.vid", "PIN_BASED_VM_EXEC_CONTROL",
                "'virtual-interrupt delivery' is 1 while 'external-interrupt exiting' is 0", pin)
    if pin & PIN_POSTED:
        if not proc2 & PROC2_VID:
            out.add("exec.posted", "SECONDARY_VM_EXEC_CONTROL",
                    "'process posted interrupts' needs 'virtual-interrupt delivery'", proc2)
        if not exit_ & EXIT_ACK_INTR:
            out.add("exec.posted", "VM_EXIT_CONTROLS",
                    "'process posted interrupts' needs 'acknowledge interrupt on exit'", exit_)
        nv = get("POSTED_INTR_NV")
        if nv & 0xFF00:
            out.add("exec.posted", "POSTED_INTR_NV",
                    "posted-interrupt notification vector bits 15:8 are not 0", nv)
        _check_address(out, image, "exec.posted", "POSTED_INTR_DESC_ADDR", 64, vmx_phys,
                       "posted-interrupt descriptor address", 64)
    if proc2 & PROC2_VPID and get("VIRTUAL_PROCESSOR_ID") == 0:
        out.add("exec.vpid", "VIRTUAL_PROCESSOR_ID", "VPID is 0 while 'enable VPID' is 1", 0)
    if proc2 & PROC2_EPT:
        _check_eptp(out, image.get("EPT_POINTER"), caps, phys)
    if proc2 & PROC2_PML:
        if not proc2 & PROC2_EPT:
            out.add("exec.pml", "SECONDARY_VM_EXEC_CONTROL", "'enable PML' is 1 without EPT", proc2)
        _check_address(out, image, "exec.pml", "PML_ADDRESS", 4096, vmx_phys, "PML address", 4096)
    if unrestricted and not proc2 & PROC2_EPT:
        out.add("exec.unrestricted", "SECONDARY_VM_EXEC_CONTROL",
                "'unrestricted guest' is 1 while 'enable EPT' is 0", proc2)
    for bit, what in ((PROC2_MBEC, "mode-based execute control for EPT"),
                      (PROC2_SPP, "sub-page write permissions for EPT")):  # fmt: skip
        if proc2 & bit and not proc2 & PROC2_EPT:
            out.add("exec.ept_only", "SECONDARY_VM_EXEC_CONTROL",
                    f"'{what}' is 1 while 'enable EPT' is 0", proc2)
    if proc2 & PROC2_VMFUNC:
        vmfunc = get("VM_FUNCTION_CONTROL")
        allowed = caps.vmfunc.raw if caps is not None and caps.vmfunc is not None else 1
        for bit in _bits(vmfunc & ~allowed):
            out.add("exec.vmfunc", "VM_FUNCTION_CONTROL",
                    f"VM function {bit} is enabled but IA32_VMX_VMFUNC does not allow it", vmfunc)
        if vmfunc & 1:
            if not proc2 & PROC2_EPT:
                out.add("exec.vmfunc", "VM_FUNCTION_CONTROL", "EPTP switching without EPT", vmfunc)
            _check_address(out, image, "exec.vmfunc", "EPTP_LIST_ADDRESS", 4096, vmx_phys,
                           "EPTP-list address", 4096)
    if proc2 & PROC2_SHADOWING:
        for n in ("VMREAD_BITMAP", "VMWRITE_BITMAP"):
            _check_address(out, image, "exec.shadowing", n, 4096, vmx_phys, f"{n} address", 4096)
    if proc2 & PROC2_VE:
        _check_address(out, image, "exec.ve", "VE_INFORMATION_ADDRESS", 4096, vmx_phys,
                       "#VE information address", 4096)

    # 27.2.1.2 VM-exit control fields ----------------------------------------------------------
    _check_controls(out, image, caps, _EXIT, "exit.reserved")
    if exit_ & EXIT_SAVE_PREEMPTION and not pin & PIN_PREEMPTION_TIMER:
        out.add("exit.preemption", "VM_EXIT_CONTROLS",
                "'save VMX-preemption timer value' is 1 while the timer is not activated", exit_)
    for count_name, addr_name in (("VM_EXIT_MSR_STORE_COUNT", "VM_EXIT_MSR_STORE_ADDR"),
                                  ("VM_EXIT_MSR_LOAD_COUNT", "VM_EXIT_MSR_LOAD_ADDR")):
        n = get(count_name)
        if n:
            _check_address(out, image, "exit.msr_lists", addr_name, 16, phys, "MSR-list address",
                           16 * n)

    # 27.2.1.3 VM-entry control fields ---------------------------------------------------------
    _check_controls(out, image, caps, _ENTRY, "entry.reserved")
    _check_event_injection(out, image, caps, unrestricted)
    n = get("VM_ENTRY_MSR_LOAD_COUNT")
    if n:
        _check_address(out, image, "entry.msr_list", "VM_ENTRY_MSR_LOAD_ADDR", 16, phys,
                       "MSR-load address", 16 * n)
    if not in_smm:
        for bit, what in ((ENTRY_SMM, "entry to SMM"),
                          (ENTRY_DEACT_DUAL, "deactivate dual-monitor treatment")):
            if entry & bit:
                out.add("entry.smm", "VM_ENTRY_CONTROLS", f"'{what}' is 1 outside SMM", entry)
    elif entry & ENTRY_SMM and entry & ENTRY_DEACT_DUAL:
        out.add("entry.smm", "VM_ENTRY_CONTROLS",
                "'entry to SMM' and 'deactivate dual-monitor treatment' are both 1", entry)

    # 27.2.2-27.2.4 host state -----------------------------------------------------------------
    _check_host(out, image, caps, phys, lin, host_64, ia32e_guest, host_in_ia32e_mode)

    # 27.3.1 guest state -----------------------------------------------------------------------
    _check_guest(out, image, caps, phys, lin, unrestricted, ia32e_guest, proc2)
    return out.items


def _check_eptp(out: _Out, eptp: int, caps: VmxCapabilities | None, phys: int) -> None:
    ept = caps.ept_vpid if caps is not None else None
    name = "EPT_POINTER"
    memtype = eptp & 7
    allowed_types = {0, 6} if ept is None else (
        ({0} if ept.memtype_uc else set()) | ({6} if ept.memtype_wb else set()))
    if memtype not in allowed_types:
        allowed = ", ".join({0: "UC (0)", 6: "WB (6)"}[t] for t in sorted(allowed_types))
        out.add("exec.eptp", name,
                f"EPTP memory type {memtype} is not supported (allowed: {allowed or 'none'})",
                eptp)
    walk = ((eptp >> 3) & 7) + 1
    lengths = {4, 5} if ept is None else (
        ({4} if ept.walk_length_4 else set()) | ({5} if ept.walk_length_5 else set()))
    if walk not in lengths:
        out.add("exec.eptp", name,
                f"EPTP page-walk length {walk} (bits 5:3 = {walk - 1}) is not supported "
                f"(allowed: {', '.join(str(x) for x in sorted(lengths)) or 'none'})", eptp)
    if eptp >> 6 & 1 and ept is not None and not ept.accessed_dirty:
        out.add("exec.eptp", name,
                "EPTP bit 6 (accessed/dirty flags) is 1 but IA32_VMX_EPT_VPID_CAP[21] is 0", eptp)
    if eptp >> 7 & 1 and (ept is None or not ept.supervisor_shadow_stack):
        out.add("exec.eptp", name, "EPTP bit 7 (supervisor shadow stack) is 1 but unsupported",
                eptp)
    if eptp & 0xF00:
        out.add("exec.eptp", name, "EPTP reserved bits 11:8 are not 0", eptp)
    if eptp >> phys:
        out.add("exec.eptp", name, f"EPTP bits 63:{phys} (beyond the physical-address width) are "
                "not 0", eptp)


def _check_event_injection(out: _Out, image: VmcsImage, caps: VmxCapabilities | None,
                           unrestricted: bool) -> None:  # fmt: skip
    info = image.get("VM_ENTRY_INTR_INFO_FIELD")
    if not info >> 31:
        return
    name = "VM_ENTRY_INTR_INFO_FIELD"
    kind, vector = (info >> 8) & 7, info & 0xFF
    if kind == 1:
        out.add("entry.event", name, "interruption type 1 is reserved", info)
    if kind == 7 and (caps is None or caps.procbased is None
                      or not caps.procbased.allows("monitor trap flag")):
        out.add("entry.event", name, "interruption type 7 (other event) needs monitor trap flag",
                info)
    if kind == 2 and vector != 2:
        out.add("entry.event", name, f"an NMI injection has vector {vector}, not 2", info)
    if kind == 3 and vector > 31:
        out.add("entry.event", name, f"a hardware exception has vector {vector} > 31", info)
    if kind == 7 and vector != 0:
        out.add("entry.event", name, "an 'other event' injection has a vector other than 0", info)
    deliver = bool(info >> 11 & 1)
    protected = bool(image.get("GUEST_CR0") & CR0_PE) or not unrestricted
    wants_code = protected and kind == 3 and vector in (8, 10, 11, 12, 13, 14, 17, 21)
    no_ec_entry = caps is not None and caps.basic.no_error_code_entry
    if deliver != wants_code and not (no_ec_entry and kind == 3 and protected):
        out.add("entry.event", name,
                f"'deliver error code' is {int(deliver)} but the event "
                f"{'has' if wants_code else 'has no'} error code", info)
    if info & 0x7FFF_F000:
        out.add("entry.event", name, "interruption-information bits 30:12 are not 0", info)
    if deliver:
        code = image.get("VM_ENTRY_EXCEPTION_ERROR_CODE")
        if code >> 16:
            out.add("entry.event", "VM_ENTRY_EXCEPTION_ERROR_CODE",
                    "error-code bits 31:16 are not 0", code)
    if kind in (4, 5, 6):
        length = image.get("VM_ENTRY_INSTRUCTION_LEN")
        zero_ok = caps is not None and caps.misc is not None and caps.misc.zero_length_injection
        if length > 15 or (length == 0 and not zero_ok):
            out.add("entry.event", "VM_ENTRY_INSTRUCTION_LEN",
                    f"instruction length {length} for a software event is not in "
                    f"{'0' if zero_ok else '1'}..15", length)


def _cr_fixed(caps: VmxCapabilities | None, reg: str) -> tuple[int, int, str]:
    part = None if caps is None else (caps.cr0_fixed if reg == "cr0" else caps.cr4_fixed)
    if part is not None:
        return part.must_be_1, part.may_be_1, f"IA32_VMX_{reg.upper()}_FIXED0/1"
    if reg == "cr0":
        return CR0_PE | CR0_NE | CR0_PG, _U64, "VMX operation (CR0.PE, NE, PG fixed to 1)"
    return CR4_VMXE, _U64, "VMX operation (CR4.VMXE fixed to 1)"


def _check_fixed(out: _Out, rule_id: str, field_name: str, value: int, must: int, may: int,
                 source: str, exempt: int = 0) -> None:  # fmt: skip
    reg = "CR0" if "CR0" in field_name else "CR4"
    names = _CR0_BITS if reg == "CR0" else _CR4_BITS
    guest = field_name.startswith("GUEST_")

    def bit_name(bit: int) -> str:
        return f"{reg}.{names[bit]} (bit {bit})" if bit in names else f"{reg} bit {bit}"

    for bit in _bits(must & ~value & ~exempt):
        hint = (" (only 'unrestricted guest' lets it be 0)"
                if guest and reg == "CR0" and (1 << bit) & (CR0_PE | CR0_PG) else "")
        out.add(rule_id, field_name, f"{bit_name(bit)} is 0 but {source} requires 1{hint}", value)
    for bit in _bits(value & ~may):
        out.add(rule_id, field_name, f"{bit_name(bit)} is 1 but {source} requires 0", value)


def _check_pat(out: _Out, rule_id: str, field_name: str, pat: int, what: str = "PAT") -> None:
    """Each of the 8 bytes of a PAT value must be a memory type (0, 1, 4-7); shared with the VMCB's G_PAT."""
    for i in range(8):
        t = pat >> (8 * i) & 0xFF
        if t not in _PAT_TYPES:
            out.add(rule_id, field_name, f"{what} entry {i} holds {t}, not a valid memory type", pat)


def _check_host(out: _Out, image: VmcsImage, caps: VmxCapabilities | None, phys: int, lin: int,
                host_64: bool, ia32e_guest: bool, host_in_ia32e_mode: bool) -> None:  # fmt: skip
    get = image.get
    exit_ = get("VM_EXIT_CONTROLS")
    cr0, cr3, cr4 = get("HOST_CR0"), get("HOST_CR3"), get("HOST_CR4")
    _check_fixed(out, "host.cr0", "HOST_CR0", cr0, *_cr_fixed(caps, "cr0"))
    _check_fixed(out, "host.cr4", "HOST_CR4", cr4, *_cr_fixed(caps, "cr4"))
    if cr3 >> phys:
        out.add("host.cr3", "HOST_CR3", f"host CR3 bits 63:{phys} are not 0", cr3)
    for n in ("HOST_IA32_SYSENTER_ESP", "HOST_IA32_SYSENTER_EIP"):
        if not _canonical(get(n), lin):
            out.add("host.canonical", n, f"{n} {get(n):#x} is not canonical", get(n))
    if exit_ & EXIT_LOAD_PAT:
        _check_pat(out, "host.pat", "HOST_IA32_PAT", get("HOST_IA32_PAT"))
    if exit_ & EXIT_LOAD_EFER:
        efer = get("HOST_IA32_EFER")
        if efer & _EFER_RESERVED:
            out.add("host.efer", "HOST_IA32_EFER",
                    f"host IA32_EFER reserved bits {_bits(efer & _EFER_RESERVED)} are 1", efer)
        for bit, what in ((EFER_LMA, "LMA"), (EFER_LME, "LME")):
            if bool(efer & bit) != host_64:
                out.add("host.efer", "HOST_IA32_EFER",
                        f"host EFER.{what} is {int(bool(efer & bit))} but 'host address-space "
                        f"size' is {int(host_64)}", efer)
    # 27.2.3 segment and descriptor-table registers
    for s in ("ES", "CS", "SS", "DS", "FS", "GS", "TR"):
        n = f"HOST_{s}_SELECTOR"
        sel = get(n)
        if sel & 7:
            out.add("host.selector", n, f"host {s} selector {sel:#x} has RPL or TI set", sel)
    for s in ("CS", "TR"):
        if get(f"HOST_{s}_SELECTOR") == 0:
            out.add("host.cs_tr", f"HOST_{s}_SELECTOR", f"host {s} selector is 0", 0)
    if not host_64 and get("HOST_SS_SELECTOR") == 0:
        out.add("host.ss", "HOST_SS_SELECTOR",
                "host SS selector is 0 with 'host address-space size' 0", 0)
    for n in ("HOST_FS_BASE", "HOST_GS_BASE", "HOST_GDTR_BASE", "HOST_IDTR_BASE", "HOST_TR_BASE"):
        if not _canonical(get(n), lin):
            out.add("host.bases", n, f"{n} {get(n):#x} is not canonical", get(n))
    # 27.2.4 address-space size
    rip = get("HOST_RIP")
    if host_in_ia32e_mode and not host_64:
        out.add("host.address_space", "VM_EXIT_CONTROLS",
                "'host address-space size' is 0 but VM entry runs in IA-32e mode", exit_)
    if not host_in_ia32e_mode and (host_64 or ia32e_guest):
        out.add("host.address_space", "VM_EXIT_CONTROLS",
                "outside IA-32e mode 'host address-space size' and 'IA-32e mode guest' must be 0",
                exit_)
    if not host_64:
        if ia32e_guest:
            out.add("host.address_space", "VM_ENTRY_CONTROLS",
                    "'IA-32e mode guest' is 1 with 'host address-space size' 0",
                    get("VM_ENTRY_CONTROLS"))
        if cr4 & CR4_PCIDE:
            out.add("host.address_space", "HOST_CR4", "host CR4.PCIDE is 1 with a 32-bit host", cr4)
        if rip >> 32:
            out.add("host.address_space", "HOST_RIP", "host RIP bits 63:32 are not 0", rip)
    else:
        if not cr4 & CR4_PAE:
            out.add("host.address_space", "HOST_CR4", "host CR4.PAE is 0 with a 64-bit host", cr4)
        if not _canonical(rip, lin):
            out.add("host.address_space", "HOST_RIP", f"host RIP {rip:#x} is not canonical", rip)


_SEG_NAMES = ("CS", "SS", "DS", "ES", "FS", "GS", "TR", "LDTR")


@dataclass(frozen=True)
class _Ar:
    raw: int

    type = property(lambda self: self.raw & 0xF)
    s = property(lambda self: self.raw >> 4 & 1)
    dpl = property(lambda self: self.raw >> 5 & 3)
    p = property(lambda self: self.raw >> 7 & 1)
    l = property(lambda self: self.raw >> 13 & 1)
    db = property(lambda self: self.raw >> 14 & 1)
    g = property(lambda self: self.raw >> 15 & 1)
    unusable = property(lambda self: self.raw >> 16 & 1)


def _check_guest(out: _Out, image: VmcsImage, caps: VmxCapabilities | None, phys: int, lin: int,
                 unrestricted: bool, ia32e: bool, proc2: int) -> None:  # fmt: skip
    get = image.get
    entry = get("VM_ENTRY_CONTROLS")
    cr0, cr3, cr4 = get("GUEST_CR0"), get("GUEST_CR3"), get("GUEST_CR4")
    rflags = get("GUEST_RFLAGS")

    # 27.3.1.1 control registers, debug registers, MSRs
    exempt = (CR0_PE | CR0_PG) if unrestricted else 0
    _check_fixed(out, "guest.cr0", "GUEST_CR0", cr0, *_cr_fixed(caps, "cr0"), exempt=exempt)
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        out.add("guest.cr0_pg_pe", "GUEST_CR0", "guest CR0.PG is 1 while CR0.PE is 0", cr0)
    _check_fixed(out, "guest.cr4", "GUEST_CR4", cr4, *_cr_fixed(caps, "cr4"))
    if ia32e:
        if not cr0 & CR0_PG:
            out.add("guest.ia32e", "GUEST_CR0", "'IA-32e mode guest' is 1 but CR0.PG is 0", cr0)
        if not cr4 & CR4_PAE:
            out.add("guest.ia32e", "GUEST_CR4", "'IA-32e mode guest' is 1 but CR4.PAE is 0", cr4)
    elif cr4 & CR4_PCIDE:
        out.add("guest.ia32e", "GUEST_CR4", "CR4.PCIDE is 1 outside IA-32e mode", cr4)
    if cr3 >> phys:
        out.add("guest.cr3", "GUEST_CR3", f"guest CR3 bits 63:{phys} are not 0", cr3)
    if entry & ENTRY_LOAD_DEBUG:
        dbgctl = get("GUEST_IA32_DEBUGCTL")
        reserved = (_U64 & ~0xFFFF) | 0b111000
        if dbgctl & reserved:
            out.add("guest.debugctl", "GUEST_IA32_DEBUGCTL",
                    f"IA32_DEBUGCTL reserved bits {_bits(dbgctl & reserved)} are 1", dbgctl)
        dr7 = get("GUEST_DR7")
        if dr7 >> 32:
            out.add("guest.debugctl", "GUEST_DR7", "DR7 bits 63:32 are not 0", dr7)
    for n in ("GUEST_SYSENTER_ESP", "GUEST_SYSENTER_EIP"):
        if not _canonical(get(n), lin):
            out.add("guest.canonical", n, f"{n} {get(n):#x} is not canonical", get(n))
    if entry & ENTRY_LOAD_PAT:
        _check_pat(out, "guest.pat", "GUEST_IA32_PAT", get("GUEST_IA32_PAT"))
    if entry & ENTRY_LOAD_EFER:
        efer = get("GUEST_IA32_EFER")
        if efer & _EFER_RESERVED:
            out.add("guest.efer", "GUEST_IA32_EFER",
                    f"guest IA32_EFER reserved bits {_bits(efer & _EFER_RESERVED)} are 1", efer)
        if bool(efer & EFER_LMA) != ia32e:
            out.add("guest.efer", "GUEST_IA32_EFER",
                    f"guest EFER.LMA is {int(bool(efer & EFER_LMA))} but 'IA-32e mode guest' is "
                    f"{int(ia32e)}", efer)
        if cr0 & CR0_PG and bool(efer & EFER_LME) != bool(efer & EFER_LMA):
            out.add("guest.efer", "GUEST_IA32_EFER",
                    "guest EFER.LME differs from EFER.LMA while CR0.PG is 1", efer)

    # 27.3.1.2 segment registers
    v86 = bool(rflags & RFLAGS_VM)
    sel = {s: get(f"GUEST_{s}_SELECTOR") for s in _SEG_NAMES}
    base = {s: get(f"GUEST_{s}_BASE") for s in _SEG_NAMES}
    limit = {s: get(f"GUEST_{s}_LIMIT") for s in _SEG_NAMES}
    ar = {s: _Ar(get(f"GUEST_{s}_AR_BYTES")) for s in _SEG_NAMES}

    def usable(s: str) -> bool:
        return not ar[s].unusable

    if sel["TR"] & 4:
        out.add("guest.seg.selector", "GUEST_TR_SELECTOR", "TR selector TI flag is 1", sel["TR"])
    if usable("LDTR") and sel["LDTR"] & 4:
        out.add("guest.seg.selector", "GUEST_LDTR_SELECTOR", "LDTR selector TI flag is 1",
                sel["LDTR"])
    if not v86 and not unrestricted and sel["SS"] & 3 != sel["CS"] & 3:
        out.add("guest.seg.selector", "GUEST_SS_SELECTOR",
                f"SS.RPL {sel['SS'] & 3} differs from CS.RPL {sel['CS'] & 3}", sel["SS"])
    for s in ("TR", "FS", "GS"):
        if not _canonical(base[s], lin):
            out.add("guest.seg.base", f"GUEST_{s}_BASE", f"{s} base is not canonical", base[s])
    if usable("LDTR") and not _canonical(base["LDTR"], lin):
        out.add("guest.seg.base", "GUEST_LDTR_BASE", "LDTR base is not canonical", base["LDTR"])
    if base["CS"] >> 32:
        out.add("guest.seg.base", "GUEST_CS_BASE", "CS base bits 63:32 are not 0", base["CS"])
    for s in ("SS", "DS", "ES"):
        if usable(s) and base[s] >> 32:
            out.add("guest.seg.base", f"GUEST_{s}_BASE", f"{s} base bits 63:32 are not 0", base[s])
    if v86:
        for s in ("CS", "SS", "DS", "ES", "FS", "GS"):
            if base[s] != sel[s] << 4:
                out.add("guest.seg.v8086", f"GUEST_{s}_BASE",
                        f"virtual-8086 {s} base is not selector << 4", base[s])
            if limit[s] != 0xFFFF:
                out.add("guest.seg.v8086", f"GUEST_{s}_LIMIT",
                        f"virtual-8086 {s} limit is not FFFFh", limit[s])
            if ar[s].raw != 0xF3:
                out.add("guest.seg.v8086", f"GUEST_{s}_AR_BYTES",
                        f"virtual-8086 {s} access rights are not F3h", ar[s].raw)
    else:
        _check_guest_segments(out, sel, limit, ar, unrestricted, ia32e, cr0)
    _check_system_segments(out, limit, ar, ia32e)

    # 27.3.1.3 descriptor-table registers
    for t in ("GDTR", "IDTR"):
        if not _canonical(get(f"GUEST_{t}_BASE"), lin):
            out.add("guest.dtr", f"GUEST_{t}_BASE", f"{t} base is not canonical",
                    get(f"GUEST_{t}_BASE"))
        if get(f"GUEST_{t}_LIMIT") >> 16:
            out.add("guest.dtr", f"GUEST_{t}_LIMIT", f"{t} limit bits 31:16 are not 0",
                    get(f"GUEST_{t}_LIMIT"))

    # 27.3.1.4 RIP and RFLAGS
    rip = get("GUEST_RIP")
    if ia32e and ar["CS"].l:
        if not _canonical(rip, lin):
            out.add("guest.rip", "GUEST_RIP", f"guest RIP {rip:#x} is not canonical (64-bit mode)",
                    rip)
    elif rip >> 32:
        out.add("guest.rip", "GUEST_RIP", "guest RIP bits 63:32 are not 0 outside 64-bit mode", rip)
    if rflags & _RFLAGS_RESERVED:
        out.add("guest.rflags", "GUEST_RFLAGS",
                f"RFLAGS reserved bits {_bits(rflags & _RFLAGS_RESERVED)} are 1", rflags)
    if not rflags & RFLAGS_FIXED1:
        out.add("guest.rflags", "GUEST_RFLAGS", "RFLAGS bit 1 is 0", rflags)
    if v86 and (ia32e or not cr0 & CR0_PE):
        out.add("guest.rflags", "GUEST_RFLAGS",
                "RFLAGS.VM is 1 in IA-32e mode or with CR0.PE = 0", rflags)
    info = get("VM_ENTRY_INTR_INFO_FIELD")
    injecting = bool(info >> 31)
    kind = (info >> 8) & 7
    if injecting and kind == 0 and not rflags & RFLAGS_IF:
        out.add("guest.rflags_if", "GUEST_RFLAGS",
                "RFLAGS.IF is 0 while an external interrupt is injected", rflags)

    # 27.3.1.5 non-register state
    activity = get("GUEST_ACTIVITY_STATE")
    intr = get("GUEST_INTERRUPTIBILITY_INFO")
    misc = caps.misc if caps is not None else None
    supported = {0, 1, 2, 3} if misc is None else {0} | {
        s for s, ok in ((1, misc.activity_hlt), (2, misc.activity_shutdown),
                        (3, misc.activity_wait_for_sipi)) if ok}  # fmt: skip
    if activity not in supported:
        out.add("guest.activity", "GUEST_ACTIVITY_STATE",
                f"activity state {activity} is not supported (supported: {sorted(supported)})",
                activity)
    if activity == 1 and ar["SS"].dpl != 0:
        out.add("guest.activity", "GUEST_ACTIVITY_STATE", "HLT activity state with SS.DPL != 0",
                activity)
    if activity != 0 and intr & 3:
        out.add("guest.activity", "GUEST_ACTIVITY_STATE",
                "a non-active activity state with blocking by STI or MOV SS", activity)
    if intr & ~0x1F:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "interruptibility-state reserved bits 31:5 are not 0", intr)
    if intr & 3 == 3:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "blocking by STI and by MOV SS are both 1", intr)
    if intr & 1 and not rflags & RFLAGS_IF:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "blocking by STI is 1 while RFLAGS.IF is 0", intr)
    if injecting and kind == 0 and intr & 3:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "blocking by STI or MOV SS while injecting an external interrupt", intr)
    if injecting and kind == 2 and intr & 2:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "blocking by MOV SS while injecting an NMI", intr)
    if not entry & ENTRY_SMM and intr & 4:
        out.add("guest.interruptibility", "GUEST_INTERRUPTIBILITY_INFO",
                "blocking by SMI is 1 outside SMM", intr)
    pdbg = get("GUEST_PENDING_DBG_EXCEPTIONS")
    reserved_pdbg = (_U64 & ~0x1FFFF) | 0xFF0 | (1 << 13) | (1 << 15)
    if pdbg & reserved_pdbg:
        out.add("guest.pending_dbg", "GUEST_PENDING_DBG_EXCEPTIONS",
                f"pending debug exceptions reserved bits {_bits(pdbg & reserved_pdbg)} are 1", pdbg)
    link = get("VMCS_LINK_POINTER")
    if link != _U64:
        if link & 0xFFF:
            out.add("guest.link_pointer", "VMCS_LINK_POINTER",
                    "VMCS link pointer is neither all ones nor 4-KByte aligned", link)
        if link >> phys:
            out.add("guest.link_pointer", "VMCS_LINK_POINTER",
                    "VMCS link pointer is beyond the physical-address width", link)

    # 27.3.1.6 PDPTEs (checked from the VMCS only when EPT is on)
    if proc2 & PROC2_EPT and cr0 & CR0_PG and cr4 & CR4_PAE and not ia32e:
        reserved = (_U64 & ~((1 << phys) - 1)) | PAE_PDPTE_RESERVED
        for i in range(4):
            n = f"GUEST_PDPTR{i}"
            pdpte = get(n)
            if pdpte & 1 and pdpte & reserved:
                out.add("guest.pdpte", n, f"PDPTE{i} reserved bits {_bits(pdpte & reserved)} are 1",
                        pdpte)


def _check_guest_segments(out: _Out, sel: dict[str, int], limit: dict[str, int],
                          ar: dict[str, _Ar], unrestricted: bool, ia32e: bool,
                          cr0: int) -> None:  # fmt: skip
    cs, ss = ar["CS"], ar["SS"]
    if cs.unusable:
        out.add("guest.seg.unusable", "GUEST_CS_AR_BYTES", "CS is marked unusable", cs.raw)
    cs_types = {3, 9, 11, 13, 15} if unrestricted else {9, 11, 13, 15}
    if cs.type not in cs_types:
        out.add("guest.seg.type", "GUEST_CS_AR_BYTES",
                f"CS type {cs.type} is not an accessed code segment"
                f"{' (or 3 with unrestricted guest)' if unrestricted else ''}", cs.raw)
    if not ss.unusable and ss.type not in (3, 7):
        out.add("guest.seg.type", "GUEST_SS_AR_BYTES",
                f"SS type {ss.type} is not a read/write accessed data segment (3 or 7)", ss.raw)
    for s in ("DS", "ES", "FS", "GS"):
        a = ar[s]
        if a.unusable:
            continue
        if not a.type & 1:
            out.add("guest.seg.type", f"GUEST_{s}_AR_BYTES", f"{s} type {a.type} is not accessed",
                    a.raw)
        if a.type & 8 and not a.type & 2:
            out.add("guest.seg.type", f"GUEST_{s}_AR_BYTES",
                    f"{s} is a code segment that is not readable", a.raw)
    for s in ("CS", "SS", "DS", "ES", "FS", "GS"):
        a = ar[s]
        if a.unusable:
            continue
        if not a.s:
            out.add("guest.seg.s_p", f"GUEST_{s}_AR_BYTES", f"{s} S flag is 0 (system segment)",
                    a.raw)
        if not a.p:
            out.add("guest.seg.s_p", f"GUEST_{s}_AR_BYTES", f"{s} is not present (P = 0)", a.raw)
        if a.raw & 0xF00 or a.raw >> 17:
            out.add("guest.seg.reserved", f"GUEST_{s}_AR_BYTES",
                    f"{s} access-rights reserved bits (11:8, 31:17) are not 0", a.raw)
        _check_g(out, s, limit[s], a)
    # DPL rules
    if cs.type == 3:
        if cs.dpl != 0:
            out.add("guest.seg.dpl", "GUEST_CS_AR_BYTES", "CS type 3 with DPL != 0", cs.raw)
    elif cs.type in (9, 11):
        if cs.dpl != ss.dpl:
            out.add("guest.seg.dpl", "GUEST_CS_AR_BYTES",
                    f"non-conforming CS DPL {cs.dpl} differs from SS DPL {ss.dpl}", cs.raw)
    elif cs.type in (13, 15) and cs.dpl > ss.dpl:
        out.add("guest.seg.dpl", "GUEST_CS_AR_BYTES",
                f"conforming CS DPL {cs.dpl} is above SS DPL {ss.dpl}", cs.raw)
    if not unrestricted and ss.dpl != sel["SS"] & 3:
        out.add("guest.seg.dpl", "GUEST_SS_AR_BYTES",
                f"SS DPL {ss.dpl} differs from the SS selector's RPL {sel['SS'] & 3}", ss.raw)
    if (cs.type == 3 or not cr0 & CR0_PE) and ss.dpl != 0:
        out.add("guest.seg.dpl", "GUEST_SS_AR_BYTES",
                "SS DPL is not 0 with CS type 3 or CR0.PE = 0", ss.raw)
    if not unrestricted:
        for s in ("DS", "ES", "FS", "GS"):
            a = ar[s]
            if not a.unusable and a.type <= 11 and a.dpl < sel[s] & 3:
                out.add("guest.seg.dpl", f"GUEST_{s}_AR_BYTES",
                        f"{s} DPL {a.dpl} is below its selector's RPL {sel[s] & 3}", a.raw)
    if ia32e and cs.l and cs.db:
        out.add("guest.seg.cs_l_db", "GUEST_CS_AR_BYTES", "CS.L and CS.D/B are both 1", cs.raw)


def _check_g(out: _Out, s: str, limit: int, a: _Ar) -> None:
    if (limit & 0xFFF) != 0xFFF and a.g:
        out.add("guest.seg.g", f"GUEST_{s}_AR_BYTES",
                f"{s} G = 1 but limit bits 11:0 are not all 1 ({limit:#x})", a.raw)
    if limit >> 20 and not a.g:
        out.add("guest.seg.g", f"GUEST_{s}_AR_BYTES",
                f"{s} G = 0 but the limit {limit:#x} is above FFFFFh", a.raw)


def _check_system_segments(out: _Out, limit: dict[str, int], ar: dict[str, _Ar],
                           ia32e: bool) -> None:  # fmt: skip
    tr = ar["TR"]
    types = {11} if ia32e else {3, 11}
    if tr.type not in types:
        out.add("guest.seg.type", "GUEST_TR_AR_BYTES",
                f"TR type {tr.type} is not a busy TSS ({' or '.join(map(str, sorted(types)))})",
                tr.raw)
    if tr.s:
        out.add("guest.seg.s_p", "GUEST_TR_AR_BYTES", "TR S flag is 1", tr.raw)
    if not tr.p:
        out.add("guest.seg.s_p", "GUEST_TR_AR_BYTES", "TR is not present", tr.raw)
    if tr.unusable:
        out.add("guest.seg.unusable", "GUEST_TR_AR_BYTES", "TR is marked unusable", tr.raw)
    if tr.raw & 0xF00 or tr.raw >> 17:
        out.add("guest.seg.reserved", "GUEST_TR_AR_BYTES",
                "TR access-rights reserved bits (11:8, 31:17) are not 0", tr.raw)
    _check_g(out, "TR", limit["TR"], tr)
    ldtr = ar["LDTR"]
    if not ldtr.unusable:
        if ldtr.type != 2:
            out.add("guest.seg.type", "GUEST_LDTR_AR_BYTES", f"LDTR type {ldtr.type} is not 2",
                    ldtr.raw)
        if ldtr.s:
            out.add("guest.seg.s_p", "GUEST_LDTR_AR_BYTES", "LDTR S flag is 1", ldtr.raw)
        if not ldtr.p:
            out.add("guest.seg.s_p", "GUEST_LDTR_AR_BYTES", "LDTR is not present", ldtr.raw)
        if ldtr.raw & 0xF00 or ldtr.raw >> 17:
            out.add("guest.seg.reserved", "GUEST_LDTR_AR_BYTES",
                    "LDTR access-rights reserved bits (11:8, 31:17) are not 0", ldtr.raw)
        _check_g(out, "LDTR", limit["LDTR"], ldtr)
