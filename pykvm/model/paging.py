"""x86 page tables as data: builders, one- and two-dimensional walkers, EPT and NPT.

What this models, and where each rule comes from:

* Guest paging (Intel SDM Vol. 3A chapter 4; AMD APM Vol. 2 chapter 5): 32-bit paging (4 KiB and,
  with CR4.PSE, 4 MiB pages with PSE-36 address bits), PAE paging (the four PDPTEs are registers
  loaded with CR3, so a walk reads two levels from memory), 4-level and 5-level paging (2 MiB and
  1 GiB pages). Reserved bits per level and mode (MAXPHYADDR, PS in a PML4E/PML5E, XD with
  EFER.NXE = 0, PAE PDPTE bits), access rights (U/S, R/W with CR0.WP, XD, SMEP, SMAP without
  RFLAGS.AC) and the #PF error code (P, W/R, U/S, RSVD, I/D: SDM 4.7).
* EPT (SDM Vol. 3C 29.3): R/W/X, user-execute (bit 10, mode-based execute control), leaf memory
  type (5:3), ignore-PAT (6), 2 MiB / 1 GiB leaves (7), accessed (8) and dirty (9) with EPTP[6],
  EPTP memory type (2:0) and page-walk length - 1 (5:3). EPT misconfigurations (write without
  read, unsupported execute-only, reserved bits, reserved memory types) versus EPT violations
  with the exit qualification of SDM Vol. 3C Table 28-7 (bits 0-2 access, 3-6 the AND of the
  R/W/X/user-execute bits of the entries used, 7 guest-linear address valid, 8 access to the
  final translation rather than to a guest paging-structure entry). Bit positions checked
  against Linux arch/x86/include/asm/vmx.h (VMX_EPT_*, EPT_VIOLATION_*).
* NPT (APM Vol. 2 15.25): ordinary long-mode tables under nCR3; every nested access is a user
  access (Linux: "NPT walks are always user-walks"); a nested #NPF reports a #PF-style error code
  in EXITINFO1 with bit 32 (fault on the final guest-physical address) or bit 33 (fault on a guest
  page-table access), and the guest-physical address in EXITINFO2 (Linux PFERR_GUEST_FINAL_BIT 32,
  PFERR_GUEST_PAGE_BIT 33).
* The two-dimensional walk: every guest paging-structure entry lives at a guest-physical address
  that the nested tables translate first, and so does the final guest-physical address. Without
  caches a walk of n guest levels under m nested levels makes (n+1)(m+1)-1 memory references
  (:func:`walk_reference_count`). 24 for 4 under 4 is the figure of Bhargava, Serebrin, Spadini
  and Manne, "Accelerating two-dimensional page walks for virtualized systems", ASPLOS 2008 (the
  nested dimension "increases the maximum number of architecturally-required page table
  references"; later work, e.g. Stojkovic et al., ASPLOS 2022, quotes "up to twenty-four
  sequential memory accesses"). 35 for 5 under 5 is the same formula, the number Intel's 5-level
  paging white paper is cited for; that paper's text was not available to check. :class:`WalkCaches`
  models the structures of Bhargava et al.: a page-walk cache for guest-dimension entries, a
  nested TLB (gPA -> hPA) and a nested page-walk cache.

What it does not model: MTRRs (the 1-D memory type is the PAT type, as if the MTRRs said WB),
protection keys, shadow stacks, CET, HLAT, sub-page permissions, #VE, the advanced VM-exit
information for EPT violations (exit-qualification bits 9-11 are left 0), RFLAGS.AC for SMAP, and
the memory type NPT produces. Accessed/dirty updates happen only when a walk asks for them
(``set_ad=True``) and only after a walk that succeeds.

Layering: this module depends on nothing else in pykvm. Anything with ``read_u32``/``read_u64``/
``write_u32``/``write_u64`` is a :class:`PhysicalMemory` (pykvm's ``GuestMemory`` is one);
:func:`walk_live` reads a vCPU through ``get_sregs()``/``get_cpuid2()`` only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol, Union, runtime_checkable

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE_SIZE = 4 * KiB
SIZE_4K, SIZE_2M, SIZE_4M, SIZE_1G = 4 * KiB, 2 * MiB, 4 * MiB, 1 * GiB

# ---- x86 paging-structure entries (SDM Vol. 3A Tables 4-4 .. 4-20) ------------------------------
P = 1 << 0  # present
RW = 1 << 1  # read/write
US = 1 << 2  # user/supervisor
PWT = 1 << 3  # page-level write-through (PAT index bit 0)
PCD = 1 << 4  # page-level cache disable (PAT index bit 1)
A = 1 << 5  # accessed
D = 1 << 6  # dirty (leaf entries)
PS = 1 << 7  # page size: the entry maps a 4 MiB / 2 MiB / 1 GiB page (PDE, PDPTE)
PAT_4K = 1 << 7  # PAT index bit 2 in a PTE (same position as PS)
G = 1 << 8  # global (leaf entries)
PAT_LARGE = 1 << 12  # PAT index bit 2 in a large-page entry
XD = 1 << 63  # execute-disable (PAE and 4/5-level paging, with EFER.NXE)
# Bits 2:1 and 8:5 of a PAE PDPTE are reserved: it may set only P, PWT, PCD (plus the address and ignored 11:9).
PAE_PDPTE_RESERVED = 0x1E6

# ---- EPT entries (SDM Vol. 3C 29.3.2, Tables 29-1 .. 29-6; Linux VMX_EPT_*) -------------------
EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2  # execute (supervisor-mode linear addresses when mode-based execute control is on)
EPT_MT_SHIFT = 3  # bits 5:3: memory type of a leaf
EPT_MT_MASK = 7 << EPT_MT_SHIFT
EPT_IPAT = 1 << 6  # ignore PAT (leaf)
EPT_LARGE = 1 << 7  # the entry maps a 2 MiB / 1 GiB page
EPT_A = 1 << 8  # accessed (EPTP[6] = 1)
EPT_D = 1 << 9  # dirty (leaf, EPTP[6] = 1)
EPT_XU = 1 << 10  # user-mode execute (mode-based execute control, MBEC)
EPT_SUPPRESS_VE = 1 << 63

# ---- EPT pointer (SDM Vol. 3C 25.6.11) ------------------------------------------------------------
EPTP_MT_MASK = 7  # bits 2:0: memory type for accessing the EPT paging structures (UC or WB)
EPTP_WALK_SHIFT = 3  # bits 5:3: page-walk length minus 1
EPTP_WALK_MASK = 7 << EPTP_WALK_SHIFT
EPTP_AD = 1 << 6  # enable EPT accessed and dirty flags

# ---- memory types (SDM Vol. 3A 12.3 / 12.12) ------------------------------------------------------
UC, WC, WT, WP, WB, UC_MINUS = 0, 1, 4, 5, 6, 7
MEMORY_TYPE_NAMES = {UC: "UC", WC: "WC", WT: "WT", WP: "WP", WB: "WB", UC_MINUS: "UC-"}
EPT_MEMORY_TYPES = (UC, WC, WT, WP, WB)  # 2, 3 and 7 are reserved in an EPT leaf
DEFAULT_PAT = 0x0007040600070406  # IA32_PAT at power-up: WB, WT, UC-, UC, WB, WT, UC-, UC

# ---- #PF error code (SDM Vol. 3A 4.7; Linux PFERR_*) ----------------------------------------------
PF_P = 1 << 0  # 0: not present; 1: protection violation (or reserved bit)
PF_W = 1 << 1  # write access
PF_U = 1 << 2  # user-mode access
PF_RSVD = 1 << 3  # a reserved bit was set
PF_ID = 1 << 4  # instruction fetch (with NXE in PAE/4/5-level paging, or CR4.SMEP)

# ---- EPT-violation exit qualification (SDM Vol. 3C Table 28-7; Linux EPT_VIOLATION_*) -------------
EQ_READ = 1 << 0  # the access was a data read
EQ_WRITE = 1 << 1  # the access was a data write
EQ_FETCH = 1 << 2  # the access was an instruction fetch
EQ_READABLE = 1 << 3  # AND of bit 0 (R) of the EPT entries used
EQ_WRITABLE = 1 << 4  # AND of bit 1 (W)
EQ_EXECUTABLE = 1 << 5  # AND of bit 2 (X)
EQ_USER_EXECUTABLE = 1 << 6  # AND of bit 10 (XU), with mode-based execute control
EQ_GLA_VALID = 1 << 7  # the guest-linear-address field is valid
EQ_FINAL = 1 << 8  # (with bit 7) the access was to the final translation, not a guest paging entry

# ---- nested #NPF EXITINFO1 (APM Vol. 2 15.25.6; Linux PFERR_GUEST_FINAL_BIT / _PAGE_BIT) ----------
NPF_FINAL = 1 << 32  # fault while translating the guest's final physical address
NPF_GUEST_PAGE = 1 << 33  # fault while translating a guest page-table access

# ---- control-register bits that choose the paging mode (SDM Vol. 3A 2.5, 4.1) ---------------------
CR0_WP, CR0_PG = 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11

GUEST, NESTED = "guest", "nested"


def _bits(high: int, low: int) -> int:
    """Mask of bits high:low (empty when high < low)."""
    return ((1 << (high + 1)) - 1) & ~((1 << low) - 1) if high >= low else 0


def _bit_text(mask: int) -> str:
    """'bit 7' or 'bits 51:48, 7' for a mask."""
    ranges, bit = [], 63
    while bit >= 0:
        if mask >> bit & 1:
            top = bit
            while bit > 0 and mask >> (bit - 1) & 1:
                bit -= 1
            ranges.append(f"{top}:{bit}" if top != bit else f"{top}")
        bit -= 1
    return ("bits " if len(ranges) > 1 or ":" in ranges[0] else "bit ") + ", ".join(ranges) if ranges else "no bits"


# =================================================================================================
# Table formats
# =================================================================================================


@dataclass(frozen=True)
class Format:
    """One paging-structure format: how many levels, entry width, which address bits index them."""

    name: str
    levels: int
    entry_size: int  # bytes: 4 (32-bit paging) or 8
    address_bits: int  # width of the addresses it translates (linear, or guest-physical for EPT)
    ept: bool = False
    top_index_bits: int | None = None  # PAE: the PDPT has 4 entries

    @property
    def index_bits(self) -> int:
        return 10 if self.entry_size == 4 else 9

    def shift(self, level: int) -> int:
        """The lowest address bit that level ``level`` (1 = PTE) indexes."""
        return 12 + self.index_bits * (level - 1)

    def index(self, address: int, level: int) -> int:
        bits = self.top_index_bits if (level == self.levels and self.top_index_bits) else self.index_bits
        return (address >> self.shift(level)) & ((1 << bits) - 1)

    def page_size(self, level: int) -> int:
        return 1 << self.shift(level)

    @property
    def leaf_levels(self) -> tuple[int, ...]:
        """Levels whose entries may map a page, largest first."""
        return (2, 1) if self.levels <= 3 else (3, 2, 1)

    @property
    def page_sizes(self) -> tuple[int, ...]:
        return tuple(self.page_size(level) for level in self.leaf_levels)

    def entry_name(self, level: int) -> str:
        if self.entry_size == 4:
            base = {2: "PDE", 1: "PTE"}[level]
        else:
            base = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}[level]
        return ("EPT " if self.ept else "") + base

    def __str__(self) -> str:
        return self.name


X86_32 = Format("32-bit", 2, 4, 32)
PAE = Format("PAE", 3, 8, 32, top_index_bits=2)
LONG4 = Format("4-level", 4, 8, 48)
LONG5 = Format("5-level", 5, 8, 57)
EPT4 = Format("EPT 4-level", 4, 8, 48, ept=True)
EPT5 = Format("EPT 5-level", 5, 8, 57, ept=True)
FORMATS = (X86_32, PAE, LONG4, LONG5, EPT4, EPT5)


def _long_format(levels: int, ept: bool = False) -> Format:
    table = {(4, False): LONG4, (5, False): LONG5, (4, True): EPT4, (5, True): EPT5}
    if (levels, ept) not in table:
        raise ValueError(f"{'EPT' if ept else 'long-mode'} tables have 4 or 5 levels, not {levels}")
    return table[levels, ept]


def _canonical(fmt: Format, va: int) -> bool:
    """Bits 63:(width-1) of a 4/5-level linear address are all equal."""
    top = va >> (fmt.address_bits - 1)
    return top == 0 or top == (1 << (65 - fmt.address_bits)) - 1


def _address_mask(maxphyaddr: int) -> int:
    return _bits(min(maxphyaddr, 52) - 1, 12)


# =================================================================================================
# Entry encoders and decoders
# =================================================================================================


@dataclass(frozen=True)
class X86Entry:
    """One x86 paging-structure entry, field by field (SDM Vol. 3A Tables 4-4 .. 4-20).

    ``large`` is PS in a PDE/PDPTE (a 4 MiB / 2 MiB / 1 GiB page); ``pat`` is PAT index bit 2,
    at bit 7 of a PTE and bit 12 of a large-page entry."""

    address: int = 0
    present: bool = True
    write: bool = False
    user: bool = False
    pwt: bool = False
    pcd: bool = False
    accessed: bool = False
    dirty: bool = False
    large: bool = False
    global_: bool = False
    pat: bool = False
    xd: bool = False

    def encode(self, fmt: Format = LONG4, level: int = 1) -> int:
        if fmt.ept:
            raise ValueError(f"{fmt} entries are EptEntry, not X86Entry")
        name = fmt.entry_name(level)
        if self.large and level not in fmt.leaf_levels[:-1]:
            raise ValueError(f"a {fmt} {name} cannot map a large page (PS)")
        leaf = level == 1 or self.large
        size = fmt.page_size(level) if leaf else PAGE_SIZE
        if self.address % size:
            raise ValueError(f"{name} address {self.address:#x} is not aligned to {size:#x}")
        if not leaf and (self.dirty or self.global_ or self.pat):
            raise ValueError(f"dirty, global and PAT belong to entries that map a page, not a non-leaf {name}")
        if fmt is PAE and level == 3:
            extra = [n for n in ("write", "user", "accessed", "large", "xd") if getattr(self, n)]
            if extra:
                raise ValueError(f"a PAE PDPTE may set only P, PWT and PCD, not {', '.join(extra)} (reserved bits)")
        v = (P if self.present else 0) | (RW if self.write else 0) | (US if self.user else 0)
        v |= (PWT if self.pwt else 0) | (PCD if self.pcd else 0) | (A if self.accessed else 0)
        v |= (D if self.dirty else 0) | (G if self.global_ else 0)
        if self.large:
            v |= PS
        if self.pat:
            v |= PAT_4K if level == 1 else PAT_LARGE
        if self.xd:
            if fmt is X86_32:
                raise ValueError("32-bit paging has no execute-disable (XD) bit")
            v |= XD
        if fmt is X86_32:
            if self.large:
                if self.address >= 1 << 40:
                    raise ValueError(f"a 4 MiB page at {self.address:#x} is beyond PSE-36's 40-bit reach")
                v |= (self.address & 0xFFC00000) | ((self.address >> 32) & 0xFF) << 13
            else:
                if self.address >= 1 << 32:
                    raise ValueError(f"a 32-bit {name} cannot point above 4 GiB ({self.address:#x})")
                v |= self.address
        else:
            if self.address >= 1 << 52:
                raise ValueError(f"{name} address {self.address:#x} is beyond 52 bits")
            v |= self.address
        return v

    @classmethod
    def decode(cls, value: int, fmt: Format = LONG4, level: int = 1, *, pse: bool = True) -> X86Entry:
        large = level > 1 and bool(value & PS) and level in fmt.leaf_levels and not (fmt is PAE and level == 3)
        if fmt is X86_32 and large and not pse:
            large = False
        leaf = level == 1 or large
        if fmt is X86_32:
            address = ((value & 0xFFC00000) | ((value >> 13) & 0xFF) << 32) if large else value & 0xFFFFF000
        else:
            address = value & _bits(51, 12)
            if large:
                address &= ~(fmt.page_size(level) - 1)
        return cls(
            address=address,
            present=bool(value & P),
            write=bool(value & RW),
            user=bool(value & US),
            pwt=bool(value & PWT),
            pcd=bool(value & PCD),
            accessed=bool(value & A),
            dirty=leaf and bool(value & D),
            large=large,
            global_=leaf and bool(value & G),
            pat=leaf and bool(value & (PAT_4K if level == 1 else PAT_LARGE)),
            xd=fmt is not X86_32 and bool(value & XD),
        )

    @property
    def pat_index(self) -> int:
        return (4 if self.pat else 0) | (2 if self.pcd else 0) | (1 if self.pwt else 0)


@dataclass(frozen=True)
class EptEntry:
    """One EPT paging-structure entry (SDM Vol. 3C Tables 29-1 .. 29-6).

    ``memory_type`` and ``ignore_pat`` belong to leaves only (bits 6:3 are reserved in a non-leaf
    entry); ``user_execute`` (bit 10) matters only with mode-based execute control."""

    address: int = 0
    read: bool = False
    write: bool = False
    execute: bool = False
    memory_type: int = UC
    ignore_pat: bool = False
    large: bool = False
    accessed: bool = False
    dirty: bool = False
    user_execute: bool = False
    suppress_ve: bool = False

    def encode(self, level: int = 1) -> int:
        name = EPT4.entry_name(level)
        if self.large and level not in (2, 3):
            raise ValueError(f"an {name} cannot map a large page (bit 7)")
        leaf = level == 1 or self.large
        size = EPT4.page_size(level) if leaf else PAGE_SIZE
        if self.address % size or self.address >= 1 << 52:
            raise ValueError(f"{name} address {self.address:#x} is not {size:#x}-aligned below 2^52")
        if leaf:
            if self.memory_type not in EPT_MEMORY_TYPES:
                raise ValueError(f"{name} memory type {self.memory_type} (bits 5:3) is reserved: use one of "
                                 f"{', '.join(f'{t} ({MEMORY_TYPE_NAMES[t]})' for t in EPT_MEMORY_TYPES)}")
        elif self.memory_type or self.ignore_pat or self.dirty:
            raise ValueError(f"memory type, ignore-PAT and dirty belong to leaves; bits 6:3 of a non-leaf {name} are reserved")
        v = self.address | (EPT_R if self.read else 0) | (EPT_W if self.write else 0) | (EPT_X if self.execute else 0)
        if leaf:
            v |= self.memory_type << EPT_MT_SHIFT | (EPT_IPAT if self.ignore_pat else 0)
        v |= (EPT_LARGE if self.large else 0) | (EPT_A if self.accessed else 0) | (EPT_D if self.dirty else 0)
        v |= (EPT_XU if self.user_execute else 0) | (EPT_SUPPRESS_VE if self.suppress_ve else 0)
        return v

    @classmethod
    def decode(cls, value: int, level: int = 1) -> EptEntry:
        large = level in (2, 3) and bool(value & EPT_LARGE)
        leaf = level == 1 or large
        address = value & _bits(51, 12)
        if large:
            address &= ~(EPT4.page_size(level) - 1)
        return cls(
            address=address,
            read=bool(value & EPT_R),
            write=bool(value & EPT_W),
            execute=bool(value & EPT_X),
            memory_type=(value >> EPT_MT_SHIFT) & 7 if leaf else 0,
            ignore_pat=leaf and bool(value & EPT_IPAT),
            large=large,
            accessed=bool(value & EPT_A),
            dirty=leaf and bool(value & EPT_D),
            user_execute=bool(value & EPT_XU),
            suppress_ve=bool(value & EPT_SUPPRESS_VE),
        )


@dataclass(frozen=True)
class Eptp:
    """The EPT pointer (SDM Vol. 3C 25.6.11): root, walk length, paging-structure memory type, A/D."""

    root: int
    levels: int = 4
    memory_type: int = WB
    ad: bool = False

    def encode(self, maxphyaddr: int = 52) -> int:
        if self.root % PAGE_SIZE or self.root < 0:
            raise ValueError(f"EPTP root {self.root:#x} is not 4 KiB aligned")
        if self.levels not in (4, 5):
            raise ValueError(f"EPT walks are 4 or 5 levels long, not {self.levels}")
        value = self.root | self.memory_type | (self.levels - 1) << EPTP_WALK_SHIFT | (EPTP_AD if self.ad else 0)
        Eptp.decode(value, maxphyaddr)  # the same checks, one place
        return value

    @classmethod
    def decode(cls, value: int, maxphyaddr: int = 52) -> Eptp:
        """Raise ValueError naming the field VM entry would reject (SDM Vol. 3C 27.2.1.1)."""
        memory_type = value & EPTP_MT_MASK
        if memory_type not in (UC, WB):
            raise ValueError(f"EPTP {value:#x}: bits 2:0 (memory type) = {memory_type}: must be 0 (UC) or 6 (WB)")
        walk = (value & EPTP_WALK_MASK) >> EPTP_WALK_SHIFT
        if walk not in (3, 4):
            raise ValueError(f"EPTP {value:#x}: bits 5:3 (page-walk length - 1) = {walk}: must be 3 (4-level) or 4 (5-level)")
        reserved = value & (_bits(11, 7) | _bits(63, maxphyaddr))
        if reserved:
            raise ValueError(f"EPTP {value:#x}: reserved {_bit_text(reserved)} set (11:7, or at/above MAXPHYADDR {maxphyaddr})")
        return cls(root=value & _bits(maxphyaddr - 1, 12), levels=walk + 1, memory_type=memory_type, ad=bool(value & EPTP_AD))


# =================================================================================================
# Physical memory and frame allocation
# =================================================================================================


@runtime_checkable
class PhysicalMemory(Protocol):
    """A physical address space the walkers read (and the builders write), little-endian."""

    def read_u32(self, address: int) -> int: ...

    def read_u64(self, address: int) -> int: ...

    def write_u32(self, address: int, value: int) -> None: ...

    def write_u64(self, address: int, value: int) -> None: ...


class SparseMemory:
    """Physical memory as a dict of 4 KiB pages; a page never written reads as zeros.

    ``SparseMemory({gpa: bytes, ...})`` starts from table images such as
    ``pykvm.x86.modes.system_tables()``."""

    def __init__(self, contents: dict[int, bytes] | None = None):
        self._pages: dict[int, bytearray] = {}
        for address, data in (contents or {}).items():
            self.write(address, data)

    def _span(self, address: int, size: int) -> Iterator[tuple[int, int, int]]:
        if address < 0 or size < 0:
            raise ValueError(f"negative physical address or size ({address:#x}, {size})")
        end = address + size
        while address < end:
            page = address & ~(PAGE_SIZE - 1)
            chunk = min(end, page + PAGE_SIZE) - address
            yield page, address - page, chunk
            address += chunk

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        for page, offset, chunk in self._span(address, size):
            data = self._pages.get(page)
            out += data[offset : offset + chunk] if data is not None else bytes(chunk)
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        done = 0
        for page, offset, chunk in self._span(address, len(data)):
            self._pages.setdefault(page, bytearray(PAGE_SIZE))[offset : offset + chunk] = data[done : done + chunk]
            done += chunk

    def read_u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    def read_u64(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value))

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def pages(self) -> dict[int, bytes]:
        """Every page written so far: {page address: 4096 bytes}."""
        return {page: bytes(data) for page, data in sorted(self._pages.items())}


class GuestMemoryAdapter:
    """:class:`PhysicalMemory` over pykvm's ``GuestMemory`` (or anything with its read/write methods).

    Reads of guest-physical addresses no memory slot backs raise that object's error
    (``GuestMemoryError``): a table outside RAM is a host-side problem, not a guest fault."""

    def __init__(self, memory):
        self.memory = memory

    def read_u32(self, address: int) -> int:
        return self.memory.read_u32(address)

    def read_u64(self, address: int) -> int:
        return self.memory.read_u64(address)

    def write_u32(self, address: int, value: int) -> None:
        self.memory.write(address, struct.pack("<I", value))

    def write_u64(self, address: int, value: int) -> None:
        self.memory.write_u64(address, value)

    def write(self, address: int, data: bytes) -> None:
        self.memory.write(address, data)


def _zero_page(memory, address: int) -> None:
    write = getattr(memory, "write", None)
    if write is not None:
        write(address, bytes(PAGE_SIZE))
    else:
        for offset in range(0, PAGE_SIZE, 8):
            memory.write_u64(address + offset, 0)


class FrameAllocator:
    """Hands out zeroed 4 KiB frames, in order, from ``[base, base + size)`` of ``memory``."""

    def __init__(self, memory: PhysicalMemory, base: int, size: int):
        if base % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or base < 0:
            raise ValueError(f"table space base={base:#x} size={size:#x}: both must be 4 KiB multiples, size > 0")
        self.memory, self.base, self.end = memory, base, base + size
        self.frames: list[int] = []

    def alloc(self) -> int:
        address = self.base + len(self.frames) * PAGE_SIZE
        if address >= self.end:
            raise ValueError(f"table space {self.base:#x}-{self.end:#x} is full ({len(self.frames)} frames)")
        _zero_page(self.memory, address)
        self.frames.append(address)
        return address


# =================================================================================================
# Builders
# =================================================================================================


@dataclass(frozen=True)
class Extent:
    """``size`` bytes of addresses from ``va`` mapped to ``pa`` with one set of permissions.

    For guest (and NPT) tables ``va`` is linear (guest-physical for NPT) and ``pa`` physical; for
    EPT ``va`` is guest-physical and ``pa`` host-physical. x86 tables use write, user, execute,
    global_ and pat_index (PAT:PCD:PWT); EPT uses read, write, execute, user_execute,
    memory_type and ignore_pat."""

    va: int
    pa: int
    size: int
    write: bool = True
    user: bool = True
    execute: bool = True
    global_: bool = False
    pat_index: int = 0
    read: bool = True
    user_execute: bool = False
    memory_type: int = WB
    ignore_pat: bool = False

    def __str__(self) -> str:
        return f"extent va={self.va:#x} pa={self.pa:#x} size={self.size:#x}"


def extents_from_slots(regions: Iterable, hpa: Callable[[object], int] | None = None, **permissions) -> list[Extent]:
    """EPT/NPT extents for memory slots (objects with ``gpa``, ``size`` and optionally ``readonly``).

    ``hpa(region)`` gives each slot's host-physical base (default: identity, gpa = hpa)."""
    out = []
    for region in regions:
        base = region.gpa if hpa is None else hpa(region)
        perms = {"write": not getattr(region, "readonly", False), "user": True, **permissions}
        out.append(Extent(region.gpa, base, region.size, **perms))
    return out


