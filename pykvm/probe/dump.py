"""Parse CPUID dumps into per-CPU CPUID tables and MSR values.

Two formats are read, and told apart by their first non-blank line (see ``cpuid -r`` below).

The format, as published by InstLatx64 (real examples: ``tests/data/cpuid/``, described in its
``README.md``)::

    ------[ CPUID Registers / Logical CPU #0 ]------        (older dumps: "Logical CPU #0")
    CPUID 00000000: 00000020-756E6547-6C65746E-49656E69 [GenuineIntel]
    CPUID 00000004: FC004121-02C0003F-0000003F-00000000 [SL 00] [L1D: 48 KB]
    ------[ MSR Registers / Logical CPU #0 ]------          (older dumps: one "MSR Registers")
    MSR 00000480: 03DA-0500-0000-0013
    MSR 00000049: < FAILED >
    MSR 000000E7: 0000-0000-81C3-8125 [S200]

* ``[SL nn]`` is the sub-leaf (ECX input, hex). A line without it is sub-leaf 0 when it is the
  only untagged line of its leaf in its section.
* Older dumps have no ``[SL nn]`` tags and list a leaf's sub-leaves as repeated lines, e.g. four
  ``CPUID 00000004:`` lines in a row for four caches. So within one section (the count restarts
  at every ``------[ ... ]------`` header, and the text before the first header is a section too)
  the untagged lines of a leaf are its sub-leaves 0, 1, 2, ... in the order they appear.
* An untagged line identical to the one before it is still the next sub-leaf, not a duplicate:
  sub-leaves with equal registers are real (a run of all-zero sub-leaves of leaf 0Dh, say), and
  dropping one would renumber every sub-leaf after it.
* Tagged and untagged lines of the same leaf in one section are not an error in themselves: the
  untagged ones are numbered as above, the tagged ones take their tag. Two lines that land on
  the same sub-leaf of the same logical CPU (in one section or in two) must agree: the same
  record twice is harmless, two different values raise :class:`DumpFormatError` naming the line
  it differs from (and, for an untagged line, which untagged line of the leaf it was).
* Anything after the registers in brackets is a free-form comment (it can hold unbalanced
  brackets, e.g. ``[L2: 2048 KB] / L3: 0 KB]``) and is ignored.
* A register read several times (AIDA64 samples some and marks all but the last ``[S200]``) keeps
  the last value. ``< FAILED >`` reads are recorded in :attr:`LogicalCpu.failed_msrs`.
* Everything else (headers, ``Key : value`` info lines, cache summaries, clock measurements, APIC
  hex dumps) is not a record and is skipped; ``Key : value`` lines of the "Versions", "CPU Info"
  and "Motherboard Info" sections are kept in :attr:`Dump.info`.

A line that starts like a record (``CPUID`` or ``MSR`` followed by a hexadecimal index) but does
not parse raises :class:`DumpFormatError` (a ``ValueError``) naming the line number and the line.
A text that holds no CPUID record at all raises :class:`NotADumpError` (also a ``ValueError``).

``cpuid -r``: the raw output of the Linux ``cpuid`` tool (Todd Allen's; Debian package ``cpuid``)::

    CPU 0:                                                  (``cpuid -1 -r``: a bare "CPU:")
       0x00000000 0x00: eax=0x0000001c ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65
       0x00000007 0x01: eax=0x00000020 ebx=0x00000000 ecx=0x00000000 edx=0x00000000

* Each record is leaf, sub-leaf (ECX input) and the four registers, all hexadecimal.
* A text is in this format when its first non-blank line is a ``CPU N:`` header or starts like
  a record (``0x`` and a hex digit). Records before any header belong to logical CPU 0, as does
  the bare ``CPU:`` header.
* There are no MSRs and no info lines: every non-blank line must be a header or a record, and a
  header must be followed by at least one record (a header at the end means a cut-off file).
  Anything else raises :class:`DumpFormatError` naming the line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from .cpuid import CpuidTable

__all__ = [
    "Dump",
    "DumpFormatError",
    "LogicalCpu",
    "NotADumpError",
    "looks_like_dump",
    "parse_dump",
    "read_dump",
]

_HEX8 = r"[0-9A-Fa-f]{8}"
_CPUID_RE = re.compile(
    rf"^CPUID\s+(?P<leaf>{_HEX8})\s*:\s*"
    rf"(?P<eax>{_HEX8})-(?P<ebx>{_HEX8})-(?P<ecx>{_HEX8})-(?P<edx>{_HEX8})"
    r"(?:\s+\[SL\s+(?P<sub>[0-9A-Fa-f]{1,8})\])?"
    r"(?:\s+(?P<comment>\[.*))?$"
)
_H4 = r"[0-9A-Fa-f]{4}"
_MSR_RE = re.compile(
    rf"^MSR\s+(?P<index>{_HEX8})\s*:\s*"
    rf"(?:(?P<value>{_H4}-{_H4}-{_H4}-{_H4})|(?P<failed><\s*FAILED\s*>))"
    r"(?:\s+(?P<comment>\[.*))?$"
)
_RAW_HEADER_RE = re.compile(r"^CPU(?:\s+(?P<index>\d+))?\s*:$")
_RAW_RECORD_RE = re.compile(
    rf"^0x(?P<leaf>{_HEX8})\s+0x(?P<sub>[0-9A-Fa-f]{{1,8}})\s*:"
    rf"\s+eax=0x(?P<eax>{_HEX8})\s+ebx=0x(?P<ebx>{_HEX8})"
    rf"\s+ecx=0x(?P<ecx>{_HEX8})\s+edx=0x(?P<edx>{_HEX8})$"
)
_RAW_START_RE = re.compile(r"^0x[0-9A-Fa-f]")
_NO_RECORDS = "CPU header without records (cut-off cpuid -r output?)"
# A line that claims to be a record: the keyword, then a token that is an index (hex digits, or
# anything with a digit in it). "CPUID Manufacturer: ..." and "CPUID CPU Name : ..." are info lines.
_CANDIDATE_RE = re.compile(r"^(?P<kind>CPUID|MSR)\s+(?P<token>[^\s:]+)")
_SL_RE = re.compile(r"^\[\s*SL\b")  # a comment that starts like a sub-leaf marker
_SECTION_RE = re.compile(r"^-{3,}\[\s*(?P<title>.*?)\s*\]-{3,}$")
_CPU_IN_TITLE_RE = re.compile(r"Logical CPU\s*#\s*(\d+)")
_INFO_RE = re.compile(r"^(?P<key>[^:]*?\S)\s*:\s(?P<value>.*)$")
_INFO_SECTIONS = frozenset({"Versions", "CPU Info", "Motherboard Info"})


class DumpFormatError(ValueError):
    """A line of a CPUID/MSR dump that looks like a record but does not parse."""

    def __init__(self, source: str, lineno: int, line: str, reason: str) -> None:
        self.source = source
        self.lineno = lineno
        self.line = line
        self.reason = reason
        super().__init__(f"{source}: line {lineno}: {reason}: {line!r}")


class NotADumpError(ValueError):
    """The input is not a CPUID dump at all (neither AIDA64/InstLatx64 nor ``cpuid -r``)."""


@dataclass(frozen=True)
class LogicalCpu:
    """One logical CPU of a dump: its CPUID table and the MSRs read on it."""

    index: int
    cpuid: CpuidTable
    msrs: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    failed_msrs: frozenset[int] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "cpuid": self.cpuid.to_json(),
            "msrs": [{"index": k, "value": v} for k, v in sorted(self.msrs.items())],
            "failed_msrs": sorted(self.failed_msrs),
        }


@dataclass(frozen=True)
class Dump:
    """A parsed dump.

    ``cpus`` holds every logical CPU that has a CPUID or an MSR section, by ascending index.
    Older dumps have a single "MSR Registers" section that names no CPU; its registers are in
    ``unassigned_msrs`` (and ``unassigned_failed_msrs``), not attributed to any CPU.
    """

    source: str
    cpus: tuple[LogicalCpu, ...]
    unassigned_msrs: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    unassigned_failed_msrs: frozenset[int] = frozenset()
    info: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def first(self) -> LogicalCpu:
        """The lowest-numbered logical CPU that has CPUID data."""
        for cpu in self.cpus:
            if cpu.cpuid:
                return cpu
        raise LookupError(f"{self.source}: no logical CPU with CPUID data")  # pragma: no cover

    @property
    def cpuid(self) -> CpuidTable:
        """The first logical CPU's CPUID table."""
        return self.first.cpuid

    @property
    def msrs(self) -> Mapping[int, int]:
        """The first logical CPU's MSRs; for single-MSR-section dumps, that section's MSRs."""
        first = self.first
        if first.msrs or first.failed_msrs:
            return first.msrs
        return self.unassigned_msrs

    @property
    def failed_msrs(self) -> frozenset[int]:
        """The MSRs whose read failed, from the same section as :attr:`msrs`."""
        first = self.first
        if first.msrs or first.failed_msrs:
            return first.failed_msrs
        return self.unassigned_failed_msrs

    def cpu(self, index: int) -> LogicalCpu:
        """The logical CPU numbered ``index`` in the dump."""
        for cpu in self.cpus:
            if cpu.index == index:
                return cpu
        raise KeyError(f"{self.source}: no logical CPU #{index}")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "info": dict(self.info),
            "cpus": [cpu.to_json() for cpu in self.cpus],
            "unassigned_msrs": [
                {"index": k, "value": v} for k, v in sorted(self.unassigned_msrs.items())
            ],
            "unassigned_failed_msrs": sorted(self.unassigned_failed_msrs),
        }


