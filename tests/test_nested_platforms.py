"""pykvm.nested.platforms: a tiny multiboot kernel (tests/data/mb_echo.S) on QEMU TCG and on Bochs.

The kernel echoes its command line and its first module's first line on COM1 between the lines
"mb-echo start" and "mb-echo end", then ends QEMU (isa-debug-exit, value 0x21) and Bochs ("Shutdown"
on port 0x8900). Built with -DRESET it triple-faults after the banner; with -DHANG it never ends.
Each platform's tests skip with the reason ``*_available()`` gives when it is not installed; every
run has a timeout well under the default, and a Bochs run of this kernel takes a few seconds.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import psutil
import pytest

from pykvm.nested.platforms import (
    BOCHS_MAX_BOOTS,
    BOCHS_SVM_MODELS,
    BOCHS_VMX_MODELS,
    PlatformError,
    PlatformUnavailable,
    bochs_available,
    build_iso,
    grub_config,
    has_multiboot_header,
    qemu_available,
    run_bochs,
    run_qemu,
)

DATA = Path(__file__).parent / "data"
BANNER = "mb-echo start"
END = "mb-echo end"
EXIT_VALUE = 0x21
CMDLINE = "answer=42 nested x$y;z"  # $ and ; would mean something to GRUB's script unquoted
MODULE_LINE = "the first line of module 0"

QEMU_REASON = qemu_available()
BOCHS_REASON = bochs_available()
needs_qemu = pytest.mark.skipif(QEMU_REASON is not None, reason=f"QEMU platform: {QEMU_REASON}")
needs_bochs = pytest.mark.skipif(BOCHS_REASON is not None, reason=f"Bochs platform: {BOCHS_REASON}")


def build_kernel(out: Path, *defines: str) -> Path:
    """tests/data/mb_echo.S linked at 1 MiB into the 32-bit multiboot ELF ``out``."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: apt-get install build-essential")
    command = ["gcc", "-m32", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
               "-T", str(DATA / "mb_echo.ld"), *(f"-D{d}" for d in defines), str(DATA / "mb_echo.S"), "-o", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"building {out.name} failed:\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mb_echo")
    return {"echo": build_kernel(d / "mb_echo.elf"),
            "reset": build_kernel(d / "mb_reset.elf", "RESET"),
            "hang": build_kernel(d / "mb_hang.elf", "HANG")}


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two modules whose names QEMU's -initrd list cannot take as they are: a comma, a blank."""
    d = tmp_path_factory.mktemp("modules")
    first, second = d / "mod,0.txt", d / "mod 1.txt"
    first.write_text(f"{MODULE_LINE}\nthe second line\n")
    second.write_text("module 1\n")
    return [first, second]


@pytest.fixture(autouse=True)
def no_platform_left_running():
    """Every run ends its emulator: none of this process's children outlives a test."""
    yield
    left = psutil.Process().children(recursive=True)
    assert not left, f"processes left running: {[(p.pid, p.name()) for p in left]}"


def serial_lines(serial: str) -> list[str]:
    return serial.splitlines()


def header_only_kernel(path: Path) -> Path:
    """A file with nothing but a multiboot header, for the checks made before a platform starts."""
    path.write_bytes(b"\0" * 16 + struct.pack("<3I", 0x1BADB002, 3, -(0x1BADB002 + 3) & 0xFFFFFFFF))
    return path


# --- QEMU TCG ------------------------------------------------------------------------------------

@needs_qemu
def test_qemu_echo(kernels, modules):
    r = run_qemu(kernels["echo"], modules, CMDLINE, banner=BANNER, end_marker=END, timeout=30)
    assert r.platform == "qemu"
    # QEMU's multiboot command line is "KERNEL-PATH CMDLINE", a module's string its path
    assert serial_lines(r.serial) == [BANNER, f"cmdline: {kernels['echo'].resolve()} {CMDLINE}",
                                      f"module: {modules[0].resolve()}", f"line: {MODULE_LINE}", END]
    assert r.exit_status == EXIT_VALUE
    assert (r.timed_out, r.resets) == (False, 0)
    assert r.seconds < 30
    assert "-no-reboot" in r.command and r.command[r.command.index("-cpu") + 1] == "qemu64,+svm,+npt"


