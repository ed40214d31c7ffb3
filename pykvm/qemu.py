"""``pykvm-qemu``: ``qemu-system-x86_64``'s command line, for the subset test runners use, on pykvm.

A runner that starts its test kernels with QEMU (kvm-unit-tests' ``x86/run``, an OS tutorial's
``make run``, a CI script) can set ``QEMU=pykvm-qemu`` or put pykvm-qemu first on PATH as
``qemu-system-x86_64``: the guest runs on pykvm's :class:`~pykvm.machine.Machine`, with the
QEMU PC platform (:meth:`~pykvm.machine.Machine.add_qemu_pc`): PCI, the ACPI PM block, QEMU's test
devices, unassigned I/O reading all ones.

Options are QEMU's: ``-opt`` or ``--opt``, those with a value take the next argument; values
are QEMU's ``key=value,...`` lists (``,,`` is a comma). Every option and value pykvm-qemu does
not implement is refused with one line that names it and QEMU's status for a bad command line
(1), never ignored: a run that silently lacks what the runner asked for would be a lie.

Exit statuses are QEMU's where QEMU has one (0: the guest powered off, or reset under
``-no-reboot``; ``isa-debug-exit``: ``(value << 1) | 1``; 1: a bad command line or a host that
cannot start the guest), and pykvm's (:mod:`pykvm.status`: 70, 72, 74, 130, all even) for what
QEMU has no status for: a guest that stopped unexpectedly is reported with its registers and
never exits with a status a runner reads as a pass.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import BinaryIO

from . import status as st

PROG = "pykvm-qemu"
#: The QEMU release whose command line, help listings and version text this follows.
QEMU_VERSION = "7.2.0"
EXIT_BAD_COMMAND_LINE = 1  # QEMU's status for an option it cannot honour
MAX_CPUS = 15  # pykvm's xAPIC tables and the CLI's limit

MACHINES = {  # name -> description, as `-machine help` lists them
    "pc": "Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)",
    "pc-i440fx-7.2": "Standard PC (i440FX + PIIX, 1996) (default)",
    "q35": "Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2), here: pc with the PCIe ECAM window",
    "pc-q35-7.2": "Standard PC (Q35 + ICH9, 2009), here: pc with the PCIe ECAM window",
}
ACCELERATORS = ("kvm",)
#: -cpu models taken as host (KVM's CPUID) with a warning: QEMU's named models are a CPUID table of
#: their own, which pykvm does not reproduce; their +/- flags still apply.
CPU_MODELS_AS_HOST = ("qemu64", "kvm64")
#: -cpu properties that say what pykvm does anyway (the guest's physical address width is the host's).
CPU_PROPERTIES_AS_IS = ("host-phys-bits", "host-phys-bits=on", "migratable=no", "migratable=off")


class UsageError(Exception):
    """A command line pykvm-qemu cannot honour; the message names the option."""


# ---- QEMU's option values -----------------------------------------------------------------------
def split_opts(text: str) -> list[str]:
    """QEMU's comma list: "a,b=c,,d" -> ["a", "b=c,d"] (",," is a literal comma)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def parse_opts(option: str, text: str, *, implied: str | None = None) -> dict[str, str]:
    """QEMU's ``key=value,...`` (the first item may be a bare value for the ``implied`` key)."""
    result: dict[str, str] = {}
    for n, item in enumerate(split_opts(text)):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and implied is not None:
                key, value = implied, item
            else:
                value = "on"  # QEMU: a bare flag means key=on
        if key in result:
            raise UsageError(f"-{option} {text}: {key} given twice")
        result[key] = value
    return result


def _number(option: str, key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"-{option}: {key}={value}: not a number") from None


def parse_memory(text: str) -> int:
    """``-m`` values: "256" (MiB), "256M", "1G", "size=512M"."""
    opts = parse_opts("m", text, implied="size")
    extra = sorted(set(opts) - {"size"})
    if extra:
        raise UsageError(f"-m {text}: pykvm-qemu takes only a size (no {', '.join(extra)})")
    value = opts.get("size", "")
    units = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1}
    body, unit = (value[:-1], value[-1].lower()) if value and value[-1].isalpha() else (value, "")
    try:
        number = float(body)
    except ValueError:
        raise UsageError(f"-m {text}: not a size (examples: 256, 256M, 1G)") from None
    if unit not in units or number <= 0:
        raise UsageError(f"-m {text}: not a size (examples: 256, 256M, 1G)")
    size = int(number * units[unit])
    return (size + 0xFFF) & ~0xFFF


