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
