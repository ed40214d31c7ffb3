"""A GDB remote serial protocol server for a :class:`~pykvm.machine.Machine` (``gdb``'s ``target remote``).

::

    server = GdbServer(machine, "127.0.0.1:1234", wait=True)   # before machine.run(): it installs exit hooks
    server.start()                  # listen; with wait=True, block until gdb attaches (the guest stays stopped)
    outcome = server.run(timeout)   # machine.run(), the end reported to gdb (W/X), then server.close()

or, around a ``machine.run()`` of your own, ``server.close(outcome_or_exception)``. Close the server
before the machine. Then ``gdb -ex 'target remote 127.0.0.1:1234'``.

What gdb sees
    One thread per vCPU (thread id = vCPU id + 1), all-stop: when one vCPU stops (breakpoint, step,
    Ctrl-C) every vCPU is paused (:meth:`Vcpu.kick`) and parks in its own thread, inside the
    machine's exit handlers, until gdb resumes it. Registers: the target description (``pykvm/gdb/*.xml``)
    is chosen when gdb attaches from the mode of vCPU 0: ``amd64`` in long mode, ``i386`` for 32-bit
    code, ``i8086`` (gdb disassembles 16-bit code) in real mode; each has the general registers, the
    segment selectors, fs_base/gs_base, cr0/cr2/cr3/cr4/cr8/efer (feature ``org.pykvm.x86.system``), and
    x87 and SSE from KVM_GET_FPU. Outside 64-bit code the pc gdb sees is linear, CS.base + rIP, so that
    breakpoints, ``x/i $pc`` and stepping agree with gdb's flat addresses in real mode with CS != 0.
    Memory addresses are guest-virtual (linear), translated through the selected vCPU's page tables
    (KVM_TRANSLATE); an unmapped page or a non-RAM address answers ``E14``. A vCPU that switches
    between 64-bit and 16/32-bit mode keeps the layout chosen at attach (reconnect, or pass ``arch``).

Breakpoints (Z0) on each backend
    The stub writes a one-byte breakpoint instruction into guest memory (reads by gdb see the original
    byte). On VMX/SVM hosts it is ``int3`` with KVM_GUESTDBG_USE_SW_BP: a KVM_EXIT_DEBUG (#BP). Under
    ``kvm_pvm`` every CPL0 instruction goes through KVM's instruction emulator, and ``int3`` does not
    exit: in protected and long mode the emulator fails on it, in real mode it delivers it through the
    guest's IVT. The stub plants ``icebp`` (0xF1) there instead, which the emulator fails on in every
    mode: the KVM_EXIT_INTERNAL_ERROR (emulation failure) whose instruction bytes start with the planted
    byte, at an address where the stub planted it, is the breakpoint hit (RIP still at the breakpoint).
    Hardware breakpoints (Z1, DR0-DR3) exit as KVM_EXIT_DEBUG on every backend (under kvm_pvm the
    emulator checks DR7 before each CPL0 instruction). Watchpoints (Z2-Z4) need data breakpoints, which
    kvm_pvm's emulator never checks: there the stub answers them with an empty packet (unsupported)
    and gdb reports that it could not insert the watchpoint (``set can-use-hw-watchpoints 0`` gives
    gdb's own single-stepping watchpoints). Code at CPL3 runs natively under kvm_pvm: neither kind of
    breakpoint stops it, and its single-step trap goes to the guest: the stub refuses to step a vCPU at
    CPL3 there (``E01``; a step from CPL0 into CPL3 stops at the next exit).

Single-step
    KVM_GUESTDBG_SINGLESTEP (with BLOCKIRQ where KVM has it, so a step does not wander into an
    interrupt handler). If the instruction exits to user space (port I/O, MMIO), the machine's
    ``after_exit`` hook kicks the vCPU so that the next KVM_RUN completes the instruction and returns
    at once: kvm_pvm loses the step trap after an ``out`` or an MMIO write and would run one more.

Robustness policy
    A packet with a bad checksum is answered ``-`` and not acted on; a packet longer than the
    advertised PacketSize is not buffered (its checksum is still checked) and is answered ``E22``;
    an unknown command gets the empty packet; bad arguments ``E22``; unreadable memory ``E14``. When
    gdb detaches (``D``) or the connection drops (EOF, even in the middle of a step), the stub removes
    its breakpoints, turns guest debugging off and lets every vCPU run on, as a detach; then it
    waits for the next gdb. ``k`` stops the run (``Machine.stop``). When the run ends while gdb waits
    for a stop, gdb gets ``W<status>`` (the guest's DONE/FAIL) or ``X<signal>`` (an error).
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from xml.etree import ElementTree

from . import exits
from .constants import (
    GUESTDBG_BLOCKIRQ,
    GUESTDBG_ENABLE,
    GUESTDBG_SINGLESTEP,
    GUESTDBG_USE_HW_BP,
    GUESTDBG_USE_SW_BP,
    Cap,
    InternalErrorSub,
)
from .ioctl import KvmError
from .machine import (
    GuestException,
    GuestInterrupted,
    GuestTimeout,
    Machine,
    TripleFault,
    UnexpectedExit,
    describe_exit,
)
from .memory import GuestMemoryError
from .outcome import Outcome
from .probe.host import kvm_backend
from .report import CpuState
from .x86.modes import CR0_PE, Mode, code_bits, cpu_mode

log = logging.getLogger(__name__)

#: The largest packet payload the stub accepts (advertised to gdb as PacketSize).
PACKET_SIZE = 0x4000
#: Packets gdb may queue while the guest runs before the stub drops the connection.
MAX_QUEUED = 64
#: Seconds a reply may wait for gdb to read before the stub drops the connection.
SEND_TIMEOUT = 10

SIGINT, SIGILL, SIGTRAP, SIGABRT, SIGKILL, SIGSEGV = 2, 4, 5, 6, 9, 11
EPERM, EFAULT, EINVAL, ENOSPC = 1, 14, 22, 28
INT3, ICEBP = 0xCC, 0xF1
DR6_BS = 1 << 14  # DR6: the #DB came from a single step
PAGE = 0x1000
KILLED = "killed from gdb"
_INTERRUPT = object()  # a Ctrl-C (0x03 byte) in the packet queue
_OVERSIZED = object()  # a packet longer than PACKET_SIZE


def _error(errno: int) -> bytes:
    """``E<errno>``, the errno in decimal digits as QEMU's stub sends it (E14 EFAULT, E22 EINVAL)."""
    return b"E%02d" % errno


