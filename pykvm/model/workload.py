"""Access traces for the TLB model: the trace file format, its parser, and a workload generator.

Trace file format
=================
One event per line; fields are separated by blanks; ``#`` starts a comment; blank lines are
ignored.  VM 0 is the host; VMs 1 and up are guests (under EPT/NPT, VPID/ASID = the VM number
when the TLB is tagged).  Numbers are decimal or ``0x`` hex; addresses are always hex, with or
without ``0x``.

::

    A <vm> <pcid> <va> [4K|2M|1G] [G]   an access to the page holding <va> (default 4K; G: global)
    W <vm>                              a world switch: VM entry into <vm>, or VM exit (<vm> = 0)
    C <vm> <pcid>                       a context switch in <vm>: MOV to CR3 loading <pcid>
    I invlpg <va>                       INVLPG in the current VM and PCID
    I invpcid <type> [<pcid>] [<va>]    INVPCID in the current VM: 0 <pcid> <va> | 1 <pcid> | 2 | 3
    I invvpid <type> [<vm>] [<va>]      INVVPID: 0 <vm> <va> | 1 <vm> | 2 | 3 <vm>   (<vm> > 0)
    I invept <type> [<vm>]              INVEPT: 1 <vm> (that VM's EPTP) | 2 (global)
    I invlpga <vm> <va>                 INVLPGA: one page of <vm>'s ASID
    I tlb_control <vm> <value>          VMRUN of <vm> with VMCB TLB_CONTROL = 0, 1, 3 or 7

An access in another VM or PCID than the current one implies the ``W`` and ``C`` lines that would
put it there (the replay starts in the host, VM 0, PCID 0).  A ``W`` to the VM already running
does nothing.  PCIDs are 0-4095; VMs 0-4095 (the VM number is also its EPTP id).

A malformed line raises :class:`TraceError`, whose message names the file, the line number and
what is wrong with it.

Workload generator
==================
:class:`Workload` makes a deterministic trace for a seed: ``vms`` guests, each with ``procs``
processes (PCIDs 1..procs) of ``working_set`` 4K user pages, and ``kernel_pages`` global kernel
pages per guest that every process of it touches (``kernel_fraction`` of its accesses).  Page
choice follows a Zipf law (exponent ``zipf``) over a random ranking of the pages.  About every
``world_switch_every`` guest accesses the running guest exits to the host (``W 0``), the host
makes ``host_accesses`` accesses to its own ``host_pages`` global pages, and the next guest (round
robin) is entered; about every ``context_switch_every`` of a guest's accesses it switches to
another of its processes (``C``).  Intervals are drawn from an exponential distribution with
those means.  0 turns either kind of switch off.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from typing import IO
from collections.abc import Iterable

from .tlb import MAX_EPTP, MAX_PCID, TLB_CONTROL_VALUES, PageSize, pack_access

__all__ = ["TRACE_FORMAT", "Trace", "TraceError", "Workload", "parse_trace", "read_trace"]

TRACE_FORMAT = """\
trace file format (one event per line, # comments; VM 0 is the host):
  A <vm> <pcid> <va> [4K|2M|1G] [G]   access the page holding hex <va> (G: a global page)
  W <vm>                              world switch: VM entry into <vm>, VM exit to 0
  C <vm> <pcid>                       context switch in <vm>: MOV to CR3 loading <pcid>
  I invlpg <va>                       INVLPG in the current VM and PCID
  I invpcid 0 <pcid> <va> | 1 <pcid> | 2 | 3          INVPCID in the current VM
  I invvpid 0 <vm> <va> | 1 <vm> | 2 | 3 <vm>         INVVPID (VPID of <vm>, not 0)
  I invept 1 <vm> | 2                                  INVEPT single-context / global
  I invlpga <vm> <va>                 INVLPGA: one page of <vm>'s ASID
  I tlb_control <vm> 0|1|3|7          VMRUN of <vm> with that VMCB TLB_CONTROL
  An access in another VM or PCID than the current one implies the W and C lines; the replay
  starts in the host (VM 0, PCID 0). A malformed line stops the command (exit 2) naming FILE:LINE.
"""

MAX_VM = MAX_EPTP


class TraceError(ValueError):
    """A malformed trace line: ``str()`` reads ``FILE:LINE: what is wrong: 'the line'``."""

    def __init__(self, source: str, line: int, message: str, text: str) -> None:
        self.source, self.line, self.message, self.text = source, line, message, text
        super().__init__(f"{source}:{line}: {message}: {text.strip()!r}")


@dataclass
class Trace:
    """A compiled trace: ``pages`` holds the packed accesses (:func:`pykvm.model.tlb.pack_access`);
    ``events`` holds ``(index, event)`` pairs, each event taking effect before ``pages[index]``:
    ``("W", vm)``, ``("C", vm, pcid)`` or ``("I", name, args, line)``."""

    pages: list[int]
    events: list[tuple[int, tuple]]
    source: str = "<trace>"

    @property
    def accesses(self) -> int:
        return len(self.pages)

    def counts(self) -> dict[str, int]:
        """Events by kind (``W`` lines to the VM already running included)."""
        out = {"W": 0, "C": 0, "I": 0}
        for _, event in self.events:
            out[event[0]] += 1
        return out

    def write(self, fp: IO[str]) -> None:
        """Write the trace in the text format (it reads back to an equal trace, line numbers aside)."""
        vm, pcids = 0, {0: 0}
        pos = 0
        for epos, event in self.events + [(len(self.pages), None)]:
            pcid = pcids.get(vm, 0)
            for a in self.pages[pos:epos]:
                size = PageSize((a >> 1) & 3)
                va = (a >> 3) << size.shift
                fp.write(f"A {vm} {pcid} {va:#x}{'' if size == PageSize.SIZE_4K else ' ' + size.label}"
                         f"{' G' if a & 1 else ''}\n")
            pos = epos
            if event is None:
                break
            if event[0] == "W":
                vm = event[1]
                fp.write(f"W {vm}\n")
            elif event[0] == "C":
                pcids[vm] = event[2]
                fp.write(f"C {vm} {event[2]}\n")
            else:
                fp.write(f"I {invalidation_text(event[1], event[2])}\n")


def invalidation_text(name: str, args: tuple[int, ...]) -> str:
    """The ``I`` line (less the ``I``) of a parsed invalidation."""
    if name == "invlpg":
        return f"invlpg {args[0]:#x}"
    if name in ("invpcid", "invvpid"):
        type_, who, va = args
        return {0: f"{name} 0 {who} {va:#x}", 2: f"{name} 2"}.get(type_, f"{name} {type_}" + (
            "" if name == "invpcid" and type_ == 3 else f" {who}"))
    if name == "invept":
        return f"invept 1 {args[1]}" if args[0] == 1 else "invept 2"
    if name == "invlpga":
        return f"invlpga {args[0]} {args[1]:#x}"
    return f"tlb_control {args[0]} {args[1]}"


# ---- parsing --------------------------------------------------------------------------------------

class _Bad(Exception):
    pass


def _number(text: str, what: str, limit: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise _Bad(f"{what} {text!r} is not a number") from None
    if not 0 <= value <= limit:
        raise _Bad(f"{what} {value} is out of range (0-{limit})")
    return value


def _address(text: str, what: str = "address") -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise _Bad(f"{what} {text!r} is not a hex number") from None
    if not 0 <= value < 1 << 64:
        raise _Bad(f"{what} {text} is not a 64-bit address")
    return value


# name -> {type or None: (argument names)}; "va" arguments are hex addresses
_INVALIDATIONS: dict[str, dict[int | None, tuple[str, ...]]] = {
    "invlpg": {None: ("va",)},
    "invpcid": {0: ("pcid", "va"), 1: ("pcid",), 2: (), 3: ()},
    "invvpid": {0: ("vm", "va"), 1: ("vm",), 2: (), 3: ("vm",)},
    "invept": {1: ("vm",), 2: ()},
    "invlpga": {None: ("vm", "va")},
    "tlb_control": {None: ("vm", "value")},
}

_USAGE = {
    "invlpg": "I invlpg <va>",
    "invpcid": "I invpcid 0 <pcid> <va> | 1 <pcid> | 2 | 3",
    "invvpid": "I invvpid 0 <vm> <va> | 1 <vm> | 2 | 3 <vm>",
    "invept": "I invept 1 <vm> | 2",
    "invlpga": "I invlpga <vm> <va>",
    "tlb_control": "I tlb_control <vm> 0|1|3|7",
}


def _invalidation(fields: list[str]) -> tuple[str, tuple[int, ...]]:
    if len(fields) < 2:
        raise _Bad(f"an invalidation needs a kind ({', '.join(_INVALIDATIONS)})")
    name = fields[1].lower()
    forms = _INVALIDATIONS.get(name)
    if forms is None:
        raise _Bad(f"unknown invalidation {fields[1]!r} (one of {', '.join(_INVALIDATIONS)})")
    rest = fields[2:]
    if None in forms:
        type_ = None
        names = forms[None]
    else:
        if not rest:
            raise _Bad(f"{name} needs a type: {_USAGE[name]}")
        try:
            type_ = int(rest[0], 0)
        except ValueError:
            raise _Bad(f"{name} type {rest[0]!r} is not a number") from None
        if type_ not in forms:
            raise _Bad(f"{name} has no type {type_} (types: {', '.join(map(str, forms))})")
        names = forms[type_]
        rest = rest[1:]
    if len(rest) != len(names):
        raise _Bad(f"{name}{'' if type_ is None else f' type {type_}'} takes "
                   f"{len(names)} argument{'s' if len(names) != 1 else ''} after it: {_USAGE[name]}")
    values = {}
    for arg, text in zip(names, rest):
        if arg == "va":
            values[arg] = _address(text)
        elif arg == "pcid":
            values[arg] = _number(text, "PCID", MAX_PCID)
        elif arg == "vm":
            values[arg] = _number(text, "VM", MAX_VM)
        else:
            values[arg] = _number(text, "TLB_CONTROL", 255)
    if "vm" in values and values["vm"] == 0 and name in ("invvpid", "invept", "invlpga", "tlb_control"):
        what = {"invvpid": "VPID 0 is refused (VMfail)", "invept": "VM 0 is the host: it has no EPTP",
                "invlpga": "VM 0 is the host: use invlpg", "tlb_control": "a guest cannot run with ASID 0"}[name]
        raise _Bad(f"{name} of VM 0: {what}")
    if name == "tlb_control" and values["value"] not in TLB_CONTROL_VALUES:
        raise _Bad(f"TLB_CONTROL {values['value']} is reserved (0, 1, 3 or 7)")
    if name == "invlpg":
        return name, (values["va"],)
    if name == "invpcid":
        return name, (type_, values.get("pcid", 0), values.get("va", 0))
    if name == "invvpid":
        return name, (type_, values.get("vm", 0), values.get("va", 0))
    if name == "invept":
        return name, (type_, values.get("vm", 0))
    if name == "invlpga":
        return name, (values["vm"], values["va"])
    return name, (values["vm"], values["value"])


_SIZES = {"4K": 0, "2M": 1, "1G": 2}


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """Compile trace lines (the module docstring's format).  Raises :class:`TraceError`."""
    pages: list[int] = []
    events: list[tuple[int, tuple]] = []
    append = pages.append
    vm = 0
    pcids: dict[int, int] = {}
    pcid = 0
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        text = raw
        if "#" in text:
            text = text[:text.index("#")]
        fields = text.split()
        if not fields:
            continue
        op = fields[0]
        try:
            if op == "A" or op == "a":
                n = len(fields)
                if n < 4 or n > 6:
                    raise _Bad("an access is A <vm> <pcid> <va> [4K|2M|1G] [G]")
                v = _number(fields[1], "VM", MAX_VM)
                p = _number(fields[2], "PCID", MAX_PCID)
                va = _address(fields[3])
                size = glob = 0
                if n > 4:
                    extras = fields[4:]
                    if extras[-1] in ("G", "g"):
                        glob = 1
                        extras = extras[:-1]
                    if extras:
                        size = _SIZES.get(extras[0].upper(), -1)
                        if size < 0 or len(extras) > 1:
                            raise _Bad(f"{' '.join(fields[4:])!r} is not a page size (4K, 2M or 1G) "
                                       "and/or G (a global page)")
                if v != vm:
                    events.append((len(pages), ("W", v)))
                    vm = v
                    pcid = pcids.get(vm, 0)
                if p != pcid:
                    events.append((len(pages), ("C", vm, p)))
                    pcids[vm] = pcid = p
                append(((va >> (12 + 9 * size)) << 3) | (size << 1) | glob)
            elif op == "W" or op == "w":
                if len(fields) != 2:
                    raise _Bad("a world switch is W <vm>")
                v = _number(fields[1], "VM", MAX_VM)
                events.append((len(pages), ("W", v)))
                vm = v
                pcid = pcids.get(vm, 0)
            elif op == "C" or op == "c":
                if len(fields) != 3:
                    raise _Bad("a context switch is C <vm> <pcid>")
                v = _number(fields[1], "VM", MAX_VM)
                p = _number(fields[2], "PCID", MAX_PCID)
                if v != vm:
                    events.append((len(pages), ("W", v)))
                    vm = v
                events.append((len(pages), ("C", vm, p)))
                pcids[vm] = pcid = p
            elif op == "I" or op == "i":
                name, args = _invalidation(fields)
                events.append((len(pages), ("I", name, args, lineno)))
            else:
                raise _Bad(f"unknown event {op!r} (A access, W world switch, C context switch, I invalidation)")
        except _Bad as e:
            raise TraceError(source, lineno, str(e), raw) from None
    return Trace(pages, events, source)


def read_trace(path: str) -> Trace:
    """Parse a trace file (OSError if it cannot be read, :class:`TraceError` if a line is bad)."""
    with open(path, encoding="utf-8", errors="replace") as fp:
        return parse_trace(fp, path)


# ---- the generator --------------------------------------------------------------------------------

USER_REGIONS = (0x0000_5550_0000_0000, 0x0000_5560_0000_0000, 0x0000_7F00_0000_0000, 0x0000_7FF0_0000_0000)
KERNEL_TEXT = 0xFFFF_FFFF_8000_0000
KERNEL_DIRECT_MAP = 0xFFFF_8880_0000_0000
HOST_MODULES = 0xFFFF_FFFF_C000_0000


@dataclass(frozen=True)
class Workload:
    """The parameters of a generated trace (see the module docstring)."""

    vms: int = 4
    procs: int = 4
    working_set: int = 64
    kernel_pages: int = 32
    kernel_fraction: float = 0.2
    host_pages: int = 32
    host_accesses: int = 16
    zipf: float = 1.0
    accesses: int = 200_000
    world_switch_every: int = 1000
    context_switch_every: int = 2000
    seed: int = 1

    def __post_init__(self) -> None:
        checks = [("vms", self.vms, 1, MAX_VM), ("procs", self.procs, 1, MAX_PCID),
                  ("working_set", self.working_set, 1, 1 << 24), ("kernel_pages", self.kernel_pages, 0, 1 << 24),
                  ("host_pages", self.host_pages, 1, 1 << 24), ("host_accesses", self.host_accesses, 0, 1 << 30),
                  ("accesses", self.accesses, 1, 1 << 40), ("world_switch_every", self.world_switch_every, 0, 1 << 40),
                  ("context_switch_every", self.context_switch_every, 0, 1 << 40)]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"{name} must be {low}-{high}, not {value}")
        if not 0.0 <= self.kernel_fraction <= 1.0:
            raise ValueError(f"kernel_fraction must be 0-1, not {self.kernel_fraction}")
        if self.kernel_pages == 0 and self.kernel_fraction > 0:
            object.__setattr__(self, "kernel_fraction", 0.0)
        if self.zipf < 0:
            raise ValueError(f"the Zipf exponent must be 0 or more, not {self.zipf}")

    def to_json(self) -> dict:
        return asdict(self)

    def _zipf(self, rng: random.Random, n: int) -> list[float]:
        """Zipf weights for n pages in a random rank order."""
        ranks = list(range(1, n + 1))
        rng.shuffle(ranks)
        return [r ** -self.zipf for r in ranks]  # underflows to 0.0 for a huge exponent instead of overflowing

    def generate(self) -> Trace:
        """The trace (deterministic for the parameters, ``seed`` included)."""
        rng = random.Random(self.seed)
        per_region = -(-self.working_set // len(USER_REGIONS))

        def user_set() -> list[int]:
            """A process's pages: four regions (code, heap, libraries, stack), each at a base that
            ASLR randomizes per process."""
            vas = []
            for base in USER_REGIONS:
                start = base + rng.randrange(1 << 24) * 4096
                vas += [start + i * 4096 for i in range(per_region)]
            return [pack_access(va) for va in vas[:self.working_set]]

        def kernel_set(count: int, text_window: int) -> list[int]:
            """Global pages: half kernel text (KASLR: a 2 MiB-aligned base in a 1 GiB window), half
            spread over 256 MiB of the direct map (KASLR: a 1 GiB-aligned base)."""
            text = count // 2
            text_base = text_window + rng.randrange(256) * (2 << 20)
            direct_base = KERNEL_DIRECT_MAP + rng.randrange(64) * (1 << 30)
            direct = rng.sample(range(65536), count - text)
            vas = [text_base + i * 4096 for i in range(text)] + [direct_base + d * 4096 for d in direct]
            return [pack_access(va, PageSize.SIZE_4K, True) for va in vas]

        def cumulative(pops: list[tuple[list[int], float]]) -> tuple[list[int], list[float]]:
            population: list[int] = []
            weights: list[float] = []
            for pages, share in pops:
                if not pages or share <= 0:
                    continue
                w = self._zipf(rng, len(pages))
                total = sum(w)
                population += pages
                weights += [x * share / total for x in w]
            return population, list(itertools.accumulate(weights))

        kf = self.kernel_fraction
        procs = []  # procs[vm-1][i] = (population, cum_weights)
        for _ in range(self.vms):
            kernel = kernel_set(self.kernel_pages, KERNEL_TEXT)
            procs.append([cumulative([(user_set(), 1.0 - kf), (kernel, kf)]) for _ in range(self.procs)])
        host_pop, host_cw = cumulative([(kernel_set(self.host_pages, HOST_MODULES), 1.0)])

        def interval(mean: int) -> int:
            return max(1, round(rng.expovariate(1.0 / mean))) if mean else 1 << 62

        pages: list[int] = []
        events: list[tuple[int, tuple]] = []
        total = self.accesses
        vm, proc = 1, [0] * (self.vms + 1)
        events.append((0, ("W", 1)))
        events.append((0, ("C", 1, 1)))
        entered = {1}
        to_exit = interval(self.world_switch_every)
        to_switch = [interval(self.context_switch_every) for _ in range(self.vms + 1)]
        choices = rng.choices
        while len(pages) < total:
            n = min(to_exit, to_switch[vm], total - len(pages))
            population, cw = procs[vm - 1][proc[vm]]
            pages += choices(population, cum_weights=cw, k=n)
            to_exit -= n
            to_switch[vm] -= n
            if len(pages) >= total:
                break
            if to_switch[vm] == 0:
                if self.procs > 1:
                    nxt = rng.randrange(self.procs - 1)
                    proc[vm] = nxt + (nxt >= proc[vm])
                events.append((len(pages), ("C", vm, proc[vm] + 1)))
                to_switch[vm] = interval(self.context_switch_every)
            if to_exit == 0:
                events.append((len(pages), ("W", 0)))
                k = min(self.host_accesses, total - len(pages))
                pages += choices(host_pop, cum_weights=host_cw, k=k)
                vm = vm % self.vms + 1
                events.append((len(pages), ("W", vm)))
                if vm not in entered:  # its first process gets its PCID (the replay starts VMs at 0)
                    entered.add(vm)
                    events.append((len(pages), ("C", vm, 1)))
                to_exit = interval(self.world_switch_every)
        del pages[total:]
        return Trace(pages, events, f"workload(seed={self.seed})")