class TableBuilder:
    """Builds one set of page tables (``fmt``) in ``memory``, table frames from ``allocator``.

    :meth:`map` takes extents and picks the largest page each aligned piece allows (4 KiB,
    2 MiB, 1 GiB; 4 MiB in 32-bit paging), limited to ``page_sizes`` if given. Non-leaf entries
    grant everything (P|RW|US, or R|W|X for EPT); the leaf carries the extent's permissions. A
    misaligned, overlapping or out-of-range extent raises ValueError naming the extent.

    Without ``memory`` a :class:`SparseMemory` is made; without ``allocator`` frames come from
    ``[16 MiB, 32 MiB)`` of that memory."""

    DEFAULT_TABLE_BASE = 16 * MiB
    DEFAULT_TABLE_SPACE = 16 * MiB

    def __init__(self, fmt: Format, memory: PhysicalMemory | None = None, allocator: FrameAllocator | None = None, *,
                 page_sizes: Iterable[int] | None = None, maxphyaddr: int = 52, nxe: bool = True, mbec: bool = False,
                 execute_only: bool = True):
        self.fmt = fmt
        self.memory = memory if memory is not None else SparseMemory()
        if allocator is None:
            allocator = FrameAllocator(self.memory, self.DEFAULT_TABLE_BASE, self.DEFAULT_TABLE_SPACE)
        self.allocator = allocator
        sizes = tuple(page_sizes) if page_sizes is not None else fmt.page_sizes
        bad = [s for s in sizes if s not in fmt.page_sizes]
        if bad or not sizes:
            raise ValueError(f"{fmt} pages are {', '.join(hex(s) for s in fmt.page_sizes)} bytes, not {bad or 'none'}")
        self.page_sizes = tuple(sorted(set(sizes), reverse=True))
        self.maxphyaddr, self.nxe, self.mbec, self.execute_only = maxphyaddr, nxe, mbec, execute_only
        self.extents: list[Extent] = []
        self.root = allocator.alloc()
        if (fmt.entry_size == 4 or fmt is PAE) and self.root >= 1 << 32:
            raise ValueError(f"a {fmt} root must be below 4 GiB (CR3 is 32 bits), not {self.root:#x}")

    # ---- what points at the tables ----------------------------------------------------------------
    @property
    def frames(self) -> list[int]:
        return list(self.allocator.frames)

    @property
    def cr3(self) -> int:
        if self.fmt.ept:
            raise ValueError("EPT tables are found through an EPTP, not CR3 (use eptp())")
        return self.root

    def eptp(self, memory_type: int = WB, ad: bool = False) -> int:
        if not self.fmt.ept:
            raise ValueError(f"{self.fmt} tables are not EPT tables")
        return Eptp(self.root, self.fmt.levels, memory_type, ad).encode(self.maxphyaddr)

    def context(self, **options) -> PagingContext:
        """A :class:`PagingContext` for walking these (guest) tables: CR3 = root."""
        return PagingContext(self.fmt, self.cr3, maxphyaddr=self.maxphyaddr, nxe=self.nxe, **options)

    # ---- mapping ----------------------------------------------------------------------------------
    def _check(self, e: Extent) -> None:
        fmt = self.fmt
        for name in ("va", "pa", "size"):
            value = getattr(e, name)
            if value % PAGE_SIZE or value < 0:
                raise ValueError(f"{e}: {name} is not a non-negative multiple of 4 KiB")
        if e.size == 0:
            raise ValueError(f"{e}: size is 0")
        if fmt.ept or fmt.entry_size == 4 or fmt is PAE:
            if e.va + e.size > 1 << fmt.address_bits:
                raise ValueError(f"{e}: va range ends beyond the {fmt.address_bits}-bit space of {fmt} tables")
        else:
            if e.va + e.size > 1 << 64:
                raise ValueError(f"{e}: va range ends beyond 2^64")
            if not (_canonical(fmt, e.va) and _canonical(fmt, e.va + e.size - 1)) or (e.va >> 63) != ((e.va + e.size - 1) >> 63):
                raise ValueError(f"{e}: va range is not canonical for {fmt} paging (bits 63:{fmt.address_bits - 1} must be equal)")
        limit = min(self.maxphyaddr, 40 if fmt is X86_32 else 52)
        if e.pa + e.size > 1 << limit:
            raise ValueError(f"{e}: pa range ends beyond MAXPHYADDR ({limit} bits)")
        if fmt.ept:
            if e.write and not e.read:
                raise ValueError(f"{e}: write without read is an EPT misconfiguration")
            if e.execute and not (e.read or e.write) and not self.execute_only:
                raise ValueError(f"{e}: execute-only EPT pages need execute-only support (execute_only=True)")
            if not (e.read or e.write or e.execute or (self.mbec and e.user_execute)):
                raise ValueError(f"{e}: grants no access at all (an EPT entry with R=W=X=0 is not present)")
            if e.memory_type not in EPT_MEMORY_TYPES:
                raise ValueError(f"{e}: memory_type {e.memory_type} is reserved in EPT (bits 5:3 may be 0, 1, 4, 5, 6)")
        else:
            if not e.execute and (fmt is X86_32 or not self.nxe):
                raise ValueError(f"{e}: execute=False needs the XD bit: not in 32-bit paging, and only with EFER.NXE")
            if not 0 <= e.pat_index <= 7:
                raise ValueError(f"{e}: pat_index {e.pat_index} is not 0..7 (PAT:PCD:PWT)")
        for other in self.extents:
            if e.va < other.va + other.size and other.va < e.va + e.size:
                raise ValueError(f"{e} overlaps {other} (va ranges)")

    def map(self, extent: Extent) -> TableBuilder:
        """Map one extent (see the class docstring). Returns self, to chain."""
        self._check(extent)
        va, pa, left = extent.va, extent.pa, extent.size
        while left:
            for size in self.page_sizes:
                if va % size == 0 and pa % size == 0 and left >= size:
                    break
            else:
                raise ValueError(f"{extent}: no allowed page size ({', '.join(hex(s) for s in self.page_sizes)}) "
                                 f"fits va {va:#x} / pa {pa:#x} with {left:#x} bytes left")
            level = next(lv for lv in self.fmt.leaf_levels if self.fmt.page_size(lv) == size)
            if self.fmt is X86_32 and level == 1 and pa >= 1 << 32:
                raise ValueError(f"{extent}: 4 KiB pages above 4 GiB cannot be mapped by 32-bit paging (pa {pa:#x})")
            self._set_leaf(va, pa, level, extent)
            va, pa, left = va + size, pa + size, left - size
        self.extents.append(extent)
        return self

    def map_range(self, va: int, pa: int, size: int, **permissions) -> TableBuilder:
        return self.map(Extent(va, pa, size, **permissions))

    def map_all(self, extents: Iterable[Extent]) -> TableBuilder:
        for e in extents:
            self.map(e)
        return self

    def _read(self, address: int) -> int:
        return self.memory.read_u32(address) if self.fmt.entry_size == 4 else self.memory.read_u64(address)

    def _write(self, address: int, value: int) -> None:
        if self.fmt.entry_size == 4:
            self.memory.write_u32(address, value)
        else:
            self.memory.write_u64(address, value)

    def _pointer(self, level: int, table: int) -> int:
        if self.fmt.ept:
            return EptEntry(table, read=True, write=True, execute=True, user_execute=self.mbec).encode(level)
        if self.fmt is PAE and level == 3:
            return X86Entry(table).encode(PAE, 3)
        return X86Entry(table, write=True, user=True).encode(self.fmt, level)

    def _leaf(self, level: int, pa: int, e: Extent) -> int:
        large = level > 1
        if self.fmt.ept:
            return EptEntry(pa, read=e.read, write=e.write, execute=e.execute, memory_type=e.memory_type,
                            ignore_pat=e.ignore_pat, large=large, user_execute=e.user_execute).encode(level)
        return X86Entry(pa, write=e.write, user=e.user, pwt=bool(e.pat_index & 1), pcd=bool(e.pat_index & 2),
                        pat=bool(e.pat_index & 4), large=large, global_=e.global_, xd=not e.execute).encode(self.fmt, level)

    def _set_leaf(self, va: int, pa: int, level: int, e: Extent) -> None:
        fmt, table = self.fmt, self.root
        for lv in range(fmt.levels, level, -1):
            slot = table + fmt.index(va, lv) * fmt.entry_size
            entry = self._read(slot)
            present = entry & 7 if fmt.ept else entry & P
            if not present:
                child = self.allocator.alloc()
                if fmt.entry_size == 4 and child >= 1 << 32:
                    raise ValueError(f"table frame {child:#x} is above 4 GiB: 32-bit paging cannot point at it")
                self._write(slot, self._pointer(lv, child))
                table = child
                continue
            if lv in fmt.leaf_levels[:-1] and entry & PS and not (fmt is PAE and lv == 3):
                raise ValueError(f"{e}: {fmt.entry_name(lv)} for va {va:#x} already maps a large page")
            table = (entry & 0xFFFFF000) if fmt.entry_size == 4 else entry & _bits(51, 12)
        slot = table + fmt.index(va, level) * fmt.entry_size
        if self._read(slot):
            raise ValueError(f"{e}: {fmt.entry_name(level)} for va {va:#x} is already in use")
        self._write(slot, self._leaf(level, pa, e))


