"""Intel VT-x and AMD-V side by side: the data behind ``pykvm compare``.

Every point of comparison is one :class:`Row`: what VT-x does (``intel``), what AMD-V does
(``amd``), and whether a given machine has each (``intel_support``, ``amd_support``), computed
from the probe's decoders. A support value is:

* ``False`` when the machine lacks the column's CPU extension (CPUID.1:ECX.VMX[5] for the Intel
  column, CPUID.80000001h:ECX.SVM[2] for the AMD column), and always for a cell that names no
  mechanism (its text starts "(none"); a cell whose text starts "(no instruction: ..." names
  the way that vendor does it instead, and is supported with the extension;
* ``None`` when the data given does not say: VMX capability MSRs not read, the SVM leaf not
  captured, a CPUID bit the :class:`~.cpuid.CpuidSummary` does not carry, the IOMMU not looked for;
* otherwise what the capability MSRs, the SVM leaf or the IOMMU say.

Facts follow the Intel SDM (Vol. 3C, VMX; Vol. 2, instructions) and the AMD APM (Vol. 2
chapter 15, SVM; Vol. 3). VMCB offsets were checked against the Linux kernel's
``struct vmcb_control_area``/``vmcb_save_area``, EPT bits against ``arch/x86/include/asm/vmx.h``,
opcodes against binutils (``opcodes/i386-opc.tbl`` for VMX and SMX, the gas test ``svme64.d``
for SVM) and the kernel's ``arch/x86/include/asm/tlb.h`` (INVLPGB, TLBSYNC); the tests check each
encoding with a disassembler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .cpuid import CpuidSummary
from .svm import SVM_FEATURES, SvmInfo
from .vmx import (
    CONTROL_NAMES,
    IA32_VMX_EPT_VPID_CAP,
    IA32_VMX_PINBASED_CTLS,
    IA32_VMX_PROCBASED_CTLS,
    IA32_VMX_PROCBASED_CTLS2,
    IA32_VMX_PROCBASED_CTLS3,
    ControlGroup,
    EptVpidCap,
    VmxCapabilities,
)

__all__ = [
    "INSTRUCTIONS",
    "Comparison",
    "Instruction",
    "Row",
    "compare",
    "detect_iommu",
]

# ---------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One virtualization instruction and its encoding, written as the manuals write it.

    ``/digit`` is a ModR/M byte whose reg field is the digit; ``/r`` a ModR/M byte with a
    register and a memory operand.
    """

    mnemonic: str  # upper case
    opcode: str  # e.g. "0F 01 C1", "F3 0F C7 /6", "0F 78 /r"
    vendor: str  # "intel" or "amd"
    extension: str  # the CPUID feature that provides it: "VMX", "SMX", "SVM", "INVLPGB"

    def encoding(self) -> bytes:
        """An example encoding: memory operands are ``[rax]``, ``/r`` registers rcx/[rax]."""
        out = bytearray()
        for token in self.opcode.split():
            if token == "/r":
                out.append(0x08)  # mod 00, reg 001 (rcx), r/m 000 ([rax])
            elif token.startswith("/"):
                out.append(int(token[1:]) << 3)  # mod 00, reg = digit, r/m 000 ([rax])
            else:
                out.append(int(token, 16))
        return bytes(out)

    def __str__(self) -> str:
        return f"{self.mnemonic} ({self.opcode})"


INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("VMXON", "F3 0F C7 /6", "intel", "VMX"),
    Instruction("VMXOFF", "0F 01 C4", "intel", "VMX"),
    Instruction("VMCLEAR", "66 0F C7 /6", "intel", "VMX"),
    Instruction("VMPTRLD", "0F C7 /6", "intel", "VMX"),
    Instruction("VMPTRST", "0F C7 /7", "intel", "VMX"),
    Instruction("VMREAD", "0F 78 /r", "intel", "VMX"),
    Instruction("VMWRITE", "0F 79 /r", "intel", "VMX"),
    Instruction("VMLAUNCH", "0F 01 C2", "intel", "VMX"),
    Instruction("VMRESUME", "0F 01 C3", "intel", "VMX"),
    Instruction("VMCALL", "0F 01 C1", "intel", "VMX"),
    Instruction("INVEPT", "66 0F 38 80 /r", "intel", "VMX"),
    Instruction("INVVPID", "66 0F 38 81 /r", "intel", "VMX"),
    Instruction("VMFUNC", "0F 01 D4", "intel", "VMX"),
    Instruction("GETSEC", "0F 37", "intel", "SMX"),
    Instruction("VMRUN", "0F 01 D8", "amd", "SVM"),
    Instruction("VMMCALL", "0F 01 D9", "amd", "SVM"),
    Instruction("VMLOAD", "0F 01 DA", "amd", "SVM"),
    Instruction("VMSAVE", "0F 01 DB", "amd", "SVM"),
    Instruction("STGI", "0F 01 DC", "amd", "SVM"),
    Instruction("CLGI", "0F 01 DD", "amd", "SVM"),
    Instruction("SKINIT", "0F 01 DE", "amd", "SVM"),
    Instruction("INVLPGA", "0F 01 DF", "amd", "SVM"),
    Instruction("INVLPGB", "0F 01 FE", "amd", "INVLPGB"),
    Instruction("TLBSYNC", "0F 01 FF", "amd", "INVLPGB"),
)
_BY_MNEMONIC: Mapping[str, Instruction] = MappingProxyType({i.mnemonic: i for i in INSTRUCTIONS})

# ---------------------------------------------------------------------------------------------
# Support: small functions of the machine's decoded data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Machine:
    summary: CpuidSummary | None
    vmx: VmxCapabilities | None
    svm: SvmInfo | None
    iommu: str | None


Support = bool | None
Probe = Callable[[_Machine], Support]


def _vmx_present(m: _Machine) -> Support:
    if m.vmx is not None:
        return True
    return None if m.summary is None else m.summary.vmx


def _svm_present(m: _Machine) -> Support:
    if m.svm is not None:
        return True
    return None if m.summary is None else m.summary.svm


def _absent(m: _Machine) -> Support:
    """A cell that names no mechanism."""
    return False


def _gated(present: Probe, check: Probe) -> Probe:
    """``check``, but False where the column's extension is absent."""

    def probe(m: _Machine) -> Support:
        return False if present(m) is False else check(m)

    return probe


def _vmx(pred: Callable[[VmxCapabilities], Support]) -> Probe:
    return _gated(_vmx_present, lambda m: None if m.vmx is None else pred(m.vmx))


def _unread(v: VmxCapabilities, *msrs: int) -> bool:
    return any(msr in v.missing_msrs for msr in msrs)


# The MSRs each control group's presence depends on.
_CONTROL_MSRS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "pinbased": (IA32_VMX_PINBASED_CTLS,),
        "procbased": (IA32_VMX_PROCBASED_CTLS,),
        "procbased2": (IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2),
        "procbased3": (IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS3),
    }
)


def _controls(group: str, *names: str) -> Probe:
    """Whether every named VM-execution control of ``group`` may be 1."""
    unknown = set(names) - set(CONTROL_NAMES[ControlGroup(group)].values())
    if unknown:
        raise ValueError(f"no {group} control named {sorted(unknown)}")

    def pred(v: VmxCapabilities) -> Support:
        part = getattr(v, group)
        if part is None:  # not read, or not architecturally present
            return None if _unread(v, *_CONTROL_MSRS[group]) else False
        return all(part.allows(name) for name in names)

    return _vmx(pred)


