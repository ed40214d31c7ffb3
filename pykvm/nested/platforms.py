"""Reference platforms: run a multiboot kernel on QEMU TCG or Bochs and collect its serial output.

A KVM without nesting (kvm_pvm, or kvm_intel/kvm_amd with nested=0) cannot run VMX or SVM
inside a guest; two software emulators can (README.md, "Hypervisors inside pykvm", lists their
packages and known deviations):

- **QEMU TCG** (``run_qemu``) emulates SVM with nested paging, no VMX. It boots the multiboot
  kernel itself (``-kernel``, modules through ``-initrd``) and ends when the kernel writes to
  isa-debug-exit (port 0xF4) or resets the machine (``-no-reboot``).
- **Bochs** (``run_bochs``) emulates VMX (``BOCHS_VMX_MODELS``) and SVM (``BOCHS_SVM_MODELS``). It
  boots a GRUB rescue ISO built by ``build_iso`` and ends when the kernel writes the string
  "Shutdown" to port 0x8900.

Both return a ``PlatformResult`` whose ``serial`` is everything the kernel wrote to COM1. A
watchdog polls that output: once ``end_marker`` appears, or ``banner`` appears a second time (the
machine reset and booted the kernel again), the platform gets ``STOP_GRACE`` seconds to finish and
is then killed; at ``timeout`` it is killed too. The emulator runs in its own process group, which
is always killed before a run returns.

What the guest did is data in the result; only a missing program (``PlatformUnavailable``) or a
platform that failed before the kernel said anything (``PlatformError``) raises.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

QEMU = "qemu-system-x86_64"
QEMU_PACKAGES = ("qemu-system-x86",)
QEMU_DEFAULT_CPU = "qemu64,+svm,+npt"
QEMU_DEBUG_EXIT_PORT = 0xF4  # isa-debug-exit: QEMU exits with status (value << 1) | 1

BOCHS = "bochs"
BOCHS_PACKAGES = ("bochs", "bochsbios", "bochs-term", "vgabios")
BOCHS_VMX_MODELS = ("corei7_skylake_x", "corei7_haswell_4770")  # `bochs --help cpu` lists all models
BOCHS_SVM_MODELS = ("ryzen",)
BOCHS_BIOS = Path("/usr/share/bochs/BIOS-bochs-latest")  # package bochsbios
BOCHS_VGABIOS = Path("/usr/share/vgabios/vgabios.bin")  # package vgabios (a dangling link without it)
BOCHS_SHUTDOWN_PORT = 0x8900  # the string "Shutdown" written here ends Bochs
# Debian's Bochs has the internal debugger, which stops at time 0 and again at every reset of the
# machine; each "c" in dbg.rc resumes it once and the final "quit" ends it. So a machine that
# keeps resetting ends by itself after this many boots, banner or not.
BOCHS_MAX_BOOTS = 8

GRUB_MKRESCUE = "grub-mkrescue"
GRUB_I386_PC = Path("/usr/lib/grub/i386-pc")  # package grub-pc-bin: the BIOS boot images
# program or file -> the Debian package that provides it
_ISO_TOOLS = (("grub-mkrescue", "grub-common"), ("xorriso", "xorriso"), ("mformat", "mtools"))

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192  # the header lies 4-byte aligned within the image's first 8192 bytes

STOP_GRACE = 0.5  # seconds a platform gets to finish after the end marker or a second banner
KILL_GRACE = 0.3  # seconds between SIGTERM and SIGKILL of the platform's process group
POLL_INTERVAL = 0.05  # seconds between looks at the serial output
LOG_LINES = 40  # lines of the platform's own log kept in results and error messages

_ANSI_ESCAPE = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_CPU_MODEL = re.compile(r"[a-z0-9_]+")


class PlatformUnavailable(RuntimeError):
    """A program or file a platform needs is missing; the message names it and the apt-get fix."""


class PlatformError(RuntimeError):
    """The platform itself failed (grub-mkrescue failed, the emulator stopped before the kernel
    wrote anything); the message is one line, then the tail of the platform's log."""


@dataclass(frozen=True)
class PlatformResult:
    """How a kernel run on a reference platform ended, and what the kernel printed.

    ``exit_status`` is QEMU's: the value the kernel wrote to isa-debug-exit (only its low 7 bits
    survive the process exit status), or None when QEMU did not end that way (a reset under
    ``-no-reboot`` ends it with status 0, and the watchdog's kill leaves it None too). Bochs has no
    such device: None. ``resets`` counts the machine's restarts as the occurrences of the run's
    ``banner`` in ``serial`` minus one (0 without a banner). ``seconds`` is the emulator's wall
    time, without building the ISO.
    """

    platform: str
    serial: str
    exit_status: int | None
    timed_out: bool
    resets: int
    seconds: float
    log: str
    command: tuple[str, ...]


