"""``Machine``: a ready VM (memory, vCPUs, interrupt controllers, devices) and its run loop.

The run loop is the policy layer. Every exit goes to a handler: port and MMIO ranges on the bus,
MSRs (through KVM's MSR filter and user-space MSR exits), hypercalls (KVM_EXIT_HYPERCALL, or the
hypercall port where the backend cannot exit on VMCALL), and other exit kinds by type. The guest's
DONE / FAIL on the call port (or a device such as isa-debug-exit) end the run with an
:class:`Outcome`; anything unexpected (an exit nobody handles, a triple fault, an unhandled
exception vector, a timeout, a handler that raises) raises a :class:`GuestError` that carries the
vCPU's registers and the code at RIP. With several vCPUs each runs in its own thread, blocking
in KVM_RUN with the GIL released; the first to finish stops the others.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from collections import defaultdict, deque
from typing import BinaryIO, Callable

from . import exits
from .devices.bus import Bus
from .outcome import GuestFailure, Outcome
from .constants import (
    EXIT_IO_OUT,
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    MSR_EXIT_REASON_FILTER,
    MSR_FILTER_READ,
    MSR_FILTER_WRITE,
    Cap,
    InternalErrorSub,
)
from .devices.debugcon import DebugConsole
from .devices.ioapic import PINS as IOAPIC_PINS
from .devices.ioapic import Ioapic
from .ioctl import KvmError, KvmUnsupportedError
from .dirty import enable_ring as enable_dirty_ring
from .dirty import wants_ring as dirty_wants_ring
from .stats import Counters
from .report import CpuState, decode, read_virtual, read_virtual_cstring
from .system import Kvm
from .x86 import layout
from .x86.cpuid import guest_cpuid, has_la57
from .x86.modes import Mode, code_bits, setup_mode
from .x86.tables import vector_name


BP_VECTOR = 3  # #BP, the breakpoint exception INT3 raises
CR0_TS_MP = 0x0A  # CR0.TS | CR0.MP: FWAIT raises #NM when both are set
FSW_ES = 0x80  # x87 status word: an unmasked exception is pending (FWAIT raises #MF)


class GuestError(Exception):
    """The guest stopped in a way nobody handles; ``state`` holds its registers and code at RIP."""

    def __init__(self, message: str, state: CpuState | None = None, exit: exits.Exit | None = None):
        super().__init__(message)
        self.state = state
        self.exit = exit

    def report(self) -> str:
        text = str(self)
        return text + ("\n" + self.state.format() if self.state else "")


class UnexpectedExit(GuestError):
    """An exit no handler answers (an unclaimed port or MMIO address, an internal error...)."""


class TripleFault(UnexpectedExit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted."""


class GuestException(GuestError):
    """The guest took an exception vector it has no handler for (reported by pykvm's stubs)."""

    def __init__(self, message, state=None, exit=None, *, vector: int, error_code: int, rip: int):
        super().__init__(message, state, exit)
        self.vector, self.error_code, self.rip = vector, error_code, rip


@dataclasses.dataclass(frozen=True)
class Paused(Outcome):
    """:meth:`Machine.pause` stopped the run between exits: not the guest's word (status 0,
    ``via`` "pause"); :meth:`Machine.run` goes on from there, or :meth:`Machine.snapshot` saves it."""


class GuestTimeout(GuestError):
    """The run outlived its timeout and was stopped (immediate_exit + a signal)."""


class GuestInterrupted(GuestError):
    """The user interrupted the run (Ctrl-C); the guest was stopped where it was."""


class HandlerError(GuestError):
    """A Python handler raised while answering an exit; the VM was stopped. ``__cause__`` is the error."""


def describe_exit(exit: exits.Exit) -> str:
    """One line naming an exit and its key fields."""
    if isinstance(exit, (exits.IoOut, exits.IoIn)):
        data = f", data={bytes(exit.data).hex()}" if isinstance(exit, exits.IoOut) else ""
        return f"{type(exit).__name__}(port={exit.port:#x}, size={exit.size}, count={exit.count}{data})"
    if isinstance(exit, exits.MmioWrite):
        return f"MmioWrite(gpa={exit.gpa:#x}, data={exit.data.hex()})"
    if isinstance(exit, exits.MmioRead):
        return f"MmioRead(gpa={exit.gpa:#x}, size={exit.size})"
    if isinstance(exit, exits.InternalError):
        insn = f", insn={exit.insn_bytes.hex(' ')}" if exit.insn_bytes else ""
        return f"InternalError({exit.suberror_name}, data={[hex(d) for d in exit.data]}{insn})"
    return repr(exit)


#: GSI routing as on a PC (and QEMU): GSIs 0-15 to the PICs (2 is the cascade) and GSIs 0-23 to the
#: IOAPIC, where ISA IRQ0 (the PIT) arrives on pin 2, as the ACPI and MP tables' override says.
PC_GSI_ROUTES = [
    (gsi, IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE, gsi % 8) for gsi in range(16) if gsi != 2
] + [(gsi, IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi) for gsi in range(24) if gsi != 2]


COALESCED = " (coalesced)"  # the stats key suffix of writes read from the coalesced ring
# struct kvm_coalesced_mmio_ring: first, last (u32 each), then entries of struct kvm_coalesced_mmio
# (phys_addr u64, len u32, pio u32, data[8]) to the end of the page (KVM_COALESCED_MMIO_MAX).
_COALESCED_HEAD = 8
_COALESCED_ENTRY = struct.Struct("<QII8s")
_COALESCED_SLOTS = (layout.PAGE_SIZE - _COALESCED_HEAD) // _COALESCED_ENTRY.size


class ExitStats:
    """Exits counted per exit kind and per bus range, and timed (the Python handling time of each,
    from the handler's call to its return, trace included) when the machine's :attr:`Machine.time_exits`
    is on (``pykvm run --stats``); otherwise ``seconds`` stays 0."""

    def __init__(self) -> None:
        self.count: defaultdict[str, int] = defaultdict(int)
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.count[key] += 1
        self.seconds[key] += seconds

    def merge(self, other: ExitStats) -> None:
        for key, n in other.count.items():
            self.count[key] += n
            self.seconds[key] += other.seconds[key]

    def rows(self) -> list[tuple[str, int, float]]:
        """(key, count, seconds), most frequent first."""
        return sorted(((k, n, self.seconds[k]) for k, n in self.count.items()), key=lambda r: (-r[1], r[0]))


