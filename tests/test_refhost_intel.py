"""scripts/refhost-intel's parts that need no Bochs: the kernel's PVH entry and flat image, the
multiboot stub and its patching, the initramfs, GRUB's and Bochs's configuration, the disks, the
job environment, the console's markers, and its usage."""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tarfile

import pytest

from script_modules import load_script

CYL = 16 * 63 * 512


ri = load_script("refhost-intel")


# ---------------------------------------------------------------------------------------------
# A small ELF like a vmlinux: two PT_LOADs with a gap, a PT_NOTE with Xen notes

def note(name, ntype, desc):
    n = name.encode() + b"\0"
    return (struct.pack("<III", len(n), len(desc), ntype) + n + b"\0" * (-len(n) % 4)
            + desc + b"\0" * (-len(desc) % 4))


def make_elf(segments, notes=b""):
    """segments: [(paddr, data, memsz)]; returns the ELF bytes."""
    phnum = len(segments) + (1 if notes else 0)
    off = 64 + 56 * phnum
    body = b""
    phdrs = b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off + len(body), 0xFFFFFFFF80000000 + paddr, paddr,
                             len(data), memsz, 0x1000)
        body += data
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, off + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    ehdr = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, phnum, 64, 0, 0))
    return ehdr + phdrs + body


PVH_NOTES = (note("Xen", 6, b"linux\0") + note("Xen", 18, struct.pack("<Q", 0x1000850))
             + note("GNU", 3, b"\x01" * 20))


def test_pvh_entry_is_the_xen_phys32_entry_note():
    assert ri.pvh_entry([PVH_NOTES]) == 0x1000850
    assert ri.pvh_entry([note("Xen", 18, struct.pack("<I", 0x2000040))]) == 0x2000040
    assert ri.pvh_entry([note("Xen", 6, b"linux\0"), note("GNU", 18, b"\0" * 8)]) is None
    assert ri.parse_notes(PVH_NOTES)[0] == ("Xen", 6, b"linux\0")


def test_flat_image_lays_segments_out_by_physical_address_with_zeroed_gaps():
    elf = make_elf([(0x1000000, b"A" * 16, 16), (0x1000100, b"B" * 8, 0x40)], PVH_NOTES)
    loads, notes = ri.elf_segments(elf)
    assert [(p, len(d), m) for p, d, m in loads] == [(0x1000000, 16, 16), (0x1000100, 8, 0x40)]
    base, image, end = ri.flat_image(loads)
    assert base == 0x1000000 and end == 0x1000140
    assert image == b"A" * 16 + b"\0" * (0x100 - 16) + b"B" * 8
    assert ri.pvh_entry(notes) == 0x1000850


def test_elf_segments_refuses_what_is_not_a_64_bit_elf():
    with pytest.raises(ValueError):
        ri.elf_segments(b"\x7fELF\x01\x01" + b"\0" * 60)


def test_extract_vmlinux_finds_the_xz_stream_after_a_false_magic():
    elf = make_elf([(0x1000000, b"kernel", 6)], PVH_NOTES)
    bz = b"MZ" + b"\0" * 100 + b"\xfd7zXZ\x00junk" + b"\0" * 50 + lzma.compress(elf) + b"\0" * 64
    assert ri.extract_vmlinux(bz) == elf
    with pytest.raises(ValueError, match="no XZ"):
        ri.extract_vmlinux(b"MZ" + b"\0" * 100)


# ---------------------------------------------------------------------------------------------
# The stub

def fake_stub(size=0x400):
    flags = 0x00010003
    head = struct.pack("<8I", ri.MB_MAGIC, flags, (-(ri.MB_MAGIC + flags)) & 0xFFFFFFFF,
                       ri.STUB_BASE, ri.STUB_BASE, 0, 0, ri.STUB_BASE + 0x2C)
    return head + struct.pack("<I", 0) + ri.STUB_TAG + b"\x90" * (size - 44)


