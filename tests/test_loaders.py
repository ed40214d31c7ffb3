"""Loaders: format detection, ELF (pyelftools) and multiboot 1, on crafted images and on real ones.

Crafted images are built here byte by byte (``make_elf``, ``mb_header``), so every malformed case
is exactly the one named. The multiboot test kernel (``guests/multiboot/``) is built with make and
run under KVM; where QEMU is installed the same kernel also runs under QEMU's own multiboot loader
and the two reports are compared.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.images import ImageError, guest_image
from pykvm.loaders import (
    BOOTLOADER_MAGIC,
    ElfError,
    MultibootError,
    detect_image,
    find_header,
    load_elf,
    load_multiboot,
    memory_map,
    parse_elf,
    system_ranges,
)
from pykvm.loaders.multiboot import INFO_OFFSETS, MMAP_AVAILABLE, MMAP_RESERVED
from pykvm.memory import GuestMemory, MemoryRegion
from pykvm.x86 import layout
from pykvm.x86.modes import Mode

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "guests"
MiB = 1 << 20

PT_LOAD, PT_NOTE = 1, 4
ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
EM_386, EM_ARM, EM_X86_64 = 3, 40, 62
MB_MAGIC = 0x1BADB002


# ---- building images ------------------------------------------------------------------------------


def make_elf(segments, *, entry=None, bits=32, machine=None, e_type=ET_EXEC, encoding=1, phentsize=None):
    """An ELF executable: ``segments`` are (paddr, data, memsz[, vaddr[, p_type]]); data follows the headers."""
    machine = machine if machine is not None else (EM_386 if bits == 32 else EM_X86_64)
    ehsize, phent = (52, 32) if bits == 32 else (64, 56)
    phentsize = phent if phentsize is None else phentsize
    offset = ehsize + phent * len(segments)
    phdrs, blobs = [], b""
    for seg in segments:
        paddr, data, memsz, *rest = seg
        vaddr = rest[0] if rest else paddr
        p_type = rest[1] if len(rest) > 1 else PT_LOAD
        offset = -(-offset // 16) * 16
        blobs += bytes(offset - ehsize - phent * len(segments) - len(blobs)) + data
        if bits == 32:
            phdrs.append(struct.pack("<8I", p_type, offset, vaddr, paddr, len(data), memsz, 7, 16))
        else:
            phdrs.append(struct.pack("<IIQQQQQQ", p_type, 7, offset, vaddr, paddr, len(data), memsz, 16))
        offset += len(data)
    if entry is None:
        entry = segments[0][3] if len(segments[0]) > 3 else segments[0][0]
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, encoding, 1]) + bytes(9)
    fmt = "<HHIIIIIHHHHHH" if bits == 32 else "<HHIQQQIHHHHHH"
    header = ident + struct.pack(fmt, e_type, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize,
                                 len(segments), 0, 0, 0)
    return header + b"".join(phdrs) + blobs


def mb_header(flags=0x3, *, checksum=None, addr=None, video=None):
    """A multiboot header: ``addr`` = (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)."""
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    out = struct.pack("<3I", MB_MAGIC, flags, checksum)
    if addr is not None or video is not None:
        out += struct.pack("<5I", *(addr or (0,) * 5))
    if video is not None:
        out += struct.pack("<4I", *video)
    return out


CODE = bytes.fromhex("b8 01 00 00 00 f4".replace(" ", ""))  # mov $1, %eax; hlt


def aout_image(load=0x100000, *, prefix=0, bss=0x1000, code=CODE, entry_offset=None, load_end=True):
    """A raw (non-ELF) multiboot kernel with the a.out kludge; the header sits ``prefix`` bytes in."""
    flags = 0x10003
    body_len = prefix + 32 + len(code)
    header_addr = load + prefix
    entry = load + (prefix + 32 if entry_offset is None else entry_offset)
    load_end_addr = load + body_len if load_end else 0
    header = mb_header(flags, addr=(header_addr, load, load_end_addr, load + body_len + bss if bss else 0, entry))
    return bytes(prefix) + header + code


def elf_kernel(paddr=0x100000, *, bits=32, bss=0x2000, flags=0x3, extra_segments=()):
    """An ELF multiboot kernel: one segment that starts with the header, then the code."""
    text = mb_header(flags) + CODE
    return make_elf([(paddr, text, len(text) + bss), *extra_segments], entry=paddr + 12, bits=bits)


def memory(size=16 * MiB, fill=0):
    mem = GuestMemory()
    region = MemoryRegion.allocate(0, 0, size)
    mem.add(region)
    if fill:
        mem.write(0, bytes([fill]) * size)
    return mem


# ---- reading the boot information back (independent of the loader's own structures) -------------


def read_info(mem, gpa):
    u32 = mem.read_u32
    info = {name: u32(gpa + off) for name, off in INFO_OFFSETS.items() if name not in ("syms", "framebuffer_addr")
            and not name.startswith("vbe_interface") and name != "vbe_mode"}
    info["cmdline_text"] = mem.read_cstring(info["cmdline"]).decode()
    info["loader_text"] = mem.read_cstring(info["boot_loader_name"]).decode()
    mmap, at = [], info["mmap_addr"]
    while at < info["mmap_addr"] + info["mmap_length"]:
        size, base, length, kind = struct.unpack("<IQQI", mem.read(at, 24))
        mmap.append((base, length, kind, size))
        at += size + 4
    info["mmap"] = mmap
    mods = []
    for i in range(info["mods_count"]):
        start, end, string, reserved = struct.unpack("<4I", mem.read(info["mods_addr"] + 16 * i, 16))
        mods.append((start, end, mem.read_cstring(string).decode(), reserved))
    info["mods"] = mods
    return info


def disjoint(ranges):
    ordered = sorted((r[0], r[1]) for r in ranges if r[1] > r[0])
    return all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))


# ---- detection ------------------------------------------------------------------------------------


def test_detect_flat_elf_and_multiboot():
    assert detect_image(b"\x90" * 100) == "flat"
    assert detect_image(make_elf([(0x100000, CODE, len(CODE))])) == "elf"
    assert detect_image(aout_image()) == "multiboot"
    assert detect_image(elf_kernel()) == "multiboot", "an ELF file with a multiboot header is multiboot"


def test_detect_malformed_multiboot_names_the_offset_and_checksum():
    image = bytes(0x40) + mb_header(0x3, checksum=0x12345678) + CODE
    with pytest.raises(MultibootError, match=r"kernel\.bin: malformed multiboot header at offset 0x40: "
                                             r"the checksum is 0x12345678.* should be 0xe4524ffb") as e:
        detect_image(image, name="kernel.bin")
    assert isinstance(e.value, ImageError)


def test_a_bad_magic_before_a_good_header_is_skipped_like_qemu_does():
    image = mb_header(0x3, checksum=1) + mb_header(0x3) + CODE
    header = find_header(image)
    assert header.offset == 12 and header.flags == 0x3


def test_header_must_be_aligned_and_within_8192_bytes():
    assert find_header(bytes(2) + mb_header()) is None, "a header at an unaligned offset does not count"
    assert find_header(bytes(8192) + mb_header()) is None
    assert find_header(bytes(8192 - 12) + mb_header()).offset == 8192 - 12
    assert detect_image(bytes(8192) + mb_header()) == "flat"


def test_header_cut_short_by_its_flags():
    image = bytes(8) + mb_header(0x10000)[:12] + b"\0" * 8  # asks for 20 bytes of address fields
    with pytest.raises(MultibootError, match=r"at offset 0x8: its flags 0x10000 ask for the address fields.*"
                                             r"end of the file cuts it short"):
        find_header(image)
    with pytest.raises(MultibootError, match="first 8192 bytes"):
        find_header(bytes(8192 - 16) + mb_header(0x10000, addr=(0,) * 5) + bytes(100))


def test_header_fields():
    image = aout_image(prefix=64)
    h = find_header(image)
    assert (h.offset, h.flags, h.aout_kludge, h.page_align, h.memory_info, h.video_mode) == (64, 0x10003, True, True, True, False)
    assert (h.header_addr, h.load_addr) == (0x100040, 0x100000)
    v = find_header(mb_header(0x4, video=(0, 1024, 768, 32)))
    assert (v.mode_type, v.width, v.height, v.depth, v.load_addr) == (0, 1024, 768, 32, None)


# ---- ELF ------------------------------------------------------------------------------------------


def test_load_elf_segments_bss_and_entry():
    mem = memory(4 * MiB, fill=0xAA)
    text, data = b"\x90" * 100 + CODE, b"DATA" * 8
    image = make_elf([(0x100000, text, len(text)), (0x200000, data, 0x1000)], entry=0x100064)
    elf = load_elf(mem, image, name="k.elf")
    assert (elf.entry, elf.bits, elf.segments) == (0x100064, 32, [(0x100000, len(text)), (0x200000, 0x1000)])
    assert mem.read(0x100000, len(text)) == text
    assert mem.read(0x200000, len(data)) == data
    assert mem.read(0x200000 + len(data), 0x1000 - len(data)) == bytes(0x1000 - len(data)), "the bss is zeroed"
    assert mem.read_u8(0x200000 + 0x1000) == 0xAA, "nothing past p_memsz is touched"


def test_load_elf64_and_entry_moved_from_vaddr_to_paddr():
    mem = memory(4 * MiB)
    image = make_elf([(0x100000, CODE, 0x100, 0xFFFFFFFF80100000)], entry=0xFFFFFFFF80100002, bits=64)
    elf = load_elf(mem, image)
    assert (elf.bits, elf.machine, elf.e_entry, elf.entry) == (64, "EM_X86_64", 0xFFFFFFFF80100002, 0x100002)


def test_load_built_guest_elf_matches_its_flat_image():
    try:
        binary = guest_image("hello_protected")
    except ImageError as e:
        pytest.skip(f"cannot build guests here: {e}")
    mem = memory(4 * MiB)
    elf = load_elf(mem, binary.with_suffix(".elf").read_bytes(), name="hello_protected.elf")
    flat = binary.read_bytes()
    assert elf.entry == layout.PROTECTED_LOAD
    assert mem.read(layout.PROTECTED_LOAD, len(flat)) == flat


@pytest.mark.parametrize("image, message", [
    (b"MZ\x90\x00" + bytes(100), r"k: not an ELF file \(it does not start with the \\x7fELF magic\)"),
    (b"\x7fELF\x01\x01", r"k: truncated ELF header: the file is 6 bytes, the identification alone is 16"),
    (make_elf([(0x100000, CODE, 6)])[:30], r"k: truncated ELF header: the file is 30 bytes, an ELF32 header is 52"),
    (make_elf([(0x100000, CODE, 6)], bits=64)[:60], r"an ELF64 header is 64"),
    (make_elf([(0x100000, CODE, 6)], encoding=2), r"big-endian"),
    (b"\x7fELF\x03\x01\x01" + bytes(60), r"unknown class 3"),
    (make_elf([(0x100000, CODE, 6)], machine=EM_ARM), r"for machine EM_ARM, not x86 or x86-64"),
    (make_elf([(0x100000, CODE, 6)], e_type=ET_DYN), r"\(ET_DYN\); pykvm loads only fixed-address executables.*-no-pie"),
    (make_elf([(0x100000, CODE, 6)], e_type=ET_REL), r"relocatable object file \(ET_REL\)"),
    (make_elf([(0x100000, CODE, 6)])[:60], r"truncated ELF file: the program headers \(0x34-0x54\) run past the end"),
    (make_elf([(0x100000, CODE, 6)])[:-3], r"truncated ELF file: segment 0 needs file bytes 0x60-0x66, the file is 0x63 bytes"),
    (make_elf([(0x100000, CODE, 2)]), r"malformed segment 0: p_filesz 0x6 is larger than p_memsz 0x2"),
    (make_elf([(0x100000, CODE, 0x2000), (0x101000, CODE, 6)]), r"segments 0 \(0x100000-0x102000\) and 1 \(0x101000-0x101006\) overlap"),
    (make_elf([(0x100000, CODE, 6, 0x100000, PT_NOTE)]), r"no PT_LOAD segment"),
    (make_elf([(0x100000, CODE, 6)], entry=0x300000), r"the entry point 0x300000 is in no loaded segment"),
    (make_elf([(0x100000, CODE, 6)], phentsize=40), r"program header size 40, ELF32 needs 32"),
    (make_elf([(0xFFFFF000, CODE, 0x2000)]), r"wraps past the end of the address space"),
], ids=["not-elf", "short-ident", "short-elf32-header", "short-elf64-header", "big-endian", "bad-class",
        "arm", "et-dyn", "et-rel", "short-phdrs", "segment-past-eof", "filesz-over-memsz", "overlap",
        "no-pt-load", "entry-outside", "bad-phentsize", "wraps"])
def test_malformed_elf(image, message):
    with pytest.raises(ElfError, match=message):
        load_elf(memory(4 * MiB), image, name="k")


def test_elf_with_no_program_headers():
    image = bytearray(make_elf([(0x100000, CODE, 6)]))
    struct.pack_into("<H", image, 44, 0)  # e_phnum
    with pytest.raises(ElfError, match="no program headers"):
        parse_elf(bytes(image))


def test_elf_segment_outside_memory_says_use_mem():
    image = make_elf([(0x100000, CODE, 6), (0x300000, CODE, 0x200000)])
    mem = memory(4 * MiB, fill=0x55)
    with pytest.raises(ElfError, match=r"^k\.elf: segment 1 at 0x300000 \(size 0x200000\) does not fit in "
                                       r"4 MiB of guest memory; use --mem$"):
        load_elf(mem, image, name="k.elf")
    assert mem.read(0x100000, 6) == b"\x55" * 6, "nothing is written when a later segment fails"


def test_elf_segment_over_pykvm_tables_is_refused():
    image = make_elf([(0x10000, CODE, 6)])
    with pytest.raises(ElfError, match=r"segment 0 at 0x10000-0x10006 overlaps pykvm's protected-mode system tables"):
        load_elf(memory(4 * MiB), image)
    assert load_elf(memory(4 * MiB), image, reserved=()).entry == 0x10000
    with pytest.raises(ElfError, match="page tables"):
        load_elf(memory(4 * MiB), make_elf([(0x21000, CODE, 6)]), reserved=system_ranges(Mode.LONG))


def test_system_ranges_are_the_pages_setup_mode_writes():
    assert [(r.start, r.end) for r in system_ranges()] == [(0x10000, 0x16000)]
    long_ranges = [(r.start, r.end) for r in system_ranges(Mode.LONG)]
    assert (0x10000, 0x16000) in long_ranges and (0x21000, 0x27000) in long_ranges


@pytest.mark.kvm
@pytest.mark.parametrize("name, mode", [("hello_protected", Mode.PROTECTED), ("hello_long", Mode.LONG)])
def test_elf_guest_runs(name, mode):
    """A guest's .elf, loaded by segments, runs like its flat .bin (ELF32 and ELF64)."""
    from pykvm.machine import Machine

    try:
        elf_path = guest_image(name).with_suffix(".elf")
    except ImageError as e:
        pytest.skip(f"cannot build guests here: {e}")
    with Machine() as m:
        image = load_elf(m.memory, elf_path.read_bytes(), name=elf_path.name, reserved=system_ranges(mode))
        assert image.bits == mode.bits
        m.setup(mode, image.entry)
        outcome = m.run(timeout=10)
    assert outcome.ok and m.console_output == f"Hello from {mode.value} mode\n".encode()