def build_tables(fmt: Format, extents: Iterable[Extent], memory: PhysicalMemory | None = None,
                 allocator: FrameAllocator | None = None, **options) -> TableBuilder:
    """``TableBuilder(fmt, memory, allocator, **options).map_all(extents)``."""
    return TableBuilder(fmt, memory, allocator, **options).map_all(extents)


# =================================================================================================
# Walk inputs and results
# =================================================================================================


@dataclass(frozen=True)
class PagingContext:
    """The guest state a linear-address walk depends on: the mode and CR0/CR3/CR4/EFER bits.

    ``fmt`` None means paging is off (linear = physical). ``pdptes`` are PAE's four PDPTE
    registers; None loads them from memory at CR3 (not counted as walk references)."""

    fmt: Format | None
    cr3: int = 0
    wp: bool = True
    nxe: bool = True
    pse: bool = True
    smep: bool = False
    smap: bool = False
    maxphyaddr: int = 52
    gbpages: bool = True
    pat: int = DEFAULT_PAT
    pdptes: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        if self.fmt is not None and self.fmt.ept:
            raise ValueError(f"{self.fmt} tables are nested tables: walk them with Ept(...), not a PagingContext")

    @property
    def root(self) -> int:
        if self.fmt is X86_32:
            return self.cr3 & 0xFFFFF000
        if self.fmt is PAE:
            return self.cr3 & 0xFFFFFFE0
        return self.cr3 & _address_mask(self.maxphyaddr)