def parse_smp(text: str) -> int:
    opts = parse_opts("smp", text, implied="cpus")
    known = {"cpus", "maxcpus", "sockets", "dies", "cores", "threads"}
    extra = sorted(set(opts) - known)
    if extra:
        raise UsageError(f"-smp {text}: unknown parameter {extra[0]}")
    topo = [_number("smp", k, opts[k]) for k in ("sockets", "dies", "cores", "threads") if k in opts]
    cpus = _number("smp", "cpus", opts["cpus"]) if "cpus" in opts else None
    if cpus is None:
        cpus = 1
        for n in topo:
            cpus *= n
    if "maxcpus" in opts and _number("smp", "maxcpus", opts["maxcpus"]) != cpus:
        raise UsageError(f"-smp {text}: pykvm-qemu has no CPU hotplug (maxcpus must equal cpus)")
    if not 1 <= cpus <= MAX_CPUS:  # QEMU's wording: kvm-unit-tests reads the limit from its last word
        raise UsageError(f"-smp {text}: Invalid SMP CPUs {cpus}. The max CPUs supported by machine 'pc' is {MAX_CPUS}")
    return cpus


# ---- the configuration -----------------------------------------------------------------------------
@dataclasses.dataclass
class Chardev:
    """A character backend: "stdio", "null" or a file."""

    kind: str
    path: str | None = None

    def open(self, opened: list) -> BinaryIO | None:
        if self.kind == "stdio":
            return sys.stdout.buffer
        if self.kind == "null":
            return None
        f = open(self.path, "wb")  # noqa: SIM115 - closed when the run ends
        opened.append(f)
        return f


@dataclasses.dataclass
class DeviceSpec:
    """One ``-device``: its QEMU name and properties."""

    name: str
    props: dict[str, str]


@dataclasses.dataclass
class Config:
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    mem: int = 128 << 20  # QEMU's default -m
    cpus: int = 1
    machine: str = "pc"
    accel: str | None = None
    defaults: bool = True
    serial: list[str] = dataclasses.field(default_factory=list)
    debugcon: str | None = None
    chardevs: dict[str, Chardev] = dataclasses.field(default_factory=dict)
    devices: list[DeviceSpec] = dataclasses.field(default_factory=list)
    no_reboot: bool = False
    gdb: str | None = None
    wait_gdb: bool = False
    name: str | None = None
    pit_reinject: bool = True
    pit: bool = True  # -machine pit=off: no i8254 (KVM's in-kernel PIT is not created)
    nographic: bool = False
    listing: str | None = None  # "version", "help", "device", "machine", "accel", "cpu"
    cpu_model: str = "max"
    cpu_vendor: str | None = None  # -cpu ...,vendor=X: only the host's own is honoured
    cpu_features: list[tuple[str, bool]] = dataclasses.field(default_factory=list)


# option -> (takes a value, what it is); every other option is refused by name
OPTIONS: dict[str, tuple[bool, str]] = {
    "kernel": (True, "the kernel to boot (multiboot or ELF)"),
    "initrd": (True, "multiboot modules: 'FILE [ARGS],FILE2 [ARGS]'"),
    "append": (True, "the kernel command line"),
    "m": (True, "guest RAM (MiB, or with a suffix: 256M, 1G)"),
    "smp": (True, "CPUs: N or cpus=N[,sockets=,cores=,threads=]"),
    "cpu": (True, "host or max (KVM's CPUID as offered)"),
    "machine": (True, "[type=]pc|q35[,accel=kvm]"),
    "M": (True, "the same as -machine"),
    "accel": (True, "kvm (or help)"),
    "enable-kvm": (False, "the same as -accel kvm"),
    "nodefaults": (False, "no default devices (no serial port unless -serial)"),
    "display": (True, "none"),
    "vnc": (True, "none"),
    "vga": (True, "none"),
    "monitor": (True, "none"),
    "nographic": (False, "no display; the serial port on stdio"),
    "serial": (True, "stdio | file:PATH | null | none | chardev:ID"),
    "debugcon": (True, "isa-debugcon on port 0xe9: stdio | file:PATH | null | none | chardev:ID"),
    "chardev": (True, "stdio,id=ID | null,id=ID | file,id=ID,path=PATH"),
    "device": (True, "NAME[,PROP=VALUE...] (or help)"),
    "global": (True, "kvm-pit.lost_tick_policy=discard|delay"),
    "no-reboot": (False, "exit (status 0) when the guest resets"),
    "s": (False, "the same as -gdb tcp::1234"),
    "S": (False, "do not start the CPUs until gdb says so (with -s or -gdb)"),
    "gdb": (True, "tcp::PORT or tcp:HOST:PORT"),
    "name": (True, "a name for the guest (shown in messages)"),
    "version": (False, "QEMU's version text"),
    "help": (False, "this list"),
    "h": (False, "this list"),
}