def _ept_vpid_cap(field: str) -> Probe:
    """A flag of IA32_VMX_EPT_VPID_CAP."""
    if field not in {f.name for f in dataclasses.fields(EptVpidCap)}:
        raise ValueError(f"IA32_VMX_EPT_VPID_CAP has no field {field!r}")

    def pred(v: VmxCapabilities) -> Support:
        if v.ept_vpid is None:
            msrs = (*_CONTROL_MSRS["procbased2"], IA32_VMX_EPT_VPID_CAP)
            return None if _unread(v, *msrs) else False
        return bool(getattr(v.ept_vpid, field))

    return _vmx(pred)


def _svm(feature: str) -> Probe:
    """A flag of CPUID 0x8000000A EDX."""
    if feature not in SVM_FEATURES.values():
        raise ValueError(f"no SVM feature named {feature!r}")
    return _gated(_svm_present, lambda m: None if m.svm is None else m.svm.has(feature))


_EPT = _controls("procbased2", "enable EPT")
_VPID = _controls("procbased2", "enable VPID")
_NPT = _svm("npt")


def _npt_1g(m: _Machine) -> Support:
    npt = _NPT(m)
    if not npt:
        return npt
    return None if m.summary is None else m.summary.pdpe1gb


def _unknown(present: Probe) -> Probe:
    """A CPUID bit the summary does not carry: False without the extension, else None."""
    return _gated(present, lambda m: None)


def _iommu(present: Probe, kind: str) -> Probe:
    return _gated(present, lambda m: None if m.iommu is None else m.iommu == kind)


# Machine-specific notes.


def _vmcs_detail(m: _Machine) -> str:
    if m.vmx is None:
        return ""
    b = m.vmx.basic
    return f"This machine: VMCS revision {b.revision_id:#x}, {b.vmcs_size} bytes."


def _tag_detail(m: _Machine) -> str:
    parts = []
    if _VPID(m):
        parts.append("VPIDs 1-65535 for guests")
    if m.svm is not None:
        guests = max(m.svm.nasid - 1, 0)
        parts.append(f"{m.svm.nasid} ASIDs ({guests} for guests)")
    return f"This machine: {'; '.join(parts)}." if parts else ""


def _eptp_detail(m: _Machine) -> str:
    cap = None if m.vmx is None else m.vmx.ept_vpid
    if cap is None or cap.max_walk_length is None:
        return ""
    walks = "4 and 5" if cap.walk_length_4 and cap.walk_length_5 else str(cap.max_walk_length)
    ad = "with" if cap.accessed_dirty else "without"
    return f"This machine: EPT page-walk length {walks}, {ad} EPT accessed/dirty flags."


# ---------------------------------------------------------------------------------------------
# The rows, defined once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    key: str
    topic: str
    aspect: str
    intel: str  # "{MNEMONIC}" is replaced by "MNEMONIC (opcode)"
    amd: str
    intel_support: Probe
    amd_support: Probe
    note: str = ""
    detail: Callable[[_Machine], str] | None = None


_VMX = _vmx_present
_SVM = _svm_present
_NONE = _absent