@dataclass(frozen=True)
class Ept:
    """Nested translation by EPT: the EPTP and the VMX capabilities the walk depends on."""

    eptp: int
    mbec: bool = False  # mode-based execute control (secondary control bit 22)
    execute_only: bool = True  # IA32_VMX_EPT_VPID_CAP[0]
    gbpages: bool = True  # IA32_VMX_EPT_VPID_CAP[17]: 1 GiB EPT pages
    maxphyaddr: int = 52

    @property
    def pointer(self) -> Eptp:
        return Eptp.decode(self.eptp, self.maxphyaddr)

    @property
    def fmt(self) -> Format:
        return _long_format(self.pointer.levels, ept=True)

    @property
    def root(self) -> int:
        return self.pointer.root


@dataclass(frozen=True)
class Npt:
    """Nested translation by AMD NPT: nCR3 and the host paging settings (long mode, 4 or 5 levels)."""

    ncr3: int
    levels: int = 4
    nxe: bool = True
    gbpages: bool = True
    maxphyaddr: int = 52

    @property
    def fmt(self) -> Format:
        return _long_format(self.levels)

    @property
    def root(self) -> int:
        return self.ncr3 & _address_mask(self.maxphyaddr)


Nested = Union[Ept, Npt]


@dataclass(frozen=True)
class Permissions:
    """Effective rights of a translation. x86: read is always True, ``user`` = U/S set at every
    level. EPT: read/write/execute and ``user_execute`` (bit 10) ANDed across the levels."""

    read: bool = True
    write: bool = False
    execute: bool = False
    user: bool = False
    user_execute: bool = False


@dataclass(frozen=True)
class MemoryReference:
    """One paging-structure entry read during a walk.

    ``dimension`` is GUEST (a guest paging-structure entry) or NESTED (an EPT/NPT entry);
    ``level`` is that entry's level (5 = PML5E .. 1 = PTE); ``address`` the physical address
    read (host-physical in a 2-D walk); ``step`` the guest level this reference serves (the
    guest entry of that level, or the nested walk that translates its table) with 0 for the
    final guest-physical address; ``gpa`` the guest-physical address of the guest entry, or the
    one the nested walk translates."""

    dimension: str
    level: int
    address: int
    value: int
    step: int
    gpa: int | None = None


@dataclass(frozen=True, kw_only=True)
class Fault:
    """Why a walk stopped. ``reason`` names the entry and the field at fault."""

    reason: str
    level: int | None = None
    kind: ClassVar[str] = "fault"

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class PageFault(Fault):
    """A guest #PF (vector 14): CR2 = ``address``, with the error code the CPU pushes."""

    address: int
    error_code: int
    kind: ClassVar[str] = "#PF"
    vector: ClassVar[int] = 14


@dataclass(frozen=True, kw_only=True)
class GeneralProtection(Fault):
    """#GP (vector 13): a non-canonical address, or PAE PDPTEs with reserved bits (MOV to CR3)."""

    address: int
    kind: ClassVar[str] = "#GP"
    vector: ClassVar[int] = 13


