"""A tagged TLB with paging-structure caches, and every invalidation VT-x and AMD-V define.

The model
=========
A :class:`TLB` has a first level of ``sets`` x ``ways`` entries, an optional second level
(``l2_sets`` x ``l2_ways``), both set-associative with LRU replacement in each set, and optional
paging-structure caches (PSC, "page-walk caches"): one small fully associative LRU cache per
upper paging level (PML4E, PDPTE and PDE entries for 4-level paging), tagged like TLB entries.

An entry caches one translation and is tagged the way the SDM (Vol. 3C, "VMX Support for Address
Translation") and the APM (Vol. 2, "TLB Control") tag it:

=================  =================================================================================
kind               what it caches, and what it is tagged with
=================  =================================================================================
``LINEAR``         linear -> physical, with no EPT/NPT in use (the host, or a guest under shadow
                   paging): VPID/ASID (0 = host), PCID
``COMBINED``       guest-linear -> host-physical under EPT/NPT: VPID/ASID, PCID and the EPTP (nCR3)
``GUEST_PHYSICAL`` guest-physical -> host-physical: the EPTP alone on VMX (tag 0); on SVM the nested
                   translations belong to the guest's ASID, so give them ``tag=asid``
=================  =================================================================================

Global entries (the page's G bit, with CR4.PGE) match every PCID of their VPID/ASID, so they are
stored without one: :class:`Entry` shows ``pcid=None`` for them. Paging-structure-cache entries
are never global. An EPTP is named by a small integer (0-4095), not by its value.

Invalidations
=============
Each method returns the number of TLB entries it removed (both levels; the PSC are flushed with
the same scope and are not counted). What each one removes (a mapping survives unless it matches):

=====================================  ===========================================================
operation                              removes
=====================================  ===========================================================
``vmx_transition(vpid_enabled=False)`` VM entry / VM exit without VPIDs: linear and combined
                                       mappings of VPID 0 (all PCIDs, all EPTPs, global ones too);
                                       guest-physical mappings survive. With VPIDs: nothing.
``invvpid(0, vpid, va)``               individual-address: linear+combined mappings of that page and
                                       VPID, all PCIDs and EPTPs, global ones too
``invvpid(1, vpid)``                   single-context: all linear+combined mappings of the VPID
``invvpid(2)``                         all-context: linear+combined mappings of every VPID but 0
``invvpid(3, vpid)``                   single-context-retaining-globals: as 1, globals survive
``invept(1, eptp)``                    single-context: guest-physical and combined mappings
                                       derived from that EPTP (all VPIDs, all PCIDs)
``invept(2)``                          global: guest-physical and combined mappings of every EPTP
``tlb_control(0, asid)``               VMRUN with TLB_CONTROL 0 (do nothing): nothing
``tlb_control(1, asid)``               1 (flush all ASIDs): the entire TLB, every kind and tag
``tlb_control(3, asid)``               3 (flush this guest): every entry of that ASID
``tlb_control(7, asid)``               7 (flush this guest's non-global entries): as 3, globals
                                       survive
``invlpga(va, asid)``                  linear+combined mappings of that page and ASID (all PCIDs,
                                       global ones too; the APM names only the page and the ASID)
``invlpg(va, tag=, pcid=)``            in the current VPID/ASID: the page's entries of the current
                                       PCID, and its global entries whatever their PCID; all PSC
                                       entries of the current PCID (SDM 4.10.4.1)
``invpcid(0, pcid=, va=)``             individual-address: that page in that PCID, except globals
``invpcid(1, pcid=)``                  single-context: that PCID, except globals
``invpcid(2)``                         all-context including globals (within the current VPID)
``invpcid(3)``                         all-context except globals
``mov_cr3(pcid, noflush=False)``       CR4.PCIDE=1: that PCID's non-global entries; bit 63 set
                                       (``noflush=True``): nothing. CR4.PCIDE=0: PCID 0's
                                       non-global entries
``flush_all()``                        everything (power-up, reset)
=====================================  ===========================================================

Instructions a guest executes (INVLPG, INVPCID, MOV to CR3) act within the current VPID/ASID
(``tag``) and, for combined mappings, on every EPTP, as the SDM requires. The methods that take a
VPID or type check it as the hardware does (VMfail, #GP) and raise ``ValueError`` instead.

Page walks
==========
:meth:`TLB.translate` is one access: a hit costs nothing; a miss walks the paging structures,
starting below the deepest paging-structure-cache hit, and fills the TLB and the PSC. The walk
costs ``walk_reference_count(r)`` memory references on the host (a 1-D walk of ``r`` remaining
levels) and ``walk_reference_count(r, nested_levels)`` for a guest under EPT/NPT (a 2-D walk:
each guest level's entry is found through a nested walk, and so is the final guest-physical
address): 4 and 24 for a full 4-level walk. Nested (EPT) paging-structure caches are not
modelled, so a 2-D walk always pays its nested walks in full.

:func:`replay` runs a trace (see :mod:`pykvm.model.workload`) through a TLB under one of three
:class:`Policy` values and returns :class:`ReplayStats`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

__all__ = [
    "TLB",
    "Entry",
    "Kind",
    "PageSize",
    "Policy",
    "PwcEntry",
    "ReplayStats",
    "TLBConfig",
    "pack_access",
    "replay",
    "walk_references",
]


class Kind(enum.IntEnum):
    """What a TLB entry caches (SDM Vol. 3C: linear, combined and guest-physical mappings)."""

    LINEAR = 0
    COMBINED = 1
    GUEST_PHYSICAL = 2


class PageSize(enum.IntEnum):
    """Page sizes; the value is the code stored in keys and packed accesses."""

    SIZE_4K = 0
    SIZE_2M = 1
    SIZE_1G = 2

    @property
    def shift(self) -> int:
        return 12 + 9 * self.value

    @property
    def label(self) -> str:
        return ("4K", "2M", "1G")[self.value]

    @classmethod
    def parse(cls, text: str) -> PageSize:
        try:
            return {"4K": cls.SIZE_4K, "2M": cls.SIZE_2M, "1G": cls.SIZE_1G}[text.upper()]
        except KeyError:
            raise ValueError(f"not a page size: {text!r} (4K, 2M or 1G)") from None


class Policy(str, enum.Enum):
    """How a hypervisor and its guests use the TLB tags (see :func:`replay`)."""

    UNTAGGED = "untagged"
    TAGGED = "tagged"
    TAGGED_PCID = "tagged+pcid"

    def __str__(self) -> str:
        return self.value


# ---- key layout ---------------------------------------------------------------------------------
# One int per entry: vpn | size | global | pcid | tag | eptp | kind, low bits first.  The low 42 bits
# (kind..pcid) are the "context" of an access; bits 42 and up come from the packed access.
_KIND_MASK = 0x3
_EPTP_SHIFT, _EPTP_MASK = 2, 0xFFF
_TAG_SHIFT, _TAG_MASK = 14, 0xFFFF
_PCID_SHIFT, _PCID_MASK = 30, 0xFFF
_CTX_BITS = 42
_G_BIT = 1 << 42
_SIZE_SHIFT = 43
_VPN_SHIFT = 45
_NOT_GPA_MASK = 0x2  # kind & 2 == 0: LINEAR or COMBINED

MAX_TAG = _TAG_MASK
MAX_PCID = _PCID_MASK
MAX_EPTP = _EPTP_MASK
MAX_ADDRESS = (1 << 64) - 1

TLB_CONTROL_VALUES = (0, 1, 3, 7)


def pack_access(va: int, size: PageSize = PageSize.SIZE_4K, global_: bool = False) -> int:
    """An access as the replay loop stores it: ``vpn << 3 | size << 1 | global``."""
    size = PageSize(size)
    return ((va >> size.shift) << 3) | (size << 1) | (1 if global_ else 0)


def _context(kind: int, tag: int, pcid: int, eptp: int) -> int:
    return (pcid << _PCID_SHIFT) | (tag << _TAG_SHIFT) | (eptp << _EPTP_SHIFT) | kind


def walk_references(guest_levels: int, nested_levels: int | None = None) -> int:
    """Memory references of an uncached walk of ``guest_levels`` levels: 1-D (``nested_levels``
    None), or 2-D under nested tables, ``(n+1)(m+1) - 1``.  The paging model's
    :func:`pykvm.model.paging.walk_reference_count`, imported when a TLB is built."""
    from .paging import walk_reference_count

    return walk_reference_count(guest_levels, nested_levels)


@dataclass(frozen=True, order=True)
class Entry:
    """One TLB entry, decoded.  ``address`` is the page's base (linear, or guest-physical)."""

    kind: Kind
    tag: int
    pcid: int | None  # None: global (any PCID) or guest-physical (no PCID)
    address: int
    size: PageSize
    global_: bool
    eptp: int | None  # None for linear mappings

    def __str__(self) -> str:
        parts = [self.kind.name.lower(), f"tag={self.tag}"]
        if self.pcid is not None:
            parts.append(f"pcid={self.pcid}")
        if self.eptp is not None:
            parts.append(f"eptp={self.eptp}")
        parts.append(f"{self.address:#x}/{self.size.label}")
        if self.global_:
            parts.append("G")
        return " ".join(parts)