class GdbError(Exception):
    """A request the stub refuses; answered ``E<errno>``."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or f"error {errno}")
        self.errno = errno


# ---- packet framing ------------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs``: a packet ready to send."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Escape ``$ # } *`` as ``}`` + byte ^ 0x20, for binary data in a packet."""
    return re.sub(rb"[$#}*]", lambda m: b"}" + bytes([m[0][0] ^ 0x20]), data)


def unescape_binary(data: bytes) -> bytes:
    return re.sub(rb"}(.)", lambda m: bytes([m[1][0] ^ 0x20]), data, flags=re.DOTALL)


class PacketParser:
    """Split a byte stream from gdb into events, keeping at most ``max_size`` payload bytes.

    :meth:`feed` returns a list of ``("packet", payload)``, ``("bad", None)`` (checksum mismatch),
    ``("oversized", None)`` (a well-formed packet over the limit), ``("interrupt", None)`` (0x03 between
    packets), ``("ack", None)`` and ``("nack", None)``."""

    def __init__(self, max_size: int = PACKET_SIZE):
        self.max_size = max_size
        self._state = "idle"  # idle | data | sum
        self._buf = bytearray()
        self._sum = 0
        self._over = False
        self._digits = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes | None]]:
        events: list[tuple[str, bytes | None]] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == "idle":
                c = data[i]
                i += 1
                if c == 0x24:  # $
                    self._state, self._sum, self._over = "data", 0, False
                    self._buf.clear()
                elif c == 0x03:
                    events.append(("interrupt", None))
                elif c == 0x2B:
                    events.append(("ack", None))
                elif c == 0x2D:
                    events.append(("nack", None))
                continue  # anything else between packets is noise
            if self._state == "data":
                end = data.find(b"#", i)
                chunk = data[i:] if end < 0 else data[i:end]
                self._sum += sum(chunk)
                room = self.max_size - len(self._buf)
                if len(chunk) > room:
                    self._over = True
                self._buf += chunk[: max(room, 0)]
                if end < 0:
                    return events
                i = end + 1
                self._state = "sum"
                self._digits.clear()
                continue
            self._digits.append(data[i])
            i += 1
            if len(self._digits) == 2:
                self._state = "idle"
                try:
                    good = int(self._digits, 16) == self._sum & 0xFF
                except ValueError:
                    good = False
                if not good:
                    events.append(("bad", None))
                elif self._over:
                    events.append(("oversized", None))
                else:
                    events.append(("packet", bytes(self._buf)))
        return events


# ---- target descriptions -------------------------------------------------------------------------
@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    regnum: int

    @property
    def size(self) -> int:
        return self.bits // 8


@dataclass(frozen=True)
class TargetDescription:
    """A gdb target description from ``pykvm/gdb/NAME.xml``, its includes inlined."""

    name: str
    architecture: str
    xml: bytes = field(repr=False)
    registers: tuple[Register, ...] = field(repr=False)

    def register(self, name: str) -> Register:
        return next(r for r in self.registers if r.name == name)


def _read_xml(name: str) -> str:
    return (resources.files(__package__) / "gdb" / name).read_text()


@cache
def target_description(name: str) -> TargetDescription:
    """``amd64``, ``i386`` or ``i8086``: the XML gdb gets as target.xml and its registers in order."""
    if name not in ("amd64", "i386", "i8086"):
        raise ValueError(f"no target description {name!r} (amd64, i386 or i8086)")

    def feature(m: re.Match) -> str:
        text = _read_xml(m[1])
        return text[text.index("<feature") :]  # drop the XML declaration, comment and DOCTYPE

    xml = re.sub(r'<xi:include href="([\w.-]+)"/>', feature, _read_xml(f"{name}.xml"))
    root = ElementTree.fromstring(xml)
    registers: list[Register] = []
    for reg in root.iter("reg"):
        regnum = int(reg.get("regnum", len(registers)))
        if regnum != len(registers):
            raise ValueError(f"{name}.xml: register {reg.get('name')} is numbered {regnum}, not {len(registers)}")
        registers.append(Register(reg.get("name", ""), int(reg.get("bitsize", "0")), regnum))
    return TargetDescription(name, root.findtext("architecture", ""), xml.encode(), tuple(registers))


def description_for(sregs) -> str:
    """The description for a vCPU's current mode: amd64 in long mode, else by code width."""
    if cpu_mode(sregs) is Mode.LONG:
        return "amd64"
    return "i8086" if code_bits(sregs) == 16 else "i386"


