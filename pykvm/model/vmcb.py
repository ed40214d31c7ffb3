"""The AMD VMCB: every field's offset and size, SVM exit codes, a 4 KB image, VMRUN's checks.

Sources (facts checked against each other, no code copied):

* AMD64 Architecture Programmer's Manual (APM) Vol. 2, appendix B "Layout of VMCB" (table B-1
  control area, table B-2 state-save area), appendix C "SVM Intercept Exit Codes", 15.5.1
  "Basic Operation" (the VMRUN consistency checks), 15.20 "Event Injection".
* Linux ``arch/x86/include/asm/svm.h`` (``struct vmcb_control_area``, ``struct
  vmcb_save_area`` with its size and offset assertions: control area 1024 bytes, save area
  744 bytes at offset 0x400) and ``uapi/asm/svm.h`` (``SVM_EXIT_*``).

Unlike the VMCS, the VMCB is ordinary memory with a documented layout: :class:`VmcbImage` is the
4096 bytes themselves, and :meth:`VmcbImage.to_bytes` is what an L1 copies into the page whose
physical address it passes to VMRUN in RAX.

Field names follow the APM's where it names the field (``EXITCODE``, ``N_CR3``, ``EVENTINJ``),
otherwise Linux's member name in upper case. Save-area segment registers are four fields each:
``CS_SELECTOR`` (2 bytes), ``CS_ATTRIB`` (2), ``CS_LIMIT`` (4), ``CS_BASE`` (8).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from .vmcs import Rule, Violation, _check_pat, _Out, _rules

__all__ = [
    "BITFIELDS",
    "CONTROL_AREA_SIZE",
    "INTERCEPT_MISC1_BITS",
    "INTERCEPT_MISC2_BITS",
    "INTERCEPT_MISC3_BITS",
    "SAVE_AREA_OFFSET",
    "SAVE_AREA_SIZE",
    "SVM_EXIT_CODES",
    "VMCB_FIELDS",
    "VMCB_RULES",
    "VMCB_SIZE",
    "ExitCode",
    "VmcbArea",
    "VmcbField",
    "VmcbImage",
    "check_vmcb",
    "field",
    "svm_exit",
]

VMCB_SIZE = 4096
CONTROL_AREA_SIZE = 0x400
SAVE_AREA_OFFSET = 0x400
SAVE_AREA_SIZE = 744  # Linux: EXPECTED_VMCB_SAVE_AREA_SIZE (ends with SPEC_CTRL at 0x6E0)
_U64 = (1 << 64) - 1


class VmcbArea(str, Enum):
    CONTROL = "control area"
    SAVE = "state-save area"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VmcbField:
    """A VMCB field: absolute offset in the 4 KB VMCB and size in bytes."""

    name: str
    offset: int
    size: int
    area: VmcbArea
    description: str

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def is_int(self) -> bool:
        """Fields of 1, 2, 4 or 8 bytes hold integers; longer ones (instruction bytes) bytes."""
        return self.size in (1, 2, 4, 8)


_C, _S = VmcbArea.CONTROL, VmcbArea.SAVE
_CONTROL_TABLE: list[tuple[str, int, int, str]] = [
    ("INTERCEPT_CR_READ", 0x000, 2, "Intercept reads of CR0-CR15 (bit n: CRn)"),
    ("INTERCEPT_CR_WRITE", 0x002, 2, "Intercept writes of CR0-CR15"),
    ("INTERCEPT_DR_READ", 0x004, 2, "Intercept reads of DR0-DR15"),
    ("INTERCEPT_DR_WRITE", 0x006, 2, "Intercept writes of DR0-DR15"),
    ("INTERCEPT_EXCEPTIONS", 0x008, 4, "Intercept exception vectors 0-31"),
    ("INTERCEPT_MISC1", 0x00C, 4, "Intercepts: INTR ... SHUTDOWN (INTERCEPT_MISC1_BITS)"),
    ("INTERCEPT_MISC2", 0x010, 4, "Intercepts: VMRUN ... CR write traps (INTERCEPT_MISC2_BITS)"),
    ("INTERCEPT_MISC3", 0x014, 4, "Intercepts: INVLPGB ... IDLE_HLT (INTERCEPT_MISC3_BITS)"),
    ("PAUSE_FILTER_THRESHOLD", 0x03C, 2, "PAUSE filter threshold"),
    ("PAUSE_FILTER_COUNT", 0x03E, 2, "PAUSE filter count"),
    ("IOPM_BASE_PA", 0x040, 8, "Physical base address of the I/O permission map (12 KB)"),
    ("MSRPM_BASE_PA", 0x048, 8, "Physical base address of the MSR permission map (8 KB)"),
    ("TSC_OFFSET", 0x050, 8, "TSC offset"),
    ("GUEST_ASID", 0x058, 4, "Guest ASID"),
    ("TLB_CONTROL", 0x05C, 1, "TLB control: 0 nothing, 1 flush all, 3 this ASID, 7 non-global"),
    ("V_INTR_CONTROL", 0x060, 4,
     ("V_TPR 7:0, V_IRQ 8, VGIF 9, V_NMI 11, V_NMI_MASK 12, V_INTR_PRIO 19:16, V_IGN_TPR 20, "
      "V_INTR_MASKING 24, VGIF enable 25, V_NMI enable 26, x2AVIC 30, AVIC enable 31")),
    ("V_INTR_VECTOR", 0x064, 4, "Vector of the virtual interrupt (7:0)"),
    ("INTERRUPT_SHADOW", 0x068, 4, "Interrupt shadow (bit 0), guest interrupt mask (bit 1)"),
    ("EXITCODE", 0x070, 8, "Exit code"),
    ("EXITINFO1", 0x078, 8, "Exit information 1"),
    ("EXITINFO2", 0x080, 8, "Exit information 2"),
    ("EXITINTINFO", 0x088, 8, "Event being delivered at the exit (error code in 63:32)"),
    ("NESTED_CTL", 0x090, 8,
     "NP_ENABLE 0, SEV 1, SEV-ES 2, GMET 3, SSS check 4, VTE 5, read-only GPT 6, INVLPGB 7"),
    ("AVIC_APIC_BAR", 0x098, 8, "AVIC APIC base address"),
    ("GHCB_PA", 0x0A0, 8, "Guest physical address of the GHCB (SEV-ES)"),
    ("EVENTINJ", 0x0A8, 8, "Event injection (error code in 63:32)"),
    ("N_CR3", 0x0B0, 8, "Nested page table CR3"),
    ("VIRT_EXT", 0x0B8, 8,
     "LBR virtualization enable 0, virtualized VMSAVE/VMLOAD 1, virtual IBS 2, ..."),
    ("VMCB_CLEAN", 0x0C0, 4, "VMCB clean bits"),
    ("NRIP", 0x0C8, 8, "Next sequential instruction pointer (NRIP save)"),
    ("GUEST_INSN_LEN", 0x0D0, 1, "Number of guest instruction bytes fetched"),
    ("GUEST_INSN_BYTES", 0x0D1, 15, "Guest instruction bytes"),
    ("AVIC_BACKING_PAGE", 0x0E0, 8, "AVIC APIC backing page pointer"),
    ("AVIC_LOGICAL_TABLE", 0x0F0, 8, "AVIC logical APIC ID table pointer"),
    ("AVIC_PHYSICAL_TABLE", 0x0F8, 8, "AVIC physical APIC ID table pointer and max index"),
    ("VMSA_PA", 0x108, 8, "VMSA pointer (SEV-ES guest save area)"),
    ("BUS_LOCK_COUNTER", 0x120, 2, "Bus lock threshold counter"),
    ("ALLOWED_SEV_FEATURES", 0x138, 8, "Allowed SEV features"),
    ("GUEST_SEV_FEATURES", 0x140, 8, "Guest SEV features"),
    ("RESERVED_SW", 0x3E0, 32, "Reserved for host software (not used by the processor)"),
]
_SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS", "GDTR", "LDTR", "IDTR", "TR")
_SAVE_TABLE: list[tuple[str, int, int, str]] = [
    *[row for i, seg in enumerate(_SEGMENTS) for row in (
        (f"{seg}_SELECTOR", 0x400 + 16 * i, 2, f"{seg} selector"),
        (f"{seg}_ATTRIB", 0x402 + 16 * i, 2, f"{seg} attributes (descriptor bits 47:40, 55:52)"),
        (f"{seg}_LIMIT", 0x404 + 16 * i, 4, f"{seg} limit"),
        (f"{seg}_BASE", 0x408 + 16 * i, 8, f"{seg} base"),
    )],
    ("VMPL", 0x4CA, 1, "Virtual machine privilege level (SEV-SNP)"),
    ("CPL", 0x4CB, 1, "Current privilege level"),
    ("EFER", 0x4D0, 8, "EFER"),
    ("CR4", 0x548, 8, "CR4"),
    ("CR3", 0x550, 8, "CR3"),
    ("CR0", 0x558, 8, "CR0"),
    ("DR7", 0x560, 8, "DR7"),
    ("DR6", 0x568, 8, "DR6"),
    ("RFLAGS", 0x570, 8, "RFLAGS"),
    ("RIP", 0x578, 8, "RIP"),
    ("RSP", 0x5D8, 8, "RSP"),
    ("S_CET", 0x5E0, 8, "S_CET"),
    ("SSP", 0x5E8, 8, "SSP"),
    ("ISST_ADDR", 0x5F0, 8, "Interrupt SSP table address"),
    ("RAX", 0x5F8, 8, "RAX"),
    ("STAR", 0x600, 8, "STAR"),
    ("LSTAR", 0x608, 8, "LSTAR"),
    ("CSTAR", 0x610, 8, "CSTAR"),
    ("SFMASK", 0x618, 8, "SFMASK"),
    ("KERNEL_GS_BASE", 0x620, 8, "KernelGSBase"),
    ("SYSENTER_CS", 0x628, 8, "SYSENTER_CS"),
    ("SYSENTER_ESP", 0x630, 8, "SYSENTER_ESP"),
    ("SYSENTER_EIP", 0x638, 8, "SYSENTER_EIP"),
    ("CR2", 0x640, 8, "CR2"),
    ("G_PAT", 0x668, 8, "Guest PAT (used with nested paging)"),
    ("DBGCTL", 0x670, 8, "DBGCTL MSR (LBR virtualization)"),
    ("BR_FROM", 0x678, 8, "LastBranchFromIP"),
    ("BR_TO", 0x680, 8, "LastBranchToIP"),
    ("LASTEXCPFROM", 0x688, 8, "LastExceptionFromIP"),
    ("LASTEXCPTO", 0x690, 8, "LastExceptionToIP"),
    ("SPEC_CTRL", 0x6E0, 8, "Guest SPEC_CTRL"),
]

#: Every VMCB field by name, in offset order.
VMCB_FIELDS: Mapping[str, VmcbField] = MappingProxyType({
    **{n: VmcbField(n, o, s, _C, d) for n, o, s, d in _CONTROL_TABLE},
    **{n: VmcbField(n, o, s, _S, d) for n, o, s, d in _SAVE_TABLE},
})  # fmt: skip

FieldKey = str | VmcbField


def field(key: FieldKey) -> VmcbField:
    """The VMCB field named ``key`` (e.g. ``"RIP"``, ``"CS_ATTRIB"``, ``"N_CR3"``)."""
    if isinstance(key, VmcbField):
        return key
    try:
        return VMCB_FIELDS[key]
    except (KeyError, TypeError):
        raise KeyError(f"no VMCB field named {key!r}") from None


def _reserved_ranges() -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the VMCB no field covers (reserved, should be zero)."""
    covered = sorted((f.offset, f.end) for f in VMCB_FIELDS.values())
    out, pos = [], 0
    for start, end in covered:
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < SAVE_AREA_OFFSET + SAVE_AREA_SIZE:
        out.append((pos, SAVE_AREA_OFFSET + SAVE_AREA_SIZE))
    # split at the control/save boundary so a range names one area
    split = []
    for s, e in out:
        if s < SAVE_AREA_OFFSET < e:
            split += [(s, SAVE_AREA_OFFSET), (SAVE_AREA_OFFSET, e)]
        else:
            split.append((s, e))
    return split