# ---- multiboot: the kernel ------------------------------------------------------------------------


def test_aout_kludge_image_loads_at_its_address_fields():
    mem = memory(fill=0xCC)
    image = aout_image(prefix=64, bss=0x1000)
    info = load_multiboot(mem, image, path="/boot/raw.bin", mem_size=16 * MiB)
    body = len(image)
    assert info.kind == "aout-kludge"
    assert info.entry == 0x100000 + 64 + 32
    assert info.segments == [(0x100000, body + 0x1000)]
    assert mem.read(0x100000, body) == image, "file offset = header offset - (header_addr - load_addr) = 0"
    assert mem.read(0x100000 + body, 0x1000) == bytes(0x1000), "up to bss_end_addr is zeroed"


def test_aout_kludge_with_load_end_zero_loads_the_rest_of_the_file():
    mem = memory()
    image = aout_image(prefix=16, bss=0, load_end=False) + b"TAIL"
    info = load_multiboot(mem, image, path="k")
    assert info.segments == [(0x100000, len(image))]
    assert mem.read(0x100000 + len(image) - 4, 4) == b"TAIL"


def test_aout_kludge_wins_over_elf():
    """With flag bit 16, the address fields say where the file goes even in an ELF file (QEMU, GRUB)."""
    elf = make_elf([(0x200000, bytes(64), 64)])
    header_at = len(elf)
    header = mb_header(0x10000, addr=(0x300000 + header_at, 0x300000, 0x300000 + header_at + 32, 0, 0x300000))
    info = load_multiboot(memory(), elf + header, path="k")
    assert info.kind == "aout-kludge" and info.segments == [(0x300000, header_at + 32)]