def _unavailable_reason(missing: Sequence[tuple[str, str]]) -> str | None:
    """One line naming what is missing and the apt-get command that installs it, or None."""
    if not missing:
        return None
    names = ", ".join(name for name, _ in missing)
    packages = list(dict.fromkeys(package for _, package in missing))
    if "bochs" in packages:  # bochs alone starts neither headless nor with a VGA BIOS
        packages.extend(p for p in BOCHS_PACKAGES if p not in packages)
    verb = "is" if len(missing) == 1 else "are"
    return f"{names} {verb} not installed: apt-get install {' '.join(packages)}"


def _missing_iso_tools() -> list[tuple[str, str]]:
    missing = [(program, package) for program, package in _ISO_TOOLS if shutil.which(program) is None]
    if not GRUB_I386_PC.is_dir():
        missing.append((str(GRUB_I386_PC), "grub-pc-bin"))
    return missing


def _bochs_has_term_display() -> bool:
    """Whether Bochs's "term" display library is there: a plugin (bochs-term) where Bochs's
    plugin directory exists; a Bochs built without plugins is assumed to have it."""
    plugin_dirs = [p for p in (*Path("/usr/lib").glob("*/bochs/plugins"), Path("/usr/lib/bochs/plugins"),
                               Path("/usr/local/lib/bochs/plugins")) if p.is_dir()]
    return not plugin_dirs or any(any(d.glob("libbx_term*")) for d in plugin_dirs)


def qemu_available() -> str | None:
    """None if the QEMU platform can run here, else the reason (one line, with the apt-get fix)."""
    if shutil.which(QEMU) is None:
        return _unavailable_reason([(QEMU, QEMU_PACKAGES[0])])
    return None


def bochs_available() -> str | None:
    """None if the Bochs platform can run here (Bochs with its BIOS, VGA BIOS and term display,
    and the tools that build a GRUB ISO), else the reason (one line, with the apt-get fix)."""
    missing: list[tuple[str, str]] = []
    if shutil.which(BOCHS) is None:
        missing.append((BOCHS, "bochs"))
    elif not _bochs_has_term_display():
        missing.append(("bochs's term display", "bochs-term"))
    for path, package in ((BOCHS_BIOS, "bochsbios"), (BOCHS_VGABIOS, "vgabios")):
        if not path.is_file():
            missing.append((str(path), package))
    missing.extend(_missing_iso_tools())
    return _unavailable_reason(missing)


def _input_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what} not found (or not a regular file)", str(p))
    return p.resolve()