RESERVED_RANGES: tuple[tuple[int, int], ...] = tuple(_reserved_ranges())

# Intercept vectors (APM 15.9-15.15 and table B-1; bit names as Linux's INTERCEPT_*) ---------

#: Bits of INTERCEPT_MISC1 (VMCB 0x00C).
INTERCEPT_MISC1_BITS: Mapping[str, int] = MappingProxyType({n: i for i, n in enumerate((
    "INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ", "LDTR_READ",
    "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE", "RDTSC", "RDPMC", "PUSHF",
    "POPF", "CPUID", "RSM", "IRET", "INTN", "INVD", "PAUSE", "HLT", "INVLPG", "INVLPGA",
    "IOIO_PROT", "MSR_PROT", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN"))})  # fmt: skip
#: Bits of INTERCEPT_MISC2 (VMCB 0x010).
INTERCEPT_MISC2_BITS: Mapping[str, int] = MappingProxyType({n: i for i, n in enumerate((
    "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP", "WBINVD",
    "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU", "EFER_WRITE_TRAP",
    *[f"CR{n}_WRITE_TRAP" for n in range(16)]))})  # fmt: skip
#: Bits of INTERCEPT_MISC3 (VMCB 0x014).
INTERCEPT_MISC3_BITS: Mapping[str, int] = MappingProxyType({
    "INVLPGB": 0, "INVLPGB_ILLEGAL": 1, "INVPCID": 2, "MCOMMIT": 3, "TLBSYNC": 4, "BUS_LOCK": 5,
    "IDLE_HLT": 6})  # fmt: skip

#: Sub-fields of the bit-packed control fields: field -> {name: (lowest bit, width in bits)}.
BITFIELDS: Mapping[str, Mapping[str, tuple[int, int]]] = MappingProxyType({
    "V_INTR_CONTROL": MappingProxyType({
        "V_TPR": (0, 8), "V_IRQ": (8, 1), "V_GIF": (9, 1), "V_NMI": (11, 1),
        "V_NMI_MASK": (12, 1), "V_INTR_PRIO": (16, 4), "V_IGN_TPR": (20, 1),
        "V_INTR_MASKING": (24, 1), "V_GIF_ENABLE": (25, 1), "V_NMI_ENABLE": (26, 1),
        "X2AVIC_ENABLE": (30, 1), "AVIC_ENABLE": (31, 1)}),
    "INTERRUPT_SHADOW": MappingProxyType({"INTERRUPT_SHADOW": (0, 1),
                                          "GUEST_INTERRUPT_MASK": (1, 1)}),
    "NESTED_CTL": MappingProxyType({
        "NP_ENABLE": (0, 1), "SEV_ENABLE": (1, 1), "SEV_ES_ENABLE": (2, 1), "GMET": (3, 1),
        "SSS_CHECK": (4, 1), "VTE": (5, 1), "RO_GPT": (6, 1), "INVLPGB_TLBSYNC": (7, 1)}),
    "VIRT_EXT": MappingProxyType({"LBR_VIRTUALIZATION": (0, 1), "VIRTUAL_VMSAVE_VMLOAD": (1, 1)}),
    "VMCB_CLEAN": MappingProxyType({
        "I": (0, 1), "IOPM": (1, 1), "ASID": (2, 1), "TPR": (3, 1), "NP": (4, 1), "CRX": (5, 1),
        "DRX": (6, 1), "DT": (7, 1), "SEG": (8, 1), "CR2": (9, 1), "LBR": (10, 1),
        "AVIC": (11, 1)}),
    **{f: MappingProxyType({"VECTOR": (0, 8), "TYPE": (8, 3), "EV": (11, 1), "V": (31, 1),
                            "ERRORCODE": (32, 32)}) for f in ("EVENTINJ", "EXITINTINFO")},
})  # fmt: skip

NP_ENABLE = 1  # NESTED_CTL bit 0
EFER_SVME = 1 << 12

# ---------------------------------------------------------------------------------------------
# Exit codes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitCode:
    """An SVM exit code (the EXITCODE field, 64 bits; negative codes are all-ones based)."""

    code: int  # as a signed value: -1 for VMEXIT_INVALID
    name: str  # Linux's SVM_EXIT_<name> (APM VMEXIT_<name>)
    description: str

    @property
    def unsigned(self) -> int:
        return self.code & _U64


_EXC = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF",
        10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC", 19: "XF",
        20: "VE", 21: "CP", 28: "HV", 29: "VC", 30: "SX"}  # fmt: skip
_MISC_EXITS = [
    (0x060, "INTR", "Physical INTR"), (0x061, "NMI", "Physical NMI"),
    (0x062, "SMI", "Physical SMI"), (0x063, "INIT", "Physical INIT"),
    (0x064, "VINTR", "Virtual INTR"), (0x065, "CR0_SEL_WRITE", "Selective CR0 write"),
    (0x066, "IDTR_READ", "Read of IDTR"), (0x067, "GDTR_READ", "Read of GDTR"),
    (0x068, "LDTR_READ", "Read of LDTR"), (0x069, "TR_READ", "Read of TR"),
    (0x06A, "IDTR_WRITE", "Write of IDTR"), (0x06B, "GDTR_WRITE", "Write of GDTR"),
    (0x06C, "LDTR_WRITE", "Write of LDTR"), (0x06D, "TR_WRITE", "Write of TR"),
    (0x06E, "RDTSC", "RDTSC"), (0x06F, "RDPMC", "RDPMC"), (0x070, "PUSHF", "PUSHF"),
    (0x071, "POPF", "POPF"), (0x072, "CPUID", "CPUID"), (0x073, "RSM", "RSM"),
    (0x074, "IRET", "IRET"), (0x075, "SWINT", "Software interrupt (INTn)"),
    (0x076, "INVD", "INVD"), (0x077, "PAUSE", "PAUSE"), (0x078, "HLT", "HLT"),
    (0x079, "INVLPG", "INVLPG"), (0x07A, "INVLPGA", "INVLPGA"),
    (0x07B, "IOIO", "IN/OUT (I/O permission map)"), (0x07C, "MSR", "RDMSR or WRMSR (EXITINFO1)"),
    (0x07D, "TASK_SWITCH", "Task switch"), (0x07E, "FERR_FREEZE", "FERR freeze"),
    (0x07F, "SHUTDOWN", "Shutdown (e.g. triple fault)"), (0x080, "VMRUN", "VMRUN"),
    (0x081, "VMMCALL", "VMMCALL"), (0x082, "VMLOAD", "VMLOAD"), (0x083, "VMSAVE", "VMSAVE"),
    (0x084, "STGI", "STGI"), (0x085, "CLGI", "CLGI"), (0x086, "SKINIT", "SKINIT"),
    (0x087, "RDTSCP", "RDTSCP"), (0x088, "ICEBP", "ICEBP (INT1)"), (0x089, "WBINVD", "WBINVD"),
    (0x08A, "MONITOR", "MONITOR"), (0x08B, "MWAIT", "MWAIT"),
    (0x08C, "MWAIT_COND", "MWAIT with armed monitor"), (0x08D, "XSETBV", "XSETBV"),
    (0x08E, "RDPRU", "RDPRU"), (0x08F, "EFER_WRITE_TRAP", "Write of EFER (trap)"),
    *[(0x090 + n, f"CR{n}_WRITE_TRAP", f"Write of CR{n} (trap)") for n in range(16)],
    (0x0A0, "INVLPGB", "INVLPGB"), (0x0A1, "INVLPGB_ILLEGAL", "Illegal INVLPGB"),
    (0x0A2, "INVPCID", "INVPCID"), (0x0A3, "MCOMMIT", "MCOMMIT"), (0x0A4, "TLBSYNC", "TLBSYNC"),
    (0x0A5, "BUS_LOCK", "Bus lock"), (0x0A6, "IDLE_HLT", "HLT with no pending virtual event"),
    (0x400, "NPF", "Nested page fault"),
    (0x401, "AVIC_INCOMPLETE_IPI", "AVIC: IPI delivery not completed"),
    (0x402, "AVIC_UNACCELERATED_ACCESS", "AVIC: unaccelerated APIC access"),
    (0x403, "VMGEXIT", "VMGEXIT (SEV-ES)"),
    (-1, "INVALID", "Invalid guest state in the VMCB (VMRUN consistency check failed)"),
    (-2, "BUSY", "BUSY bit set in the VMSA (SEV-SNP)"),
]  # fmt: skip


def _exit_table() -> list[ExitCode]:
    rows = []
    for n in range(16):
        rows.append(ExitCode(0x000 + n, f"READ_CR{n}", f"Read of CR{n}"))
    for n in range(16):
        rows.append(ExitCode(0x010 + n, f"WRITE_CR{n}", f"Write of CR{n}"))
    for n in range(16):
        rows.append(ExitCode(0x020 + n, f"READ_DR{n}", f"Read of DR{n}"))
    for n in range(16):
        rows.append(ExitCode(0x030 + n, f"WRITE_DR{n}", f"Write of DR{n}"))
    for v in range(32):
        rows.append(ExitCode(0x040 + v, f"EXCP_{_EXC.get(v, v)}", f"Exception vector {v}"))
    rows += [ExitCode(c, n, d) for c, n, d in _MISC_EXITS]
    return rows


#: Exit code (unsigned 64-bit value) -> :class:`ExitCode`.
SVM_EXIT_CODES: Mapping[int, ExitCode] = MappingProxyType({e.unsigned: e for e in _exit_table()})


def svm_exit(code: int) -> ExitCode | None:
    """The exit code ``code`` (signed, e.g. -1, or unsigned 64-bit), or None if undefined."""
    return SVM_EXIT_CODES.get(code & _U64)


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------


class VmcbImage:
    """A VMCB: 4096 bytes with field access by name.

    ``image["RIP"] = 0x1000`` writes the little-endian value at 0x578; a value that does not fit
    the field raises ValueError naming it. Fields longer than 8 bytes (``GUEST_INSN_BYTES``,
    ``RESERVED_SW``) take and return bytes.
    """

    __slots__ = ("_data",)

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        if data is None:
            self._data = bytearray(VMCB_SIZE)
        else:
            if len(data) != VMCB_SIZE:
                raise ValueError(f"a VMCB is {VMCB_SIZE} bytes, got {len(data)}")
            self._data = bytearray(data)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> VmcbImage:
        return cls(data)

    def to_bytes(self) -> bytes:
        """The 4096 bytes, with the APM layout (what the L1 copies to the VMCB page)."""
        return bytes(self._data)

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __getitem__(self, key: FieldKey) -> int | bytes:  # type: ignore[override]
        f = field(key)
        raw = bytes(self._data[f.offset : f.end])
        return int.from_bytes(raw, "little") if f.is_int else raw

    def get(self, key: FieldKey) -> int:
        """The integer value of an integer field (0 in a fresh image)."""
        f = field(key)
        if not f.is_int:
            raise TypeError(f"{f.name} is a {f.size}-byte field: read it with image[{f.name!r}]")
        return int.from_bytes(self._data[f.offset : f.end], "little")

    def __setitem__(self, key: FieldKey, value: int | bytes) -> None:
        f = field(key)
        if f.is_int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name}: a VMCB field value is an int, got {value!r}")
            if value < 0 and f.name == "EXITCODE":
                value &= _U64  # -1 is VMEXIT_INVALID
            if not 0 <= value < 1 << (8 * f.size):
                raise ValueError(
                    f"{f.name} (VMCB {f.offset:#05x}) is {f.size} byte(s): {value:#x} does not fit"
                )
            self._data[f.offset : f.end] = value.to_bytes(f.size, "little")
        else:
            data = bytes(value)
            if len(data) > f.size:
                raise ValueError(f"{f.name} holds {f.size} bytes, got {len(data)}")
            self._data[f.offset : f.end] = data.ljust(f.size, b"\0")

    def __iter__(self) -> Iterator[str]:
        return iter(VMCB_FIELDS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VmcbImage):
            return self._data == other._data
        return NotImplemented

    def copy(self) -> VmcbImage:
        return VmcbImage(self._data)

    def items(self) -> Iterator[tuple[str, int | bytes]]:
        for name in VMCB_FIELDS:
            yield name, self[name]

    def nonzero(self) -> dict[str, int | bytes]:
        """The fields that are not zero (a compact view for reports and tests)."""
        return {n: v for n, v in self.items() if (v if isinstance(v, int) else any(v))}

    def bits(self, key: FieldKey) -> dict[str, int]:
        """The sub-fields of a bit-packed field (see :data:`BITFIELDS`), e.g.
        ``image.bits("EVENTINJ") == {"VECTOR": 14, "TYPE": 3, "EV": 1, "V": 1, ...}``."""
        f = field(key)
        if f.name not in BITFIELDS:
            raise KeyError(f"{f.name} has no named sub-fields (those that do: "
                           f"{', '.join(BITFIELDS)})")
        value = self.get(f)
        return {n: value >> lo & ((1 << w) - 1) for n, (lo, w) in BITFIELDS[f.name].items()}

    def set_segment(self, seg: str, selector: int, attrib: int, limit: int, base: int) -> None:
        """Write the four fields of a save-area segment (ES..GS, GDTR, LDTR, IDTR, TR)."""
        seg = seg.upper()
        if seg not in _SEGMENTS:
            raise KeyError(f"no VMCB segment register {seg!r} (one of {', '.join(_SEGMENTS)})")
        self[f"{seg}_SELECTOR"] = selector
        self[f"{seg}_ATTRIB"] = attrib
        self[f"{seg}_LIMIT"] = limit
        self[f"{seg}_BASE"] = base

    def __repr__(self) -> str:
        body = ", ".join(
            f"{n}={v:#x}" if isinstance(v, int) else f"{n}={v.hex()}"
            for n, v in self.nonzero().items()
        )
        return f"VmcbImage({body})"


# ---------------------------------------------------------------------------------------------
# VMRUN consistency checks (APM vol. 2, 15.5.1) and event injection (15.20)
# ---------------------------------------------------------------------------------------------

#: Every check :func:`check_vmcb` applies: rule id -> :class:`~pykvm.model.vmcs.Rule`.
VMCB_RULES: Mapping[str, Rule] = _rules("APM", [
    ("efer.svme", "15.5.1", "EFER.SVME is 0"),
    ("cr0.cd_nw", "15.5.1", "CR0.CD = 0 and CR0.NW = 1"),
    ("cr0.upper", "15.5.1", "CR0[63:32] are not zero"),
    ("cr3.mbz", "15.5.1", "a must-be-zero bit of CR3 is set"),
    ("cr4.mbz", "15.5.1", "a must-be-zero bit of CR4 is set"),
    ("dr6.upper", "15.5.1", "DR6[63:32] are not zero"),
    ("dr7.upper", "15.5.1", "DR7[63:32] are not zero"),
    ("efer.mbz", "15.5.1", "a must-be-zero bit of EFER is set"),
    ("long.pae", "15.5.1", "EFER.LME and CR0.PG are 1 and CR4.PAE is 0"),
    ("long.pe", "15.5.1", "EFER.LME and CR0.PG are 1 and CR0.PE is 0"),
    ("long.cs", "15.5.1", "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all 1"),
    ("cet.wp", "15.5.1", "CR4.CET is 1 while CR0.WP is 0"),
    ("intercept.vmrun", "15.5.1", "the VMRUN intercept bit is clear"),
    ("msrpm.limit", "15.5.1", "the MSR permission map extends beyond the physical-address limit"),
    ("iopm.limit", "15.5.1", "the I/O permission map extends beyond the physical-address limit"),
    ("eventinj", "15.20", "illegal event injection"),
    ("asid.zero", "15.5.1", "the guest ASID is 0"),
    ("gpat", "15.25", "G_PAT holds an invalid memory type with nested paging on"),
    ("reserved", "B", "reserved VMCB bytes are not zero"),
])  # fmt: skip

CR0_PE, CR0_WP, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 16, 1 << 29, 1 << 30, 1 << 31
CR4_PAE, CR4_CET = 1 << 5, 1 << 23
EFER_LME = 1 << 8
# CR4 bits AMD64 defines: VME..UMIP (0-11), LA57 12, FSGSBASE 16, PCIDE 17, OSXSAVE 18, SMEP 20,
# SMAP 21, PKE 22, CET 23. VMXE (13), SMXE (14), 15, KL (19) and 24-63 are reserved, MBZ.
_CR4_MBZ = _U64 & ~(0xFFF | 1 << 12 | 0b111 << 16 | 0b1111 << 20)
# EFER bits AMD64 defines: SCE 0, LME 8, LMA 10, NXE 11, SVME 12, LMSLE 13, FFXSR 14, TCE 15,
# MCOMMIT 17, INTWB 18, UAIE 20, AIBRSE 21.
_EFER_MBZ = _U64 & ~(1 | 1 << 8 | 0b111111 << 10 | 0b11 << 17 | 0b11 << 20)
_MSRPM_SIZE, _IOPM_SIZE = 8 * 1024, 12 * 1024


def check_vmcb(image: VmcbImage, *, maxphyaddr: int = 52) -> list[Violation]:
    """The VMRUN consistency checks (APM 15.5.1) ``image`` fails, and illegal event injection.

    ``maxphyaddr`` is the physical-address width (CPUID 8000_0008h:EAX[7:0]), against which CR3,
    the permission maps and nCR3 are checked. Also reported: reserved VMCB bytes that are not
    zero (the APM's "reserved, SBZ").
    """
    out = _Out(VMCB_RULES)
    get = image.get
    efer, cr0, cr3, cr4 = get("EFER"), get("CR0"), get("CR3"), get("CR4")
    dr6, dr7 = get("DR6"), get("DR7")
    cs_attrib = get("CS_ATTRIB")

    if not efer & EFER_SVME:
        out.add("efer.svme", "EFER", "EFER.SVME is 0", efer)
    if not cr0 & CR0_CD and cr0 & CR0_NW:
        out.add("cr0.cd_nw", "CR0", "CR0.CD is 0 and CR0.NW is 1", cr0)
    if cr0 >> 32:
        out.add("cr0.upper", "CR0", "CR0 bits 63:32 are not zero", cr0)
    cr3_mbz = _U64 & ~((1 << min(maxphyaddr, 52)) - 1)
    if cr3 & cr3_mbz:
        out.add("cr3.mbz", "CR3", f"CR3 bits 63:{min(maxphyaddr, 52)} are not zero", cr3)
    if cr4 & _CR4_MBZ:
        bits = [b for b in range(64) if cr4 & _CR4_MBZ >> b & 1]
        out.add("cr4.mbz", "CR4", f"CR4 must-be-zero bit(s) {bits} are set", cr4)
    if dr6 >> 32:
        out.add("dr6.upper", "DR6", "DR6 bits 63:32 are not zero", dr6)
    if dr7 >> 32:
        out.add("dr7.upper", "DR7", "DR7 bits 63:32 are not zero", dr7)
    if efer & _EFER_MBZ:
        bits = [b for b in range(64) if efer & _EFER_MBZ >> b & 1]
        out.add("efer.mbz", "EFER", f"EFER must-be-zero bit(s) {bits} are set", efer)
    if efer & EFER_LME and cr0 & CR0_PG:
        if not cr4 & CR4_PAE:
            out.add("long.pae", "CR4", "EFER.LME and CR0.PG are 1 but CR4.PAE is 0", cr4)
        if not cr0 & CR0_PE:
            out.add("long.pe", "CR0", "EFER.LME and CR0.PG are 1 but CR0.PE is 0", cr0)
        if cr4 & CR4_PAE and cs_attrib >> 9 & 1 and cs_attrib >> 10 & 1:
            out.add("long.cs", "CS_ATTRIB",
                    "EFER.LME, CR0.PG, CR4.PAE are 1 and CS.L and CS.D are both 1", cs_attrib)
    if cr4 & CR4_CET and not cr0 & CR0_WP:
        out.add("cet.wp", "CR4", "CR4.CET is 1 while CR0.WP is 0", cr4)
    misc2 = get("INTERCEPT_MISC2")
    if not misc2 >> INTERCEPT_MISC2_BITS["VMRUN"] & 1:
        out.add("intercept.vmrun", "INTERCEPT_MISC2", "the VMRUN intercept (bit 0) is clear", misc2)
    limit = 1 << maxphyaddr
    for name, size, rule, what in (("MSRPM_BASE_PA", _MSRPM_SIZE, "msrpm.limit", "MSR"),
                                   ("IOPM_BASE_PA", _IOPM_SIZE, "iopm.limit", "I/O")):
        base = get(name) & ~0xFFF  # the low 12 bits are ignored
        if base + size > limit:
            out.add(rule, name,
                    f"the {what} permission map at {base:#x} ({size // 1024} KB) extends beyond "
                    f"the {maxphyaddr}-bit physical-address limit", get(name))
    _check_event_injection(out, get("EVENTINJ"))
    asid = get("GUEST_ASID")
    if asid == 0:
        out.add("asid.zero", "GUEST_ASID", "the guest ASID is 0 (the host's)", 0)
    if get("NESTED_CTL") & NP_ENABLE:
        _check_pat(out, "gpat", "G_PAT", get("G_PAT"), "G_PAT")
    data = image.to_bytes()
    for start, end in RESERVED_RANGES:
        chunk = data[start:end]
        if any(chunk):
            first = start + next(i for i, b in enumerate(chunk) if b)
            out.add("reserved", f"reserved@{start:#05x}",
                    f"reserved bytes {start:#05x}-{end - 1:#05x} are not zero "
                    f"(first at {first:#05x})")
    return out.items


def _check_event_injection(out: _Out, eventinj: int) -> None:
    if not eventinj >> 31 & 1:
        return
    kind, vector = (eventinj >> 8) & 7, eventinj & 0xFF
    if kind not in (0, 2, 3, 4):
        out.add("eventinj", "EVENTINJ", f"EVENTINJ.TYPE {kind} is reserved", eventinj)
    if kind == 3 and vector == 2:
        out.add("eventinj", "EVENTINJ", "an exception (TYPE 3) with vector 2 (NMI)", eventinj)
    if eventinj & 0x7FFF_F000:
        out.add("eventinj", "EVENTINJ", "EVENTINJ reserved bits 30:12 are not zero", eventinj)