# ---- registers -----------------------------------------------------------------------------------
_GPR32 = {"eax": "rax", "ecx": "rcx", "edx": "rdx", "ebx": "rbx", "esp": "rsp", "ebp": "rbp", "esi": "rsi", "edi": "rdi"}
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def x87_full_tag(fpu) -> int:
    """The x87 tag word (2 bits a register) from FXSAVE's abridged one, as FSTENV would store it."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        kind = 3  # empty
        if fpu.ftwx >> phys & 1:
            raw = bytes(fpu.fpr[(phys - top) & 7][0:10])
            exponent = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mantissa = int.from_bytes(raw[0:8], "little")
            if exponent == 0x7FFF:
                kind = 2  # special
            elif exponent == 0:
                kind = 1 if mantissa == 0 else 2  # zero, or denormal (special)
            else:
                kind = 0 if mantissa >> 63 else 2  # valid, or unnormal (special)
        tag |= kind << (2 * phys)
    return tag


class RegisterFile:
    """A stopped vCPU's registers by gdb's names: read once, written back by group on :meth:`flush`."""

    def __init__(self, vcpu, memory):
        self.vcpu, self.memory = vcpu, memory
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self._fpu = None
        self._dirty: set[str] = set()

    @property
    def fpu(self):
        if self._fpu is None:
            self._fpu = self.vcpu.get_fpu()
        return self._fpu

    @property
    def wide(self) -> bool:
        """64-bit code: RIP is the pc; elsewhere the pc is linear (CS.base + rIP)."""
        return code_bits(self.sregs) == 64

    @property
    def pc(self) -> int:
        if self.wide:
            return self.regs.rip
        return (self.sregs.cs.base + self.regs.rip) & 0xFFFFFFFF

    def read(self, reg: Register) -> bytes:
        name = reg.name
        if name.startswith("st") and name[2:].isdigit():
            return bytes(self.fpu.fpr[int(name[2:])][0:10])
        if name.startswith("xmm"):
            return bytes(self.fpu.xmm[int(name[3:])][0:16])
        return (self._value(name) & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little")

    def _value(self, name: str) -> int:
        regs, sregs = self.regs, self.sregs
        if name in _GPR64:
            return getattr(regs, name)
        if name in _GPR32:
            return getattr(regs, _GPR32[name])
        if name in ("rip", "eip"):
            return self.pc
        if name == "eflags":
            return regs.rflags
        if name in _SEGMENTS:
            return getattr(sregs, name).selector
        if name in ("fs_base", "gs_base"):
            return getattr(sregs, name[:2]).base
        if name in _CONTROL:
            return getattr(sregs, name)
        fpu = self.fpu
        values = {
            "fctrl": fpu.fcw, "fstat": fpu.fsw, "ftag": x87_full_tag(fpu),
            "fiseg": fpu.last_ip >> 32 & 0xFFFF, "fioff": fpu.last_ip & 0xFFFFFFFF,
            "foseg": fpu.last_dp >> 32 & 0xFFFF, "fooff": fpu.last_dp & 0xFFFFFFFF,
            "fop": fpu.last_opcode, "mxcsr": fpu.mxcsr,
        }
        if name not in values:
            raise GdbError(EINVAL, f"no register {name}")
        return values[name]

    def write(self, reg: Register, data: bytes) -> None:
        """Set ``reg`` from gdb's little-endian bytes (applied on :meth:`flush`)."""
        if len(data) != reg.size:
            raise GdbError(EINVAL, f"{reg.name} takes {reg.size} bytes, not {len(data)}")
        name, value = reg.name, int.from_bytes(data, "little")
        regs, sregs = self.regs, self.sregs
        if name in _GPR64 or name in _GPR32:
            full = _GPR32.get(name, name)
            keep = getattr(regs, full) & ~((1 << reg.bits) - 1) if reg.bits < 64 else 0
            setattr(regs, full, keep | value)
            group = "regs"
        elif name in ("rip", "eip"):
            regs.rip = value if self.wide else (value - sregs.cs.base) & 0xFFFFFFFF
            group = "regs"
        elif name == "eflags":
            regs.rflags = regs.rflags & ~0xFFFFFFFF | value
            group = "regs"
        elif name in _SEGMENTS:
            if value != getattr(sregs, name).selector:
                self._load_segment(name, value & 0xFFFF)
            group = "sregs"
        elif name in ("fs_base", "gs_base"):
            getattr(sregs, name[:2]).base = value
            group = "sregs"
        elif name in _CONTROL:
            setattr(sregs, name, value)
            group = "sregs"
        elif name.startswith("st") and name[2:].isdigit():
            self.fpu.fpr[int(name[2:])][0:10] = data
            group = "fpu"
        elif name.startswith("xmm"):
            self.fpu.xmm[int(name[3:])][0:16] = data
            group = "fpu"
        elif name in _X87_CONTROL or name == "mxcsr":
            self._write_fpu_control(name, value)
            group = "fpu"
        else:
            raise GdbError(EINVAL, f"no register {name}")
        self._dirty.add(group)

    def _write_fpu_control(self, name: str, value: int) -> None:
        fpu = self.fpu
        if name == "fctrl":
            fpu.fcw = value & 0xFFFF
        elif name == "fstat":
            fpu.fsw = value & 0xFFFF
        elif name == "ftag":  # FXSAVE keeps one bit a register: not empty
            fpu.ftwx = sum(1 << i for i in range(8) if (value >> 2 * i) & 3 != 3)
        elif name in ("fiseg", "fioff"):
            shift, mask = (32, 0xFFFF) if name == "fiseg" else (0, 0xFFFFFFFF)
            fpu.last_ip = fpu.last_ip & ~(mask << shift) | (value & mask) << shift
        elif name in ("foseg", "fooff"):
            shift, mask = (32, 0xFFFF) if name == "foseg" else (0, 0xFFFFFFFF)
            fpu.last_dp = fpu.last_dp & ~(mask << shift) | (value & mask) << shift
        elif name == "fop":
            fpu.last_opcode = value & 0x7FF
        else:
            fpu.mxcsr = value

    def _load_segment(self, name: str, selector: int) -> None:
        """Load a selector as the CPU would: base = selector * 16 in real mode, else its GDT descriptor."""
        seg = getattr(self.sregs, name)
        if not self.sregs.cr0 & CR0_PE:
            seg.selector, seg.base = selector, selector << 4
            return
        if selector & 4:
            raise GdbError(EINVAL, "loading an LDT selector is not supported")
        index = selector & ~7
        if index == 0:
            if name in ("cs", "ss"):
                raise GdbError(EINVAL, f"a null selector in {name}")
            seg.selector, seg.unusable, seg.present = selector, 1, 0
            return
        gdt = self.sregs.gdt
        if index + 7 > gdt.limit:
            raise GdbError(EINVAL, f"selector {selector:#x} is past the GDT limit {gdt.limit:#x}")
        raw = read_linear(self.vcpu, self.memory, gdt.base + index, 8)
        if len(raw) < 8:
            raise GdbError(EFAULT, "the GDT is not readable")
        d = int.from_bytes(raw, "little")
        limit = (d & 0xFFFF) | (d >> 32 & 0xF0000)
        seg.g = d >> 55 & 1
        seg.limit = (limit << 12 | 0xFFF) if seg.g else limit
        seg.base = (d >> 16 & 0xFFFFFF) | (d >> 32 & 0xFF000000)
        seg.type, seg.s, seg.dpl, seg.present = d >> 40 & 0xF, d >> 44 & 1, d >> 45 & 3, d >> 47 & 1
        seg.avl, seg.l, seg.db = d >> 52 & 1, d >> 53 & 1, d >> 54 & 1
        seg.selector, seg.unusable = selector, 0

    def flush(self) -> None:
        """Write the changed groups back (KVM_SET_SREGS before KVM_SET_REGS, then KVM_SET_FPU)."""
        if "sregs" in self._dirty:
            self.vcpu.set_sregs(self.sregs)
        if "regs" in self._dirty:
            self.vcpu.set_regs(self.regs)
        if "fpu" in self._dirty:
            self.vcpu.set_fpu(self._fpu)
        self._dirty.clear()