@pytest.mark.parametrize("addr, message", [
    ((0x100000, 0x100010, 0, 0, 0x100010), r"load_addr 0x100010 is above header_addr 0x100000"),
    ((0x100100, 0x100000, 0, 0, 0x100000), r"header_addr - load_addr is 0x100, more than the header's file offset 0x0"),
    ((0x100000, 0x100000, 0xF0000, 0, 0x100000), r"load_end_addr 0xf0000 is below load_addr 0x100000"),
    ((0x100000, 0x100000, 0x101000, 0, 0x100000), r"truncated kernel: loading 0x100000-0x101000 needs file bytes 0x0-0x1000"),
    ((0x100000, 0x100000, 0x100020, 0x100010, 0x100000), r"bss_end_addr 0x100010 is below the end of the loaded bytes 0x100020"),
    ((0x100000, 0x100000, 0x100020, 0, 0x200000), r"entry_addr 0x200000 is outside the loaded kernel \(0x100000-0x100020\)"),
])
def test_malformed_aout_kludge_fields(addr, message):
    image = mb_header(0x10000, addr=addr) + bytes(32)
    with pytest.raises(MultibootError, match=message):
        load_multiboot(memory(), image, path="k")


def test_kernel_larger_than_memory():
    big = aout_image(bss=8 * MiB)
    with pytest.raises(MultibootError, match=r"^k: the kernel at 0x100000 \(size 0x800026\) does not fit in "
                                             r"4 MiB of guest memory; use --mem$"):
        load_multiboot(memory(4 * MiB), big, path="k")
    with pytest.raises(MultibootError, match=r"segment 0 at 0x100000 \(size 0x400012\) does not fit in 4 MiB"):
        load_multiboot(memory(4 * MiB), elf_kernel(bss=4 * MiB), path="k")


