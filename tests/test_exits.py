"""Decoding the kvm_run page into exit values, for every exit reason the x86 kernel returns."""

from __future__ import annotations

import dataclasses

import pytest

from pykvm import exits
from pykvm._ffi import ffi
from pykvm.constants import EXIT_IO_IN, EXIT_IO_OUT, ExitReason, InternalErrorSub

PAGE = 4096


@pytest.fixture
def page():
    buf = bytearray(PAGE)
    return buf, ffi.from_buffer("struct kvm_run *", buf)


def decode(page):
    buf, run = page
    return exits.decode(run, memoryview(buf))


def test_io_out_copies_the_data(page):
    buf, run = page
    run.exit_reason = ExitReason.IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = EXIT_IO_OUT, 2, 0x3F8, 3, 0x800
    buf[0x800:0x806] = b"aabbcc"
    exit = decode(page)
    assert exit == exits.IoOut(0x3F8, 2, 3, b"aabbcc")
    buf[0x800:0x806] = bytes(6)  # the next run overwrites the page; the exit keeps its copy
    assert exit.data == b"aabbcc" and exit.value == 0x6161


def test_io_in_reply_fills_every_item(page):
    buf, run = page
    run.exit_reason = ExitReason.IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = EXIT_IO_IN, 4, 0x600, 2, 0x800
    exit = decode(page)
    assert (type(exit), exit.port, exit.size, exit.count) == (exits.IoIn, 0x600, 4, 2)
    exit.reply(0x1_0203_0405)  # wider than the port: truncated to 4 bytes
    assert bytes(buf[0x800:0x808]) == bytes.fromhex("05040302") * 2


def test_mmio_write_and_read(page):
    buf, run = page
    run.exit_reason = ExitReason.MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xD0000000, 4, 1
    run.mmio.data[0:4] = [1, 2, 3, 4]
    assert decode(page) == exits.MmioWrite(0xD0000000, b"\x01\x02\x03\x04")
    run.mmio.is_write, run.mmio.len = 0, 2
    read = decode(page)
    assert (type(read), read.gpa, read.size) == (exits.MmioRead, 0xD0000000, 2)
    read.reply(0xBEEF)
    assert list(run.mmio.data[0:2]) == [0xEF, 0xBE]


def test_internal_error_with_instruction_bytes(page):
    buf, run = page
    run.exit_reason = ExitReason.INTERNAL_ERROR
    run.emulation_failure.suberror = InternalErrorSub.EMULATION
    run.emulation_failure.ndata = 3
    run.emulation_failure.flags = 1
    run.emulation_failure.insn_size = 3
    run.emulation_failure.insn_bytes[0:3] = [0x0F, 0x01, 0xD0]  # xgetbv
    exit = decode(page)
    assert exit.suberror_name == "EMULATION" and exit.insn_bytes == b"\x0f\x01\xd0" and len(exit.data) == 3


SIMPLE = {
    ExitReason.HLT: exits.Hlt(),
    ExitReason.SHUTDOWN: exits.Shutdown(),
    ExitReason.INTR: exits.Intr(),
    ExitReason.IRQ_WINDOW_OPEN: exits.IrqWindowOpen(),
    ExitReason.NMI: exits.Nmi(),
    ExitReason.SET_TPR: exits.SetTpr(),
    ExitReason.DIRTY_RING_FULL: exits.DirtyRingFull(),
    ExitReason.AP_RESET_HOLD: exits.ApResetHold(),
    ExitReason.X86_BUS_LOCK: exits.X86BusLock(),
}


@pytest.mark.parametrize("reason, expected", SIMPLE.items(), ids=[r.name for r in SIMPLE])
def test_exits_without_data(page, reason, expected):
    page[1].exit_reason = reason
    assert decode(page) == expected