DEVICE_NAMES = ("isa-debug-exit", "pc-testdev", "pci-testdev", "isa-debugcon")


def _chardev_of(option: str, text: str, config: Config) -> str:
    """A ``-serial``/``-debugcon`` value as a chardev name (made up for the inline kinds)."""
    if text.startswith("chardev:"):
        return text[8:]
    if text in ("stdio", "null", "none"):
        name = f"_{option}{len(config.chardevs)}"
        config.chardevs[name] = Chardev("null" if text == "none" else text)
        return name
    if text.startswith("file:") and len(text) > 5:
        name = f"_{option}{len(config.chardevs)}"
        config.chardevs[name] = Chardev("file", text[5:])
        return name
    raise UsageError(f"-{option} {text}: pykvm-qemu takes stdio, file:PATH, null, none or chardev:ID")


def parse_args(argv: list[str]) -> Config:
    """The command line as a :class:`Config`; raises :class:`UsageError` naming what it cannot honour."""
    config = Config()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            if config.kernel is None and os.path.exists(arg):
                raise UsageError(f"{arg}: a disk image to boot from: pykvm-qemu has no firmware; give the kernel "
                                 "with -kernel")
            raise UsageError(f"{arg}: invalid option (pykvm-qemu takes only options)")
        name = arg.lstrip("-")
        if name not in OPTIONS:
            raise UsageError(f"-{name}: invalid option (not one pykvm-qemu implements; see {PROG} -help)")
        takes_value, _ = OPTIONS[name]
        value = None
        if takes_value:
            if i >= len(argv):
                raise UsageError(f"-{name}: requires an argument")
            value = argv[i]
            i += 1
        _apply(config, name, value)
    if len(config.serial) > 1:
        raise UsageError("-serial given twice: pykvm-qemu has one serial port (COM1)")
    if config.wait_gdb and config.gdb is None:
        raise UsageError("-S: pykvm-qemu starts stopped only for gdb (add -s or -gdb tcp::PORT)")
    return config


#: options whose value ``help`` (or ``?``) asks for a listing instead
HELP_LISTINGS = {"cpu": "cpu", "machine": "machine", "M": "machine", "accel": "accel", "device": "device"}


