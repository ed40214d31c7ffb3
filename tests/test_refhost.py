"""scripts/refhost's parts that need no QEMU: kernel choice, module order, the initramfs archive,
the job script and environment, the QEMU command line, and its usage and exit statuses."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from script_modules import load_script



refhost = load_script("refhost")

# The lines of Debian 12's 6.1 modules.dep that the 9p stack needs (as seen in 6.1.0-57-amd64).
MODULES_DEP = """\
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko
""".replace("\\\n", "")


def test_kernel_versions_sort_as_numbers():
    versions = ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.10.0-1-amd64", "6.1.0-18-amd64"]
    assert sorted(versions, key=refhost.version_key) == [
        "6.1.0-9-amd64", "6.1.0-18-amd64", "6.1.0-57-amd64", "6.10.0-1-amd64"]


def test_kernels_need_their_module_tree_newest_first(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for v in ("6.1.0-18-amd64", "6.1.0-57-amd64", "6.1.0-99-amd64", "6.18.44-fc-v1272"):
        (boot / f"vmlinuz-{v}").write_bytes(b"")
    for v in ("6.1.0-18-amd64", "6.1.0-57-amd64", "6.18.44-fc-v1272"):  # 99 has no modules
        (mods / v).mkdir(parents=True)
        (mods / v / "modules.dep").write_text("")
    found = refhost.find_kernels(str(boot), str(mods))
    assert [v for v, _, _ in found] == ["6.1.0-57-amd64", "6.1.0-18-amd64"]
    assert found[0][1] == str(boot / "vmlinuz-6.1.0-57-amd64")
    assert found[0][2] == str(mods / "6.1.0-57-amd64")


def elf(tmp_path, name, types):
    """A minimal 64-bit little-endian ELF header with program headers of the given p_types."""
    phoff, phentsize = 64, 56
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x20, phoff)
    struct.pack_into("<HH", head, 0x36, phentsize, len(types))
    table = b"".join(struct.pack("<I", t) + bytes(phentsize - 4) for t in types)
    path = tmp_path / name
    path.write_bytes(bytes(head) + table)
    return str(path)


def test_a_static_busybox_is_an_elf_without_an_interpreter(tmp_path):
    assert refhost.is_static_elf(elf(tmp_path, "static", [1, 1, 4]))
    assert not refhost.is_static_elf(elf(tmp_path, "dynamic", [6, 3, 1]))
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not refhost.is_static_elf(str(tmp_path / "script"))
    assert not refhost.is_static_elf(str(tmp_path / "missing"))


def test_module_names_drop_the_suffix_and_dashes():
    assert refhost.module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz") == "kvm_amd"
    assert refhost.module_name("kernel/net/9p/9pnet_virtio.ko") == "9pnet_virtio"
    assert refhost.module_name("kernel/fs/9p/9p.ko.zst") == "9p"


def test_the_9p_stack_loads_dependencies_first_each_once():
    table = refhost.parse_modules_dep(MODULES_DEP)
    order = [refhost.module_name(p) for p in refhost.load_order(table, refhost.NINEP_MODULES)]
    assert sorted(order) == sorted(["virtio_ring", "virtio", "virtio_pci_legacy_dev",
                                    "virtio_pci_modern_dev", "virtio_pci", "netfs", "fscache",
                                    "9pnet", "9pnet_virtio", "9p"])
    for name in order:
        for dep in table[name][1]:
            assert order.index(dep) < order.index(name), (dep, name)
    assert order[-1] == "9p"


def test_a_builtin_module_is_skipped_and_an_unknown_one_named():
    table = refhost.parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    assert refhost.load_order(table, ["a"], builtin=["b"]) == ["kernel/a.ko"]
    with pytest.raises(LookupError, match="module b is not in modules.dep"):
        refhost.load_order(table, ["a"])


def read_cpio(blob):
    """[(name, mode, data, rdevmajor, rdevminor)] of a newc archive, checking its alignment."""
    entries, off = [], 0
    while True:
        assert off % 4 == 0
        hdr = blob[off:off + 110].decode()
        assert hdr[:6] == "070701"
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = blob[off + 110:off + 110 + namesize - 1].decode()
        assert blob[off + 110 + namesize - 1] == 0
        off += 110 + namesize
        off += -off % 4
        data = blob[off:off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            assert off == len(blob)
            return entries
        entries.append((name, mode, data, rmaj, rmin))


def test_the_cpio_archive_is_newc_as_the_kernel_reads_it():
    a = refhost.Cpio()
    a.dir("bin")
    a.file("bin/busybox", b"\x7fELF" + b"x" * 5, 0o755)
    a.symlink("bin/sh", "busybox")
    a.chardev("dev/console", 5, 1)
    a.file("init", b"#!/bin/busybox sh\n", 0o755)
    entries = read_cpio(a.bytes())
    assert [(n, oct(m)) for n, m, *_ in entries] == [
        ("bin", "0o40755"), ("bin/busybox", "0o100755"), ("bin/sh", "0o120777"),
        ("dev/console", "0o20600"), ("init", "0o100755")]
    assert entries[1][2] == b"\x7fELFxxxxx"
    assert entries[2][2] == b"busybox"
    assert entries[3][3:] == (5, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio command")
def test_gnu_cpio_lists_the_archive(tmp_path):
    a = refhost.Cpio()
    a.dir("modules")
    a.file("modules/order", b"9p.ko\n")
    (tmp_path / "a.cpio").write_bytes(a.bytes())
    out = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(tmp_path / "a.cpio", "rb"),
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    assert out.split() == ["modules", "modules/order"]


def test_the_init_script_is_valid_shell():
    subprocess.run(["sh", "-n"], input=refhost.INIT, text=True, check=True)
    # The order it relies on: the status is written after the job, then the power-off.
    assert refhost.INIT.index('echo "$st" > /ctl/status') < refhost.INIT.index("poweroff -f\nsleep 60")
    assert "modprobe kvm_amd $KVM_AMD_PARAMS" in refhost.INIT


def test_the_job_gets_a_clean_environment_and_its_arguments_as_given(tmp_path):
    env = refhost.job_env(["EXTRA=a b", "FROM_HERE", "ABSENT"],
                          environ={"PATH": "/usr/bin:/bin", "HOME": "/root", "FROM_HERE": "x",
                                   "SECRET": "no"})
    assert env == [("PATH", "/usr/bin:/bin"), ("HOME", "/root"), ("PYTHONUNBUFFERED", "1"),
                   ("PYKVM_REFHOST", "kvm_amd"), ("EXTRA", "a b"), ("FROM_HERE", "x")]
    odd = tmp_path / "it's a dir"
    odd.mkdir()
    argv = ["sh", "-c", 'printf "%s|" "$1" "$(pwd)" "$EXTRA" "$PYKVM_REFHOST" "${SECRET-unset}"',
            "sh", "two words; $HOME 'q'"]
    script = tmp_path / "job.sh"
    script.write_text(refhost.job_script(str(odd), argv, env))
    out = subprocess.run(["sh", str(script)], stdout=subprocess.PIPE, text=True,
                         env={"SECRET": "leak", "PATH": os.environ["PATH"]}).stdout
    assert out == f"two words; $HOME 'q'|{odd}|a b|kvm_amd|unset|"


def test_a_job_in_a_missing_directory_exits_126(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(refhost.job_script(str(tmp_path / "gone"), ["true"], refhost.job_env()))
    r = subprocess.run(["sh", str(script)], stderr=subprocess.PIPE, text=True)
    assert r.returncode == 126
    assert "refhost: cannot cd to" in r.stderr


def test_the_qemu_command_shares_root_read_only_and_remaps_devices():
    logs = {"console": "/t/console.log", "out": "/t/out.log", "err": "/t/err.log"}
    cmd = refhost.qemu_command("qemu", "/boot/vmlinuz-6.1.0-57-amd64", "/c/initramfs.cpio", "4G", 2,
                               "/work/a,b", "/t/ctl", logs)
    virtfs = [cmd[i + 1] for i, c in enumerate(cmd) if c == "-virtfs"]
    assert len(virtfs) == 3 and all("multidevs=remap" in v and "security_model=none" in v
                                    for v in virtfs)
    assert virtfs[0] == ("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                         "multidevs=remap")
    assert "path=/work/a,,b,mount_tag=work" in virtfs[1] and "readonly" not in virtfs[1]
    assert cmd[cmd.index("-cpu") + 1] == "EPYC,+svm,+npt"
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=multi"
    assert "-no-reboot" in cmd
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 panic=-1 quiet loglevel=4"
    serials = [cmd[i + 1] for i, c in enumerate(cmd) if c == "-serial"]
    assert serials == ["file:/t/console.log", "file:/t/out.log", "file:/t/err.log"]


def test_the_command_follows_the_double_dash():
    assert refhost.split_argv(["--timeout", "9", "--", "ls", "--", "-l"]) == (
        ["--timeout", "9"], ["ls", "--", "-l"])
    assert refhost.split_argv(["--check"]) == (["--check"], [])


def test_usage_errors_exit_2(capsys):
    assert refhost.main([]) == 2
    assert "no COMMAND" in capsys.readouterr().err
    assert refhost.main(["--timeout", "5", "--", "true"]) == 2
    with pytest.raises(SystemExit) as e:
        refhost.main(["--mem", "lots", "--", "true"])
    assert e.value.code == 2


def test_a_host_without_the_packages_cannot_run_it_and_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(refhost, "environment", lambda kernel=None, qemu=None: (
        {"qemu": None, "busybox": "/bin/busybox", "kernel": None, "root": False},
        ["qemu-system-x86", "linux-image-amd64"]))
    assert refhost.main(["--", "true"]) == 4
    assert "missing qemu-system-x86, linux-image-amd64" in capsys.readouterr().err
    assert refhost.main(["--check"]) == 4
    out = capsys.readouterr().out
    assert "ready:   no; install: apt-get install qemu-system-x86 linux-image-amd64" in out
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert refhost.main(["--setup"]) == 4
    assert "--setup needs root" in capsys.readouterr().err


def test_the_console_finds_the_ready_line_and_soft_lockups(tmp_path, capsys):
    log = tmp_path / "console.log"
    log.write_bytes(b"[    1.0] random noise\nrefhost-init: kvm ready at 3.1 s; nested=1\n"
                    b"[  128.6] watchdog: BUG: soft lockup - CPU#0 stuck for 44s! [kworker/0:0:7]\n"
                    b"[  156.6] watchdog: BUG: soft lockup - CPU#1 stuck for 70s! [swapper/1:0]\npart")
    console = refhost.Console(str(log), verbose=False)
    console.pump()
    assert console.ready_at is not None and console.stuck == 70
    assert console.partial == b"part"
    err = capsys.readouterr().err
    assert "random noise" not in err and "kvm ready" not in err
    assert err.count("soft lockup") == 2


def test_the_console_notes_a_kernel_panic(tmp_path, capsys):
    log = tmp_path / "console.log"
    log.write_bytes(b"refhost-init: kvm ready at 3.1 s; nested=1\n[   99.6] RIP: 0010:error_entry+0xb5/0x130\n")
    console = refhost.Console(str(log), verbose=False)
    console.pump()
    assert not console.panicked
    log.write_bytes(log.read_bytes() + b"[   99.6] Kernel panic - not syncing: Fatal exception in interrupt\n")
    console.pump()
    assert console.panicked
    assert "Kernel panic" in capsys.readouterr().err


def _fake_runs(monkeypatch, results):
    """run_once replaced: each call takes the next (status, panicked) and records the timeout it got."""
    calls = []

    def run_once(args, argv, outcome):
        status, panicked = results[len(calls)]
        calls.append(args.timeout)
        outcome["host_panicked"] = panicked
        return status

    monkeypatch.setattr(refhost, "run_once", run_once)
    return calls


def test_a_panicked_reference_host_is_booted_again_within_the_timeout(monkeypatch, capsys):
    calls = _fake_runs(monkeypatch, [(125, True), (0, False)])
    args = refhost.parser().parse_args(["--timeout", "900", "--retry-panic", "1"])
    assert refhost.run(args, ["true"]) == 0
    assert len(calls) == 2 and calls[0] == 900 and 800 < calls[1] <= 900
    assert "attempt 2 of 2" in capsys.readouterr().err


def test_no_second_boot_without_a_panic_or_past_the_retries(monkeypatch, capsys):
    calls = _fake_runs(monkeypatch, [(125, False)])
    args = refhost.parser().parse_args(["--retry-panic", "3"])
    assert refhost.run(args, ["true"]) == 125 and len(calls) == 1  # a failure of COMMAND's making
    calls = _fake_runs(monkeypatch, [(125, True), (125, True)])
    args = refhost.parser().parse_args(["--retry-panic", "1"])
    assert refhost.run(args, ["true"]) == 125 and len(calls) == 2
    calls = _fake_runs(monkeypatch, [(125, True)])
    args = refhost.parser().parse_args([])  # the default: no retry
    assert refhost.run(args, ["true"]) == 125 and len(calls) == 1
    assert refhost.main(["--retry-panic", "-1", "--", "true"]) == 2