@dataclass(frozen=True, kw_only=True)
class EptViolation(Fault):
    """VM exit 48: the guest-physical address, the exit qualification and the linear address."""

    gpa: int
    exit_qualification: int
    gla: int | None = None
    kind: ClassVar[str] = "EPT violation"
    exit_reason: ClassVar[int] = 48


@dataclass(frozen=True, kw_only=True)
class EptMisconfig(Fault):
    """VM exit 49: an EPT entry that is present but malformed (no exit qualification)."""

    gpa: int
    entry: int
    kind: ClassVar[str] = "EPT misconfiguration"
    exit_reason: ClassVar[int] = 49


@dataclass(frozen=True, kw_only=True)
class NestedPageFault(Fault):
    """#VMEXIT(NPF) (0x400): EXITINFO1 = #PF-style error code | bit 32/33, EXITINFO2 = the gPA."""

    exitinfo1: int
    exitinfo2: int
    kind: ClassVar[str] = "#NPF"
    exit_code: ClassVar[int] = 0x400


@dataclass(frozen=True)
class Walk:
    """The result of a walk. ``fault`` is None when it translated.

    ``address`` is the final physical address (host-physical in a 2-D walk); ``gpa`` the
    guest-physical one; ``page_size`` the guest page size and ``nested_page_size`` that of the
    nested leaf. ``updates`` lists the accessed/dirty writes made: (address, old, new)."""

    va: int
    address: int | None = None
    gpa: int | None = None
    page_size: int | None = None
    nested_page_size: int | None = None
    permissions: Permissions | None = None
    nested_permissions: Permissions | None = None
    memory_type: int | None = None
    pat_index: int | None = None
    references: tuple[MemoryReference, ...] = ()
    updates: tuple[tuple[int, int, int], ...] = ()
    fault: Fault | None = None

    @property
    def ok(self) -> bool:
        return self.fault is None

    @property
    def reference_count(self) -> int:
        return len(self.references)


def walk_reference_count(guest_levels: int, nested_levels: int | None = None) -> int:
    """Memory references of an uncached walk: ``guest_levels`` alone (1-D), or, under nested
    tables of ``nested_levels``, (n+1)(m+1)-1: each of the n guest entries costs a nested walk of
    its table's gPA (m references) plus its own read, and the final gPA costs one more nested walk.

    24 for 4 under 4 (Bhargava et al., ASPLOS 2008), 35 for 5 under 5 (the same count; the figure
    cited from Intel's 5-level paging white paper). The count is symmetric in n and m. A PAE
    guest walks 2 levels from memory (its PDPTEs are registers); guest_levels = 0 is an unpaged
    guest, whose only cost is the nested walk of each access."""
    for name, value in (("guest_levels", guest_levels), ("nested_levels", nested_levels)):
        if value is None and name == "nested_levels":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not (0 if name == "guest_levels" else 1) <= value <= 5:
            raise ValueError(f"{name} must be an int in {'0' if name == 'guest_levels' else '1'}..5, not {value!r}")
    if nested_levels is None:
        return guest_levels
    return (guest_levels + 1) * (nested_levels + 1) - 1


# =================================================================================================
# Caches (Bhargava et al., ASPLOS 2008: page-walk cache, nested TLB, nested page-walk cache)
# =================================================================================================


@dataclass
class _NestedCached:
    page: int  # host-physical 4 KiB frame of the gPA's page
    size: int
    perms: Permissions
    memory_type: int | None
    ignore_pat: bool
    pat_index: int | None
    dirty: bool


class WalkCaches:
    """The caches a 2-D walker consults, after Bhargava et al. (ASPLOS 2008):

    * ``pwc``: a page-walk cache of guest non-leaf entries, keyed by the linear-address bits that
      select them (as Intel's paging-structure caches); a hit at level L skips guest levels
      top..L and their nested walks.
    * ``ntlb``: a nested TLB, guest-physical 4 KiB page -> host-physical page and rights; a hit
      costs no nested reference.
    * ``nested_pwc``: a page-walk cache of nested non-leaf entries keyed by guest-physical bits.

    Each can be turned off. ``hits``/``misses`` count lookups per cache. Caches hold only what
    successful walks saw; nothing here models invalidation (``flush()`` empties all)."""

    def __init__(self, *, pwc: bool = True, ntlb: bool = True, nested_pwc: bool = True):
        self.pwc: dict | None = {} if pwc else None
        self.ntlb: dict | None = {} if ntlb else None
        self.nested_pwc: dict | None = {} if nested_pwc else None
        self.hits = {"pwc": 0, "ntlb": 0, "nested_pwc": 0}
        self.misses = {"pwc": 0, "ntlb": 0, "nested_pwc": 0}

    def flush(self) -> None:
        for cache in (self.pwc, self.ntlb, self.nested_pwc):
            if cache is not None:
                cache.clear()


# =================================================================================================
# Reserved bits and misconfigurations
# =================================================================================================


def _x86_reserved(fmt: Format, level: int, v: int, *, maxphyaddr: int, nxe: bool, pse: bool, gbpages: bool) -> tuple[int, str] | None:
    """(reserved bits set, why) for an x86 entry that is present, or None (SDM Vol. 3A 4.3-4.5)."""
    checks: list[tuple[int, str]] = []
    if fmt is X86_32:
        if level == 2 and pse and v & PS:
            m = min(maxphyaddr, 40)
            checks.append((1 << 21, "bit 21 of a 4 MiB PDE is reserved"))
            checks.append((_bits(20, 13 + m - 32), f"PDE address bits above MAXPHYADDR ({m})"))
    elif fmt is PAE:
        if level == 3:
            checks.append((PAE_PDPTE_RESERVED, "bits 2:1 and 8:5 of a PAE PDPTE are reserved"))
            checks.append((_bits(63, min(maxphyaddr, 52)), f"bits 63:{min(maxphyaddr, 52)} (above MAXPHYADDR) of a PAE PDPTE"))
        else:
            checks.append((_bits(62, min(maxphyaddr, 52)), f"bits 62:{min(maxphyaddr, 52)} (above MAXPHYADDR) are reserved in PAE paging"))
            if not nxe:
                checks.append((XD, "bit 63 (XD) is reserved with EFER.NXE = 0"))
            if level == 2 and v & PS:
                checks.append((_bits(20, 13), "bits 20:13 of a 2 MiB PDE are reserved"))
    else:
        if maxphyaddr < 52:
            checks.append((_bits(51, maxphyaddr), f"bits 51:{maxphyaddr} (above MAXPHYADDR) are reserved"))
        if not nxe:
            checks.append((XD, "bit 63 (XD) is reserved with EFER.NXE = 0"))
        if level >= 4:
            checks.append((PS, f"bit 7 (PS) of a {fmt.entry_name(level)} is reserved"))
        elif level == 3 and v & PS:
            if not gbpages:
                checks.append((PS, "bit 7 (PS) of a PDPTE is reserved: 1 GiB pages not offered (CPUID 0x80000001 EDX[26] = 0)"))
            else:
                checks.append((_bits(29, 13), "bits 29:13 of a 1 GiB PDPTE are reserved"))
        elif level == 2 and v & PS:
            checks.append((_bits(20, 13), "bits 20:13 of a 2 MiB PDE are reserved"))
    for mask, why in checks:
        if v & mask:
            return v & mask, why
    return None


def _ept_problem(v: int, level: int, ept: Ept) -> str | None:
    """Why a present EPT entry is a misconfiguration (SDM Vol. 3C 29.3.3.1), or None."""
    if v & EPT_W and not v & EPT_R:
        return "bit 1 (W) set with bit 0 (R) clear: write-only"
    if (v & 7) == EPT_X and not ept.execute_only:
        return "execute-only (bits 2:0 = 100) without execute-only support (IA32_VMX_EPT_VPID_CAP[0])"
    checks: list[tuple[int, str]] = []
    if ept.maxphyaddr < 52:
        checks.append((_bits(51, ept.maxphyaddr), f"bits 51:{ept.maxphyaddr} (above MAXPHYADDR) are reserved"))
    large = v & EPT_LARGE
    if level >= 4:
        checks.append((_bits(7, 3), f"bits 7:3 of an {EPT4.entry_name(level)} are reserved"))
    elif level == 3 and large:
        if not ept.gbpages:
            checks.append((EPT_LARGE, "bit 7 of an EPT PDPTE is reserved: 1 GiB EPT pages not supported"))
        else:
            checks.append((_bits(29, 12), "bits 29:12 of a 1 GiB EPT PDPTE are reserved"))
    elif level == 2 and large:
        checks.append((_bits(20, 12), "bits 20:12 of a 2 MiB EPT PDE are reserved"))
    elif level in (2, 3):
        checks.append((_bits(6, 3), f"bits 6:3 of a non-leaf {EPT4.entry_name(level)} are reserved"))
    for mask, why in checks:
        if v & mask:
            return f"{_bit_text(v & mask)} set: {why}"
    leaf = level == 1 or (level in (2, 3) and large)
    if leaf:
        mt = (v >> EPT_MT_SHIFT) & 7
        if mt not in EPT_MEMORY_TYPES:
            return f"bits 5:3 (memory type) = {mt}: reserved"
    return None


def _ept_present(v: int, mbec: bool) -> bool:
    return bool(v & 7) or (mbec and bool(v & EPT_XU))


def effective_memory_type(ept_type: int, ignore_pat: bool, pat_type: int) -> int | None:
    """The memory type an EPT leaf and the guest's PAT type give (SDM Vol. 3C 29.3.7.2, the EPT
    type standing in for the MTRR type of Vol. 3A Table 12-7). Only the unambiguous cells are
    modelled: ignore-PAT, PAT UC and WC, EPT WB (PAT wins, UC- -> UC) and EPT UC; else None."""
    if ignore_pat:
        return ept_type
    if pat_type == UC:
        return UC
    if pat_type == WC:
        return WC
    if ept_type == WB:
        return UC if pat_type == UC_MINUS else pat_type
    if ept_type == UC:
        return UC
    return None


# =================================================================================================
# The walkers
# =================================================================================================


@dataclass
class _X86Leaf:
    pa: int
    level: int
    size: int
    perms: Permissions
    pat_index: int
    used: list[tuple[int, int, int]]  # (entry address, value, level) of the entries read, top first


@dataclass
class _X86Stop:
    error_code: int
    level: int | None
    reason: str


