"""ELF executables (x86 and x86-64) into guest memory, with pyelftools.

Each ``PT_LOAD`` segment is copied to its *physical* address (``p_paddr``), the way QEMU's
``load_elf`` and GRUB do it; the bytes past ``p_filesz`` up to ``p_memsz`` (the bss) are zeroed.
pykvm identity-maps (or does not page at all), so ``p_vaddr`` and ``p_paddr`` are normally equal;
where they differ the entry point is translated like GRUB does: ``e_entry`` is looked up in the
segment whose virtual range holds it and moved by that segment's ``p_paddr - p_vaddr``.

Only fixed-address executables (``ET_EXEC``) are loaded. A position-independent executable or a
shared object (``ET_DYN``) has no load address of its own, and pykvm does not relocate, so it is
refused with a message saying how to link the image instead.

Every problem is an :class:`ElfError` (an :class:`~pykvm.images.ImageError`) whose message names
the image and the problem in one line: not ELF, truncated, wrong machine, not an executable,
a segment that does not fit in guest memory, overlapping segments, ``p_filesz > p_memsz``, file
bytes past the end of the file, an entry point in no segment.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from ..images import ImageError
from ..x86 import layout

ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
HEADER_SIZE = {ELFCLASS32: 52, ELFCLASS64: 64}
PHENT_SIZE = {ELFCLASS32: 32, ELFCLASS64: 56}
PN_XNUM = 0xFFFF

#: The e_machine values pykvm loads, with a name for messages.
MACHINES = {"EM_386": "x86 (i386)", "EM_X86_64": "x86-64"}

_TYPE_HINTS = {
    "ET_DYN": "a position-independent executable or shared object (ET_DYN); pykvm loads only "
              "fixed-address executables (ET_EXEC) and does not relocate: link with -no-pie "
              "(gcc -static -no-pie, or ld without -pie) at a fixed address",
    "ET_REL": "a relocatable object file (ET_REL), not a linked executable: link it first (ld -T ...)",
    "ET_CORE": "a core dump (ET_CORE), not an executable",
    "ET_NONE": "an ELF file of no type (ET_NONE), not an executable",
}


class ElfError(ImageError):
    """An ELF image that cannot be loaded; the message names the image and what is wrong."""


class Range(NamedTuple):
    """A guest-physical range [start, end) and what it holds (for messages)."""

    start: int
    end: int
    what: str


class Segment(NamedTuple):
    """A loaded range of guest memory: ``size`` bytes at ``gpa`` (a ``(gpa, memsz)`` pair)."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class LoadSegment:
    """One ``PT_LOAD`` program header: ``index`` is its number in the program header table."""

    index: int
    gpa: int  # p_paddr: where it is loaded
    vaddr: int  # p_vaddr
    offset: int  # p_offset
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class ElfLayout:
    """What an ELF executable asks for, checked but not loaded yet (see :func:`parse_elf`)."""

    name: str
    bits: int  # 32 (ELFCLASS32) or 64 (ELFCLASS64)
    machine: str  # "EM_386" or "EM_X86_64"
    e_entry: int  # the entry as the header says it (a virtual address)
    entry: int  # the physical entry (e_entry moved into its segment's p_paddr range)
    load_segments: tuple[LoadSegment, ...]  # PT_LOAD segments with p_memsz > 0, in file order

    @property
    def segments(self) -> list[Segment]:
        return [Segment(s.gpa, s.memsz) for s in self.load_segments]


