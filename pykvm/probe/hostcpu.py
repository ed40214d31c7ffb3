"""The host processor's own CPUID and MSRs, read from this process.

CPUID is executed directly: a 27-byte x86-64 function is written into an anonymous
read/write/execute page and called through cffi. Where the kernel refuses a writable and
executable mapping (SELinux ``execmem``, PaX), the ``cpuid`` driver's ``/dev/cpu/0/cpuid`` is read
instead. MSRs come from the ``msr`` driver's ``/dev/cpu/N/msr``.

Nothing here raises for an environment problem: each function returns its data with a one-line
error (saying the fix where there is one), and ``None``/empty data where nothing could be read.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .._ffi import ffi
from .cpuid import EXTENDED_BASE, HYPERVISOR_BASE, CpuidRegs, CpuidTable, vendor

__all__ = [
    "CPUID_CODE",
    "DEV_CPU",
    "SOURCE_DEVICE",
    "SOURCE_INSTRUCTION",
    "SOURCE_NONE",
    "enumerate_cpuid",
    "host_cpuid",
    "read_host_msrs",
]

#: Where the ``cpuid`` and ``msr`` drivers put their per-CPU device files.
DEV_CPU = Path("/dev/cpu")

SOURCE_INSTRUCTION = "cpuid instruction"
SOURCE_DEVICE = "/dev/cpu/0/cpuid"
SOURCE_NONE = "none"

#: ``void f(uint32_t leaf, uint32_t subleaf, uint32_t out[4])`` (System V AMD64 ABI).
CPUID_CODE = bytes.fromhex(
    "53"  # push rbx              (callee-saved; CPUID overwrites it)
    "89f8"  # mov eax, edi        leaf
    "89f1"  # mov ecx, esi        subleaf
    "4989d0"  # mov r8, rdx       out
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8+4], ebx
    "41894808"  # mov [r8+8], ecx
    "4189500c"  # mov [r8+12], edx
    "5b"  # pop rbx
    "c3"  # ret
)

Reader = Callable[[int, int], CpuidRegs]

#: Upper bounds that keep enumeration finite whatever a (virtual) CPU answers.
MAX_SUBLEAVES = 64
MAX_LEAVES_PER_RANGE = 0x100


# ---------------------------------------------------------------------------------------------
# Enumeration (pure: works on any reader)
# ---------------------------------------------------------------------------------------------

#: Centaur/Zhaoxin processors have a range of their own, read only on those vendors.
CENTAUR_BASE = 0xC000_0000
_CENTAUR_VENDORS = frozenset({"CentaurHauls", "  Shanghai  "})
#: Leaves whose sub-leaf 0 EAX is the highest sub-leaf.
_MAX_IN_EAX = frozenset({0x7, 0x14, 0x17, 0x18, 0x1D, 0x24})
#: Topology leaves: sub-leaves run until the level type (ECX[15:8]) is 0.
_TOPOLOGY = frozenset({0xB, 0x1F, 0x8000_0026})
#: Cache-descriptor leaves: sub-leaves run until the cache type (EAX[4:0]) is 0.
_CACHES = frozenset({0x4, 0x8000_001D})


def _bits_set(mask: int, start: int) -> list[int]:
    return [b for b in range(start, MAX_SUBLEAVES) if (mask >> b) & 1]


def _subleaves(leaf: int, read: Reader) -> dict[int, CpuidRegs]:
    """Every sub-leaf of ``leaf`` that the leaf defines (sub-leaf 0 alone for plain leaves)."""
    first = read(leaf, 0)
    out = {0: first}

    def until(stop: Callable[[CpuidRegs], bool], start: int = 1) -> None:
        for sub in range(start, MAX_SUBLEAVES):
            regs = read(leaf, sub)
            if stop(regs):
                return
            out[sub] = regs

    if leaf in _MAX_IN_EAX:
        for sub in range(1, min(first.eax, MAX_SUBLEAVES - 1) + 1):
            out[sub] = read(leaf, sub)
    elif leaf in _TOPOLOGY:
        until(lambda r: (r.ecx >> 8) & 0xFF == 0)
    elif leaf in _CACHES:
        until(lambda r: r.eax & 0x1F == 0)
    elif leaf == 0xD:  # XSAVE: 0 and 1, then one per state component in XCR0 | IA32_XSS
        second = out[1] = read(leaf, 1)
        mask = first.eax | first.edx << 32 | second.ecx | second.edx << 32
        out.update((sub, read(leaf, sub)) for sub in _bits_set(mask, 2))
    elif leaf == 0xF:  # RDT monitoring: one sub-leaf per resource bit of EDX
        out.update((sub, read(leaf, sub)) for sub in _bits_set(first.edx, 1))
    elif leaf in (0x10, 0x8000_0020):  # RDT allocation / AMD PQoS: one per resource bit of EBX
        out.update((sub, read(leaf, sub)) for sub in _bits_set(first.ebx, 1))
    elif leaf == 0x12:  # SGX: 0 and 1, then EPC sections until the sub-leaf type (EAX[3:0]) is 0
        out[1] = read(leaf, 1)
        until(lambda r: r.eax & 0xF == 0, start=2)
    return out


def _range(read: Reader, base: int, top: int, table: dict[tuple[int, int], CpuidRegs]) -> None:
    for leaf in range(base, min(top, base + MAX_LEAVES_PER_RANGE - 1) + 1):
        table.update(((leaf, sub), regs) for sub, regs in _subleaves(leaf, read).items())


def enumerate_cpuid(read: Reader) -> CpuidTable:
    """Walk the basic, hypervisor, extended (and Centaur) ranges as cpuid tools do, sub-leaves bounded.

    ``read(leaf, subleaf)`` executes CPUID once. Hypervisor leaves are read only when leaf 1
    ECX[31] says a hypervisor is present (bare metal answers them with unrelated data); each
    0x100-leaf hypervisor block (Hyper-V-compatible KVM puts its own at 0x40000100) is kept only
    if its first leaf's EAX names a maximum inside the block.
    """
    table: dict[tuple[int, int], CpuidRegs] = {}
    _range(read, 0, read(0, 0).eax, table)
    leaf1 = table.get((1, 0))
    if leaf1 is not None and leaf1.ecx >> 31:
        for base in range(HYPERVISOR_BASE, HYPERVISOR_BASE + 0x1000, 0x100):
            top = read(base, 0).eax
            if base <= top <= base + 0xFF:
                _range(read, base, top, table)
    top = read(EXTENDED_BASE, 0).eax
    if EXTENDED_BASE <= top <= EXTENDED_BASE + 0xFFFF:
        _range(read, EXTENDED_BASE, top, table)
    if vendor(CpuidTable(table)) in _CENTAUR_VENDORS:
        top = read(CENTAUR_BASE, 0).eax
        if CENTAUR_BASE <= top <= CENTAUR_BASE + 0xFF:
            _range(read, CENTAUR_BASE, top, table)
    return CpuidTable(table)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _open(path: Path) -> int:
    """Open a device read-only (one place, so tests can stand in for the kernel's answer)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def _instruction_reader() -> Iterator[Reader]:
    """Execute CPUID from a small function in an anonymous W+X page."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    with mmap.mmap(-1, mmap.PAGESIZE, prot=prot) as page:
        page[: len(CPUID_CODE)] = CPUID_CODE
        out = ffi.new("uint32_t[4]")
        with ffi.from_buffer(page) as code:
            func = ffi.cast("void(*)(uint32_t, uint32_t, uint32_t *)", code)

            def read(leaf: int, subleaf: int) -> CpuidRegs:
                func(leaf, subleaf, out)
                return CpuidRegs(*out)

            yield read


@contextlib.contextmanager
def _device_reader() -> Iterator[Reader]:
    """Read CPU 0's CPUID through the ``cpuid`` driver (offset = leaf | subleaf << 32)."""
    fd = _open(DEV_CPU / "0" / "cpuid")
    try:

        def read(leaf: int, subleaf: int) -> CpuidRegs:
            data = os.pread(fd, 16, leaf | subleaf << 32)
            if len(data) != 16:
                raise OSError(errno.EIO, f"short read of CPUID {leaf:#x}/{subleaf:#x}")
            return CpuidRegs(*(int.from_bytes(data[i : i + 4], "little") for i in range(0, 16, 4)))

        yield read
    finally:
        os.close(fd)


def _instruction_error(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            "the kernel refused a writable+executable mapping to run CPUID from "
            "(a W^X policy such as SELinux deny_execmem)"
        )
    return f"cannot run the CPUID instruction: {err.strerror or err}"


def _device_error(err: OSError) -> str:
    path = DEV_CPU / "0" / "cpuid"
    if err.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        return f"{path} is missing: load the cpuid module (modprobe cpuid)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"reading {path} needs root"
    return f"cannot read {path}: {err.strerror or err}"


def host_cpuid() -> tuple[CpuidTable | None, str, str | None]:
    """This host's CPUID as ``(table, source, error)``.

    ``source`` is :data:`SOURCE_INSTRUCTION` or :data:`SOURCE_DEVICE` (:data:`SOURCE_NONE` when
    nothing worked). ``error`` reports every source that failed, also when a fallback then worked
    (the table is ``None`` only if all failed).
    """
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64") or sys.maxsize <= 1 << 32:
        bits = 64 if sys.maxsize > 1 << 32 else 32
        return None, SOURCE_NONE, f"reading CPUID needs x86-64 (and a 64-bit Python); this is {machine}, {bits}-bit"
    errors: list[str] = []
    for source, reader, explain in (
        (SOURCE_INSTRUCTION, _instruction_reader, _instruction_error),
        (SOURCE_DEVICE, _device_reader, _device_error),
    ):
        try:
            with reader() as read:
                table = enumerate_cpuid(read)
        except OSError as e:
            errors.append(explain(e))
            continue
        return table, source, "; ".join(errors) or None
    return None, SOURCE_NONE, "; ".join(errors)


# ---------------------------------------------------------------------------------------------
# MSRs
# ---------------------------------------------------------------------------------------------


def read_host_msrs(indices: Iterable[int], cpu: int = 0) -> tuple[dict[int, int], str | None]:
    """Values of MSRs ``indices`` on ``cpu`` from ``/dev/cpu/N/msr``, as ``(values, error)``.

    An MSR the CPU does not have (the read faults: EIO, or no data) is left out of ``values``
    without an error. ``error`` says why nothing (or not everything) could be read. An index
    outside 32 bits is the caller's mistake: ``ValueError``.
    """
    indices = list(indices)
    bad = [i for i in indices if not 0 <= i < 1 << 32]
    if bad:
        raise ValueError(f"MSR index {bad[0]:#x} is out of range")
    path = DEV_CPU / str(cpu) / "msr"
    try:
        fd = _open(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            why = "load the msr module (modprobe msr) to read VMX capability MSRs from the hardware"
            return {}, f"{path} is missing: {why}"
        if e.errno in (errno.EACCES, errno.EPERM):
            return {}, f"needs root (CAP_SYS_RAWIO) to read {path}"
        return {}, f"cannot open {path}: {e.strerror or e}"
    values: dict[int, int] = {}
    try:
        for index in indices:
            try:
                data = os.pread(fd, 8, index)
            except OSError as e:
                if e.errno == errno.EIO:
                    continue
                return values, f"reading MSR {index:#x} from {path}: {e.strerror or e}"
            if len(data) == 8:
                values[index] = int.from_bytes(data, "little")
    finally:
        os.close(fd)
    return values, None
