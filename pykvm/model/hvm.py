"""A vendor-neutral vCPU state that becomes a VMCS image (VT-x) or a VMCB image (AMD-V).

The idea is Xen's HVM layer (``xen/arch/x86/hvm``): one description of a guest CPU and of what
should make it exit, and two back ends that write it in each vendor's format. Here the back ends
are pure: :meth:`VcpuState.to_vmcs` returns a :class:`~pykvm.model.vmcs.VmcsImage` (fields to
VMWRITE) and :meth:`VcpuState.to_vmcb` a :class:`~pykvm.model.vmcb.VmcbImage` (4 KB to copy), and
:func:`~pykvm.model.vmcs.check_vmcs` / :func:`~pykvm.model.vmcb.check_vmcb` say, before launch,
which rule of the manuals an image breaks.

What the images hold and what they do not:

* Only RIP, RSP, RFLAGS (and RAX on AMD) of the general-purpose registers live in a VMCS/VMCB;
  the L1 loads the others itself before VMLAUNCH/VMRUN.
* Bitmaps (I/O, MSR) and paging structures are memory the images point at (``*_gpa``); building
  them is the L1's (or :mod:`pykvm.model.paging`'s) business.
* Wishes one vendor cannot honour raise ValueError: VMX always exits on CPUID and VMCALL, so
  ``exit_on_cpuid=False`` or ``exit_on_hypercall=False`` cannot become a VMCS; SVM has no HLT
  activity state, so ``activity="hlt"`` cannot become a VMCB.

:data:`NEUTRAL_EXITS` names the exits both vendors share (``cpuid``, ``hlt``, ``io``,
``msr_read``, ``hypercall``, ``npf``, ``shutdown``, ...) with the VMX exit reasons and SVM exit
codes that report them; :func:`neutral_exit_vmx` and :func:`neutral_exit_svm` translate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType

from ..probe.vmx import DEFAULT1, ControlGroup, VmxCapabilities
from . import vmcb as _vmcb
from . import vmcs as _vmcs
from .vmcb import INTERCEPT_MISC1_BITS, INTERCEPT_MISC2_BITS, VmcbImage, check_vmcb
from .vmcs import Rule, Violation, VmcsImage, check_vmcs

__all__ = [
    "NEUTRAL_EXITS",
    "DescriptorTable",
    "ExitPolicy",
    "HostState",
    "NestedPaging",
    "NeutralExit",
    "Rule",
    "Segment",
    "VcpuState",
    "Violation",
    "check",
    "check_vmcb",
    "check_vmcs",
    "neutral_exit_svm",
    "neutral_exit_vmx",
]

_U64 = (1 << 64) - 1
PAT_DEFAULT = 0x0007_0406_0007_0406  # the power-up value of IA32_PAT
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_VMXE = 1 << 5, 1 << 13
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1, 1 << 8, 1 << 10, 1 << 11, 1 << 12


# ---------------------------------------------------------------------------------------------
# Pieces of state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A segment register as the hidden part holds it: selector, base, limit (in bytes, already
    scaled by G) and the descriptor's attribute bits."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3  # bits 3:0 of the descriptor's type field
    s: bool = True  # code/data (True) or system (False)
    dpl: int = 0
    present: bool = True
    avl: bool = False
    l: bool = False
    db: bool = False
    g: bool = False
    unusable: bool = False  # VMX's "segment unusable" (a null selector loaded)

    def __post_init__(self) -> None:
        for name, value, bits in (("selector", self.selector, 16), ("base", self.base, 64),
                                  ("limit", self.limit, 32), ("type", self.type, 4),
                                  ("dpl", self.dpl, 2)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise ValueError(
                    f"segment {name} must be a {bits}-bit unsigned integer, got {value!r}")

    @property
    def vmx_access_rights(self) -> int:
        """The VMCS access-rights format: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14,
        G 15, unusable 16."""
        if self.unusable:
            return 1 << 16
        return (self.type | self.s << 4 | self.dpl << 5 | self.present << 7 | self.avl << 12
                | self.l << 13 | self.db << 14 | self.g << 15)  # fmt: skip

    @property
    def svm_attrib(self) -> int:
        """The VMCB attribute format: descriptor bits 47:40 in 7:0 and 55:52 in 11:8."""
        if self.unusable:
            return 0
        ar = self.vmx_access_rights
        return (ar & 0xFF) | (ar >> 4 & 0xF00)

    @classmethod
    def null(cls) -> Segment:
        return cls(selector=0, base=0, limit=0, type=0, s=False, present=False, unusable=True)

    @classmethod
    def flat_code64(cls, selector: int = 0x08, dpl: int = 0) -> Segment:
        return cls(selector, 0, 0xFFFF_FFFF, type=0xB, s=True, dpl=dpl, l=True, g=True)

    @classmethod
    def flat_code32(cls, selector: int = 0x08, dpl: int = 0) -> Segment:
        return cls(selector, 0, 0xFFFF_FFFF, type=0xB, s=True, dpl=dpl, db=True, g=True)

    @classmethod
    def flat_data(cls, selector: int = 0x10, dpl: int = 0) -> Segment:
        return cls(selector, 0, 0xFFFF_FFFF, type=0x3, s=True, dpl=dpl, db=True, g=True)

    @classmethod
    def real_mode(cls, selector: int = 0, code: bool = False) -> Segment:
        return cls(selector, selector << 4, 0xFFFF, type=0xB if code else 0x3, s=True)

    @classmethod
    def tss(cls, selector: int = 0x18, base: int = 0, limit: int = 0x67) -> Segment:
        """A busy 32/64-bit TSS (type 11), as TR must hold at VM entry."""
        return cls(selector, base, limit, type=0xB, s=False)


@dataclass(frozen=True)
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


class ExitPolicy(str, Enum):
    """What makes an I/O or MSR access exit."""

    NONE = "none"  # never (a bitmap of zeros on VMX MSRs; no intercept on SVM)
    ALL = "all"  # always
    BITMAP = "bitmap"  # as the bitmap at *_bitmap_gpa says

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NestedPaging:
    """Second-level paging: EPT on Intel, NPT (nested paging) on AMD.

    ``root`` is the physical address of the top table. ``levels`` and ``accessed_dirty`` go into
    the EPTP; NPT tables use the host's paging format, which the VMCB does not encode.
    ``memory_type`` is the EPT paging-structure memory type (0 UC, 6 WB).
    """

    root: int
    levels: int = 4
    accessed_dirty: bool = False
    memory_type: int = 6

    @property
    def eptp(self) -> int:
        return self.root | self.memory_type | (self.levels - 1) << 3 | self.accessed_dirty << 6


@dataclass(frozen=True)
class HostState:
    """The VMX host-state area: where the processor returns at a VM exit (VT-x only; SVM
    saves the host to the VM_HSAVE_PA area itself)."""

    cr3: int
    rip: int
    rsp: int
    cr0: int = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    cr4: int = CR4_PAE | CR4_VMXE
    efer: int = EFER_LME | EFER_LMA
    pat: int = PAT_DEFAULT
    cs: int = 0x08
    ss: int = 0x10
    ds: int = 0x10
    es: int = 0x10
    fs: int = 0x10
    gs: int = 0x10
    tr: int = 0x18
    fs_base: int = 0
    gs_base: int = 0
    tr_base: int = 0
    gdtr_base: int = 0
    idtr_base: int = 0
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0
    long_mode: bool = True  # "host address-space size"


# ---------------------------------------------------------------------------------------------
# The vCPU
# ---------------------------------------------------------------------------------------------


def _flat_segments(code: Segment) -> dict[str, Segment]:
    """``code`` in CS, flat data in the other segment registers, a busy TSS, no LDT."""
    data = Segment.flat_data()
    return {"cs": code, "ss": data, "ds": data, "es": data, "fs": data, "gs": data,
            "tr": Segment.tss(), "ldtr": Segment.null()}  # fmt: skip


@dataclass(frozen=True)
class VcpuState:
    """A guest CPU and the exits wanted from it, in no vendor's format."""

    rip: int = 0
    rsp: int = 0
    rflags: int = 0x2
    rax: int = 0  # in the VMCB only
    cr0: int = CR0_ET
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    dr6: int = 0xFFFF_0FF0
    dr7: int = 0x400
    cs: Segment = field(default_factory=lambda: Segment.real_mode(code=True))
    ss: Segment = field(default_factory=Segment.real_mode)
    ds: Segment = field(default_factory=Segment.real_mode)
    es: Segment = field(default_factory=Segment.real_mode)
    fs: Segment = field(default_factory=Segment.real_mode)
    gs: Segment = field(default_factory=Segment.real_mode)
    ldtr: Segment = field(default_factory=Segment.null)
    tr: Segment = field(default_factory=lambda: Segment.tss(selector=0, limit=0xFFFF))
    gdtr: DescriptorTable = DescriptorTable()
    idtr: DescriptorTable = DescriptorTable()
    pat: int = PAT_DEFAULT
    debugctl: int = 0
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0
    star: int = 0  # VMCB only (VMX guests keep these MSRs through MSR-load lists)
    lstar: int = 0
    cstar: int = 0
    sfmask: int = 0
    kernel_gs_base: int = 0
    activity: str = "active"  # or "hlt" (VMX only)
    # exit wishes ---------------------------------------------------------------------------
    exit_on_cpuid: bool = True
    exit_on_hlt: bool = True
    exit_on_hypercall: bool = True  # VMCALL (always exits) / VMMCALL (#UD unless intercepted)
    exit_on_shutdown: bool = True  # triple fault always exits on VMX
    exit_on_external_interrupt: bool = True
    exit_on_nmi: bool = True
    exception_bitmap: int = 0  # bit n: exceptions with vector n exit
    io_exits: ExitPolicy = ExitPolicy.ALL
    io_bitmap_gpa: int | None = None  # VMX: A at gpa, B at gpa + 4 KB; SVM: the 12 KB IOPM
    msr_exits: ExitPolicy = ExitPolicy.ALL
    msr_bitmap_gpa: int | None = None  # VMX: the 4 KB MSR bitmaps; SVM: the 8 KB MSRPM
    # address translation --------------------------------------------------------------------
    nested_paging: NestedPaging | None = None
    tlb_tag: int = 1  # VPID (VMX; 0 = VPID off) / ASID (SVM; 0 is illegal)
    unrestricted_guest: bool | None = None  # VMX; None: when paging or PE is off and EPT is on

    # Constructors ----------------------------------------------------------------------------
    @classmethod
    def long_mode(cls, rip: int, rsp: int, cr3: int, **kw: object) -> VcpuState:
        """A 64-bit guest at CPL 0 with flat segments (code 0x08, data 0x10, TSS 0x18)."""
        base: dict[str, object] = {
            "rip": rip, "rsp": rsp, "cr3": cr3,
            "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            "cr4": CR4_PAE, "efer": EFER_LME | EFER_LMA, **_flat_segments(Segment.flat_code64()),
        }  # fmt: skip
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def protected_mode(cls, rip: int, rsp: int, **kw: object) -> VcpuState:
        """A 32-bit flat guest without paging."""
        base: dict[str, object] = {
            "rip": rip, "rsp": rsp, "cr0": CR0_PE | CR0_ET | CR0_NE,
            **_flat_segments(Segment.flat_code32()),
        }  # fmt: skip
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def real_mode(cls, rip: int = 0, rsp: int = 0, **kw: object) -> VcpuState:
        """A real-mode guest (VT-x needs EPT and unrestricted guest for it)."""
        return cls(rip=rip, rsp=rsp, **kw)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> VcpuState:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def segments(self) -> dict[str, Segment]:
        return {"ES": self.es, "CS": self.cs, "SS": self.ss, "DS": self.ds, "FS": self.fs,
                "GS": self.gs, "LDTR": self.ldtr, "TR": self.tr}  # fmt: skip

    @property
    def ia32e(self) -> bool:
        return bool(self.efer & EFER_LMA)

    # VT-x ------------------------------------------------------------------------------------
    def to_vmcs(self, caps: VmxCapabilities | None, host: HostState) -> VmcsImage:
        """The VMCS fields for this state (controls, guest state, host state).

        With ``caps`` every control field gets the must-be-1 bits of its capability MSR (the TRUE
        MSR where there is one), optional conveniences (load/save EFER and PAT) are used only if
        allowed, and CR0/CR4 get their FIXED0 bits (except CR0.PE and PG, which would change the
        guest's mode), owned by the host through the guest/host masks with the state's values as
        read shadows. Without ``caps`` the default-1 classes and
        the architectural fixed bits (CR0.PE/NE/PG, CR4.VMXE) are used. Features the state asks
        for (EPT, VPID, unrestricted guest) are set even when ``caps`` forbids them, so that
        :func:`check_vmcs` reports the conflict.
        """
        if not self.exit_on_cpuid:
            raise ValueError("VT-x cannot run CPUID without a VM exit (exit_on_cpuid=False)")
        if not self.exit_on_hypercall:
            raise ValueError("VT-x cannot run VMCALL without a VM exit (exit_on_hypercall=False)")
        if not self.exit_on_shutdown:
            raise ValueError("VT-x always exits on a triple fault (exit_on_shutdown=False)")
        if self.activity not in ("active", "hlt"):
            raise ValueError(f"activity must be 'active' or 'hlt', got {self.activity!r}")
        v = _vmcs

        def masks(group: ControlGroup) -> tuple[int, int]:
            part = None
            if caps is not None:
                part = {ControlGroup.PINBASED: caps.pinbased,
                        ControlGroup.PROCBASED: caps.procbased,
                        ControlGroup.PROCBASED2: caps.procbased2, ControlGroup.EXIT: caps.exit,
                        ControlGroup.ENTRY: caps.entry}[group]  # fmt: skip
            if part is None:
                return DEFAULT1.get(group, 0), 0xFFFF_FFFF
            return part.must_be_1, part.may_be_1

        def build(group: ControlGroup, wanted: int, optional: int = 0) -> int:
            must, may = masks(group)
            return must | wanted | (optional & may)

        ept = self.nested_paging
        unrestricted = self.unrestricted_guest
        if unrestricted is None:
            unrestricted = ept is not None and not (self.cr0 & CR0_PE and self.cr0 & CR0_PG)

        pin = build(ControlGroup.PINBASED,
                    (v.PIN_EXT_INTR if self.exit_on_external_interrupt else 0)
                    | (v.PIN_NMI if self.exit_on_nmi else 0))
        proc2_wanted = ((v.PROC2_EPT if ept is not None else 0)
                        | (v.PROC2_VPID if self.tlb_tag else 0)
                        | (v.PROC2_UNRESTRICTED if unrestricted else 0))  # fmt: skip
        proc_wanted = v.PROC_HLT if self.exit_on_hlt else 0
        if proc2_wanted:
            proc_wanted |= v.PROC_SECONDARY
        if self.io_exits is ExitPolicy.ALL:
            proc_wanted |= v.PROC_UNCOND_IO
        elif self.io_exits is ExitPolicy.BITMAP:
            proc_wanted |= v.PROC_IO_BITMAPS
        if self.msr_exits is not ExitPolicy.ALL:
            proc_wanted |= v.PROC_MSR_BITMAPS
        proc = build(ControlGroup.PROCBASED, proc_wanted)
        entry = build(ControlGroup.ENTRY,
                      v.ENTRY_LOAD_DEBUG | (v.ENTRY_IA32E if self.ia32e else 0),
                      optional=v.ENTRY_LOAD_EFER | v.ENTRY_LOAD_PAT)
        exit_ = build(ControlGroup.EXIT,
                      v.EXIT_SAVE_DEBUG | (v.EXIT_HOST_64 if host.long_mode else 0),
                      optional=v.EXIT_LOAD_EFER | v.EXIT_SAVE_EFER | v.EXIT_LOAD_PAT
                      | v.EXIT_SAVE_PAT)  # fmt: skip

        img = VmcsImage()
        img["PIN_BASED_VM_EXEC_CONTROL"] = pin
        img["CPU_BASED_VM_EXEC_CONTROL"] = proc
        if proc & v.PROC_SECONDARY:
            must2, _ = masks(ControlGroup.PROCBASED2)
            img["SECONDARY_VM_EXEC_CONTROL"] = must2 | proc2_wanted
        img["VM_EXIT_CONTROLS"] = exit_
        img["VM_ENTRY_CONTROLS"] = entry
        img["EXCEPTION_BITMAP"] = self.exception_bitmap
        img["PAGE_FAULT_ERROR_CODE_MASK"] = 0
        img["PAGE_FAULT_ERROR_CODE_MATCH"] = 0
        img["CR3_TARGET_COUNT"] = 0
        img["VM_EXIT_MSR_STORE_COUNT"] = 0
        img["VM_EXIT_MSR_LOAD_COUNT"] = 0
        img["VM_ENTRY_MSR_LOAD_COUNT"] = 0
        img["VM_ENTRY_INTR_INFO_FIELD"] = 0
        img["TSC_OFFSET"] = 0
        if proc & v.PROC_IO_BITMAPS:
            if self.io_bitmap_gpa is None:
                raise ValueError("io_exits='bitmap' needs io_bitmap_gpa (bitmap A; B follows)")
            img["IO_BITMAP_A"] = self.io_bitmap_gpa
            img["IO_BITMAP_B"] = self.io_bitmap_gpa + 0x1000
        if proc & v.PROC_MSR_BITMAPS:
            if self.msr_bitmap_gpa is None:
                raise ValueError(f"msr_exits='{self.msr_exits}' on VT-x needs msr_bitmap_gpa "
                                 "(a 4 KB bitmap: all zeros for 'none')")
            img["MSR_BITMAP"] = self.msr_bitmap_gpa
        if ept is not None:
            img["EPT_POINTER"] = ept.eptp
        if self.tlb_tag:
            img["VIRTUAL_PROCESSOR_ID"] = self.tlb_tag

        # CR0/CR4: force the FIXED0 bits, let the host own them, shadow the guest's values
        if caps is not None and caps.cr0_fixed is not None:
            cr0_fixed = caps.cr0_fixed.must_be_1
        else:
            cr0_fixed = CR0_PE | CR0_NE | CR0_PG
        # PE and PG are never forced: without unrestricted guest a state lacking them cannot
        # run under VT-x, and check_vmcs says so (forcing them would change the guest's mode).
        cr0_fixed &= ~(CR0_PE | CR0_PG)
        if caps is not None and caps.cr4_fixed is not None:
            cr4_fixed = caps.cr4_fixed.must_be_1
        else:
            cr4_fixed = CR4_VMXE
        img["GUEST_CR0"] = self.cr0 | cr0_fixed
        img["GUEST_CR3"] = self.cr3
        img["GUEST_CR4"] = self.cr4 | cr4_fixed
        img["CR0_GUEST_HOST_MASK"] = cr0_fixed
        img["CR0_READ_SHADOW"] = self.cr0
        img["CR4_GUEST_HOST_MASK"] = cr4_fixed
        img["CR4_READ_SHADOW"] = self.cr4
        img["GUEST_DR7"] = self.dr7
        img["GUEST_RSP"] = self.rsp
        img["GUEST_RIP"] = self.rip
        img["GUEST_RFLAGS"] = self.rflags
        for name, seg in self.segments.items():
            img[f"GUEST_{name}_SELECTOR"] = seg.selector
            img[f"GUEST_{name}_BASE"] = seg.base
            img[f"GUEST_{name}_LIMIT"] = seg.limit
            img[f"GUEST_{name}_AR_BYTES"] = seg.vmx_access_rights
        img["GUEST_GDTR_BASE"] = self.gdtr.base
        img["GUEST_GDTR_LIMIT"] = self.gdtr.limit
        img["GUEST_IDTR_BASE"] = self.idtr.base
        img["GUEST_IDTR_LIMIT"] = self.idtr.limit
        img["GUEST_IA32_DEBUGCTL"] = self.debugctl
        img["GUEST_SYSENTER_CS"] = self.sysenter_cs
        img["GUEST_SYSENTER_ESP"] = self.sysenter_esp
        img["GUEST_SYSENTER_EIP"] = self.sysenter_eip
        if entry & v.ENTRY_LOAD_EFER:
            img["GUEST_IA32_EFER"] = self.efer
        if entry & v.ENTRY_LOAD_PAT:
            img["GUEST_IA32_PAT"] = self.pat
        img["GUEST_ACTIVITY_STATE"] = 0 if self.activity == "active" else 1
        img["GUEST_INTERRUPTIBILITY_INFO"] = 0
        img["GUEST_PENDING_DBG_EXCEPTIONS"] = 0
        img["VMCS_LINK_POINTER"] = _U64

        img["HOST_CR0"] = host.cr0
        img["HOST_CR3"] = host.cr3
        img["HOST_CR4"] = host.cr4
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
            img[f"HOST_{name.upper()}_SELECTOR"] = getattr(host, name)
        img["HOST_FS_BASE"] = host.fs_base
        img["HOST_GS_BASE"] = host.gs_base
        img["HOST_TR_BASE"] = host.tr_base
        img["HOST_GDTR_BASE"] = host.gdtr_base
        img["HOST_IDTR_BASE"] = host.idtr_base
        img["HOST_IA32_SYSENTER_CS"] = host.sysenter_cs
        img["HOST_IA32_SYSENTER_ESP"] = host.sysenter_esp
        img["HOST_IA32_SYSENTER_EIP"] = host.sysenter_eip
        if exit_ & v.EXIT_LOAD_EFER:
            img["HOST_IA32_EFER"] = host.efer
        if exit_ & v.EXIT_LOAD_PAT:
            img["HOST_IA32_PAT"] = host.pat
        img["HOST_RSP"] = host.rsp
        img["HOST_RIP"] = host.rip
        return img

    # AMD-V -----------------------------------------------------------------------------------
    def to_vmcb(self) -> VmcbImage:
        """The VMCB for this state: intercepts, ASID, nested paging and the state-save area.

        EFER.SVME is set (VMRUN requires it) and the VMRUN intercept is always on (VMRUN
        requires that too). I/O and MSR exits other than 'none' use the permission maps at
        ``io_bitmap_gpa`` / ``msr_bitmap_gpa``; for 'all' those maps must be all ones.
        """
        if self.activity != "active":
            raise ValueError("SVM has no activity state: a VMCB guest starts active")
        m1, m2 = INTERCEPT_MISC1_BITS, INTERCEPT_MISC2_BITS
        misc1 = 0
        for wish, name in ((self.exit_on_cpuid, "CPUID"), (self.exit_on_hlt, "HLT"),
                           (self.exit_on_shutdown, "SHUTDOWN"),
                           (self.exit_on_external_interrupt, "INTR"), (self.exit_on_nmi, "NMI"),
                           (self.io_exits is not ExitPolicy.NONE, "IOIO_PROT"),
                           (self.msr_exits is not ExitPolicy.NONE, "MSR_PROT")):  # fmt: skip
            if wish:
                misc1 |= 1 << m1[name]
        misc2 = 1 << m2["VMRUN"]
        if self.exit_on_hypercall:
            misc2 |= 1 << m2["VMMCALL"]
        img = VmcbImage()
        img["INTERCEPT_EXCEPTIONS"] = self.exception_bitmap
        img["INTERCEPT_MISC1"] = misc1
        img["INTERCEPT_MISC2"] = misc2
        if self.io_exits is not ExitPolicy.NONE:
            if self.io_bitmap_gpa is None:
                raise ValueError(f"io_exits='{self.io_exits}' on SVM needs io_bitmap_gpa (IOPM)")
            img["IOPM_BASE_PA"] = self.io_bitmap_gpa
        if self.msr_exits is not ExitPolicy.NONE:
            if self.msr_bitmap_gpa is None:
                raise ValueError(
                    f"msr_exits='{self.msr_exits}' on SVM needs msr_bitmap_gpa (MSRPM)")
            img["MSRPM_BASE_PA"] = self.msr_bitmap_gpa
        img["GUEST_ASID"] = self.tlb_tag
        img["TLB_CONTROL"] = 0
        if self.nested_paging is not None:
            img["NESTED_CTL"] = _vmcb.NP_ENABLE
            img["N_CR3"] = self.nested_paging.root
        for name, seg in self.segments.items():
            img.set_segment(name, seg.selector, seg.svm_attrib, seg.limit, seg.base)
        img.set_segment("GDTR", 0, 0, self.gdtr.limit, self.gdtr.base)
        img.set_segment("IDTR", 0, 0, self.idtr.limit, self.idtr.base)
        img["CPL"] = 0 if not self.cr0 & CR0_PE else self.ss.dpl
        img["EFER"] = self.efer | EFER_SVME
        img["CR0"] = self.cr0
        img["CR2"] = self.cr2
        img["CR3"] = self.cr3
        img["CR4"] = self.cr4
        img["DR6"] = self.dr6
        img["DR7"] = self.dr7
        img["RFLAGS"] = self.rflags
        img["RIP"] = self.rip
        img["RSP"] = self.rsp
        img["RAX"] = self.rax
        img["STAR"] = self.star
        img["LSTAR"] = self.lstar
        img["CSTAR"] = self.cstar
        img["SFMASK"] = self.sfmask
        img["KERNEL_GS_BASE"] = self.kernel_gs_base
        img["SYSENTER_CS"] = self.sysenter_cs
        img["SYSENTER_ESP"] = self.sysenter_esp
        img["SYSENTER_EIP"] = self.sysenter_eip
        img["G_PAT"] = self.pat
        img["DBGCTL"] = self.debugctl
        return img