def _apply(config: Config, name: str, value: str | None) -> None:  # noqa: C901 - one branch an option
    if name in HELP_LISTINGS and value in ("help", "?"):
        config.listing = HELP_LISTINGS[name]
    elif name == "kernel":
        config.kernel = value
    elif name == "initrd":
        config.initrd = value
    elif name == "append":
        config.append = value
    elif name == "m":
        config.mem = parse_memory(value)
    elif name == "smp":
        config.cpus = parse_smp(value)
    elif name == "cpu":
        from .x86.cpuid import FEATURE_BITS

        model, *flags = split_opts(value)
        if model not in ("host", "max") and model not in CPU_MODELS_AS_HOST:
            raise UsageError(f"-cpu {value}: pykvm-qemu offers the CPU KVM offers: -cpu host or max (or "
                             f"{', '.join(CPU_MODELS_AS_HOST)}, taken as host)")
        config.cpu_model = model
        for flag in flags:
            if flag[:1] in "+-" and flag[1:] in FEATURE_BITS:
                config.cpu_features.append((flag[1:], flag[0] == "+"))
            elif flag in CPU_PROPERTIES_AS_IS:
                pass
            elif flag.startswith("vendor="):
                config.cpu_vendor = flag[7:]
            else:
                raise UsageError(f"-cpu {value}: {flag!r} is not a CPU feature or property pykvm-qemu implements "
                                 f"(features: {', '.join(sorted(FEATURE_BITS))})")
    elif name in ("machine", "M"):
        opts = parse_opts("machine", value, implied="type")
        for key, v in opts.items():
            if key == "type":
                if v not in MACHINES:
                    raise UsageError(f"-machine {value}: unsupported machine type {v!r} (pykvm-qemu has "
                                     f"{', '.join(MACHINES)}; -machine help)")
                config.machine = v
            elif key == "accel":
                config.accel = _accel(f"-machine {value}", v)
                if config.accel == "help":
                    config.listing = "accel"
            elif key == "pit":
                if v not in ("on", "off"):
                    raise UsageError(f"-machine {value}: pit takes on or off")
                config.pit = v == "on"
            elif key in ("kernel_irqchip", "kernel-irqchip"):
                if v not in ("on", "true"):
                    raise UsageError(f"-machine {value}: pykvm-qemu runs with KVM's in-kernel irqchip "
                                     "(kernel_irqchip=on)")
            else:
                raise UsageError(f"-machine {value}: property {key!r} is not one pykvm-qemu implements")
    elif name == "accel":
        opts = parse_opts("accel", value, implied="accel")
        extra = sorted(set(opts) - {"accel"})
        if extra:
            raise UsageError(f"-accel {value}: property {extra[0]!r} is not one pykvm-qemu implements")
        config.accel = _accel(f"-accel {value}", opts["accel"])
    elif name == "enable-kvm":
        config.accel = "kvm"
    elif name == "nodefaults":
        config.defaults = False
    elif name in ("display", "vnc", "vga", "monitor"):
        if value != "none":
            raise UsageError(f"-{name} {value}: pykvm-qemu has no {'display' if name != 'monitor' else 'monitor'} "
                             f"(only -{name} none)")
    elif name == "nographic":
        config.nographic = True
    elif name == "serial":
        config.serial.append(_chardev_of("serial", value, config))
    elif name == "debugcon":
        config.debugcon = _chardev_of("debugcon", value, config)
    elif name == "chardev":
        opts = parse_opts("chardev", value, implied="backend")
        backend, ident = opts.pop("backend", None), opts.pop("id", None)
        if not ident:
            raise UsageError(f"-chardev {value}: needs id=NAME")
        if ident in config.chardevs:
            raise UsageError(f"-chardev {value}: duplicate chardev id {ident!r}")
        path = opts.pop("path", None)
        if opts.get("mux") == "off":  # QEMU's default; mux=on (several front ends on one chardev) is not here
            del opts["mux"]
        if opts:
            raise UsageError(f"-chardev {value}: property {next(iter(opts))!r} is not one pykvm-qemu implements")
        if backend in ("stdio", "null"):
            config.chardevs[ident] = Chardev(backend)
        elif backend == "file" and path:
            config.chardevs[ident] = Chardev("file", path)
        else:
            raise UsageError(f"-chardev {value}: pykvm-qemu has the stdio, null and file (path=) backends")
    elif name == "device":
        props = parse_opts("device", value, implied="driver")
        dev = props.pop("driver")
        if dev not in DEVICE_NAMES:
            raise UsageError(f"-device {value}: '{dev}' is not a valid device model name (pykvm-qemu has "
                             f"{', '.join(DEVICE_NAMES)}; -device help)")
        _check_device(value, dev, props, config)
        config.devices.append(DeviceSpec(dev, props))
    elif name == "global":
        if value == "kvm-pit.lost_tick_policy=discard":
            config.pit_reinject = False
        elif value == "kvm-pit.lost_tick_policy=delay":
            config.pit_reinject = True
        else:
            raise UsageError(f"-global {value}: pykvm-qemu implements only kvm-pit.lost_tick_policy=discard|delay")
    elif name == "no-reboot":
        config.no_reboot = True
    elif name == "s":
        config.gdb = "127.0.0.1:1234"
    elif name == "S":
        config.wait_gdb = True
    elif name == "gdb":
        if not value.startswith("tcp:"):
            raise UsageError(f"-gdb {value}: pykvm-qemu serves gdb on TCP only (tcp::PORT or tcp:HOST:PORT)")
        host, _, port = value[4:].rpartition(":")
        if not port.isdigit():
            raise UsageError(f"-gdb {value}: not tcp::PORT or tcp:HOST:PORT")
        config.gdb = f"{host or '127.0.0.1'}:{port}"
    elif name == "name":
        config.name = parse_opts("name", value, implied="guest").get("guest")
    elif name == "version":
        config.listing = "version"
    elif name in ("help", "h"):
        config.listing = "help"