_SPECS: tuple[_Spec, ...] = (
    # --- CPU modes ---------------------------------------------------------------------------
    _Spec("modes", "CPU modes", "new processor modes",
          "VMX root operation (the VMM) and VMX non-root operation (the guest)",
          "host mode and guest mode",
          _VMX, _SVM,
          "Both keep rings 0-3 in each mode; the guest runs its kernel at ring 0."),
    _Spec("transitions", "CPU modes", "how control passes",
          "VM entry (VMLAUNCH, then VMRESUME) and VM exit",
          "VMRUN and #VMEXIT",
          _VMX, _SVM,
          "A VM exit loads host state from the VMCS; #VMEXIT restores it from the host save area."),
    _Spec("enable", "CPU modes", "turning the extension on",
          "CR4.VMXE (bit 13) set, IA32_FEATURE_CONTROL (MSR 0x3A) locked with VMX enabled, then "
          "VMXON",
          "EFER.SVME (bit 12) set with WRMSR, unless VM_CR.SVMDIS (MSR 0xC0010114 bit 4) "
          "forbids it",
          _VMX, _SVM),
    _Spec("exit_reason", "CPU modes", "why the guest stopped",
          "exit reason (basic reason in bits 15:0) in the VM-exit information area",
          "EXITCODE (VMCB 0x070) with EXITINFO1/EXITINFO2 (0x078/0x080)",
          _VMX, _SVM),
    # --- control structure -------------------------------------------------------------------
    _Spec("structure", "control structure", "per-vCPU control structure",
          "VMCS: size and revision identifier from IA32_VMX_BASIC; layout not architectural",
          "VMCB: one 4 KB page with a documented layout",
          _VMX, _SVM, detail=_vmcs_detail),
    _Spec("areas", "control structure", "parts",
          "six areas: guest-state, host-state, VM-execution control, VM-exit control, VM-entry "
          "control, VM-exit information",
          "control area (0x000-0x3FF: intercepts, ASID, TLB control, exit code, nested paging) and "
          "state-save area (from 0x400: guest segment, control and system registers)",
          _VMX, _SVM),
    _Spec("access", "control structure", "how software reads and writes it",
          "VMREAD/VMWRITE on the current VMCS, field by field encoding (VMPTRLD makes it current)",
          "ordinary loads and stores to the VMCB in memory",
          _VMX, _SVM),
    _Spec("host_state", "control structure", "host state",
          "host-state area of the VMCS, loaded on every VM exit",
          "saved by VMRUN to the host save area at VM_HSAVE_PA (MSR 0xC0010117), restored by "
          "#VMEXIT",
          _VMX, _SVM),
    _Spec("caching", "control structure", "cached state",
          "the current VMCS may be cached in the processor; VMCLEAR writes it back",
          "VMCB clean bits (VMCB 0x0C0) mark fields unchanged since the last VMRUN",
          _VMX, _svm("vmcb_clean")),
    # --- instructions ------------------------------------------------------------------------
    _Spec("insn_on_off", "instructions", "enter and leave the extension",
          "{VMXON}, {VMXOFF}",
          "(no instruction: WRMSR sets or clears EFER.SVME)",
          _VMX, _SVM),
    _Spec("insn_select", "instructions", "select the control structure",
          "{VMCLEAR}, {VMPTRLD}, {VMPTRST}",
          "(no instruction: VMRUN, VMLOAD and VMSAVE take the VMCB's physical address in RAX)",
          _VMX, _SVM),
    _Spec("insn_fields", "instructions", "access its fields",
          "{VMREAD}, {VMWRITE}",
          "(no instruction: plain memory accesses to the VMCB)",
          _VMX, _SVM),
    _Spec("insn_run", "instructions", "run the guest",
          "{VMLAUNCH}, {VMRESUME}",
          "{VMRUN}",
          _VMX, _SVM),
    _Spec("insn_call", "instructions", "call the VMM from the guest",
          "{VMCALL}",
          "{VMMCALL}",
          _VMX, _SVM,
          "Each is #UD on the other vendor's processors."),
    _Spec("insn_state", "instructions", "state VM entry/VMRUN does not switch",
          "(no instruction: VM entry and VM exit switch that state through the VMCS)",
          "{VMLOAD}, {VMSAVE}: FS, GS, TR, LDTR (with hidden state), KernelGSBase, "
          "STAR/LSTAR/CSTAR/SFMASK, SYSENTER_CS/ESP/EIP",
          _VMX, _SVM),
    _Spec("insn_gif", "instructions", "global interrupt flag",
          "(none: VMX has no global interrupt flag)",
          "{STGI}, {CLGI}: set and clear GIF around world switches",
          _NONE, _SVM),
    _Spec("insn_inv_nested", "instructions", "invalidate nested (guest-physical) translations",
          "{INVEPT}",
          "(no instruction: TLB_CONTROL at VMCB 0x05C acts at the next VMRUN; see INVLPGA)",
          _ept_vpid_cap("invept"), _SVM),
    _Spec("insn_inv_tagged", "instructions", "invalidate a guest's linear translations",
          "{INVVPID}",
          "{INVLPGA}: one page (address in RAX) of one ASID (ECX)",
          _ept_vpid_cap("invvpid"), _SVM),
    _Spec("insn_vmfunc", "instructions", "VM functions",
          "{VMFUNC}: EPTP switching without a VM exit",
          "(none)",
          _controls("procbased2", "enable VM functions"), _NONE),
    _Spec("insn_launch", "instructions", "measured (late) launch",
          "{GETSEC} leaf SENTER (SMX, Intel TXT)",
          "{SKINIT}",
          _unknown(_VMX), _unknown(_SVM),
          "SMX is CPUID.1:ECX[6], SKINIT CPUID 0x80000001 ECX[12]: not in the CPUID summary."),
    _Spec("insn_broadcast", "instructions", "broadcast TLB invalidation",
          "(none: IPIs to the other processors, each running INVLPG or INVPCID)",
          "{INVLPGB}, {TLBSYNC}",
          _NONE, _unknown(_SVM),
          "INVLPGB is CPUID 0x80000008 EBX[3]: not in the CPUID summary."),
    # --- TLB tagging -------------------------------------------------------------------------
    _Spec("tlb_tag", "TLB tagging", "tag on TLB entries",
          "VPID: 16-bit VMCS field, \"enable VPID\" control; VPID 0 is VMX root operation's",
          "ASID: VMCB 0x058; the count is CPUID 0x8000000A EBX; ASID 0 is the host's",
          _VPID, _SVM, detail=_tag_detail),
    _Spec("tlb_flush_context", "TLB tagging", "flush one guest's entries",
          "INVVPID single-context (type 1) or all-context (type 2)",
          "TLB_CONTROL 3 (this ASID) or 7 (its non-global entries); without FlushByAsid only 1 "
          "(every ASID)",
          _ept_vpid_cap("invvpid_single_context"), _svm("flushbyasid")),
    # --- nested paging -----------------------------------------------------------------------
    _Spec("nested_paging", "nested paging", "second-level translation",
          "EPT: \"enable EPT\" control, EPT pointer (EPTP) in the VMCS",
          "NPT: NP_ENABLE (VMCB 0x090 bit 0), nCR3 at VMCB 0x0B0",
          _EPT, _NPT),
    _Spec("npt_format", "nested paging", "table format",
          "its own: bits 0-2 read/write/execute; in leaf entries bits 5:3 memory type and bit 6 "
          "ignore-PAT; bit 7 large page; bits 8/9 accessed/dirty",
          "ordinary page tables (P, R/W, U/S, NX ...) in the host's paging mode at VMRUN",
          _EPT, _NPT),
    _Spec("npt_root", "nested paging", "root pointer",
          "EPTP: bits 2:0 memory type (0 UC, 6 WB), bits 5:3 page-walk length - 1, bit 6 enables "
          "accessed/dirty flags",
          "nCR3: host-physical address of the nested page-table root",
          _EPT, _NPT, detail=_eptp_detail),
    _Spec("npt_ad", "nested paging", "accessed/dirty flags",
          "optional (IA32_VMX_EPT_VPID_CAP bit 21), enabled per EPTP",
          "always, as in ordinary page tables",
          _ept_vpid_cap("accessed_dirty"), _NPT),
    _Spec("npt_memtype", "nested paging", "memory type",
          "EPT memory type of the leaf entry, combined with the guest PAT type unless ignore-PAT",
          "host type from the nested tables combined with the guest PAT (G_PAT, VMCB 0x668)",
          _EPT, _NPT),
    _Spec("npt_1g", "nested paging", "1-GByte pages",
          "EPT PDPTEs may map 1 GB (IA32_VMX_EPT_VPID_CAP bit 17)",
          "nested PDPEs map 1 GB where the processor has 1 GB pages (CPUID 0x80000001 EDX[26])",
          _ept_vpid_cap("pages_1gb"), _npt_1g),
    _Spec("npt_exec", "nested paging", "supervisor/user execute control",
          "mode-based execute control for EPT",
          "GMET (guest mode execute trap)",
          _controls("procbased2", "mode-based execute control for EPT"), _svm("gmet")),
    # --- interrupt virtualization ------------------------------------------------------------
    _Spec("apic", "interrupt virtualization", "virtual local APIC",
          "APICv: virtualize APIC accesses, APIC-register virtualization, virtual-interrupt "
          "delivery",
          "AVIC: guest APIC backing page (VMCB 0x0E0), physical and logical APIC ID tables",
          _controls("procbased2", "virtualize APIC accesses", "APIC-register virtualization",
                    "virtual-interrupt delivery"),
          _svm("avic")),
    _Spec("posted", "interrupt virtualization", "interrupts to a running vCPU",
          "posted interrupts: posted-interrupt descriptor and notification vector",
          "AVIC doorbell: a write to MSR 0xC001011B; the IRR lives in the backing page",
          _controls("pinbased", "process posted interrupts"), _svm("avic")),
    _Spec("x2apic", "interrupt virtualization", "x2APIC mode",
          "\"virtualize x2APIC mode\" control",
          "x2AVIC",
          _controls("procbased2", "virtualize x2APIC mode"), _svm("x2avic")),
    _Spec("ipi", "interrupt virtualization", "IPIs between vCPUs without exits",
          "IPI virtualization (tertiary control)",
          "part of AVIC for running target vCPUs",
          _controls("procbased3", "IPI virtualization"), _svm("avic")),
    _Spec("vnmi", "interrupt virtualization", "virtual NMIs",
          "\"virtual NMIs\" pin-based control",
          "vNMI",
          _controls("pinbased", "virtual NMIs"), _svm("vnmi")),
    # --- nested virtualization ---------------------------------------------------------------
    _Spec("nested_state", "nested virtualization", "a guest VMM's state accesses without exits",
          "VMCS shadowing: VMREAD/VMWRITE go to a shadow VMCS",
          "VMSAVE/VMLOAD virtualization",
          _controls("procbased2", "VMCS shadowing"), _svm("v_vmsave_vmload")),
    _Spec("nested_gif", "nested virtualization", "a guest VMM's GIF without exits",
          "(none: no global interrupt flag)",
          "virtual GIF: STGI/CLGI in the guest",
          _NONE, _svm("vgif")),
    # --- exit information --------------------------------------------------------------------
    _Spec("decode", "exit information", "what the exit tells about the instruction",
          "exit qualification and VM-exit instruction information, always",
          "decode assists: EXITINFO1 decoded for MOV CRx/DRx, INTn, INVLPG; up to 15 fetched "
          "instruction bytes (VMCB 0x0D0, 0x0D1) on nested page faults",
          _VMX, _svm("decodeassists")),
    _Spec("next_rip", "exit information", "where the guest resumes",
          "VM-exit instruction length, always",
          "next sequential RIP at VMCB 0x0C8 (NRIP save)",
          _VMX, _svm("nrip_save")),
    # --- scheduling --------------------------------------------------------------------------
    _Spec("pause", "scheduling", "spinning vCPUs",
          "PAUSE-loop exiting: PLE_Gap and PLE_Window",
          "PAUSE filter: count (VMCB 0x03E) and threshold (0x03C)",
          _controls("procbased2", "PAUSE-loop exiting"), _svm("pausefilter"),
          "AMD's threshold needs the PFThreshold feature."),
    _Spec("tsc", "scheduling", "guest TSC rate",
          "TSC offsetting and \"use TSC scaling\"",
          "TSC offset (VMCB 0x050) and TSC ratio (MSR 0xC0000104)",
          _controls("procbased2", "use TSC scaling"), _svm("tsc_scale")),
    _Spec("preemption_timer", "scheduling", "timer that forces an exit",
          "VMX-preemption timer",
          "(none)",
          _controls("pinbased", "activate VMX-preemption timer"), _NONE),
    # --- I/O virtualization ------------------------------------------------------------------
    _Spec("iommu", "I/O virtualization", "IOMMU (DMA and interrupt remapping)",
          "VT-d, described by the ACPI DMAR table",
          "AMD-Vi, described by the ACPI IVRS table",
          _iommu(_VMX, "vt-d"), _iommu(_SVM, "amd-vi")),
    _Spec("iommu_linux", "I/O virtualization", "how Linux shows it",
          "/sys/class/iommu/dmar*, /sys/firmware/acpi/tables/DMAR",
          "/sys/class/iommu/ivhd*, /sys/firmware/acpi/tables/IVRS",
          _iommu(_VMX, "vt-d"), _iommu(_SVM, "amd-vi")),
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One point of comparison and what a machine supports of it (None: its data does not say)."""

    topic: str
    aspect: str
    intel: str
    amd: str
    intel_support: bool | None
    amd_support: bool | None
    note: str
    key: str = ""  # a stable identifier, e.g. "nested_paging"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Comparison:
    """The rows for one machine, with the facts about it they were computed from."""

    rows: list[Row]
    vendor: str | None = None
    asids: int | None = None  # CPUID 0x8000000A EBX, ASID 0 included
    iommu: str | None = None

    def row(self, key: str) -> Row:
        """The row called ``key``."""
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no comparison row {key!r}")

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics, in table order."""
        return tuple(dict.fromkeys(row.topic for row in self.rows))

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "asids": self.asids,
            "iommu": self.iommu,
            "rows": [row.to_json() for row in self.rows],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(
            rows=[Row(**row) for row in data["rows"]],
            vendor=data["vendor"],
            asids=data["asids"],
            iommu=data["iommu"],
        )


def compare(
    summary: CpuidSummary | None,
    vmx: VmxCapabilities | None,
    svm: SvmInfo | None,
    iommu: str | None,
) -> Comparison:
    """VT-x and AMD-V side by side, marked with what this machine's data says it supports.

    ``iommu`` is "vt-d", "amd-vi" or None (not known; see :func:`detect_iommu`).
    """
    if iommu not in (None, "vt-d", "amd-vi"):
        raise ValueError(f"iommu must be 'vt-d', 'amd-vi' or None, got {iommu!r}")
    m = _Machine(summary, vmx, svm, iommu)
    rows = []
    for spec in _SPECS:
        detail = spec.detail(m) if spec.detail is not None else ""
        rows.append(
            Row(
                topic=spec.topic,
                aspect=spec.aspect,
                intel=spec.intel.format_map(_BY_MNEMONIC),
                amd=spec.amd.format_map(_BY_MNEMONIC),
                intel_support=spec.intel_support(m),
                amd_support=spec.amd_support(m),
                note=" ".join(part for part in (spec.note, detail) if part),
                key=spec.key,
            )
        )
    return Comparison(
        rows=rows,
        vendor=None if summary is None else summary.vendor,
        asids=None if svm is None else svm.nasid,
        iommu=iommu,
    )


def detect_iommu(sys_root: Path = Path("/")) -> str | None:
    """The host's IOMMU as Linux shows it: "vt-d", "amd-vi", or None if none is visible.

    Looks at the IOMMU devices (``/sys/class/iommu/dmar*`` or ``ivhd*``), then at the ACPI
    tables that describe them (``/sys/firmware/acpi/tables/DMAR`` or ``IVRS``).
    """
    try:
        names = [p.name for p in (sys_root / "sys/class/iommu").iterdir()]
    except OSError:
        names = []
    for prefix, kind in (("dmar", "vt-d"), ("ivhd", "amd-vi")):
        if any(name.startswith(prefix) for name in names):
            return kind
    tables = sys_root / "sys/firmware/acpi/tables"
    for table, kind in (("DMAR", "vt-d"), ("IVRS", "amd-vi")):
        if (tables / table).exists():
            return kind
    return None
