"""Multiboot (version 1, spec 0.6.96) kernels, loaded the way QEMU's ``-kernel`` and GRUB load them.

The image
  A multiboot kernel carries a header (magic ``0x1BADB002``, flags, checksum; then the "a.out
  kludge" address fields and the video fields when its flags ask for them), 32-bit aligned and
  wholly inside the file's first 8192 bytes. With flag bit 16 the address fields say where the
  file's bytes go (``load_addr`` .. ``load_end_addr``, zeroed up to ``bss_end_addr``) and where to
  enter (``entry_addr``), whatever the file's format; without it the file must be ELF and its
  ``PT_LOAD`` segments are loaded (by ``p_paddr``) and entered at the ELF entry, as both QEMU and
  GRUB do. ELF64 files are accepted as GRUB 2 accepts them (segments and entry below 4 GiB, entered
  in 32-bit mode all the same); QEMU 7.2 refuses an x86-64 ELF without the a.out kludge
  ("Cannot load x86-64 image, give a 32bit one.").

Header flags: bit 0 (modules page-aligned) is always honoured, as QEMU does; bit 1 (memory
information) is always given; bit 2 (video mode) cannot be met - there is no display - so, like
QEMU ("multiboot knows VBE. we don't."), the kernel is loaded anyway and :attr:`BootInfo.warnings`
says so; any other bit in 3-15 (a requirement this loader does not know) refuses the image, as the
spec demands. Bits 17-31 are ignored.

The boot information (what EBX points at)
  ``flags`` = MEMORY | CMDLINE | MODS | MMAP | BOOT_LOADER_NAME (0x24d; QEMU also sets
  BOOT_DEVICE, pykvm has no boot disk). ``cmdline`` is the image's path, a space, then the user's
  arguments (just the path when there are none; QEMU always adds the space). Each module's string
  is its path, a space, then its arguments (just the path without them), as GRUB's ``module`` line
  and QEMU's ``-initrd "file args,..."``. ``boot_loader_name`` is "pykvm".

  The memory map is QEMU's low-memory layout (SeaBIOS's e820), with RAM from 1 MiB to the end of
  guest memory, and one more reservation - the guest memory pykvm's own protected-mode set-up
  keeps live after the loader has run (GDT, IDT, TSS and the exception stubs that report an
  unhandled exception, ``0x10000-0x16000``): reported as reserved so a kernel that allocates
  from the map does not overwrite them::

      0x00000000-0x00010000  available     0x00010000-0x00016000  reserved (pykvm's tables)
      0x00016000-0x0009fc00  available     0x0009fc00-0x000a0000  reserved (EBDA in a PC)
      0x000f0000-0x00100000  reserved      0x00100000-end of RAM  available

  ``mem_lower`` = 639 KiB (the first entry's end, 0x9fc00, as a PC's BIOS reports it: QEMU gives
  639 too) and ``mem_upper`` = the KiB of RAM from 1 MiB to the end of guest memory (pykvm has no
  hole below it; QEMU's is smaller by its ACPI tables).

Where things go
  The kernel where it asks to be. Modules page-aligned, the first at the first free page after
  the kernel's end, each next one after the one before. The boot information (the info
  structure, the memory map, the module list and every string, one block) at the lowest page-
  aligned place of *available* memory, from 0x1000 up, that overlaps no kernel segment, no module,
  none of pykvm's tables and not the page below pykvm's initial stack pointer (ESP is undefined
  for a multiboot kernel, but pykvm starts it at ``layout.STACK_TOP``). With a kernel at 1 MiB that
  is 0x1000 (QEMU uses 0x9000-0x9500). A kernel segment that overlaps pykvm's tables is refused.

The machine state (:func:`setup_multiboot`)
  ``setup_mode(vcpu, memory, Mode.PROTECTED, entry)`` gives what the spec requires: CS a flat
  32-bit read/execute segment (base 0, limit 0xFFFFFFFF), DS/ES/FS/GS/SS flat 32-bit read/write,
  CR0.PE set and CR0.PG clear, EFLAGS = 0x2 (IF and VM clear), and KVM has no A20 gate (always
  enabled). Then EAX = 0x2BADB002 and EBX = the info's address. ESP is STACK_TOP (the spec leaves
  it undefined), GDTR and IDTR point at pykvm's tables.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from ..images import ImageError
from ..x86 import layout
from .elf import ELF_MAGIC, Range, Segment, check_fits, check_reserved, format_size, parse_elf, system_ranges, write_segments

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002  # EAX at the kernel's entry
SEARCH_LIMIT = 8192  # the header lies wholly within the file's first 8192 bytes, 32-bit aligned

# Header flags (what the kernel asks of the boot loader).
HEADER_PAGE_ALIGN = 1 << 0  # boot modules on 4 KiB boundaries
HEADER_MEMORY_INFO = 1 << 1  # mem_lower/mem_upper (and the memory map) required
HEADER_VIDEO_MODE = 1 << 2  # video mode table / the mode_type..depth fields
HEADER_AOUT_KLUDGE = 1 << 16  # header_addr..entry_addr are valid: load by them, not as ELF
HEADER_REQUIRED_MASK = 0xFFFF  # bits 0-15: requirements; a loader that cannot meet one must refuse
HEADER_KNOWN = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE

# Info flags (which fields of the boot information are valid).
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_AOUT_SYMS = 1 << 4
INFO_ELF_SHDR = 1 << 5
INFO_MEM_MAP = 1 << 6
INFO_DRIVE_INFO = 1 << 7
INFO_CONFIG_TABLE = 1 << 8
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_APM_TABLE = 1 << 10
INFO_VBE_INFO = 1 << 11
INFO_FRAMEBUFFER_INFO = 1 << 12
INFO_FLAGS = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME

# struct multiboot_info: byte offsets of the fields (spec 3.3).
INFO_OFFSETS = {
    "flags": 0, "mem_lower": 4, "mem_upper": 8, "boot_device": 12, "cmdline": 16,
    "mods_count": 20, "mods_addr": 24, "syms": 28, "mmap_length": 44, "mmap_addr": 48,
    "drives_length": 52, "drives_addr": 56, "config_table": 60, "boot_loader_name": 64,
    "apm_table": 68, "vbe_control_info": 72, "vbe_mode_info": 76, "vbe_mode": 80,
    "vbe_interface_seg": 82, "vbe_interface_off": 84, "vbe_interface_len": 86,
    "framebuffer_addr": 88,
}
INFO_SIZE = 116  # through the framebuffer fields (0.6.96); QEMU writes the first 88 bytes
MODULE_SIZE = 16  # mod_start, mod_end, string, reserved
MMAP_ENTRY_SIZE = 24  # size (= 20: it does not count itself), base_addr u64, length u64, type
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2

BOOT_LOADER_NAME = "pykvm"

# QEMU's (SeaBIOS's) low-memory map: the last KiB below 640 KiB (EBDA) and the BIOS area reserved.
LOW_MEMORY_END = 0x9FC00
EBDA = Range(0x9FC00, 0xA0000, "the EBDA")
BIOS_AREA = Range(0xF0000, 0x100000, "the BIOS area")
HIGH_MEMORY = 0x100000
FIRST_INFO_GPA = 0x1000  # never page 0: a null-looking EBX helps no one


class MultibootError(ImageError):
    """A multiboot kernel (or header) that cannot be loaded; the message names the problem."""


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _align(value: int, alignment: int = layout.PAGE_SIZE) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class MultibootHeader:
    """A valid multiboot header found at file ``offset``; address/video fields None unless flagged."""

    offset: int
    flags: int
    checksum: int
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None
    mode_type: int | None = None
    width: int | None = None
    height: int | None = None
    depth: int | None = None

    @property
    def page_align(self) -> bool:
        return bool(self.flags & HEADER_PAGE_ALIGN)

    @property
    def memory_info(self) -> bool:
        return bool(self.flags & HEADER_MEMORY_INFO)

    @property
    def video_mode(self) -> bool:
        return bool(self.flags & HEADER_VIDEO_MODE)

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & HEADER_AOUT_KLUDGE)


class Module(NamedTuple):
    """A boot module to load: its path (named in its string), its bytes, and its arguments."""

    path: str
    data: bytes
    args: str = ""


class LoadedModule(NamedTuple):
    """A module in guest memory: [gpa, gpa + size) and the string its entry points at."""

    gpa: int
    size: int
    string: str
    path: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


class MmapEntry(NamedTuple):
    base: int
    length: int
    type: int

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass(frozen=True)
class BootInfo:
    """A loaded multiboot kernel: where to enter, what to put in EAX/EBX, and what went where."""

    entry: int  # EIP
    info_gpa: int  # EBX: the struct multiboot_info
    info_size: int  # bytes of the boot-information block at info_gpa (info, mmap, mods, strings)
    segments: list[Segment]  # the kernel's loaded ranges (ELF PT_LOADs, or the a.out kludge range)
    modules: list[LoadedModule]
    cmdline: str
    mmap: list[MmapEntry]
    mem_lower: int  # KiB
    mem_upper: int  # KiB
    flags: int  # the info's flags
    header: MultibootHeader
    kind: str  # "elf32", "elf64" or "aout-kludge"
    warnings: tuple[str, ...] = ()
    eax: int = BOOTLOADER_MAGIC

    @property
    def ebx(self) -> int:
        return self.info_gpa

    def ranges(self) -> list[Range]:
        """Every guest range this load wrote: kernel segments, modules and the boot information."""
        out = [Range(s.gpa, s.end, "the kernel") for s in self.segments]
        out += [Range(m.gpa, m.end, f"module {m.path}") for m in self.modules]
        out.append(Range(self.info_gpa, self.info_gpa + self.info_size, "the boot information"))
        return out


# ---- the header -----------------------------------------------------------------------------------


def find_header(data: bytes, *, name: str = "image") -> MultibootHeader | None:
    """The first valid multiboot header in the file's first 8192 bytes, or None if there is none.

    A magic number whose checksum does not hold is skipped (as QEMU and GRUB skip it) if a valid
    header follows; when none does, it raises :class:`MultibootError` naming the offset and the
    checksum the flags need. A valid header cut short (its flags ask for the address or video
    fields, but the file or the 8192-byte window ends first) raises too.
    """
    data = bytes(data[:SEARCH_LIMIT])
    bad: tuple[int, int, int] | None = None
    for offset in range(0, len(data) - 11, 4):
        if _u32(data, offset) != HEADER_MAGIC:
            continue
        flags, checksum = _u32(data, offset + 4), _u32(data, offset + 8)
        if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF:
            bad = bad or (offset, flags, checksum)
            continue
        need = 48 if flags & HEADER_VIDEO_MODE else 32 if flags & HEADER_AOUT_KLUDGE else 12
        if offset + need > len(data):
            where = "the end of the file" if len(data) < SEARCH_LIMIT else "the first 8192 bytes it must lie in"
            fields = "video fields (flag bit 2)" if flags & HEADER_VIDEO_MODE else "address fields (flag bit 16)"
            raise MultibootError(
                f"{name}: malformed multiboot header at offset {offset:#x}: its flags {flags:#x} ask for the "
                f"{fields}, a {need}-byte header, but {where} cuts it short"
            )
        words = struct.unpack_from(f"<{need // 4}I", data, offset)
        fields = {}
        if flags & HEADER_AOUT_KLUDGE:
            fields.update(zip(("header_addr", "load_addr", "load_end_addr", "bss_end_addr", "entry_addr"), words[3:8]))
        if flags & HEADER_VIDEO_MODE:
            fields.update(zip(("mode_type", "width", "height", "depth"), words[8:12]))
        return MultibootHeader(offset, flags, checksum, **fields)
    if bad is not None:
        offset, flags, checksum = bad
        expected = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
        raise MultibootError(
            f"{name}: malformed multiboot header at offset {offset:#x}: the checksum is {checksum:#010x}, "
            f"but magic + flags ({flags:#x}) + checksum must be 0 mod 2**32, so it should be {expected:#010x}"
        )
    return None


# ---- loading the kernel ---------------------------------------------------------------------------


def _load_aout(memory, data: bytes, header: MultibootHeader, name: str, reserved: list[Range]):
    h = header
    if h.load_addr > h.header_addr:
        raise MultibootError(f"{name}: multiboot header: load_addr {h.load_addr:#x} is above "
                             f"header_addr {h.header_addr:#x}")
    file_offset = h.offset - (h.header_addr - h.load_addr)
    if file_offset < 0:
        raise MultibootError(
            f"{name}: multiboot header: header_addr - load_addr is {h.header_addr - h.load_addr:#x}, more than "
            f"the header's file offset {h.offset:#x}: the load would start before the file does"
        )
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise MultibootError(f"{name}: multiboot header: load_end_addr {h.load_end_addr:#x} is below "
                                 f"load_addr {h.load_addr:#x}")
        load_size = h.load_end_addr - h.load_addr
        if file_offset + load_size > len(data):
            raise MultibootError(
                f"{name}: truncated kernel: loading {h.load_addr:#x}-{h.load_end_addr:#x} needs file bytes "
                f"{file_offset:#x}-{file_offset + load_size:#x}, the file is {len(data):#x} bytes"
            )
    else:
        load_size = len(data) - file_offset
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + load_size:
            raise MultibootError(f"{name}: multiboot header: bss_end_addr {h.bss_end_addr:#x} is below the end "
                                 f"of the loaded bytes {h.load_addr + load_size:#x}")
        total = h.bss_end_addr - h.load_addr
    else:
        total = load_size
    if total == 0:
        raise MultibootError(f"{name}: multiboot header: the address fields load nothing")
    if not h.load_addr <= h.entry_addr < h.load_addr + total:
        raise MultibootError(f"{name}: multiboot header: entry_addr {h.entry_addr:#x} is outside the loaded "
                             f"kernel ({h.load_addr:#x}-{h.load_addr + total:#x})")
    check_fits(memory, h.load_addr, total, "the kernel", name, MultibootError)
    check_reserved(h.load_addr, total, reserved, "the kernel", name, MultibootError)

    def write() -> None:
        view = memory.view(h.load_addr, total)
        view[:load_size] = data[file_offset : file_offset + load_size]
        view[load_size:] = bytes(total - load_size)

    return h.entry_addr, [Segment(h.load_addr, total)], "aout-kludge", write


def _load_elf(memory, data: bytes, name: str, reserved: list[Range]):
    elf = parse_elf(data, name=name)
    for s in elf.load_segments:
        if s.end > 1 << 32:
            raise MultibootError(f"{name}: segment {s.index} at {s.gpa:#x} lies above 4 GiB; a multiboot kernel "
                                 f"is entered in 32-bit protected mode without paging")
    if elf.entry >= 1 << 32:
        raise MultibootError(f"{name}: the entry point {elf.entry:#x} is above 4 GiB; a multiboot kernel is "
                             f"entered in 32-bit protected mode")
    for s in elf.load_segments:
        check_fits(memory, s.gpa, s.memsz, f"segment {s.index}", name, MultibootError)
        check_reserved(s.gpa, s.memsz, reserved, f"segment {s.index}", name, MultibootError)
    return elf.entry, elf.segments, f"elf{elf.bits}", lambda: write_segments(memory, data, elf)


# ---- memory map and placement -----------------------------------------------------------------------


def memory_map(mem_size: int, reserved: Sequence[Range] = ()) -> list[MmapEntry]:
    """The map pykvm hands a multiboot kernel with ``mem_size`` bytes of RAM at GPA 0.

    QEMU's low-memory entries, RAM from 1 MiB to ``mem_size``, and the ``reserved`` ranges (pykvm's
    own tables) cut out of the available entries and listed as reserved.
    """
    if mem_size < HIGH_MEMORY:
        raise ValueError(f"a multiboot guest needs at least 1 MiB of memory, not {mem_size:#x}")
    entries = [MmapEntry(0, LOW_MEMORY_END, MMAP_AVAILABLE)]
    for r in sorted(reserved):
        out = []
        for e in entries:
            if e.type != MMAP_AVAILABLE or r.end <= e.base or e.end <= r.start:
                out.append(e)
                continue
            if e.base < r.start:
                out.append(MmapEntry(e.base, r.start - e.base, MMAP_AVAILABLE))
            cut_start, cut_end = max(e.base, r.start), min(e.end, r.end)
            out.append(MmapEntry(cut_start, cut_end - cut_start, MMAP_RESERVED))
            if r.end < e.end:
                out.append(MmapEntry(r.end, e.end - r.end, MMAP_AVAILABLE))
        entries = out
    entries.append(MmapEntry(EBDA.start, EBDA.end - EBDA.start, MMAP_RESERVED))
    entries.append(MmapEntry(BIOS_AREA.start, BIOS_AREA.end - BIOS_AREA.start, MMAP_RESERVED))
    if mem_size > HIGH_MEMORY:
        entries.append(MmapEntry(HIGH_MEMORY, mem_size - HIGH_MEMORY, MMAP_AVAILABLE))
    return entries


def _allocate(size: int, start: int, available: list[MmapEntry], used: list[Range]) -> int | None:
    """The lowest page-aligned gpa >= start where ``size`` bytes of available memory are unused."""
    size = max(size, 1)
    for e in available:
        gpa = _align(max(start, e.base))
        while gpa + size <= e.end:
            clash = next((r for r in used if gpa < r.end and r.start < gpa + size), None)
            if clash is None:
                return gpa
            gpa = _align(clash.end)
    return None


def _cstring(text: str, what: str) -> bytes:
    encoded = text.encode()
    if b"\0" in encoded:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return encoded + b"\0"


def load_multiboot(
    memory,
    data: bytes,
    *,
    path: str,
    cmdline: str = "",
    modules: Iterable[Module | tuple] = (),
    mem_size: int | None = None,
    name: str | None = None,
) -> BootInfo:
    """Load a multiboot kernel, its modules and its boot information into ``memory``.

    ``path`` is the kernel's path as the user named it (it starts the command line); ``cmdline``
    the user's arguments; ``modules`` ``(path, bytes, args)`` tuples; ``mem_size`` the bytes of RAM
    at GPA 0 to describe (default: the region at GPA 0). ``name`` names the image in errors
    (default ``path``). Raises :class:`MultibootError` (or :class:`~pykvm.loaders.elf.ElfError`
    for a bad ELF) before anything is written; once every check has passed it writes the kernel,
    the modules and the boot information. Then enter it with :func:`setup_multiboot`.
    """
    data = bytes(data)
    name = path if name is None else name
    region = memory.region_at(0)
    if mem_size is None:
        if region is None:
            raise ValueError("a multiboot guest needs RAM at GPA 0")
        mem_size = region.end
    elif region is None or not region.contains(0, mem_size):
        raise ValueError(f"mem_size {mem_size:#x} is more than the RAM at GPA 0 "
                         f"({region.end if region else 0:#x})")

    header = find_header(data, name=name)
    if header is None:
        raise MultibootError(f"{name}: no multiboot header (magic 0x1badb002, 32-bit aligned) in the first "
                             f"{SEARCH_LIMIT} bytes")
    unknown = header.flags & HEADER_REQUIRED_MASK & ~HEADER_KNOWN
    if unknown:
        bits = ", ".join(str(b) for b in range(16) if unknown >> b & 1)
        raise MultibootError(f"{name}: the multiboot header requires features pykvm does not know "
                             f"(flag bits {bits} of {header.flags:#x})")
    warnings = []
    if header.video_mode:
        warnings.append(f"{name}: the kernel asks for a video mode (flag bit 2); pykvm has no display and "
                        f"gives no video information")

    reserved = system_ranges()
    if header.aout_kludge:
        entry, segments, kind, write_kernel = _load_aout(memory, data, header, name, reserved)
    elif data[:4] == ELF_MAGIC:
        entry, segments, kind, write_kernel = _load_elf(memory, data, name, reserved)
    else:
        raise MultibootError(f"{name}: the multiboot header has no address fields (flag bit 16) and the file is "
                             f"not ELF: there is no way to know where to load it")

    mmap = memory_map(mem_size, reserved)
    available = [e for e in mmap if e.type == MMAP_AVAILABLE]
    stack_page = Range(layout.STACK_TOP - layout.PAGE_SIZE, layout.STACK_TOP, "pykvm's initial stack")
    used = [Range(s.gpa, s.end, "the kernel") for s in segments] + list(reserved) + [stack_page]

    # Modules: page-aligned, from the first page after the kernel.
    loaded: list[LoadedModule] = []
    module_data: list[bytes] = []
    kernel_end = max(s.end for s in segments)
    for number, module in enumerate(modules):
        module = Module(*module)
        string = module.path + (f" {module.args}" if module.args else "")
        _cstring(string, f"module {number}'s path and arguments")
        size = len(module.data)
        gpa = _allocate(size, kernel_end, available, used)
        if gpa is None:
            raise MultibootError(
                f"{name}: module {number} ({module.path}, {size} bytes) does not fit in "
                f"{format_size(mem_size)} of guest memory after the kernel (ends {kernel_end:#x}); use --mem"
            )
        used.append(Range(gpa, gpa + max(size, 1), f"module {number}"))
        loaded.append(LoadedModule(gpa, size, string, module.path))
        module_data.append(bytes(module.data))
        kernel_end = gpa + size

    # The boot information: one block (info, mmap, module list, strings), built relative to 0.
    full_cmdline = path + (f" {cmdline}" if cmdline else "")
    strings = [_cstring(full_cmdline, "the command line")]
    strings += [_cstring(m.string, "a module string") for m in loaded]
    strings.append(_cstring(BOOT_LOADER_NAME, "the boot loader name"))
    mmap_at = _align(INFO_SIZE, 8)
    mods_at = mmap_at + MMAP_ENTRY_SIZE * len(mmap)
    strings_at = mods_at + MODULE_SIZE * len(loaded)
    size = strings_at + sum(len(s) for s in strings)
    info_gpa = _allocate(size, FIRST_INFO_GPA, available, used)
    if info_gpa is None:
        raise MultibootError(f"{name}: no room left in {format_size(mem_size)} of guest memory for the "
                             f"{size}-byte boot information; use --mem")

    string_gpas = []
    block = bytearray(size)
    at = strings_at
    for s in strings:
        block[at : at + len(s)] = s
        string_gpas.append(info_gpa + at)
        at += len(s)
    for i, e in enumerate(mmap):
        struct.pack_into("<IQQI", block, mmap_at + MMAP_ENTRY_SIZE * i, MMAP_ENTRY_SIZE - 4, e.base, e.length, e.type)
    for i, m in enumerate(loaded):
        struct.pack_into("<IIII", block, mods_at + MODULE_SIZE * i, m.gpa, m.end, string_gpas[1 + i], 0)
    mem_lower = LOW_MEMORY_END // 1024
    mem_upper = (mem_size - HIGH_MEMORY) // 1024
    fields = {
        "flags": INFO_FLAGS, "mem_lower": mem_lower, "mem_upper": mem_upper, "cmdline": string_gpas[0],
        "mods_count": len(loaded), "mods_addr": info_gpa + mods_at,
        "mmap_length": MMAP_ENTRY_SIZE * len(mmap), "mmap_addr": info_gpa + mmap_at,
        "boot_loader_name": string_gpas[-1],
    }
    for key, value in fields.items():
        struct.pack_into("<I", block, INFO_OFFSETS[key], value)

    # Every check passed: now write.
    write_kernel()
    for m, content in zip(loaded, module_data):
        memory.write(m.gpa, content)
    memory.write(info_gpa, bytes(block))

    return BootInfo(
        entry=entry, info_gpa=info_gpa, info_size=size, segments=list(segments), modules=loaded,
        cmdline=full_cmdline, mmap=mmap, mem_lower=mem_lower, mem_upper=mem_upper, flags=INFO_FLAGS,
        header=header, kind=kind, warnings=tuple(warnings),
    )


def setup_multiboot(vcpu, memory, info: BootInfo) -> None:
    """Put the vCPU in the state the multiboot spec requires at ``info.entry`` (see the module doc)."""
    from ..x86.modes import Mode, setup_mode

    setup_mode(vcpu, memory, Mode.PROTECTED, info.entry)
    regs = vcpu.get_regs()
    regs.rax = info.eax
    regs.rbx = info.ebx
    vcpu.set_regs(regs)
