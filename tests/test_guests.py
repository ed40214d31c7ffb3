"""pykvm's guests under the real /dev/kvm: every mode, the host protocol, I/O, MMIO, faults."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from pykvm import exits
from pykvm.ioctl import KvmUnsupportedError
from pykvm.machine import GuestException, GuestTimeout, Machine, TripleFault, UnexpectedExit
from pykvm.x86 import layout

pytestmark = pytest.mark.kvm

PVM_NO_32BIT_PAGING = (
    "kvm_pvm keeps CR0.PG only in long mode (32-bit and PAE paging guests shut down): "
    "the page tables are checked offline in test_x86_setup.py"
)


@pytest.mark.parametrize("mode", ["real", "protected", "paged", "pae", "long"])
def test_hello_in_every_mode(guest, backend, mode):
    if backend == "kvm_pvm" and mode in ("paged", "pae"):
        pytest.skip(PVM_NO_32BIT_PAGING)
    with Machine() as m:
        m.load_flat(guest(f"hello_{mode}"), mode)
        outcome = m.run(timeout=10)
    assert outcome.ok
    assert m.console_output == f"Hello from {mode} mode\n".encode()
    assert outcome.exits == len(m.console_output) + 1  # one IoOut per byte, then DONE


@pytest.mark.parametrize("mode", ["paged", "pae"])
def test_pvm_refuses_32bit_paging_with_the_backend_named(guest, backend, mode):
    if backend != "kvm_pvm":
        pytest.skip(f"only kvm_pvm drops CR0.PG outside long mode (this host: {backend})")
    with Machine() as m:
        with pytest.raises(KvmUnsupportedError, match=f"kvm_pvm cannot run {mode} mode: it refused cr0="):
            m.load_flat(guest(f"hello_{mode}"), mode)


def test_each_exit_of_a_hello_guest(guest):
    """The bare loop: Vcpu.run() hands out IoOut exits, one per console byte, then the DONE call."""
    with Machine() as m:
        m.load_flat(guest("hello_real"), "real")
        seen = []
        while True:
            exit = m.vcpu.run()
            assert isinstance(exit, exits.IoOut)
            if exit.port == layout.CALL_PORT:
                break
            assert (exit.port, exit.size, exit.count) == (layout.CONSOLE_PORT, 1, 1)
            seen.append(bytes(exit.data))
    assert b"".join(seen) == b"Hello from real mode\n"
    assert exit.value == layout.CALL_DONE


def test_cpuid_vendor_and_cpl(guest, kvm):
    leaf0 = next(e for e in kvm.get_supported_cpuid() if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx)).decode()
    with Machine(kvm=kvm) as m:
        m.load_flat(guest("cpuid_cpl"), "long")
        outcome = m.run(timeout=10)
    assert outcome.ok
    assert m.console_output.decode() == f"vendor: {vendor}\ncpl: 0\ncpl: 3\n"
    assert outcome.exits == 1 + 7 + 7 + 1  # PRINT of the vendor line, two lines byte by byte, DONE


def test_port_io_string_io_mmio_and_hlt(guest):
    """io.S, exit by exit: port I/O both ways, rep outsb/insb, MMIO write and read, HLT."""
    with Machine() as m:
        m.load_flat(guest("io"), "protected")
        run = m.vcpu.run
        outs = [run() for _ in range(3)]
        assert [(e.port, e.size, e.value) for e in outs] == [
            (layout.TEST_PORT, 1, 0x11), (layout.TEST_PORT, 2, 0x2222), (layout.TEST_PORT, 4, 0x33333333)
        ]
        replies = {1: 0x7F, 2: 0x1234, 4: 0x01020304}
        for size in (1, 2, 4):
            e = run()
            assert isinstance(e, exits.IoIn) and (e.port, e.size, e.count) == (layout.TEST_PORT, size, 1)
            e.reply(replies[size])
        total = run()
        assert isinstance(total, exits.IoOut) and total.value == sum(replies.values())
        # rep outsb: KVM may hand the string over in one exit or several; join the data.
        string = b""
        while len(string) < 8:
            e = run()
            assert isinstance(e, exits.IoOut) and (e.port, e.size) == (layout.TEST_PORT, 1)
            string += bytes(e.data)
        assert string == b"STRINGIO"
        ins = run()
        assert isinstance(ins, exits.IoIn) and (ins.port, ins.size, ins.count) == (layout.TEST_PORT, 1, 4)
        ins.data[:] = b"abcd"
        echo = b""
        while len(echo) < 4:
            e = run()
            assert isinstance(e, exits.IoOut) and e.port == layout.TEST_PORT + 1
            echo += bytes(e.data)
        assert echo == b"abcd"
        write = run()
        assert write == exits.MmioWrite(layout.MMIO_WINDOW, struct.pack("<I", 0x44444444))
        read = run()
        assert isinstance(read, exits.MmioRead) and (read.gpa, read.size) == (layout.MMIO_WINDOW + 8, 4)
        read.reply(0xCAFEF00D)
        assert run() == exits.MmioWrite(layout.MMIO_WINDOW + 4, struct.pack("<I", 0xCAFEF00D))
        assert isinstance(run(), exits.Hlt)
        done = run()
        assert (done.port, done.value) == (layout.CALL_PORT, layout.CALL_DONE)


def test_sync_resumes_the_guest(guest):
    with Machine() as m:
        seen = []
        m.on_sync = seen.append
        m.load_flat(guest("sync"), "protected")
        assert m.run(timeout=10).ok
    assert m.syncs == seen == [1, 2, 3]


def test_fail_carries_line_value_and_message(guest):
    with Machine() as m:
        m.load_flat(guest("fail"), "long")
        outcome = m.run(timeout=10)
    assert outcome.status == 1 and not outcome.ok
    assert (outcome.failure.line, outcome.failure.value) == (12, 0x2A)
    assert outcome.failure.message == "fail.S: expected failure"


def test_memory_slots_read_only_and_second_ram(guest):
    with Machine() as m:
        m.vm.add_memory(layout.TEST_ROM, 0x1000, readonly=True)
        ram2 = m.vm.add_memory(layout.TEST_RAM2, 0x1000)
        m.memory.write_u32(layout.TEST_ROM, 0xFEEDFACE)  # the host may write a read-only slot
        rom_writes = []
        m.bus.add_mmio(layout.TEST_ROM, 0x1000, lambda exit, vcpu: rom_writes.append(exit))
        m.load_flat(guest("memory"), "long")
        assert m.run(timeout=10).ok
        assert m.syncs == [0xFEEDFACE, 0xFEEDFACE, 0x5A5A1234]
        assert rom_writes == [exits.MmioWrite(layout.TEST_ROM, struct.pack("<I", 0x0BADC0DE))]
        assert ram2.view(layout.TEST_RAM2, 4).tobytes() == struct.pack("<I", 0x5A5A1234)


def test_triple_fault_is_reported_with_registers(guest, backend):
    with Machine() as m:
        m.load_flat(guest("triple_fault"), "long")
        assert isinstance(m.vcpu.run(), exits.Shutdown)  # the raw exit
        m.load_flat(guest("triple_fault"), "long")
        with pytest.raises(TripleFault) as info:
            m.run(timeout=10)
    state = info.value.state
    if backend == "kvm_amd":  # svm.c's shutdown_interception re-initialises the VMCB before the exit
        assert state.is_reset_state and state.mode == "real"
        assert "KVM had already reset the vCPU" in str(info.value)
        return
    assert not state.is_reset_state and "reset" not in str(info.value)
    assert state.mode == "long"
    assert state.code[:2] == b"\x0f\x0b" and state.instruction == "ud2"
    assert "rip=0000000000100007" in info.value.report()


def test_unhandled_exception_vector_is_reported(guest):
    with Machine() as m:
        m.load_flat(guest("page_fault"), "long")
        with pytest.raises(GuestException, match=r"#PF \(vector 14\) at rip=0x100000 .*cr2=0x100000000") as info:
            m.run(timeout=10)
    assert (info.value.vector, info.value.error_code, info.value.rip) == (14, 0, 0x100000)
    assert info.value.state.control["cr2"] == 0x100000000


def test_unmapped_write_is_reported_as_an_unexpected_mmio_exit(guest):
    with Machine() as m:
        m.load_flat(guest("wild_write"), "long")
        with pytest.raises(UnexpectedExit, match=r"MmioWrite\(gpa=0xe0000000, data=55\)") as info:
            m.run(timeout=10)
    assert info.value.state.regs["rax"] == 0xE0000000


def test_runaway_guest_is_stopped_by_the_timeout(guest):
    with Machine() as m:
        m.load_flat(guest("spin"), "real")
        with pytest.raises(GuestTimeout, match="0.5 s timeout") as info:
            m.run(timeout=0.5)
    assert m.console_output == b"spinning\n"
    assert info.value.state.code[:2] == b"\xeb\xfe"  # jmp .


def test_the_reset_state_is_told_from_a_state_that_ran():
    from pykvm.report import CpuState

    regs = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                 "r11", "r12", "r13", "r14", "r15", "rflags")}  # fmt: skip
    reset = CpuState(regs={**regs, "rip": 0xFFF0}, segments={"cs": (0xF000, 0xFFFF0000, 0xFFFF)},
                     control={"cr0": 0x60000010}, mode="real", bits=16, rip_linear=0xFFFFFFF0, code=b"")  # fmt: skip
    assert reset.is_reset_state
    assert not dataclasses.replace(reset, control={"cr0": 0x60000011}).is_reset_state  # protected mode
    assert not dataclasses.replace(reset, regs={**regs, "rip": 0x7C00}).is_reset_state
    assert not dataclasses.replace(reset, segments={"cs": (0xF000, 0xF0000, 0xFFFF)}).is_reset_state  # CS loaded
