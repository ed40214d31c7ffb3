"""The Linux boot protocol loader: setup headers of real kernels (tests/data/linux/), the zero page
and its offsets against <asm/bootparam.h>, the e820 map, PVH start info, host decompression, each
bad input's one-line error, and pykvm's stub kernel (guests/linux/stub.S) booted three ways."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pykvm.images import ImageError
from pykvm.loaders import (
    LinuxBootError,
    boot_params_view,
    build_zero_page,
    bzimage_payload,
    detect_compression,
    e820_map,
    load_linux,
    parse_bzimage,
    parse_vmlinux,
    setup_linux,
    start_info_view,
)
from pykvm.loaders import linux
from pykvm.memory import GuestMemory, MemoryRegion

DATA = Path(__file__).parent / "data" / "linux"
GUESTS = Path(__file__).resolve().parent.parent / "guests"
MiB = 1 << 20

#: What each fixture's header says (from the full images; see tests/data/linux/README.md).
FIXTURES = {
    "vmlinuz-6.1.0-57-amd64.setup": dict(
        version=0x020F, setup_sects=39, loadflags=0x01, xloadflags=0x7F, pref_address=0x1000000,
        init_size=0x3F98000, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000,
        relocatable_kernel=1, payload_offset=0x2CC, payload_length=0x7BEFE4),
    "vmlinuz-6.12.107+deb12-cloud-amd64.setup": dict(
        version=0x020F, setup_sects=39, loadflags=0x01, xloadflags=0x7F, pref_address=0x1000000,
        init_size=0x37DC000, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000,
        relocatable_kernel=1, payload_offset=0x2CC, payload_length=0xADA11E),
    "vmlinuz-6.1.0-47-cloud-amd64.setup": dict(
        version=0x020F, setup_sects=39, loadflags=0x01, xloadflags=0x7F, pref_address=0x1000000,
        init_size=0x3377000, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000,
        relocatable_kernel=1, payload_offset=0x2CC, payload_length=0xD5F67C),
    "memtest86+x64.bin.setup": dict(
        version=0x020C, setup_sects=2, loadflags=0x01, xloadflags=0x09, pref_address=0x100000,
        init_size=0x6ACF8, cmdline_size=255, initrd_addr_max=0xFFFFFFFF, kernel_alignment=0x1000,
        relocatable_kernel=0, payload_offset=0, payload_length=0),
    "ipxe.lkrn.setup": dict(
        version=0x0207, setup_sects=5, loadflags=0x01, xloadflags=0, pref_address=0, init_size=0,
        cmdline_size=2047, initrd_addr_max=0xFFFFFFFF, kernel_alignment=0, relocatable_kernel=0,
        payload_offset=0, payload_length=0),
}  # fmt: skip
#: The first bytes of each Debian kernel's payload (README.md): the compression it was built with.
PAYLOAD_HEADS = {
    "vmlinuz-6.1.0-57-amd64.setup": ("fd377a585a000001", "xz"),
    "vmlinuz-6.12.107+deb12-cloud-amd64.setup": ("28b52ffd04888c04", "zstd"),
    "vmlinuz-6.1.0-47-cloud-amd64.setup": ("02214c18f8b73a00", "lz4"),
    "memtest86+x64.bin.setup": ("fcfa8b9e14020000", None),  # not compressed, and not ELF
}


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def memory(size=64 * MiB) -> GuestMemory:
    mem = GuestMemory()
    mem.add(MemoryRegion.allocate(0, 0, size))
    return mem


def fake_bzimage(*, version=0x020F, xloadflags=1, loadflags=1, pref=0x100000, init_size=0x10000, cmdline_size=255,
                 initrd_addr_max=0x7FFFFFFF, payload=b"", relocatable=0, alignment=0x200000, body=0x400) -> bytes:
    """A bzImage with one setup sector: its header fields as given, a protected-mode part of
    ``body`` bytes (0xF4, hlt) and ``payload`` at payload_offset 0x400 in it."""
    setup = bytearray(2 * 512)
    pm = bytearray(b"\xf4" * body) + payload
    fields = dict(
        setup_sects=1, syssize=len(pm) // 16, boot_flag=0xAA55, jump=0xEB | (0x26C - 0x202) << 8,
        header=0x53726448, version=version, loadflags=loadflags, code32_start=0x100000,
        initrd_addr_max=initrd_addr_max, kernel_alignment=alignment, relocatable_kernel=relocatable,
        xloadflags=xloadflags, cmdline_size=cmdline_size, payload_offset=body if payload else 0,
        payload_length=len(payload), pref_address=pref, init_size=init_size,
    )  # fmt: skip
    for name, value in fields.items():
        offset, fmt, _ = linux.HEADER_FIELDS[name]
        struct.pack_into("<" + fmt, setup, offset, value)
    return bytes(setup + pm)


# ---- the setup header ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_headers(name):
    hdr = parse_bzimage(fixture(name), name)
    for field, value in FIXTURES[name].items():
        assert getattr(hdr, field) == value, field
    assert hdr.boot_flag == 0xAA55 and hdr.header == 0x53726448
    assert hdr.setup_size == (hdr.setup_sects + 1) * 512 == len(fixture(name))
    assert hdr.kernel_64 == bool(FIXTURES[name]["xloadflags"] & 1)
    assert hdr.raw == fixture(name)[0x1F1 : hdr.header_end]
    assert hdr.protocol == f"2.{hdr.version & 0xFF:02d}"


def test_fields_newer_than_the_protocol_read_as_zero():
    hdr = parse_bzimage(fixture("ipxe.lkrn.setup"))  # 2.07: no payload, pref_address, init_size
    assert (hdr.payload_offset, hdr.pref_address, hdr.init_size, hdr.xloadflags) == (0, 0, 0, 0)
    assert hdr.hardware_subarch == 0 and hdr.cmdline_size == 2047


def test_memdisk_protocol_203_is_too_old():
    with pytest.raises(LinuxBootError) as e:
        parse_bzimage(fixture("memdisk.setup"), "memdisk")
    assert str(e.value) == "memdisk: boot protocol 2.03 is too old (pykvm needs 2.06 or later)"
    assert isinstance(e.value, ImageError)


@pytest.mark.parametrize("data, message", [
    (b"\0" * 4096, "junk: not a bzImage (no HdrS signature at 0x202)"),
    (b"\x7fELF" + b"\0" * 4092, "junk: not a bzImage (no HdrS signature at 0x202): it is an ELF file"),
    (b"MZ", "junk: not a bzImage (no HdrS signature at 0x202): the file is 2 bytes"),
])  # fmt: skip
def test_not_a_bzimage(data, message):
    with pytest.raises(LinuxBootError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_bzimage(data, "junk")


def test_bad_boot_flag_zimage_and_truncated_setup():
    image = bytearray(fake_bzimage())
    image[0x1FE:0x200] = b"\0\0"
    with pytest.raises(LinuxBootError, match=r"k: not a bzImage \(boot_flag at 0x1fe is 0x0000, not 0xaa55\)"):
        parse_bzimage(image, "k")
    with pytest.raises(LinuxBootError, match="lack LOADED_HIGH: a zImage"):
        parse_bzimage(fake_bzimage(loadflags=0), "k")
    small = bytearray(fake_bzimage())
    small[0x1F1] = 30  # 31 sectors of setup code the file does not have
    with pytest.raises(LinuxBootError, match="truncated bzImage: 2048 bytes, less than its own setup code"):
        parse_bzimage(small, "k")


# ---- the zero page ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FIXTURES if FIXTURES[n]["xloadflags"] & 1])
def test_zero_page_from_fixture(name):
    hdr = parse_bzimage(fixture(name))
    e820 = e820_map(256 * MiB, [(0xD0000000, 0xD0001000)])
    page = build_zero_page(hdr, e820=e820, cmdline_gpa=0x30000, initrd=(0xF000000, 0x123456), rsdp=0xE0000,
                           code32_start=0x1000000)
    assert len(page) == 4096
    bp = boot_params_view(page)
    # The image's header is kept, but for what a boot loader fills.
    filled = {"type_of_loader", "loadflags", "heap_end_ptr", "cmd_line_ptr", "ramdisk_image", "ramdisk_size",
              "code32_start"}
    for field, value in hdr.to_dict().items():
        if field not in filled:
            assert getattr(bp.header, field) == value, field
    assert bp.header.type_of_loader == 0xFF
    assert bp.header.loadflags == hdr.loadflags | linux.CAN_USE_HEAP
    assert bp.header.heap_end_ptr == 0xDE00
    assert bp.header.code32_start == 0x1000000
    assert bp.cmd_line_ptr == 0x30000 and bp.fields["ext_cmd_line_ptr"] == 0
    assert (bp.ramdisk_image, bp.ramdisk_size) == (0xF000000, 0x123456)
    assert bp.acpi_rsdp_addr == (0xE0000 if hdr.version >= 0x020E else 0)  # 2.14+ only
    assert bp.e820 == tuple(e820) and bp.fields["e820_entries"] == 5
    # What a firmware-less VMM leaves: no video (orig_video_isVGA 0), EDD, APM, EFI, sentinel.
    assert bp.fields["screen_info"] == bytes(64) and bp.orig_video_is_vga == 0
    for field in ("apm_bios_info", "ist_info", "edid_info", "efi_info", "eddbuf", "edd_mbr_sig_buffer"):
        assert bp.fields[field] == bytes(len(bp.fields[field])), field
    assert (bp.fields["eddbuf_entries"], bp.fields["edd_mbr_sig_buf_entries"], bp.fields["sentinel"]) == (0, 0, 0)
    rest = bytearray(page[:0x1F1])  # before the header: only acpi_rsdp_addr and e820_entries are set
    rest[0x70:0x78], rest[0x1E8] = bytes(8), 0
    assert rest == bytes(0x1F1)


def test_zero_page_above_4g_fields():
    hdr = parse_bzimage(fixture("vmlinuz-6.1.0-57-amd64.setup"))
    bp = boot_params_view(build_zero_page(hdr, e820=[], cmdline_gpa=0x1_0000_3000, initrd=(0x2_0000_0000, 1 << 33)))
    assert bp.cmd_line_ptr == 0x1_0000_3000 and bp.header.cmd_line_ptr == 0x3000
    assert (bp.ramdisk_image, bp.ramdisk_size) == (0x2_0000_0000, 1 << 33)
    assert bp.fields["ext_ramdisk_image"] == 2 and bp.fields["ext_ramdisk_size"] == 2


def test_e820_map_layout():
    assert e820_map(64 * MiB) == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2), (0x100000, 63 * MiB, 1)]
    cut = e820_map(64 * MiB, [linux.Range(0x2000000, 0x2100000, "a hole"), (0xFEC00000, 0xFEC01000)])
    assert cut == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2), (0x100000, 31 * MiB, 1),
                   (0x2000000, MiB, 2), (0x2100000, 31 * MiB, 1), (0xFEC00000, 0x1000, 2)]
    with pytest.raises(ValueError, match="empty"):
        e820_map(64 * MiB, [(5, 5)])


# ---- the layouts against <asm/bootparam.h> ------------------------------------------------------

CC = shutil.which("cc")


def _bootparam_values(exprs, tmp_path):
    src, exe = tmp_path / "bootparam.c", tmp_path / "bootparam"
    body = "\n".join(f'printf("%s %lld\\n", "{e}", (long long)({e}));' for e in exprs)
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <asm/bootparam.h>\n"
                   "#define SIZE(f) sizeof(((struct boot_params *)0)->f)\n"
                   f"int main(void)\n{{\n{body}\nreturn 0;\n}}\n")
    for cmd in ([CC, "-o", str(exe), str(src)], [str(exe)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            if cmd[0] == CC and "bootparam.h" in proc.stderr and "No such file" in proc.stderr:
                pytest.skip("no <asm/bootparam.h> (apt-get install linux-libc-dev)")
            pytest.fail(f"{cmd[0]} failed:\n{proc.stderr}", pytrace=False)
    return dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines())


@pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH (apt-get install build-essential)")
def test_offsets_match_bootparam_h(tmp_path):
    ours = {"sizeof(struct boot_params)": linux.ZERO_PAGE_SIZE,
            "sizeof(struct boot_e820_entry)": linux.E820_ENTRY_SIZE,
            "E820_MAX_ENTRIES_ZEROPAGE": linux.E820_MAX_ENTRIES_ZEROPAGE,
            "offsetof(struct boot_params, hdr) + sizeof(struct setup_header)": linux.SETUP_HEADER_END,
            "offsetof(struct screen_info, orig_video_isVGA)": linux.ORIG_VIDEO_ISVGA}
    for name in ("LOADED_HIGH", "KASLR_FLAG", "QUIET_FLAG", "KEEP_SEGMENTS", "CAN_USE_HEAP", "XLF_KERNEL_64",
                 "XLF_CAN_BE_LOADED_ABOVE_4G", "XLF_EFI_HANDOVER_32", "XLF_EFI_HANDOVER_64", "XLF_EFI_KEXEC",
                 "XLF_5LEVEL", "XLF_5LEVEL_ENABLED"):
        ours[name] = getattr(linux, name)
    for field, (offset, fmt, _) in linux.HEADER_FIELDS.items():
        ours[f"offsetof(struct boot_params, hdr.{field})"] = offset
        ours[f"SIZE(hdr.{field})"] = struct.calcsize(fmt)
    for field, (offset, fmt) in linux.BOOT_PARAMS_FIELDS.items():
        ours[f"offsetof(struct boot_params, {field})"] = offset
        ours[f"SIZE({field})"] = struct.calcsize(fmt)
    header = _bootparam_values(ours, tmp_path)
    wrong = [f"{e}: pykvm {v:#x}, header {int(header[e]):#x}" for e, v in ours.items() if int(header[e]) != v]
    assert not wrong, "\n".join(wrong)


# ---- the payload --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAYLOAD_HEADS)
def test_detect_compression_of_real_payload_heads(name):
    head, kind = PAYLOAD_HEADS[name]
    assert detect_compression(bytes.fromhex(head)) == kind


ELF_STUB = b"\x7fELF" + bytes(60)


@pytest.mark.parametrize("kind, compress", [
    ("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lambda d: lzma.compress(d, check=lzma.CHECK_CRC32)),
    ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
])  # fmt: skip
def test_payload_decompressed_on_the_host(kind, compress):
    payload = compress(ELF_STUB * 100) + struct.pack("<I", 6400)  # the build appends the size
    assert bzimage_payload(fake_bzimage(payload=payload), "k") == (kind, ELF_STUB * 100)


@pytest.mark.parametrize("magic, kind, module", [(b"\x28\xb5\x2f\xfd", "zstd", "zstandard"),
                                                 (b"\x02\x21\x4c\x18", "lz4", "lz4")])
def test_zstd_and_lz4_need_their_package(magic, kind, module):
    try:
        __import__(module)
        pytest.skip(f"{module} is installed")
    except ImportError:
        pass
    with pytest.raises(LinuxBootError, match=f"k: the kernel's payload is {kind}-compressed, and pykvm decompresses "
                                             f"{kind} only with the {module} package"):
        bzimage_payload(fake_bzimage(payload=magic + bytes(60)), "k")


def test_payload_errors():
    with pytest.raises(LinuxBootError, match="boot protocol 2.07 has no payload fields"):
        bzimage_payload(fake_bzimage(version=0x0207), "k")
    with pytest.raises(LinuxBootError, match=r"unknown payload compression \(it starts 0102030405"):
        bzimage_payload(fake_bzimage(payload=bytes(range(1, 40))), "k")
    with pytest.raises(LinuxBootError, match="runs past the end of the file"):
        bzimage_payload(fixture("vmlinuz-6.1.0-57-amd64.setup"), "k")
    with pytest.raises(LinuxBootError, match="the decompressed gzip payload is not an ELF vmlinux"):
        bzimage_payload(fake_bzimage(payload=gzip.compress(b"hello")), "k")
    with pytest.raises(LinuxBootError, match="the xz payload does not decompress"):
        bzimage_payload(fake_bzimage(payload=b"\xfd7zXZ\x00" + bytes(40)), "k")


# ---- load_linux's refusals (no KVM) -----------------------------------------------------------------


def test_not_a_64bit_kernel():
    with pytest.raises(LinuxBootError, match=r"^ipxe.lkrn: not a 64-bit kernel \(xloadflags 0x0 lack XLF_KERNEL_64"):
        load_linux(memory(), fixture("ipxe.lkrn.setup"), name="ipxe.lkrn")


def test_too_old_refused_by_load_linux():
    with pytest.raises(LinuxBootError, match="^memdisk: boot protocol 2.03 is too old"):
        load_linux(memory(), fixture("memdisk.setup"), name="memdisk")


def test_kernel_that_does_not_fit():
    image = fixture("vmlinuz-6.1.0-57-amd64.setup") + b"\xf4" * 0x1000
    image = bytearray(image)
    struct.pack_into("<I", image, 0x1F4, 0x100)  # syssize: the 4 KiB we have
    with pytest.raises(LinuxBootError, match=r"^debian: the kernel does not fit in 64 MiB of guest RAM: it needs "
                                             r"0x1000000-0x4f98000 \(65120 KiB with init_size\); use --mem"):
        load_linux(memory(), bytes(image), name="debian")


def test_truncated_kernel():
    with pytest.raises(LinuxBootError, match="truncated bzImage: 0 bytes of protected-mode kernel"):
        load_linux(memory(), fixture("memtest86+x64.bin.setup"), name="memtest")


def test_command_line_too_long():
    with pytest.raises(LinuxBootError, match=r"^k: the command line \(256 bytes\) is longer than the kernel's "
                                             r"cmdline_size \(255 bytes\)$"):
        load_linux(memory(), fake_bzimage(), name="k", cmdline="x" * 256)
    load_linux(memory(), fake_bzimage(), name="k", cmdline="x" * 255)


def test_initrd_that_does_not_fit():
    with pytest.raises(LinuxBootError, match=r"^k: the initrd \(64 MiB\) does not fit in 64 MiB of guest RAM between "
                                             r"the kernel's end \(0x110000\) and initrd_addr_max \(0x7fffffff\)"):
        load_linux(memory(), fake_bzimage(), name="k", initrd=bytes(64 * MiB))
    with pytest.raises(LinuxBootError, match=r"initrd_addr_max \(0x1fffff\)"):
        load_linux(memory(), fake_bzimage(initrd_addr_max=0x1FFFFF), name="k", initrd=bytes(2 * MiB))
    with pytest.raises(LinuxBootError, match=r"and the end of RAM; use --mem$"):  # XLF_CAN_BE_LOADED_ABOVE_4G
        load_linux(memory(), fake_bzimage(xloadflags=3, initrd_addr_max=0x1FFFFF), name="k", initrd=bytes(64 * MiB))


def test_initrd_goes_high_below_initrd_addr_max():
    mem = memory()
    boot = load_linux(mem, fake_bzimage(), name="k", initrd=b"INITRD" * 1000, cmdline="root=/dev/ram0")
    assert boot.initrd.start % 4096 == 0 and boot.initrd.end <= 64 * MiB < boot.initrd.start + 4096 + 6000
    assert mem.read(boot.initrd.start, 6) == b"INITRD"
    low = load_linux(memory(), fake_bzimage(initrd_addr_max=0x1FFFFFF), name="k", initrd=bytes(5000))
    assert low.initrd.start == 0x2000000 - 0x2000 and low.initrd.end <= 0x1FFFFFF
    bp = boot_params_view(mem.read(boot.zero_page, 4096))
    assert (bp.ramdisk_image, bp.ramdisk_size) == (boot.initrd.start, 6000)
    assert mem.read_cstring(bp.cmd_line_ptr) == b"root=/dev/ram0"


def test_load_address_and_reserved_overlap():
    mem = memory()
    boot = load_linux(mem, fake_bzimage(pref=0x1100000, relocatable=1), name="k")
    assert boot.kernel.start == 0x1200000 and boot.entry == 0x1200200  # rounded up to kernel_alignment
    assert mem.read(0x1200000, 4) == b"\xf4" * 4
    old = load_linux(memory(), fake_bzimage(pref=0), name="k")  # no pref_address: 1 MiB
    assert old.kernel.start == 0x100000
    with pytest.raises(LinuxBootError, match="overlaps a reserved range at 0x100000-0x200000"):
        load_linux(memory(), fake_bzimage(), name="k", reserved=[(0x100000, 0x200000)])


def test_rsdp_needs_protocol_214():
    boot = load_linux(memory(), fake_bzimage(version=0x020D), name="k", rsdp=0xE0000)
    assert boot.warnings and "has no acpi_rsdp_addr (2.14+)" in boot.warnings[0]


def test_entry_choices():
    with pytest.raises(ValueError, match="entry must be one of"):
        load_linux(memory(), fake_bzimage(), entry="real")
    with pytest.raises(ValueError, match="needs decompress"):
        load_linux(memory(), fake_bzimage(), entry="pvh", decompress=False)


# ---- pykvm's stub kernel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs() -> dict[str, bytes]:
    missing = [tool for tool in ("make", "gcc", "ld", "objcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the Linux stub needs {', '.join(missing)} (apt-get install build-essential)")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    targets = {"bzimage": "build/linux_stub.bzImage", "elf": "build/linux_stub_pvh.elf"}
    result = subprocess.run(["make", "-s", "-C", str(GUESTS), *targets.values()], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {kind: (GUESTS / path).read_bytes() for kind, path in targets.items()}


def test_stub_images(stubs):
    hdr = parse_bzimage(stubs["bzimage"], "stub")
    assert (hdr.version, hdr.setup_sects, hdr.pref_address, hdr.relocatable_kernel) == (0x020F, 1, 0x100000, 0)
    assert hdr.kernel_64 and hdr.syssize * 16 == len(stubs["bzimage"]) - 1024
    elf = parse_vmlinux(stubs["elf"], "stub.elf")
    assert elf.entry == 0x100200 and elf.pvh_entry is not None and 0x100200 < elf.pvh_entry < elf.end
    with pytest.raises(LinuxBootError, match="entry='bzimage' needs a bzImage"):
        load_linux(memory(), stubs["elf"], entry="bzimage")


def test_pvh_start_info(stubs):
    mem = memory()
    boot = load_linux(mem, stubs["elf"], name="stub", cmdline="hello pvh", initrd=b"RD" * 10, rsdp=0xE0000)
    assert boot.mode == "pvh" and boot.zero_page is None and boot.start_info == linux.START_INFO
    info = start_info_view(mem.read(boot.start_info, 4096))
    assert (info.magic, info.version, info.rsdp_paddr) == (0x336EC578, 1, 0xE0000)
    assert mem.read_cstring(info.cmdline_paddr) == b"hello pvh"
    assert info.modules == ((boot.initrd.start, 20, 0),)
    assert info.memmap == boot.e820 == tuple(e820_map(64 * MiB))


def test_stub_elf_without_pvh_note(stubs):
    data = bytearray(stubs["elf"])
    at = data.index(b"Xen\0")
    struct.pack_into("<I", data, at - 4, 17)  # the note's type: no longer PHYS32_ENTRY
    boot = load_linux(memory(), bytes(data), name="stub")
    assert boot.mode == "elf64" and boot.entry == 0x100200
    with pytest.raises(LinuxBootError, match=r"stub: the vmlinux has no PVH entry \(no XEN_ELFNOTE_PHYS32_ENTRY"):
        load_linux(memory(), bytes(data), name="stub", entry="pvh")


def _run_stub(image: bytes, **kwargs):
    from pykvm.machine import Machine

    with Machine(64 * MiB) as m:
        boot = load_linux(m.memory, image, name="stub", cmdline="console=ttyS0 pykvm-stub", **kwargs)
        setup_linux(m.vcpu, m.memory, boot)
        outcome = m.run(timeout=20)
        return boot, outcome, m.console_output.decode(), list(m.syncs)


INITRD = b"INIT" + bytes(5000)
# SYNCs: e820 entries, MiB of RAM at 1 MiB, the initrd's size, its first word ("INIT").
SYNCS = [4, 63, len(INITRD), int.from_bytes(b"INIT", "little")]


@pytest.mark.kvm
def test_stub_bzimage_through_its_64bit_entry(stubs):
    boot, outcome, output, syncs = _run_stub(stubs["bzimage"], initrd=INITRD)
    assert boot.mode == "bzimage" and boot.entry == 0x100200
    assert outcome.status == 0 and outcome.failure is None, outcome
    assert output == "linux stub: 64-bit entry\nconsole=ttyS0 pykvm-stub"
    assert syncs == SYNCS


@pytest.mark.kvm
@pytest.mark.parametrize("entry", ["pvh", "elf64"])
def test_stub_elf_through_pvh_and_startup_64(stubs, entry):
    boot, outcome, output, syncs = _run_stub(stubs["elf"], initrd=INITRD, entry=entry)
    assert boot.mode == entry
    assert outcome.status == 0 and outcome.failure is None, outcome
    banner = "PVH entry" if entry == "pvh" else "64-bit entry"
    assert output == f"linux stub: {banner}\nconsole=ttyS0 pykvm-stub"
    assert syncs == SYNCS


@pytest.mark.kvm
def test_stub_decompressed_from_a_bzimage(stubs):
    """decompress=True: the stub ELF, gzipped as a bzImage payload, is unpacked on the host and
    entered through its PVH note (auto)."""
    image = fake_bzimage(payload=gzip.compress(stubs["elf"]), pref=0x1000000)
    boot, outcome, output, syncs = _run_stub(image, decompress=True)
    assert (boot.mode, boot.compression, boot.header.pref_address) == ("pvh", "gzip", 0x1000000)
    assert outcome.status == 0, outcome
    assert output == "linux stub: PVH entry\nconsole=ttyS0 pykvm-stub" and syncs == [4, 63, 0, 0]