class _Where(NamedTuple):
    """Where a record was read, for error messages."""

    source: str
    lineno: int
    line: str
    cpu: int


def _regs(m: re.Match[str]) -> tuple[int, int, int, int]:
    return (int(m["eax"], 16), int(m["ebx"], 16), int(m["ecx"], 16), int(m["edx"], 16))


class _CpuBuilder:
    def __init__(self) -> None:
        self.cpuid: dict[tuple[int, int], tuple[tuple[int, int, int, int], int]] = {}
        self.msrs: dict[int, int] = {}
        self.failed: set[int] = set()

    def add_cpuid(
        self,
        leaf: int,
        sub: int,
        regs: tuple[int, int, int, int],
        where: _Where,
        untagged_nth: int | None = None,
    ) -> None:
        # The same record twice is harmless; two different values are not. ``untagged_nth`` is
        # set when ``sub`` was inferred from the line's position (the n-th untagged line, from 1).
        previous = self.cpuid.get((leaf, sub))
        if previous is None:
            self.cpuid[(leaf, sub)] = (regs, where.lineno)
        elif previous[0] != regs:
            how = "" if untagged_nth is None else (
                f" (untagged line {untagged_nth} of the leaf in its section)"
            )
            raise DumpFormatError(
                where.source,
                where.lineno,
                where.line,
                f"CPUID {leaf:08X} sub-leaf {sub:#x}{how} of logical CPU #{where.cpu} "
                f"differs from line {previous[1]}",
            )

    def add_msr(self, index: int, value: int | None) -> None:
        # The last read of a register wins, a failed one included.
        if value is None:
            self.msrs.pop(index, None)
            self.failed.add(index)
        else:
            self.failed.discard(index)
            self.msrs[index] = value