@dataclass(frozen=True, order=True)
class PwcEntry:
    """One paging-structure-cache entry: the level of the cached entry (4 = PML4E, 3 = PDPTE,
    2 = PDE) and the base of the region it maps."""

    kind: Kind
    tag: int
    pcid: int
    level: int
    address: int
    eptp: int | None


def _decode(key: int) -> Entry:
    kind = Kind(key & _KIND_MASK)
    size = PageSize((key >> _SIZE_SHIFT) & 3)
    global_ = bool(key & _G_BIT)
    pcid = None if (global_ or kind == Kind.GUEST_PHYSICAL) else (key >> _PCID_SHIFT) & _PCID_MASK
    eptp = None if kind == Kind.LINEAR else (key >> _EPTP_SHIFT) & _EPTP_MASK
    return Entry(kind, (key >> _TAG_SHIFT) & _TAG_MASK, pcid, (key >> _VPN_SHIFT) << size.shift, size,
                 global_, eptp)


@dataclass(frozen=True)
class TLBConfig:
    """The geometry of a :class:`TLB` (what the command line sets)."""

    sets: int = 16
    ways: int = 4
    levels: int = 2
    l2_sets: int = 128
    l2_ways: int = 12
    pwc: tuple[int, ...] | None = None  # per upper level, top down; None: the default; (): none
    guest_levels: int = 4
    nested_levels: int = 4

    def build(self) -> TLB:
        l2 = self.levels == 2
        return TLB(self.sets, self.ways, l2_sets=self.l2_sets if l2 else 0, l2_ways=self.l2_ways if l2 else 0,
                   pwc_entries=self.pwc, guest_levels=self.guest_levels, nested_levels=self.nested_levels)

    def to_json(self) -> dict:
        doc = asdict(self)
        if self.levels != 2:
            doc["l2_sets"] = doc["l2_ways"] = 0
        doc["pwc"] = list(self.build().pwc_sizes)
        return doc