def test_patch_stub_fills_in_the_load_end_bss_end_and_pvh_entry():
    base = ri.STUB_BASE + ri.STUB_SIZE
    page = ri.patch_stub(fake_stub(), base, 0x1000, base + 0x3000, 0x1000850)
    assert len(page) == ri.STUB_SIZE
    magic, flags, checksum, header, load, load_end, bss_end, entry, pvh = struct.unpack_from("<9I", page)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert (header, load) == (ri.STUB_BASE, ri.STUB_BASE)
    assert load_end == base + 0x1000 and bss_end == base + 0x3000
    assert pvh == 0x1000850
    # bss_end never below load_end
    page = ri.patch_stub(fake_stub(), base, 0x1000, 0, 0x1000850)
    assert struct.unpack_from("<I", page, 24)[0] == base + 0x1000


def test_patch_stub_refuses_a_bad_stub_or_placement():
    base = ri.STUB_BASE + ri.STUB_SIZE
    with pytest.raises(ValueError, match="more than"):
        ri.patch_stub(fake_stub(ri.STUB_SIZE + 16), base, 16, 16, 0)
    bad = bytearray(fake_stub())
    bad[36:44] = b"XXXXXXXX"
    with pytest.raises(ValueError, match="tag"):
        ri.patch_stub(bytes(bad), base, 16, 16, 0)
    bad = bytearray(fake_stub())
    bad[8] ^= 1
    with pytest.raises(ValueError, match="multiboot header"):
        ri.patch_stub(bytes(bad), base, 16, 16, 0)
    with pytest.raises(ValueError, match="just below"):
        ri.patch_stub(fake_stub(), base + 0x1000, 16, 16, 0)


