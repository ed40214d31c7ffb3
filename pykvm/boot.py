"""``pykvm boot``: boot a Linux kernel with virtio devices, as ``lkvm run`` or Firecracker do.

The machine is QEMU's PC as pykvm models it (:meth:`pykvm.machine.Machine.add_qemu_pc`: COM1,
RTC, i8042, ACPI with the PM block that powers off) plus one virtio-mmio transport per device,
announced both on the command line (``virtio_mmio.device=``, for kernels built with
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and in the DSDT (``LNRO0005``, what distribution kernels
match). The kernel is loaded by :mod:`pykvm.loaders.linux` with a zero page pykvm builds.

Without ``--kernel`` the newest ``/boot/vmlinuz-*`` is booted; without ``--initrd`` pykvm builds
an initramfs (:mod:`pykvm.initramfs`) from a static busybox and the kernel's virtio modules. The
guest's power-off (ACPI S5) or reboot ends the command with status 0. The host-side time of each
phase (VM created, first KVM_RUN, first console byte, the kernel's last message before init, user
space up, the end) is printed and in ``--json``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import argtypes
from . import status as st

EXAMPLES = """\
examples:
  pykvm boot                                   the host's newest /boot kernel, pykvm's initramfs
  pykvm boot --kernel bzImage --append 'quiet' --disk rootfs.img,ro
  pykvm boot --kernel vmlinux --initrd initrd.img --smp 2 --mem 1G --console virtio
  pykvm boot --disk data.img --init-script marker.sh --json
  pykvm boot --net tap=tap0                    needs CAP_NET_ADMIN (a TAP device)

The kernel's console is on stdout, the terminal's input goes to the guest. Exit status: 0 the guest
powered off or rebooted; otherwise as `pykvm run` (72 the guest stopped unexpectedly, e.g. a kernel
panic, 74 --timeout, 64 bad input, 66 no usable /dev/kvm).
"""

BOOT_GLOB = "vmlinuz-*"
DEFAULT_MEM = 256 << 20
#: What pykvm adds in front of the user's --append: the console, and a reboot through the keyboard
#: controller, which every PC model answers.
BASE_CMDLINE = {"serial": "console=ttyS0 earlyprintk=serial,ttyS0,115200", "virtio": "console=hvc0"}
COMMON_CMDLINE = "reboot=k"
#: kvm_pvm runs a guest kernel's code in KVM's instruction emulator, which lacks instructions a
#: distribution kernel uses once CPUID offers them. Its guests see the host's CPUID.1:ECX bits
#: whatever KVM_SET_CPUID2 says (only bits KVM itself offers can be cleared: cx16), so the kernel
#: is told on its command line instead: ``noxsave`` (no XSAVE/XRSTOR: FXSAVE instead) and
#: ``clearcpuid=`` with these X86_FEATURE_* numbers (word * 32 + bit, arch/x86/include/asm/
#: cpufeatures.h; numbers, not names, for kernels before 6.2).
PVM_CLEARCPUID = {
    "cx16": 4 * 32 + 13, "movbe": 4 * 32 + 22, "popcnt": 4 * 32 + 23, "aes": 4 * 32 + 25,
    "xsave": 4 * 32 + 26, "avx": 4 * 32 + 28, "f16c": 4 * 32 + 29, "rdrand": 4 * 32 + 30,
    "pclmulqdq": 4 * 32 + 1, "ssse3": 4 * 32 + 9, "fma": 4 * 32 + 12, "sse4_1": 4 * 32 + 19,
    "sse4_2": 4 * 32 + 20, "fsgsbase": 9 * 32 + 0, "bmi1": 9 * 32 + 3, "avx2": 9 * 32 + 5,
    "bmi2": 9 * 32 + 8, "invpcid": 9 * 32 + 10, "avx512f": 9 * 32 + 16, "rdseed": 9 * 32 + 18,
    "adx": 9 * 32 + 19, "clflushopt": 9 * 32 + 23, "clwb": 9 * 32 + 24, "sha_ni": 9 * 32 + 29,
    "rdpid": 16 * 32 + 22,
}
#: ``nosoftlockup``: at emulator speed, ftrace's check of its records alone takes longer than the
#: soft-lockup watchdog's 20 s (seen: "BUG: soft lockup - CPU#0 stuck for 26s!" in ftrace_check_work_func).
PVM_CMDLINE = "noxsave nosoftlockup clearcpuid=" + ",".join(str(n) for n in sorted(PVM_CLEARCPUID.values()))
PVM_EMULATOR_GAPS = ("cx16",)  # the same, in the CPUID pykvm gives (where KVM lets it clear the bit)

#: Console lines that mark a phase (regular expressions on one line of console output).
INIT_LINE = re.compile(r"Run (\S+) as init process")
PANIC_LINE = re.compile(r"Kernel panic - not syncing")
USER_LINE = re.compile(r"pykvm-init: user space is up")


class BootError(ValueError):
    """``pykvm boot`` was asked for something it cannot do (a missing disk, no kernel found...)."""


@dataclass
class Phases:
    """Host-side time stamps (seconds since the command started) of a boot's phases."""

    start: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)

    def mark(self, name: str, line: str | None = None) -> None:
        if name not in self.seconds:
            self.seconds[name] = round(time.monotonic() - self.start, 6)
            if line is not None:
                self.lines[name] = line

    def remark(self, name: str, line: str) -> None:
        """Mark ``name`` again, later (the last of several lines wins)."""
        self.seconds[name] = round(time.monotonic() - self.start, 6)
        self.lines[name] = line