@dataclass
class _NestedLeaf:
    hpa: int
    size: int
    perms: Permissions
    memory_type: int | None  # EPT leaf memory type (None for NPT)
    ignore_pat: bool
    pat_index: int | None  # NPT leaf PAT index (None for EPT)


def _x86_walk(fmt: Format, root: int, va: int, read_entry, *, write: bool, user: bool, fetch: bool, wp: bool,
              nxe: bool, pse: bool, smep: bool, smap: bool, maxphyaddr: int, gbpages: bool,
              pdptes=None, pwc: dict | None = None, pwc_key=None, caches: WalkCaches | None = None, pwc_name: str = "pwc"):
    """Walk x86 tables for ``va``. ``read_entry(level, entry address)`` returns (value, where) or a
    Fault (a nested fault stops the walk). Returns _X86Leaf, _X86Stop (a #PF) or a Fault."""
    access = (PF_W if write else 0) | (PF_U if user else 0)
    if fetch and ((nxe and fmt is not X86_32) or smep):
        access |= PF_ID
    writable, usable, no_exec = True, True, False
    used: list[tuple[int, int, int]] = []
    level, table = fmt.levels, root
    if fmt is PAE:
        v = pdptes[(va >> 30) & 3]
        if not v & P:
            return _X86Stop(access, 3, f"PDPTE[{(va >> 30) & 3}] (PAE register) = {v:#x} is not present")
        table, level = v & _address_mask(maxphyaddr), 2
    if pwc is not None:
        for lv in range(2, level + 1):
            key = (pwc_key, lv, va >> fmt.shift(lv))
            hit = pwc.get(key)
            if hit is not None:
                caches.hits[pwc_name] += 1
                table, (writable, usable, no_exec) = hit
                level = lv - 1
                break
        else:
            caches.misses[pwc_name] += 1
    while True:
        index = fmt.index(va, level)
        name = f"{fmt.entry_name(level)}[{index}]"
        got = read_entry(level, table + index * fmt.entry_size)
        if isinstance(got, Fault):
            return got
        v, where = got
        if not v & P:
            return _X86Stop(access, level, f"{name} at {where:#x} = {v:#x} is not present (for va {va:#x})")
        bad = _x86_reserved(fmt, level, v, maxphyaddr=maxphyaddr, nxe=nxe, pse=pse, gbpages=gbpages)
        if bad:
            return _X86Stop(access | PF_P | PF_RSVD, level, f"{name} at {where:#x} = {v:#x}: {_bit_text(bad[0])} set; {bad[1]}")
        writable &= bool(v & RW)
        usable &= bool(v & US)
        no_exec |= fmt is not X86_32 and nxe and bool(v & XD)
        used.append((where, v, level))
        large = level > 1 and bool(v & PS) and (fmt is not X86_32 or pse)
        if level == 1 or large:
            break
        next_table = (v & 0xFFFFF000) if fmt is X86_32 else v & _address_mask(maxphyaddr)
        if pwc is not None:
            pwc[(pwc_key, level, va >> fmt.shift(level))] = (next_table, (writable, usable, no_exec))
        table, level = next_table, level - 1
    size = fmt.page_size(level)
    entry = X86Entry.decode(v, fmt, level, pse=pse)
    pa = entry.address | (va & (size - 1))
    perms = Permissions(read=True, write=writable, execute=not no_exec, user=usable)
    why = None
    if user:
        if not usable:
            why = "a user-mode access to a supervisor page (U/S clear at some level)"
        elif write and not writable:
            why = "a user-mode write to a read-only page (R/W clear at some level)"
        elif fetch and no_exec:
            why = "an instruction fetch from an execute-disabled page (XD)"
    elif fetch:
        if no_exec:
            why = "an instruction fetch from an execute-disabled page (XD)"
        elif smep and usable:
            why = "a supervisor-mode fetch from a user page with CR4.SMEP = 1"
    else:
        if smap and usable:
            why = "a supervisor-mode data access to a user page with CR4.SMAP = 1 (RFLAGS.AC not modelled)"
        elif write and not writable and wp:
            why = "a supervisor-mode write to a read-only page with CR0.WP = 1"
    if why:
        return _X86Stop(access | PF_P, level, f"{why}: va {va:#x}, leaf {fmt.entry_name(level)} = {v:#x}")
    return _X86Leaf(pa, level, size, perms, entry.pat_index, used)


def _read_entry(memory: PhysicalMemory, address: int, size: int) -> int:
    return memory.read_u32(address) if size == 4 else memory.read_u64(address)


def _write_entry(memory: PhysicalMemory, address: int, size: int, value: int) -> None:
    if size == 4:
        memory.write_u32(address, value)
    else:
        memory.write_u64(address, value)


def _nested_translate(memory: PhysicalMemory, gpa: int, nested: Nested, *, write: bool, fetch: bool, user_address: bool,
                      step: int, final: bool, gla: int | None, refs: list, updates: list, caches: WalkCaches | None,
                      set_ad: bool, guest_structure: bool = False):
    """Translate ``gpa`` through EPT or NPT, appending NESTED references. Returns _NestedLeaf or a Fault."""
    if isinstance(nested, Ept):
        return _ept_translate(memory, gpa, nested, write=write, fetch=fetch, user_address=user_address, step=step,
                              final=final, gla=gla, refs=refs, updates=updates, caches=caches, set_ad=set_ad,
                              guest_structure=guest_structure)
    if isinstance(nested, Npt):
        return _npt_translate(memory, gpa, nested, write=write, fetch=fetch, step=step, final=final, refs=refs,
                              updates=updates, caches=caches, set_ad=set_ad)
    raise ValueError(f"nested must be an Ept or an Npt, not {nested!r}")


def _ntlb_lookup(caches: WalkCaches | None, key, write: bool, fetch: bool, ok: Callable[[Permissions], bool]):
    if caches is None or caches.ntlb is None:
        return None
    hit = caches.ntlb.get(key)
    if hit is None or not ok(hit.perms) or (write and not hit.dirty):
        caches.misses["ntlb"] += 1
        return None
    caches.hits["ntlb"] += 1
    return hit


def _ept_translate(memory, gpa, ept: Ept, *, write, fetch, user_address, step, final, gla, refs, updates, caches,
                   set_ad, guest_structure):
    pointer = ept.pointer
    fmt = _long_format(pointer.levels, ept=True)
    # SDM 29.3.5: with EPT A/D on, guest paging-structure accesses are writes; Table 28-7 then sets bits 0 and 1.
    if guest_structure:
        write = pointer.ad
        access = EQ_READ | (EQ_WRITE if pointer.ad else 0)
    else:
        access = EQ_FETCH if fetch else EQ_WRITE if write else EQ_READ
    where = (EQ_GLA_VALID | (EQ_FINAL if final else 0)) if gla is not None else 0
    need_xu = fetch and ept.mbec and user_address

    def allowed(p: Permissions) -> bool:
        if fetch:
            return p.user_execute if need_xu else p.execute
        return p.read and (p.write or not write)

    key = (pointer.root, gpa >> 12)
    hit = _ntlb_lookup(caches, ("ept",) + key, write, fetch, allowed)
    if hit is not None:
        return _NestedLeaf(hit.page | (gpa & 0xFFF), hit.size, hit.perms, hit.memory_type, hit.ignore_pat, None)

    def violation(r, w, x, xu, level, reason):
        qual = access | (EQ_READABLE if r else 0) | (EQ_WRITABLE if w else 0) | (EQ_EXECUTABLE if x else 0)
        if ept.mbec and xu:
            qual |= EQ_USER_EXECUTABLE
        return EptViolation(gpa=gpa, exit_qualification=qual | where, gla=gla, level=level, reason=reason)

    if gpa >> fmt.address_bits:
        return violation(False, False, False, False, None,
                         f"gpa {gpa:#x} is beyond the {fmt.address_bits}-bit guest-physical width of {pointer.levels}-level EPT")
    r = w = x = xu = True
    level, table = fmt.levels, pointer.root
    used: list[tuple[int, int, int]] = []
    pwc = caches.nested_pwc if caches is not None else None
    if pwc is not None:
        for lv in range(2, level + 1):
            hit_entry = pwc.get(("ept", pointer.root, lv, gpa >> fmt.shift(lv)))
            if hit_entry is not None:
                caches.hits["nested_pwc"] += 1
                table, (r, w, x, xu) = hit_entry
                level = lv - 1
                break
        else:
            caches.misses["nested_pwc"] += 1
    while True:
        index = fmt.index(gpa, level)
        address = table + index * 8
        v = memory.read_u64(address)
        refs.append(MemoryReference(NESTED, level, address, v, step, gpa))
        name = f"{fmt.entry_name(level)}[{index}] at {address:#x} = {v:#x}"
        r, w, x, xu = r and bool(v & EPT_R), w and bool(v & EPT_W), x and bool(v & EPT_X), xu and bool(v & EPT_XU)
        if not _ept_present(v, ept.mbec):
            return violation(r, w, x, xu, level, f"{name} is not present (gpa {gpa:#x})")
        problem = _ept_problem(v, level, ept)
        if problem:
            return EptMisconfig(gpa=gpa, entry=v, level=level, reason=f"{name}: {problem}")
        used.append((address, v, level))
        if level == 1 or (level in (2, 3) and v & EPT_LARGE):
            break
        table = v & _address_mask(ept.maxphyaddr)
        if pwc is not None:
            pwc[("ept", pointer.root, level, gpa >> fmt.shift(level))] = (table, (r, w, x, xu))
        level -= 1
    size = fmt.page_size(level)
    hpa = (v & _address_mask(ept.maxphyaddr) & ~(size - 1)) | (gpa & (size - 1))
    perms = Permissions(read=r, write=w, execute=x, user=False, user_execute=xu)
    if not allowed(perms):
        what = ("a user-mode fetch needs XU (bit 10)" if need_xu else "a fetch needs X") if fetch else \
            "a write needs W" if write else "a read needs R"
        return violation(r, w, x, xu, level, f"{what} at every level; gpa {gpa:#x}, leaf {name}")
    if set_ad and pointer.ad:
        for address, value, lv in used:
            new = value | EPT_A | (EPT_D if (write and lv == level) else 0)
            if new != value:
                memory.write_u64(address, new)
                updates.append((address, value, new))
    memory_type, ignore_pat = (v >> EPT_MT_SHIFT) & 7, bool(v & EPT_IPAT)
    if caches is not None and caches.ntlb is not None:
        caches.ntlb[("ept",) + key] = _NestedCached(hpa & ~0xFFF, size, perms, memory_type, ignore_pat, None,
                                                    bool(v & EPT_D) or not pointer.ad or (set_ad and write))
    return _NestedLeaf(hpa, size, perms, memory_type, ignore_pat, None)