@dataclass(frozen=True)
class ElfImage:
    """An ELF executable loaded into guest memory."""

    entry: int  # physical entry address (what RIP/EIP is set to)
    segments: list[Segment]  # (gpa, memsz) of every PT_LOAD segment, in file order
    bits: int  # 32 or 64: the ELF class (not the mode the code expects)
    machine: str = "EM_386"
    e_entry: int = 0

    @property
    def start(self) -> int:
        return min(s.gpa for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


# ---- helpers shared with the multiboot loader ------------------------------------------------------


def format_size(size: int) -> str:
    """``4 MiB``, ``640 KiB`` or ``1234 bytes``: a memory size for messages."""
    if size and size % layout.MiB == 0:
        return f"{size // layout.MiB} MiB"
    if size and size % layout.KiB == 0:
        return f"{size // layout.KiB} KiB"
    return f"{size} bytes"


def system_ranges(mode=None) -> list[Range]:
    """The guest memory pykvm's own set-up writes for ``mode`` (default: protected mode), in pages.

    These are the tables :func:`pykvm.x86.modes.setup_mode` writes *after* a loader has run (GDT,
    IDT, TSS, exception stubs; page tables in the paged modes): an image loaded there would be
    overwritten, so loaders refuse it.
    """
    from ..x86.modes import Mode, system_tables  # x86.modes imports nothing from loaders

    mode = Mode.PROTECTED if mode is None else Mode(mode)
    pages = sorted(
        (gpa // layout.PAGE_SIZE * layout.PAGE_SIZE, -(-(gpa + len(data)) // layout.PAGE_SIZE) * layout.PAGE_SIZE)
        for gpa, data in system_tables(mode).items()
    )
    merged: list[list[int]] = []
    for start, end in pages:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if mode is Mode.REAL:
        what = "pykvm's real-mode system tables (interrupt vector table, exception stubs)"
    else:
        paging = ", page tables" if mode is not Mode.PROTECTED else ""
        what = f"pykvm's {mode.value}-mode system tables (GDT, IDT, TSS, exception stubs{paging})"
    return [Range(start, end, what) for start, end in merged]


def check_fits(memory, gpa: int, size: int, what: str, name: str, error=ElfError) -> None:
    """Raise ``error`` unless guest RAM backs [gpa, gpa + size)."""
    region = memory.region_at(gpa) if gpa >= 0 else None
    if region is None or not region.contains(gpa, size):
        raise error(
            f"{name}: {what} at {gpa:#x} (size {size:#x}) does not fit in {format_size(memory.size)} "
            f"of guest memory; use --mem"
        )


def check_reserved(gpa: int, size: int, reserved: Iterable[Range], what: str, name: str, error=ElfError) -> None:
    """Raise ``error`` if [gpa, gpa + size) overlaps one of the ``reserved`` ranges."""
    for r in reserved:
        if gpa < r.end and r.start < gpa + size:
            raise error(
                f"{name}: {what} at {gpa:#x}-{gpa + size:#x} overlaps {r.what} at {r.start:#x}-{r.end:#x}; "
                f"link the image elsewhere (1 MiB, {layout.PROTECTED_LOAD:#x}, is the usual place)"
            )


# ---- parsing ----------------------------------------------------------------------------------------


def _check_ident(data: bytes, name: str) -> int:
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise ElfError(f"{name}: not an ELF file (it does not start with the \\x7fELF magic)")
    if len(data) < EI_NIDENT:
        raise ElfError(f"{name}: truncated ELF header: the file is {len(data)} bytes, "
                       f"the identification alone is {EI_NIDENT}")
    klass, encoding = data[4], data[5]
    if klass not in HEADER_SIZE:
        raise ElfError(f"{name}: malformed ELF header: unknown class {klass} (1 is ELF32, 2 is ELF64)")
    if encoding == ELFDATA2MSB:
        raise ElfError(f"{name}: a big-endian ELF file; x86 images are little-endian")
    if encoding != ELFDATA2LSB:
        raise ElfError(f"{name}: malformed ELF header: unknown data encoding {encoding}")
    need = HEADER_SIZE[klass]
    if len(data) < need:
        raise ElfError(f"{name}: truncated ELF header: the file is {len(data)} bytes, "
                       f"an ELF{32 * klass} header is {need}")
    return klass


def parse_elf(data: bytes, *, name: str = "image") -> ElfLayout:
    """Check an x86 ELF executable and return its load layout; raises :class:`ElfError`."""
    from elftools.common.exceptions import ELFError, ELFParseError  # here: only an ELF image pays for pyelftools
    from elftools.elf.elffile import ELFFile

    data = bytes(data)
    klass = _check_ident(data, name)
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
    except (ELFError, ELFParseError, ValueError) as e:  # pyelftools on a header it cannot read
        raise ElfError(f"{name}: malformed ELF header: {e}") from None

    machine = header["e_machine"]
    if machine not in MACHINES:
        raise ElfError(f"{name}: an ELF file for machine {machine}, not x86 or x86-64 (EM_386, EM_X86_64)")
    e_type = header["e_type"]
    if e_type != "ET_EXEC":
        hint = _TYPE_HINTS.get(e_type, f"of type {e_type}, not an executable (ET_EXEC)")
        raise ElfError(f"{name}: {hint}")

    phoff, phnum, phentsize = header["e_phoff"], header["e_phnum"], header["e_phentsize"]
    if phnum == 0:
        raise ElfError(f"{name}: the ELF file has no program headers: nothing to load")
    if phnum == PN_XNUM:
        raise ElfError(f"{name}: more than 65534 program headers (PN_XNUM) is not supported")
    if phentsize != PHENT_SIZE[klass]:
        raise ElfError(f"{name}: malformed ELF header: program header size {phentsize}, "
                       f"ELF{32 * klass} needs {PHENT_SIZE[klass]}")
    table_end = phoff + phnum * phentsize
    if table_end > len(data):
        raise ElfError(f"{name}: truncated ELF file: the program headers ({phoff:#x}-{table_end:#x}) "
                       f"run past the end of the file ({len(data)} bytes)")

    limit = 1 << (32 if klass == ELFCLASS32 else 64)
    segments: list[LoadSegment] = []
    try:
        for index, seg in enumerate(elf.iter_segments()):
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0 and seg["p_filesz"] == 0:
                continue
            s = LoadSegment(index, seg["p_paddr"], seg["p_vaddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"])
            if s.filesz > s.memsz:
                raise ElfError(f"{name}: malformed segment {index}: p_filesz {s.filesz:#x} is larger "
                               f"than p_memsz {s.memsz:#x}")
            if s.offset + s.filesz > len(data):
                raise ElfError(f"{name}: truncated ELF file: segment {index} needs file bytes "
                               f"{s.offset:#x}-{s.offset + s.filesz:#x}, the file is {len(data):#x} bytes")
            if s.gpa + s.memsz > limit:
                raise ElfError(f"{name}: segment {index} at {s.gpa:#x} (size {s.memsz:#x}) wraps past "
                               f"the end of the address space")
            segments.append(s)
    except (ELFError, ELFParseError) as e:
        raise ElfError(f"{name}: malformed program header: {e}") from None
    if not segments:
        raise ElfError(f"{name}: the ELF file has no PT_LOAD segment: nothing to load")

    ordered = sorted(segments, key=lambda s: s.gpa)
    for a, b in zip(ordered, ordered[1:]):
        if b.gpa < a.end:
            raise ElfError(f"{name}: segments {a.index} ({a.gpa:#x}-{a.end:#x}) and {b.index} "
                           f"({b.gpa:#x}-{b.end:#x}) overlap")

    e_entry = header["e_entry"]
    home = next((s for s in segments if s.vaddr <= e_entry < s.vaddr + s.memsz), None)
    if home is None:
        raise ElfError(f"{name}: the entry point {e_entry:#x} is in no loaded segment")
    entry = e_entry - home.vaddr + home.gpa
    return ElfLayout(name, 32 * klass, machine, e_entry, entry, tuple(segments))


# ---- loading ----------------------------------------------------------------------------------------


def write_segments(memory, data: bytes, elf: ElfLayout) -> None:
    """Copy each segment's file bytes to its gpa and zero the rest of its p_memsz (the bss)."""
    for s in elf.load_segments:
        view = memory.view(s.gpa, s.memsz)
        view[: s.filesz] = data[s.offset : s.offset + s.filesz]
        view[s.filesz :] = bytes(s.memsz - s.filesz)


def load_elf(memory, data: bytes, *, name: str = "image", reserved: Iterable[Range] | None = None) -> ElfImage:
    """Load an x86 ELF executable into ``memory`` (a :class:`~pykvm.memory.GuestMemory`).

    ``reserved``: guest ranges no segment may touch; by default :func:`system_ranges` of protected
    mode (the tables every 32- and 64-bit mode set-up writes). Pass ``system_ranges(mode)`` for the
    mode the image will run in, or ``()`` to check nothing. Nothing is written unless every
    segment passes every check.
    """
    data = bytes(data)
    elf = parse_elf(data, name=name)
    reserved = system_ranges() if reserved is None else list(reserved)
    for s in elf.load_segments:
        check_fits(memory, s.gpa, s.memsz, f"segment {s.index}", name)
        check_reserved(s.gpa, s.memsz, reserved, f"segment {s.index}", name)
    write_segments(memory, data, elf)
    return ElfImage(elf.entry, elf.segments, elf.bits, elf.machine, elf.e_entry)
