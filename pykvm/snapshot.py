"""Snapshots: a VM's whole state in one versioned, checked file, and back.

The file::

    "PYKVMSNP"  format version (u32)  section count (u32)          16 bytes
    then each section: a 32-byte head and its payload
      name (16 bytes, NUL-padded)  flags (u32)  length (u64)  CRC-32 of the payload (u32)

Sections, in this order: ``header`` (JSON: the KVM API version and backend, the CPUID the guest
saw, the saved MSR indices, how the machine was built), ``vcpuN`` (JSON: each state ioctl's
structure as hex, the MSRs, the MP state), ``vm`` (JSON: the in-kernel PIC, IOAPIC, PIT and
kvmclock), ``devices`` (JSON: every device's :meth:`~pykvm.devices.base.Device.save`), ``pages``
(a bitmap of the guest pages that are not zero) and last ``memory``: guest RAM at its own
offsets, starting on a page boundary of the file, with the zero pages left as holes. Its CRC
covers the non-zero pages only, so writing and checking cost what the guest used; restore maps
the section with ``mmap(MAP_PRIVATE)``, so a large, mostly idle guest costs little to bring back.

Every section is checked (its CRC, its JSON) when the file is read; a fault names the section.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from ._ffi import ffi
from .constants import Cap
from .dirty import pages_of

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 1
FILE_HEAD = struct.Struct("<8sII")
SECTION_HEAD = struct.Struct("<16sIQI4x")
PAGE = mmap.PAGESIZE
_ZERO_PAGE = bytes(PAGE)
_ZERO_BLOCK = bytes(64 * PAGE)

#: The structures a vCPU's state is made of, by the ioctl pair that reads and writes each (the
#: capability that offers it, None: always there), in the order they are put back: control
#: registers before the general ones, the FPU before XSAVE (which supersedes it), the local APIC
#: after the APIC base (in sregs), pending events last (QEMU's and Firecracker's order).
VCPU_STRUCTS = (
    ("sregs", "struct kvm_sregs", None),
    ("sregs2", "struct kvm_sregs2", Cap.SREGS2),
    ("regs", "struct kvm_regs", None),
    ("fpu", "struct kvm_fpu", None),
    ("xsave", "struct kvm_xsave", Cap.XSAVE),  # KVM_GET_XSAVE2's whole area where offered
    ("xcrs", "struct kvm_xcrs", Cap.XCRS),
    ("lapic", "struct kvm_lapic_state", None),  # only with the in-kernel irqchip
    ("debugregs", "struct kvm_debugregs", Cap.DEBUGREGS),
    ("vcpu_events", "struct kvm_vcpu_events", Cap.VCPU_EVENTS),
)


class SnapshotError(ValueError):
    """A snapshot file that cannot be used here; the message says which part and why."""


def _hex(cdata) -> str:
    return bytes(ffi.buffer(cdata)).hex()


def _from_hex(ctype: str, text: str, what: str):
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise SnapshotError(f"{what}: not hex") from None
    out = ffi.new(f"{ctype} *")
    if len(raw) != ffi.sizeof(out[0]):
        raise SnapshotError(f"{what}: {len(raw)} bytes, but {ctype} is {ffi.sizeof(out[0])} here")
    ffi.memmove(out, raw, len(raw))
    return out


def xsave_size(vm) -> int:
    """The bytes of a vCPU's XSAVE area KVM reads and writes: KVM_CAP_XSAVE2's answer where
    offered (more than 4 KiB with AMX), else struct kvm_xsave's 4 KiB."""
    base = ffi.sizeof("struct kvm_xsave")
    return max(vm.check_extension(Cap.XSAVE2), base) if vm.has_cap(Cap.XSAVE2) else base


def _xsave_from_hex(text: str, size: int, what: str):
    """A saved XSAVE area in a buffer of this KVM's ``size``: zero past what was saved (components
    there are in their initial state unless XSTATE_BV says otherwise, and a smaller area has
    none); refused when the saved area is larger than this KVM takes."""
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise SnapshotError(f"{what}: not hex") from None
    if len(raw) < ffi.sizeof("struct kvm_xsave"):
        raise SnapshotError(f"{what}: {len(raw)} bytes, less than struct kvm_xsave's {ffi.sizeof('struct kvm_xsave')}")
    if len(raw) > size:
        raise SnapshotError(f"{what}: the saved XSAVE area is {len(raw)} bytes; this host's KVM takes {size} "
                            "(its guests lack state the snapshot's had, such as AMX tiles)")
    buf = ffi.new("char[]", size)
    ffi.memmove(buf, raw, len(raw))
    return buf