def _accel(where: str, value: str) -> str:
    if value in ("help", "?"):
        return "help"
    choices = value.split(":")
    if "kvm" not in choices:
        raise UsageError(f"{where}: pykvm-qemu runs guests under KVM only (accel=kvm), not {value}")
    return "kvm"


_DEVICE_PROPS = {
    "isa-debug-exit": {"iobase", "iosize"},
    "pc-testdev": set(),
    "pci-testdev": {"membar", "addr", "bus"},
    "isa-debugcon": {"iobase", "chardev"},
}


def _check_device(value: str, dev: str, props: dict[str, str], config: Config) -> None:
    extra = sorted(set(props) - _DEVICE_PROPS[dev])
    if extra:
        raise UsageError(f"-device {value}: property '{dev}.{extra[0]}' is not one pykvm-qemu implements")
    for key in ("iobase", "iosize"):
        if key in props:
            n = _number("device", key, props[key])
            if not 0 <= n <= 0xFFFF:
                raise UsageError(f"-device {value}: {key} {props[key]} is not a port (0-0xffff)")
    if dev == "isa-debugcon" and props.get("chardev") not in config.chardevs:
        raise UsageError(f"-device {value}: needs chardev=ID of a -chardev given before it")
    if dev == "pci-testdev" and props.get("bus", "pci.0") not in ("pci.0", "pcie.0"):
        raise UsageError(f"-device {value}: pykvm-qemu has one PCI bus, pci.0")


# ---- listings, in QEMU's formats ------------------------------------------------------------------
def version_text() -> str:
    from importlib import metadata

    try:
        mine = metadata.version("pykvm-driver")
    except metadata.PackageNotFoundError:
        mine = "unknown"
    return (f"QEMU emulator version {QEMU_VERSION} (pykvm-qemu {mine}: QEMU's command line on pykvm, KVM only)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers (the command line "
            "followed); pykvm-qemu is not QEMU\n")


def help_text() -> str:
    # QEMU's first line is its version, which runners (kvm-unit-tests) parse from `-h`
    lines = [version_text().splitlines()[0], f"usage: {PROG} [options]", "",
             "QEMU's command line for the options below; every other is refused.", ""]
    for name, (takes, what) in OPTIONS.items():
        lines.append(f"-{name}{' ARG' if takes else ''}".ljust(22) + what)
    lines += ["", "exit status: 0 the guest powered off (or reset, with -no-reboot); odd: isa-debug-exit;",
              "1 a bad command line or a host that cannot start the guest;"]
    lines += [f"{code} {meaning}" for code, meaning in st.MEANINGS.items() if code >= st.GUEST_FAILED]
    return "\n".join(lines) + "\n"


def device_help() -> str:
    """``-device help``: QEMU's format, so that runners grepping it find what exists."""
    return (
        "Controller/Bridge/Hub devices:\n"
        'name "i440FX-pcihost", bus System, desc "the host bridge (always present)"\n'
        'name "PIIX3", bus PCI, desc "the ISA bridge (always present)"\n'
        "\n"
        "Input devices:\n"
        'name "i8042", bus ISA, desc "keyboard controller (the reset line; always present)"\n'
        "\n"
        "Misc devices:\n"
        'name "isa-debug-exit", bus ISA\n'
        'name "isa-debugcon", bus ISA\n'
        'name "pc-testdev", bus ISA\n'
        'name "pci-testdev", bus PCI, desc "PCI Test Device"\n'
    )