class ConsoleWatch:
    """The stream the guest's console writes to: passes bytes on to ``stream`` (stdout, or None),
    keeps them, and marks phases from complete lines (first byte, the kernel's last message before
    init, a panic). Written by a vCPU thread (the UART) or a device thread (virtio-console)."""

    def __init__(self, stream, phases: Phases, on_panic=None, limit: int = 4 << 20) -> None:
        self.stream = stream
        self.phases = phases
        self.on_panic = on_panic
        self.limit = limit
        self.data = bytearray()
        self._partial = b""
        self._lock = threading.Lock()
        self.before_init: str | None = None  # the last kernel line before "Run /init as init process"
        self._last_line = ""

    def write(self, data: bytes) -> int:
        with self._lock:
            if data:
                self.phases.mark("first console byte")
            self.data += data
            if len(self.data) > self.limit:
                del self.data[: len(self.data) - self.limit]
            if self.stream is not None:
                self.stream.write(data)
            self._partial += bytes(data)
            *lines, self._partial = self._partial.split(b"\n")
            for raw in lines:
                self._line(raw.decode("utf-8", "replace").rstrip("\r"))
        return len(data)

    def _line(self, line: str) -> None:
        if INIT_LINE.search(line):
            self.phases.mark("kernel: last message before init", self._last_line)
            self.phases.mark("init started", line)
        elif USER_LINE.search(line):
            self.phases.mark("user space up", line)
        elif match := PANIC_LINE.search(line):
            self.phases.mark("kernel panic", line[match.start():])
            if self.on_panic is not None:
                self.on_panic(line[match.start():])
        self._last_line = line

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")


def find_kernel(boot_dir: Path = Path("/boot")) -> Path:
    """The newest kernel in ``boot_dir`` (by version), or BootError saying how to get one."""
    kernels = [p for p in boot_dir.glob(BOOT_GLOB) if p.is_file()]
    if not kernels:
        raise BootError(f"no kernel in {boot_dir} ({BOOT_GLOB}): pass --kernel FILE, or install one "
                        "(apt-get install linux-image-amd64)")
    return max(kernels, key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))


def _version_key(version: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"[.\-+~]", version)]


def kernel_release(kernel: Path, data: bytes) -> str | None:
    """The kernel's release (``uname -r``): from the version string a bzImage's header points at
    (kernel_version + 0x200, protocol 2.00+), else from a ``vmlinuz-RELEASE`` file name."""
    from .loaders.linux import LinuxBootError, parse_bzimage

    try:
        pointer = parse_bzimage(data, str(kernel)).kernel_version
    except LinuxBootError:
        pointer = 0
    if pointer:
        text = bytes(data[pointer + 0x200 : pointer + 0x200 + 256]).split(b"\0")[0].decode("ascii", "replace")
        if text.split():
            return text.split()[0]
    name = kernel.name
    return name.removeprefix("vmlinuz-") if name.startswith("vmlinuz-") else None


@dataclass(frozen=True)
class DiskSpec:
    path: str
    readonly: bool

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        path, _, opts = text.partition(",")
        if not path or opts not in ("", "ro", "rw"):
            raise argparse.ArgumentTypeError(f"--disk takes FILE or FILE,ro, not {text!r}")
        return cls(path, opts == "ro")


