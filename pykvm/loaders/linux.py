"""Linux/x86 kernels: the bzImage boot protocol (2.06 and later), an ELF ``vmlinux`` through its
PVH entry note, and the same vmlinux entered at ``startup_64`` as Firecracker does.

References: the kernel's ``Documentation/arch/x86/boot.rst`` (the setup header, the zero page
fields a boot loader fills, "64-bit Boot Protocol"), ``Documentation/arch/x86/zero-page.rst``,
``arch/x86/include/uapi/asm/bootparam.h`` (the offsets; ``tests/test_loaders_linux.py`` compiles
them against the installed ``<asm/bootparam.h>``) and Xen's ``arch-x86/hvm/start_info.h`` and
``docs/misc/pvh.pandoc`` (the PVH entry).

Three ways in (``entry=``)
  ``"bzimage"``  the protected-mode part of a bzImage at its load address, entered at its 64-bit
                 entry (load address + 0x200): long mode, identity paging, a GDT with __BOOT_CS
                 (0x10) and __BOOT_DS (0x18), RSI = the zero page. The kernel's own decompressor
                 then runs in the guest.
  ``"pvh"``      a vmlinux's ``PT_LOAD`` segments at ``p_paddr``, entered at the address of its
                 ``XEN_ELFNOTE_PHYS32_ENTRY`` note (18, owner "Xen") in 32-bit protected mode
                 with paging off, flat CS/DS/ES/SS, a 32-bit TSS in TR, EBX = struct
                 hvm_start_info (version 1: command line, the initrd as module 0, the memory map,
                 the RSDP).
  ``"elf64"``    the same segments, entered at ``e_entry`` (``phys_startup_64``) in 64-bit mode
                 with RSI = a zero page, as the 64-bit boot protocol asks (Firecracker's path).
  ``"auto"``     a bzImage: ``"bzimage"``, or with ``decompress=True`` its payload decompressed on
                 the host and entered as the vmlinux it is; a vmlinux: ``"pvh"`` where it has the
                 note, else ``"elf64"``.

On kvm_pvm the guest's CPL0 code runs in KVM's instruction emulator (1-2 M instructions/s), so a
distribution kernel's in-guest xz decompressor takes minutes; ``decompress=True`` saves them.

Guest memory layout (every address below 1 MiB is pykvm's; the kernel gets 1 MiB and up)::

    0x00000-0x04fff  left as zero (a PC's IVT and BIOS data area; pykvm writes none)
    BOOT_GDT   0x05000  the boot GDT: 0x08 64-bit code (what pykvm's IDT gates use), 0x10 __BOOT_CS
                        (64-bit code), 0x18 __BOOT_DS (flat data), 0x40 pykvm's TSS
    START_INFO 0x06000  PVH: struct hvm_start_info, then the module list and the memory map
    ZERO_PAGE  0x07000  struct boot_params (4 KiB; Firecracker's address too)
    0x10000-0x15fff     pykvm's long/protected-mode tables (its GDT, IDT, TSS, exception stubs),
                        written by :func:`setup_linux` through :func:`pykvm.x86.modes.setup_mode`
    0x20000-0x26fff     pykvm's identity page tables: 4 GiB in 2 MiB pages (64-bit entries only)
    CMDLINE    0x30000  the command line, NUL-terminated (at most CMDLINE_MAX bytes with the NUL)
    STACK_TOP  0x9f000  RSP/ESP at entry (the protocols leave it undefined; Linux sets its own)
    EBDA       0x9fc00-0xa0000  reserved in the e820 map, as a PC's EBDA
    BIOS_AREA  0xe0000-0x100000 reserved: where pykvm's ACPI tables (and a PC's BIOS) live
    kernel     a bzImage at pref_address (1 MiB before protocol 2.10), rounded up to
               kernel_alignment when it is relocatable, with init_size bytes of room; a vmlinux
               at its p_paddr
    initrd     page-aligned, as high as it fits: below initrd_addr_max + 1, the end of RAM and
               any reserved range, above the kernel's end

The e820 map (also the PVH memory map): RAM [0, EBDA), reserved EBDA, reserved BIOS_AREA, RAM
[1 MiB, mem_size), with the caller's ``reserved`` ranges (an MMIO window, say) cut out of RAM or
added as reserved entries. pykvm's tables below 1 MiB are left inside RAM, as QEMU and Firecracker
leave theirs: the kernel copies boot_params and the command line before it allocates anything.

Video and firmware fields are what a firmware-less VMM leaves: screen_info zeroed (so
orig_video_isVGA 0: no VGA text console), no EDD, no APM, no EFI, no setup_data, sentinel 0.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple, Sequence

from ..images import ImageError
from ..x86 import layout
from .elf import Range, format_size

# ---- the guest memory layout (see the module doc) ---------------------------------------------------
BOOT_GDT = 0x5000
START_INFO = 0x6000
ZERO_PAGE = 0x7000
CMDLINE = 0x30000
CMDLINE_MAX = 0x10000  # bytes at CMDLINE, NUL included (the kernel's own limit, cmdline_size, is smaller)
HIGH_MEMORY = 0x100000  # 1 MiB: the lowest address a kernel or an initrd is put at
EBDA_START = 0x9FC00  # the last KiB below 640 KiB, reserved as a PC's EBDA
EBDA_END = 0xA0000
BIOS_AREA_START = 0xE0000  # the RSDP scan area (pykvm.x86.acpi.ACPI_BASE) to the end of the first MiB
BIOS_AREA_END = 0x100000
LOADER_AREA = Range(0, HIGH_MEMORY, "pykvm's boot area below 1 MiB (zero page, command line, tables)")

# ---- the setup header (boot.rst "The real-mode kernel header") -----------------------------------------
SETUP_HEADER = 0x1F1  # its offset in the image's first sector and in struct boot_params
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects 0 means 4
BOOT_FLAG = 0xAA55
HDRS = 0x53726448  # "HdrS"
MIN_VERSION = 0x0206
ENTRY64_OFFSET = 0x200  # the 64-bit entry: load address + 0x200 (XLF_KERNEL_64)
SETUP_HEADER_MAX_END = 0x290  # struct boot_params: _pad7 ends here (edd_mbr_sig_buffer follows)

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

TYPE_OF_LOADER = 0xFF  # "undefined": pykvm has no assigned boot loader ID
HEAP_END = 0xE000  # boot.rst's sample loader: heap end 0xe000 for a LOADED_HIGH kernel ...
HEAP_END_PTR = HEAP_END - 0x200  # ... and heap_end_ptr = heap_end - 0x200 (only the real-mode setup reads it)
DEFAULT_CMDLINE_SIZE = 2047  # COMMAND_LINE_SIZE - 1: what a vmlinux (no setup header) gets
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF  # header.S's default, and a vmlinux's
SYNTHETIC_VERSION = 0x020F  # the protocol version a vmlinux's synthesized header claims (2.15)

#: setup_header fields: name -> (offset in the image and in boot_params, struct format, first protocol).
#: A field newer than the image's protocol reads as 0.
HEADER_FIELDS: dict[str, tuple[int, str, int]] = {
    "setup_sects": (0x1F1, "B", 0), "root_flags": (0x1F2, "H", 0), "syssize": (0x1F4, "I", 0x0204),
    "ram_size": (0x1F8, "H", 0), "vid_mode": (0x1FA, "H", 0), "root_dev": (0x1FC, "H", 0),
    "boot_flag": (0x1FE, "H", 0), "jump": (0x200, "H", 0x0200), "header": (0x202, "I", 0x0200),
    "version": (0x206, "H", 0x0200), "realmode_swtch": (0x208, "I", 0x0200),
    "start_sys_seg": (0x20C, "H", 0x0200), "kernel_version": (0x20E, "H", 0x0200),
    "type_of_loader": (0x210, "B", 0x0200), "loadflags": (0x211, "B", 0x0200),
    "setup_move_size": (0x212, "H", 0x0200), "code32_start": (0x214, "I", 0x0200),
    "ramdisk_image": (0x218, "I", 0x0200), "ramdisk_size": (0x21C, "I", 0x0200),
    "bootsect_kludge": (0x220, "I", 0x0200), "heap_end_ptr": (0x224, "H", 0x0201),
    "ext_loader_ver": (0x226, "B", 0x0202), "ext_loader_type": (0x227, "B", 0x0202),
    "cmd_line_ptr": (0x228, "I", 0x0202), "initrd_addr_max": (0x22C, "I", 0x0203),
    "kernel_alignment": (0x230, "I", 0x0205), "relocatable_kernel": (0x234, "B", 0x0205),
    "min_alignment": (0x235, "B", 0x020A), "xloadflags": (0x236, "H", 0x020C),
    "cmdline_size": (0x238, "I", 0x0206), "hardware_subarch": (0x23C, "I", 0x0207),
    "hardware_subarch_data": (0x240, "Q", 0x0207), "payload_offset": (0x248, "I", 0x0208),
    "payload_length": (0x24C, "I", 0x0208), "setup_data": (0x250, "Q", 0x0209),
    "pref_address": (0x258, "Q", 0x020A), "init_size": (0x260, "I", 0x020A),
    "handover_offset": (0x264, "I", 0x020B), "kernel_info_offset": (0x268, "I", 0x020F),
}  # fmt: skip
SETUP_HEADER_END = 0x26C  # the end of the last field (kernel_info_offset) pykvm knows

# ---- struct boot_params (bootparam.h; "the zero page") -----------------------------------------------
ZERO_PAGE_SIZE = 0x1000
#: boot_params fields outside the setup header: name -> (offset, struct format).
BOOT_PARAMS_FIELDS: dict[str, tuple[int, str]] = {
    "screen_info": (0x000, "64s"), "apm_bios_info": (0x040, "20s"), "tboot_addr": (0x058, "Q"),
    "ist_info": (0x060, "16s"), "acpi_rsdp_addr": (0x070, "Q"), "hd0_info": (0x080, "16s"),
    "hd1_info": (0x090, "16s"), "sys_desc_table": (0x0A0, "16s"), "olpc_ofw_header": (0x0B0, "16s"),
    "ext_ramdisk_image": (0x0C0, "I"), "ext_ramdisk_size": (0x0C4, "I"), "ext_cmd_line_ptr": (0x0C8, "I"),
    "cc_blob_address": (0x13C, "I"), "edid_info": (0x140, "128s"), "efi_info": (0x1C0, "32s"),
    "alt_mem_k": (0x1E0, "I"), "scratch": (0x1E4, "I"), "e820_entries": (0x1E8, "B"),
    "eddbuf_entries": (0x1E9, "B"), "edd_mbr_sig_buf_entries": (0x1EA, "B"), "kbd_status": (0x1EB, "B"),
    "secure_boot": (0x1EC, "B"), "sentinel": (0x1EF, "B"), "edd_mbr_sig_buffer": (0x290, "64s"),
    "e820_table": (0x2D0, "2560s"), "eddbuf": (0xD00, "492s"),
}  # fmt: skip
ORIG_VIDEO_ISVGA = 0x0F  # screen_info.orig_video_isVGA
E820_ENTRY_SIZE = 20  # struct boot_e820_entry: u64 addr, u64 size, u32 type (packed)
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS, E820_UNUSABLE = 1, 2, 3, 4, 5

# ---- PVH (Xen's arch-x86/hvm/start_info.h, version 1) ---------------------------------------------------
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO_SIZE = 56  # magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
#                       memmap_paddr, memmap_entries, reserved
START_INFO_FORMAT = "<IIIIQQQQII"
MODLIST_OFFSET = 0x40  # in the START_INFO page: the module list (hvm_modlist_entry, 32 bytes each) ...
MODLIST_ENTRY_SIZE = 32  # paddr, size, cmdline_paddr, reserved
MEMMAP_OFFSET = 0x80  # ... then the memory map (hvm_memmap_table_entry, 24 bytes each)
MEMMAP_ENTRY_SIZE = 24  # addr, size, type, reserved

# ---- boot GDT selectors (the 64-bit boot protocol's) -----------------------------------------------------
BOOT_CS = 0x10  # __BOOT_CS: 64-bit code
BOOT_DS = 0x18  # __BOOT_DS: flat read/write data

Entry = Literal["auto", "bzimage", "pvh", "elf64"]
ENTRIES = ("auto", "bzimage", "pvh", "elf64")


class LinuxBootError(ImageError):
    """A Linux kernel (or its initrd or command line) that cannot be booted; one line naming the problem."""


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment if alignment > 1 else value


def _version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


# ---- the setup header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupHeader:
    """The setup header of a bzImage (or of a zero page): every field boot.rst names.

    Fields newer than :attr:`version` are 0. :attr:`raw` is the header's bytes as the image
    has them, from 0x1F1 to its end (0x202 plus the jump's displacement), which a boot loader
    copies into the zero page.
    """

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int
    raw: bytes = dataclasses.field(repr=False, default=b"")

    @property
    def protocol(self) -> str:
        """The boot protocol version as boot.rst writes it: ``"2.15"``."""
        return _version_text(self.version)

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part (boot sector + setup code): (setup_sects or 4) + 1 sectors."""
        return ((self.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR

    @property
    def header_end(self) -> int:
        """The offset just past the setup header (0x202 + the jump's 8-bit displacement)."""
        return 0x202 + (self.jump >> 8 & 0xFF) if self.jump & 0xFF == 0xEB else SETUP_HEADER_END

    @property
    def kernel_64(self) -> bool:
        """The kernel has the 64-bit entry at load address + 0x200 (XLF_KERNEL_64)."""
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def loaded_high(self) -> bool:
        return bool(self.loadflags & LOADED_HIGH)

    @property
    def can_be_loaded_above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def relocatable(self) -> bool:
        return bool(self.relocatable_kernel)

    @property
    def has_payload(self) -> bool:
        return self.version >= 0x0208 and self.payload_length > 0

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}


def _read_header(data: bytes, version: int | None = None) -> SetupHeader:
    """Decode the header fields at 0x1F1 of ``data`` (an image or a zero page) without checking them."""
    if version is None:
        version = struct.unpack_from("<H", data, 0x206)[0] if struct.unpack_from("<I", data, 0x202)[0] == HDRS else 0
    values = {}
    for field, (offset, fmt, since) in HEADER_FIELDS.items():
        ok = version >= since and offset + struct.calcsize(fmt) <= len(data)
        values[field] = struct.unpack_from("<" + fmt, data, offset)[0] if ok else 0
    hdr = SetupHeader(**values)
    end = min(hdr.header_end, SETUP_HEADER_MAX_END, len(data))
    return dataclasses.replace(hdr, raw=bytes(data[SETUP_HEADER:end]))


def parse_bzimage(data: bytes, name: str = "image") -> SetupHeader:
    """Check a bzImage's setup header (the file's first sectors are enough) and decode it.

    Raises :class:`LinuxBootError` for: no "HdrS" signature (not a bzImage; an ELF vmlinux is
    named as one), no 0xAA55 boot flag, a protocol older than 2.06, a kernel that does not load
    high (a zImage), or a file shorter than its own setup code.
    """
    data = bytes(data[:0x8000])
    if len(data) < 0x206 or struct.unpack_from("<I", data, 0x202)[0] != HDRS:
        hint = ""
        if data[:4] == b"\x7fELF":
            hint = ": it is an ELF file (a vmlinux? load_linux boots those through PVH or startup_64)"
        elif len(data) < 0x206:
            hint = f": the file is {len(data)} bytes, the signature is at 0x202"
        raise LinuxBootError(f"{name}: not a bzImage (no HdrS signature at 0x202){hint}")
    if len(data) < SETUP_HEADER_END:
        raise LinuxBootError(f"{name}: truncated bzImage: {len(data)} bytes, the setup header alone needs "
                             f"{SETUP_HEADER_END:#x}")
    boot_flag = struct.unpack_from("<H", data, 0x1FE)[0]
    if boot_flag != BOOT_FLAG:
        raise LinuxBootError(f"{name}: not a bzImage (boot_flag at 0x1fe is {boot_flag:#06x}, not 0xaa55)")
    hdr = _read_header(data)
    if hdr.version < MIN_VERSION:
        raise LinuxBootError(f"{name}: boot protocol {hdr.protocol} is too old (pykvm needs "
                             f"{_version_text(MIN_VERSION)} or later)")
    if not hdr.loaded_high:
        raise LinuxBootError(f"{name}: loadflags {hdr.loadflags:#x} lack LOADED_HIGH: a zImage (loaded at "
                             f"0x10000), not a bzImage; pykvm loads only bzImages")
    if len(data) < min(hdr.setup_size, 0x8000):
        raise LinuxBootError(f"{name}: truncated bzImage: {len(data)} bytes, less than its own setup code "
                             f"({hdr.setup_size} bytes: setup_sects {hdr.setup_sects})")
    if hdr.header_end > SETUP_HEADER_MAX_END or hdr.header_end < 0x202 + 0x30:
        raise LinuxBootError(f"{name}: malformed setup header: its jump ({hdr.jump:#06x}) puts its end at "
                             f"{hdr.header_end:#x}")
    return hdr


# ---- the e820 map -----------------------------------------------------------------------------------


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def _as_range(r) -> Range:
    r = tuple(r)
    if len(r) == 2:
        return Range(r[0], r[1], "a reserved range")
    return Range(*r[:3])


def e820_map(mem_size: int, reserved: Iterable = ()) -> list[E820Entry]:
    """The map pykvm gives a Linux guest with ``mem_size`` bytes of RAM at GPA 0 (module doc).

    ``reserved``: ``(start, end)`` or :class:`~pykvm.loaders.elf.Range` ranges (an MMIO window,
    say): cut out of RAM where they overlap it and listed as reserved."""
    if mem_size < 2 * HIGH_MEMORY:
        raise ValueError(f"a Linux guest needs at least 2 MiB of memory, not {mem_size:#x}")
    ram = [(0, EBDA_START), (HIGH_MEMORY, mem_size)]
    extra = sorted(_as_range(r) for r in reserved)
    for r in extra:
        if r.end <= r.start:
            raise ValueError(f"reserved range {r.start:#x}-{r.end:#x} is empty")
        out = []
        for start, end in ram:
            if r.end <= start or end <= r.start:
                out.append((start, end))
                continue
            if start < r.start:
                out.append((start, r.start))
            if r.end < end:
                out.append((r.end, end))
        ram = out
    entries = [E820Entry(s, e - s, E820_RAM) for s, e in ram]
    entries.append(E820Entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED))
    entries.append(E820Entry(BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED))
    entries += [E820Entry(r.start, r.end - r.start, E820_RESERVED) for r in extra]
    entries.sort()
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(entries)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    return entries


# ---- the zero page ----------------------------------------------------------------------------------


def synthetic_header(*, pref_address: int, init_size: int) -> bytes:
    """Setup-header bytes (0x1F1..0x26C) for a vmlinux, which has none: what the 64-bit protocol
    reads, as Firecracker fills it (boot flag, "HdrS", protocol 2.15, LOADED_HIGH, XLF_KERNEL_64,
    the defaults for cmdline_size and initrd_addr_max)."""
    page = bytearray(SETUP_HEADER_END)
    values = {
        "boot_flag": BOOT_FLAG, "jump": 0xEB | (SETUP_HEADER_END - 0x202) << 8, "header": HDRS,
        "version": SYNTHETIC_VERSION, "type_of_loader": TYPE_OF_LOADER, "loadflags": LOADED_HIGH,
        "code32_start": pref_address, "initrd_addr_max": DEFAULT_INITRD_ADDR_MAX,
        "kernel_alignment": 0x200000, "xloadflags": XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
        "cmdline_size": DEFAULT_CMDLINE_SIZE, "pref_address": pref_address, "init_size": init_size,
    }  # fmt: skip
    for field, value in values.items():
        offset, fmt, _ = HEADER_FIELDS[field]
        struct.pack_into("<" + fmt, page, offset, value)
    return bytes(page[SETUP_HEADER:])


def build_zero_page(
    header: SetupHeader | bytes,
    *,
    e820: Sequence[E820Entry],
    cmdline_gpa: int = CMDLINE,
    initrd: tuple[int, int] | None = None,
    rsdp: int | None = None,
    code32_start: int | None = None,
) -> bytes:
    """A 4 KiB struct boot_params: zeroed, the setup header copied in (``header.raw``, or header
    bytes from 0x1F1), then what a boot loader fills: type_of_loader 0xFF, CAN_USE_HEAP and
    heap_end_ptr, cmd_line_ptr (+ ext_), ramdisk_image/size (+ ext_) from ``initrd`` = (gpa,
    size), code32_start (where the protected-mode kernel was put), the e820 table, and
    acpi_rsdp_addr (``rsdp``; protocol 2.14 and later). Everything else stays zero."""
    raw = header.raw if isinstance(header, SetupHeader) else bytes(header)
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER : SETUP_HEADER + len(raw)] = raw
    hdr = _read_header(page)

    def put(field: str, value: int) -> None:
        offset, fmt = (HEADER_FIELDS[field][:2] if field in HEADER_FIELDS else BOOT_PARAMS_FIELDS[field])
        struct.pack_into("<" + fmt, page, offset, value)

    put("type_of_loader", TYPE_OF_LOADER)
    put("loadflags", hdr.loadflags | CAN_USE_HEAP)
    put("heap_end_ptr", HEAP_END_PTR)
    if code32_start is not None:
        put("code32_start", code32_start)
    put("cmd_line_ptr", cmdline_gpa & 0xFFFFFFFF)
    put("ext_cmd_line_ptr", cmdline_gpa >> 32)
    if initrd is not None:
        gpa, size = initrd
        put("ramdisk_image", gpa & 0xFFFFFFFF)
        put("ext_ramdisk_image", gpa >> 32)
        put("ramdisk_size", size & 0xFFFFFFFF)
        put("ext_ramdisk_size", size >> 32)
    if rsdp is not None and hdr.version >= 0x020E:
        put("acpi_rsdp_addr", rsdp)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    put("e820_entries", len(e820))
    table = BOOT_PARAMS_FIELDS["e820_table"][0]
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", page, table + E820_ENTRY_SIZE * i, e.addr, e.size, e.type)
    return bytes(page)