def test_exits_with_fields(page):
    buf, run = page
    cases = []
    run.exit_reason = ExitReason.FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x21, 1
    cases.append((decode(page), exits.FailEntry(0x21, 1)))
    run.exit_reason = ExitReason.EXCEPTION
    run.ex.exception, run.ex.error_code = 13, 0x18
    cases.append((decode(page), exits.ExceptionExit(13, 0x18)))
    run.exit_reason = ExitReason.DEBUG
    run.debug.arch.exception, run.debug.arch.pc, run.debug.arch.dr6, run.debug.arch.dr7 = 1, 0x1000, 0x4000, 0x400
    cases.append((decode(page), exits.Debug(1, 0x1000, 0x4000, 0x400)))
    run.exit_reason = ExitReason.HYPERCALL
    run.hypercall.nr, run.hypercall.args, run.hypercall.longmode = 12, [1, 2, 3, 4, 5, 6], 1
    cases.append((decode(page), exits.Hypercall(12, (1, 2, 3, 4, 5, 6), True)))
    run.exit_reason = ExitReason.TPR_ACCESS
    run.tpr_access.rip, run.tpr_access.is_write = 0x2000, 1
    cases.append((decode(page), exits.TprAccess(0x2000, True)))
    run.exit_reason = ExitReason.SYSTEM_EVENT
    run.system_event.type, run.system_event.ndata, run.system_event.data[0] = 2, 1, 7
    cases.append((decode(page), exits.SystemEvent(2, (7,))))
    run.exit_reason = ExitReason.IOAPIC_EOI
    run.eoi.vector = 0x31
    cases.append((decode(page), exits.IoapicEoi(0x31)))
    run.exit_reason = ExitReason.X86_RDMSR
    run.msr.index, run.msr.reason = 0x1B, 4
    cases.append((decode(page), exits.X86Rdmsr(0x1B, 4)))
    run.exit_reason = ExitReason.X86_WRMSR
    run.msr.data = 0xFEE00900
    cases.append((decode(page), exits.X86Wrmsr(0x1B, 4, 0xFEE00900)))
    run.exit_reason = ExitReason.NOTIFY
    run.notify.flags = 1
    cases.append((decode(page), exits.Notify(1)))
    run.exit_reason = ExitReason.XEN
    run.xen.type, run.xen.u.hcall.longmode, run.xen.u.hcall.cpl, run.xen.u.hcall.input = 1, 1, 0, 24
    cases.append((decode(page), exits.Xen(1, True, 0, 24, tuple(run.xen.u.hcall.params))))
    run.exit_reason = ExitReason.UNKNOWN
    run.hw.hardware_exit_reason = 0x7B
    cases.append((decode(page), exits.Unknown(0, 0x7B)))
    for got, want in cases:
        assert got == want


def test_unknown_reason_keeps_its_number(page):
    page[1].exit_reason = 250
    assert decode(page) == exits.Unknown(250)


def test_every_x86_exit_reason_has_a_decoder():
    x86 = set(ExitReason) - {r for r in ExitReason if r.name.startswith(("S390", "RISCV", "ARM", "LOONGARCH"))}
    x86 -= {ExitReason.DCR, ExitReason.OSI, ExitReason.PAPR_HCALL, ExitReason.WATCHDOG, ExitReason.EPR}
    assert x86 <= set(exits._DECODERS)


def test_exits_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        exits.Hypercall(1, (), False).nr = 2


def test_hot_builders_make_the_same_values():
    """io_exit / mmio_exit / msr_exit (what Vcpu.run builds with) equal the classes' own constructors."""
    view = memoryview(bytearray(4))
    out = exits.io_exit(EXIT_IO_OUT, 1, 0xE9, 1, b"A")
    assert out == exits.IoOut(0xE9, 1, 1, b"A") and repr(out) == repr(exits.IoOut(0xE9, 1, 1, b"A"))
    assert hash(out) == hash(exits.IoOut(0xE9, 1, 1, b"A"))
    assert exits.io_exit(EXIT_IO_IN, 4, 0x600, 1, view) == exits.IoIn(0x600, 4, 1, view)
    assert exits.mmio_exit(0xD0000000, 1, b"\x01\x02") == exits.MmioWrite(0xD0000000, b"\x01\x02")
    read = exits.mmio_exit(0xD0000000, 0, view[:2])
    assert type(read) is exits.MmioRead and read.size == 2
    assert exits.msr_exit(ExitReason.X86_RDMSR, 4, 0x1B, 0) == exits.X86Rdmsr(0x1B, 4)
    assert exits.msr_exit(ExitReason.X86_WRMSR, 4, 0x1B, 7) == exits.X86Wrmsr(0x1B, 4, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.port = 0x80
    assert [f.name for f in dataclasses.fields(out)] == ["port", "size", "count", "data"]
