"""Put a vCPU into one of the modes tiny guests start in, with tables written into guest memory."""

from __future__ import annotations

import enum
import errno
import functools
from collections.abc import Mapping
from types import MappingProxyType

from ..ioctl import KvmError, KvmUnsupportedError
from . import layout, paging, tables

CR0_PE, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_LA57 = 1 << 4, 1 << 5, 1 << 9, 1 << 10, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_FIXED = 1 << 1


class Mode(str, enum.Enum):
    """The CPU modes ``pykvm run --mode`` sets up."""

    REAL = "real"  # 16-bit real mode
    PROTECTED = "protected"  # 32-bit protected mode, flat segments, no paging
    PAGED = "paged"  # 32-bit protected mode with 32-bit paging (4 MiB pages)
    PAE = "pae"  # 32-bit protected mode with PAE paging (2 MiB pages)
    LONG = "long"  # 64-bit long mode, 4-level paging (5-level with la57)

    @property
    def default_load(self) -> int:
        return layout.REAL_LOAD if self is Mode.REAL else layout.PROTECTED_LOAD

    @property
    def bits(self) -> int:
        return {Mode.REAL: 16, Mode.LONG: 64}.get(self, 32)


@functools.lru_cache(maxsize=None)
def system_tables(mode: Mode, la57: bool = False) -> Mapping[int, bytes]:
    """Everything the set-up writes into guest memory for ``mode``: {gpa: bytes}, read-only and
    built once per (mode, la57) (they are the same for every machine: a machine's set-up would
    otherwise spend about a millisecond building page tables it built before)."""
    return MappingProxyType(_system_tables(mode, la57))


def _system_tables(mode: Mode, la57: bool) -> dict[int, bytes]:
    stubs = {layout.EXCEPTION_STUBS: tables.stubs_bytes()}
    if mode is Mode.REAL:
        return {layout.REAL_IVT: tables.ivt_bytes(), **stubs}
    long_mode = mode is Mode.LONG
    out = {
        layout.GDT: tables.gdt_bytes(),
        layout.IDT: tables.idt_bytes(long_mode),
        layout.TSS: tables.tss_bytes(long_mode),
        **stubs,
    }
    if mode is Mode.PAGED:
        out.update(paging.pages_32bit())
    elif mode is Mode.PAE:
        out.update(paging.pages_pae())
    elif long_mode:
        out.update(paging.pages_long(la57))
    return out


def setup_sregs(sregs, mode: Mode, la57: bool = False) -> None:
    """Fill ``struct kvm_sregs`` for ``mode`` (tables from :func:`system_tables` must be in memory)."""
    if mode is Mode.REAL:
        tables.real_segment(0, code=True).load(sregs.cs)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs):
            tables.real_segment(0).load(seg)
        tables.real_segment(layout.STACK_TOP >> 4 & 0xF000).load(sregs.ss)
        sregs.idt.base, sregs.idt.limit = layout.REAL_IVT, 0x3FF
        sregs.cr0 = CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
        return
    code = tables.CODE64 if mode is Mode.LONG else tables.CODE32
    code.load(sregs.cs)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        tables.DATA.load(seg)
    tables.TSS.load(sregs.tr)
    sregs.ldt.unusable = 1
    sregs.ldt.selector = 0
    sregs.gdt.base, sregs.gdt.limit = layout.GDT, 8 * layout.GDT_ENTRIES - 1
    sregs.idt.base = layout.IDT
    sregs.idt.limit = 256 * (16 if mode is Mode.LONG else 8) - 1
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    sregs.cr4 = 0
    sregs.efer = 0
    if mode is Mode.PAGED:
        sregs.cr4 = CR4_PSE
        sregs.cr3 = layout.PD
    elif mode is Mode.PAE:
        sregs.cr4 = CR4_PAE
        sregs.cr3 = layout.PDPT
    elif mode is Mode.LONG:
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_LA57 if la57 else 0)
        sregs.cr3 = layout.PML5 if la57 else layout.PML4
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE
    if mode is not Mode.PROTECTED:
        sregs.cr0 |= CR0_PG | CR0_WP