@dataclass(frozen=True)
class BootParams:
    """A decoded zero page (see :func:`boot_params_view`)."""

    header: SetupHeader
    cmd_line_ptr: int  # cmd_line_ptr | ext_cmd_line_ptr << 32
    ramdisk_image: int  # with ext_ramdisk_image
    ramdisk_size: int  # with ext_ramdisk_size
    acpi_rsdp_addr: int
    e820: tuple[E820Entry, ...]
    fields: dict  # every BOOT_PARAMS_FIELDS field as stored (bytes fields as bytes)

    @property
    def orig_video_is_vga(self) -> int:
        return self.fields["screen_info"][ORIG_VIDEO_ISVGA]


def boot_params_view(page: bytes) -> BootParams:
    """Decode a struct boot_params (4 KiB) built by :func:`build_zero_page` or read from a guest."""
    page = bytes(page)
    if len(page) < ZERO_PAGE_SIZE:
        raise ValueError(f"a zero page is {ZERO_PAGE_SIZE} bytes, not {len(page)}")
    fields = {name: struct.unpack_from("<" + fmt, page, off)[0] for name, (off, fmt) in BOOT_PARAMS_FIELDS.items()}
    hdr = _read_header(page)
    count = min(fields["e820_entries"], E820_MAX_ENTRIES_ZEROPAGE)
    table = BOOT_PARAMS_FIELDS["e820_table"][0]
    e820 = tuple(E820Entry(*struct.unpack_from("<QQI", page, table + E820_ENTRY_SIZE * i)) for i in range(count))
    return BootParams(
        header=hdr,
        cmd_line_ptr=hdr.cmd_line_ptr | fields["ext_cmd_line_ptr"] << 32,
        ramdisk_image=hdr.ramdisk_image | fields["ext_ramdisk_image"] << 32,
        ramdisk_size=hdr.ramdisk_size | fields["ext_ramdisk_size"] << 32,
        acpi_rsdp_addr=fields["acpi_rsdp_addr"],
        e820=e820,
        fields=fields,
    )