def machine_help() -> str:
    lines = ["Supported machines are:"]
    lines += [f"{name:<20} {desc}" for name, desc in MACHINES.items()]
    return "\n".join(lines) + "\n"


def accel_help() -> str:
    return "Accelerators supported in QEMU binary:\n" + "".join(f"{a}\n" for a in ACCELERATORS)


def cpu_help() -> str:
    return ("Available CPUs:\n"
            "x86 host                  KVM processor with all supported host features\n"
            "x86 max                   Enables all features supported by the accelerator in the current host\n")


LISTINGS = {"version": version_text, "help": help_text, "device": device_help, "machine": machine_help,
            "accel": accel_help, "cpu": cpu_help}


# ---- running ------------------------------------------------------------------------------------
def _modules(config: Config) -> list[tuple[str, bytes, str]]:
    from .images import read_image

    if not config.initrd:
        return []
    modules = []
    for spec in split_opts(config.initrd):
        path, _, args = spec.partition(" ")
        modules.append((path, read_image(path, 1 << 32), args))
    return modules


def _check_memory(config: Config) -> None:
    import psutil

    from .x86 import layout

    if config.mem < layout.MIN_MEM_SIZE:
        raise UsageError(f"-m {config.mem >> 20}M: pykvm-qemu needs at least {layout.MIN_MEM_SIZE >> 20} MiB")
    if config.mem > layout.MMIO_WINDOW:
        raise UsageError(f"-m {config.mem >> 20}M: pykvm-qemu puts all RAM below {layout.MMIO_WINDOW >> 20} MiB "
                         "(the PCI window); no RAM above 4 GiB yet")
    available = psutil.virtual_memory().total
    if config.mem > available:
        raise UsageError(f"-m {config.mem >> 20}M: more than this host's {available >> 20} MiB of RAM")


def _serial_stream(config: Config, opened: list):
    """The stream COM1 writes to, and whether the UART exists at all."""
    if config.serial:
        return config.chardevs[config.serial[0]].open(opened), True
    if config.nographic:
        return sys.stdout.buffer, True
    if not config.defaults:
        return None, False  # -nodefaults: no serial port at all
    return None, True  # QEMU's default serial goes to its (absent) display


def _run_once(config: Config, kernel: bytes, modules, opened: list):
    from .devices.acpi_pm import Suspend
    from .machine import Machine

    serial, has_uart = _serial_stream(config, opened)
    console = config.chardevs[config.debugcon].open(opened) if config.debugcon else None
    debugcons, exits_at = [], []
    for dev in config.devices:
        if dev.name == "isa-debugcon":
            debugcons.append((int(dev.props.get("iobase", "0xe9"), 0), config.chardevs[dev.props["chardev"]]))
        if dev.name == "isa-debug-exit":
            exits_at.append((int(dev.props.get("iobase", "0x501"), 0), int(dev.props.get("iosize", "2"), 0)))
    def cpuid(entries):
        from .x86.cpuid import edit_features

        entries, warnings = edit_features(entries, config.cpu_features)
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        return entries

    if config.cpu_model in CPU_MODELS_AS_HOST:
        print(f"{PROG}: warning: -cpu {config.cpu_model} is taken as -cpu host (the CPUID KVM offers)", file=sys.stderr)
    with Machine(config.mem, cpus=config.cpus, irqchip=True, pit=config.pit, strict=False, console=console,
                 cpuid=cpuid) as m:
        if not config.pit_reinject and config.pit:
            m.vm.reinject_control(False)
        m.add_qemu_pc(
            serial if has_uart else False, cmdline=config.append, ecam=config.machine.startswith(("q35", "pc-q35")),
            debug_exits=exits_at, debugcons=[(port, dev.open(opened)) for port, dev in debugcons],
            pc_testdev=any(d.name == "pc-testdev" for d in config.devices),
            pci_testdevs=sum(d.name == "pci-testdev" for d in config.devices),
        )
        m.load_kernel(kernel, path=config.kernel, cmdline=config.append, modules=modules)
        if config.gdb:
            from .gdbstub import GdbServer

            server = GdbServer(m, config.gdb, wait=config.wait_gdb)
            host, port = server.listen()
            print(f"{PROG}: gdb server on {host}:{port}", file=sys.stderr)
            server.start()
            return server.run()
        outcome = m.run()
        while isinstance(outcome, Suspend):  # ACPI S3: asleep until a wake event, then on from the waking vector
            m.woken.wait()
            m.resume_from_s3()
            outcome = m.run()
        return outcome