def test_elf64_multiboot_kernel_is_entered_in_32bit_mode():
    info = load_multiboot(memory(), elf_kernel(bits=64), path="k64")
    assert (info.kind, info.entry) == ("elf64", 0x10000C)
    with pytest.raises(MultibootError, match=r"segment 1 at 0x100000000 lies above 4 GiB; a multiboot kernel "
                                             r"is entered in 32-bit protected mode without paging"):
        load_multiboot(memory(), elf_kernel(bits=64, extra_segments=[(1 << 32, b"x", 1)]), path="k")


@pytest.mark.parametrize("image, error, message", [
    (b"\x90" * 64, MultibootError, r"k: no multiboot header \(magic 0x1badb002, 32-bit aligned\) in the first 8192 bytes"),
    (mb_header(0x3) + CODE, MultibootError, r"no address fields \(flag bit 16\) and the file is not ELF"),
    (mb_header(0x3 | 1 << 5) + CODE, MultibootError, r"requires features pykvm does not know \(flag bits 5 of 0x23\)"),
    (mb_header(0x3, checksum=7) + CODE, MultibootError, r"malformed multiboot header at offset 0x0"),
    (elf_kernel()[:-3], ElfError, r"k: truncated ELF file: segment 0 needs file bytes"),
    (make_elf([(0x100000, mb_header() + CODE, 18)], machine=EM_ARM), ElfError, r"not x86 or x86-64"),
], ids=["no-header", "not-elf-no-kludge", "unknown-required-flag", "bad-checksum", "truncated-elf", "arm-elf"])
def test_multiboot_errors(image, error, message):
    with pytest.raises(error, match=message):
        load_multiboot(memory(), image, path="k")


