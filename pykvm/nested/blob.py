"""The scenario blob: everything an L1 hypervisor of ``guests/nested/`` runs its L2 with, built here.

pykvm writes, from :mod:`pykvm.model`, the VMCS (a VMWRITE table from
:meth:`~pykvm.model.hvm.VcpuState.to_vmcs`) or the VMCB
(:meth:`~pykvm.model.hvm.VcpuState.to_vmcb`), the EPT or NPT tables
(:class:`~pykvm.model.paging.TableBuilder`), the L2's own page tables, GDT, TSS and code, and the
permission maps, all at the L1-physical addresses they will have once the L1 has copied the blob
to :data:`~pykvm.nested.layout.NESTED_BASE`. The L1 writes no VMCS field and no table entry of
its own: the host-state area comes from the L1 image's symbols (its exit entry, stack, page
tables, GDT, IDT, TSS).

Before anything runs, :attr:`Blob.violations` holds what :func:`~pykvm.model.vmcs.check_vmcs` or
:func:`~pykvm.model.vmcb.check_vmcb` says of the image; :data:`BREAKAGES` are deliberate faults
to show that the checker and the processor agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..model import paging
from ..model.hvm import (
    DescriptorTable,
    ExitPolicy,
    HostState,
    NestedPaging,
    Segment,
    VcpuState,
)
from ..model.vmcb import VmcbImage, check_vmcb
from ..model.vmcs import Violation, VmcsImage, check_vmcs
from ..probe.vmx import VmxCapabilities
from . import layout as L

__all__ = ["BREAKAGES", "Blob", "Breakage", "GuestImages", "build_blob", "predicted_failure"]

VENDORS = {"vmx": L.VENDOR_VMX, "svm": L.VENDOR_SVM}
PAGE = 0x1000

# Offsets in the blob (from NESTED_BASE)
OFF_HEADER = 0x0000
OFF_VMXON = 0x1000  # VMX: VMXON region; SVM: host-save area
OFF_VMCS = 0x2000  # VMX: the VMCS region; SVM: the VMCB
OFF_VMCS_TABLE = 0x3000  # VMX: the VMWRITE table (two pages)
OFF_MSR_BITMAP = 0x5000  # VMX: MSR bitmaps (zero: no MSR exits)
OFF_IOPM = 0x6000  # SVM: the 12 KiB I/O permission map (all ones: every port exits)
OFF_TABLES = 0x10000  # EPT/NPT table frames, up to L2_MEM_OFFSET
GDT_LIMIT = 5 * 8 - 1


class GuestImages:
    """The built images and their symbols: ``guests/build/nested_{vmx,svm}.elf`` (what a loader
    boots: ELF32), ``.elf64`` (the same link with 64-bit symbols) and ``nested_l2_*.{bin,elf}``."""

    def __init__(self, build_dir: Path, vendor: str):
        if vendor not in VENDORS:
            raise ValueError(f"vendor must be 'vmx' or 'svm', not {vendor!r}")
        self.vendor = vendor
        self.l1 = build_dir / f"nested_{vendor}.elf"
        self.l1_elf64 = build_dir / f"nested_{vendor}.elf64"
        self.l2_bin = build_dir / f"nested_l2_{vendor}.bin"
        self.l2_elf = build_dir / f"nested_l2_{vendor}.elf"
        for p in (self.l1, self.l1_elf64, self.l2_bin, self.l2_elf):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: build the guests first (make -C guests)")

    @property
    def l1_symbols(self) -> dict[str, int]:
        return _symbols(self.l1_elf64)

    @property
    def l2_symbols(self) -> dict[str, int]:
        return _symbols(self.l2_elf)

    @property
    def l2_code(self) -> bytes:
        return self.l2_bin.read_bytes()


@cache
def _symbols(path: Path) -> dict[str, int]:
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            table = elf.get_section_by_name(".symtab")
            if table is None:
                raise ValueError(f"{path}: no symbol table")
            return {s.name: s["st_value"] for s in table.iter_symbols() if s.name}
    except ELFError as e:
        raise ValueError(f"{path}: not an ELF file ({e})") from None


# ---------------------------------------------------------------------------------------------
# Deliberate faults
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakage:
    """A fault put into an image on purpose: ``vmx``/``svm`` change the state or the image."""

    name: str
    description: str
    vmx: Callable[[VcpuState, VmcsImage, VmxCapabilities | None], None] | None = None
    svm: Callable[[VcpuState, VmcbImage], None] | None = None


def _reserved_pin_bit(state: VcpuState, img: VmcsImage, caps: VmxCapabilities | None) -> None:
    allowed = caps.pinbased.may_be_1 if caps is not None and caps.pinbased is not None else 0xFF
    bit = next(b for b in range(31, -1, -1) if not allowed >> b & 1)
    img["PIN_BASED_VM_EXEC_CONTROL"] = img["PIN_BASED_VM_EXEC_CONTROL"] | 1 << bit


def _noncanonical_rip_vmx(state: VcpuState, img: VmcsImage, caps: VmxCapabilities | None) -> None:
    img["GUEST_RIP"] = 0x0000_8000_0000_0000


def _rflags_bit1_clear(state: VcpuState, img: VmcsImage, caps: VmxCapabilities | None) -> None:
    img["GUEST_RFLAGS"] = img["GUEST_RFLAGS"] & ~0x2


def _bad_walk_length(state: VcpuState, img: VmcsImage, caps: VmxCapabilities | None) -> None:
    eptp = img["EPT_POINTER"]
    img["EPT_POINTER"] = (eptp & ~paging.EPTP_WALK_MASK) | (2 << paging.EPTP_WALK_SHIFT)


def _no_vmrun_intercept(state: VcpuState, img: VmcbImage) -> None:
    img["INTERCEPT_MISC2"] = img.get("INTERCEPT_MISC2") & ~1


def _asid_zero(state: VcpuState, img: VmcbImage) -> None:
    img["GUEST_ASID"] = 0


def _svme_clear(state: VcpuState, img: VmcbImage) -> None:
    img["EFER"] = img.get("EFER") & ~(1 << 12)


BREAKAGES: Mapping[str, Breakage] = {
    b.name: b for b in (
        Breakage("reserved-control", "a must-be-0 pin-based control bit set (VMX); the VMRUN "
                 "intercept cleared (SVM)", vmx=_reserved_pin_bit, svm=_no_vmrun_intercept),
        Breakage("noncanonical-rip", "guest RIP 0x800000000000 in a 64-bit guest (VMX)",
                 vmx=_noncanonical_rip_vmx),
        Breakage("rflags-reserved", "guest RFLAGS with its always-1 bit 1 clear (VMX)",
                 vmx=_rflags_bit1_clear),
        Breakage("bad-eptp-walk", "an EPTP with page-walk length 3 (VMX)", vmx=_bad_walk_length),
        Breakage("asid-zero", "guest ASID 0, the host's (SVM)", svm=_asid_zero),
        Breakage("svme-clear", "EFER.SVME clear in the guest state (SVM)", svm=_svme_clear),
    )
}  # fmt: skip


def predicted_failure(vendor: str, violations: list[Violation]) -> str | None:
    """How the processor refuses an image with these violations, as the L1 reports it:
    ``vmfail-valid error=7`` (control fields, SDM 27.2.1), ``vmfail-valid error=8`` (host state,
    27.2.2-27.2.4), ``invalid-state reason=0x80000021`` (guest state, 27.3: a VM exit with the
    entry-failure bit) or ``vmexit-invalid`` (SVM: #VMEXIT(INVALID)). The first rule checked by
    the processor decides, so controls come before host state before guest state."""
    if not violations:
        return None
    if vendor == "svm":
        return "vmexit-invalid"
    sections = [v.section.split()[-1] for v in violations]
    if any(s.startswith("27.2.1") for s in sections):
        return "vmfail-valid error=7"
    if any(s.startswith("27.2") for s in sections):
        return "vmfail-valid error=8"
    return "invalid-state reason=0x80000021"


# ---------------------------------------------------------------------------------------------
# The blob
# ---------------------------------------------------------------------------------------------


#: The L2 exits of the scenario, in order, by neutral name (l2.S's header lists them).
SCENARIO_EXITS = ("cpuid", "io", "io", "hypercall", "npf", "hypercall", "hypercall",
                  "hypercall", "hypercall", "hypercall", "hypercall", "hlt")  # fmt: skip


@dataclass
class Blob:
    """A built scenario: the bytes to hand the L1 and what they were made from."""

    vendor: str
    data: bytes
    state: VcpuState
    memory: paging.SparseMemory  # L1-physical, the blob at NESTED_BASE
    nested: paging.Ept | paging.Npt
    vmcs: VmcsImage | None = None
    vmcb: VmcbImage | None = None
    caps: VmxCapabilities | None = None
    violations: list[Violation] = field(default_factory=list)
    breakage: str | None = None
    triple_fault: bool = False
    name: str = "scenario"

    @property
    def l2_memory(self) -> paging.GuestPhysicalView:
        """The L2's guest-physical memory, through the EPT/NPT tables."""
        return paging.GuestPhysicalView(self.memory, self.nested)

    @property
    def predicted_failure(self) -> str | None:
        return predicted_failure(self.vendor, self.violations)

    @property
    def expected_exits(self) -> tuple[str, ...]:
        if self.violations:
            return ()
        return ("shutdown",) if self.triple_fault else SCENARIO_EXITS

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def _l2_gdt() -> bytes:
    tss_base, tss_limit = L.L2_TSS, 0x67
    tss_low = (tss_limit | (tss_base & 0xFFFFFF) << 16 | 0x8B << 40 | (tss_base >> 24 & 0xFF) << 56)
    entries = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, tss_low, tss_base >> 32]
    return b"".join(e.to_bytes(8, "little") for e in entries)