def _net_spec(text: str) -> str:
    if not text.startswith("tap=") or len(text) == 4:
        raise argparse.ArgumentTypeError(f"--net takes tap=NAME, not {text!r}")
    return text[4:]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "boot", help="boot a Linux kernel with virtio devices (disk, console, rng, net)",
        description="Boot a Linux kernel (bzImage or vmlinux) through the Linux boot protocol, with "
        "virtio-mmio devices and pykvm's initramfs (a static busybox) unless --initrd is given.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--kernel", metavar="FILE", help="a bzImage or an ELF vmlinux (default: the newest /boot/vmlinuz-*)")
    p.add_argument("--initrd", metavar="FILE", help="an initramfs (default: pykvm builds one)")
    p.add_argument("--append", default="", metavar="CMDLINE", help="more kernel command line")
    p.add_argument("--disk", action="append", default=[], type=DiskSpec.parse, metavar="FILE[,ro]",
                   help="a raw disk image as virtio-blk (repeatable; ,ro read-only)")
    p.add_argument("--net", action="append", default=[], type=_net_spec, metavar="tap=NAME",
                   help="virtio-net on a TAP device (needs CAP_NET_ADMIN)")
    p.add_argument("--smp", type=argtypes.number(int, minimum=1, maximum=64, what="a CPU count"), default=1)
    p.add_argument("--mem", type=argtypes.size, default=DEFAULT_MEM, metavar="SIZE", help="guest RAM (default 256M)")
    p.add_argument("--console", choices=("serial", "virtio"), default="serial",
                   help="the kernel's console: COM1 (ttyS0, default) or virtio-console (hvc0)")
    p.add_argument("--no-rng", dest="rng", action="store_false", help="no virtio-rng device")
    p.add_argument("--decompress", choices=("auto", "yes", "no"), default="auto",
                   help="decompress a bzImage on the host and enter the vmlinux inside (auto: where "
                   "the backend emulates guest kernel code, as kvm_pvm does)")  # fmt: skip
    p.add_argument("--init-script", type=Path, metavar="FILE",
                   help="a shell script pykvm's initramfs runs before it powers off (default: a "
                   "shell when stdin is a terminal, else nothing)")  # fmt: skip
    p.add_argument("--timeout", type=argtypes.number(float, minimum=0.1, what="a number of seconds"),
                   help="stop the guest after this many seconds (status 74)")
    p.add_argument("--stats", action="store_true", help="exit and virtio counters after the run")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (the console in it)")
    p.set_defaults(func=cmd_boot)


def _decompress(choice: str, kernel: bytes, backend: str | None) -> bool:
    """Whether to decompress the bzImage on the host: --decompress yes/no, or (auto) on kvm_pvm
    where the kernel has a compressed payload (a vmlinux, or a bzImage without one, has nothing to
    decompress)."""
    if choice != "auto":
        return choice == "yes"
    from .loaders.linux import LinuxBootError, parse_bzimage

    if backend != "kvm_pvm":
        return False
    try:
        return parse_bzimage(kernel).payload_length > 0
    except LinuxBootError:
        return False