def has_multiboot_header(image: bytes) -> bool:
    """Whether ``image`` has a multiboot (version 1) header: the magic at a 4-byte aligned offset
    in its first 8192 bytes, followed by flags and a checksum that make the three sum to zero."""
    head = image[:MULTIBOOT_SEARCH]
    for offset in range(0, len(head) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<3I", head, offset)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def _inputs(kernel: str | os.PathLike[str], modules: Sequence[str | os.PathLike[str]]) -> tuple[Path, list[Path]]:
    if isinstance(modules, (str, os.PathLike)):
        raise TypeError("modules must be a sequence of paths, not one path")
    kernel_path = _input_file(kernel, "multiboot kernel")
    module_paths = [_input_file(m, f"multiboot module {i}") for i, m in enumerate(modules)]
    with open(kernel_path, "rb") as f:
        if not has_multiboot_header(f.read(MULTIBOOT_SEARCH)):
            # GRUB would stop at its error screen and Bochs run until the timeout
            raise ValueError(f"{kernel}: not a multiboot kernel (no multiboot header in its first "
                             f"{MULTIBOOT_SEARCH} bytes)")
    return kernel_path, module_paths


def _check_limits(memory_mib: int, timeout: float) -> None:
    if memory_mib < 1:
        raise ValueError(f"memory_mib must be at least 1, not {memory_mib}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")


def _grub_word(word: str) -> str:
    """``word`` single-quoted for grub.cfg: GRUB expands nothing inside single quotes."""
    return "'" + word.replace("'", "'\\''") + "'"


def grub_config(cmdline: str, module_names: Sequence[str] = ()) -> str:
    """The grub.cfg that boots /boot/kernel with ``cmdline`` and the modules /boot/mod0, mod1, ...

    GRUB hands the kernel its arguments joined by single spaces (runs of blanks collapse), and
    itself escapes a quote or backslash with a backslash and double-quotes an argument that holds
    a blank; each module's string is its name in ``module_names``.
    """
    kernel_line = " ".join(["multiboot", "/boot/kernel", *map(_grub_word, cmdline.split())])
    lines = ["set timeout=0", 'menuentry "pykvm" {', f"    {kernel_line}"]
    lines += [f"    module /boot/mod{i} {_grub_word(name)}" for i, name in enumerate(module_names)]
    lines += ["    boot", "}", ""]
    return "\n".join(lines)


def _tail(text: str, lines: int = LOG_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _read_tail(path: Path, *, terminal: bool = False) -> str:
    """The last LOG_LINES lines of a log file ("" if it is missing); ``terminal`` strips the escape
    sequences and control characters of a curses screen first."""
    data = _read_bytes(path)
    if terminal:
        data = _CONTROL.sub(b"", _ANSI_ESCAPE.sub(b"\n", data).replace(b"\r", b"\n"))
        data = b"\n".join(line.rstrip() for line in data.splitlines() if line.strip())
    return _tail(data.decode("utf-8", "replace"))


def build_iso(kernel: str | os.PathLike[str], modules: Sequence[str | os.PathLike[str]], cmdline: str,
              out: str | os.PathLike[str]) -> Path:
    """Build a BIOS-bootable GRUB rescue ISO at ``out`` that multiboots ``kernel`` with ``cmdline``
    and ``modules`` (see ``grub_config``), and return its path.

    Raises FileNotFoundError for a missing input, ValueError for a kernel without a multiboot
    header, PlatformUnavailable when grub-mkrescue or its helpers are missing, PlatformError when
    grub-mkrescue fails.
    """
    kernel_path, module_paths = _inputs(kernel, modules)
    if reason := _unavailable_reason(_missing_iso_tools()):
        raise PlatformUnavailable(reason)
    out_path = Path(out)
    with tempfile.TemporaryDirectory(prefix="pykvm-iso-") as tmp:
        root = Path(tmp) / "iso"
        (root / "boot" / "grub").mkdir(parents=True)
        shutil.copyfile(kernel_path, root / "boot" / "kernel")
        for i, module in enumerate(module_paths):
            shutil.copyfile(module, root / "boot" / f"mod{i}")
        (root / "boot" / "grub" / "grub.cfg").write_text(grub_config(cmdline, [m.name for m in module_paths]))
        command = [GRUB_MKRESCUE, "-o", str(out_path), str(root)]
        try:
            proc = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise PlatformError(f"{GRUB_MKRESCUE} did not finish in {e.timeout:.0f} s building {out_path}") from None
    if proc.returncode != 0 or not out_path.is_file():
        log = _tail((proc.stdout + proc.stderr).decode("utf-8", "replace"))
        raise PlatformError(f"{GRUB_MKRESCUE} failed (exit status {proc.returncode}) building {out_path}\n{log}")
    return out_path


@dataclass
class _Run:
    serial: bytes
    returncode: int
    stopped: bool  # the watchdog ended it (end marker, second banner)
    timed_out: bool
    seconds: float


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End ``proc`` and everything in its process group: SIGTERM, SIGKILL after KILL_GRACE."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever the leader left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class _GrowingFile:
    """The bytes of a file another process writes, read as they arrive (it may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray()
        self._file: BinaryIO | None = None

    def read(self) -> bytes:
        """The bytes written since the last call (appended to ``data`` too)."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            except FileNotFoundError:
                return b""
        chunk = self._file.read()
        self.data += chunk
        return chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _run_watched(command: Sequence[str], *, cwd: Path, env: dict[str, str] | None, output: Path, serial: Path,
                 timeout: float, banner: str | None, end_marker: str | None) -> _Run:
    """Run ``command`` in its own session (stdout and stderr to ``output``), watching the file
    ``serial``: stop it STOP_GRACE seconds after ``end_marker`` appears there or ``banner`` appears
    a second time, kill it at ``timeout``, and always leave no process of its group behind."""
    marker = end_marker.encode() if end_marker else None
    repeat = banner.encode() if banner else None
    stop_at: float | None = None
    stopped = timed_out = False
    with open(output, "wb") as out, closing(_GrowingFile(serial)) as com1:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if com1.read() and stop_at is None and (
                        (marker is not None and marker in com1.data)
                        or (repeat is not None and com1.data.count(repeat) >= 2)):
                    stop_at = now + STOP_GRACE
                if stop_at is not None:
                    if now >= stop_at:
                        stopped = True
                        break
                elif now - start >= timeout:
                    timed_out = True
                    break
                time.sleep(POLL_INTERVAL)
        finally:
            _stop_group(proc)
        seconds = time.monotonic() - start
        com1.read()
    return _Run(bytes(com1.data), proc.returncode, stopped, timed_out, seconds)


def _resets(serial: str, banner: str | None) -> int:
    return max(serial.count(banner) - 1, 0) if banner else 0


def _workdir(stack: ExitStack, workdir: str | os.PathLike[str] | None, prefix: str) -> Path:
    if workdir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fresh(*paths: Path) -> None:
    """Remove the outputs of an earlier run in a reused work directory."""
    for path in paths:
        path.unlink(missing_ok=True)


def _qemu_module(module: Path, index: int, workdir: Path) -> str:
    """``module`` as one item of QEMU's comma-separated multiboot -initrd list. QEMU takes the file
    name up to the first blank (the rest is the module's string), so a name with blanks is linked
    into the work directory first; a comma is escaped as ",,"."""
    if any(c.isspace() for c in str(module)):
        link = workdir / f"mod{index}"
        _fresh(link)
        link.symlink_to(module)
        module = link
    return str(module).replace(",", ",,")


def run_qemu(kernel: str | os.PathLike[str], modules: Sequence[str | os.PathLike[str]] = (), cmdline: str = "", *,
             cpu: str = QEMU_DEFAULT_CPU, memory_mib: int = 128, timeout: float = 60.0, banner: str | None = None,
             end_marker: str | None = None, workdir: str | os.PathLike[str] | None = None) -> PlatformResult:
    """Boot the multiboot ``kernel`` (a 32-bit ELF or a kernel with the multiboot address fields)
    with ``modules`` and ``cmdline`` on QEMU TCG and return what it wrote to COM1.

    QEMU gives the kernel the command line "KERNEL-PATH CMDLINE" and each module the string
    "MODULE-PATH". ``-no-reboot`` turns a reset (a triple fault) into QEMU's end. The temporary
    files (serial.txt, qemu.log) go to ``workdir`` if given (kept), else to a temporary directory.

    Raises FileNotFoundError for a missing kernel or module, ValueError for a kernel without a
    multiboot header or a bad argument, PlatformUnavailable when QEMU is not installed,
    PlatformError when QEMU fails before the kernel writes anything (it rejects the kernel, the CPU
    model or an option).
    """
    kernel_path, module_paths = _inputs(kernel, modules)
    _check_limits(memory_mib, timeout)
    if reason := qemu_available():
        raise PlatformUnavailable(reason)
    with ExitStack() as stack:
        wd = _workdir(stack, workdir, "pykvm-qemu-")
        serial, output = wd / "serial.txt", wd / "qemu.log"
        _fresh(serial, output)
        command = [shutil.which(QEMU) or QEMU, "-machine", "accel=tcg", "-cpu", cpu, "-m", str(memory_mib),
                   "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{serial.name}",
                   "-device", f"isa-debug-exit,iobase={QEMU_DEBUG_EXIT_PORT:#x},iosize=0x4",
                   "-kernel", str(kernel_path)]
        if cmdline:
            command += ["-append", cmdline]
        if module_paths:
            command += ["-initrd", ",".join(_qemu_module(m, i, wd) for i, m in enumerate(module_paths))]
        run = _run_watched(command, cwd=wd, env=None, output=output, serial=serial, timeout=timeout,
                           banner=banner, end_marker=end_marker)
        log = _read_tail(output)
    ended_itself = not (run.stopped or run.timed_out)
    if ended_itself and (run.returncode < 0 or (run.returncode == 1 and not run.serial)):
        first = log.splitlines()[0] if log else "(no output)"
        raise PlatformError(f"{QEMU} ended with status {run.returncode} before the kernel wrote to COM1: "
                            f"{first}\n{log}")
    rc = run.returncode
    serial_text = run.serial.decode("utf-8", "replace")
    return PlatformResult(platform="qemu", serial=serial_text,
                          exit_status=rc >> 1 if ended_itself and rc > 1 and rc & 1 else None,
                          timed_out=run.timed_out, resets=_resets(serial_text, banner), seconds=run.seconds,
                          log=log, command=tuple(command))


def bochs_config(cpu_model: str, memory_mib: int, iso: str = "boot.iso", serial: str = "serial.txt",
                 log: str = "bochs.log") -> str:
    """A headless bochsrc (display "term", which needs TERM set) that boots the CD image ``iso``
    with COM1 written to the file ``serial``; relative paths are from Bochs's working directory."""
    return "\n".join([
        "display_library: term",
        f"megs: {memory_mib}",
        f"romimage: file={BOCHS_BIOS}",
        f"vgaromimage: file={BOCHS_VGABIOS}",
        f"cpu: model={cpu_model}, count=1, ips=100000000",
        f"ata0-master: type=cdrom, path={iso}, status=inserted",
        "boot: cdrom",
        f"com1: enabled=1, mode=file, dev={serial}",
        "speaker: enabled=0",
        f"log: {log}",
        "panic: action=fatal",
        "error: action=report",
        "info: action=report",
        "debug: action=ignore",
        "",
    ])


def run_bochs(kernel: str | os.PathLike[str], modules: Sequence[str | os.PathLike[str]] = (), cmdline: str = "", *,
              cpu_model: str = BOCHS_VMX_MODELS[0], memory_mib: int = 128, timeout: float = 180.0,
              banner: str | None = None, end_marker: str | None = None,
              workdir: str | os.PathLike[str] | None = None) -> PlatformResult:
    """Boot the multiboot ``kernel`` with ``modules`` and ``cmdline`` through GRUB on Bochs (CPU
    model ``cpu_model``) and return what it wrote to COM1.

    GRUB gives the kernel only ``cmdline`` (see ``grub_config``) and each module its file name.
    The kernel ends the run by writing "Shutdown" to port 0x8900; a machine that keeps resetting
    ends after BOCHS_MAX_BOOTS boots, or at the second ``banner``. boot.iso, bochsrc, dbg.rc,
    serial.txt, bochs.log and term.txt (the curses screen) go to ``workdir`` if given (kept), else
    to a temporary directory.

    Raises FileNotFoundError for a missing kernel or module, ValueError for a kernel without a
    multiboot header or a bad argument, PlatformUnavailable when Bochs, its ROMs or the ISO tools
    are missing, PlatformError when the ISO cannot be built or Bochs stops before the kernel writes
    anything (an unknown CPU model, a panic while booting).
    """
    kernel_path, module_paths = _inputs(kernel, modules)
    _check_limits(memory_mib, timeout)
    if not _CPU_MODEL.fullmatch(cpu_model):
        raise ValueError(f"not a Bochs CPU model name: {cpu_model!r} (`bochs --help cpu` lists them)")
    if reason := bochs_available():
        raise PlatformUnavailable(reason)
    with ExitStack() as stack:
        wd = _workdir(stack, workdir, "pykvm-bochs-")
        serial, log_file, output = wd / "serial.txt", wd / "bochs.log", wd / "term.txt"
        _fresh(serial, log_file, output)
        build_iso(kernel_path, module_paths, cmdline, wd / "boot.iso")
        (wd / "bochsrc").write_text(bochs_config(cpu_model, memory_mib))
        (wd / "dbg.rc").write_text("c\n" * BOCHS_MAX_BOOTS + "quit\n")
        command = [shutil.which(BOCHS) or BOCHS, "-q", "-f", "bochsrc", "-rc", "dbg.rc"]
        run = _run_watched(command, cwd=wd, env={**os.environ, "TERM": "xterm"}, output=output, serial=serial,
                           timeout=timeout, banner=banner, end_marker=end_marker)
        log = _read_tail(log_file)
        shutdown = b"Shutdown port: shutdown requested" in _read_bytes(log_file)
        if not log:  # Bochs stopped before opening its log (a bochsrc error): its screen says why
            log = _read_tail(output, terminal=True)
    if not (run.stopped or run.timed_out) and not run.serial and not shutdown:
        panics = [line.partition(">>PANIC<<")[2].strip() for line in log.splitlines() if ">>PANIC<<" in line]
        why = panics[0] if panics else f"exit status {run.returncode}"
        raise PlatformError(f"bochs ended before the kernel wrote to COM1: {why}\n{log}")
    serial_text = run.serial.decode("utf-8", "replace")
    return PlatformResult(platform="bochs", serial=serial_text, exit_status=None, timed_out=run.timed_out,
                          resets=_resets(serial_text, banner), seconds=run.seconds, log=log, command=tuple(command))