# ---- PVH start info -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartInfo:
    """A decoded struct hvm_start_info with its module list and memory map."""

    magic: int
    version: int
    flags: int
    cmdline_paddr: int
    rsdp_paddr: int
    modules: tuple[tuple[int, int, int], ...]  # (paddr, size, cmdline_paddr)
    memmap: tuple[E820Entry, ...]


def build_start_info(
    *, base: int, e820: Sequence[E820Entry], cmdline_gpa: int, initrd: tuple[int, int] | None, rsdp: int | None
) -> bytes:
    """The START_INFO page: struct hvm_start_info (version 1) at ``base``, its module list (the
    initrd as module 0, no command line) at base + MODLIST_OFFSET and the memory map at base +
    MEMMAP_OFFSET (hvm_memmap_table_entry; its types are the e820 types)."""
    if MEMMAP_OFFSET + MEMMAP_ENTRY_SIZE * len(e820) > layout.PAGE_SIZE:
        raise ValueError(f"{len(e820)} memory map entries do not fit in the start-info page")
    page = bytearray(layout.PAGE_SIZE)
    modules = [] if initrd is None else [initrd]
    struct.pack_into(
        START_INFO_FORMAT, page, 0, HVM_START_MAGIC, HVM_START_VERSION, 0, len(modules),
        base + MODLIST_OFFSET if modules else 0, cmdline_gpa, rsdp or 0, base + MEMMAP_OFFSET, len(e820), 0,
    )  # fmt: skip
    for i, (gpa, size) in enumerate(modules):
        struct.pack_into("<QQQQ", page, MODLIST_OFFSET + MODLIST_ENTRY_SIZE * i, gpa, size, 0, 0)
    for i, e in enumerate(e820):
        struct.pack_into("<QQII", page, MEMMAP_OFFSET + MEMMAP_ENTRY_SIZE * i, e.addr, e.size, e.type, 0)
    return bytes(page)


