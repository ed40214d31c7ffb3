"""CPUID tables and the decoders the probe needs from them.

A :class:`CpuidTable` maps ``(leaf, subleaf)`` to the four output registers. A leaf that was not
captured is *absent*: the table never invents zeros (nor, as Intel hardware does for a basic leaf
past the maximum, the highest basic leaf's data).

Feature questions answer ``True``/``False`` when the table can settle them and ``None`` when it
cannot:

* the leaf is in the table: the bit decides;
* the leaf is past the maximum leaf of its range (leaf ``0`` EAX for basic leaves, leaf
  ``0x80000000`` EAX for extended leaves): the processor does not enumerate the feature,
  ``False``;
* otherwise (the leaf is in range but was not captured, or the range's maximum is unknown):
  ``None``.

Bit positions follow the Intel SDM Vol. 2A (CPUID), the AMD APM Vol. 3 appendix E and the Linux
kernel's ``arch/x86/include/asm/cpufeatures.h``. Family/model/stepping follow the kernel's
``x86_family()``/``x86_model()`` (``arch/x86/lib/cpu.c``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "EXTENDED_BASE",
    "HYPERVISOR_BASE",
    "CpuidRegs",
    "CpuidSummary",
    "CpuidTable",
    "Signature",
    "address_widths",
    "brand_string",
    "hypervisor_signature",
    "signature",
    "summarize",
    "vendor",
]

EXTENDED_BASE = 0x8000_0000
HYPERVISOR_BASE = 0x4000_0000
_U32 = 0xFFFF_FFFF
_REGS = ("eax", "ebx", "ecx", "edx")

Key = tuple[int, int]


class CpuidRegs(NamedTuple):
    """The output of one CPUID execution."""

    eax: int
    ebx: int
    ecx: int
    edx: int

    def reg(self, name: str) -> int:
        """The register called ``name`` ("eax", "ebx", "ecx" or "edx")."""
        if name not in _REGS:
            raise ValueError(f"unknown CPUID register {name!r}; expected one of {', '.join(_REGS)}")
        return int(getattr(self, name))


def _check_u32(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
        raise ValueError(f"{what} must be an integer in [0, 0xFFFFFFFF], got {value!r}")
    return value


class CpuidTable(Mapping[Key, CpuidRegs]):
    """An immutable CPUID table: ``(leaf, subleaf) -> CpuidRegs``.

    A leaf without sub-leaves is stored under sub-leaf 0. Missing entries are absent
    (``table.get_regs(leaf) is None``); see the module docstring for how feature bits of absent
    leaves are answered.
    """

    __slots__ = ("_entries",)

    def __init__(
        self,
        entries: Mapping[Key, Sequence[int]] | Iterable[tuple[Key, Sequence[int]]] = (),
    ) -> None:
        items = entries.items() if isinstance(entries, Mapping) else entries
        table: dict[Key, CpuidRegs] = {}
        for key, regs in items:
            if not isinstance(key, tuple) or len(key) != 2:
                raise ValueError(f"CPUID key must be a (leaf, subleaf) pair, got {key!r}")
            leaf = _check_u32("CPUID leaf", key[0])
            subleaf = _check_u32("CPUID subleaf", key[1])
            if len(regs) != 4:
                raise ValueError(
                    f"CPUID {leaf:#010x}/{subleaf:#x} needs 4 registers, got {len(regs)}"
                )
            where = f"CPUID {leaf:#010x}/{subleaf:#x}"
            table[(leaf, subleaf)] = CpuidRegs(
                *(_check_u32(f"{where} {n}", v) for n, v in zip(_REGS, regs, strict=True))
            )
        self._entries = dict(sorted(table.items()))

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, key: Key) -> CpuidRegs:
        return self._entries[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __repr__(self) -> str:
        return f"CpuidTable(<{len(self)} entries, {len(self.leaves())} leaves>)"

    # Lookups ----------------------------------------------------------------------------------
    def get_regs(self, leaf: int, subleaf: int = 0) -> CpuidRegs | None:
        """The registers of ``(leaf, subleaf)``, or None if the table does not have them."""
        return self._entries.get((leaf, subleaf))

    def leaves(self) -> tuple[int, ...]:
        """Every leaf present, in ascending order."""
        return tuple(sorted({leaf for leaf, _ in self._entries}))

    def subleaves(self, leaf: int) -> tuple[int, ...]:
        """The sub-leaves present for ``leaf`` (``(0,)`` for a leaf without sub-leaves)."""
        return tuple(sub for lf, sub in self._entries if lf == leaf)

    @property
    def max_basic_leaf(self) -> int | None:
        """Leaf 0 EAX: the highest basic leaf, or None if leaf 0 is absent."""
        regs = self.get_regs(0)
        return None if regs is None else regs.eax

    @property
    def max_extended_leaf(self) -> int | None:
        """Leaf 0x80000000 EAX, or None if absent or not a valid extended maximum."""
        regs = self.get_regs(EXTENDED_BASE)
        if regs is None or not EXTENDED_BASE <= regs.eax <= EXTENDED_BASE + 0xFFFF:
            return None
        return regs.eax

    def in_range(self, leaf: int) -> bool | None:
        """Whether ``leaf`` is at or below the maximum leaf of its range; None if unknown."""
        if leaf < HYPERVISOR_BASE:
            top = self.max_basic_leaf
        elif EXTENDED_BASE <= leaf <= EXTENDED_BASE + 0xFFFF:
            if self.get_regs(EXTENDED_BASE) is not None and self.max_extended_leaf is None:
                return False  # leaf 0x80000000 present but enumerates no extended leaves
            top = self.max_extended_leaf
        else:
            return None
        return None if top is None else leaf <= top

    def bit(self, leaf: int, reg: str, bit: int, subleaf: int = 0) -> bool | None:
        """One feature bit: True/False, or None when the table cannot tell (see module doc)."""
        if not 0 <= bit <= 31:
            raise ValueError(f"CPUID bit must be in [0, 31], got {bit}")
        regs = self.get_regs(leaf, subleaf)
        if regs is not None:
            return bool((regs.reg(reg) >> bit) & 1)
        if self.in_range(leaf) is False:
            return False
        return None

    def to_json(self) -> list[dict[str, int]]:
        """Plain data: a list of ``{"leaf", "subleaf", "eax", "ebx", "ecx", "edx"}``."""
        return [
            {"leaf": leaf, "subleaf": sub, **regs._asdict()}
            for (leaf, sub), regs in self._entries.items()
        ]


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------


def _regs_text(*values: int) -> str:
    """Registers read as little-endian ASCII, as CPUID returns vendor and brand strings."""
    raw = b"".join(v.to_bytes(4, "little") for v in values)
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def vendor(table: CpuidTable) -> str | None:
    """The vendor string of leaf 0 (EBX, EDX, ECX), e.g. "GenuineIntel"; None if leaf 0 absent."""
    regs = table.get_regs(0)
    return None if regs is None else _regs_text(regs.ebx, regs.edx, regs.ecx)


def brand_string(table: CpuidTable) -> str | None:
    """The processor brand string of leaves 0x80000002-0x80000004, stripped; None if absent."""
    parts = [table.get_regs(leaf) for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004)]
    if any(p is None for p in parts):
        return None
    values = [v for p in parts if p is not None for v in p]
    text = b"".join(v.to_bytes(4, "little") for v in values).split(b"\0", 1)[0]
    return text.decode("ascii", errors="replace").strip()


@dataclass(frozen=True)
class Signature:
    """Family/model/stepping of leaf 1 EAX, computed as the Linux kernel does."""

    raw: int
    family: int
    model: int
    stepping: int

    @classmethod
    def from_eax(cls, eax: int) -> Signature:
        base_family = (eax >> 8) & 0xF
        family = base_family + ((eax >> 20) & 0xFF) if base_family == 0xF else base_family
        model = (eax >> 4) & 0xF
        if family >= 0x6:
            model |= ((eax >> 16) & 0xF) << 4
        return cls(raw=eax, family=family, model=model, stepping=eax & 0xF)

    def __str__(self) -> str:
        return f"family {self.family:#x} model {self.model:#x} stepping {self.stepping}"


def signature(table: CpuidTable) -> Signature | None:
    """Family/model/stepping from leaf 1, or None if leaf 1 is absent."""
    regs = table.get_regs(1)
    return None if regs is None else Signature.from_eax(regs.eax)


def hypervisor_signature(table: CpuidTable) -> str | None:
    """The hypervisor vendor signature of leaf 0x40000000 (EBX, ECX, EDX), e.g. "KVMKVMKVM".

    None unless the hypervisor bit (leaf 1 ECX[31]) is set and the leaf was captured.
    """
    regs = table.get_regs(HYPERVISOR_BASE)
    if regs is None or table.bit(1, "ecx", 31) is not True:
        return None
    return _regs_text(regs.ebx, regs.ecx, regs.edx)


def address_widths(table: CpuidTable) -> tuple[int, int] | None:
    """(physical, linear) address widths in bits from leaf 0x80000008 EAX[7:0] and [15:8]."""
    regs = table.get_regs(0x8000_0008)
    if regs is None or table.in_range(0x8000_0008) is False:
        return None
    return regs.eax & 0xFF, (regs.eax >> 8) & 0xFF


@dataclass(frozen=True)
class CpuidSummary:
    """What the probe reports from CPUID. Feature fields are True/False, or None if unknown."""

    vendor: str | None
    brand: str | None
    signature: Signature | None
    max_basic_leaf: int | None
    max_extended_leaf: int | None
    vmx: bool | None  # leaf 1 ECX[5]
    svm: bool | None  # leaf 0x80000001 ECX[2]
    hypervisor: bool | None  # leaf 1 ECX[31]
    hypervisor_signature: str | None  # leaf 0x40000000 EBX/ECX/EDX
    pcid: bool | None  # leaf 1 ECX[17]
    invpcid: bool | None  # leaf 7 EBX[10]
    la57: bool | None  # leaf 7 ECX[16]
    nx: bool | None  # leaf 0x80000001 EDX[20]
    pdpe1gb: bool | None  # leaf 0x80000001 EDX[26]: 1 GiB pages
    long_mode: bool | None  # leaf 0x80000001 EDX[29]
    phys_addr_bits: int | None  # leaf 0x80000008 EAX[7:0]
    linear_addr_bits: int | None  # leaf 0x80000008 EAX[15:8]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        sig = self.signature
        data["signature"] = None if sig is None else dataclasses.asdict(sig)
        return data


def summarize(table: CpuidTable) -> CpuidSummary:
    """Decode the leaves the probe reports."""
    widths = address_widths(table)
    return CpuidSummary(
        vendor=vendor(table),
        brand=brand_string(table),
        signature=signature(table),
        max_basic_leaf=table.max_basic_leaf,
        max_extended_leaf=table.max_extended_leaf,
        vmx=table.bit(1, "ecx", 5),
        svm=table.bit(0x8000_0001, "ecx", 2),
        hypervisor=table.bit(1, "ecx", 31),
        hypervisor_signature=hypervisor_signature(table),
        pcid=table.bit(1, "ecx", 17),
        invpcid=table.bit(7, "ebx", 10),
        la57=table.bit(7, "ecx", 16),
        nx=table.bit(0x8000_0001, "edx", 20),
        pdpe1gb=table.bit(0x8000_0001, "edx", 26),
        long_mode=table.bit(0x8000_0001, "edx", 29),
        phys_addr_bits=None if widths is None else widths[0],
        linear_addr_bits=None if widths is None else widths[1],
    )