# ---- guest memory by linear address ------------------------------------------------------------------
def _translate(vcpu, gva: int) -> int | None:
    try:
        tr = vcpu.translate(gva)
    except KvmError:
        return None
    return tr.physical_address if tr.valid else None


def read_linear(vcpu, memory, gva: int, size: int) -> bytes:
    """Up to ``size`` bytes at linear ``gva``: fewer at the first unmapped page or non-RAM address."""
    out = bytearray()
    while len(out) < size:
        addr = (gva + len(out)) & 0xFFFFFFFFFFFFFFFF
        gpa = _translate(vcpu, addr)
        if gpa is None:
            break
        chunk = min(size - len(out), PAGE - (addr & (PAGE - 1)))
        try:
            out += memory.read(gpa, chunk)
        except GuestMemoryError:
            break
    return bytes(out)


def write_linear(vcpu, memory, gva: int, data: bytes) -> None:
    """Write ``data`` at linear ``gva``, all or nothing (GdbError EFAULT if any page is not RAM)."""
    pieces = []
    done = 0
    while done < len(data):
        addr = (gva + done) & 0xFFFFFFFFFFFFFFFF
        chunk = min(len(data) - done, PAGE - (addr & (PAGE - 1)))
        gpa = _translate(vcpu, addr)
        if gpa is None or memory.region_at(gpa) is None or memory.region_at(gpa + chunk - 1) is None:
            raise GdbError(EFAULT, f"{addr:#x} is not mapped to guest RAM")
        pieces.append((gpa, data[done : done + chunk]))
        done += chunk
    for gpa, piece in pieces:
        memory.write(gpa, piece)


# ---- the server ------------------------------------------------------------------------------------
@dataclass
class Stop:
    """Why a vCPU stopped: the signal gdb gets, and the stop-reply key (swbreak, hwbreak) if any."""

    signal: int
    reason: str = ""