_signals: list[int] = []  # the signal that ends the run (SIGINT unless _terminate saw another)


def _terminate(signum, frame):
    _signals.append(signum)
    raise KeyboardInterrupt


def _host_vendor() -> str | None:
    """The CPU vendor string the guest sees (the host's CPUID leaf 0, as KVM passes it on)."""
    from .probe.cpuid import vendor
    from .probe.hostcpu import host_cpuid

    table = host_cpuid()[0]
    return vendor(table) if table is not None else None


def run(config: Config) -> int:
    from .devices.i8042 import Reset
    from .images import ImageError, read_image
    from .loaders import detect_image
    from .machine import GuestError, GuestInterrupted

    if config.kernel is None:
        raise UsageError("no -kernel: pykvm-qemu has no firmware to boot a disk; give the kernel with -kernel")
    _check_memory(config)
    if config.cpu_vendor is not None:
        mine = _host_vendor()
        if config.cpu_vendor != mine:
            raise UsageError(f"-cpu vendor={config.cpu_vendor}: this host's CPU is {mine}; pykvm-qemu cannot "
                             "change the vendor")
    try:
        kernel = read_image(config.kernel, config.mem)
    except ImageError as e:  # QEMU's words: runners check a command line with a kernel that is not there
        raise UsageError(f"could not load kernel '{config.kernel}': {e}") from None
    kind = detect_image(kernel, name=config.kernel)
    if kind == "flat":
        bzimage = kernel[0x202:0x206] == b"HdrS"
        hint = " (a Linux bzImage: the Linux boot protocol is not implemented yet)" if bzimage else ""
        raise UsageError(f"-kernel {config.kernel}: not a multiboot or ELF kernel{hint}")
    if config.initrd and kind != "multiboot":
        raise UsageError(f"-initrd {config.initrd}: modules need a multiboot kernel; {config.kernel} is {kind}")
    modules = _modules(config)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    who = f" ({config.name})" if config.name else ""
    while True:
        opened: list = []
        try:
            outcome = _run_once(config, kernel, modules, opened)
        except KeyboardInterrupt:
            print(f"{PROG}{who}: terminating on signal {(_signals or [signal.SIGINT.value])[-1]}", file=sys.stderr)
            return st.INTERRUPTED
        except GuestError as e:
            if isinstance(e, GuestInterrupted):  # QEMU's line (runners look for it), then where the guest was
                signum = (_signals or [signal.SIGINT.value])[-1]
                print(f"{PROG}{who}: terminating on signal {signum}", file=sys.stderr)
                print(f"{PROG}{who}: the guest was stopped here:" + ("\n" + e.state.format() if e.state else ""),
                      file=sys.stderr)
            else:
                print(f"{PROG}{who}: {e.report()}", file=sys.stderr)
            return st.of_error(e)
        finally:
            for f in opened:
                f.close()
            sys.stdout.flush()
        if isinstance(outcome, Reset) and not config.no_reboot:
            continue  # as QEMU: a reset boots the kernel again
        if outcome.failure is not None:
            print(f"{PROG}{who}: {outcome.failure}", file=sys.stderr)
        return 0 if isinstance(outcome, Reset) else outcome.exit_status


def main(argv: list[str] | None = None) -> int:
    from .ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError

    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_args(argv)
        if config.listing:
            sys.stdout.write(LISTINGS[config.listing]())
            return 0
        return run(config)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_BAD_COMMAND_LINE
    except (KvmUnavailableError, KvmUnsupportedError) as e:
        print(f"{PROG}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_BAD_COMMAND_LINE  # QEMU: "failed to initialize kvm", status 1
    except KvmError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return st.HOST_FAILURE
    except (ValueError, OSError) as e:  # a file named on the command line, a malformed image
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_BAD_COMMAND_LINE


if __name__ == "__main__":
    sys.exit(main())