def setup_regs(regs, mode: Mode, entry: int) -> None:
    """Zero the general registers, then set RIP (``entry``), the stack pointer and RFLAGS."""
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rflags = RFLAGS_FIXED
    if mode is Mode.REAL:
        if entry > 0xFFFF:
            raise ValueError(f"real-mode entry {entry:#x} must be below 64 KiB (CS = 0)")
        regs.rsp = layout.STACK_TOP & 0xFFFF
    else:
        if mode is not Mode.LONG and entry > 0xFFFFFFFF:
            raise ValueError(f"{mode.value}-mode entry {entry:#x} must be below 4 GiB")
        regs.rsp = layout.STACK_TOP
    regs.rip = entry


def setup_mode(vcpu, memory, mode: Mode, entry: int, la57: bool = False) -> None:
    """Write the system tables for ``mode`` into ``memory`` and load the vCPU's registers.

    Raises KvmUnsupportedError when KVM silently drops part of the mode (kvm_pvm, for one, keeps
    CR0.PG only in long mode, so 32-bit and PAE paging cannot run there)."""
    for gpa, data in system_tables(mode, la57).items():
        memory.write(gpa, data)
    sregs = vcpu.get_sregs()
    setup_sregs(sregs, mode, la57)
    wanted = {name: getattr(sregs, name) for name in ("cr0", "cr3", "cr4", "efer")}
    try:
        vcpu.set_sregs(sregs)
    except KvmError as e:
        refused = _refused_part(vcpu, mode, la57) if e.errno == errno.EINVAL else None
        if refused is None:
            raise
        raise KvmUnsupportedError(f"{_backend()} cannot run {mode.value} mode with {refused}: "
                                  f"KVM_SET_SREGS refused it (EINVAL), although KVM's supported "
                                  f"CPUID offers it") from e  # fmt: skip
    got = vcpu.get_sregs()
    lost = [f"{name}={value:#x} (kept {getattr(got, name):#x})" for name, value in wanted.items()
            if getattr(got, name) & value != value]
    if lost:
        raise KvmUnsupportedError(f"{_backend()} cannot run {mode.value} mode: it refused " + ", ".join(lost))
    regs = vcpu.get_regs()
    setup_regs(regs, mode, entry)
    vcpu.set_regs(regs)


def _backend() -> str:
    from ..probe.host import kvm_backend

    return kvm_backend() or "this KVM"


def _refused_part(vcpu, mode: Mode, la57: bool) -> str | None:
    """After KVM_SET_SREGS refused ``mode`` with EINVAL: the optional part of it that the backend
    refuses although KVM's supported CPUID offers it (kvm_pvm on Intel hosts: CR4.LA57), found by
    loading the same mode without that part. None: the state without it was refused too, so the
    refusal is not the backend's limit but a bad state."""
    if la57:
        name, without = "5-level paging (CR4.LA57)", mode  # the same mode, 4-level
    elif mode in (Mode.PAGED, Mode.PAE):
        name, without = "paging outside long mode (CR0.PG)", Mode.PROTECTED
    else:
        return None
    sregs = vcpu.get_sregs()
    setup_sregs(sregs, without)
    try:
        vcpu.set_sregs(sregs)
    except KvmError:
        return None
    return name


def cpu_mode(sregs) -> Mode:
    """The mode a vCPU is in now, from its control registers (PROTECTED for any unpaged 32-bit code)."""
    if not sregs.cr0 & CR0_PE:
        return Mode.REAL
    if sregs.efer & EFER_LMA:
        return Mode.LONG
    if not sregs.cr0 & CR0_PG:
        return Mode.PROTECTED
    return Mode.PAE if sregs.cr4 & CR4_PAE else Mode.PAGED


def code_bits(sregs) -> int:
    """Width of the code running now: 16, 32 or 64 (from CS.L and CS.D)."""
    if not sregs.cr0 & CR0_PE:
        return 16
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16