def test_multiboot_kernel_is_the_patched_stub_then_the_flat_kernel():
    elf = make_elf([(0x1000000, b"K" * 32, 0x100)], PVH_NOTES)
    out = ri.multiboot_kernel(b"MZ" + lzma.compress(elf), fake_stub())
    assert out[ri.STUB_SIZE:] == b"K" * 32
    assert struct.unpack_from("<I", out, 32)[0] == 0x1000850
    assert struct.unpack_from("<I", out, 24)[0] == 0x1000100
    no_pvh = make_elf([(0x1000000, b"K", 1)], note("Xen", 6, b"linux\0"))
    with pytest.raises(ValueError, match="PVH"):
        ri.multiboot_kernel(lzma.compress(no_pvh), fake_stub())


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="needs binutils (as, ld)")
def test_the_real_stub_assembles_into_a_multiboot_header_and_a_version_1_start_info(tmp_path):
    stub = ri.build_stub(str(tmp_path))
    assert len(stub) <= ri.STUB_SIZE
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from("<8I", stub)
    assert magic == 0x1BADB002 and (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & 0x10000 and flags & 0x2  # a.out kludge, memory info
    assert header == load == ri.STUB_BASE
    assert ri.STUB_BASE + 44 <= entry < ri.STUB_BASE + len(stub)
    assert stub[36:44] == ri.STUB_TAG
    # struct hvm_start_info: magic, version 1, its pointers inside the stub page
    i = stub.find(struct.pack("<I", 0x336EC578))
    assert i > 0 and i % 8 == 0
    _m, version, sflags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _r = struct.unpack_from(
        "<IIIIQQQQII", stub, i)
    assert (version, sflags, nr_modules, rsdp, entries) == (1, 0, 0, 0, 0)
    for p in (modlist, cmdline, memmap):
        assert ri.STUB_BASE + i < p < ri.STUB_BASE + ri.STUB_SIZE
    assert modlist == ri.STUB_BASE + i + 56  # right after the start info
    assert memmap == modlist + 32 and cmdline == memmap + 64 * 24
    # and patching it works
    page = ri.patch_stub(stub, ri.STUB_BASE + ri.STUB_SIZE, 0x100, 0x200, 0x1000850)
    assert struct.unpack_from("<I", page, 32)[0] == 0x1000850


# ---------------------------------------------------------------------------------------------
# The initramfs and GRUB

MODULES_DEP = """\
kernel/drivers/ata/ata_piix.ko: kernel/drivers/ata/libata.ko kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/ata/libata.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/crypto/crc32c_generic.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/arch/x86/kernel/msr.ko:
kernel/arch/x86/kernel/cpuid.ko:
kernel/virt/lib/irqbypass.ko:
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
"""


def cpio_members(blob):
    out, i = {}, 0
    while i < len(blob):
        hdr = blob[i:i + 110]
        fields = [int(hdr[6 + 8 * k:14 + 8 * k], 16) for k in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        i += 110
        name = blob[i:i + namesize - 1].decode()
        i += namesize
        i += -i % 4
        data = blob[i:i + size]
        i += size
        i += -i % 4
        if name == "TRAILER!!!":
            break
        out[name] = (mode, data)
    return out


def test_initramfs_holds_busybox_init_and_the_modules_in_load_order(tmp_path):
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    for line in MODULES_DEP.splitlines():
        rel = line.split(":")[0]
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x7fELF module " + rel.encode())
    blob = ri.build_initramfs_bytes(str(tmp_path), b"BUSYBOX", "nested=1 ept=0")
    m = cpio_members(blob)
    assert m["bin/busybox"] == (0o100755, b"BUSYBOX")
    assert m["init"][0] == 0o100755 and m["init"][1] == ri.INIT.encode()
    order = m["modules/order"][1].decode().split()
    assert order.index("scsi_common.ko") < order.index("scsi_mod.ko") < order.index("libata.ko") \
        < order.index("ata_piix.ko")
    assert order.index("crc32c_generic.ko") < order.index("ext4.ko")
    assert order[-3:] == ["irqbypass.ko", "kvm.ko", "kvm_intel.ko"]
    assert m["modules/kvm_intel.ko"][1].endswith(b"kvm-intel.ko")
    assert m["modules/params"][1] == b"kvm_intel nested=1 ept=0\n"
    assert ri.params_table("  ") == ""


@pytest.mark.skipif(not shutil.which("sh"), reason="needs a POSIX sh")
def test_init_is_valid_shell():
    r = subprocess.run(["sh", "-n"], input=ri.INIT, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_init_reports_the_markers_the_host_side_reads():
    for marker in ("kvm ready at", "job starts at", "job exited with", "FAILED:", "watchdog:"):
        assert marker in ri.INIT


def test_grub_cfg_boots_the_stub_with_the_initrd_unzipped_never():
    cfg = ri.grub_cfg("console=ttyS0 quiet")
    assert "set timeout=0" in cfg
    assert "multiboot /boot/kernel.mb console=ttyS0 quiet\n" in cfg
    assert "module --nounzip /boot/initrd.cpio\n" in cfg
    assert cfg.rstrip().endswith("}")
    assert "console=ttyS0" in ri.CMDLINE and "panic=-1" in ri.CMDLINE


# ---------------------------------------------------------------------------------------------
# Bochs

def test_bochsrc_is_headless_vmx_with_three_disks_and_three_socket_ports(tmp_path):
    iso, sys_img, job = tmp_path / "boot.iso", tmp_path / "sys.img", tmp_path / "job.img"
    iso.write_bytes(b"\0" * 2048)
    sys_img.write_bytes(b"\0" * (3 * CYL))
    job.write_bytes(b"\0" * CYL)
    text = ri.bochsrc(str(iso), str(sys_img), str(job), [4001, 4002, 4003], megs=512,
                      cpu="corei7_haswell_4770", log="/x/bochs.log")
    lines = text.splitlines()
    assert "display_library: term" in lines
    assert "megs: 512" in lines
    assert any(l.startswith("cpu: model=corei7_haswell_4770, count=1,") for l in lines)
    assert 'ata0-master: type=cdrom, path="%s", status=inserted' % iso in lines
    assert 'ata0-slave: type=disk, path="%s", mode=flat, cylinders=3, heads=16, spt=63' % sys_img in lines
    assert 'ata1-master: type=disk, path="%s", mode=flat, cylinders=1, heads=16, spt=63' % job in lines
    assert "boot: cdrom" in lines
    for n, port in ((1, 4001), (2, 4002), (3, 4003)):
        assert "com%d: enabled=1, mode=socket-client, dev=localhost:%d" % (n, port) in lines
    assert "romimage: file=%s" % ri.BOCHS_BIOS in lines
    assert "vgaromimage: file=%s" % ri.VGA_BIOS in lines
    assert "panic: action=fatal" in lines and "log: /x/bochs.log" in lines
    assert "info: action=ignore" in lines
    assert "clock: sync=none, time0=local" in lines
    assert "cpu: model=corei7_haswell_4770, count=1, ips=100000000, reset_on_triple_fault=1" in lines
    assert "clock: sync=realtime, time0=local" in ri.bochsrc(str(iso), str(sys_img), str(job), [1, 2, 3],
                                                             clock="realtime")
    assert "info: action=report" in ri.bochsrc(str(iso), str(sys_img), str(job), [1, 2, 3],
                                               verbose=True)
    assert ri.DEBUGGER_RC == "c\nquit\n"
    assert ri.bochs_command("/usr/bin/bochs", "rc", "dbg") == ["/usr/bin/bochs", "-q", "-f", "rc",
                                                                "-rc", "dbg"]


def test_disk_geometry_and_padding(tmp_path):
    assert ri.disk_geometry(5 * CYL) == (5, 16, 63)
    with pytest.raises(ValueError):
        ri.disk_geometry(CYL + 512)
    p = tmp_path / "d.img"
    p.write_bytes(b"x" * 1000)
    assert ri.pad_to_cylinders(str(p)) == CYL
    assert os.path.getsize(p) == CYL
    assert ri.pad_to_cylinders(str(p), 3 * CYL - 1) == 3 * CYL


# ---------------------------------------------------------------------------------------------
# The system and job disks

def test_parse_ldd():
    text = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibpython3.11.so.1.0 => /opt/py/lib/libpython3.11.so.1.0 (0x00007f08)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f086861e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0868efa000)
\tlibmissing.so => not found
"""
    assert ri.parse_ldd(text) == ["/opt/py/lib/libpython3.11.so.1.0",
                                  "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]


def test_python_home_follows_the_venv_link(tmp_path):
    prefix = tmp_path / "py"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3.11").write_bytes(b"\x7fELF")
    os.symlink("python3.11", prefix / "bin" / "python3")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(str(prefix / "bin" / "python3"), venv / "bin" / "python3")
    exe, home, ver = ri.python_home(str(venv))
    assert exe == str((prefix / "bin" / "python3.11").resolve())
    assert home == str(prefix.resolve()) and ver == "3.11"


def test_job_disk_is_a_tar_of_the_checkout_without_git_and_venv(tmp_path):
    share = tmp_path / "work" / "main"
    for rel in ("pykvm/__init__.py", "guests/build/hello_long.bin", ".git/HEAD", ".venv/bin/python3",
                "pykvm/__pycache__/x.pyc"):
        (share / rel).parent.mkdir(parents=True, exist_ok=True)
        (share / rel).write_text(rel)
    img = tmp_path / "job.img"
    size = ri.build_job_disk(str(img), str(share), "echo hi\n", ri.env_file(300))
    assert size % CYL == 0 and size >= 1 << 20
    with open(img, "rb") as f:
        head = f.read(512)
    assert head[257:262] == b"ustar"
    with tarfile.open(img) as t:
        names = set(t.getnames())
        assert t.extractfile(".refhost/job.sh").read() == b"echo hi\n"
        assert t.extractfile(".refhost/job.env").read() == b"TIMEOUT=300\nGRACE=15\n"
        assert all(m.uid == 0 for m in t.getmembers())
    prefix = str(share).lstrip("/")
    assert prefix + "/pykvm/__init__.py" in names
    assert prefix + "/pykvm/__pycache__/x.pyc" in names
    assert prefix + "/guests/build/hello_long.bin" in names
    assert not any("/.git" in n or "/.venv" in n for n in names)


def test_job_env_marks_kvm_intel():
    env = dict(ri.job_env([], {"PATH": "/usr/bin", "HOME": "/root"}))
    assert env["PYKVM_REFHOST"] == "kvm_intel"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/usr/bin"
    env = dict(ri.job_env(["PYKVM_REFHOST=other", "X=1"], {"PATH": "/bin"}))
    assert env["PYKVM_REFHOST"] == "other" and env["X"] == "1"


# ---------------------------------------------------------------------------------------------
# The console

def test_console_finds_ready_start_status_failure_and_watchdog():
    c = ri.Console(verbose=False)
    c.feed(b"[    0.1] booting\r\nrefhost-init: kvm ready at 7.01 s; nested=Y ept=Y vpid=Y", 10.0)
    assert c.ready_at is None
    c.feed(b" unrestricted_guest=Y\r\nrefhost-init: job starts at 7.1 s\n", 11.0)
    assert c.ready_at == 11.0 and c.job_at == 11.0
    assert c.ready_line.endswith("unrestricted_guest=Y")
    assert c.status is None
    c.feed(b"refhost-init: watchdog: killing the job after 885 s\nrefhost-init: job exited with 137 at 9 s\n", 12.0)
    assert c.status == 137 and c.watchdog
    c2 = ri.Console(verbose=False)
    c2.feed(b"refhost-init: FAILED: no system disk (ext4) found\n", 1.0)
    assert c2.failed == "no system disk (ext4) found" and c2.status is None
    assert c2.tail() == ["refhost-init: FAILED: no system disk (ext4) found"]


# ---------------------------------------------------------------------------------------------
# Usage

def test_usage_errors(capsys):
    assert ri.main([]) == 2
    assert ri.main(["--timeout", "30", "--", "true"]) == 2
    assert ri.main(["--megs", "64", "--", "true"]) == 2
    assert "refhost-intel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ri.main(["--cpu", "pentium", "--", "true"])


def test_parser_defaults_and_split():
    args = ri.parser().parse_args([])
    assert (args.timeout, args.megs, args.cpu, args.kvm_intel) == (900, 1024, "corei7_skylake_x", "")
    assert (args.clock, args.ips, args.append) == ("none", 100000000, "")
    args = ri.parser().parse_args(["--clock", "realtime", "--ips", "5000000", "--append", "nokaslr"])
    assert (args.clock, args.ips, args.append) == ("realtime", 5000000, "nokaslr")
    assert ri.refhost.split_argv(["--times", "--", "python", "--", "x"]) == (["--times"],
                                                                             ["python", "--", "x"])


def test_check_names_debian_packages(monkeypatch, capsys):
    monkeypatch.setattr(ri, "environment", lambda kernel=None: (
        {k: None for k in ri.PACKAGES}, ["bochs", "vgabios"]))
    assert ri.main(["--check"]) == 4
    out = capsys.readouterr().out
    assert "apt-get install bochs vgabios" in out
    assert "missing (package bochs-term)" in out


def test_a_stale_bochs_lock_is_removed_but_not_one_in_use(tmp_path):
    img = tmp_path / "sys.img"
    img.write_bytes(b"\0" * 512)
    lock = tmp_path / "sys.img.lock"
    lock.write_text("")
    with open(img, "rb"):
        assert ri.image_in_use(str(img))
        ri.clear_stale_lock(str(img))
        assert lock.exists()
    ri.clear_stale_lock(str(img))
    assert not lock.exists()
    ri.clear_stale_lock(str(img))  # no lock: nothing to do