def _is_candidate(stripped: str) -> bool:
    m = _CANDIDATE_RE.match(stripped)
    if m is None:
        return False
    token = m.group("token")
    return all(c in "0123456789abcdefABCDEF" for c in token) or any(c.isdigit() for c in token)


def looks_like_dump(text: str) -> bool:
    """True if ``text`` holds at least one well-formed record line of either format."""
    return any(
        _CPUID_RE.match(s) or _RAW_RECORD_RE.match(s)
        for s in (line.strip() for line in text.splitlines())
    )


def _is_cpuid_r(text: str) -> bool:
    """Whether ``text`` is ``cpuid -r`` output: its first non-blank line is a header or a record."""
    for line in text.splitlines():
        stripped = line.strip().lstrip("\ufeff")
        if stripped:
            return bool(_RAW_HEADER_RE.match(stripped) or _RAW_START_RE.match(stripped))
    return False


def _parse_cpuid_r(text: str, source: str) -> Dump:
    """Parse ``cpuid -r`` output (see the module docstring)."""
    cpus: dict[int, _CpuBuilder] = {}
    headers: dict[int, int] = {}  # CPU index -> line number of its header
    cpu, header_line, header_lineno = 0, "", 0  # the open header, if it has no record yet

    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip().lstrip("\ufeff")
        if not stripped:
            continue
        hm = _RAW_HEADER_RE.match(stripped)
        if hm is not None:
            if header_lineno:
                raise DumpFormatError(source, header_lineno, header_line, _NO_RECORDS)
            cpu = int(hm["index"]) if hm["index"] is not None else 0
            if cpu in headers:
                reason = f"logical CPU #{cpu} listed twice (first on line {headers[cpu]})"
                raise DumpFormatError(source, lineno, line, reason)
            headers[cpu] = lineno
            header_line, header_lineno = line, lineno
            continue
        m = _RAW_RECORD_RE.match(stripped)
        if m is None:
            record_like = _RAW_START_RE.match(stripped)
            reason = "malformed cpuid -r record" if record_like else "not a cpuid -r line"
            raise DumpFormatError(source, lineno, line, reason)
        cpus.setdefault(cpu, _CpuBuilder()).add_cpuid(
            int(m["leaf"], 16), int(m["sub"], 16), _regs(m), _Where(source, lineno, line, cpu)
        )
        header_lineno = 0
    if header_lineno:
        raise DumpFormatError(source, header_lineno, header_line, _NO_RECORDS)
    return _build(source, cpus)