# ---- the state of a vCPU and of the VM --------------------------------------------------------

def readable_msrs(vcpu, indices: list[int]) -> dict[int, int]:
    """Every MSR of ``indices`` KVM_GET_MSRS reads on ``vcpu`` (it stops at the first it refuses:
    that one is left out and the rest asked again)."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.update(got)
        rest = rest[len(got) + 1 :]
    return values


@dataclass
class VcpuState:
    """One vCPU between exits: each state structure (raw, as hex), its MSRs and MP state."""

    id: int
    structs: dict[str, str]
    msrs: dict[int, int]
    mp_state: int

    @classmethod
    def capture(cls, vcpu, vm, msr_indices: list[int], lapic: bool) -> VcpuState:
        structs = {}
        for name, _ctype, cap in VCPU_STRUCTS:
            if (cap is not None and not vm.has_cap(cap)) or (name == "lapic" and not lapic):
                continue
            if name == "sregs" and vm.has_cap(Cap.SREGS2):
                continue  # sregs2 has all of it, and the PDPTRs
            if name == "xsave" and vm.has_cap(Cap.XSAVE2):
                structs[name] = bytes(ffi.buffer(vcpu.get_xsave2(xsave_size(vm)))).hex()
                continue
            structs[name] = _hex(getattr(vcpu, f"get_{name}")())
        return cls(vcpu.id, structs, readable_msrs(vcpu, msr_indices), vcpu.get_mp_state())

    def apply(self, vcpu) -> None:
        ctypes = {name: ctype for name, ctype, _cap in VCPU_STRUCTS}
        for name, _ctype, _cap in VCPU_STRUCTS:
            if name == "xsave" and name in self.structs:
                area = _xsave_from_hex(self.structs[name], xsave_size(vcpu.vm), f"vcpu{self.id}.xsave")
                vcpu.set_xsave(ffi.cast("struct kvm_xsave *", area))
            elif name in self.structs:
                getattr(vcpu, f"set_{name}")(_from_hex(ctypes[name], self.structs[name], f"vcpu{self.id}.{name}"))
            if name == "regs":
                # the MSRs go after the control registers (EFER, the APIC base) and before the
                # local APIC and the events, as QEMU puts them back
                self._set_msrs(vcpu)
        vcpu.set_mp_state(self.mp_state)

    def _set_msrs(self, vcpu) -> None:
        """KVM_SET_MSRS stops at the first MSR it refuses. A refused MSR that already holds the
        saved value is passed over (KVM refuses host writes to some paravirtual MSRs whose CPUID
        bit the guest lacks, though it reads them: 0 either way); any other refusal is an error."""
        rest = list(self.msrs.items())
        while rest:
            done = vcpu.set_msrs(dict(rest))
            if done == len(rest):
                return
            index, value = rest[done]
            if vcpu.get_msrs([index]).get(index, 0) != value:
                raise SnapshotError(f"vcpu{self.id}: this KVM refuses MSR {index:#x} "
                                    f"(value {value:#x}) the snapshot has")
            rest = rest[done + 1 :]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "structs": self.structs, "msrs": {f"{i:#x}": v for i, v in self.msrs.items()},
                "mp_state": self.mp_state}

    @classmethod
    def from_json(cls, doc: dict, what: str) -> VcpuState:
        try:
            return cls(int(doc["id"]), {str(k): str(v) for k, v in doc["structs"].items()},
                       {int(k, 16): int(v) for k, v in doc["msrs"].items()}, int(doc["mp_state"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SnapshotError(f"{what}: malformed ({type(e).__name__}: {e})") from None


@dataclass
class VmState:
    """The in-kernel devices of a VM (the PICs and the IOAPIC, the PIT) and its kvmclock."""

    irqchips: dict[str, str] = field(default_factory=dict)  # "0", "1", "2": struct kvm_irqchip as hex
    pit: str | None = None
    clock: int | None = None

    @classmethod
    def capture(cls, vm, irqchip: bool, pit: bool) -> VmState:
        state = cls()
        if irqchip:
            state.irqchips = {str(chip): _hex(vm.get_irqchip(chip)) for chip in (0, 1, 2)}
        if pit:
            state.pit = _hex(vm.get_pit2())
        if vm.has_cap(Cap.ADJUST_CLOCK):
            state.clock = int(vm.get_clock().clock)
        return state

    def apply(self, vm) -> None:
        for chip, text in sorted(self.irqchips.items()):
            vm.set_irqchip(_from_hex("struct kvm_irqchip", text, f"vm.irqchip{chip}"))
        if self.pit is not None:
            vm.set_pit2(_from_hex("struct kvm_pit_state2", self.pit, "vm.pit"))
        if self.clock is not None:
            vm.set_clock(self.clock)

    def to_json(self) -> dict[str, Any]:
        return {"irqchips": self.irqchips, "pit": self.pit, "clock": self.clock}

    @classmethod
    def from_json(cls, doc: dict) -> VmState:
        try:
            return cls({str(k): str(v) for k, v in doc["irqchips"].items()}, doc["pit"],
                       None if doc["clock"] is None else int(doc["clock"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SnapshotError(f"section vm: malformed ({type(e).__name__}: {e})") from None


# ---- the file ---------------------------------------------------------------------------------

def nonzero_pages(ram):
    """The numbers of the pages of a RAM buffer that are not all zero, in order (64 pages at a
    time are passed over when they are all zero)."""
    block = len(_ZERO_BLOCK)
    for start in range(0, len(ram), block):
        chunk = ram[start : start + block]
        if chunk == _ZERO_BLOCK[: len(chunk)]:
            continue
        for off in range(0, len(chunk), PAGE):
            if chunk[off : off + PAGE] != _ZERO_PAGE:
                yield (start + off) // PAGE


def _zero_bitmap_and_crc(ram) -> tuple[bytes, int, int]:
    """(bitmap of the non-zero pages, CRC-32 over them in order, how many) of a RAM buffer."""
    bitmap = bytearray((len(ram) // PAGE + 7) // 8)
    crc, used = 0, 0
    for n in nonzero_pages(ram):
        bitmap[n >> 3] |= 1 << (n & 7)
        crc = zlib.crc32(ram[n * PAGE : (n + 1) * PAGE], crc)
        used += 1
    return bytes(bitmap), crc, used


def _pages_crc(ram, bitmap: bytes) -> int:
    crc = 0
    for page in pages_of(bitmap):
        crc = zlib.crc32(ram[page * PAGE : (page + 1) * PAGE], crc)
    return crc


def _name(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"section name {text!r} is longer than 16 bytes")
    return raw.ljust(16, b"\0")


def write(path: str | os.PathLike, sections: list[tuple[str, dict]], ram) -> dict[str, int]:
    """Write a snapshot file: JSON ``sections`` in order, then the pages and the memory of ``ram``
    (a buffer: guest RAM from GPA 0). Returns sizes: the file's, RAM's and the non-zero pages'."""
    bitmap, mem_crc, used = _zero_bitmap_and_crc(ram)
    payloads = [(name, json.dumps(doc, separators=(",", ":")).encode()) for name, doc in sections]
    payloads.append(("pages", bitmap))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(FILE_HEAD.pack(MAGIC, FORMAT_VERSION, len(payloads) + 1))
        for name, payload in payloads:
            f.write(SECTION_HEAD.pack(_name(name), 0, len(payload), zlib.crc32(payload)))
            f.write(payload)
        f.write(SECTION_HEAD.pack(_name("memory"), 0, len(ram), mem_crc))
        start = -(-f.tell() // PAGE) * PAGE  # the memory starts on a page of the file: it can be mapped
        f.write(bytes(start - f.tell()))
        view = memoryview(ram)
        for page in pages_of(bitmap):
            f.seek(start + page * PAGE)
            f.write(view[page * PAGE : (page + 1) * PAGE])
        f.truncate(start + len(ram))  # the zero pages stay holes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": os.path.getsize(path), "ram": len(ram), "pages_saved": used, "bytes_saved": used * PAGE,
            "on_disk": os.stat(path).st_blocks * 512}