def cmd_boot(args) -> int:
    from .devices.i8042 import Reset
    from .devices.acpi_pm import PowerOff
    from .loaders.linux import load_linux, setup_linux
    from .machine import GuestError, Machine
    from .probe.host import kvm_backend
    from .virtio.tap import TapError

    phases = Phases()
    kernel_path = Path(args.kernel) if args.kernel else find_kernel()
    kernel = _read(kernel_path, "kernel")
    initrd = _read(Path(args.initrd), "initrd") if args.initrd else None
    for disk in args.disk:
        _check_disk(disk)
    release = kernel_release(kernel_path, kernel)
    if initrd is None:
        from .initramfs import build_initramfs

        script = _read(args.init_script, "init script").decode() if args.init_script else None
        interactive = script is None and sys.stdin.isatty() and not args.json
        modules = release if release and (Path("/lib/modules") / release).is_dir() else None
        initrd = build_initramfs(kernel_version=modules, console=args.console, script=script,
                                 interactive=interactive)
    backend = kvm_backend()
    if backend == "kvm_pvm" and not args.json:
        print("pykvm: note: kvm_pvm emulates the kernel's own code (slow) and cannot run a stock kernel's "
              "user space: expect the early boot only", file=sys.stderr)
    out = None if args.json else sys.stdout.buffer
    machine_holder: list = []

    def panic(line: str) -> None:
        if machine_holder:
            machine_holder[0].stop(f"the guest kernel panicked: {line.strip()}")

    watch = ConsoleWatch(out, phases, on_panic=panic)
    outcome = error = None
    cpuid = None
    if backend == "kvm_pvm":
        from .x86.cpuid import edit_features

        def cpuid(entries):
            return edit_features(entries, [(name, False) for name in PVM_EMULATOR_GAPS])[0]

    with Machine(args.mem, cpus=args.smp, irqchip=True, strict=False, console=None, cpuid=cpuid) as machine:
        machine_holder.append(machine)
        machine.time_exits = args.stats
        phases.mark("VM created")
        try:
            transports = _add_virtio(machine, args, watch)
        except TapError as e:
            if e.errno in (errno.EPERM, errno.EACCES, errno.ENOENT):  # this host cannot: not the input
                from .cli import _fail

                return _fail(args, e, str(e), st.UNAVAILABLE)
            raise
        # COM1 is there with either console (as on QEMU's PC); the kernel writes to it with
        # console=ttyS0, or when only earlyprintk or a boot stub knows no other device
        machine.add_qemu_pc(serial=watch, ecam=False)
        cmdline = " ".join(filter(None, [BASE_CMDLINE[args.console], COMMON_CMDLINE,
                                         PVM_CMDLINE if backend == "kvm_pvm" else "",
                                         *(t.cmdline_arg for t in transports), args.append]))
        boot = load_linux(machine.memory, kernel, name=str(kernel_path), mem_size=machine.ram.size,
                          cmdline=cmdline, initrd=initrd, rsdp=machine.acpi.tables["RSDP"],
                          decompress=_decompress(args.decompress, kernel, backend))
        setup_linux(machine.vcpu, machine.memory, boot)
        if args.console == "serial" and sys.stdin.isatty() and not args.json:
            from .cli import _feed_stdin

            _feed_stdin(machine.uart)
        phases.mark("first KVM_RUN")
        try:
            outcome = machine.run(timeout=args.timeout)
        except GuestError as e:
            error = e
        phases.mark("end")
        watch.flush()
        powered = isinstance(outcome, (PowerOff, Reset))
        code = 0 if powered else st.of_error(error) if error is not None else st.of_outcome(outcome)
        ending = ("power-off" if isinstance(outcome, PowerOff) else "reboot" if isinstance(outcome, Reset)
                  else f"error: {error}" if error is not None else f"guest status {outcome.status}")
        if "kernel panic" in phases.seconds:  # the watch stopped the machine: not a timeout
            code, ending = st.GUEST_STOPPED, f"kernel panic: {phases.lines['kernel panic']}"
        doc = {
            "kernel": str(kernel_path), "release": release, "entry": boot.mode, "compression": boot.compression,
            "cmdline": cmdline,
            "mem": args.mem, "smp": args.smp, "backend": backend, "ending": ending, "status": code,
            "phases": phases.seconds, "phase_lines": phases.lines,
            "devices": [{"type": type(t.device).__name__, "gpa": t.gpa, "irq": t.irq} for t in transports],
        }
        if args.stats:
            doc["stats"] = _stats(machine, transports)
        if error is not None and error.state is not None:
            doc["state"] = error.state.to_json()
        if args.json:
            doc["console"] = watch.text()
            print(json.dumps(doc, indent=2))
        else:
            _print_summary(doc, error)
    return code


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BootError(f"{what} {path}: {e.strerror}") from None


def _check_disk(disk: DiskSpec) -> None:
    if not os.path.exists(disk.path):
        raise BootError(f"disk {disk.path}: no such file (create one: truncate -s 64M {disk.path})")
    if not disk.readonly and not os.access(disk.path, os.W_OK):
        raise BootError(f"disk {disk.path} is read-only: add ,ro to use it read-only")


def _add_virtio(machine, args, watch) -> list:
    from .virtio.blk import VirtioBlk
    from .virtio.console import VirtioConsole
    from .virtio.net import VirtioNet
    from .virtio.rng import VirtioRng

    devices = [VirtioBlk(d.path, readonly=d.readonly) for d in args.disk]
    if args.console == "virtio":
        devices.append(VirtioConsole(watch, input=sys.stdin.fileno() if sys.stdin.isatty() and not args.json else None))
    if args.rng:
        devices.append(VirtioRng())
    devices += [VirtioNet(tap) for tap in args.net]
    return [machine.add_virtio(d) for d in devices]


def _stats(machine, transports) -> dict:
    from .cli import _stats_document

    doc = _stats_document(machine)
    from .virtio.mmio import INTERRUPTS, NOTIFY_IOEVENTFD, NOTIFY_TRAPPED, REGISTER_EXITS

    main = dict.fromkeys((NOTIFY_IOEVENTFD, NOTIFY_TRAPPED, INTERRUPTS, REGISTER_EXITS), 0)
    doc["virtio"] = {f"{type(t.device).__name__}@{t.gpa:#x}": {**main, **t.stats} for t in transports}
    return doc


def _print_summary(doc: dict, error) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if error is not None:
        console.print(f"pykvm: error: {error.report()}", markup=False, highlight=False)
    table = Table(title=f"pykvm boot: {doc['kernel']} ({doc['entry']} entry) ended in {doc['ending']}",
                  title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("console line")
    for name, seconds in doc["phases"].items():
        table.add_row(name, f"{seconds:.3f}", doc["phase_lines"].get(name, ""))
    console.print(table)
    if "stats" in doc:
        for name, counters in doc["stats"]["virtio"].items():
            console.print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counters.items()), markup=False)