@dataclass
class _Breakpoint:
    gpa: int
    original: int


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1), ``[v6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad gdb address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1234 or :1234")
    return host, int(port)


class GdbServer:
    """Serve gdb's remote protocol for ``machine`` on ``address`` ("HOST:PORT", or a (host, port) pair;
    port 0 picks a free port, see :attr:`address`). Create it before :meth:`Machine.run`: it takes
    over the machine's Debug, InternalError and Intr exits and its ``after_exit`` hook.

    ``wait``: :meth:`start` blocks until gdb attaches and the guest does not run before gdb says so.
    Otherwise the guest runs at once and is paused when gdb attaches. ``arch`` forces a target
    description (amd64, i386, i8086) instead of the one for vCPU 0's mode at attach.

    It owns guest debugging (KVM_SET_GUEST_DEBUG): do not combine it with :class:`pykvm.trace.Tracer`,
    which single-steps every vCPU and answers Debug exits itself. A run ``timeout`` counts the time
    gdb keeps the guest stopped."""

    def __init__(self, machine: Machine, address: str | tuple[str, int] = "127.0.0.1:1234", wait: bool = True,
                 *, arch: str | None = None):
        if arch is not None:
            target_description(arch)
        self.machine = machine
        self.vcpus = list(machine.vcpus)
        self.wait = wait
        self.arch = arch
        self.backend = kvm_backend()
        #: The byte planted for a software breakpoint (see the module docstring).
        self.breakpoint_insn = ICEBP if self.backend == "kvm_pvm" else INT3
        #: Hardware data breakpoints: kvm_pvm's emulator checks only execution breakpoints.
        self.watchpoints_supported = self.backend != "kvm_pvm"
        supported = machine.vm.check_extension(Cap.SET_GUEST_DEBUG2) if machine.vm.has_cap(Cap.SET_GUEST_DEBUG) else 0
        self._blockirq = GUESTDBG_BLOCKIRQ if supported & GUESTDBG_BLOCKIRQ else 0
        self._requested = parse_address(address) if isinstance(address, str) else address
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._queue: deque = deque()
        self._eof = False
        self._noack = False
        self._last_sent = b""
        self._gdb_features: set[str] = set()
        # all-stop state, guarded by _cond
        self._attached = False
        self._closing = False
        self._hold: set[int] = set()  # vCPUs that must park at their next exit (a pause, or left out of a resume)
        self._parked: set[int] = set()
        self._resume: dict[int, str] = {}
        self._event: tuple[int, Stop] | None = None
        self._stepping: set[int] = set()
        self._stepped_exit: set[int] = set()
        self._result: Outcome | BaseException | None = None
        self._killed = False
        self._tdesc = target_description(arch or "amd64")
        self._g_thread = 0
        self._c_thread = -1
        self._sw: dict[int, _Breakpoint] = {}
        self._hw: dict[int, tuple[int, int, int]] = {}  # slot -> (address, rw, len) for DR0-DR3
        machine.on_exit(exits.Debug, self._on_debug)
        machine.on_exit(exits.InternalError, self._on_internal_error)
        machine.on_exit(exits.Intr, self._on_intr)
        machine.after_exit = self._after_exit

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (after :meth:`start`)."""
        if self._listener is None:
            return self._requested
        return self._listener.getsockname()[:2]

    @property
    def stopped(self) -> bool:
        """Whether gdb holds the guest stopped (after it attached, until it resumes or detaches)."""
        return self._attached and bool(self._hold)

    def listen(self) -> tuple[str, int]:
        """Bind and listen (done by :meth:`start` if not before); returns :attr:`address`."""
        if self._listener is None:
            host, port = self._requested
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, port), family=family)
        return self.address

    def start(self, timeout: float | None = None) -> None:
        """Listen; with ``wait``, block until gdb connects (TimeoutError after ``timeout`` seconds)."""
        self.listen()
        host, port = self.address
        conn = None
        if self.wait:
            self._listener.settimeout(timeout)
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                self._listener.close()
                raise TimeoutError(f"no gdb attached to {host}:{port} within {timeout:g} s") from None
            self._listener.settimeout(None)
            with self._cond:
                self._attached = True  # the session thread takes it from here; no vCPU runs meanwhile
                self._pause_all()
        self._thread = threading.Thread(target=self._serve, args=(conn,), name="gdbstub", daemon=True)
        self._thread.start()

    def close(self, result: Outcome | BaseException | None = None) -> None:
        """Tell gdb how the run ended (if it waits for a stop), detach and stop listening. Idempotent."""
        with self._cond:
            if result is not None and self._result is None:
                self._result = result
            self._closing = True
            self._cond.notify_all()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cond:
            self._end_session()

    def run(self, timeout: float | None = None) -> Outcome:
        """``machine.run(timeout)`` with the end reported to gdb, then :meth:`close`."""
        try:
            outcome = self.machine.run(timeout)
        except BaseException as e:
            self.close(e)
            raise
        self.close(outcome)
        return outcome

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close(exc[1])

    # ---- the vCPU side (in each vCPU's thread) -----------------------------------------------------
    def _on_debug(self, exit: exits.Debug, vcpu) -> None:
        if not self._attached:
            vcpu.set_guest_debug(0)  # left over from a gdb that went away
        elif exit.exception == 1 and exit.dr6 & 0xF and not exit.dr6 & DR6_BS:
            self._park(vcpu, Stop(SIGTRAP, "hwbreak"))
        elif exit.exception == 3:
            self._park(vcpu, Stop(SIGTRAP, "swbreak" if self._linear_pc(vcpu) in self._sw else ""))
        else:
            self._park(vcpu, Stop(SIGTRAP))  # a single step

    def _on_internal_error(self, exit: exits.InternalError, vcpu) -> None:
        trap = exit.suberror == InternalErrorSub.EMULATION and exit.insn_bytes[:1] in (bytes([ICEBP]), bytes([INT3]))
        if trap:
            pc = self._linear_pc(vcpu)
            if exit.insn_bytes[0] == self.breakpoint_insn and pc in self._sw and self._attached:
                self._park(vcpu, Stop(SIGTRAP, "swbreak"))  # our breakpoint; RIP is still at it
                return
            if read_linear(vcpu, self.machine.memory, pc, 1) not in (exit.insn_bytes[:1], b""):
                return  # a breakpoint removed since the emulator read it: run the original instruction
        if not trap and self.machine.complete_hint_nop(exit, vcpu):
            return  # an instruction KVM's emulator lacks that does nothing here (see Machine.complete_hint_nop)
        if self._attached:  # let gdb look at the failure; resuming ends the run as it would without gdb
            self._park(vcpu, Stop(SIGTRAP if trap else SIGILL))
        raise UnexpectedExit(f"unexpected exit: {describe_exit(exit)}", CpuState.capture(vcpu, self.machine.memory), exit)

    def _on_intr(self, exit: exits.Intr, vcpu) -> None:
        if self._killed:
            self.machine.stop(KILLED)  # gdb's kill came before the run began, which clears a stop
        elif vcpu.id in self._stepped_exit and self._attached:
            self._park(vcpu, Stop(SIGTRAP))  # the step's instruction exited to user space and has completed
        elif vcpu.id in self._hold:
            self._park(vcpu, None)  # a pause (Ctrl-C, another vCPU's stop, gdb attaching)

    def _after_exit(self, exit: exits.Exit, vcpu) -> None:
        if vcpu.id in self._stepping and type(exit) not in (exits.Debug, exits.InternalError, exits.Intr):
            self._stepped_exit.add(vcpu.id)
            vcpu.kick()  # not in KVM_RUN: only sets immediate_exit, so the next run completes the exit and returns

    def _park(self, vcpu, stop: Stop | None) -> None:
        """Stay here (the vCPU's thread, out of KVM_RUN) until gdb resumes this vCPU or the run ends.
        A ``stop`` is this vCPU's event: the first one since the resume is what gdb hears about."""
        with self._cond:
            if stop is not None and self._attached:
                if self._event is None:
                    self._event = (vcpu.id, stop)
                self._pause_all(but=vcpu)
            if vcpu.id not in self._hold or not self._attached:
                return
            self._parked.add(vcpu.id)
            self._cond.notify_all()
            try:
                while vcpu.id not in self._resume and not self.machine.stopping:
                    self._cond.wait(0.2)
                self._resume.pop(vcpu.id, None)
            finally:
                self._parked.discard(vcpu.id)

    # ---- all-stop control (called with _cond held) -------------------------------------------------
    def _pause_all(self, but=None) -> None:
        self._hold = {v.id for v in self.vcpus}
        for vcpu in self.vcpus:
            if vcpu is not but:
                vcpu.kick()

    def _all_stopped(self) -> bool:
        """Every vCPU is parked, or no run is in progress (nothing enters the guest while paused)."""
        return not self.machine.running or len(self._parked) == len(self.vcpus)

    def _stopped(self, vid: int) -> bool:
        """Whether the server may issue ioctls on vCPU ``vid`` (it is not in KVM_RUN and will not enter)."""
        return vid in self._parked or (vid in self._hold and not self.machine.running)

    def _debug_flags(self, stepping: bool) -> tuple[int, list[int] | None]:
        flags = 0
        if self._sw and self.breakpoint_insn == INT3:
            flags |= GUESTDBG_ENABLE | GUESTDBG_USE_SW_BP
        debugreg = None
        if self._hw:
            flags |= GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP
            debugreg = [0] * 8
            debugreg[7] = 0x600
            for slot, (addr, rw, length) in self._hw.items():
                debugreg[slot] = addr
                debugreg[7] |= 2 << (2 * slot) | rw << (16 + 4 * slot) | length << (18 + 4 * slot)
        if stepping:
            flags |= GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP | self._blockirq
        return flags, debugreg

    def _resume_vcpus(self, actions: dict[int, str]) -> None:
        """Set each stopped vCPU's guest debug and let the ones in ``actions`` ('c' or 's') go."""
        self._stepping = {vid for vid, a in actions.items() if a == "s"}
        self._stepped_exit.clear()
        for vcpu in self.vcpus:
            if self._stopped(vcpu.id):
                vcpu.set_guest_debug(*self._debug_flags(vcpu.id in self._stepping))
        self._event = None
        self._hold = {v.id for v in self.vcpus if v.id not in actions}
        self._resume.update(actions)
        self._cond.notify_all()

    def _end_session(self) -> None:
        """Detach: remove breakpoints, turn guest debug off where it is safe, let every vCPU run."""
        self._attached = False
        for addr in list(self._sw):
            self._remove_sw(addr)
        self._hw.clear()
        self._stepping = set()
        self._stepped_exit.clear()
        for vcpu in self.vcpus:
            if self._stopped(vcpu.id) and not vcpu.closed:
                try:
                    vcpu.set_guest_debug(0)
                except KvmError:
                    pass
        self._event = None
        self._hold = set()
        for vid in self._parked:
            self._resume[vid] = "c"
        self._cond.notify_all()

    # ---- the connection ------------------------------------------------------------------------------
    def _serve(self, conn: socket.socket | None) -> None:
        while True:
            if conn is None:
                try:
                    conn, peer = self._listener.accept()
                except OSError:
                    return  # closed
                log.info("gdb attached from %s", peer)
            try:
                self._session(conn)
            except Exception:  # a bug in the stub must not take the VM down
                log.exception("gdb session failed")
            finally:
                with self._cond:
                    self._end_session()
                    self._conn = None
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes the reader thread's recv
                except OSError:
                    pass
                conn.close()
                conn = None
            with self._cond:
                if self._closing:
                    return

    def _session(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        with self._cond:
            self._conn, self._queue, self._eof, self._noack = conn, deque(), False, False
            self._attached = True
            self._g_thread, self._c_thread = 0, -1
            self._pause_all()
            reader = threading.Thread(target=self._read, args=(conn,), name="gdbstub-reader", daemon=True)
            reader.start()
            while not self._all_stopped() and not self.machine.stopping and not self._closing:
                self._cond.wait(0.2)
            if self._result is None:
                self._tdesc = target_description(self.arch or self._choose_arch())
        while True:
            with self._cond:
                while not self._queue and not self._eof and not self._closing:
                    self._cond.wait(0.5)
                if self._eof or self._closing:
                    return  # gdb went away or close(): detach (packets still queued go unanswered)
                item = self._queue.popleft()
            if item is _INTERRUPT:
                continue  # already stopped
            if item is _OVERSIZED:
                self._send(_error(EINVAL))
                continue
            reply = self._dispatch(item)
            if reply is not None:
                self._send(reply)
            if item[:1] in (b"D", b"k") or item.startswith(b"vKill"):
                return

    def _choose_arch(self) -> str:
        try:
            return description_for(self.vcpus[0].get_sregs())
        except KvmError:
            return "amd64"

    def _read(self, conn: socket.socket) -> None:
        """The reader thread: ack packets as they arrive and queue them (and Ctrl-C) for the session."""
        parser = PacketParser()
        flooded = False
        try:
            while not flooded:
                data = conn.recv(65536)
                if not data:
                    break
                for kind, payload in parser.feed(data):
                    if kind in ("packet", "oversized", "bad") and not self._noack:
                        self._send_raw(b"-" if kind == "bad" else b"+")
                    elif kind == "nack" and self._last_sent:
                        self._send_raw(self._last_sent)
                    item = {"packet": payload, "oversized": _OVERSIZED, "interrupt": _INTERRUPT}.get(kind)
                    if item is None:
                        continue
                    log.debug("gdb <- %r", payload if kind == "packet" else kind)
                    with self._cond:
                        flooded = len(self._queue) >= MAX_QUEUED
                        if flooded:
                            log.warning("gdb sent over %d packets without waiting for replies: disconnecting", MAX_QUEUED)
                            break
                        self._queue.append(item)
                        self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _send_raw(self, data: bytes) -> None:
        with self._send_lock:
            conn = self._conn
            if conn is None:
                return
            try:
                conn.sendall(data)
            except OSError:  # gone, or not reading for SEND_TIMEOUT seconds: drop it (a detach)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _send(self, payload: bytes) -> None:
        log.debug("gdb -> %r", payload[:200])
        self._last_sent = frame(payload)
        self._send_raw(self._last_sent)

    # ---- commands ------------------------------------------------------------------------------------
    def _dispatch(self, packet: bytes) -> bytes | None:
        """The reply to one packet (None: no reply). Errors become ``E`` packets, never exceptions."""
        try:
            return self._command(packet)
        except GdbError as e:
            log.debug("gdb request %r refused: %s", packet[:60], e)
            return _error(e.errno)
        except (ValueError, IndexError, KeyError, TypeError, StopIteration) as e:
            log.debug("gdb request %r malformed: %s", packet[:60], e)
            return _error(EINVAL)
        except (KvmError, GuestMemoryError) as e:
            log.debug("gdb request %r failed: %s", packet[:60], e)
            return _error(EFAULT)
        except Exception:  # a bug here must not end the session, let alone the VM
            log.exception("gdb request %r failed", packet[:60])
            return _error(EINVAL)

    def _command(self, p: bytes) -> bytes | None:
        c, args = p[:1], p[1:]
        if c == b"?":
            return self._stop_reply()
        if c == b"g":
            rf = self._registers()
            return b"".join(rf.read(r) for r in self._tdesc.registers).hex().encode()
        if c == b"G":
            return self._write_all_registers(bytes.fromhex(args.decode()))
        if c == b"p":
            reg = self._tdesc.registers[int(args, 16)]
            return self._registers().read(reg).hex().encode()
        if c == b"P":
            num, value = args.split(b"=", 1)
            rf = self._registers()
            rf.write(self._tdesc.registers[int(num, 16)], bytes.fromhex(value.decode()))
            rf.flush()
            return b"OK"
        if c == b"m":
            addr, length = (int(x, 16) for x in args.split(b","))
            return self._read_memory(addr, min(length, PACKET_SIZE // 2)).hex().encode()
        if c in (b"M", b"X"):
            where, data = args.split(b":", 1)
            addr, length = (int(x, 16) for x in where.split(b","))
            data = bytes.fromhex(data.decode()) if c == b"M" else unescape_binary(data)
            if len(data) != length:
                raise GdbError(EINVAL, f"{length} bytes announced, {len(data)} sent")
            self._write_memory(addr, data)
            return b"OK"
        if c in (b"Z", b"z"):
            return self._breakpoint(c == b"Z", *(int(x, 16) for x in args.split(b";")[0].split(b",")[:3]))
        if c == b"H":
            tid = self._thread_id(args[1:])
            if tid > len(self.vcpus):
                raise GdbError(EINVAL, f"no thread {tid}")
            if args[:1] == b"g":
                self._g_thread = self._g_thread if tid in (0, -1) else tid - 1
            elif args[:1] == b"c":
                self._c_thread = tid
            return b"OK"
        if c == b"T":
            return b"OK" if 1 <= self._thread_id(args) <= len(self.vcpus) else _error(EINVAL)
        if c in (b"c", b"C", b"s", b"S"):
            self._set_pc_from(args, c in (b"C", b"S"))
            if c in (b"c", b"C"):
                return self._resume_and_wait({v.id: "c" for v in self.vcpus})
            target = self._g_thread if self._c_thread in (0, -1) else self._c_thread - 1
            return self._resume_and_wait({target: "s"})
        if c == b"D":
            return b"OK"
        if c == b"k":
            self._kill()
            return None
        if c == b"v":
            return self._v_command(p)
        if c in (b"q", b"Q"):
            return self._query(p)
        return b""  # unknown: the empty packet says "not supported"

    def _v_command(self, p: bytes) -> bytes:
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            actions: dict[int, str] = {}
            for part in p[6:].split(b";"):
                action, _, thread = part.partition(b":")
                kind = action[:1].lower().decode()
                if kind not in ("c", "s"):
                    raise GdbError(EINVAL, f"vCont action {action!r}")
                tid = self._thread_id(thread) if thread else -1
                if not (tid == -1 or 1 <= tid <= len(self.vcpus)):
                    raise GdbError(EINVAL, f"no thread {tid}")
                for v in self.vcpus:
                    if v.id not in actions and tid in (-1, v.id + 1):
                        actions[v.id] = kind
            if not actions:
                raise GdbError(EINVAL, "vCont resumes no thread")
            return self._resume_and_wait(actions)
        if p.startswith(b"vKill"):
            self._kill()
            return b"OK"
        return b""

    def _query(self, p: bytes) -> bytes:
        if p.startswith(b"qSupported"):
            self._gdb_features = {f[:-1].decode() for f in p.partition(b":")[2].split(b";") if f.endswith(b"+")}
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+;vContSupported+"
                    % PACKET_SIZE)
        if p == b"QStartNoAckMode":
            self._send(b"OK")
            self._noack = True
            return None
        if p.startswith(b"qXfer:features:read:"):
            annex, _, span = p[20:].rpartition(b":")
            if annex != b"target.xml":
                raise GdbError(EINVAL, f"no annex {annex!r}")
            offset, length = (int(x, 16) for x in span.split(b","))
            xml = self._tdesc.xml
            chunk = xml[offset : offset + min(length, PACKET_SIZE // 2)]
            return (b"l" if offset + len(chunk) >= len(xml) else b"m") + escape_binary(chunk)
        if p == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.id + 1) for v in self.vcpus)
        if p == b"qsThreadInfo":
            return b"l"
        if p == b"qC":
            return b"QC%x" % (self._g_thread + 1)
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return b"1"  # gdb detaches (the guest runs on) when it quits
        if p.startswith(b"qThreadExtraInfo,"):
            vid = self._thread_id(p[17:]) - 1
            vcpu = self._vcpu(vid)
            return f"vCPU {vid} ({cpu_mode(vcpu.get_sregs()).value} mode)".encode().hex().encode()
        if p.startswith(b"qSymbol"):
            return b"OK"
        return b""

    # ---- command helpers -----------------------------------------------------------------------------
    def _thread_id(self, text: bytes) -> int:
        text = text.split(b".")[-1]  # p<pid>.<tid> with multiprocess extensions
        return -1 if text == b"-1" else int(text, 16)

    def _vcpu(self, vid: int):
        if not 0 <= vid < len(self.vcpus):
            raise GdbError(EINVAL, f"no vCPU {vid}")
        return self.vcpus[vid]

    def _registers(self) -> RegisterFile:
        return RegisterFile(self._vcpu(self._g_thread), self.machine.memory)

    def _write_all_registers(self, data: bytes) -> bytes:
        total = sum(r.size for r in self._tdesc.registers)
        if len(data) != total:
            raise GdbError(EINVAL, f"G with {len(data)} bytes of registers, not {total}")
        rf = self._registers()
        at, pc = 0, None
        for reg in self._tdesc.registers:
            value = data[at : at + reg.size]
            at += reg.size
            if value == rf.read(reg):
                continue
            if reg.name in ("rip", "eip"):
                pc = (reg, value)  # after the segments: a real-mode pc depends on CS
            else:
                rf.write(reg, value)
        if pc is not None:
            rf.write(*pc)
        rf.flush()
        return b"OK"

    def _set_pc_from(self, args: bytes, signal: bool) -> None:
        if signal:
            args = args.partition(b";")[2]
        if args:
            rf = self._registers()
            pc = next(r for r in self._tdesc.registers if r.name in ("rip", "eip"))
            rf.write(pc, (int(args, 16) & ((1 << pc.bits) - 1)).to_bytes(pc.size, "little"))
            rf.flush()

    def _linear_pc(self, vcpu) -> int:
        return RegisterFile(vcpu, self.machine.memory).pc

    def _read_memory(self, addr: int, length: int) -> bytes:
        vcpu = self._vcpu(self._g_thread)
        data = bytearray(read_linear(vcpu, self.machine.memory, addr, length))
        if length and not data:
            raise GdbError(EFAULT, f"{addr:#x} is not mapped to guest RAM")
        for bp_addr, bp in self._sw.items():  # show the bytes under our breakpoints
            if addr <= bp_addr < addr + len(data):
                data[bp_addr - addr] = bp.original
        return bytes(data)

    def _write_memory(self, addr: int, data: bytes) -> None:
        covered = {a: bp for a, bp in self._sw.items() if addr <= a < addr + len(data)}
        planted = bytearray(data)
        for bp_addr in covered:  # keep our breakpoints in place...
            planted[bp_addr - addr] = self.breakpoint_insn
        write_linear(self._vcpu(self._g_thread), self.machine.memory, addr, bytes(planted))
        for bp_addr, bp in covered.items():  # ...and put back what gdb wrote when they come out
            bp.original = data[bp_addr - addr]

    def _breakpoint(self, insert: bool, kind: int, addr: int, length: int = 1) -> bytes:
        if kind == 0:
            if insert:
                self._insert_sw(addr)
            else:
                self._remove_sw(addr)
            return b"OK"
        if kind == 1:
            return self._hardware(insert, addr, 0, 0)
        if kind in (2, 3, 4):
            if not self.watchpoints_supported:
                log.info("watchpoints are not supported on %s (its emulator never checks data breakpoints)",
                         self.backend)
                return b""
            if length not in (1, 2, 4, 8) or addr % length:
                raise GdbError(EINVAL, f"a watchpoint of {length} bytes at {addr:#x}")
            rw = {2: 1, 3: 3, 4: 3}[kind]  # x86 has no read-only watchpoint: read/write
            return self._hardware(insert, addr, rw, {1: 0, 2: 1, 4: 3, 8: 2}[length])
        return b""

    def _insert_sw(self, addr: int) -> None:
        if addr in self._sw:
            return
        vcpu = self._vcpu(self._g_thread)
        gpa = _translate(vcpu, addr)
        if gpa is None or self.machine.memory.region_at(gpa) is None:
            raise GdbError(EFAULT, f"cannot plant a breakpoint at {addr:#x}: not mapped to guest RAM")
        self._sw[addr] = _Breakpoint(gpa, self.machine.memory.read_u8(gpa))
        self.machine.memory.write_u8(gpa, self.breakpoint_insn)

    def _remove_sw(self, addr: int) -> None:
        bp = self._sw.pop(addr, None)
        if bp is not None and self.machine.memory.read_u8(bp.gpa) == self.breakpoint_insn:
            self.machine.memory.write_u8(bp.gpa, bp.original)  # unless the guest overwrote it

    def _hardware(self, insert: bool, addr: int, rw: int, length: int) -> bytes:
        slot = next((s for s, hw in self._hw.items() if hw == (addr, rw, length)), None)
        if not insert:
            if slot is not None:
                del self._hw[slot]
            return b"OK"
        if slot is None:
            free = [s for s in range(4) if s not in self._hw]
            if not free:
                raise GdbError(ENOSPC, "all four debug registers are in use")
            self._hw[free[0]] = (addr, rw, length)
        return b"OK"

    def _kill(self) -> None:
        """gdb's ``k``: end the run (Machine.stop, so it raises GuestTimeout("killed from gdb"))."""
        self._killed = True
        self.machine.stop(KILLED)

    # ---- resuming and stopping -----------------------------------------------------------------------
    def _resume_and_wait(self, actions: dict[int, str]) -> bytes | None:
        """Resume, then wait for a stop (a vCPU's event, Ctrl-C, the end of the run, or gdb gone)."""
        with self._cond:
            if self._result is not None:
                return self._exit_reply()
            if self.backend == "kvm_pvm":
                for vid in (v for v, a in actions.items() if a == "s" and self._stopped(v)):
                    if self.vcpus[vid].get_sregs().cs.selector & 3:
                        raise GdbError(EPERM, f"vCPU {vid} is at CPL3: kvm_pvm runs it natively and its single-step "
                                              "trap would go to the guest")
            self._resume_vcpus(actions)
            interrupted = False
            while True:
                if self._result is not None:
                    return self._exit_reply()
                if self._eof or (self._closing and self._result is None):
                    return None
                if _INTERRUPT in self._queue:
                    self._queue.remove(_INTERRUPT)
                    interrupted = True
                    self._pause_all()
                if (self._event is not None or interrupted) and self._all_stopped():
                    break
                self._cond.wait(0.2)
            self._stepping = set()
            if self._event is None:
                self._event = (self._g_thread, Stop(SIGINT))
            return self._stop_reply()

    def _stop_reply(self) -> bytes:
        if self._result is not None:
            return self._exit_reply()
        vid, stop = self._event if self._event is not None else (self._g_thread, Stop(SIGTRAP))
        self._g_thread = vid
        reason = stop.reason if stop.reason in self._gdb_features else ""
        return b"T%02xthread:%x;" % (stop.signal, vid + 1) + (reason.encode() + b":;" if reason else b"")

    def _exit_reply(self) -> bytes:
        result = self._result
        if isinstance(result, Outcome):
            return b"W%02x" % (result.status & 0xFF)
        signal = {GuestTimeout: SIGKILL, GuestInterrupted: SIGINT, TripleFault: SIGSEGV, GuestException: SIGSEGV,
                  UnexpectedExit: SIGILL}.get(type(result), SIGABRT)
        return b"X%02x" % signal


__all__ = [
    "PACKET_SIZE", "GdbError", "GdbServer", "PacketParser", "RegisterFile", "Stop", "TargetDescription", "checksum",
    "description_for", "escape_binary", "frame", "parse_address", "read_linear", "target_description",
    "unescape_binary", "write_linear", "x87_full_tag",
]