def build_blob(
    vendor: str, images: GuestImages, *, caps: VmxCapabilities | None = None,
    breakage: str | None = None, triple_fault: bool = False, maxphyaddr: int | None = None,
) -> Blob:  # fmt: skip
    """Build the scenario blob for ``vendor`` ('vmx' or 'svm').

    ``caps`` are the VMX capabilities of the processor the L1 will run on (from the platform's
    IA32_VMX_* MSRs; None: the architectural defaults). ``breakage`` names one of
    :data:`BREAKAGES`; ``triple_fault`` starts the L2 at an instruction that triple-faults.
    """
    if vendor not in VENDORS:
        raise ValueError(f"vendor must be 'vmx' or 'svm', not {vendor!r}")
    if images.vendor != vendor:
        raise ValueError(f"the images are {images.vendor}'s, not {vendor}'s")
    broken = None
    if breakage is not None:
        if breakage not in BREAKAGES:
            raise ValueError(f"unknown breakage {breakage!r}; known: {', '.join(BREAKAGES)}")
        broken = BREAKAGES[breakage]
        if getattr(broken, vendor) is None:
            raise ValueError(f"breakage {breakage!r} does not apply to {vendor}")
    base = L.NESTED_BASE
    l2_base = base + L.L2_MEM_OFFSET
    mem = paging.SparseMemory()

    # EPT / NPT: L2 GPA [0, L2_MEM_SIZE) -> L1 PA l2_base, the RO page without write access.
    fmt = paging.EPT4 if vendor == "vmx" else paging.LONG4
    nested_tables = paging.TableBuilder(
        fmt, mem, paging.FrameAllocator(mem, base + OFF_TABLES, L.L2_MEM_OFFSET - OFF_TABLES))
    ro, end = L.L2_RO_PAGE, L.L2_MEM_SIZE
    nested_tables.map_range(0, l2_base, ro)
    nested_tables.map_range(ro, l2_base + ro, PAGE, write=False)
    nested_tables.map_range(ro + PAGE, l2_base + ro + PAGE, end - ro - PAGE)
    nested: paging.Ept | paging.Npt
    if vendor == "vmx":
        nested = paging.Ept(nested_tables.eptp())
    else:
        nested = paging.Npt(nested_tables.root)

    # The L2's memory, written through those tables: code, GDT, the pages the scenario reads,
    # its two sets of page tables.
    l2 = paging.GuestPhysicalView(mem, nested)
    code = images.l2_code
    if len(code) > L.L2_RO_PAGE - L.L2_CODE:
        raise ValueError(f"{images.l2_bin}: {len(code)} bytes do not fit below L2_RO_PAGE")
    l2.write(L.L2_CODE, code)
    l2.write(L.L2_GDT, _l2_gdt())
    l2.write_u32(L.L2_PAGE_A, L.L2_VALUE_A)
    l2.write_u32(L.L2_PAGE_B, L.L2_VALUE_B)
    tables = {}
    for name, root in (("A", L.L2_CR3_A), ("B", L.L2_CR3_B)):
        builder = paging.TableBuilder(paging.LONG4, l2, paging.FrameAllocator(l2, root, 0x10000))
        if builder.root != root:
            raise AssertionError(f"L2 tables {name} rooted at {builder.root:#x}, not {root:#x}")
        builder.map_range(0, 0, L.L2_MEM_SIZE, user=False)
        builder.map_range(L.L2_SWITCH_VA, L.L2_PAGE_A if name == "A" else L.L2_PAGE_B, PAGE,
                          user=False)
        if name == "A":
            builder.map_range(L.L2_TAG_VA, L.L2_PAGE_A, PAGE, user=False)
        tables[name] = builder
    refs = paging.walk(mem, L.L2_TAG_VA, tables["A"].context(), nested).references
    pte_ref = next(r for r in reversed(refs) if r.dimension == paging.GUEST)  # the guest PTE
    tag_pte = pte_ref.address  # where it lies in L1-physical memory, as the 2-D walk read it
    tag_pte_value = (pte_ref.value & ~(0xFFFFFFFFFF << 12)) | L.L2_PAGE_B

    entry = L.L2_CODE
    if triple_fault:
        entry = images.l2_symbols["l2_triple_fault"]
    state = VcpuState.long_mode(
        rip=entry, rsp=L.L2_STACK_TOP, cr3=L.L2_CR3_A,
        gdtr=DescriptorTable(L.L2_GDT, GDT_LIMIT), idtr=DescriptorTable(0, 0),
        tr=Segment.tss(0x18, base=L.L2_TSS, limit=0x67),
        nested_paging=NestedPaging(nested_tables.root, levels=4), tlb_tag=1,
        io_exits=ExitPolicy.ALL, io_bitmap_gpa=base + OFF_IOPM,
        msr_exits=ExitPolicy.NONE, msr_bitmap_gpa=base + OFF_MSR_BITMAP,
    )  # fmt: skip

    blob = Blob(vendor, b"", state, mem, nested, caps=caps, breakage=breakage,
                triple_fault=triple_fault)
    if vendor == "vmx":
        sym = images.l1_symbols
        host = HostState(cr3=sym["l1_pml4"], rip=sym["vmx_exit_entry"],
                         rsp=sym["l1_host_stack_top"], tr_base=sym["l1_tss"],
                         gdtr_base=sym["gdt"], idtr_base=sym["l1_idt"])
        vmcs = state.to_vmcs(caps, host)
        if broken is not None:
            broken.vmx(state, vmcs, caps)  # type: ignore[misc]
        table = vmcs.to_bytes(terminated=True)
        if len(table) > OFF_MSR_BITMAP - OFF_VMCS_TABLE:
            raise AssertionError(f"the VMWRITE table ({len(table)} bytes) outgrew its pages")
        mem.write(base + OFF_VMCS_TABLE, table)
        blob.vmcs = vmcs
        blob.violations = check_vmcs(vmcs, caps, maxphyaddr=maxphyaddr)
        count = len(table) // 16 - 1
        vmcb_addr = hsave = 0
        vmxon, vmcs_region, vmcs_table = base + OFF_VMXON, base + OFF_VMCS, base + OFF_VMCS_TABLE
    else:
        mem.write(base + OFF_IOPM, b"\xff" * 0x3000)
        vmcb = state.to_vmcb()
        if broken is not None:
            broken.svm(state, vmcb)  # type: ignore[misc]
        mem.write(base + OFF_VMCS, vmcb.to_bytes())
        blob.vmcb = vmcb
        blob.violations = check_vmcb(vmcb, maxphyaddr=52 if maxphyaddr is None else maxphyaddr)
        count = 0
        vmxon = vmcs_region = vmcs_table = 0
        vmcb_addr, hsave = base + OFF_VMCS, base + OFF_VMXON

    flags = (L.NESTED_EXPECT_ENTRY_FAILURE if blob.violations else 0) | (
        L.NESTED_TRIPLE_FAULT if triple_fault else 0)
    blob.name = breakage or ("triple-fault" if triple_fault else "scenario")
    size = L.L2_MEM_OFFSET + L.L2_MEM_SIZE
    header = L.HEADER.pack(
        L.NESTED_MAGIC, L.NESTED_VERSION, VENDORS[vendor], size, base, flags, vmcs_table, count,
        vmxon, vmcs_region, vmcb_addr, hsave, tag_pte, tag_pte_value, state.rax,
        len(blob.expected_exits), blob.name.encode()[:31])  # fmt: skip
    mem.write(base + OFF_HEADER, header)
    blob.data = mem.read(base, size)
    return blob
