"""Machine.complete_hint_nop: instructions KVM's emulator gives up on whose effect is trivial."""

from __future__ import annotations

import pytest

from pykvm import exits
from pykvm.constants import InternalErrorSub
from pykvm.machine import RFLAGS_AC, UnexpectedExit


def failure(code: bytes) -> exits.InternalError:
    return exits.InternalError(InternalErrorSub.EMULATION, (1,), code + b"\x90" * (15 - len(code)))


@pytest.mark.kvm
@pytest.mark.parametrize("code, size", [
    (b"\xf3\x0f\x1e\xfa", 4),        # endbr64
    (b"\xf3\x48\x0f\x1e\xc8", 5),    # rdsspq rax
    (b"\x0f\x1f\x44\x00\x00", 5),    # nop dword ptr [rax + rax]
    (b"\x0f\x18\x00", 3),            # prefetchnta: a hint
])
def test_hint_nops_are_stepped_over(kvm_machine, code, size):
    m = kvm_machine("long")
    rip = m.vcpu.get_regs().rip
    assert m.complete_hint_nop(failure(code), m.vcpu)
    assert m.vcpu.get_regs().rip == rip + size and m.hint_nops_completed == 1


@pytest.mark.kvm
def test_clac_and_stac_change_only_rflags_ac(kvm_machine):
    m = kvm_machine("long")
    rip = m.vcpu.get_regs().rip
    assert m.complete_hint_nop(failure(b"\x0f\x01\xcb"), m.vcpu)  # stac
    regs = m.vcpu.get_regs()
    assert regs.rflags & RFLAGS_AC and regs.rip == rip + 3
    assert m.complete_hint_nop(failure(b"\x0f\x01\xca"), m.vcpu)  # clac
    assert not m.vcpu.get_regs().rflags & RFLAGS_AC


@pytest.mark.kvm
def test_anything_else_still_stops_the_guest(kvm_machine):
    m = kvm_machine("long")
    rip = m.vcpu.get_regs().rip
    assert not m.complete_hint_nop(failure(b"\x0f\x0b"), m.vcpu)  # ud2
    assert not m.complete_hint_nop(exits.InternalError(InternalErrorSub.EMULATION, (1,), b""), m.vcpu)
    with pytest.raises(UnexpectedExit, match="InternalError"):
        m._internal_error(failure(b"\x0f\x0b"), m.vcpu)
    assert m.vcpu.get_regs().rip == rip and m.hint_nops_completed == 0


@pytest.mark.kvm
def test_a_guest_using_them_at_cpl0_runs_on(guest_asm, run_guest):
    """On kvm_pvm, CPL0 code goes through KVM's emulator, which lacks these; on VMX/SVM they run natively."""
    result = run_guest(guest_asm("endbr64\nrdsspq %rax\nnopl 0(%rax,%rax)\nmov $1, %eax"))
    assert result.ok


@pytest.mark.kvm
def test_fwait_is_stepped_over_unless_it_must_fault(kvm_machine):
    m = kvm_machine("long")
    rip = m.vcpu.get_regs().rip
    assert m.complete_hint_nop(failure(b"\x9b"), m.vcpu)  # fwait: nothing pending
    assert m.vcpu.get_regs().rip == rip + 1
    sregs = m.vcpu.get_sregs()
    sregs.cr0 |= 0x0A  # CR0.TS | CR0.MP: FWAIT raises #NM, left to the failure
    m.vcpu.set_sregs(sregs)
    assert not m.complete_hint_nop(failure(b"\x9b"), m.vcpu)
    assert m.vcpu.get_regs().rip == rip + 1


@pytest.mark.kvm
def test_int3_raises_a_breakpoint_trap(kvm_machine, backend):
    from pykvm.machine import GuestException

    if backend != "kvm_pvm":
        pytest.skip(f"{backend} runs INT3 itself (the next test); complete_int3 is for kvm_pvm's emulator, "
                    "and VMX/SVM KVM would inject a #BP from user space as a soft exception at the INT3")
    m = kvm_machine("long")
    rip = m.vcpu.get_regs().rip
    assert not m.complete_int3(failure(b"\x0f\x0b"), m.vcpu)  # only INT3
    assert m.vcpu.get_regs().rip == rip and m.hint_nops_completed == 0
    assert m.complete_int3(failure(b"\xcc"), m.vcpu)
    assert m.vcpu.get_regs().rip == rip + 1  # a trap: the return address is after the INT3
    with pytest.raises(GuestException) as info:  # delivered at the next entry, to pykvm's stub for #BP
        m.run(timeout=10)
    assert info.value.vector == 3 and info.value.rip == rip + 1


@pytest.mark.kvm
def test_int3_at_cpl0_reaches_the_guests_handler_after_the_instruction(run_guest, guest_asm):
    """On kvm_pvm the emulator fails on INT3 and complete_int3 injects #BP; on VMX/SVM the processor
    raises it. Either way pykvm's stub for vector 3 reports it with RIP after the INT3."""
    from pykvm.machine import GuestException

    with pytest.raises(GuestException) as info:
        run_guest(guest_asm("nop\nint3\nnop\nmov $1, %eax"), check=False)
    assert info.value.vector == 3
    assert info.value.rip == 0x100002  # the guest starts at PROTECTED_LOAD: nop (1 byte), int3 (1 byte)