def test_video_flag_loads_with_a_warning_like_qemu():
    image = mb_header(0x10007, addr=(0x100000, 0x100000, 0, 0, 0x100030), video=(0, 640, 480, 8)) + CODE
    info = load_multiboot(memory(), image, path="k")
    assert len(info.warnings) == 1 and "video mode (flag bit 2)" in info.warnings[0]


def test_a_kernel_over_pykvm_tables_is_refused():
    with pytest.raises(MultibootError, match=r"the kernel at 0x14000-.* overlaps pykvm's protected-mode system tables "
                                             r"\(GDT, IDT, TSS, exception stubs\) at 0x10000-0x16000"):
        load_multiboot(memory(), aout_image(load=0x14000), path="k")


# ---- multiboot: the boot information ----------------------------------------------------------------


def test_boot_information_as_the_kernel_reads_it():
    mem = memory(16 * MiB)
    modules = [("/boot/initrd.img", b"initrd-bytes", "root=/dev/ram0 quiet"), ("/boot/data", b"x" * 5000, "")]
    info = load_multiboot(mem, elf_kernel(), path="/boot/kernel.elf", cmdline="console=ttyS0 debug",
                          modules=modules, mem_size=16 * MiB)
    assert (info.eax, info.ebx) == (BOOTLOADER_MAGIC, info.info_gpa) == (0x2BADB002, info.info_gpa)
    got = read_info(mem, info.ebx)
    assert got["flags"] == 0x24D == 1 | 4 | 8 | 0x40 | 0x200
    assert got["cmdline_text"] == "/boot/kernel.elf console=ttyS0 debug", "the image's path first, then the arguments"
    assert got["loader_text"] == "pykvm"
    assert (got["mem_lower"], got["mem_upper"]) == (639, 15 * 1024)
    assert got["mmap"] == [
        (0x0, 0x10000, MMAP_AVAILABLE, 20),
        (0x10000, 0x6000, MMAP_RESERVED, 20),  # pykvm's GDT, IDT, TSS and exception stubs
        (0x16000, 0x9FC00 - 0x16000, MMAP_AVAILABLE, 20),
        (0x9FC00, 0x400, MMAP_RESERVED, 20),
        (0xF0000, 0x10000, MMAP_RESERVED, 20),
        (0x100000, 15 * MiB, MMAP_AVAILABLE, 20),
    ]
    (s0, e0, str0, r0), (s1, e1, str1, r1) = got["mods"]
    assert (str0, str1) == ("/boot/initrd.img root=/dev/ram0 quiet", "/boot/data")
    assert (e0 - s0, e1 - s1, r0, r1) == (12, 5000, 0, 0)
    assert mem.read(s0, 12) == b"initrd-bytes" and mem.read(s1, 5000) == b"x" * 5000
    kernel_end = max(s.end for s in info.segments)
    assert s0 == -(-kernel_end // 4096) * 4096, "the first module at the first page after the kernel"
    assert s1 == -(-e0 // 4096) * 4096 and s1 % 4096 == 0
    assert info.modules[0].string == str0 and info.cmdline == got["cmdline_text"]


def test_cmdline_is_just_the_path_without_arguments():
    mem = memory()
    info = load_multiboot(mem, elf_kernel(), path="kernel.elf")
    got = read_info(mem, info.ebx)
    assert got["cmdline_text"] == "kernel.elf" and got["mods_count"] == 0


def test_memory_map_for_the_smallest_guest():
    entries = memory_map(1 * MiB, system_ranges())
    assert entries[-1].end == 0x100000 and all(e.type == MMAP_RESERVED for e in entries if e.base >= 0x9FC00)
    with pytest.raises(ValueError, match="at least 1 MiB"):
        memory_map(512 * 1024)


def test_boot_information_moves_away_from_a_kernel_in_low_memory():
    mem = memory()
    image = make_elf([(0x1000, mb_header() + CODE, 0xF000), (0x100000, b"hi", 2)], entry=0x100C)
    info = load_multiboot(mem, image, path="low")
    assert info.info_gpa >= 0x16000, "not over the kernel at 0x1000-0x10000 nor pykvm's tables"
    assert disjoint([*info.ranges(), *system_ranges()])


def test_module_that_does_not_fit_writes_nothing():
    mem = memory(2 * MiB, fill=0x77)
    with pytest.raises(MultibootError, match=r"module 0 \(big.img, 2097152 bytes\) does not fit in 2 MiB of guest "
                                             r"memory after the kernel \(ends 0x102012\); use --mem"):
        load_multiboot(mem, elf_kernel(), path="k", modules=[("big.img", bytes(2 * MiB), "")])
    assert mem.read(0x100000, 16) == b"\x77" * 16


def test_nul_in_the_command_line_is_refused():
    with pytest.raises(ValueError, match="NUL"):
        load_multiboot(memory(), elf_kernel(), path="k", cmdline="a\0b")


def test_mem_size_beyond_the_ram_is_refused():
    with pytest.raises(ValueError, match="more than the RAM at GPA 0"):
        load_multiboot(memory(4 * MiB), elf_kernel(), path="k", mem_size=8 * MiB)


@st.composite
def layouts(draw):
    """A kernel of 1-4 segments (gaps and sizes drawn from a base) and 0-4 modules."""
    base = draw(st.sampled_from([0x1000, 0x16000, 0x80000, 0x100000, 0x400000]))
    segments, at = [], base
    for _ in range(draw(st.integers(1, 4))):
        at += draw(st.integers(0, 0x3000))
        data = bytes([len(segments) + 1]) * draw(st.integers(1, 0x1800))
        if not segments:
            data = mb_header() + data  # the first segment starts with the multiboot header
        memsz = len(data) + draw(st.integers(0, 0x3000))
        segments.append((at, data, memsz))
        at += memsz
    modules = [(f"/m{i}", bytes([0xA0 + i]) * draw(st.integers(0, 0x5000)), draw(st.sampled_from(["", "x=1"])))
               for i in range(draw(st.integers(0, 4)))]
    cmdline = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
    return segments, modules, cmdline


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_boot_information_never_overlaps_the_kernel_or_modules(layout_):
    segments, modules, cmdline = layout_
    image = make_elf(segments, entry=segments[0][0] + 12)
    mem = memory(8 * MiB, fill=0xEE)
    try:
        info = load_multiboot(mem, image, path="/k", cmdline=cmdline, modules=modules, mem_size=8 * MiB)
    except (MultibootError, ElfError) as e:
        # Only a kernel over pykvm's tables may be refused here.
        assert "overlaps pykvm's" in str(e)
        tables = system_ranges()[0]
        assert any(gpa < tables.end and tables.start < gpa + memsz for gpa, _, memsz in segments)
        return
    ranges = info.ranges()
    assert disjoint([*ranges, *system_ranges()]), ranges
    available = [(e.base, e.end) for e in info.mmap if e.type == MMAP_AVAILABLE]
    for r in ranges[len(info.segments):]:  # modules and the boot information: in available memory
        assert any(lo <= r.start and r.end <= hi for lo, hi in available), r
    for (gpa, data, memsz), seg in zip(segments, info.segments):
        assert seg == (gpa, memsz)
        assert mem.read(gpa, len(data)) == data and mem.read(gpa + len(data), memsz - len(data)) == bytes(memsz - len(data))
    got = read_info(mem, info.ebx)
    assert got["cmdline_text"] == "/k" + (f" {cmdline}" if cmdline else "")
    assert len(got["mods"]) == len(modules)
    for (start, end, string, _), (path, data, args) in zip(got["mods"], modules):
        assert start % 4096 == 0 and end - start == len(data) and mem.read(start, len(data)) == data
        assert string == path + (f" {args}" if args else "")
    assert [(b, l, t) for b, l, t, _ in got["mmap"]] == [tuple(e) for e in info.mmap]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["elf32", "elf64", "mb-elf", "aout"]), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                                                        min_size=1, max_size=6), st.integers(0, 200))