# ---------------------------------------------------------------------------------------------
# Neutral exit names
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeutralExit:
    """An exit both vendors have, with the VMX basic exit reasons and SVM exit codes for it."""

    name: str
    vmx: tuple[int, ...]
    svm: tuple[int, ...]
    description: str


def _svm(*names: str) -> tuple[int, ...]:
    by_name = {e.name: e.unsigned for e in _vmcb.SVM_EXIT_CODES.values()}
    return tuple(by_name[n] for n in names)


def _vmx(*names: str) -> tuple[int, ...]:
    by_name = {e.name: e.number for e in _vmcs.VMX_EXIT_REASONS.values()}
    return tuple(by_name[n] for n in names)


_NEUTRAL_TABLE = [
    NeutralExit("exception", _vmx("EXCEPTION_NMI"),
                tuple(range(0x40, 0x60)), "an intercepted exception (VMX: or an NMI)"),
    NeutralExit("external_interrupt", _vmx("EXTERNAL_INTERRUPT"), _svm("INTR"),
                "a physical interrupt"),
    NeutralExit("nmi", (), _svm("NMI"), "a physical NMI (VMX reports it as exception_nmi)"),
    NeutralExit("shutdown", _vmx("TRIPLE_FAULT"), _svm("SHUTDOWN"), "triple fault / shutdown"),
    NeutralExit("init", _vmx("INIT_SIGNAL"), _svm("INIT"), "INIT signal"),
    NeutralExit("smi", _vmx("IO_SMI", "OTHER_SMI"), _svm("SMI"), "system-management interrupt"),
    NeutralExit("interrupt_window", _vmx("INTERRUPT_WINDOW"), _svm("VINTR"),
                "the guest can take an interrupt"),
    NeutralExit("task_switch", _vmx("TASK_SWITCH"), _svm("TASK_SWITCH"), "task switch"),
    NeutralExit("cpuid", _vmx("CPUID"), _svm("CPUID"), "CPUID"),
    NeutralExit("hlt", _vmx("HLT"), _svm("HLT", "IDLE_HLT"), "HLT"),
    NeutralExit("invd", _vmx("INVD"), _svm("INVD"), "INVD"),
    NeutralExit("invlpg", _vmx("INVLPG"), _svm("INVLPG"), "INVLPG"),
    NeutralExit("rdpmc", _vmx("RDPMC"), _svm("RDPMC"), "RDPMC"),
    NeutralExit("rdtsc", _vmx("RDTSC"), _svm("RDTSC"), "RDTSC"),
    NeutralExit("rdtscp", _vmx("RDTSCP"), _svm("RDTSCP"), "RDTSCP"),
    NeutralExit("rsm", _vmx("RSM"), _svm("RSM"), "RSM"),
    NeutralExit("hypercall", _vmx("VMCALL"), _svm("VMMCALL"), "VMCALL / VMMCALL"),
    NeutralExit("vm_instruction",
                _vmx("VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME",
                     "VMWRITE", "VMOFF", "VMON", "INVEPT", "INVVPID", "VMFUNC"),
                _svm("VMRUN", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "INVLPGA"),
                "a virtualization instruction of the guest (nested virtualization)"),
    NeutralExit("cr_access", _vmx("CR_ACCESS"),
                tuple(range(0x20)) + _svm("CR0_SEL_WRITE")
                + tuple(range(0x8F, 0xA0)), "control-register access (SVM: or a CR/EFER trap)"),
    NeutralExit("dr_access", _vmx("DR_ACCESS"), tuple(range(0x20, 0x40)), "MOV DR"),
    NeutralExit("io", _vmx("IO_INSTRUCTION"), _svm("IOIO"), "IN/OUT/INS/OUTS"),
    NeutralExit("msr_read", _vmx("MSR_READ", "MSR_READ_IMM"), _svm("MSR"),
                "RDMSR (SVM: EXITINFO1 = 0)"),
    NeutralExit("msr_write", _vmx("MSR_WRITE", "MSR_WRITE_IMM"), _svm("MSR"),
                "WRMSR (SVM: EXITINFO1 = 1)"),
    NeutralExit("invalid_state", _vmx("INVALID_STATE", "MSR_LOAD_FAIL", "MCE_DURING_VMENTRY"),
                _svm("INVALID"), "the entry failed: the image broke a consistency check"),
    NeutralExit("mwait", _vmx("MWAIT_INSTRUCTION"), _svm("MWAIT", "MWAIT_COND"), "MWAIT"),
    NeutralExit("monitor", _vmx("MONITOR_INSTRUCTION"), _svm("MONITOR"), "MONITOR"),
    NeutralExit("pause", _vmx("PAUSE_INSTRUCTION"), _svm("PAUSE"), "PAUSE"),
    NeutralExit("descriptor_table", _vmx("GDTR_IDTR", "LDTR_TR"),
                _svm("IDTR_READ", "GDTR_READ", "LDTR_READ", "TR_READ", "IDTR_WRITE",
                     "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE"), "descriptor-table access"),
    NeutralExit("npf", _vmx("EPT_VIOLATION"), _svm("NPF"),
                "second-level page fault (EPT violation / nested page fault)"),
    NeutralExit("npf_misconfig", _vmx("EPT_MISCONFIG"), (),
                "EPT misconfiguration (SVM reports reserved-bit NPFs as npf)"),
    NeutralExit("wbinvd", _vmx("WBINVD"), _svm("WBINVD"), "WBINVD"),
    NeutralExit("xsetbv", _vmx("XSETBV"), _svm("XSETBV"), "XSETBV"),
    NeutralExit("invpcid", _vmx("INVPCID"), _svm("INVPCID"), "INVPCID"),
    NeutralExit("bus_lock", _vmx("BUS_LOCK"), _svm("BUS_LOCK"), "bus lock"),
    NeutralExit("apic_access", _vmx("APIC_ACCESS", "APIC_WRITE", "EOI_INDUCED"),
                _svm("AVIC_INCOMPLETE_IPI", "AVIC_UNACCELERATED_ACCESS"),
                "virtual-APIC access the hardware did not complete"),
]  # fmt: skip