def _npt_translate(memory, gpa, npt: Npt, *, write, fetch, step, final, refs, updates, caches, set_ad):
    fmt = npt.fmt

    def allowed(p: Permissions) -> bool:
        return p.user and (p.write or not write) and (p.execute or not fetch)

    key = ("npt", npt.root, gpa >> 12)
    hit = _ntlb_lookup(caches, key, write, fetch, allowed)
    if hit is not None:
        return _NestedLeaf(hit.page | (gpa & 0xFFF), hit.size, hit.perms, None, False, hit.pat_index)
    tag = NPF_FINAL if final else NPF_GUEST_PAGE
    if gpa >> fmt.address_bits:
        return NestedPageFault(exitinfo1=PF_U | (PF_W if write else 0) | tag, exitinfo2=gpa, level=None,
                               reason=f"gpa {gpa:#x} is beyond the {fmt.address_bits}-bit reach of {fmt} nested tables")

    def read_entry(level, address):
        v = memory.read_u64(address)
        refs.append(MemoryReference(NESTED, level, address, v, step, gpa))
        return v, address

    result = _x86_walk(fmt, npt.root, gpa, read_entry, write=write, user=True, fetch=fetch, wp=True, nxe=npt.nxe,
                       pse=True, smep=False, smap=False, maxphyaddr=npt.maxphyaddr, gbpages=npt.gbpages,
                       pwc=caches.nested_pwc if caches is not None else None, pwc_key=("npt", npt.root),
                       caches=caches, pwc_name="nested_pwc")
    if isinstance(result, _X86Stop):
        return NestedPageFault(exitinfo1=result.error_code | tag, exitinfo2=gpa, level=result.level,
                               reason=f"nested {result.reason}")
    if set_ad:
        _set_x86_ad(memory, fmt, result, write, updates)
    if caches is not None and caches.ntlb is not None:
        caches.ntlb[key] = _NestedCached(result.pa & ~0xFFF, result.size, result.perms, None, False, result.pat_index,
                                         bool(result.used[-1][1] & D) or (set_ad and write))
    return _NestedLeaf(result.pa, result.size, result.perms, None, False, result.pat_index)


def _set_x86_ad(memory, fmt: Format, leaf: _X86Leaf, write: bool, updates: list) -> None:
    for address, value, level in leaf.used:
        new = value | A | (D if (write and level == leaf.level) else 0)
        if new != value:
            _write_entry(memory, address, fmt.entry_size, new)
            updates.append((address, value, new))


def _check_access(write: bool, fetch: bool) -> None:
    if write and fetch:
        raise ValueError("an access is a read, a write or a fetch: not both write and fetch")


def walk(memory: PhysicalMemory, va: int, context: PagingContext, nested: Nested | None = None, *, write: bool = False,
         user: bool = False, fetch: bool = False, set_ad: bool = False, caches: WalkCaches | None = None,
         check_canonical: bool = True) -> Walk:
    """Translate linear address ``va`` as the CPU would for a read (default), write or fetch.

    Without ``nested`` the guest tables are read from ``memory`` at guest-physical addresses (a
    1-D walk). With an :class:`Ept` or :class:`Npt`, ``memory`` is host-physical: every guest
    entry's address and the final guest-physical address are translated through the nested
    tables first (the 2-D walk), and each memory reference is listed in order.

    ``check_canonical=False`` indexes a non-canonical address by its low bits (as KVM_TRANSLATE
    does) instead of reporting #GP."""
    _check_access(write, fetch)
    refs: list[MemoryReference] = []
    updates: list[tuple[int, int, int]] = []
    fmt = context.fmt

    def finish(gpa: int, page_size: int | None, perms: Permissions | None, pat_index: int | None,
               pat_type: int | None, user_address: bool) -> Walk:
        if nested is None:
            return Walk(va, address=gpa, gpa=gpa, page_size=page_size, permissions=perms, memory_type=pat_type,
                        pat_index=pat_index, references=tuple(refs), updates=tuple(updates))
        got = _nested_translate(memory, gpa, nested, write=write, fetch=fetch, user_address=user_address, step=0,
                                final=True, gla=va, refs=refs, updates=updates,
                                caches=caches, set_ad=set_ad)
        if isinstance(got, Fault):
            return Walk(va, gpa=gpa, page_size=page_size, permissions=perms, references=tuple(refs),
                        updates=tuple(updates), fault=got)
        memory_type = None
        if isinstance(nested, Ept):
            memory_type = effective_memory_type(got.memory_type, got.ignore_pat, WB if pat_type is None else pat_type)
        return Walk(va, address=got.hpa, gpa=gpa, page_size=page_size, nested_page_size=got.size, permissions=perms,
                    nested_permissions=got.perms, memory_type=memory_type, pat_index=pat_index, references=tuple(refs),
                    updates=tuple(updates))

    if fmt is None:
        if va < 0 or va >= 1 << 64:
            raise ValueError(f"linear address {va:#x} is not a 64-bit value")
        return finish(va & 0xFFFFFFFF, None, Permissions(True, True, True, True), None, None, user)
    if fmt.address_bits == 32:
        if not 0 <= va < 1 << 32:
            raise ValueError(f"linear address {va:#x} does not fit {fmt} paging's 32 bits")
    else:
        if not 0 <= va < 1 << 64:
            raise ValueError(f"linear address {va:#x} is not a 64-bit value")
        if check_canonical and not _canonical(fmt, va):
            return Walk(va, fault=GeneralProtection(address=va, reason=f"va {va:#x} is not canonical for {fmt} paging "
                                                    f"(bits 63:{fmt.address_bits - 1} differ)"))

    def read_guest_entry(level: int, entry_gpa: int):
        if nested is None:
            value = _read_entry(memory, entry_gpa, fmt.entry_size)
            refs.append(MemoryReference(GUEST, level, entry_gpa, value, level, entry_gpa))
            return value, entry_gpa
        got = _nested_translate(memory, entry_gpa, nested, write=False, fetch=False, user_address=False, step=level,
                                final=False, gla=va, refs=refs, updates=updates, caches=caches, set_ad=set_ad,
                                guest_structure=True)
        if isinstance(got, Fault):
            return got
        value = _read_entry(memory, got.hpa, fmt.entry_size)
        refs.append(MemoryReference(GUEST, level, got.hpa, value, level, entry_gpa))
        return value, got.hpa

    pdptes = context.pdptes
    if fmt is PAE and pdptes is None:
        loaded = []
        for i in range(4):
            entry_gpa = context.root + 8 * i
            if nested is None:
                loaded.append(memory.read_u64(entry_gpa))
                continue
            got = _nested_translate(memory, entry_gpa, nested, write=False, fetch=False, user_address=False, step=3,
                                    final=False, gla=None, refs=[], updates=[], caches=None, set_ad=False)
            if isinstance(got, Fault):
                return Walk(va, fault=got)
            loaded.append(memory.read_u64(got.hpa))
        pdptes = tuple(loaded)
    if fmt is PAE:
        for i, v in enumerate(pdptes):
            bad = _x86_reserved(PAE, 3, v, maxphyaddr=context.maxphyaddr, nxe=context.nxe, pse=True, gbpages=True) if v & P else None
            if bad:
                return Walk(va, fault=GeneralProtection(address=va, level=3, reason=(
                    f"PDPTE[{i}] = {v:#x}: {_bit_text(bad[0])} set; {bad[1]} (MOV to CR3 would #GP)")))
    result = _x86_walk(fmt, context.root, va, read_guest_entry, write=write, user=user, fetch=fetch, wp=context.wp,
                       nxe=context.nxe, pse=context.pse, smep=context.smep, smap=context.smap,
                       maxphyaddr=context.maxphyaddr, gbpages=context.gbpages, pdptes=pdptes,
                       pwc=caches.pwc if caches is not None else None, pwc_key=("guest", context.root), caches=caches)
    if isinstance(result, Fault):
        return Walk(va, references=tuple(refs), updates=tuple(updates), fault=result)
    if isinstance(result, _X86Stop):
        return Walk(va, references=tuple(refs), updates=tuple(updates),
                    fault=PageFault(address=va, error_code=result.error_code, level=result.level, reason=result.reason))
    pat_type = (context.pat >> (8 * result.pat_index)) & 7
    if set_ad:
        _set_x86_ad(memory, fmt, result, write, updates)
    return finish(result.pa, result.size, result.perms, result.pat_index, pat_type, result.perms.user)


def translate_gpa(memory: PhysicalMemory, gpa: int, nested: Nested, *, write: bool = False, fetch: bool = False,
                  user: bool = False, gla: int | None = None, final: bool = True, set_ad: bool = False,
                  caches: WalkCaches | None = None) -> Walk:
    """Translate a guest-physical address through EPT or NPT alone (a 1-D nested walk).

    ``user`` says the linear address was a user-mode one (for MBEC's XU); ``gla`` sets
    exit-qualification bit 7 and ``final`` bit 8 (EPT) or selects EXITINFO1 bit 32/33 (NPT)."""
    _check_access(write, fetch)
    if not 0 <= gpa < 1 << 64:
        raise ValueError(f"guest-physical address {gpa:#x} is not a 64-bit value")
    refs: list[MemoryReference] = []
    updates: list[tuple[int, int, int]] = []
    got = _nested_translate(memory, gpa, nested, write=write, fetch=fetch, user_address=user, step=0, final=final,
                            gla=gla, refs=refs, updates=updates, caches=caches, set_ad=set_ad)
    if isinstance(got, Fault):
        return Walk(gpa, gpa=gpa, references=tuple(refs), updates=tuple(updates), fault=got)
    return Walk(gpa, address=got.hpa, gpa=gpa, nested_page_size=got.size, nested_permissions=got.perms,
                memory_type=got.memory_type, pat_index=got.pat_index, references=tuple(refs), updates=tuple(updates))