def start_info_view(page: bytes, base: int = START_INFO) -> StartInfo:
    """Decode the START_INFO page (its module list and memory map must lie in it)."""
    page = bytes(page)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack_from(
        START_INFO_FORMAT, page, 0)
    modules = tuple(struct.unpack_from("<QQQ", page, modlist - base + MODLIST_ENTRY_SIZE * i)
                    for i in range(nr_modules))
    mm = tuple(E820Entry(*struct.unpack_from("<QQI", page, memmap - base + MEMMAP_ENTRY_SIZE * i))
               for i in range(entries))
    return StartInfo(magic, version, flags, cmdline, rsdp, modules, mm)


# ---- a vmlinux ELF --------------------------------------------------------------------------------------


class VmlinuxSegment(NamedTuple):
    gpa: int  # p_paddr
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class Vmlinux:
    """What load_linux needs of an ELF vmlinux: its PT_LOAD segments by p_paddr, the physical
    entry (``e_entry``; a vmlinux's is already physical, ``phys_startup_64``), the PVH entry."""

    bits: int
    entry: int
    segments: tuple[VmlinuxSegment, ...]
    pvh_entry: int | None

    @property
    def start(self) -> int:
        return min(s.gpa for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def _notes(blob: bytes):
    at = 0
    while at + 12 <= len(blob):
        namesz, descsz, kind = struct.unpack_from("<III", blob, at)
        at += 12
        owner = blob[at : at + namesz].rstrip(b"\0")
        at += _align_up(namesz, 4)
        desc = blob[at : at + descsz]
        at += _align_up(descsz, 4)
        yield owner, kind, desc


def parse_vmlinux(data: bytes, name: str = "vmlinux") -> Vmlinux:
    """Check an x86 ELF vmlinux (ELF64 or ELF32, ET_EXEC) and find its segments and entries."""
    data = memoryview(data)
    if bytes(data[:4]) != b"\x7fELF":
        raise LinuxBootError(f"{name}: neither a bzImage (no HdrS signature at 0x202) nor an ELF vmlinux")
    if len(data) < 52 or data[5] != 1 or data[4] not in (1, 2):
        raise LinuxBootError(f"{name}: malformed or big-endian ELF header")
    bits = 64 if data[4] == 2 else 32
    if bits == 64:
        if len(data) < 64:
            raise LinuxBootError(f"{name}: truncated ELF header")
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = struct.unpack_from(
            "<HHIQQQIHHH", data, 16)
        ph_fmt = "<IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    else:
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = struct.unpack_from(
            "<HHIIIIIHHH", data, 16)
        ph_fmt = "<IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align
    if e_machine not in (3, 62):
        raise LinuxBootError(f"{name}: an ELF file for machine {e_machine}, not x86 (3) or x86-64 (62)")
    if e_type != 2:
        raise LinuxBootError(f"{name}: ELF type {e_type}, not an executable (ET_EXEC): not a vmlinux")
    if e_phentsize != struct.calcsize(ph_fmt) or e_phoff + e_phnum * e_phentsize > len(data):
        raise LinuxBootError(f"{name}: malformed or truncated program header table")
    segments, notes = [], []
    for i in range(e_phnum):
        f = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
        if bits == 64:
            p_type, _, offset, vaddr, paddr, filesz, memsz, _ = f
        else:
            p_type, offset, vaddr, paddr, filesz, memsz, _, _ = f
        if offset + filesz > len(data):
            raise LinuxBootError(f"{name}: truncated ELF file: segment {i} needs file bytes up to "
                                 f"{offset + filesz:#x}, the file is {len(data):#x}")
        if p_type == 1 and memsz:
            if filesz > memsz:
                raise LinuxBootError(f"{name}: segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
            segments.append((VmlinuxSegment(paddr, offset, filesz, memsz), vaddr))
        elif p_type == 4:
            notes.append(bytes(data[offset : offset + filesz]))
    if not segments:
        raise LinuxBootError(f"{name}: the ELF file has no PT_LOAD segment")
    ordered = sorted(s for s, _ in segments)
    for a, b in zip(ordered, ordered[1:]):
        if b.gpa < a.end:
            raise LinuxBootError(f"{name}: segments at {a.gpa:#x}-{a.end:#x} and {b.gpa:#x}-{b.end:#x} overlap")
    # A vmlinux's e_entry is physical (phys_startup_64); translate it from a virtual one otherwise.
    if any(s.gpa <= e_entry < s.end for s, _ in segments):
        entry = e_entry
    else:
        home = next(((s, v) for s, v in segments if v <= e_entry < v + s.memsz), None)
        if home is None:
            raise LinuxBootError(f"{name}: the entry point {e_entry:#x} is in no loaded segment")
        entry = e_entry - home[1] + home[0].gpa
    pvh = None
    for blob in notes:
        for owner, kind, desc in _notes(blob):
            if owner == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                pvh = int.from_bytes(desc[:4], "little")
    return Vmlinux(bits, entry, tuple(ordered), pvh)


# ---- the compressed payload -------------------------------------------------------------------------------

#: (magic, name): how a bzImage's payload starts (scripts/Makefile.lib's compressors).
COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the legacy frame (lz4 -l), what the kernel uses
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x89LZO", "lzo"),
    (b"\x7fELF", "none"),
)


def detect_compression(payload: bytes) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"``, ``"lzma"``, ``"zstd"``, ``"lz4"``, ``"lzo"``, ``"none"``
    (an uncompressed ELF) or None, by the payload's first bytes."""
    head = bytes(payload[:8])
    return next((kind for magic, kind in COMPRESSION_MAGIC if head.startswith(magic)), None)


def _lz4_legacy(data: bytes, lz4_block) -> bytes:
    out, at = [], 4
    while at + 4 <= len(data):
        size = struct.unpack_from("<I", data, at)[0]
        if size == 0x184C2102:  # a following legacy frame
            at += 4
            continue
        if at + 4 + size > len(data):
            break  # the size the kernel's build appends, or padding
        out.append(lz4_block.decompress(data[at + 4 : at + 4 + size], uncompressed_size=8 << 20))
        at += 4 + size
    return b"".join(out)


def decompress(payload: bytes, kind: str, name: str = "image") -> bytes:
    """Decompress a bzImage payload of compression ``kind`` (trailing bytes, such as the size
    the kernel's build appends, are ignored). xz, lzma, gzip and bzip2 use Python's standard
    library; zstd needs the ``zstandard`` package and lz4 the ``lz4`` package."""
    try:
        if kind == "none":
            return bytes(payload)
        if kind == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        if kind == "lzma":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
        if kind == "zstd":
            try:
                import zstandard
            except ImportError:
                raise LinuxBootError(f"{name}: the kernel's payload is zstd-compressed, and pykvm decompresses "
                                     f"zstd only with the zstandard package (pip install zstandard); or boot "
                                     f"it without decompress (its own decompressor runs in the guest)") from None
            return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        if kind == "lz4":
            try:
                import lz4.block
            except ImportError:
                raise LinuxBootError(f"{name}: the kernel's payload is lz4-compressed, and pykvm decompresses "
                                     f"lz4 only with the lz4 package (pip install lz4); or boot it without "
                                     f"decompress (its own decompressor runs in the guest)") from None
            if payload[:4] == b"\x04\x22\x4d\x18":
                import lz4.frame

                return lz4.frame.decompress(payload)
            return _lz4_legacy(payload, lz4.block)
    except (lzma.LZMAError, zlib.error, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, LinuxBootError):
            raise
        raise LinuxBootError(f"{name}: the {kind} payload does not decompress: {e}") from None
    raise LinuxBootError(f"{name}: the kernel's payload is {kind}-compressed, which pykvm cannot decompress; "
                         f"boot it without decompress (its own decompressor runs in the guest)")


def bzimage_payload(data: bytes, name: str = "image") -> tuple[str, bytes]:
    """(compression, the vmlinux ELF) of a bzImage: its payload (protocol 2.08+) decompressed."""
    hdr = parse_bzimage(data, name)
    if hdr.version < 0x0208:
        raise LinuxBootError(f"{name}: boot protocol {hdr.protocol} has no payload fields (2.08 and later); "
                             f"boot it through its own entry")
    start = hdr.setup_size + hdr.payload_offset
    if not hdr.payload_length or start + hdr.payload_length > len(data):
        raise LinuxBootError(f"{name}: the payload ({hdr.payload_length:#x} bytes at {start:#x}) is empty or runs "
                             f"past the end of the file ({len(data):#x} bytes)")
    payload = memoryview(data)[start : start + hdr.payload_length]
    kind = detect_compression(payload)
    if kind is None:
        raise LinuxBootError(f"{name}: unknown payload compression (it starts {bytes(payload[:6]).hex()}; "
                             f"pykvm knows gzip, bzip2, xz, lzma, zstd and lz4)")
    vmlinux = decompress(payload, kind, name)
    if vmlinux[:4] != b"\x7fELF":
        raise LinuxBootError(f"{name}: the decompressed {kind} payload is not an ELF vmlinux")
    return kind, vmlinux


# ---- loading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinuxKernel:
    """A kernel image as load_linux sees it: a bzImage (``header``) or an ELF vmlinux (``vmlinux``)."""

    name: str
    kind: str  # "bzimage" or "vmlinux"
    header: SetupHeader | None = None
    vmlinux: Vmlinux | None = None

    @classmethod
    def parse(cls, data: bytes, name: str = "image") -> LinuxKernel:
        if bytes(data[:4]) == b"\x7fELF":
            return cls(name, "vmlinux", vmlinux=parse_vmlinux(data, name))
        return cls(name, "bzimage", header=parse_bzimage(data, name))


@dataclass(frozen=True)
class LinuxBoot:
    """What :func:`load_linux` put where, and how :func:`setup_linux` enters it."""

    name: str
    mode: str  # "bzimage", "pvh" or "elf64"
    entry: int  # RIP (EIP for PVH)
    zero_page: int | None  # RSI: struct boot_params (not for PVH)
    start_info: int | None  # EBX: struct hvm_start_info (PVH only)
    cmdline: str
    cmdline_gpa: int
    kernel: Range
    initrd: Range | None
    e820: tuple[E820Entry, ...]
    mem_size: int
    header: SetupHeader | None = None  # the bzImage's setup header (None for a plain vmlinux)
    compression: str | None = None  # what the host decompressed (decompress=True), else None
    warnings: tuple[str, ...] = ()

    @property
    def long_mode(self) -> bool:
        return self.mode != "pvh"

    def ranges(self) -> list[Range]:
        out = [self.kernel] + ([self.initrd] if self.initrd else [])
        out.append(Range(self.cmdline_gpa, self.cmdline_gpa + len(self.cmdline.encode()) + 1, "the command line"))
        if self.zero_page is not None:
            out.append(Range(self.zero_page, self.zero_page + ZERO_PAGE_SIZE, "the zero page"))
        if self.start_info is not None:
            out.append(Range(self.start_info, self.start_info + layout.PAGE_SIZE, "the PVH start info"))
        return out


def _place_initrd(size: int, *, low: int, limit: int, e820: Sequence[E820Entry], name: str, mem_size: int,
                  bound: str) -> int:
    """The highest page-aligned gpa in RAM where [gpa, gpa + size) lies in [low, limit)."""
    for e in sorted((e for e in e820 if e.type == E820_RAM), key=lambda e: -e.end):
        top = min(e.end, limit)
        gpa = (top - size) // layout.PAGE_SIZE * layout.PAGE_SIZE
        if gpa >= max(e.addr, low):
            return gpa
    raise LinuxBootError(
        f"{name}: the initrd ({format_size(size)}) does not fit in {format_size(mem_size)} of guest RAM "
        f"between the kernel's end ({low:#x}) and {bound}; use --mem"
    )


def load_linux(
    memory,
    kernel: bytes,
    *,
    name: str = "kernel",
    mem_size: int | None = None,
    cmdline: str = "",
    initrd: bytes | None = None,
    reserved: Iterable = (),
    rsdp: int | None = None,
    entry: Entry = "auto",
    decompress: bool | None = None,
) -> LinuxBoot:
    """Load a Linux kernel (a bzImage or an ELF vmlinux), its initrd and command line, and the
    zero page (or PVH start info) into ``memory``; enter it with :func:`setup_linux`.

    ``mem_size``: the RAM at GPA 0 to describe (default: that region's size). ``reserved``:
    ranges to mark reserved in the e820 map (``(start, end)`` pairs or Ranges). ``rsdp``: the
    ACPI RSDP's address (acpi_rsdp_addr with protocol 2.14+, PVH's rsdp_paddr); without it Linux
    scans 0xE0000-0xFFFFF. ``entry``: see the module doc. ``decompress``: for a bzImage, boot
    the vmlinux inside it (decompressed here) instead of the bzImage's own entry; default: when
    ``entry`` is "pvh" or "elf64". Every check runs before anything is written; a problem is a
    :class:`LinuxBootError` naming ``name``.
    """
    if entry not in ENTRIES:
        raise ValueError(f"entry must be one of {', '.join(ENTRIES)}, not {entry!r}")
    data = bytes(kernel)
    region = memory.region_at(0)
    if region is None:
        raise ValueError("a Linux guest needs RAM at GPA 0")
    if mem_size is None:
        mem_size = region.end
    elif not region.contains(0, mem_size):
        raise ValueError(f"mem_size {mem_size:#x} is more than the RAM at GPA 0 ({region.end:#x})")
    reserved = [_as_range(r) for r in reserved]
    image = LinuxKernel.parse(data, name)
    header = image.header
    compression = None
    warnings: list[str] = []

    if image.kind == "bzimage":
        if decompress is None:
            decompress = entry in ("pvh", "elf64")
        if decompress and entry == "bzimage":
            raise ValueError(f"{name}: entry='bzimage' runs the kernel's own decompressor; it cannot be "
                             f"combined with decompress=True")
        if not decompress and entry in ("pvh", "elf64"):
            raise ValueError(f"{name}: entry={entry!r} enters the vmlinux inside the bzImage: it needs decompress")
        if decompress:
            compression, data = bzimage_payload(data, name)
            vmlinux = parse_vmlinux(data, f"{name} (decompressed)")
        else:
            vmlinux = None
    else:
        if entry == "bzimage":
            raise LinuxBootError(f"{name}: entry='bzimage' needs a bzImage; this is an ELF vmlinux")
        if decompress:
            raise ValueError(f"{name}: an ELF vmlinux is not compressed (drop decompress)")
        vmlinux = image.vmlinux

    # The mode and where the kernel goes.
    if vmlinux is None:
        mode = "bzimage"
        if not header.kernel_64:
            raise LinuxBootError(f"{name}: not a 64-bit kernel (xloadflags {header.xloadflags:#x} lack "
                                 f"XLF_KERNEL_64; protocol {header.protocol}): pykvm enters bzImages only "
                                 f"at their 64-bit entry")
        load = header.pref_address if header.version >= 0x020A and header.pref_address else HIGH_MEMORY
        if header.relocatable and header.kernel_alignment:
            load = _align_up(max(load, HIGH_MEMORY), header.kernel_alignment)
        pm_size = len(data) - header.setup_size
        if pm_size <= ENTRY64_OFFSET or header.syssize * 16 > pm_size:
            raise LinuxBootError(f"{name}: truncated bzImage: {pm_size} bytes of protected-mode kernel after "
                                 f"{header.setup_size} bytes of setup code")
        need = max(pm_size, header.init_size)
        kernel_range = Range(load, load + need, "the kernel")
        entry_gpa = load + ENTRY64_OFFSET
        segments = [(load, memoryview(data)[header.setup_size :], pm_size)]  # (gpa, file bytes, memsz)
    else:
        pvh = vmlinux.pvh_entry
        if entry == "pvh" and pvh is None:
            raise LinuxBootError(f"{name}: the vmlinux has no PVH entry (no XEN_ELFNOTE_PHYS32_ENTRY note; "
                                 f"CONFIG_PVH is off); use entry='elf64'")
        mode = "pvh" if entry == "pvh" or (entry == "auto" and pvh is not None) else "elf64"
        if mode == "elf64" and vmlinux.bits != 64:
            raise LinuxBootError(f"{name}: not a 64-bit kernel (an ELF32 vmlinux has no startup_64); "
                                 f"it can only be entered through PVH")
        entry_gpa = pvh if mode == "pvh" else vmlinux.entry
        kernel_range = Range(vmlinux.start, vmlinux.end, "the kernel")
        segments = [(s.gpa, memoryview(data)[s.offset : s.offset + s.filesz], s.memsz) for s in vmlinux.segments]
    if kernel_range.start < HIGH_MEMORY:
        raise LinuxBootError(f"{name}: the kernel at {kernel_range.start:#x} would overlap {LOADER_AREA.what} "
                             f"(0-{HIGH_MEMORY:#x})")
    if kernel_range.end > mem_size:
        raise LinuxBootError(
            f"{name}: the kernel does not fit in {format_size(mem_size)} of guest RAM: it needs "
            f"{kernel_range.start:#x}-{kernel_range.end:#x} ({format_size(kernel_range.end - kernel_range.start)}"
            f"{' with init_size' if mode == 'bzimage' else ''}); use --mem"
        )
    for r in reserved:
        if r.start < kernel_range.end and kernel_range.start < r.end:
            raise LinuxBootError(f"{name}: the kernel at {kernel_range.start:#x}-{kernel_range.end:#x} overlaps "
                                 f"{r.what} at {r.start:#x}-{r.end:#x}")

    # The command line.
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ValueError(f"the command line contains a NUL byte: {cmdline!r}")
    cmdline_size = header.cmdline_size if header is not None else DEFAULT_CMDLINE_SIZE
    limit = min(cmdline_size, CMDLINE_MAX - 1)
    if len(encoded) > limit:
        raise LinuxBootError(f"{name}: the command line ({len(encoded)} bytes) is longer than the kernel's "
                             f"cmdline_size ({cmdline_size} bytes)" if limit == cmdline_size else
                             f"{name}: the command line ({len(encoded)} bytes) is longer than pykvm's "
                             f"{CMDLINE_MAX - 1}-byte buffer")

    # The e820 map and the initrd.
    e820 = e820_map(mem_size, reserved)
    initrd_range = None
    if initrd is not None:
        initrd = bytes(initrd)
        max_addr = header.initrd_addr_max if header is not None and header.initrd_addr_max else DEFAULT_INITRD_ADDR_MAX
        bound = f"initrd_addr_max ({max_addr:#x})"
        if header is not None and header.can_be_loaded_above_4g or mode == "pvh":
            # As QEMU: a kernel that can be loaded above 4 GiB takes its initrd anywhere (its
            # initrd_addr_max of 2 GiB works around old boot loaders); PVH has no such limit.
            max_addr, bound = (1 << 64) - 1, "the end of RAM"
        gpa = _place_initrd(max(len(initrd), 1), low=_align_up(kernel_range.end, layout.PAGE_SIZE),
                            limit=min(max_addr + 1, mem_size), e820=e820, name=name, mem_size=mem_size,
                            bound=bound)
        initrd_range = Range(gpa, gpa + len(initrd), "the initrd")
    if rsdp is not None and header is not None and header.version < 0x020E and mode != "pvh":
        warnings.append(f"{name}: boot protocol {header.protocol} has no acpi_rsdp_addr (2.14+); the kernel "
                        f"finds the RSDP by scanning {BIOS_AREA_START:#x}-{BIOS_AREA_END:#x}")

    # The zero page or the PVH start info.
    initrd_arg = (initrd_range.start, len(initrd)) if initrd_range else None
    if mode == "pvh":
        zero_page, start_info = None, START_INFO
        block = build_start_info(base=START_INFO, e820=e820, cmdline_gpa=CMDLINE, initrd=initrd_arg, rsdp=rsdp)
    else:
        zero_page, start_info = ZERO_PAGE, None
        raw = header.raw if header is not None else synthetic_header(
            pref_address=kernel_range.start, init_size=kernel_range.end - kernel_range.start)
        block = build_zero_page(raw, e820=e820, cmdline_gpa=CMDLINE, initrd=initrd_arg, rsdp=rsdp,
                                code32_start=kernel_range.start)

    # Every check passed: write.
    for gpa, content, memsz in segments:
        view = memory.view(gpa, memsz)
        view[: len(content)] = content
        view[len(content) :] = bytes(memsz - len(content))  # a vmlinux's bss
    if initrd_range is not None:
        memory.write(initrd_range.start, initrd)
    memory.write(CMDLINE, encoded + b"\0")
    memory.write(zero_page if zero_page is not None else start_info, block)

    return LinuxBoot(
        name=name, mode=mode, entry=entry_gpa, zero_page=zero_page, start_info=start_info, cmdline=cmdline,
        cmdline_gpa=CMDLINE, kernel=kernel_range, initrd=initrd_range, e820=tuple(e820), mem_size=mem_size,
        header=header, compression=compression, warnings=tuple(warnings),
    )


# ---- entering ----------------------------------------------------------------------------------------


def boot_gdt_bytes() -> bytes:
    """The boot GDT: pykvm's (its 0x08 64-bit code for the IDT gates, its TSS at 0x40) with
    __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18, flat data) in entries 2 and 3."""
    from ..x86 import tables

    gdt = bytearray(tables.gdt_bytes())
    gdt[BOOT_CS : BOOT_CS + 8] = dataclasses.replace(tables.CODE64, selector=BOOT_CS).descriptor()
    gdt[BOOT_DS : BOOT_DS + 8] = dataclasses.replace(tables.DATA, selector=BOOT_DS).descriptor()
    return bytes(gdt)


def setup_linux(vcpu, memory, boot: LinuxBoot) -> None:
    """Put the vCPU in the state ``boot.mode`` asks for at ``boot.entry``.

    64-bit (bzimage, elf64): :func:`pykvm.x86.modes.setup_mode` in long mode (its identity map of
    4 GiB in 2 MiB pages covers the kernel, the zero page, the command line and the initrd; its
    IDT reports an exception taken before the kernel loads its own), then the boot GDT at
    BOOT_GDT with CS = __BOOT_CS, DS/ES/SS (and FS/GS) = __BOOT_DS, RFLAGS.IF clear, RSI = the
    zero page. PVH: setup_mode in 32-bit protected mode (flat CS and data segments, CR0.PG and
    CR4 clear, a 32-bit busy TSS in TR, IF clear) and EBX = the start info."""
    from ..x86 import tables
    from ..x86.modes import Mode, setup_mode

    if boot.mode == "pvh":
        setup_mode(vcpu, memory, Mode.PROTECTED, boot.entry)
        regs = vcpu.get_regs()
        regs.rbx = boot.start_info
        vcpu.set_regs(regs)
        return
    setup_mode(vcpu, memory, Mode.LONG, boot.entry)
    gdt = boot_gdt_bytes()
    memory.write(BOOT_GDT, gdt)
    sregs = vcpu.get_sregs()
    dataclasses.replace(tables.CODE64, selector=BOOT_CS).load(sregs.cs)
    data = dataclasses.replace(tables.DATA, selector=BOOT_DS)
    for seg in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        data.load(seg)
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT, len(gdt) - 1
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rsi = boot.zero_page
    vcpu.set_regs(regs)