#: Neutral exit name -> :class:`NeutralExit`.
NEUTRAL_EXITS: Mapping[str, NeutralExit] = MappingProxyType({e.name: e for e in _NEUTRAL_TABLE})

_FROM_VMX = {r: e.name for e in _NEUTRAL_TABLE for r in e.vmx}
_FROM_SVM = {c: e.name for e in _NEUTRAL_TABLE for c in e.svm if c != _svm("MSR")[0]}


def neutral_exit_vmx(exit_reason: int) -> str | None:
    """The neutral name of a VMX exit (the basic reason: bits 15:0 of the exit-reason field)."""
    return _FROM_VMX.get(exit_reason & 0xFFFF)


def neutral_exit_svm(exit_code: int, exitinfo1: int | None = None) -> str | None:
    """The neutral name of an SVM exit code (signed or unsigned). VMEXIT_MSR is ``msr_read`` or
    ``msr_write`` by EXITINFO1 (0 = RDMSR, 1 = WRMSR), ``msr`` when ``exitinfo1`` is not given."""
    code = exit_code & _U64
    if code == _svm("MSR")[0]:
        if exitinfo1 is None:
            return "msr"
        return "msr_write" if exitinfo1 & 1 else "msr_read"
    return _FROM_SVM.get(code)


def check(
    state: VcpuState, caps: VmxCapabilities | None, host: HostState, *,
    maxphyaddr: int | None = None, **vmcs_kw: object,
) -> dict[str, list[Violation]]:  # fmt: skip
    """Both images of ``state`` checked: ``{"vmcs": [...], "vmcb": [...]}``. ``vmcs_kw`` go to
    :func:`check_vmcs` (``linear_address_bits``, ``host_in_ia32e_mode``, ``in_smm``)."""
    return {
        "vmcs": check_vmcs(state.to_vmcs(caps, host), caps, maxphyaddr=maxphyaddr,
                           **vmcs_kw),  # type: ignore[arg-type]
        "vmcb": check_vmcb(state.to_vmcb(), maxphyaddr=52 if maxphyaddr is None else maxphyaddr),
    }