def default_pwc(guest_levels: int) -> tuple[int, ...]:
    """Paging-structure-cache sizes, top level first: 4 PML4E, 4 PDPTE and 32 PDE entries (and
    2 PML5E entries with 5-level paging).  Illustrative: Intel does not document the sizes."""
    return (2,) * (guest_levels - 4) + (4, 4, 32)


class TLB:
    """A set-associative TLB (one or two levels) with paging-structure caches.  See the module
    docstring for the tagging and for what each invalidation removes."""

    def __init__(self, sets: int = 16, ways: int = 4, *, l2_sets: int = 0, l2_ways: int = 0,
                 pwc_entries: tuple[int, ...] | None = None, guest_levels: int = 4,
                 nested_levels: int = 4) -> None:
        for name, value in (("sets", sets), ("ways", ways)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if (l2_sets == 0) != (l2_ways == 0) or l2_sets < 0 or l2_ways < 0:
            raise ValueError(f"a second level needs both l2_sets and l2_ways (got {l2_sets} x {l2_ways})")
        if guest_levels not in (4, 5):
            raise ValueError(f"guest paging has 4 or 5 levels, not {guest_levels}")
        if nested_levels not in (4, 5):
            raise ValueError(f"EPT/NPT paging has 4 or 5 levels, not {nested_levels}")
        if pwc_entries is None:
            pwc_entries = default_pwc(guest_levels)
        pwc_entries = tuple(pwc_entries)
        if pwc_entries and len(pwc_entries) != guest_levels - 1:
            raise ValueError(f"pwc_entries needs {guest_levels - 1} sizes (one per upper level, top down), "
                             f"not {len(pwc_entries)}")
        if any(n < 1 for n in pwc_entries):
            raise ValueError(f"paging-structure cache sizes must be at least 1: {pwc_entries}")
        self.sets, self.ways = sets, ways
        self.l2_sets, self.l2_ways = l2_sets, l2_ways
        self.guest_levels, self.nested_levels = guest_levels, nested_levels
        self.pwc_sizes = pwc_entries
        self._l1: list[OrderedDict] = [OrderedDict() for _ in range(sets)]
        self._l2: list[OrderedDict] | None = [OrderedDict() for _ in range(l2_sets)] if l2_sets else None
        # PSC level -> (cache, capacity, shift of the address bits it is keyed by).  Level 2 caches
        # PDEs (keyed by va >> 21), level 3 PDPTEs (va >> 30), level 4 PML4Es (va >> 39), ...
        self._psc: dict[int, tuple[OrderedDict, int, int]] = {}
        for i, capacity in enumerate(pwc_entries):
            level = guest_levels - i
            self._psc[level] = (OrderedDict(), capacity, 12 + 9 * (level - 1))
        # Memory references of a walk of r remaining guest levels: 1-D (host) and 2-D (EPT/NPT).
        self.walk_cost_1d = tuple(walk_references(r) if r else 0 for r in range(guest_levels + 1))
        self.walk_cost_2d = tuple(walk_references(r, nested_levels) if r else 0 for r in range(guest_levels + 1))

    # ---- introspection -------------------------------------------------------------------------

    def entries(self, level: int | None = None) -> set[Entry]:
        """The entries in the TLB (``level`` 1 or 2, or both levels by default)."""
        if level not in (None, 1, 2):
            raise ValueError(f"a TLB level is 1 or 2, not {level}")
        levels = {1: [self._l1], 2: [self._l2 or []], None: [self._l1, self._l2 or []]}[level]
        return {_decode(k) for sets in levels for st in sets for k in st}

    def pwc(self) -> set[PwcEntry]:
        """The entries in the paging-structure caches."""
        out = set()
        for level, (cache, _, shift) in self._psc.items():
            for k in cache:
                kind = Kind(k & _KIND_MASK)
                out.add(PwcEntry(kind, (k >> _TAG_SHIFT) & _TAG_MASK, (k >> _PCID_SHIFT) & _PCID_MASK, level,
                                 (k >> _VPN_SHIFT) << shift,
                                 None if kind == Kind.LINEAR else (k >> _EPTP_SHIFT) & _EPTP_MASK))
        return out

    def __len__(self) -> int:
        return sum(len(st) for st in self._l1) + sum(len(st) for st in self._l2 or ())

    @staticmethod
    def _check_context(tag: int, pcid: int, eptp: int | None) -> int:
        if not 0 <= tag <= MAX_TAG:
            raise ValueError(f"a VPID/ASID tag is 0-{MAX_TAG}, not {tag}")
        if not 0 <= pcid <= MAX_PCID:
            raise ValueError(f"a PCID is 0-{MAX_PCID}, not {pcid}")
        if eptp is not None and not 0 <= eptp <= MAX_EPTP:
            raise ValueError(f"an EPTP id is 0-{MAX_EPTP}, not {eptp}")
        kind = Kind.LINEAR if eptp is None else Kind.COMBINED
        return _context(kind, tag, pcid, eptp or 0)

    @staticmethod
    def _check_address(va: int) -> None:
        if not 0 <= va <= MAX_ADDRESS:
            raise ValueError(f"an address is a 64-bit unsigned value, not {va:#x}")

    # ---- filling and looking up ----------------------------------------------------------------

    def _insert(self, key: int, vpn: int) -> None:
        st = self._l1[vpn % self.sets]
        if key in st:
            st.move_to_end(key)
        else:
            if len(st) >= self.ways:
                st.popitem(last=False)
            st[key] = None
        if self._l2 is not None:
            st = self._l2[vpn % self.l2_sets]
            if key in st:
                st.move_to_end(key)
            else:
                if len(st) >= self.l2_ways:
                    st.popitem(last=False)
                st[key] = None

    def fill(self, va: int, *, tag: int = 0, pcid: int = 0, eptp: int | None = None,
             size: PageSize = PageSize.SIZE_4K, global_: bool = False) -> Entry:
        """Put a linear (``eptp=None``) or combined mapping in the TLB, as a walk would (both levels;
        the PSC are left alone).  Returns the entry."""
        self._check_address(va)
        ctx = self._check_context(tag, 0 if global_ else pcid, eptp)
        a = pack_access(va, size, global_)
        key = (a << _CTX_BITS) | ctx
        self._insert(key, a >> 3)
        return _decode(key)

    def fill_guest_physical(self, gpa: int, *, eptp: int, tag: int = 0,
                            size: PageSize = PageSize.SIZE_4K) -> Entry:
        """Put a guest-physical mapping (gpa -> hpa through EPTP ``eptp``) in the TLB.  ``tag`` stays
        0 on VMX; on SVM pass the guest's ASID."""
        self._check_address(gpa)
        ctx = self._check_context(tag, 0, eptp) - Kind.COMBINED + Kind.GUEST_PHYSICAL
        a = pack_access(gpa, size)
        key = (a << _CTX_BITS) | ctx
        self._insert(key, a >> 3)
        return _decode(key)

    def lookup(self, va: int, *, tag: int = 0, pcid: int = 0, eptp: int | None = None) -> Entry | None:
        """The entry that would translate ``va`` in this context (any page size, global or not),
        without touching LRU order; None on a miss."""
        self._check_address(va)
        ctx = self._check_context(tag, pcid, eptp)
        ctxg = self._check_context(tag, 0, eptp) | _G_BIT
        for size in PageSize:
            a = pack_access(va, size)  # not global: the G bit comes from ctxg
            vpn = a >> 3
            for c in (ctx, ctxg):
                key = (a << _CTX_BITS) | c
                if key in self._l1[vpn % self.sets] or (
                        self._l2 is not None and key in self._l2[vpn % self.l2_sets]):
                    return _decode(key)
        return None

    def lookup_guest_physical(self, gpa: int, *, eptp: int, tag: int = 0) -> Entry | None:
        """The guest-physical mapping of ``gpa`` through ``eptp``, or None."""
        ctx = self._check_context(tag, 0, eptp) - Kind.COMBINED + Kind.GUEST_PHYSICAL
        for size in PageSize:
            a = pack_access(gpa, size)
            key = (a << _CTX_BITS) | ctx
            vpn = a >> 3
            if key in self._l1[vpn % self.sets] or (self._l2 is not None and key in self._l2[vpn % self.l2_sets]):
                return _decode(key)
        return None

    def translate(self, va: int, *, tag: int = 0, pcid: int = 0, eptp: int | None = None,
                  size: PageSize = PageSize.SIZE_4K, global_: bool = False) -> int:
        """One access.  Returns the memory references its page walk made: 0 on a TLB hit (either
        level); on a miss a 1-D walk (``eptp=None``: linear) or a 2-D walk (combined under that
        EPTP), shortened by paging-structure-cache hits.  The page's size and G bit are what the
        paging structures say; a global page matches every PCID."""
        self._check_address(va)
        ctx = self._check_context(tag, pcid, eptp)
        ctxg = self._check_context(tag, 0, eptp) | _G_BIT
        cost = self.walk_cost_1d if eptp is None else self.walk_cost_2d
        _, _, _, refs = self._run([pack_access(va, size, global_)], ctx, ctxg, cost)
        return refs

    # ---- the replay loop -----------------------------------------------------------------------

    def _run(self, pages: list[int], ctx: int, ctxg: int, cost: tuple[int, ...]) -> tuple[int, int, int, int]:
        """Run packed accesses in one context.  Returns (misses in L1, hits in L2, walks, walk
        memory references).  The one loop behind :meth:`translate` and :func:`replay`."""
        ctxg &= ~_G_BIT  # the packed access carries the G bit itself
        l1, n1, w1 = self._l1, self.sets, self.ways
        l2, n2, w2 = self._l2, self.l2_sets, self.l2_ways
        move = OrderedDict.move_to_end
        pop = OrderedDict.popitem
        psc = self._psc
        top = self.guest_levels
        misses = l2hits = walks = refs = 0
        for a in pages:
            k = (a << _CTX_BITS) | (ctxg if a & 1 else ctx)
            st = l1[(a >> 3) % n1]
            if k in st:
                move(st, k)
                continue
            misses += 1
            if len(st) >= w1:
                pop(st, False)
            st[k] = None
            if l2 is not None:
                st = l2[(a >> 3) % n2]
                if k in st:
                    move(st, k)
                    l2hits += 1
                    continue
                if len(st) >= w2:
                    pop(st, False)
                st[k] = None
            # A page walk: start below the deepest paging-structure-cache hit.
            size = (a >> 1) & 3
            leaf = size + 1  # the level of the leaf entry: 1 PTE, 2 PDE (2M), 3 PDPTE (1G)
            va = (a >> 3) << (12 + 9 * size)
            start = top  # the level whose entry the walk reads first
            for level in range(leaf + 1, top + 1):
                entry = psc.get(level)
                if entry is None:
                    continue
                cache, _, shift = entry
                pk = ((va >> shift) << _VPN_SHIFT) | ctx
                if pk in cache:
                    move(cache, pk)
                    start = level - 1
                    break
            walks += 1
            refs += cost[start - leaf + 1]
            for level in range(leaf + 1, start + 1):  # the non-leaf entries this walk read
                entry = psc.get(level)
                if entry is None:
                    continue
                cache, capacity, shift = entry
                pk = ((va >> shift) << _VPN_SHIFT) | ctx
                if pk in cache:
                    move(cache, pk)
                else:
                    if len(cache) >= capacity:
                        pop(cache, False)
                    cache[pk] = None
        return misses, l2hits, walks, refs

    # ---- invalidation --------------------------------------------------------------------------

    def _drop(self, *, kinds: str = "lc", tag: int | None = None, tag_nonzero: bool = False,
              pcid: int | None = None, eptp: int | None = None, drop_global: bool = True,
              va: int | None = None, psc_all_addresses: bool = False) -> int:
        """Remove the entries in a scope; return how many TLB entries went.

        kinds: "lc" linear+combined, "cg" combined+guest-physical (INVEPT), "all".
        pcid: only non-global entries of this PCID, plus global ones if ``drop_global``.
        va: only entries for the page(s) holding ``va`` (each page size); the PSC entries on the
        way to it, or all PSC entries in scope with ``psc_all_addresses`` (INVLPG)."""
        mask = value = 0
        extra = []
        if kinds == "lc":
            mask |= _NOT_GPA_MASK
        elif kinds == "cg":
            extra.append(lambda k: k & _KIND_MASK != Kind.LINEAR)
        if tag is not None:
            mask |= _TAG_MASK << _TAG_SHIFT
            value |= tag << _TAG_SHIFT
        if tag_nonzero:
            extra.append(lambda k: (k >> _TAG_SHIFT) & _TAG_MASK != 0)
        if eptp is not None:
            mask |= _EPTP_MASK << _EPTP_SHIFT
            value |= eptp << _EPTP_SHIFT
        if not drop_global:
            mask |= _G_BIT
        if pcid is not None:
            if drop_global:  # global entries (any PCID) or this PCID's entries
                pc_mask = _PCID_MASK << _PCID_SHIFT
                pc_value = pcid << _PCID_SHIFT
                extra.append(lambda k: bool(k & _G_BIT) or (k & pc_mask) == pc_value)
            else:
                mask |= _PCID_MASK << _PCID_SHIFT
                value |= pcid << _PCID_SHIFT

        def match(k: int) -> bool:
            return (k & mask) == value and all(f(k) for f in extra)

        removed = 0
        # The TLB levels.
        for sets in (self._l1, self._l2):
            if sets is None:
                continue
            if va is None:
                for st in sets:
                    if not st:
                        continue
                    if extra:
                        dead = [k for k in st if match(k)]
                    elif mask:
                        dead = [k for k in st if k & mask == value]
                    else:
                        dead = list(st)
                    for k in dead:
                        del st[k]
                    removed += len(dead)
                continue
            n = len(sets)
            pages: dict[int, set[int]] = {}
            for size in PageSize:  # the page holding va, in each page size: vpn << 2 | size
                vpn = va >> size.shift
                pages.setdefault(vpn % n, set()).add((vpn << 2) | size)
            for index, wanted in pages.items():
                st = sets[index]
                dead = [k for k in st if (k >> _SIZE_SHIFT) in wanted and match(k)]
                for k in dead:
                    del st[k]
                removed += len(dead)
        # The paging-structure caches (never global, never guest-physical).
        for cache, _, shift in self._psc.values():
            if not cache:
                continue
            if va is not None and not psc_all_addresses:
                prefix = va >> shift
                dead = [k for k in cache if (k >> _VPN_SHIFT) == prefix and match(k)]
            elif extra:
                dead = [k for k in cache if match(k)]
            else:
                dead = [k for k in cache if k & mask == value]
            for k in dead:
                del cache[k]
        return removed

    def flush_all(self) -> int:
        """Everything: every level, kind and tag, and the PSC (power-up, reset)."""
        return self._drop(kinds="all")

    def vmx_transition(self, *, vpid_enabled: bool) -> int:
        """A VM entry or VM exit.  Without VPIDs it invalidates linear and combined mappings of VPID 0
        (all PCIDs, all EPTPs, globals too); guest-physical mappings survive.  With VPIDs: nothing."""
        if vpid_enabled:
            return 0
        return self._drop(kinds="lc", tag=0)

    def invvpid(self, type: int, vpid: int = 0, va: int = 0) -> int:
        """INVVPID.  0 individual-address, 1 single-context, 2 all-context (every VPID but 0),
        3 single-context-retaining-globals.  Linear and combined mappings only, all PCIDs and EPTPs.
        Types 0, 1 and 3 with VPID 0 fail (VMfail), as on the hardware: ``ValueError``."""
        if type not in (0, 1, 2, 3):
            raise ValueError(f"INVVPID type is 0-3, not {type}")
        if type != 2:
            if vpid == 0:
                raise ValueError(f"INVVPID type {type} with VPID 0 fails (VMfailValid: invalid operand)")
            self._check_context(vpid, 0, None)
        if type == 0:
            self._check_address(va)
        return self._invvpid(type, vpid, va)

    def _invvpid(self, type: int, vpid: int, va: int) -> int:
        if type == 0:
            return self._drop(kinds="lc", tag=vpid, va=va)
        if type == 1:
            return self._drop(kinds="lc", tag=vpid)
        if type == 2:
            return self._drop(kinds="lc", tag_nonzero=True)
        return self._drop(kinds="lc", tag=vpid, drop_global=False)

    def invept(self, type: int, eptp: int = 0) -> int:
        """INVEPT.  1 single-context: guest-physical and combined mappings derived from ``eptp`` (all
        VPIDs and PCIDs); 2 global: those of every EPTP.  Linear mappings survive."""
        if type not in (1, 2):
            raise ValueError(f"INVEPT type is 1 (single-context) or 2 (global), not {type}")
        if type == 1:
            self._check_context(0, 0, eptp)
            return self._drop(kinds="cg", eptp=eptp)
        return self._drop(kinds="cg")

    def tlb_control(self, value: int, asid: int) -> int:
        """What VMRUN does with the VMCB's TLB_CONTROL for a guest with ``asid``: 0 nothing, 1 flush
        the entire TLB (all ASIDs), 3 flush this guest's entries, 7 this guest's non-global entries.
        Other values are reserved (``ValueError``); ASID 0 is the host's and VMRUN refuses it."""
        if value not in TLB_CONTROL_VALUES:
            raise ValueError(f"TLB_CONTROL is 0, 1, 3 or 7, not {value} (the other values are reserved)")
        if asid == 0:
            raise ValueError("a guest cannot run with ASID 0 (the host's): VMRUN fails with VMEXIT_INVALID")
        self._check_context(asid, 0, None)
        return self._tlb_control(value, asid)

    def _tlb_control(self, value: int, asid: int) -> int:
        if value == 0:
            return 0
        if value == 1:
            return self._drop(kinds="all")
        return self._drop(kinds="all", tag=asid, drop_global=value == 3)

    def invlpga(self, va: int, asid: int) -> int:
        """INVLPGA: the page holding ``va`` in ``asid`` (linear and combined mappings, all PCIDs,
        global ones too)."""
        self._check_address(va)
        self._check_context(asid, 0, None)
        return self._drop(kinds="lc", tag=asid, va=va)

    def invlpg(self, va: int, *, tag: int = 0, pcid: int = 0) -> int:
        """INVLPG executed in context (``tag``, ``pcid``): that page's entries of the current PCID and
        its global entries (any PCID); all paging-structure-cache entries of the current PCID."""
        self._check_address(va)
        self._check_context(tag, pcid, None)
        return self._drop(kinds="lc", tag=tag, pcid=pcid, va=va, psc_all_addresses=True)

    def invpcid(self, type: int, *, tag: int = 0, pcid: int = 0, va: int = 0) -> int:
        """INVPCID executed with VPID/ASID ``tag``.  0 individual-address (``pcid``, ``va``; globals
        survive), 1 single-context (``pcid``; globals survive), 2 all-context including globals,
        3 all-context except globals."""
        if type not in (0, 1, 2, 3):
            raise ValueError(f"INVPCID type is 0-3, not {type}")
        self._check_context(tag, pcid, None)
        self._check_address(va)
        return self._invpcid(type, tag, pcid, va)

    def _invpcid(self, type: int, tag: int, pcid: int, va: int) -> int:
        if type == 0:
            return self._drop(kinds="lc", tag=tag, pcid=pcid, va=va, drop_global=False)
        if type == 1:
            return self._drop(kinds="lc", tag=tag, pcid=pcid, drop_global=False)
        if type == 2:
            return self._drop(kinds="lc", tag=tag)
        return self._drop(kinds="lc", tag=tag, drop_global=False)

    def mov_cr3(self, pcid: int = 0, *, tag: int = 0, noflush: bool = False, pcide: bool = True) -> int:
        """MOV to CR3 loading ``pcid`` in VPID/ASID ``tag``.  CR4.PCIDE=1: the new PCID's non-global
        entries go, unless bit 63 (``noflush``) is set.  CR4.PCIDE=0: PCID 0's non-global entries go
        (the PCID must be 0, and bit 63 is reserved: #GP)."""
        self._check_context(tag, pcid, None)
        if not pcide:
            if pcid != 0:
                raise ValueError(f"with CR4.PCIDE=0 the PCID is 0, not {pcid}")
            if noflush:
                raise ValueError("CR3 bit 63 (no-flush) needs CR4.PCIDE=1 (#GP otherwise)")
        if noflush:
            return 0
        return self._drop(kinds="lc", tag=tag, pcid=pcid, drop_global=False)


# ---- replay ---------------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    """What one replay counted.  ``flushes`` counts invalidation operations (policy-driven and trace
    ``I`` lines); ``entries_flushed`` the TLB entries they removed (L1 and L2 counted apart)."""

    policy: str
    accesses: int = 0
    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    world_switches: int = 0
    context_switches: int = 0
    invalidations: int = 0
    flushes: int = 0
    entries_flushed: int = 0
    walks_1d: int = 0
    walk_refs_1d: int = 0
    walks_2d: int = 0
    walk_refs_2d: int = 0
    seconds: float = field(default=0.0, compare=False)

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits

    @property
    def miss_rate(self) -> float:
        return self.misses / self.accesses if self.accesses else 0.0

    @property
    def walk_refs(self) -> int:
        return self.walk_refs_1d + self.walk_refs_2d

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["hits"] = self.hits
        doc["miss_rate"] = self.miss_rate
        doc["walk_refs"] = self.walk_refs
        return doc


def _policy_context(policy: Policy, vm: int, pcid: int) -> tuple[int, int, tuple[int, int]]:
    """(tag, pcid) the policy gives (vm, process pcid), and the access contexts (ctx, ctx_global)."""
    tag = 0 if policy is Policy.UNTAGGED else vm
    p = pcid if policy is Policy.TAGGED_PCID else 0
    kind = Kind.LINEAR if vm == 0 else Kind.COMBINED
    ctx = _context(kind, tag, p, vm)
    return tag, p, (ctx, _context(kind, tag, 0, vm))


def replay(trace, policy: Policy | str, config: TLBConfig | None = None, tlb: TLB | None = None) -> ReplayStats:
    """Run ``trace`` (a :class:`pykvm.model.workload.Trace`) through a fresh TLB under ``policy``.

    VM 0 is the host: linear mappings, 1-D walks, VPID/ASID 0.  VM ``v`` > 0 is a guest under
    EPT/NPT (EPTP ``v``): combined mappings, 2-D walks.

    - ``untagged``: no VPIDs/ASIDs: every guest runs with tag 0 and every world switch is a VM
      entry or exit that flushes tag 0 (everything but guest-physical mappings); a context switch
      is MOV to CR3 with CR4.PCIDE=0: PCID 0's non-global entries go.
    - ``tagged``: VM ``v`` has VPID/ASID ``v``; world switches flush nothing; a context switch still
      flushes that VM's non-global entries (no PCIDs).
    - ``tagged+pcid``: as tagged, and each process keeps its PCID: context switches are MOV to CR3
      with the no-flush bit and flush nothing.

    Trace invalidations (``I`` lines) name VMs and PCIDs; the policy maps them to tags and PCIDs
    the same way (under ``untagged`` a VM's VPID is 0, so INVVPID of it acts on tag 0)."""
    policy = Policy(policy)
    if tlb is None:
        tlb = (config or TLBConfig()).build()
    stats = ReplayStats(policy.value)
    pages = trace.pages
    vm = 0
    vm_pcid: dict[int, int] = {}
    tag, pcid, (ctx, ctxg) = _policy_context(policy, 0, 0)
    cost = tlb.walk_cost_1d
    pos = 0
    run = tlb._run
    for epos, event in trace.events + [(len(pages), None)]:
        if epos > pos:
            misses, l2hits, walks, refs = run(pages[pos:epos], ctx, ctxg, cost)
            n = epos - pos
            stats.accesses += n
            stats.misses += misses - l2hits
            stats.l2_hits += l2hits
            stats.l1_hits += n - misses
            if vm == 0:
                stats.walks_1d += walks
                stats.walk_refs_1d += refs
            else:
                stats.walks_2d += walks
                stats.walk_refs_2d += refs
            pos = epos
        if event is None:
            break
        op = event[0]
        if op == "W":
            target = event[1]
            if target == vm:
                continue
            stats.world_switches += 1
            if policy is Policy.UNTAGGED:
                stats.flushes += 1
                stats.entries_flushed += tlb.vmx_transition(vpid_enabled=False)
            vm = target
            tag, pcid, (ctx, ctxg) = _policy_context(policy, vm, vm_pcid.get(vm, 0))
            cost = tlb.walk_cost_1d if vm == 0 else tlb.walk_cost_2d
        elif op == "C":
            new = event[2]
            stats.context_switches += 1
            vm_pcid[vm] = new
            tag, pcid, (ctx, ctxg) = _policy_context(policy, vm, new)
            if policy is not Policy.TAGGED_PCID:
                stats.flushes += 1
                stats.entries_flushed += tlb.mov_cr3(0, tag=tag, pcide=False)
        else:  # "I"
            stats.invalidations += 1
            stats.flushes += 1
            stats.entries_flushed += _apply_invalidation(tlb, policy, event, vm, tag, pcid)
    return stats


def _apply_invalidation(tlb: TLB, policy: Policy, event: tuple, vm: int, tag: int, pcid: int) -> int:
    """A trace ``I`` line, mapped through the policy (see :mod:`pykvm.model.workload`)."""
    _, name, args = event[:3]

    def vm_tag(v: int) -> int:
        return 0 if policy is Policy.UNTAGGED else v

    def map_pcid(p: int) -> int:
        return p if policy is Policy.TAGGED_PCID else 0

    if name == "invlpg":
        return tlb._drop(kinds="lc", tag=tag, pcid=pcid, va=args[0], psc_all_addresses=True)
    if name == "invpcid":
        type_, p, va = args
        return tlb._invpcid(type_, tag, map_pcid(p), va)
    if name == "invvpid":
        type_, v, va = args
        # Under "untagged" every guest mapping carries VPID 0: types 0, 1 and 3 act on tag 0, and
        # all-context (every VPID but 0) finds nothing (world switches flush those anyway).
        return tlb._invvpid(type_, vm_tag(v), va)
    if name == "invept":
        type_, v = args
        return tlb._drop(kinds="cg", eptp=v) if type_ == 1 else tlb._drop(kinds="cg")
    if name == "invlpga":
        v, va = args
        return tlb._drop(kinds="lc", tag=vm_tag(v), va=va)
    if name == "tlb_control":
        v, value = args
        return tlb._tlb_control(value, vm_tag(v))
    raise ValueError(f"unknown invalidation {name!r}")