def _build(
    source: str,
    cpus: dict[int, _CpuBuilder],
    unassigned: _CpuBuilder | None = None,
    info: dict[str, str] | None = None,
) -> Dump:
    unassigned = unassigned or _CpuBuilder()
    return Dump(
        source=source,
        cpus=tuple(
            LogicalCpu(
                index=i,
                cpuid=CpuidTable({k: v[0] for k, v in b.cpuid.items()}),
                msrs=MappingProxyType(dict(sorted(b.msrs.items()))),
                failed_msrs=frozenset(b.failed),
            )
            for i, b in sorted(cpus.items())
        ),
        unassigned_msrs=MappingProxyType(dict(sorted(unassigned.msrs.items()))),
        unassigned_failed_msrs=frozenset(unassigned.failed),
        info=MappingProxyType(info or {}),
    )


def parse_dump(text: str, source: str = "<string>") -> Dump:
    """Parse the text of a dump (either format). Raises DumpFormatError or NotADumpError
    (both ValueError)."""
    if _is_cpuid_r(text):
        return _parse_cpuid_r(text, source)
    cpus: dict[int, _CpuBuilder] = {}
    unassigned = _CpuBuilder()
    info: dict[str, str] = {}
    section = ""
    section_cpu: int | None = None
    untagged: dict[int, int] = {}  # leaf -> its untagged lines so far in this section
    n_cpuid = 0

    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip().lstrip("\ufeff")
        if not stripped:
            continue
        sm = _SECTION_RE.match(stripped)
        if sm is not None:
            section = sm.group("title")
            cm = _CPU_IN_TITLE_RE.search(section)
            section_cpu = int(cm.group(1)) if cm else None
            untagged = {}
            continue
        if not _is_candidate(stripped):
            if section in _INFO_SECTIONS:
                im = _INFO_RE.match(stripped)
                if im is not None:
                    info.setdefault(im.group("key"), im.group("value").strip())
            continue

        if stripped.startswith("CPUID"):
            m = _CPUID_RE.match(stripped)
            if m is None:
                raise DumpFormatError(source, lineno, line, "malformed CPUID line")
            if m.group("comment") and _SL_RE.match(m.group("comment")):
                raise DumpFormatError(source, lineno, line, "malformed sub-leaf marker")
            leaf = int(m.group("leaf"), 16)
            nth: int | None = None
            if m.group("sub"):
                sub = int(m.group("sub"), 16)
            else:  # older dumps: the n-th untagged line of a leaf in a section is sub-leaf n-1
                sub = untagged.get(leaf, 0)
                untagged[leaf] = nth = sub + 1
            cpu_index = 0 if section_cpu is None else section_cpu
            cpus.setdefault(cpu_index, _CpuBuilder()).add_cpuid(
                leaf, sub, _regs(m), _Where(source, lineno, line, cpu_index), nth
            )
            n_cpuid += 1
        else:
            m = _MSR_RE.match(stripped)
            if m is None:
                raise DumpFormatError(source, lineno, line, "malformed MSR line")
            index = int(m.group("index"), 16)
            value = None if m.group("failed") else int(m.group("value").replace("-", ""), 16)
            if section_cpu is None:
                unassigned.add_msr(index, value)
            else:
                cpus.setdefault(section_cpu, _CpuBuilder()).add_msr(index, value)

    if n_cpuid == 0:
        raise NotADumpError(
            f"{source}: not an AIDA64/InstLatx64 CPUID dump "
            "(no 'CPUID LLLLLLLL: EAX-EBX-ECX-EDX' line found) nor `cpuid -r` output"
        )

    return _build(source, cpus, unassigned, info)


def _decode(data: bytes) -> str | None:
    """Text of a dump file (UTF-8, UTF-16 with BOM, or Latin-1), or None if it is binary."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_dump(path: str | os.PathLike[str]) -> Dump:
    """Read and parse a dump file.

    Raises NotADumpError (a ValueError) with a message saying so if the file is not a CPUID
    dump at all (binary, empty, or without any CPUID record), DumpFormatError for a malformed
    record line, and OSError if the file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    text = _decode(data)
    if text is None:
        raise NotADumpError(f"{name}: not an AIDA64/InstLatx64 CPUID dump (binary data)")
    return parse_dump(text, source=name)