class GuestPhysicalView:
    """Guest-physical memory seen through EPT/NPT: a :class:`PhysicalMemory` whose addresses are
    gPAs, backed by host-physical ``memory``. Use it to build or read a guest's own tables."""

    def __init__(self, memory: PhysicalMemory, nested: Nested):
        self.memory, self.nested = memory, nested

    def _hpa(self, gpa: int, size: int, write: bool = False) -> int:
        got = translate_gpa(self.memory, gpa, self.nested, write=write)
        if not got.ok:
            raise ValueError(f"guest-physical {gpa:#x} does not translate: {got.fault}")
        if (gpa & 0xFFF) + size > PAGE_SIZE:
            raise ValueError(f"a {size}-byte access at gpa {gpa:#x} crosses a page")
        return got.address

    def read_u32(self, address: int) -> int:
        return self.memory.read_u32(self._hpa(address, 4))

    def read_u64(self, address: int) -> int:
        return self.memory.read_u64(self._hpa(address, 8))

    def write_u32(self, address: int, value: int) -> None:
        self.memory.write_u32(self._hpa(address, 4, True), value)

    def write_u64(self, address: int, value: int) -> None:
        self.memory.write_u64(self._hpa(address, 8, True), value)

    def write(self, address: int, data: bytes) -> None:
        """``data`` at gPA ``address``, page by page (each page translated on its own); the
        backing memory needs a ``write`` of its own (as :class:`SparseMemory` has)."""
        offset = 0
        while offset < len(data):
            gpa = address + offset
            chunk = min(len(data) - offset, PAGE_SIZE - (gpa & 0xFFF))
            self.memory.write(self._hpa(gpa, chunk, True), data[offset:offset + chunk])
            offset += chunk


# =================================================================================================
# Whole-table views: mappings and validation
# =================================================================================================


@dataclass(frozen=True)
class Mapping:
    """One leaf of a table: ``size`` bytes from ``va`` to ``pa`` (``entry`` at ``level``) with the
    effective permissions of the path to it."""

    va: int
    pa: int
    size: int
    level: int
    entry: int
    permissions: Permissions


class TableError(ValueError):
    """A paging-structure entry with reserved bits set, or an EPT misconfiguration."""

    def __init__(self, message: str, *, level: int, index: int, address: int, value: int):
        super().__init__(message)
        self.level, self.index, self.address, self.value = level, index, address, value


def mappings(memory: PhysicalMemory, paging: PagingContext | Ept | Npt) -> Iterator[Mapping]:
    """Every present leaf of the tables ``paging`` points at, in address order.

    Raises :class:`TableError` naming the entry and field at the first reserved bit (or EPT
    misconfiguration) met. High-half 4/5-level addresses come out sign-extended."""
    if isinstance(paging, Ept):
        fmt, root = paging.fmt, paging.root
        opts = None
    elif isinstance(paging, Npt):
        fmt, root = paging.fmt, paging.root
        opts = dict(maxphyaddr=paging.maxphyaddr, nxe=paging.nxe, pse=True, gbpages=paging.gbpages)
    else:
        if paging.fmt is None:
            raise ValueError("paging is off: there are no tables")
        fmt, root = paging.fmt, paging.root
        opts = dict(maxphyaddr=paging.maxphyaddr, nxe=paging.nxe, pse=paging.pse, gbpages=paging.gbpages)

    def visit(table: int, level: int, base: int, rights: tuple[bool, bool, bool, bool]) -> Iterator[Mapping]:
        count = (1 << fmt.top_index_bits) if (fmt.top_index_bits and level == fmt.levels) else 1 << fmt.index_bits
        for index in range(count):
            address = table + index * fmt.entry_size
            v = _read_entry(memory, address, fmt.entry_size)
            va = base | index << fmt.shift(level)
            where = f"{fmt.entry_name(level)}[{index}] at {address:#x} = {v:#x} (va {va:#x})"
            if fmt.ept:
                if not _ept_present(v, paging.mbec):
                    continue
                problem = _ept_problem(v, level, paging)
                if problem:
                    raise TableError(f"{where}: {problem}", level=level, index=index, address=address, value=v)
                r = rights[0] and bool(v & EPT_R)
                w = rights[1] and bool(v & EPT_W)
                x = rights[2] and bool(v & EPT_X)
                xu = rights[3] and bool(v & EPT_XU)
                leaf = level == 1 or (level in (2, 3) and v & EPT_LARGE)
                nxt = (r, w, x, xu)
                perms = Permissions(read=r, write=w, execute=x, user=False, user_execute=xu)
                target = v & _address_mask(paging.maxphyaddr)
            else:
                if not v & P:
                    continue
                bad = _x86_reserved(fmt, level, v, **opts)
                if bad:
                    raise TableError(f"{where}: {_bit_text(bad[0])} set; {bad[1]}", level=level, index=index,
                                     address=address, value=v)
                if fmt is PAE and level == 3:
                    nxt = rights
                    leaf = False
                else:
                    nxt = (True, rights[1] and bool(v & RW), rights[2] and not (fmt is not X86_32 and opts["nxe"] and v & XD),
                           rights[3] and bool(v & US))
                    leaf = level == 1 or (level > 1 and bool(v & PS) and (fmt is not X86_32 or opts["pse"]))
                perms = Permissions(read=True, write=nxt[1], execute=nxt[2], user=nxt[3])
                target = X86Entry.decode(v, fmt, level, pse=opts["pse"]).address if leaf else (
                    (v & 0xFFFFF000) if fmt is X86_32 else v & _address_mask(opts["maxphyaddr"]))
            if leaf:
                size = fmt.page_size(level)
                if fmt.ept:
                    target &= ~(size - 1)
                shown = va
                if not fmt.ept and fmt.address_bits > 32 and va >> (fmt.address_bits - 1):
                    shown = va | ((1 << 64) - (1 << fmt.address_bits))
                yield Mapping(shown, target, size, level, v, perms)
            else:
                yield from visit(target, level - 1, va, nxt)

    yield from visit(root, fmt.levels, 0, (True, True, True, True))


def check_tables(memory: PhysicalMemory, paging: PagingContext | Ept | Npt) -> int:
    """Validate a whole table image; returns the number of leaves, or raises :class:`TableError`."""
    return sum(1 for _ in mappings(memory, paging))


def coalesce(maps: Iterable[Mapping]) -> list[tuple[int, int, int, Permissions]]:
    """Merge mappings that continue each other (va and pa contiguous, same permissions):
    [(va, pa, size, permissions)]."""
    out: list[list] = []
    for m in maps:
        if out and out[-1][0] + out[-1][2] == m.va and out[-1][1] + out[-1][2] == m.pa and out[-1][3] == m.permissions:
            out[-1][2] += m.size
        else:
            out.append([m.va, m.pa, m.size, m.permissions])
    return [tuple(x) for x in out]


# =================================================================================================
# Live guests
# =================================================================================================


def context_from_sregs(sregs, *, maxphyaddr: int = 52, gbpages: bool = True, pat: int = DEFAULT_PAT) -> PagingContext:
    """The :class:`PagingContext` of ``struct kvm_sregs`` (CR0, CR3, CR4, EFER): fmt None if
    CR0.PG = 0, else 5-level (EFER.LMA, CR4.LA57), 4-level (EFER.LMA), PAE (CR4.PAE) or 32-bit."""
    if not sregs.cr0 & CR0_PG:
        fmt = None
    elif sregs.efer & EFER_LMA:
        fmt = LONG5 if sregs.cr4 & CR4_LA57 else LONG4
    elif sregs.cr4 & CR4_PAE:
        fmt = PAE
    else:
        fmt = X86_32
    return PagingContext(
        fmt,
        sregs.cr3,
        wp=bool(sregs.cr0 & CR0_WP),
        nxe=bool(sregs.efer & EFER_NXE),
        pse=bool(sregs.cr4 & CR4_PSE),
        smep=bool(sregs.cr4 & CR4_SMEP),
        smap=bool(sregs.cr4 & CR4_SMAP),
        maxphyaddr=maxphyaddr,
        gbpages=gbpages,
        pat=pat,
    )


def guest_cpu_features(vcpu) -> tuple[int, bool]:
    """(MAXPHYADDR, 1 GiB pages) from the vCPU's CPUID (KVM_GET_CPUID2): leaf 0x80000008 EAX[7:0]
    and leaf 0x80000001 EDX[26]; (52, True) where a leaf is missing. KVM checks reserved bits of
    guest entries against these, so a walk that should agree with KVM_TRANSLATE uses them."""
    maxphyaddr, gbpages = 52, True
    for entry in vcpu.get_cpuid2():
        if entry.function == 0x80000008 and entry.eax & 0xFF:
            maxphyaddr = entry.eax & 0xFF
        elif entry.function == 0x80000001:
            gbpages = bool(entry.edx >> 26 & 1)
    return maxphyaddr, gbpages


def walk_live(vcpu, memory, gva: int, *, write: bool = False, user: bool = False, fetch: bool = False,
              set_ad: bool = False, check_canonical: bool = True, caches: WalkCaches | None = None) -> Walk:
    """Walk a running guest's own tables for ``gva``: the mode from the vCPU's CR0/CR3/CR4/EFER
    (``get_sregs()``), MAXPHYADDR and 1 GiB-page support from its CPUID, entries read from
    ``memory`` (pykvm's ``GuestMemory``, or any :class:`PhysicalMemory`).

    KVM_TRANSLATE answers the same question for a supervisor read; it does not check canonical
    form (pass ``check_canonical=False`` to compare such addresses)."""
    sregs = vcpu.get_sregs()
    maxphyaddr, gbpages = guest_cpu_features(vcpu)
    context = context_from_sregs(sregs, maxphyaddr=maxphyaddr, gbpages=gbpages)
    physical = memory if isinstance(memory, PhysicalMemory) else GuestMemoryAdapter(memory)
    return walk(physical, gva, context, write=write, user=user, fetch=fetch, set_ad=set_ad, caches=caches,
                check_canonical=check_canonical)