@needs_qemu
def test_qemu_reset_ends_qemu(kernels):
    """-no-reboot: the triple fault ends QEMU (status 0) instead of booting the kernel again."""
    r = run_qemu(kernels["reset"], banner=BANNER, end_marker=END, timeout=30)
    assert r.serial == f"{BANNER}\n"
    assert (r.resets, r.timed_out, r.exit_status) == (0, False, None)
    assert r.seconds < 10


@needs_qemu
def test_qemu_end_marker_stops_a_kernel_that_never_exits(kernels):
    r = run_qemu(kernels["hang"], banner=BANNER, end_marker=END, timeout=30)
    assert serial_lines(r.serial)[-1] == END
    assert (r.timed_out, r.exit_status) == (False, None)
    assert r.seconds < 5


@needs_qemu
def test_qemu_timeout(kernels):
    r = run_qemu(kernels["hang"], timeout=1.5)
    assert r.timed_out and r.exit_status is None
    assert END in r.serial  # what the kernel wrote before the watchdog fired is kept
    assert 1.5 <= r.seconds < 5


@needs_qemu
def test_qemu_failure_is_a_platform_error(kernels):
    with pytest.raises(PlatformError, match=r"qemu-system-x86_64 ended with status 1 .*no-such-cpu"):
        run_qemu(kernels["echo"], cpu="no-such-cpu", timeout=30)


# --- Bochs ---------------------------------------------------------------------------------------

@needs_bochs
def test_bochs_echo(kernels, modules, tmp_path):
    r = run_bochs(kernels["echo"], modules, CMDLINE, cpu_model="corei7_skylake_x", banner=BANNER,
                  end_marker=END, timeout=60, workdir=tmp_path)
    assert r.platform == "bochs"
    # GRUB passes only the arguments after the kernel's path; a module's string is its file name
    assert serial_lines(r.serial) == [BANNER, f"cmdline: {CMDLINE}", f"module: {modules[0].name}",
                                      f"line: {MODULE_LINE}", END]
    assert (r.exit_status, r.timed_out, r.resets) == (None, False, 0)
    assert r.seconds < 30, "Bochs ran this kernel in 2-3 s here"
    assert "Shutdown port" in (tmp_path / "bochs.log").read_text(errors="replace")
    for name in ("boot.iso", "bochsrc", "dbg.rc", "serial.txt", "term.txt"):  # kept for debugging
        assert (tmp_path / name).is_file(), name
    assert "model=corei7_skylake_x" in (tmp_path / "bochsrc").read_text()


@needs_bochs
def test_bochs_reset_loop_is_stopped(kernels):
    """Bochs resets the machine on a triple fault and GRUB boots the kernel again: the watchdog
    stops it at the second banner."""
    r = run_bochs(kernels["reset"], banner=BANNER, end_marker=END, timeout=60)
    assert r.resets >= 1 and serial_lines(r.serial) == [BANNER] * (r.resets + 1)
    assert not r.timed_out
    assert r.seconds < 30, "each boot took about 2.5 s here"


@needs_bochs
def test_bochs_failure_is_a_platform_error(kernels):
    with pytest.raises(PlatformError, match=r"bochs ended before the kernel wrote to COM1: .*cpu directive malformed"):
        run_bochs(kernels["echo"], cpu_model="no_such_cpu", timeout=60)


@needs_bochs
def test_build_iso_failure_is_a_platform_error(kernels, tmp_path):
    with pytest.raises(PlatformError, match=r"^grub-mkrescue failed \(exit status \d+\) building .*\n"):
        build_iso(kernels["echo"], [], "", tmp_path / "no-such-dir" / "boot.iso")


