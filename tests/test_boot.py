"""``pykvm boot``: the command, its phases and its refusals, with guests/linux/poweroff.S (a tiny
boot-protocol kernel that reports what it was given on COM1 and powers the PC off) and fixtures.
A distribution kernel's boot is in tests/test_boot_linux.py (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.boot import BootError, ConsoleWatch, DiskSpec, Phases, find_kernel, kernel_release
from pykvm.images import guests_dir

DATA = Path(__file__).parent / "data" / "linux"


def stub() -> Path:
    path = guests_dir() / "build" / "linux_poweroff.bzImage"
    if not path.exists():
        subprocess.run(["make", "-C", str(guests_dir()), f"build/{path.name}"], check=True, capture_output=True)
    return path


def boot(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", "boot", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if not line.startswith("pykvm: note:")]
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


@pytest.mark.kvm
def test_boot_hands_the_kernel_its_command_line_devices_and_initrd_and_ends_at_power_off(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    run = boot("--kernel", str(stub()), "--disk", str(disk), "--append", "marker=42", "--json", "--stats")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ending"] == "power-off" and doc["status"] == 0 and doc["entry"] == "bzimage"
    console = doc["console"]
    assert f"poweroff stub: cmdline {doc['cmdline']}\n" in console
    assert doc["cmdline"].endswith(" marker=42") and "console=ttyS0" in doc["cmdline"]
    # the devices it found where the command line said: virtio-blk (2), then virtio-rng (4)
    assert "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6" in doc["cmdline"]
    assert "poweroff stub: virtio 0 device 2\n" in console and "poweroff stub: virtio 1 device 4\n" in console
    assert [d["type"] for d in doc["devices"]] == ["VirtioBlk", "VirtioRng"]
    # pykvm's initramfs: its size in the zero page, the e820 map's four entries
    initrd = int(console.split(" initrd ")[1].split()[0], 16)
    assert initrd > 1 << 20  # a static busybox at least
    assert "poweroff stub: e820 4 " in console
    phases = doc["phases"]
    assert phases["VM created"] <= phases["first KVM_RUN"] <= phases["first console byte"] <= phases["end"]
    assert set(doc["stats"]["virtio"]) == {"VirtioBlk@0xd0000000", "VirtioRng@0xd0001000"}


@pytest.mark.kvm
def test_virtio_console_is_hvc0_and_rng_can_be_left_out():
    run = boot("--kernel", str(stub()), "--console", "virtio", "--no-rng", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert "console=hvc0" in doc["cmdline"] and "console=ttyS0" not in doc["cmdline"]
    assert [d["type"] for d in doc["devices"]] == ["VirtioConsole"]
    assert "poweroff stub: virtio 0 device 3\n" in doc["console"]


@pytest.mark.kvm
def test_human_output_has_the_console_then_the_phase_table(tmp_path):
    run = boot("--kernel", str(stub()))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("poweroff stub: cmdline ")
    assert "ended in power-off" in run.stderr and "first console byte" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--disk", "/nonexistent/disk.img"], "disk /nonexistent/disk.img: no such file"),
    (["--initrd", "/nonexistent/initrd"], "initrd /nonexistent/initrd: No such file or directory"),
    (["--append", "x" * 3000], "command line"),
    (["--disk", "a.img,rw,ro"], "--disk takes FILE or FILE,ro"),
    (["--net", "bridge=br0"], "--net takes tap=NAME"),
])
def test_bad_arguments_are_one_line_and_status_64(args, message, tmp_path):
    run = boot("--kernel", str(stub()), *args)
    assert run.returncode == 64, run.stderr
    assert message in run.stderr
    if not message.startswith("--"):
        one_error_line(run)


def test_a_read_only_disk_asked_read_write(tmp_path):
    disk = tmp_path / "ro.img"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0o444)
    run = boot("--kernel", str(stub()), "--disk", str(disk))
    assert run.returncode == 64
    assert "read-only" in one_error_line(run) and ",ro" in run.stderr


def test_images_that_are_no_kernel_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n" * 100)
    run = boot("--kernel", str(text))
    assert run.returncode == 64 and "not a bzImage" in one_error_line(run)
    run = boot("--kernel", str(DATA / "memdisk.setup"))  # syslinux's memdisk: boot protocol 2.03
    assert run.returncode == 64 and "too old" in one_error_line(run)


@pytest.mark.kvm
def test_an_initrd_that_does_not_fit(tmp_path):
    initrd = tmp_path / "big.cpio"
    initrd.write_bytes(bytes(24 << 20))
    run = boot("--kernel", str(stub()), "--initrd", str(initrd), "--mem", "16M")
    assert run.returncode == 64 and "does not fit" in one_error_line(run)


@pytest.mark.kvm
def test_a_tap_without_the_capability(tmp_path):
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host (modprobe tun): the capability is checked after it")
    if subprocess.run(["setpriv", "--help"], capture_output=True, text=True).stdout.find("--bounding-set") < 0:
        pytest.skip("this setpriv cannot drop capabilities (--bounding-set)")
    run = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--", sys.executable, "-m",
                          "pykvm", "boot", "--kernel", str(stub()), "--net", "tap=pykvmcap0"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 66, run.stderr
    assert "CAP_NET_ADMIN" in one_error_line(run)


# ---- the pieces, without a guest -----------------------------------------------------------------

def test_find_kernel_takes_the_newest_version(tmp_path):
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.12.7+deb12-amd64", "vmlinuz-6.1.0-10-amd64"):
        (tmp_path / name).write_bytes(b"")
    assert find_kernel(tmp_path).name == "vmlinuz-6.12.7+deb12-amd64"
    with pytest.raises(BootError, match="no kernel in .*apt-get install linux-image-amd64"):
        find_kernel(tmp_path / "empty")


def test_kernel_release_from_the_header():
    data = (DATA / "vmlinuz-6.1.0-57-amd64.setup").read_bytes()
    assert kernel_release(Path("/any/name"), data) == "6.1.0-57-amd64"
    assert kernel_release(Path("/boot/vmlinuz-1.2.3"), b"\0" * 1024) == "1.2.3"


def test_disk_spec():
    assert DiskSpec.parse("a.img") == DiskSpec("a.img", False)
    assert DiskSpec.parse("a.img,ro") == DiskSpec("a.img", True)


def test_console_watch_marks_phases_from_lines():
    phases, panics = Phases(), []
    watch = ConsoleWatch(None, phases, on_panic=panics.append)
    watch.write(b"[    1.0] Freeing unused kernel image\r\n[    1.1] Run /init as ")
    assert "init started" not in phases.seconds  # a line is read once it is whole
    watch.write(b"init process\r\npykvm-init: user space is up (6.1)\n")
    watch.write(b"Kernel panic - not syncing: Attempted to kill init!\n")
    assert phases.lines["kernel: last message before init"] == "[    1.0] Freeing unused kernel image"
    assert phases.lines["init started"].endswith("Run /init as init process")
    assert "user space up" in phases.seconds
    assert panics == ["Kernel panic - not syncing: Attempted to kill init!"]
    assert watch.text().count("\n") == 4


@pytest.mark.kvm
def test_a_kernel_panic_stops_the_guest_with_status_72():
    # the stub echoes its command line on COM1: a panic line as far as the console watch can tell
    run = boot("--kernel", str(stub()), "--append", "Kernel panic - not syncing: a test", "--json")
    assert run.returncode == 72, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ending"] == "kernel panic: Kernel panic - not syncing: a test"
    assert "poweroff stub: power off" not in doc["console"] and doc["state"]["regs"]