@dataclass
class Snapshot:
    """A snapshot file read and checked: its JSON sections, the non-zero page bitmap, and where
    the guest memory is in the file (:meth:`map_memory` maps it)."""

    path: str
    version: int
    sections: dict[str, Any]
    bitmap: bytes
    memory_offset: int
    memory_size: int
    memory_crc: int

    @property
    def header(self) -> dict:
        return self.sections["header"]

    def map_memory(self) -> mmap.mmap:
        """The guest memory, mapped copy-on-write from the file (pages are read when touched);
        raises SnapshotError when its CRC does not match."""
        with open(self.path, "rb") as f:
            mem = mmap.mmap(f.fileno(), self.memory_size, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=self.memory_offset)
        crc = _pages_crc(mem, self.bitmap)
        if crc != self.memory_crc:
            mem.close()
            raise SnapshotError(f"{self.path}: section memory: CRC {crc:#010x}, the file says {self.memory_crc:#010x}")
        return mem


def read(path: str | os.PathLike) -> Snapshot:
    """Read and check a snapshot file's head and sections (the memory's CRC is checked when it
    is mapped). Raises SnapshotError naming the section for a truncated or damaged file."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(FILE_HEAD.size)
        if len(head) < FILE_HEAD.size or head[:8] != MAGIC:
            raise SnapshotError(f"{path}: not a pykvm snapshot (no {MAGIC.decode()} magic)")
        _, version, count = FILE_HEAD.unpack(head)
        if version != FORMAT_VERSION:
            raise SnapshotError(f"{path}: snapshot format version {version}; this pykvm reads version {FORMAT_VERSION}")
        sections: dict[str, Any] = {}
        bitmap = b""
        for i in range(count):
            raw = f.read(SECTION_HEAD.size)
            if len(raw) < SECTION_HEAD.size:
                raise SnapshotError(f"{path}: truncated: section {i + 1} of {count} is missing")
            name_raw, _flags, length, crc = SECTION_HEAD.unpack(raw)
            name = name_raw.rstrip(b"\0").decode("ascii", "replace")
            if name == "memory":
                offset = -(-f.tell() // PAGE) * PAGE
                if offset + length > size:
                    raise SnapshotError(f"{path}: truncated: section memory needs {offset + length} bytes, "
                                        f"the file has {size}")
                if "header" not in sections:
                    raise SnapshotError(f"{path}: no header section before the memory")
                return Snapshot(path, version, sections, bitmap, offset, length, crc)
            payload = f.read(length)
            if len(payload) < length:
                raise SnapshotError(f"{path}: truncated: section {name} has {len(payload)} of its {length} bytes")
            if zlib.crc32(payload) != crc:
                raise SnapshotError(f"{path}: section {name}: CRC {zlib.crc32(payload):#010x}, "
                                    f"the file says {crc:#010x}")
            if name == "pages":
                bitmap = payload
                continue
            try:
                sections[name] = json.loads(payload)
            except ValueError as e:
                raise SnapshotError(f"{path}: section {name}: not JSON ({e})") from None
        raise SnapshotError(f"{path}: no memory section")


# ---- a whole Machine ----------------------------------------------------------------------------

def _complete_pending_io(vcpu) -> None:
    """KVM_RUN once with immediate_exit set: KVM finishes the I/O of the last exit (an IN's data
    into RAX, a string instruction's next item) and returns at once with EINTR, before any guest
    instruction runs. Then the registers are the ones after the instruction that exited."""
    vcpu.kvm_run.immediate_exit = 1
    vcpu.run()  # Intr; run() clears immediate_exit


def _devices(machine) -> list:
    """The device models whose state is saved, in a fixed order: the debug console, then every
    device as it was added (the split irqchip's IOAPIC among them)."""
    return [machine.debugcon, *machine._devices]


def _capture(machine, what: str) -> tuple[list[VcpuState], VmState, list[dict]]:
    """Every vCPU's state (its last exit's I/O completed first), the in-kernel devices' and each
    device model's save(), in _devices order; a device that cannot say its state is a SnapshotError."""
    for transport in getattr(machine, "virtio", ()):
        # before anything is read: no request in flight, the pending notifies served, their
        # interrupts in the irqchip (VirtioMmio.quiesce)
        transport.quiesce()
    for vcpu in machine.vcpus:
        _complete_pending_io(vcpu)
    msr_indices = machine.kvm.get_msr_index_list()
    vcpus = [VcpuState.capture(v, machine.vm, msr_indices, lapic=bool(machine.irqchip)) for v in machine.vcpus]
    vm_state = VmState.capture(machine.vm, irqchip=machine.irqchip is True, pit=machine._has_pit)
    try:
        states = [d.save() for d in _devices(machine)]
    except NotImplementedError as e:
        raise SnapshotError(f"this machine cannot be {what}: {e}") from None
    return vcpus, vm_state, states


def _not_data(machine) -> list[str]:
    return [name for name, args in machine.recipe["platform"] if args is None]


#: CPUID registers that are feature bits: a guest that saw a bit must find it offered where it is restored.
FEATURE_REGISTERS = {(0x1, 0): ("ecx", "edx"), (0x7, 0): ("ebx", "ecx", "edx"), (0x7, 1): ("eax",),
                     (0xD, 0): ("eax", "edx"), (0xD, 1): ("eax",), (0x80000001, 0): ("ecx", "edx"), (0x80000007, 0): ("edx",)}


def header_of(machine, msr_indices) -> dict:
    """What a snapshot's header (or a migration's hello) says of ``machine``: the KVM it ran on,
    the CPUID its vCPUs saw, the MSRs saved, and how to build it again."""
    from .probe.host import kvm_backend

    kvm = machine.kvm
    return {"kvm_api_version": kvm.get_api_version(), "backend": kvm_backend(),
            "cpuid": [asdict(e) for e in machine.cpuid], "msr_indices": sorted(msr_indices),
            "recipe": machine.recipe, "mem_size": machine.ram.size, "vcpus": len(machine.vcpus)}


def check_movable(machine, what: str) -> None:
    """Refuse a machine with a part that is code, not data (``what``: "snapshotted", "migrated")."""
    not_data = _not_data(machine)
    if not_data:
        raise SnapshotError(f"this machine cannot be {what} yet: its {', '.join(not_data)} part "
                            "does not say what its state is")


def state_sections(machine, what: str) -> tuple[dict, list[tuple[str, dict]]]:
    """The header and the state sections (vCPUs, VM, devices) of ``machine``, captured now."""
    vcpus, vm_state, states = _capture(machine, what)
    devices = [{"type": type(d).__name__, "state": state} for d, state in zip(_devices(machine), states)]
    header = header_of(machine, {i for v in vcpus for i in v.msrs})
    return header, [*((f"vcpu{v.id}", v.to_json()) for v in vcpus), ("vm", vm_state.to_json()),
                    ("devices", {"devices": devices})]


def save_machine(machine, path) -> dict:
    """Write ``machine``'s whole state to ``path`` (between runs). Returns sizes and seconds."""
    import time

    if machine.in_run:
        raise RuntimeError("a snapshot is taken between runs: pause the machine first (Machine.pause)")
    check_movable(machine, "snapshotted")
    start = time.monotonic()
    header, sections = state_sections(machine, "snapshotted")
    sizes = write(path, [("header", header), *sections], machine.ram._map)
    return {**sizes, "seconds": time.monotonic() - start}


def check_compatible(header: dict, kvm, where: str) -> None:
    """Refuse, with the reason (``where`` names the file or the source), a saved machine this
    host's KVM cannot take: another API version, a CPUID feature bit or an MSR the guest had
    that this KVM does not offer."""
    if header.get("kvm_api_version") != kvm.get_api_version():
        raise SnapshotError(f"{where}: taken with KVM API version {header.get('kvm_api_version')}, "
                            f"this host has {kvm.get_api_version()}")
    offered = {(e.function, e.index): e for e in kvm.supported_cpuid()}
    for saved in header["cpuid"]:
        key = (saved["function"], saved["index"])
        for reg in FEATURE_REGISTERS.get(key, ()):
            have = getattr(offered[key], reg) if key in offered else 0
            missing = saved[reg] & ~have
            if missing:
                raise SnapshotError(
                    f"{where}: the guest saw CPUID.{key[0]:#x}.{key[1]}:{reg.upper()} bits {missing:#x} "
                    "that this host's KVM does not offer")
    msrs = set(kvm.get_msr_index_list())
    lacking = [i for i in header["msr_indices"] if i not in msrs]
    if lacking:
        raise SnapshotError(f"{where}: this host's KVM cannot restore MSR "
                            f"{', '.join(f'{i:#x}' for i in lacking[:4])}{' ...' if len(lacking) > 4 else ''} "
                            "that the snapshot has")


def check_header(header: dict, where: str) -> None:
    """Refuse a header that lacks what a machine is built from, or names a part that is code."""
    try:
        recipe = header["recipe"]
        int(header["vcpus"]), int(header["mem_size"]), list(header["cpuid"]), list(header["msr_indices"])
        parts = [name for name, _args in recipe["platform"]]
        recipe["mem_size"], recipe["cpus"], recipe["irqchip"], recipe["pit"]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{where}: section header or its parts: malformed or missing ({e})") from None
    unknown = [name for name in parts if name not in ("pc_devices", "qemu_pc", "virtio")]
    if unknown:
        raise SnapshotError(f"{where}: a {unknown[0]} part cannot be restored yet")
    for name, args in recipe["platform"]:
        if name == "virtio" and not (isinstance(args, dict) and args.get("type") in VIRTIO_TYPES):
            raise SnapshotError(f"{where}: a virtio part that cannot be built again ({args!r})")


#: The virtio backends a recipe can name (VirtioDevice.recipe), and the arguments each is built from.
VIRTIO_TYPES = ("blk", "console", "rng", "net")


def build_virtio(args: dict, *, console=None, where: str = "the recipe"):
    """A virtio backend built again from its recipe (VirtioDevice.recipe): a disk opens the same
    image, which must be the one the guest left (a snapshot does not hold disk contents), of the
    same size; a console writes to ``console`` (None: its output is only captured); a NIC opens
    its TAP by name. Raises SnapshotError with the reason."""
    from .virtio import VirtioError

    kind = args["type"]
    try:
        if kind == "blk":
            from .virtio.blk import SECTOR, VirtioBlk

            device = VirtioBlk(args["path"], readonly=bool(args["readonly"]), serial=args["serial"])
            if device.capacity != args["sectors"]:
                size = device.capacity * SECTOR
                device.close()
                raise SnapshotError(
                    f"{where}: disk image {args['path']} is {size} bytes; the saved machine's was "
                    f"{args['sectors'] * SECTOR} (a snapshot does not hold the disk: restore it with the image "
                    "the guest left)")
            return device
        if kind == "console":
            from .virtio.console import VirtioConsole

            return VirtioConsole(console, limit=int(args["limit"]))
        if kind == "rng":
            from .virtio.rng import VirtioRng

            return VirtioRng()
        from .virtio.net import VirtioNet

        return VirtioNet(args["tap"], mac=args["mac"])
    except VirtioError as e:
        raise SnapshotError(f"{where}: virtio {kind}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"{where}: virtio {kind}: malformed recipe ({type(e).__name__}: {e})") from None


def build_machine(cls, header: dict, *, kvm, ram_backing=None, console=None, serial=None, trace=None):
    """A machine of class ``cls`` built as ``header``'s recipe says, its RAM ``ram_backing`` (or
    new, zero), its state not yet put back (:func:`apply_state`); checked with check_header."""
    from .system import CpuidEntry

    recipe = header["recipe"]
    cpuid = [CpuidEntry(**e) for e in header["cpuid"]]
    machine = cls(recipe["mem_size"], cpus=recipe["cpus"], irqchip=recipe["irqchip"], pit=recipe["pit"],
                  kvm=kvm, console=console, console_limit=recipe["console_limit"], trace=trace,
                  strict=recipe["strict"], cpuid=lambda _supported: cpuid, ram_backing=ram_backing)
    try:
        for name, args in recipe["platform"]:  # pc_devices, qemu_pc or virtio (check_header), in order
            if name == "virtio":
                machine.add_virtio(build_virtio(args, console=console))
            elif name == "pc_devices":
                # the tables are in the restored memory already
                machine.add_pc_devices(serial, cmdline=args["cmdline"], tables=False)
            else:
                from .x86 import layout

                machine.add_qemu_pc(serial if args["serial"] else False, cmdline=args["cmdline"], ecam=args["ecam"],
                                    debug_exits=[tuple(d) for d in args["debug_exits"]],
                                    debugcons=[(port, console if port == layout.CONSOLE_PORT else None)
                                               for port in args["debugcons"]],
                                    pc_testdev=args["pc_testdev"], pci_testdevs=args["pci_testdevs"], firmware=False)
    except BaseException:
        machine.close()
        raise
    return machine


def apply_state(machine, sections: dict, where: str) -> None:
    """Put the device models', the VM's and each vCPU's saved state (``sections`` by name, as
    :func:`state_sections` made them) back into a machine :func:`build_machine` made."""
    try:
        vcpu_docs = [sections[f"vcpu{i}"] for i in range(len(machine.vcpus))]
        vm_doc, devices = sections["vm"], sections["devices"]["devices"]
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"{where}: section {e} is missing or malformed") from None
    models = _devices(machine)
    if [d.get("type") for d in devices] != [type(m).__name__ for m in models]:
        raise SnapshotError(f"{where}: section devices: saved {[d.get('type') for d in devices]}, "
                            f"the machine built again has {[type(m).__name__ for m in models]}")
    for model, saved in zip(models, devices):
        try:
            model.restore(saved["state"])
        except (KeyError, ValueError) as e:
            raise SnapshotError(f"{where}: section devices: {type(model).__name__}: {e}") from None
    VmState.from_json(vm_doc).apply(machine.vm)
    for vcpu, doc in zip(machine.vcpus, vcpu_docs):
        VcpuState.from_json(doc, f"section vcpu{vcpu.id}").apply(vcpu)


def restore_machine(cls, path, *, kvm=None, console=None, serial=None, trace=None):
    """Build a machine of class ``cls`` again from the snapshot at ``path`` (see Machine.from_snapshot)."""
    from .system import Kvm

    snap = read(path)
    check_header(snap.header, snap.path)
    own_kvm = kvm is None
    kvm = kvm or Kvm()
    memory = machine = None
    try:
        check_compatible(snap.header, kvm, snap.path)
        memory = snap.map_memory()
        machine = build_machine(cls, snap.header, kvm=kvm, ram_backing=memory, console=console, serial=serial,
                                trace=trace)
        machine._own_kvm = own_kvm
        apply_state(machine, snap.sections, snap.path)
    except BaseException:
        if machine is not None:
            machine.close()  # its own kvm too
        else:
            if memory is not None:
                memory.close()
            if own_kvm:
                kvm.close()
        raise
    return machine


# ---- fast reset ---------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A machine's state kept in memory for :meth:`Machine.reset`: the vCPU and VM states, each
    device's, and a copy of guest RAM, of which a reset copies back only the pages written since."""

    vcpus: list[VcpuState]
    vm: VmState
    devices: list[dict]
    ram: bytes
    resets: int = 0

    @classmethod
    def take(cls, machine) -> Checkpoint:
        vcpus, vm_state, devices = _capture(machine, "checkpointed")
        machine.dirty.collect()  # from here on
        return cls(vcpus, vm_state, devices, bytes(machine.ram._map))

    def restore(self, machine) -> dict:
        import time

        start = time.monotonic()
        for vcpu in machine.vcpus:
            _complete_pending_io(vcpu)  # or an IN's data would land in the restored RAX
        pages = machine.dirty.collect()
        ram = machine.ram._map
        for page in pages:
            off = page * PAGE
            ram[off : off + PAGE] = self.ram[off : off + PAGE]
        for model, state in zip(_devices(machine), self.devices):
            model.restore(state)
        self.vm.apply(machine.vm)
        for vcpu, state in zip(machine.vcpus, self.vcpus):
            state.apply(vcpu)
        machine.dirty.collect()  # the copies back are not the guest's writes
        self.resets += 1
        return {"pages": len(pages), "seconds": time.monotonic() - start}