# --- without running a platform ------------------------------------------------------------------

@pytest.mark.parametrize("run", [run_qemu, run_bochs])
def test_missing_kernel_or_module(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"multiboot kernel not found .*: '.*no-such-kernel'"):
        run(tmp_path / "no-such-kernel")
    kernel = header_only_kernel(tmp_path / "kernel")
    with pytest.raises(FileNotFoundError, match=r"multiboot module 0 not found .*: '.*no-such-module'"):
        run(kernel, [tmp_path / "no-such-module"])
    with pytest.raises(TypeError, match="a sequence of paths"):
        run(kernel, kernel)


@pytest.mark.parametrize("run", [run_qemu, run_bochs])
def test_not_a_multiboot_kernel(run, tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(9000) + struct.pack("<3I", 0x1BADB002, 3, -(0x1BADB002 + 3) & 0xFFFFFFFF))
    with pytest.raises(ValueError, match=r"vmlinux: not a multiboot kernel \(no multiboot header in its first 8192"):
        run(kernel)


def test_has_multiboot_header(kernels, tmp_path):
    assert has_multiboot_header(kernels["echo"].read_bytes())
    assert has_multiboot_header(header_only_kernel(tmp_path / "k").read_bytes())
    assert not has_multiboot_header(b"\0\0" + header_only_kernel(tmp_path / "k").read_bytes())  # unaligned
    assert not has_multiboot_header(struct.pack("<3I", 0x1BADB002, 3, 0))  # bad checksum
    assert not has_multiboot_header(b"")


def test_bad_arguments(tmp_path):
    kernel = header_only_kernel(tmp_path / "kernel")
    with pytest.raises(ValueError, match="not a Bochs CPU model name"):
        run_bochs(kernel, cpu_model="ryzen\nmegs: 1")
    with pytest.raises(ValueError, match="timeout"):
        run_qemu(kernel, timeout=0)
    with pytest.raises(ValueError, match="memory_mib"):
        run_bochs(kernel, memory_mib=0)


def test_unavailable_without_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    assert qemu_available() == "qemu-system-x86_64 is not installed: apt-get install qemu-system-x86"
    reason = bochs_available()
    assert reason is not None and "\n" not in reason
    assert reason.startswith("bochs, grub-mkrescue, xorriso, mformat are not installed: apt-get install bochs ")
    for package in ("bochs", "bochsbios", "bochs-term", "vgabios", "grub-common", "xorriso", "mtools"):
        assert f" {package}" in reason
    kernel = header_only_kernel(tmp_path / "kernel")
    with pytest.raises(PlatformUnavailable, match="^qemu-system-x86_64 is not installed"):
        run_qemu(kernel)
    with pytest.raises(PlatformUnavailable, match="^bochs, "):
        run_bochs(kernel)
    with pytest.raises(PlatformUnavailable, match="^grub-mkrescue, xorriso, mformat are not installed"):
        build_iso(kernel, [], "", tmp_path / "boot.iso")


def test_grub_config_quotes_every_word():
    assert grub_config("a=1  x$y;z it's", ["mod,0.txt"]) == (
        "set timeout=0\n"
        'menuentry "pykvm" {\n'
        "    multiboot /boot/kernel 'a=1' 'x$y;z' 'it'\\''s'\n"
        "    module /boot/mod0 'mod,0.txt'\n"
        "    boot\n"
        "}\n")
    assert "    multiboot /boot/kernel\n" in grub_config("")


def test_cpu_models():
    assert BOCHS_VMX_MODELS == ("corei7_skylake_x", "corei7_haswell_4770")
    assert BOCHS_SVM_MODELS == ("ryzen",)
    assert BOCHS_MAX_BOOTS >= 2  # a reset must boot the kernel again for the banner to repeat
