"""Intel VMX capability MSRs (Intel SDM Vol. 3D, appendix A "VMX Capability Reporting Facility").

Every VM-execution/exit/entry control is named as the SDM names it (tables "Definitions of
Pin-Based / Primary Processor-Based / Secondary Processor-Based / Tertiary Processor-Based
VM-Execution Controls", "Definitions of Primary VM-Exit Controls", "Definitions of VM-Entry
Controls"); positions were checked against the Linux kernel (``arch/x86/include/asm/vmx.h``,
``vmxfeatures.h``) and VirtualBox (``include/VBox/vmm/hm_vmx.h``). Bits the tables do not name
are reported as ``bit<N>`` when they may be 1.

A control MSR gives the allowed-0 settings in bits 31:0 (a 1 means the control must be 1) and the
allowed-1 settings in bits 63:32 (a 1 means the control may be 1). Each control is one of
(:class:`Setting`):

* ``yes``: may be 0 or 1;
* ``no``: must be 0;
* ``forced``: must be 1;
* ``default-1``: the legacy MSR reports "must be 1" (it is in the default-1 class), but the TRUE
  MSR (present when IA32_VMX_BASIC[55] is 1) lets it be 0;
* ``contradictory``: must be 1 and must be 0 at once (no real processor reports this; VM entry
  could never succeed).

The tertiary controls MSR (0x492) has no allowed-0 half: its 64 bits are allowed-1 settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

__all__ = [
    "CONTROL_NAMES",
    "MSR_NAMES",
    "Control",
    "ControlGroup",
    "ControlMsr",
    "CrFixed",
    "EptVpidCap",
    "Setting",
    "VmFunc",
    "VmxBasic",
    "VmxCapabilities",
    "VmxMisc",
    "classify",
    "decode_basic",
    "decode_controls",
    "decode_cr_fixed",
    "decode_ept_vpid_cap",
    "decode_misc",
    "decode_tertiary",
    "decode_vmcs_enum",
    "decode_vmfunc",
    "decode_vmx",
]

IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_MISC = 0x485
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR0_FIXED1 = 0x487
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_CR4_FIXED1 = 0x489
IA32_VMX_VMCS_ENUM = 0x48A
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_EPT_VPID_CAP = 0x48C
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
IA32_VMX_VMFUNC = 0x491
IA32_VMX_PROCBASED_CTLS3 = 0x492

#: MSR index -> architectural name.
MSR_NAMES: Mapping[int, str] = MappingProxyType(
    {
        IA32_VMX_BASIC: "IA32_VMX_BASIC",
        IA32_VMX_PINBASED_CTLS: "IA32_VMX_PINBASED_CTLS",
        IA32_VMX_PROCBASED_CTLS: "IA32_VMX_PROCBASED_CTLS",
        IA32_VMX_EXIT_CTLS: "IA32_VMX_EXIT_CTLS",
        IA32_VMX_ENTRY_CTLS: "IA32_VMX_ENTRY_CTLS",
        IA32_VMX_MISC: "IA32_VMX_MISC",
        IA32_VMX_CR0_FIXED0: "IA32_VMX_CR0_FIXED0",
        IA32_VMX_CR0_FIXED1: "IA32_VMX_CR0_FIXED1",
        IA32_VMX_CR4_FIXED0: "IA32_VMX_CR4_FIXED0",
        IA32_VMX_CR4_FIXED1: "IA32_VMX_CR4_FIXED1",
        IA32_VMX_VMCS_ENUM: "IA32_VMX_VMCS_ENUM",
        IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
        IA32_VMX_EPT_VPID_CAP: "IA32_VMX_EPT_VPID_CAP",
        IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
        IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
        IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS",
        IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS",
        IA32_VMX_VMFUNC: "IA32_VMX_VMFUNC",
        IA32_VMX_PROCBASED_CTLS3: "IA32_VMX_PROCBASED_CTLS3",
    }
)

_U64 = (1 << 64) - 1


class Setting(str, Enum):
    """What a capability MSR allows for one control."""

    YES = "yes"
    NO = "no"
    FORCED = "forced"
    DEFAULT1 = "default-1"
    CONTRADICTORY = "contradictory"

    def __str__(self) -> str:
        return self.value

    @property
    def may_be_1(self) -> bool:
        return self in (Setting.YES, Setting.FORCED, Setting.DEFAULT1)

    @property
    def may_be_0(self) -> bool:
        return self in (Setting.YES, Setting.NO, Setting.DEFAULT1)


class ControlGroup(str, Enum):
    """The VMCS control fields that capability MSRs describe."""

    PINBASED = "pinbased"
    PROCBASED = "procbased"
    PROCBASED2 = "procbased2"
    PROCBASED3 = "procbased3"
    EXIT = "exit"
    ENTRY = "entry"

    def __str__(self) -> str:
        return self.value


#: Control names by group and bit (SDM Vol. 3C chapter "Virtual Machine Control Structures").
CONTROL_NAMES: Mapping[ControlGroup, Mapping[int, str]] = MappingProxyType(
    {
        ControlGroup.PINBASED: MappingProxyType(
            {
                0: "external-interrupt exiting",
                3: "NMI exiting",
                5: "virtual NMIs",
                6: "activate VMX-preemption timer",
                7: "process posted interrupts",
            }
        ),
        ControlGroup.PROCBASED: MappingProxyType(
            {
                2: "interrupt-window exiting",
                3: "use TSC offsetting",
                7: "HLT exiting",
                9: "INVLPG exiting",
                10: "MWAIT exiting",
                11: "RDPMC exiting",
                12: "RDTSC exiting",
                15: "CR3-load exiting",
                16: "CR3-store exiting",
                17: "activate tertiary controls",
                19: "CR8-load exiting",
                20: "CR8-store exiting",
                21: "use TPR shadow",
                22: "NMI-window exiting",
                23: "MOV-DR exiting",
                24: "unconditional I/O exiting",
                25: "use I/O bitmaps",
                27: "monitor trap flag",
                28: "use MSR bitmaps",
                29: "MONITOR exiting",
                30: "PAUSE exiting",
                31: "activate secondary controls",
            }
        ),
        ControlGroup.PROCBASED2: MappingProxyType(
            {
                0: "virtualize APIC accesses",
                1: "enable EPT",
                2: "descriptor-table exiting",
                3: "enable RDTSCP",
                4: "virtualize x2APIC mode",
                5: "enable VPID",
                6: "WBINVD exiting",
                7: "unrestricted guest",
                8: "APIC-register virtualization",
                9: "virtual-interrupt delivery",
                10: "PAUSE-loop exiting",
                11: "RDRAND exiting",
                12: "enable INVPCID",
                13: "enable VM functions",
                14: "VMCS shadowing",
                15: "enable ENCLS exiting",
                16: "RDSEED exiting",
                17: "enable PML",
                18: "EPT-violation #VE",
                19: "conceal VMX from PT",
                20: "enable XSAVES/XRSTORS",
                21: "PASID translation",
                22: "mode-based execute control for EPT",
                23: "sub-page write permissions for EPT",
                24: "Intel PT uses guest physical addresses",
                25: "use TSC scaling",
                26: "enable user wait and pause",
                27: "enable PCONFIG",
                28: "enable ENCLV exiting",
                30: "VMM bus-lock detection",
                31: "instruction timeout",
            }
        ),
        ControlGroup.PROCBASED3: MappingProxyType(
            {
                0: "LOADIWKEY exiting",
                1: "enable HLAT",
                2: "EPT paging-write control",
                3: "guest-paging verification",
                4: "IPI virtualization",
                7: "virtualize IA32_SPEC_CTRL",
            }
        ),
        ControlGroup.EXIT: MappingProxyType(
            {
                2: "save debug controls",
                9: "host address-space size",
                12: "load IA32_PERF_GLOBAL_CTRL",
                15: "acknowledge interrupt on exit",
                18: "save IA32_PAT",
                19: "load IA32_PAT",
                20: "save IA32_EFER",
                21: "load IA32_EFER",
                22: "save VMX-preemption timer value",
                23: "clear IA32_BNDCFGS",
                24: "conceal VMX from PT",
                25: "clear IA32_RTIT_CTL",
                26: "clear IA32_LBR_CTL",
                27: "clear UINV",
                28: "load CET state",
                29: "load PKRS",
                30: "save IA32_PERF_GLOBAL_CTL",
                31: "activate secondary controls",
            }
        ),
        ControlGroup.ENTRY: MappingProxyType(
            {
                2: "load debug controls",
                9: "IA-32e mode guest",
                10: "entry to SMM",
                11: "deactivate dual-monitor treatment",
                13: "load IA32_PERF_GLOBAL_CTRL",
                14: "load IA32_PAT",
                15: "load IA32_EFER",
                16: "load IA32_BNDCFGS",
                17: "conceal VMX from PT",
                18: "load IA32_RTIT_CTL",
                19: "load UINV",
                20: "load CET state",
                21: "load guest IA32_LBR_CTL",
                22: "load PKRS",
            }
        ),
    }
)

#: The default-1 class of each control field: the bits the first VMX processors forced to 1.
#: Processors that allow some of them to be 0 report that only in the TRUE MSRs.
DEFAULT1: Mapping[ControlGroup, int] = MappingProxyType(
    {
        ControlGroup.PINBASED: 0x0000_0016,
        ControlGroup.PROCBASED: 0x0401_E172,
        ControlGroup.EXIT: 0x0003_6DFF,
        ControlGroup.ENTRY: 0x0000_11FF,
    }
)

_LEGACY_MSR = {
    ControlGroup.PINBASED: IA32_VMX_PINBASED_CTLS,
    ControlGroup.PROCBASED: IA32_VMX_PROCBASED_CTLS,
    ControlGroup.PROCBASED2: IA32_VMX_PROCBASED_CTLS2,
    ControlGroup.PROCBASED3: IA32_VMX_PROCBASED_CTLS3,
    ControlGroup.EXIT: IA32_VMX_EXIT_CTLS,
    ControlGroup.ENTRY: IA32_VMX_ENTRY_CTLS,
}
_TRUE_MSR = {
    ControlGroup.PINBASED: IA32_VMX_TRUE_PINBASED_CTLS,
    ControlGroup.PROCBASED: IA32_VMX_TRUE_PROCBASED_CTLS,
    ControlGroup.EXIT: IA32_VMX_TRUE_EXIT_CTLS,
    ControlGroup.ENTRY: IA32_VMX_TRUE_ENTRY_CTLS,
}


def _check_u64(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
        raise ValueError(f"{what} must be a 64-bit unsigned integer, got {value!r}")
    return value


def _bits(mask: int) -> list[int]:
    return [b for b in range(mask.bit_length()) if (mask >> b) & 1]


# ---------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------


def classify(
    bit: int, must_be_1: int, may_be_1: int, legacy_must_be_1: int | None = None
) -> Setting:
    """The setting of control ``bit``.

    ``must_be_1`` is the allowed-0 mask in effect (from the TRUE MSR when there is one),
    ``may_be_1`` the allowed-1 mask. ``legacy_must_be_1`` is the allowed-0 mask of the legacy
    MSR when a TRUE MSR is in use; a bit it forces that the TRUE MSR does not is ``default-1``.
    """
    a0 = (must_be_1 >> bit) & 1
    a1 = (may_be_1 >> bit) & 1
    if a0 and not a1:
        return Setting.CONTRADICTORY
    if not a1:
        return Setting.NO
    if a0:
        return Setting.FORCED
    if legacy_must_be_1 is not None and (legacy_must_be_1 >> bit) & 1:
        return Setting.DEFAULT1
    return Setting.YES


@dataclass(frozen=True)
class Control:
    """One control bit and what the capability MSRs allow for it."""

    bit: int
    name: str
    setting: Setting

    @property
    def may_be_1(self) -> bool:
        return self.setting.may_be_1

    @property
    def may_be_0(self) -> bool:
        return self.setting.may_be_0

    def to_json(self) -> dict[str, Any]:
        return {"bit": self.bit, "name": self.name, "setting": self.setting.value}


@dataclass(frozen=True)
class ControlMsr:
    """A decoded control capability MSR (with its TRUE counterpart, if used).

    ``controls`` lists every named control of the group and every unnamed bit that may be 1.
    """

    group: ControlGroup
    msr: int
    raw: int
    true_msr: int | None
    true_raw: int | None
    must_be_1: int  # allowed-0 mask in effect (TRUE MSR's when used)
    may_be_1: int  # allowed-1 mask
    controls: tuple[Control, ...]

    def control(self, name: str) -> Control:
        """The named control (every SDM-named control of the group is listed)."""
        for c in self.controls:
            if c.name == name:
                return c
        raise KeyError(f"no {self.group} control named {name!r}")

    def setting(self, name: str) -> Setting:
        """The setting of the control called ``name`` (its SDM name, or ``bit<N>``)."""
        if name.startswith("bit") and name[3:].isdigit():
            bit = int(name[3:])
            for c in self.controls:
                if c.bit == bit:
                    return c.setting
            return Setting.NO
        return self.control(name).setting

    def allows(self, name: str) -> bool:
        """Whether the control called ``name`` may be set to 1."""
        return self.setting(name).may_be_1

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group.value,
            "msr": self.msr,
            "raw": self.raw,
            "true_msr": self.true_msr,
            "true_raw": self.true_raw,
            "must_be_1": self.must_be_1,
            "may_be_1": self.may_be_1,
            "controls": [c.to_json() for c in self.controls],
        }


def _controls(group: ControlGroup, settings: dict[int, Setting]) -> tuple[Control, ...]:
    names = CONTROL_NAMES[group]
    out = []
    for bit in sorted(settings):
        setting = settings[bit]
        if bit in names:
            out.append(Control(bit, names[bit], setting))
        elif setting is not Setting.NO:
            out.append(Control(bit, f"bit{bit}", setting))
    return tuple(out)


def decode_controls(group: ControlGroup | str, raw: int, true_raw: int | None = None) -> ControlMsr:
    """Decode a 32-bit-control capability MSR (pin-based, primary/secondary processor-based,
    exit, entry). Pass ``true_raw`` (the IA32_VMX_TRUE_* value) when IA32_VMX_BASIC[55] is 1."""
    group = ControlGroup(group)
    if group is ControlGroup.PROCBASED3:
        raise ValueError("the tertiary controls MSR is allowed-1 only: use decode_tertiary()")
    _check_u64(f"{MSR_NAMES[_LEGACY_MSR[group]]}", raw)
    if true_raw is not None:
        if group not in _TRUE_MSR:
            raise ValueError(f"{group} controls have no TRUE capability MSR")
        _check_u64(f"{MSR_NAMES[_TRUE_MSR[group]]}", true_raw)
    legacy_a0 = raw & 0xFFFF_FFFF
    if true_raw is None:
        must, may, legacy = legacy_a0, raw >> 32, None
    else:
        must, may, legacy = true_raw & 0xFFFF_FFFF, true_raw >> 32, legacy_a0
    settings = {bit: classify(bit, must, may, legacy) for bit in range(32)}
    return ControlMsr(
        group=group,
        msr=_LEGACY_MSR[group],
        raw=raw,
        true_msr=None if true_raw is None else _TRUE_MSR[group],
        true_raw=true_raw,
        must_be_1=must,
        may_be_1=may,
        controls=_controls(group, settings),
    )


def decode_tertiary(raw: int) -> ControlMsr:
    """Decode IA32_VMX_PROCBASED_CTLS3: every bit is an allowed-1 setting (64 controls)."""
    _check_u64("IA32_VMX_PROCBASED_CTLS3", raw)
    settings = {bit: (Setting.YES if (raw >> bit) & 1 else Setting.NO) for bit in range(64)}
    return ControlMsr(
        group=ControlGroup.PROCBASED3,
        msr=IA32_VMX_PROCBASED_CTLS3,
        raw=raw,
        true_msr=None,
        true_raw=None,
        must_be_1=0,
        may_be_1=raw,
        controls=_controls(ControlGroup.PROCBASED3, settings),
    )


# ---------------------------------------------------------------------------------------------
# IA32_VMX_BASIC, MISC, fixed CR bits, VMCS_ENUM, EPT/VPID, VMFUNC
# ---------------------------------------------------------------------------------------------

_MEMORY_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}


@dataclass(frozen=True)
class VmxBasic:
    """IA32_VMX_BASIC (0x480)."""

    raw: int
    revision_id: int  # 30:0
    vmcs_size: int  # 44:32, bytes of VMXON/VMCS region
    phys_addr_32bit: bool  # 48: VMXON/VMCS/... addresses limited to 32 bits
    dual_monitor_smm: bool  # 49: dual-monitor treatment of SMIs and SMM
    memory_type: int  # 53:50: memory type of VMCS and referenced structures
    ins_outs_info: bool  # 54: VM-exit instruction information reported for INS/OUTS
    true_controls: bool  # 55: IA32_VMX_TRUE_*_CTLS exist
    no_error_code_entry: bool  # 56: hardware exceptions injectable with or without error code
    other_bits: tuple[int, ...]  # set bits the SDM reserves (31, 45-47, 57-63)

    @property
    def memory_type_name(self) -> str:
        return _MEMORY_TYPES.get(self.memory_type, f"reserved({self.memory_type})")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["other_bits"] = list(self.other_bits)
        data["memory_type_name"] = self.memory_type_name
        return data


def decode_basic(raw: int) -> VmxBasic:
    _check_u64("IA32_VMX_BASIC", raw)
    reserved = (1 << 31) | (0b111 << 45) | (0x7F << 57)
    return VmxBasic(
        raw=raw,
        revision_id=raw & 0x7FFF_FFFF,
        vmcs_size=(raw >> 32) & 0x1FFF,
        phys_addr_32bit=bool((raw >> 48) & 1),
        dual_monitor_smm=bool((raw >> 49) & 1),
        memory_type=(raw >> 50) & 0xF,
        ins_outs_info=bool((raw >> 54) & 1),
        true_controls=bool((raw >> 55) & 1),
        no_error_code_entry=bool((raw >> 56) & 1),
        other_bits=tuple(_bits(raw & reserved)),
    )


@dataclass(frozen=True)
class VmxMisc:
    """IA32_VMX_MISC (0x485)."""

    raw: int
    preemption_timer_rate: int  # 4:0: the timer counts down when TSC bit X changes
    stores_efer_lma: bool  # 5: VM exits store EFER.LMA into "IA-32e mode guest"
    activity_hlt: bool  # 6
    activity_shutdown: bool  # 7
    activity_wait_for_sipi: bool  # 8
    pt_in_vmx: bool  # 14: Intel PT can be used in VMX operation
    rdmsr_smbase_in_smm: bool  # 15: RDMSR can read IA32_SMBASE in SMM
    cr3_targets: int  # 24:16: number of CR3-target values
    max_msr_list: int  # 27:25 as N: recommended maximum of 512 * (N + 1) MSRs per list
    smm_vmxoff_blocking: bool  # 28: IA32_SMM_MONITOR_CTL[2] can be set (VMXOFF unblocks SMIs)
    vmwrite_any_field: bool  # 29: VMWRITE can write any supported field, exit info included
    zero_length_injection: bool  # 30: software events injectable with instruction length 0
    mseg_revision: int  # 63:32

    @property
    def max_msr_list_entries(self) -> int:
        return 512 * (self.max_msr_list + 1)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_msr_list_entries"] = self.max_msr_list_entries
        return data


def decode_misc(raw: int) -> VmxMisc:
    _check_u64("IA32_VMX_MISC", raw)
    return VmxMisc(
        raw=raw,
        preemption_timer_rate=raw & 0x1F,
        stores_efer_lma=bool((raw >> 5) & 1),
        activity_hlt=bool((raw >> 6) & 1),
        activity_shutdown=bool((raw >> 7) & 1),
        activity_wait_for_sipi=bool((raw >> 8) & 1),
        pt_in_vmx=bool((raw >> 14) & 1),
        rdmsr_smbase_in_smm=bool((raw >> 15) & 1),
        cr3_targets=(raw >> 16) & 0x1FF,
        max_msr_list=(raw >> 25) & 0x7,
        smm_vmxoff_blocking=bool((raw >> 28) & 1),
        vmwrite_any_field=bool((raw >> 29) & 1),
        zero_length_injection=bool((raw >> 30) & 1),
        mseg_revision=raw >> 32,
    )


_CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM", 29: "NW",
             30: "CD", 31: "PG"}  # fmt: skip
_CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
             8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
             14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
             21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP"}  # fmt: skip


@dataclass(frozen=True)
class CrFixed:
    """IA32_VMX_CRn_FIXED0/FIXED1: CRn bits fixed in VMX operation.

    A bit set in FIXED0 must be 1; a bit clear in FIXED1 must be 0. (With "unrestricted guest",
    CR0.PE and CR0.PG of the guest may be 0 despite FIXED0.)
    """

    register: str  # "cr0" or "cr4"
    fixed0: int
    fixed1: int

    @property
    def must_be_1(self) -> int:
        return self.fixed0 & self.fixed1

    @property
    def may_be_1(self) -> int:
        return self.fixed1

    def _names(self, mask: int) -> tuple[str, ...]:
        names = _CR0_BITS if self.register == "cr0" else _CR4_BITS
        return tuple(names.get(b, f"bit{b}") for b in _bits(mask))

    @property
    def must_be_1_names(self) -> tuple[str, ...]:
        return self._names(self.must_be_1)

    @property
    def may_be_1_names(self) -> tuple[str, ...]:
        """The bits that may be 1 (FIXED1), by name (only the low 32 bits are architectural)."""
        return self._names(self.may_be_1 & 0xFFFF_FFFF)

    def to_json(self) -> dict[str, Any]:
        return {
            "register": self.register,
            "fixed0": self.fixed0,
            "fixed1": self.fixed1,
            "must_be_1": list(self.must_be_1_names),
            "may_be_1": list(self.may_be_1_names),
        }


def decode_cr_fixed(register: str, fixed0: int, fixed1: int) -> CrFixed:
    if register not in ("cr0", "cr4"):
        raise ValueError(f"register must be 'cr0' or 'cr4', got {register!r}")
    _check_u64(f"IA32_VMX_{register.upper()}_FIXED0", fixed0)
    _check_u64(f"IA32_VMX_{register.upper()}_FIXED1", fixed1)
    return CrFixed(register, fixed0, fixed1)


def decode_vmcs_enum(raw: int) -> int:
    """IA32_VMX_VMCS_ENUM (0x48A): the highest index value of any VMCS field encoding (9:1)."""
    _check_u64("IA32_VMX_VMCS_ENUM", raw)
    return (raw >> 1) & 0x1FF


@dataclass(frozen=True)
class EptVpidCap:
    """IA32_VMX_EPT_VPID_CAP (0x48C)."""

    raw: int
    execute_only: bool  # 0: EPT entries may be execute-only
    walk_length_4: bool  # 6: page-walk length of 4
    walk_length_5: bool  # 7: page-walk length of 5
    memtype_uc: bool  # 8: EPT paging structures may be uncacheable
    memtype_wb: bool  # 14: EPT paging structures may be write-back
    pages_2mb: bool  # 16: EPT PDEs may map 2-MByte pages
    pages_1gb: bool  # 17: EPT PDPTEs may map 1-GByte pages
    invept: bool  # 20: INVEPT supported
    accessed_dirty: bool  # 21: accessed and dirty flags for EPT
    advanced_exit_info: bool  # 22: advanced VM-exit information for EPT violations
    supervisor_shadow_stack: bool  # 23: supervisor shadow-stack control
    invept_single_context: bool  # 25
    invept_all_context: bool  # 26
    invvpid: bool  # 32: INVVPID supported
    invvpid_individual_address: bool  # 40
    invvpid_single_context: bool  # 41
    invvpid_all_context: bool  # 42
    invvpid_single_context_retaining_globals: bool  # 43
    hlat_prefix_size: int  # 53:48: maximum HLAT prefix size

    @property
    def max_walk_length(self) -> int | None:
        return 5 if self.walk_length_5 else 4 if self.walk_length_4 else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_walk_length"] = self.max_walk_length
        return data


def decode_ept_vpid_cap(raw: int) -> EptVpidCap:
    _check_u64("IA32_VMX_EPT_VPID_CAP", raw)

    def bit(n: int) -> bool:
        return bool((raw >> n) & 1)

    return EptVpidCap(
        raw=raw,
        execute_only=bit(0),
        walk_length_4=bit(6),
        walk_length_5=bit(7),
        memtype_uc=bit(8),
        memtype_wb=bit(14),
        pages_2mb=bit(16),
        pages_1gb=bit(17),
        invept=bit(20),
        accessed_dirty=bit(21),
        advanced_exit_info=bit(22),
        supervisor_shadow_stack=bit(23),
        invept_single_context=bit(25),
        invept_all_context=bit(26),
        invvpid=bit(32),
        invvpid_individual_address=bit(40),
        invvpid_single_context=bit(41),
        invvpid_all_context=bit(42),
        invvpid_single_context_retaining_globals=bit(43),
        hlat_prefix_size=(raw >> 48) & 0x3F,
    )


@dataclass(frozen=True)
class VmFunc:
    """IA32_VMX_VMFUNC (0x491): the VM functions that may be enabled."""

    raw: int
    functions: tuple[str, ...]  # "EPTP switching" for bit 0, bit<N> for others

    @property
    def eptp_switching(self) -> bool:
        return bool(self.raw & 1)

    def to_json(self) -> dict[str, Any]:
        return {"raw": self.raw, "functions": list(self.functions)}


def decode_vmfunc(raw: int) -> VmFunc:
    _check_u64("IA32_VMX_VMFUNC", raw)
    return VmFunc(raw, tuple("EPTP switching" if b == 0 else f"bit{b}" for b in _bits(raw)))


# ---------------------------------------------------------------------------------------------
# All of it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmxCapabilities:
    """Everything the VMX capability MSRs of one logical processor say.

    A part is None when its MSR is not architecturally present (e.g. no secondary controls
    when "activate secondary controls" may not be 1) or was not in the input; ``missing_msrs``
    lists the MSRs that should exist by the SDM's rules but were not given.
    """

    basic: VmxBasic
    pinbased: ControlMsr | None
    procbased: ControlMsr | None
    procbased2: ControlMsr | None
    procbased3: ControlMsr | None
    exit: ControlMsr | None
    entry: ControlMsr | None
    misc: VmxMisc | None
    cr0_fixed: CrFixed | None
    cr4_fixed: CrFixed | None
    vmcs_enum_max_index: int | None
    ept_vpid: EptVpidCap | None
    vmfunc: VmFunc | None
    missing_msrs: tuple[int, ...]

    # Convenience answers -----------------------------------------------------------------
    def _allows(self, part: ControlMsr | None, name: str) -> bool:
        return part is not None and part.allows(name)

    @property
    def secondary_controls(self) -> bool:
        return self._allows(self.procbased, "activate secondary controls")

    @property
    def tertiary_controls(self) -> bool:
        return self._allows(self.procbased, "activate tertiary controls")

    @property
    def ept(self) -> bool:
        return self.secondary_controls and self._allows(self.procbased2, "enable EPT")

    @property
    def vpid(self) -> bool:
        return self.secondary_controls and self._allows(self.procbased2, "enable VPID")

    @property
    def unrestricted_guest(self) -> bool:
        return self.secondary_controls and self._allows(self.procbased2, "unrestricted guest")

    @property
    def vmcs_shadowing(self) -> bool:
        return self.secondary_controls and self._allows(self.procbased2, "VMCS shadowing")

    @property
    def posted_interrupts(self) -> bool:
        return self._allows(self.pinbased, "process posted interrupts")

    @property
    def preemption_timer(self) -> bool:
        return self._allows(self.pinbased, "activate VMX-preemption timer")

    @property
    def control_msrs(self) -> tuple[ControlMsr, ...]:
        parts = (self.pinbased, self.procbased, self.procbased2, self.procbased3, self.exit,
                 self.entry)  # fmt: skip
        return tuple(p for p in parts if p is not None)

    def to_json(self) -> dict[str, Any]:
        def j(part: Any) -> Any:
            return None if part is None else part.to_json()

        return {
            "basic": self.basic.to_json(),
            "pinbased": j(self.pinbased),
            "procbased": j(self.procbased),
            "procbased2": j(self.procbased2),
            "procbased3": j(self.procbased3),
            "exit": j(self.exit),
            "entry": j(self.entry),
            "misc": j(self.misc),
            "cr0_fixed": j(self.cr0_fixed),
            "cr4_fixed": j(self.cr4_fixed),
            "vmcs_enum_max_index": self.vmcs_enum_max_index,
            "ept_vpid": j(self.ept_vpid),
            "vmfunc": j(self.vmfunc),
            "missing_msrs": [{"index": m, "name": MSR_NAMES[m]} for m in self.missing_msrs],
            "summary": {
                "secondary_controls": self.secondary_controls,
                "tertiary_controls": self.tertiary_controls,
                "ept": self.ept,
                "vpid": self.vpid,
                "unrestricted_guest": self.unrestricted_guest,
                "vmcs_shadowing": self.vmcs_shadowing,
            },
        }


def decode_vmx(msrs: Mapping[int, int]) -> VmxCapabilities | None:
    """Decode the VMX capability MSRs in ``msrs`` (index -> value, successful reads only).

    Returns None when IA32_VMX_BASIC is absent (no VMX, or the MSRs were not read).
    """
    if IA32_VMX_BASIC not in msrs:
        return None
    basic = decode_basic(msrs[IA32_VMX_BASIC])
    missing: list[int] = []

    def get(index: int) -> int | None:
        value = msrs.get(index)
        if value is None:
            missing.append(index)
        return value

    def controls(group: ControlGroup) -> ControlMsr | None:
        raw = get(_LEGACY_MSR[group])
        true_raw = get(_TRUE_MSR[group]) if basic.true_controls else None
        if raw is None:
            return None
        return decode_controls(group, raw, true_raw)

    pinbased = controls(ControlGroup.PINBASED)
    procbased = controls(ControlGroup.PROCBASED)
    exit_ = controls(ControlGroup.EXIT)
    entry = controls(ControlGroup.ENTRY)

    misc_raw = get(IA32_VMX_MISC)
    cr0 = (get(IA32_VMX_CR0_FIXED0), get(IA32_VMX_CR0_FIXED1))
    cr4 = (get(IA32_VMX_CR4_FIXED0), get(IA32_VMX_CR4_FIXED1))
    enum_raw = get(IA32_VMX_VMCS_ENUM)

    procbased2 = procbased3 = None
    ept_vpid = vmfunc = None
    if procbased is not None and procbased.allows("activate secondary controls"):
        raw2 = get(IA32_VMX_PROCBASED_CTLS2)
        if raw2 is not None:
            procbased2 = decode_controls(ControlGroup.PROCBASED2, raw2)
            if procbased2.allows("enable EPT") or procbased2.allows("enable VPID"):
                cap = get(IA32_VMX_EPT_VPID_CAP)
                ept_vpid = None if cap is None else decode_ept_vpid_cap(cap)
            if procbased2.allows("enable VM functions"):
                fn = get(IA32_VMX_VMFUNC)
                vmfunc = None if fn is None else decode_vmfunc(fn)
    if procbased is not None and procbased.allows("activate tertiary controls"):
        raw3 = get(IA32_VMX_PROCBASED_CTLS3)
        procbased3 = None if raw3 is None else decode_tertiary(raw3)

    return VmxCapabilities(
        basic=basic,
        pinbased=pinbased,
        procbased=procbased,
        procbased2=procbased2,
        procbased3=procbased3,
        exit=exit_,
        entry=entry,
        misc=None if misc_raw is None else decode_misc(misc_raw),
        cr0_fixed=None if None in cr0 else decode_cr_fixed("cr0", *cr0),  # type: ignore[arg-type]
        cr4_fixed=None if None in cr4 else decode_cr_fixed("cr4", *cr4),  # type: ignore[arg-type]
        vmcs_enum_max_index=None if enum_raw is None else decode_vmcs_enum(enum_raw),
        ept_vpid=ept_vpid,
        vmfunc=vmfunc,
        missing_msrs=tuple(sorted(set(missing))),
    )