class Machine:
    """A VM with ``mem_size`` bytes of RAM at GPA 0, ``cpus`` vCPUs, and the host-protocol devices.

    ``irqchip`` creates KVM's in-kernel PIC, IOAPIC and local APICs (needed for interrupts and
    for more than one vCPU; HLT is then handled in the kernel), ``pit`` its i8254 timer (default:
    with the irqchip). ``irqchip="split"`` keeps only the local APICs in the kernel
    (KVM_CAP_SPLIT_IRQCHIP) and puts a Python IOAPIC (:attr:`ioapic`) at 0xFEC00000; KVM then
    has no PIC and no PIT.

    ``strict`` (the default, for pykvm's own guests) stops the run at a port or MMIO address no
    device claims (:class:`UnexpectedExit`); ``strict=False`` answers them as QEMU's PC does
    unassigned I/O: port reads give all ones, MMIO reads 0, writes are dropped (each counted under "unassigned port"
    or "unassigned mmio" in :attr:`stats`), which kernels written for QEMU rely on.

    ``cpuid``, given KVM's supported CPUID (a CpuidEntry list), returns what the vCPUs get
    (e.g. :func:`pykvm.x86.cpuid.edit_features`); the default gives them all of it.
    """

    def __init__(
        self,
        mem_size: int = layout.DEFAULT_MEM_SIZE,
        *,
        cpus: int = 1,
        irqchip: bool | str = False,
        pit: bool | None = None,
        kvm: Kvm | None = None,
        console: BinaryIO | None = None,
        console_limit: int = 1 << 20,
        trace: Callable[[exits.Exit], None] | None = None,
        strict: bool = True,
        cpuid: Callable[[list], list] | None = None,
        ram_backing=None,
        dirty: str | None = None,
    ):
        if mem_size < layout.MIN_MEM_SIZE or mem_size % layout.PAGE_SIZE:
            raise ValueError(
                f"guest memory must be a multiple of 4 KiB and at least {layout.MIN_MEM_SIZE >> 20} MiB, "
                f"not {mem_size:#x}"
            )
        if mem_size > layout.MMIO_WINDOW:
            raise ValueError(f"guest memory above {layout.MMIO_WINDOW:#x} would cover the MMIO window")
        if irqchip not in (False, True, "split"):
            raise ValueError(f"irqchip must be True, False or 'split', not {irqchip!r}")
        if irqchip == "split" and pit:
            raise ValueError("the split irqchip has no in-kernel PIT (KVM_CREATE_PIT2 needs KVM's IOAPIC and PIC)")
        if dirty not in (None, "auto", "ring", "bitmap"):
            raise ValueError(f"dirty must be None, 'auto', 'ring' or 'bitmap', not {dirty!r}")
        if cpus < 1 or (cpus > 1 and not irqchip):
            raise ValueError(f"{cpus} vCPUs: need at least 1, and more than 1 needs the in-kernel irqchip")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vcpus: list = []
        self.virtio: list = []  # virtio-mmio transports (add_virtio), in slot order
        try:
            self.vm = self.kvm.create_vm()
            self.ram = self.vm.add_memory(0, mem_size, backing=ram_backing)
            if irqchip == "split":  # before any vCPU: their LAPICs are created in the kernel
                if not self.vm.has_cap(Cap.SPLIT_IRQCHIP):
                    raise KvmUnsupportedError("this KVM has no split irqchip (KVM_CAP_SPLIT_IRQCHIP)")
                self.vm.enable_cap(Cap.SPLIT_IRQCHIP, IOAPIC_PINS)
            elif irqchip:
                self.vm.create_irqchip()
                self.vm.set_gsi_routing(PC_GSI_ROUTES)
                if pit is not False:
                    self.vm.create_pit2()
            self._has_pit = bool(irqchip is True and pit is not False)
            ring = dirty is not None and dirty_wants_ring(self.vm, dirty)
            if ring:
                enable_dirty_ring(self.vm)  # before the first vCPU, or KVM refuses it
            self.supported_cpuid = self.kvm.supported_cpuid()
            offered = self.supported_cpuid if cpuid is None else cpuid(list(self.supported_cpuid))
            #: The CPUID the vCPUs were given (before each one's APIC id is put in). KVM_GET_CPUID2
            #: is not asked instead: kvm_pvm answers it with the host's feature bits ORed in.
            self.cpuid = list(offered)
            for i in range(cpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(guest_cpuid(offered, i))
                self.vcpus.append(vcpu)
        except BaseException:
            self.close()
            raise
        self.vcpu = self.vcpus[0]
        self.irqchip = irqchip
        self.memory = self.vm.memory
        self.debugcon = DebugConsole(console, port=layout.CONSOLE_PORT, limit=console_limit)
        self.syncs: list[int] = []
        self.on_sync: Callable[[int], None] | None = None
        self.trace = trace
        self.strict = strict
        self.hint_nops_completed = 0  # instructions KVM's emulator failed on that complete_hint_nop did
        #: Called as ``after_exit(exit, vcpu)`` in the vCPU's thread after every exit a handler answered
        #: (set it before :meth:`run`). A debugger uses it to end a single step as soon as the instruction
        #: that exited completes (some backends lose the step trap across an exit to user space).
        self.after_exit: Callable[[exits.Exit, object], None] | None = None
        self.stats = ExitStats()
        #: Time each exit's handling into :attr:`stats` (two clock reads an exit; off by default).
        self.time_exits = False
        self.kvm_stats: dict[str, int] = {}
        self._counters: list[Counters] | None = None  # the stats fds, opened by the first run
        self._counters_offered: bool | None = None  # False once KVM_GET_STATS_FD failed
        self.bus = Bus()
        self._devices: list = []
        self.bus.add_port(layout.CONSOLE_PORT, self.debugcon.io, name="console")
        self.bus.add_port(layout.CALL_PORT, self._call_port, name="call port")
        self.bus.add_port(layout.EXCEPTION_PORT, self._exception_port, name="exception stubs")
        self.bus.add_port(layout.HYPERCALL_PORT, self._hypercall_port, name="hypercall port")
        self._msr_handlers: dict[int, tuple[Callable | None, Callable | None]] = {}
        self._hypercalls: dict[int, Callable] = {}
        self._exit_handlers: dict[type, Callable] = {exits.InternalError: self._internal_error}
        self._stop_reason: str | None = None
        self._finished = threading.Event()
        self._stopping = False  # _finished.is_set(), read by the run loop without a call
        self._msr_labels: dict[int, str] = {}
        self._running = False
        self.ioapic: Ioapic | None = None
        if irqchip == "split":
            # MSI routes on GSIs 0-23 tell KVM which vectors are level-triggered: it exits on their EOI.
            self.ioapic = Ioapic(self.vm.signal_msi, set_routes=lambda msi: self.vm.set_gsi_routing([], msi), id=cpus)
            self.add_device(self.ioapic)
            self.on_exit(exits.IoapicEoi, self.ioapic.eoi_exit)
            for port in (0x20, 0xA0):  # no 8259s: a guest masking them (as most do) writes to nothing
                self.on_port(port, _absent, count=2, name="8259 PIC (absent)")
        self._coalesced = False
        self._ring_lock = threading.Lock()
        #: Which pages were written since the last look (:mod:`pykvm.dirty`), with ``dirty``; a
        #: :meth:`checkpoint` starts the bitmap one when there is none.
        self.dirty = None
        if dirty is not None:
            self._track_dirty(ring)
        self._checkpoint = None
        #: How this machine was built, as data: what a snapshot needs to build it again elsewhere
        #: (the constructor's arguments, then each platform call). Handlers registered from Python
        #: (on_port, on_msr, ...) are code, not data: whoever restores registers them again.
        self.recipe: dict = {"mem_size": mem_size, "cpus": cpus, "irqchip": irqchip, "pit": pit,
                             "strict": strict, "console_limit": console_limit, "platform": []}
        self._pause_requested = False
        self._serving = False  # in a stop of a run that serves a request
        #: Where a live migration (:mod:`pykvm.migration`) moved this machine, and its report: a
        #: machine that moved does not run here again.
        self.migrated_to: str | None = None
        self.migration = None
        self._requests: deque = deque()  # (fn, Future) asked by request() during a run
        self._request_lock = threading.RLock()  # RLock: request() may come from a signal handler in run()'s thread

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        for transport in getattr(self, "virtio", ()):
            transport.close()  # stops its worker and takes its eventfds back while the VM is still open
        for device in getattr(self, "_devices", ()):
            closer = getattr(device, "close", None)
            if closer is not None:
                closer()  # devices with timer threads (the RTC, the ACPI PM timer) stop them
        if getattr(self, "_counters", None):
            self._close_counters()
        if getattr(self, "dirty", None) is not None:
            self.dirty.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- loading and set-up -------------------------------------------------------------------
    def load(self, image: bytes, gpa: int) -> None:
        """Copy a flat image into guest RAM at ``gpa``."""
        if not image:
            raise ValueError("the guest image is empty")
        end = gpa + len(image)
        if gpa < 0 or not self.ram.contains(gpa, len(image)):
            raise ValueError(
                f"an image of {len(image)} bytes at {gpa:#x} (ends {end:#x}) does not fit in guest memory "
                f"({self.ram.gpa:#x}-{self.ram.end:#x}); use a larger --mem or another --load"
            )
        self.memory.write(gpa, image)

    def setup(self, mode: Mode | str, entry: int, *, la57: bool = False) -> None:
        """Put the boot vCPU in ``mode`` at ``entry`` (tables written into guest memory)."""
        mode = Mode(mode)
        if la57 and mode is not Mode.LONG:
            raise ValueError("5-level paging (la57) needs long mode")
        if la57 and not has_la57(self.supported_cpuid):
            raise KvmUnsupportedError("this host's KVM offers no LA57 (5-level paging) to guests")
        if not self.ram.contains(entry):
            raise ValueError(f"entry point {entry:#x} is outside guest memory ({self.ram.gpa:#x}-{self.ram.end:#x})")
        setup_mode(self.vcpu, self.memory, mode, entry, la57)

    def load_flat(self, image: bytes, mode: Mode | str = Mode.LONG, *, load: int | None = None,
                  entry: int | None = None, la57: bool = False) -> None:
        """Load a flat image and set the vCPU up to enter it (defaults: the mode's load address)."""
        from .loaders import system_ranges

        mode = Mode(mode)
        load = mode.default_load if load is None else load
        for r in system_ranges(mode):  # the set-up writes its tables after the image: they may not meet
            if load < r.end and r.start < load + len(image):
                raise ValueError(f"an image at {load:#x}-{load + len(image):#x} would overlap pykvm's {mode.value}-mode "
                                 f"system tables at {r.start:#x}-{r.end:#x}; load it elsewhere (--load)")
        self.load(image, load)
        self.setup(mode, load if entry is None else entry, la57=la57)

    def load_kernel(self, data: bytes, *, path: str, cmdline: str = "", modules=(), mode: Mode | str | None = None,
                    load: int | None = None, entry: int | None = None, la57: bool = False) -> str:
        """Load an image of any format pykvm detects by content and set the boot vCPU up to enter it.

        A multiboot kernel is loaded as QEMU's ``-kernel`` does (its modules are ``(path, bytes,
        args)``), an ELF executable at its physical segment addresses (entered in long mode if it is
        ELF64, else protected mode, unless ``mode`` says otherwise), a flat image at ``load``.
        Returns the format: "multiboot", "elf" or "flat"."""
        from .loaders import detect_image, load_elf, load_multiboot, parse_elf, setup_multiboot, system_ranges

        kind = detect_image(data, name=path)
        if kind != "multiboot" and (cmdline or modules):
            raise ValueError(f"{path}: a command line and modules need a multiboot kernel; this is a {kind} image")
        if kind == "multiboot":
            if mode is not None or load is not None or entry is not None:
                raise ValueError(f"{path}: a multiboot kernel names its own load address, entry and mode "
                                 "(drop --mode, --load and --entry)")
            info = load_multiboot(self.memory, data, path=path, cmdline=cmdline, modules=modules,
                                  mem_size=self.ram.size)
            setup_multiboot(self.vcpu, self.memory, info)
        elif kind == "elf":
            if load is not None:
                raise ValueError(f"{path}: an ELF image is loaded at its own segment addresses (drop --load)")
            mode = Mode(mode) if mode else (Mode.LONG if parse_elf(data, name=path).bits == 64 else Mode.PROTECTED)
            image = load_elf(self.memory, data, name=path, reserved=system_ranges(mode))
            self.setup(mode, image.entry if entry is None else entry, la57=la57)
        else:
            self.load_flat(data, mode or Mode.LONG, load=load, entry=entry, la57=la57)
        return kind

    def add_pc_devices(self, serial: BinaryIO | None = None, *, cmdline: str = "", tables: bool = True):
        """The PC devices small kernels expect: a 16550 UART on COM1 (IRQ 4, output to ``serial``),
        isa-debug-exit on port 0xf4, fw_cfg (RAM size, CPUs, command line; DMA into guest memory),
        the CMOS/RTC with the memory size, the i8042's reset line, and the POST-code port 0x80;
        with ``tables``, ACPI and MP tables in the BIOS area that describe the CPUs and the IOAPIC.
        Returns the UART."""
        from .devices.cmos import Cmos
        from .devices.debug_exit import DebugExit
        from .devices.fw_cfg import FwCfg
        from .devices.i8042 import I8042
        from .devices.postcode import PostCode
        from .devices.uart import Uart16550
        from .x86.acpi import build_acpi
        from .x86.mptable import build_mptable

        self.recipe["platform"].append(["pc_devices", {"cmdline": cmdline, "tables": tables}])
        ncpus = len(self.vcpus)
        uart = Uart16550(serial, irq=self.irq(4) if self.irqchip else None)
        fw_cfg = FwCfg(self.ram.size, ncpus, memory=self.memory)
        if cmdline:
            fw_cfg.set_cmdline(cmdline)
        for device in (uart, DebugExit(), fw_cfg, Cmos(below_4g=self.ram.size, ncpus=ncpus), I8042(), PostCode()):
            self.add_device(device)
        if tables:
            build_acpi(ncpus).write(self.memory)
            build_mptable(ncpus).write(self.memory)
        return uart

    def add_qemu_pc(self, serial: BinaryIO | None | bool = None, *, cmdline: str = "", ecam: bool = True,
                    debug_exits=((0xF4, 4),), debugcons=(), pc_testdev: bool = False, pci_testdevs: int = 0,
                    firmware: bool = True):
        """QEMU's PC (``-machine pc``) as far as test kernels use it, for ``pykvm-qemu``: COM1
        (``serial`` False: none), the i8042, fw_cfg, the RTC/CMOS with its interrupt, the PCI host
        bridge (0xCF8/0xCFC, and with ``ecam`` the ECAM window the MCFG announces) with the
        PIIX3 ISA bridge and its reset control at 0xCF9, the ACPI PM block (PM timer, PM1, S5
        power-off) with the FADT, FACS and DSDT that describe it, ``isa-debug-exit`` at each
        (iobase, iosize) of ``debug_exits``, ``isa-debugcon`` at each (port, stream) of
        ``debugcons``, QEMU's ``pc-testdev`` and ``pci_testdevs`` ``pci-testdev`` functions. PCI
        resources are assigned, and the interrupt vector table, the 8259s and the PIT set up
        (:mod:`pykvm.x86.bios`), as SeaBIOS leaves them before a ``-kernel`` guest starts. Build the
        machine with ``strict=False`` for QEMU's unassigned I/O. The DSDT describes the virtio-mmio
        transports added before this call (:meth:`add_virtio`). With ``firmware=False`` nothing
        is written into guest RAM or the in-kernel devices (no IVT, no tables, no PIT set-up): a
        restore puts its own back. Returns the :class:`PciHost` (its UART, if any, is :attr:`uart`)."""
        # the streams are not data: a restore names its own (the console, the serial port; the
        # debug consoles on other ports lose their output)
        self.recipe["platform"].append(["qemu_pc", {
            "serial": serial is not False, "cmdline": cmdline, "ecam": ecam,
            "debug_exits": [list(d) for d in debug_exits], "debugcons": [port for port, _stream in debugcons],
            "pc_testdev": pc_testdev, "pci_testdevs": pci_testdevs}])
        from .devices.acpi_pm import AcpiPm
        from .devices.cmos import Cmos
        from .devices.debug_exit import DebugExit
        from .devices.fw_cfg import FwCfg
        from .devices.i8042 import I8042
        from .devices.pc_testdev import PcTestdev
        from .devices.pci import ECAM_BASE, PciHost
        from .devices.pci_testdev import PciTestDev
        from .devices.reset import SystemControlB, reset_control_reset
        from .devices.uart import Uart16550
        from .x86.acpi import build_acpi
        from .x86.bios import leave_firmware_state
        from .x86.mptable import build_mptable

        if not self.irqchip or self.ioapic is not None:
            raise ValueError("QEMU's PC needs KVM's in-kernel irqchip (Machine(irqchip=True))")
        ncpus = len(self.vcpus)
        if firmware:
            leave_firmware_state(self.vm, self.memory, pit=self._has_pit)
        self.uart = None
        if serial is not False:
            self.uart = Uart16550(serial or None, irq=self.irq(4))
            self.add_device(self.uart)
        fw_cfg = FwCfg(self.ram.size, ncpus, memory=self.memory)
        if cmdline:
            fw_cfg.set_cmdline(cmdline)
        host = PciHost(self.irq, self.vm.signal_msi, reset=reset_control_reset, ecam_base=ECAM_BASE if ecam else None)
        pm = AcpiPm(irq=self.irq(9))
        self.acpi_pm = pm
        self.woken = threading.Event()  # set when a wake event ends an ACPI S3 sleep (resume_from_s3)

        def rtc_alarm() -> None:
            sleeping = pm.sleep_state is not None
            if pm.wakeup("rtc") and sleeping:
                self.woken.set()

        cmos = Cmos(below_4g=self.ram.size, ncpus=ncpus, irq=self.irq(8), wakeup=rtc_alarm)
        devices = [fw_cfg, cmos, I8042(), pm, host, SystemControlB(pit=self.vm if self._has_pit else None)]
        devices += [DebugExit(iobase, iosize) for iobase, iosize in debug_exits]
        # QEMU's PC has none of pykvm's protocol ports (its pc-testdev sits on 0xE8-0xEB): a guest
        # finds isa-debugcon only where the command line put one.
        for port in (layout.CONSOLE_PORT, layout.CALL_PORT, layout.EXCEPTION_PORT, layout.HYPERCALL_PORT):
            self.bus.remove_port(port)
        for port, stream in debugcons:
            if port == layout.CONSOLE_PORT:  # the machine's console: console_output keeps capturing it
                self.debugcon.output.stream = stream
                self.bus.add_port(port, self.debugcon.io, name="isa-debugcon")
            else:
                devices.append(DebugConsole(stream, port=port))
        if pc_testdev:
            devices.append(PcTestdev(irq=self.irq))
        for device in devices:
            self.add_device(device)
        for _ in range(pci_testdevs):
            host.add(PciTestDev())
        host.assign_resources()
        self.acpi = build_acpi(ncpus, platform="pc", ecam_base=host.ecam_base,
                               ecam_buses=(host.ecam_bus_start, host.ecam_bus_end),
                               virtio_mmio=tuple((t.gpa, t.size, t.irq) for t in self.virtio))
        if firmware:
            self.acpi.write(self.memory)
            build_mptable(ncpus).write(self.memory)
        self.pci = host
        return host

    def resume_from_s3(self) -> None:
        """After a run that ended in ACPI S3 (:class:`~pykvm.devices.acpi_pm.Suspend`) and a wake
        event (:attr:`woken`): the vCPUs as a resume from S3 leaves them (the firmware's path on a
        PC). The boot CPU starts in real mode at the FACS's firmware waking vector (CS = vector >> 4,
        IP = vector & 0xF), the others wait for a SIPI again; RAM and devices keep their state."""
        from .constants import MpState
        from .x86.acpi import FACS_WAKING_VECTOR
        from .x86.modes import setup_regs, setup_sregs

        vector = struct.unpack_from("<I", self.memory.read(self.acpi.tables["FACS"] + FACS_WAKING_VECTOR, 4))[0]
        if not vector:
            raise UnexpectedExit("the guest woke from S3 with no firmware waking vector in the FACS",
                                 CpuState.capture(self.vcpu, self.memory))
        sregs = self.vcpu.get_sregs()
        setup_sregs(sregs, Mode.REAL)
        sregs.cs.selector, sregs.cs.base = vector >> 4, (vector >> 4) << 4
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        setup_regs(regs, Mode.REAL, vector & 0xF)
        self.vcpu.set_regs(regs)
        for vcpu in self.vcpus[1:]:
            vcpu.set_mp_state(MpState.INIT_RECEIVED)

    # ---- handlers -------------------------------------------------------------------------------
    def add_device(self, device) -> None:
        """Put a device (``pykvm.devices``) on the bus: every port and MMIO range it declares. The
        machine closes it (if it has ``close``) when it closes."""
        device.attach(self.bus)
        self._devices.append(device)

    def add_virtio(self, device):
        """Put a virtio backend (:mod:`pykvm.virtio`) on the machine behind a virtio-mmio transport at
        the next slot (``layout.VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE``, GSI ``layout.VIRTIO_IRQS[i]``),
        its queue notifications on KVM ioeventfds and its interrupt on an irqfd. Returns the
        :class:`~pykvm.virtio.mmio.VirtioMmio` (its ``cmdline_arg`` tells a guest where it is); the
        machine closes it. Needs KVM's in-kernel irqchip."""
        from .virtio.mmio import VirtioMmio

        if self.irqchip is not True:
            raise ValueError("virtio devices need KVM's in-kernel irqchip (Machine(irqchip=True)): their "
                             "interrupts go through an irqfd" + (", which the split irqchip's Python IOAPIC "
                                                                 "does not see" if self.irqchip else ""))
        slot = len(self.virtio)
        if slot >= len(layout.VIRTIO_IRQS):
            raise ValueError(f"no free virtio-mmio slot: a machine has {len(layout.VIRTIO_IRQS)}")
        transport = VirtioMmio(device, self.memory, layout.VIRTIO_MMIO_BASE + slot * layout.VIRTIO_MMIO_SIZE,
                               layout.VIRTIO_IRQS[slot], vm=self.vm)
        try:
            # a device model like the others: its state is saved with theirs, in the order added
            self.add_device(transport)
        except BaseException:
            transport.close()
            raise
        # how to build the backend again (pykvm.snapshot.build_machine), or None where it is not
        # data (a function, a host input fd): such a machine is not snapshotted or moved
        self.recipe["platform"].append(["virtio", device.recipe()])
        transport.resume_when = lambda: self.in_run  # a parked worker (a snapshot's) goes on when the vCPUs do
        self.virtio.append(transport)
        return transport

    def irq(self, gsi: int) -> Callable[[int], None]:
        """A function that sets interrupt line ``gsi`` (1 raised, 0 lowered) on the irqchip: KVM's
        (KVM_IRQ_LINE), or with the split irqchip the Python IOAPIC's pin for ``gsi`` (as
        PC_GSI_ROUTES: GSI 0 on pin 2, GSI 2 is the PIC cascade)."""
        if not self.irqchip:
            raise ValueError("interrupt lines need the in-kernel irqchip (Machine(irqchip=True))")
        if self.ioapic is not None:
            pin = {g: p for g, chip, p in PC_GSI_ROUTES if chip == IRQCHIP_IOAPIC}.get(gsi)
            if pin is None:
                raise ValueError(f"GSI {gsi} reaches no IOAPIC pin (0-23; 2 is the PIC cascade)")
            return self.ioapic.irq(pin)
        return lambda level: self.vm.irq_line(gsi, level)

    def on_port(self, port: int, handler: Callable, count: int = 1, name: str | None = None) -> None:
        """Answer port I/O on [port, port + count) with ``handler(exit, vcpu)``."""
        self.bus.add_port(port, handler, count, name)

    def on_mmio(self, gpa: int, size: int, handler: Callable, name: str | None = None) -> None:
        """Answer MMIO on [gpa, gpa + size) with ``handler(exit, vcpu)``."""
        self.bus.add_mmio(gpa, size, handler, name)

    def coalesce_mmio(self, gpa: int, size: int) -> None:
        """Batch guest writes to [gpa, gpa + size) in KVM's coalesced ring instead of exiting on each;
        the machine hands them to the range's bus handler (in order) at the next exit. For
        write-only registers: a read there still exits at once. Wraps KVM_REGISTER_COALESCED_MMIO."""
        self._coalesce(gpa, size, pio=False)

    def coalesce_pio(self, port: int, size: int) -> None:
        """As :meth:`coalesce_mmio`, for port writes (KVM_CAP_COALESCED_PIO)."""
        self._coalesce(port, size, pio=True)

    def _coalesce(self, addr: int, size: int, *, pio: bool) -> None:
        if not self.kvm.has_cap(Cap.COALESCED_PIO if pio else Cap.COALESCED_MMIO) or self.vcpu.coalesced_ring is None:
            raise KvmUnsupportedError(f"this KVM has no coalesced {'PIO' if pio else 'MMIO'}")
        self.vm.register_coalesced_mmio(addr, size, pio=pio)
        self._coalesced = True

    def _drain_coalesced(self, vcpu, stats: ExitStats):
        """Hand every write waiting in the coalesced ring to its handler, oldest first; returns the
        first Outcome a handler gives (the rest of the ring stays for the next drain). Entries are
        unpacked from the ring's page in one call each and routed through the bus's dictionaries,
        as the run loop routes exits; the ring's head is stored back once, also when a handler raises."""
        ring, view = vcpu.coalesced_ring, vcpu.coalesced_view
        unpack, route = _COALESCED_ENTRY.unpack_from, self._route
        ports, mmio_routes, mmio_route = self.bus._ports, self.bus._mmio_hits, self.bus.mmio_route
        io_exit, mmio_exit, count = exits.io_exit, exits.mmio_exit, stats.count
        with self._ring_lock:  # one ring per VM, drained by whichever vCPU exits
            first = ring.first
            try:
                while first != ring.last:
                    gpa, length, pio, data = unpack(view, _COALESCED_HEAD + _COALESCED_ENTRY.size * first)
                    first = (first + 1) % _COALESCED_SLOTS
                    if length < 8:
                        data = data[:length]
                    if pio:
                        exit = io_exit(EXIT_IO_OUT, len(data), gpa, 1, data)
                        r = ports.get(gpa)
                    else:
                        exit = mmio_exit(gpa, 1, data)
                        r = mmio_routes.get(gpa) or mmio_route(gpa)
                    handler, key = (r[0], r[4]) if r is not None else route(exit)
                    result = self._handle(handler, exit, vcpu)
                    count[key + COALESCED] += 1
                    if result is not None:
                        return result
            finally:
                ring.first = first
        return None

    def _handle(self, handler, exit, vcpu):
        """Call ``handler`` for ``exit``: its result, or a HandlerError naming the exit if it raises."""
        if handler is None:
            self._unexpected(exit, vcpu)
        try:
            return handler(exit, vcpu)
        except GuestError:
            raise
        except Exception as e:
            raise self._handler_error(exit, vcpu, e) from e

    def _handler_error(self, exit, vcpu, e: Exception) -> HandlerError:
        return HandlerError(f"the handler for {describe_exit(exit)} raised {type(e).__name__}: {e}",
                            CpuState.capture(vcpu, self.memory), exit)

    def on_msr(self, index: int, read: Callable | None = None, write: Callable | None = None) -> None:
        """Emulate MSR ``index`` in Python: ``read(vcpu) -> value`` and ``write(vcpu, value)``.

        A handler that returns ``False`` (write) or ``None`` (read) makes the guest take #GP. KVM's
        MSR filter sends exactly these accesses to user space (KVM_CAP_X86_USER_SPACE_MSR); up to
        16 MSRs can be emulated."""
        if read is None and write is None:
            raise ValueError("on_msr needs a read or a write handler")
        if index not in self._msr_handlers and len(self._msr_handlers) == 16:
            raise ValueError("KVM's MSR filter has 16 ranges: at most 16 MSRs can be emulated in Python")
        if not self.kvm.has_cap(Cap.X86_USER_SPACE_MSR) or not self.kvm.has_cap(Cap.X86_MSR_FILTER):
            raise KvmUnsupportedError("this KVM cannot send MSR accesses to user space (KVM_CAP_X86_USER_SPACE_MSR)")
        if not self._msr_handlers:
            self.vm.enable_cap(Cap.X86_USER_SPACE_MSR, MSR_EXIT_REASON_FILTER)
        self._msr_handlers[index] = (read, write)
        self.vm.x86_set_msr_filter([
            ((MSR_FILTER_READ if r else 0) | (MSR_FILTER_WRITE if w else 0), i, 1, b"\0")  # a 0 bit denies: exit
            for i, (r, w) in self._msr_handlers.items()
        ])

    def on_hypercall(self, nr: int, handler: Callable) -> None:
        """Answer hypercall ``nr`` with ``handler(vcpu, args) -> return value`` (args: RBX, RCX, RDX, RSI).

        Reached by VMCALL/VMMCALL where KVM exits on that hypercall (KVM_CAP_EXIT_HYPERCALL, which
        today covers KVM_HC_MAP_GPA_RANGE), and always through the hypercall port (a 32-bit ``out``
        of the number to HYPERCALL_PORT, same registers, the return value in RAX)."""
        self._hypercalls[nr] = handler
        mask = self.kvm.check_extension(Cap.EXIT_HYPERCALL)
        wanted = sum(1 << n for n in self._hypercalls if n < 64 and mask >> n & 1)
        if wanted:
            self.vm.enable_cap(Cap.EXIT_HYPERCALL, wanted)

    def on_exit(self, kind: type, handler: Callable) -> None:
        """Answer exits of class ``kind`` (e.g. ``exits.SystemEvent``) that no other route takes.

        ``exits.Intr`` (KVM_RUN interrupted: a :meth:`~pykvm.vcpu.Vcpu.kick` or a stray signal) is
        ignored unless a handler is set; a debugger uses one to park a vCPU it asked to pause."""
        self._exit_handlers[kind] = handler

    # ---- the host protocol --------------------------------------------------------------------
    @property
    def console_output(self) -> bytes:
        """The newest bytes the guest wrote to the console (at most ``console_limit``)."""
        return self.debugcon.captured

    @property
    def console_dropped(self) -> int:
        """Console bytes written but no longer kept in :attr:`console_output`."""
        return self.debugcon.dropped

    def _read_string(self, vcpu, gva: int) -> str:
        return read_virtual_cstring(vcpu, self.memory, gva).decode("utf-8", "replace") if gva else ""

    def _call_port(self, exit, vcpu):
        if isinstance(exit, exits.IoIn):
            exit.reply(0)
            return None
        call = exit.value
        regs = vcpu.get_regs()
        if call == layout.CALL_DONE:
            return Outcome(regs.rbx & 0xFFFFFFFF)
        if call == layout.CALL_FAIL:
            return Outcome(1, GuestFailure(regs.rbx & 0xFFFFFFFF, regs.rcx, self._read_string(vcpu, regs.rsi)))
        if call == layout.CALL_SYNC:
            value = regs.rbx & 0xFFFFFFFF
            self.syncs.append(value)
            if self.on_sync is not None:
                self.on_sync(value)
            return None
        if call == layout.CALL_PRINT:
            self.debugcon.emit(self._read_string(vcpu, regs.rsi).encode())
            return None
        raise UnexpectedExit(f"unknown call {call:#x} on the call port", CpuState.capture(vcpu, self.memory), exit)

    def _hypercall_port(self, exit, vcpu):
        if isinstance(exit, exits.IoIn):
            exit.reply(0)
            return None
        regs = vcpu.get_regs()
        ret = self._hypercall(vcpu, exit, regs.rax & 0xFFFFFFFF, (regs.rbx, regs.rcx, regs.rdx, regs.rsi))
        regs.rax = ret
        vcpu.set_regs(regs)
        return None

    def _hypercall(self, vcpu, exit, nr: int, args: tuple[int, ...]) -> int:
        handler = self._hypercalls.get(nr)
        if handler is None:
            raise UnexpectedExit(f"hypercall {nr} has no handler", CpuState.capture(vcpu, self.memory), exit)
        return int(handler(vcpu, args)) & 0xFFFFFFFFFFFFFFFF

    def _exception_port(self, exit, vcpu):
        state = CpuState.capture(vcpu, self.memory)
        sregs = vcpu.get_sregs()
        width = code_bits(sregs) // 8
        fmt = {2: "<4H", 4: "<4I", 8: "<4Q"}[width]
        frame = read_virtual(vcpu, self.memory, sregs.ss.base + state.regs["rsp"], 4 * width)
        if len(frame) < 4 * width:
            raise GuestException("the guest took an exception but its stack is unreadable", state, exit,
                                 vector=-1, error_code=0, rip=state.regs["rip"])
        vector, error_code, rip, cs = struct.unpack(fmt, frame)
        vector &= 0xFF
        cr2 = f", cr2={state.control['cr2']:#x}" if vector == 14 else ""
        raise GuestException(
            f"guest exception {vector_name(vector)} (vector {vector}) at rip={rip:#x} cs={cs:#x}, "
            f"error code {error_code:#x}{cr2}; no handler in the guest",
            state, exit, vector=vector, error_code=error_code, rip=rip,
        )

    # ---- dispatch -------------------------------------------------------------------------------
    def _route(self, exit):
        """(handler, stats key) for an exit; handler None when nobody answers it."""
        kind = type(exit)
        if kind is exits.IoOut or kind is exits.IoIn:
            route = self.bus.port_route(exit.port)
            if route:
                return route.handler, route.label
            return (None, f"port {exit.port:#x}") if self.strict else (_unassigned, "unassigned port")
        if kind is exits.MmioWrite or kind is exits.MmioRead:
            route = self.bus.mmio_route(exit.gpa)
            if route:
                return route.handler, route.label
            return (None, f"mmio {exit.gpa:#x}") if self.strict else (_unassigned, "unassigned mmio")
        if kind is exits.X86Rdmsr or kind is exits.X86Wrmsr:
            label = self._msr_labels.get(exit.index)
            if label is None:
                label = self._msr_labels[exit.index] = f"msr {exit.index:#x}"
            return (self._msr if exit.index in self._msr_handlers else None), label
        if kind is exits.Hypercall:
            return (self._kvm_hypercall if exit.nr in self._hypercalls else None), f"hypercall {exit.nr}"
        return self._exit_handlers.get(kind), kind.__name__

    def _msr(self, exit, vcpu):
        read, write = self._msr_handlers[exit.index]
        msr = vcpu.kvm_run.msr  # complete_rdmsr / complete_wrmsr, without their calls
        if type(exit) is exits.X86Rdmsr:
            value = read(vcpu) if read else None
            if value is None:
                msr.data, msr.error = 0, 1
            else:
                msr.data, msr.error = value, 0
        else:
            msr.error = int(write is None or write(vcpu, exit.data) is False)

    def _kvm_hypercall(self, exit, vcpu):
        vcpu.complete_hypercall(self._hypercall(vcpu, exit, exit.nr, exit.args))

    def complete_hint_nop(self, exit, vcpu) -> bool:
        """Where KVM's instruction emulator gave up on an instruction whose effect is trivial, do
        it and say True: the hint NOPs (``nop r/m``, 0F 18-1F, the PREFETCH hints); while CR4.CET
        is off, ENDBR32/64 and RDSSPD/Q (which leave their register alone without CET); CLAC/STAC
        at CPL0 (RFLAGS.AC cleared / set). kvm_pvm runs guest CPL0 code through that emulator,
        which lacks them; Xen's and CET-built kernels use them. Also FWAIT where it raises nothing
        (Linux's FPU set-up runs one). Anything else: False, and the failure stands."""
        if exit.suberror != InternalErrorSub.EMULATION or not exit.insn_bytes:
            return False
        sregs = vcpu.get_sregs()
        bits = code_bits(sregs)
        regs = vcpu.get_regs()
        insn = decode(exit.insn_bytes, regs.rip, bits)
        if insn is None:
            return False
        cet = sregs.cr4 >> 23 & 1
        if insn.mnemonic in ("clac", "stac") and sregs.cs.selector & 3 == 0:  # CPL0 only (#UD otherwise)
            regs.rflags = regs.rflags | RFLAGS_AC if insn.mnemonic == "stac" else regs.rflags & ~RFLAGS_AC
        elif insn.mnemonic == "wait":
            # FWAIT does nothing unless it must raise #NM (CR0.TS and CR0.MP) or #MF (an unmasked
            # x87 exception pending: FSW.ES): those are left to fail
            if sregs.cr0 & CR0_TS_MP == CR0_TS_MP or vcpu.get_fpu().fsw & FSW_ES:
                return False
        elif not (insn.mnemonic == "nop" or insn.mnemonic.startswith("prefetch")
                  or (not cet and insn.mnemonic in ("endbr32", "endbr64", "rdsspd", "rdsspq"))):
            return False
        regs.rip = (regs.rip + insn.size) & ((1 << bits) - 1)
        vcpu.set_regs(regs)
        self.hint_nops_completed += 1
        return True

    def complete_int3(self, exit, vcpu) -> bool:
        """Where KVM's instruction emulator gave up on INT3 (0xCC), do what the processor does:
        raise #BP as a trap, the return address after the instruction, through KVM's exception
        injection (KVM_SET_VCPU_EVENTS), and say True. kvm_pvm runs guest CPL0 code through that
        emulator, which has no INT3; Linux's boot runs one (the alternatives' INT3 self-test) and
        text patching depends on it. Anything else: False."""
        if exit.suberror != InternalErrorSub.EMULATION or exit.insn_bytes[:1] != b"\xcc":
            return False
        regs = vcpu.get_regs()
        regs.rip = (regs.rip + 1) & ((1 << code_bits(vcpu.get_sregs())) - 1)
        vcpu.set_regs(regs)
        events = vcpu.get_vcpu_events()
        events.exception.injected, events.exception.nr = 1, BP_VECTOR
        events.exception.has_error_code, events.exception.error_code = 0, 0
        vcpu.set_vcpu_events(events)
        self.hint_nops_completed += 1
        return True

    def _internal_error(self, exit, vcpu):
        if not (self.complete_hint_nop(exit, vcpu) or self.complete_int3(exit, vcpu)):
            self._unexpected(exit, vcpu)

    def _unexpected(self, exit, vcpu):
        state = CpuState.capture(vcpu, self.memory)
        if isinstance(exit, exits.Shutdown):
            message = "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"
            if state.is_reset_state:  # kvm_amd re-initialises the VMCB at a SHUTDOWN intercept
                message += ("; KVM had already reset the vCPU when pykvm read it (kvm_amd does so at a "
                            "shutdown intercept), so these are the reset registers, not the faulting ones")
            raise TripleFault(message, state, exit)
        if isinstance(exit, exits.Hlt):
            raise UnexpectedExit("the guest halted with nothing to wake it (HLT, no interrupts)", state, exit)
        raise UnexpectedExit(f"unexpected exit: {describe_exit(exit)}", state, exit)

    # ---- running ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a :meth:`run` is in progress (its vCPU threads may be in KVM_RUN)."""
        return self._running

    @property
    def in_run(self) -> bool:
        """Whether vCPUs may be in KVM_RUN now: a :meth:`run` is in progress and this is not one
        of its stops between exits that serve a :meth:`request` (where the machine can be
        snapshotted, checkpointed or reset as between runs)."""
        return self._running and not self._serving

    @property
    def stopping(self) -> bool:
        """Whether the current run is ending: a vCPU finished, or :meth:`stop` was called."""
        return self._stopping

    def _track_dirty(self, ring: bool) -> None:
        from .dirty import BitmapTracker, RingTracker

        if ring:
            self.dirty = RingTracker(self.vm, self.ram, self.memory, self.vcpus)
            self.on_exit(exits.DirtyRingFull, self.dirty.ring_full)
        else:
            self.dirty = BitmapTracker(self.vm, self.ram, self.memory)

    def checkpoint(self):
        """Remember the whole machine now (between runs) for :meth:`reset`: the vCPUs, the
        in-kernel devices, the device models and a copy of guest RAM; dirty tracking starts
        (the bitmap, unless the machine was built with ``dirty``). Returns the checkpoint."""
        from .snapshot import Checkpoint

        if self.in_run:
            raise RuntimeError("a checkpoint is taken between runs: pause the machine first (Machine.pause)")
        if self.dirty is None:
            self._track_dirty(ring=False)
        self._checkpoint = Checkpoint.take(self)
        return self._checkpoint

    def reset(self) -> dict:
        """Put the machine back as it was at :meth:`checkpoint`: only the pages written since
        (by the guest or by pykvm) are copied back, then the vCPU and device state. Between runs
        only. Returns {"pages": how many pages were copied back, "seconds": ...}."""
        if self._checkpoint is None:
            raise RuntimeError("reset needs a checkpoint first (Machine.checkpoint)")
        if self.in_run:
            raise RuntimeError("a reset needs the vCPUs stopped: pause the machine first (Machine.pause)")
        return self._checkpoint.restore(self)

    def pause(self) -> None:
        """Make a running :meth:`run` return :class:`Paused` soon, from any thread or a signal
        handler: every vCPU stops between exits, and the machine can be snapshotted
        (:meth:`snapshot`) or run on. Asked between runs, it makes the next run return Paused
        at once (a pause is never lost to a run that was just starting)."""
        self._pause_requested = True
        self._halt_vcpus()

    def _halt_vcpus(self) -> None:
        self._stopping = True
        self._finished.set()
        for vcpu in self.vcpus:
            vcpu.kick()

    def sleep(self, seconds: float) -> bool:
        """Sleep in an exit handler (pacing a guest, waiting for a device) for ``seconds``, but
        wake as soon as the run is asked to stop, pause or serve a :meth:`request`, so that
        those are not held up; True when woken so."""
        return self._finished.wait(seconds)

    def request(self, fn: Callable[[], object]):
        """Call ``fn()`` with every vCPU stopped between exits, from any thread or a signal
        handler; returns a Future of its result. During a :meth:`run` the vCPUs are stopped
        (as by :meth:`pause`, the exit being handled answered first), ``fn`` is called in the
        thread that called run(), and the run goes on, unless ``fn`` returned an :class:`Outcome`:
        then the run ends with it (a migration's source ends so). Between runs ``fn`` is called
        at once, in the caller's thread. What ``fn`` raises goes to the Future, not to the run."""
        from concurrent.futures import Future  # not at import: pykvm run's start-up does without it

        future = Future()
        with self._request_lock:
            if self._running:
                self._requests.append((fn, future))
                self._halt_vcpus()
                return future
        self._serve(fn, future)
        return future

    @staticmethod
    def _serve(fn, future):
        if not future.set_running_or_notify_cancel():
            return None
        try:
            result = fn()
        except BaseException as e:  # the caller's, through the Future
            future.set_exception(e)
            return None
        future.set_result(result)
        return result

    def _serve_requests(self) -> Outcome | None:
        """Serve the requests made during a run (the vCPUs are stopped); the first Outcome a
        request returns ends the run, and the requests after it are served between runs."""
        while True:
            with self._request_lock:
                if not self._requests:
                    return None
                fn, future = self._requests.popleft()
            self._serving = True
            try:
                result = self._serve(fn, future)
            finally:
                self._serving = False
            if isinstance(result, Outcome):
                return result

    def snapshot(self, path) -> dict:
        """Save the whole machine (vCPUs, in-kernel devices, device models, guest memory) to
        ``path`` (:mod:`pykvm.snapshot`); only between runs. Returns sizes and times."""
        from .snapshot import save_machine

        return save_machine(self, path)

    @classmethod
    def from_snapshot(cls, path, *, kvm: Kvm | None = None, console: BinaryIO | None = None,
                      serial: BinaryIO | None = None, trace=None) -> Machine:
        """A machine built again from a snapshot file, in the state it was saved in: :meth:`run`
        goes on from there. ``console`` and ``serial`` are where its debug console and UART
        write now. Raises :class:`pykvm.snapshot.SnapshotError` for a file that cannot be used here."""
        from .snapshot import restore_machine

        return restore_machine(cls, path, kvm=kvm, console=console, serial=serial, trace=trace)

    def stop(self, reason: str = "stopped") -> None:
        """Stop a running :meth:`run` from any thread (it raises GuestTimeout with ``reason``)."""
        self._stop_reason = reason
        self._stopping = True
        self._finished.set()
        for vcpu in self.vcpus:
            vcpu.kick()

    def _loop(self, vcpu, stats: ExitStats):
        """Run one vCPU until an outcome (returned), an error (raised) or another vCPU finishing (None)."""
        counts = defaultdict(int)  # folded into stats when the loop ends (an exit is counted once answered)
        try:
            return self._exits(vcpu, stats, counts)
        finally:
            for key, n in counts.items():
                stats.count[key] += n

    def _exits(self, vcpu, stats: ExitStats, counts):
        # The hot loop: everything it reads per exit is bound here, port and MMIO routes come from
        # the bus's dictionaries (kept current by add/remove, so a BAR moving mid-run is seen), the
        # handler is called in place (what _handle does), and clocks are read only with time_exits.
        run, route, trace, after = vcpu.run, self._route, self.trace, self.after_exit
        clock, seconds, timing = time.perf_counter, stats.seconds, self.time_exits
        ports, mmio_routes, mmio_route = self.bus._ports, self.bus._mmio_hits, self.bus.mmio_route
        io_out, io_in, mmio_write, mmio_read, intr = exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead, exits.Intr
        exit_handlers = self._exit_handlers
        while True:
            exit = run()
            if self._coalesced:
                result = self._drain_coalesced(vcpu, stats)
                if result is not None:
                    return result
            kind = type(exit)
            pausing = False
            if self._stopping:
                if self._stop_reason:
                    raise GuestTimeout(self._stop_reason, CpuState.capture(vcpu, self.memory), exit)
                if not (self._pause_requested or self._requests) or kind is intr:
                    return None
                pausing = True  # answer this exit first: a pause loses no I/O

            if kind is io_out or kind is io_in:
                r = ports.get(exit.port)
                handler, key = (r[0], r[4]) if r is not None else route(exit)
            elif kind is mmio_write or kind is mmio_read:
                r = mmio_routes.get(exit.gpa) or mmio_route(exit.gpa)
                handler, key = (r[0], r[4]) if r is not None else route(exit)
            elif kind is intr:
                handler = exit_handlers.get(intr)
                if handler is None:
                    continue  # a signal meant for someone else
                key = "Intr"
            else:
                handler, key = route(exit)
            if handler is None:
                self._unexpected(exit, vcpu)
            if timing:
                start = clock()
            if trace is not None:
                trace(exit)
            try:
                result = handler(exit, vcpu)
            except GuestError:
                raise
            except Exception as e:
                raise self._handler_error(exit, vcpu, e) from e
            counts[key] += 1
            if timing:
                seconds[key] += clock() - start
            if result is not None:
                return result
            if after is not None:
                after(exit, vcpu)
            if pausing:
                return None

    def _run_vcpu(self, vcpu, results: list, stats: ExitStats) -> None:
        try:
            result = self._loop(vcpu, stats)
        except KeyboardInterrupt:
            result = GuestInterrupted("interrupted (Ctrl-C)", CpuState.capture(vcpu, self.memory))
        except BaseException as e:  # handed to the thread that called run()
            result = e
        if result is not None:
            results.append(result)
            self._stopping = True
            self._finished.set()
            for other in self.vcpus:
                if other is not vcpu:
                    other.kick()

    def run(self, timeout: float | None = None) -> Outcome:
        """Run the guest until it says DONE or FAIL (or a device ends the run). Raises
        :class:`GuestError` for anything else. With several vCPUs, the first to finish stops all.
        :meth:`pause` makes it return :class:`Paused`; :meth:`request` calls a function between
        exits and goes on."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if self.migrated_to is not None:
            raise RuntimeError(f"this machine has moved to {self.migrated_to}: it runs there now")
        self._stop_reason = None
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.stop, (f"the guest ran past the {timeout:g} s timeout",))
            timer.daemon = True
            timer.start()
        results: list = []
        stats = [ExitStats() for _ in self.vcpus]
        before = self._kvm_counters()
        start = time.monotonic()
        with self._request_lock:
            self._running = True
        try:
            while True:
                self._finished.clear()
                # a pause or request asked just before this run still stops it: the flags are
                # read after _stopping is cleared, and pause() sets its flag before _stopping
                self._stopping = False
                if self._pause_requested or self._requests or self._stop_reason:
                    self._stopping = True
                threads = [threading.Thread(target=self._run_vcpu, args=(v, results, s), name=f"vcpu{v.id}",
                                            daemon=True) for v, s in zip(self.vcpus[1:], stats[1:])]
                for t in threads:
                    t.start()
                self._run_vcpu(self.vcpu, results, stats[0])
                for t in threads:
                    t.join()
                if results or self._stop_reason or not self._requests:
                    break
                ended = self._serve_requests()  # every vCPU is stopped between exits
                if ended is not None:
                    results.append(ended)
                    break
        finally:
            with self._request_lock:
                self._running = False
            if timer is not None:
                timer.cancel()
            stream = self.debugcon.output.stream
            if stream is not None:
                stream.flush()
            self._serve_requests()  # any that came as the run ended: the machine is stopped now
        run_stats = ExitStats()
        for s in stats:
            run_stats.merge(s)
        self.stats.merge(run_stats)
        self.kvm_stats = {k: v - before.get(k, 0) for k, v in self._kvm_counters().items() if v != before.get(k, 0)}
        if not results and self._pause_requested and not self._stop_reason:
            results.append(Paused(0, via="pause"))
        self._pause_requested = False
        first = results[0] if results else GuestTimeout(self._stop_reason or "stopped",
                                                       CpuState.capture(self.vcpu, self.memory))
        if isinstance(first, BaseException):
            raise first
        exits_this_run = sum(n for key, n in run_stats.count.items() if not key.endswith(COALESCED))
        return dataclasses.replace(first, exits=exits_this_run, seconds=time.monotonic() - start)

    @property
    def exit_count(self) -> int:
        """Exits to user space so far (writes taken from the coalesced ring are not exits)."""
        return sum(n for key, n in self.stats.count.items() if not key.endswith(COALESCED))

    def _kvm_counters(self) -> dict[str, int]:
        """KVM's cumulative statistics summed over the VM and its vCPUs (empty if unsupported). The
        stats fds are opened at the first call and kept until :meth:`close`."""
        totals: dict[str, int] = defaultdict(int)
        if self._counters_offered is False:
            return {}
        try:
            if self._counters is None or len(self._counters) != 1 + len(self.vcpus):
                self._close_counters()
                self._counters = []
                for obj in (self.vm, *self.vcpus):
                    self._counters.append(Counters(obj))
            for counters in self._counters:
                for name, value in counters.read().items():
                    totals[name] += value
        except (KvmError, OSError, ValueError):
            self._close_counters()
            self._counters_offered = False  # not asked again
            return {}
        return dict(totals)

    def _close_counters(self) -> None:
        for counters in self._counters or ():
            counters.close()
        self._counters = None


RFLAGS_AC = 1 << 18


def _unassigned(exit, vcpu) -> None:
    """What QEMU 7.2's PC does with an access nobody decodes: port reads give all ones, MMIO reads
    0 (memory.c ``unassigned_mem_read``), writes are dropped."""
    if isinstance(exit, exits.IoIn):
        exit.reply(-1)
    elif isinstance(exit, exits.MmioRead):
        exit.reply(0)


def _absent(exit, vcpu) -> None:
    """An empty bus: writes vanish, reads float high."""
    if isinstance(exit, exits.IoIn):
        exit.reply(-1)