def test_damaged_images_give_image_errors(seed, edits, cut):
    """Any corruption of a valid image either still loads or raises ImageError: never another error."""
    image = bytearray({"elf32": make_elf([(0x100000, CODE, 0x100), (0x200000, b"x" * 50, 0x1000)]),
                       "elf64": make_elf([(0x100000, CODE, 6)], bits=64),
                       "mb-elf": elf_kernel(), "aout": aout_image(prefix=32)}[seed])
    for offset, value in edits:
        image[offset % len(image)] = value
    image = bytes(image[: len(image) - cut])
    for attempt in (lambda: load_elf(memory(4 * MiB), image), lambda: detect_image(image),
                    lambda: load_multiboot(memory(4 * MiB), image, path="k")):
        try:
            attempt()
        except ImageError:
            pass


# ---- the multiboot test kernel, built and run -----------------------------------------------------


def build_kernels() -> dict[str, Path]:
    missing = [tool for tool in ("make", "gcc", "ld", "objcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the multiboot kernel needs {', '.join(missing)} (apt-get install build-essential)")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    targets = {"elf32": "build/multiboot_kernel.elf", "elf64": "build/multiboot_kernel64.elf"}
    result = subprocess.run(["make", "-s", "-C", str(GUESTS), *targets.values()], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {kind: GUESTS / target for kind, target in targets.items()}


@pytest.fixture(scope="module")
def kernels():
    return build_kernels()


def test_built_kernels_are_multiboot_elf32_and_elf64(kernels):
    elf32, elf64 = kernels["elf32"].read_bytes(), kernels["elf64"].read_bytes()
    assert (elf32[4], struct.unpack_from("<H", elf32, 18)[0]) == (1, EM_386)
    assert (elf64[4], struct.unpack_from("<H", elf64, 18)[0]) == (2, EM_X86_64)
    for data in (elf32, elf64):
        assert detect_image(data) == "multiboot"
        assert find_header(data).flags == 0x3  # page-aligned modules, memory information
        assert parse_elf(data).entry == parse_elf(elf32).entry


def modules_in(directory) -> list[tuple[str, bytes, str]]:
    return [(f"{directory}/mod1.txt", b"hello module one", "arg1 arg2"), (f"{directory}/mod2.bin", b"second", "")]


def expected_lines(kernel, directory) -> list[str]:
    return [
        "multiboot: ok",
        "state: cr0.pe=1 cr0.pg=0 eflags.if=0 eflags.vm=0",
        f"cmdline: '{kernel} hello world'",
        "mem_lower: 639 KiB",
        "modules: 2",
        f"module 0: 16 bytes, '{directory}/mod1.txt arg1 arg2', data 'hello module one'",
        f"module 1: 6 bytes, '{directory}/mod2.bin', data 'second'",
        "multiboot: exit 0",
    ]


def run_under_pykvm(kernel: Path, *, magic=True, mem_size=16 * MiB, directory="/boot"):
    from pykvm import exits
    from pykvm.loaders import setup_multiboot
    from pykvm.machine import Machine
    from pykvm.outcome import Outcome

    def exit_port(exit, vcpu):  # QEMU's isa-debug-exit: the status v ends the run as (v << 1) | 1
        if isinstance(exit, exits.IoOut):
            return Outcome(status=(exit.value << 1) | 1)
        exit.reply(0xFFFFFFFF)
        return None

    with Machine(mem_size) as m:
        m.memory.write(0x100000, b"\xEE" * MiB)  # dirty, so the kernel's bss check sees the loader zero it
        info = load_multiboot(m.memory, kernel.read_bytes(), path=str(kernel), cmdline="hello world",
                              modules=modules_in(directory), mem_size=mem_size)
        if magic:
            setup_multiboot(m.vcpu, m.memory, info)
        else:
            m.setup(Mode.PROTECTED, info.entry)  # EAX = 0: not started by a multiboot loader
        m.bus.add_port(0xF4, exit_port, 4)
        outcome = m.run(timeout=20)
        return outcome, m.console_output.decode()


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["elf32", "elf64"])
def test_multiboot_kernel_under_kvm(kernels, kind):
    kernel = kernels[kind]
    outcome, output = run_under_pykvm(kernel)
    lines = output.splitlines()
    assert outcome.status == (0 << 1) | 1, output
    for line in expected_lines(kernel, "/boot"):
        assert line in lines, output
    assert "flags: 0x24d" in lines and "boot loader: pykvm" in lines
    assert "mem_upper: 15360 KiB" in lines
    assert [line for line in lines if line.startswith("mmap:")] == [
        "mmap: 0x000000000-0x000010000 type 1",
        "mmap: 0x000010000-0x000016000 type 2",
        "mmap: 0x000016000-0x00009fc00 type 1",
        "mmap: 0x00009fc00-0x0000a0000 type 2",
        "mmap: 0x0000f0000-0x000100000 type 2",
        "mmap: 0x000100000-0x001000000 type 1",
    ]
    assert not any(line.startswith("FAIL") for line in lines), output


@pytest.mark.kvm
def test_multiboot_kernel_checks_the_magic(kernels):
    outcome, output = run_under_pykvm(kernels["elf32"], magic=False)
    assert "FAIL: EAX is 0x0, not the multiboot magic 0x2badb002" in output
    assert outcome.status == (1 << 1) | 1


@pytest.mark.kvm
def test_same_report_as_qemu(kernels, tmp_path):
    """QEMU's own multiboot loader (TCG) and pykvm's give the kernel the same view, where they should."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    modules = modules_in(tmp_path)
    for path, data, _ in modules:
        Path(path).write_bytes(data)
    kernel = kernels["elf32"]
    initrd = ",".join(f"{p} {a}".strip() for p, _, a in modules)
    result = subprocess.run(
        [qemu, "-machine", "accel=tcg", "-nodefaults", "-display", "none", "-debugcon", "stdio", "-m", "16M",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-kernel", str(kernel), "-append", "hello world",
         "-initrd", initrd],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == (0 << 1) | 1, result.stdout + result.stderr
    qemu_lines = result.stdout.splitlines()
    outcome, output = run_under_pykvm(kernel, directory=tmp_path)
    ours = output.splitlines()
    for line in expected_lines(kernel, tmp_path):
        assert line in qemu_lines, result.stdout
        assert line in ours, output
    # Where they differ, by design: QEMU also passes a boot device and reserves ACPI tables below
    # the top of RAM and a BIOS ROM below 4 GiB; pykvm reserves its own tables at 0x10000-0x16000.
    assert "flags: 0x24f" in qemu_lines and "boot loader: qemu" in qemu_lines
    qemu_low = {line for line in qemu_lines if line.startswith("mmap: 0x0000") and "type 2" in line}
    assert qemu_low <= set(ours), "QEMU's low reserved ranges (EBDA, BIOS area) are reserved by pykvm too"
