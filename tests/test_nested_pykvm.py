"""The L1 hypervisors under pykvm itself, on this host's /dev/kvm.

What runs everywhere: the L1 boots through multiboot (32-bit entry, its own switch to long mode),
checks for its extension and reports through pykvm's UART and isa-debug-exit; a VT-x that the
firmware locked off (IA32_FEATURE_CONTROL, emulated by a pykvm MSR handler) and an SVM disabled
by VM_CR.SVMDIS are reported by name. The scenario itself needs a KVM that offers VMX or SVM to
its guests (kvm_intel/kvm_amd with nested=1): elsewhere it skips, naming the backend.
"""

from __future__ import annotations

import json

import pytest

from pykvm import status
from pykvm.cli import main
from pykvm.nested import layout as L
from pykvm.nested.run import run_scenario
from pykvm.x86.cpuid import advertise

pytestmark = pytest.mark.kvm


def _advertise(extension: str):
    """A machine hook that tells the guest it has VMX or SVM, with every CPUID leaf the L1's
    check reads (on an Intel host's KVM the extended range stops below the SVM leaf)."""

    def hook(machine) -> None:
        machine.vcpu.set_cpuid2(advertise(machine.vcpu.get_cpuid2(), extension))

    return hook


def _hooks(*hooks):
    def hook(machine) -> None:
        for h in hooks:
            h(machine)

    return hook


@pytest.mark.parametrize(("vendor", "code"), [("vmx", "no-vmx"), ("svm", "no-svm")])
def test_the_l1_boots_under_pykvm_and_names_the_missing_extension(vendor, code, kvm_backend):
    run = run_scenario(vendor, "pykvm", timeout=30)
    r = run.report
    if not run.no_extension:
        pytest.skip(f"{kvm_backend} offers {vendor.upper()} to guests: the scenario tests cover it")
    assert r.starts == 1 and r.cpu in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")
    assert r.error[0] == code and "CPUID" in r.error[1]
    assert r.status == L.STATUS_NO_EXTENSION == run.exit_status
    assert not run.timed_out and run.blob is None  # stopped at the probe: nothing built
    # Python watched the L1 itself: its UART output and the isa-debug-exit write
    assert run.extra["l1_exits"]["Uart16550 0x3f8-0x3ff"] > len(run.serial)
    assert run.extra["l1_exits"]["DebugExit 0xf4-0xf7"] == 1


def test_vmx_locked_off_by_feature_control_is_reported():
    def feature_control(machine) -> None:
        machine.on_msr(0x3A, read=lambda vcpu: 0x1)  # locked, VMX outside SMX off

    run = run_scenario("vmx", "pykvm", timeout=30,
                       machine_hook=_hooks(_advertise("vmx"), feature_control))
    assert run.report.error is not None, run.serial
    code, text = run.report.error
    assert code == "vmx-disabled" and "IA32_FEATURE_CONTROL" in text
    assert run.no_extension and run.report.status == L.STATUS_NO_EXTENSION


def test_an_unlocked_feature_control_is_locked_by_the_l1_as_firmware_would():
    written = []

    def feature_control(machine) -> None:
        machine.on_msr(0x3A, read=lambda vcpu: written[-1] if written else 0,
                       write=lambda vcpu, value: written.append(value))  # fmt: skip

    hook = _hooks(_advertise("vmx"), feature_control)
    run_scenario("vmx", "pykvm", timeout=30, machine_hook=hook)
    assert written and written[0] == 0x5  # lock | VMX outside SMX
    written.clear()
    run = run_scenario("vmx", "pykvm", timeout=30, machine_hook=hook, cmdline="fc-lock")
    assert written == [0x1]  # "fc-lock": locked with VMX off, then found disabled
    assert run.report.error[0] == "vmx-disabled" and run.no_extension


def test_svm_disabled_by_vm_cr_is_reported():
    def vm_cr(machine) -> None:
        machine.on_msr(0xC0010114, read=lambda vcpu: 1 << 4)  # SVMDIS

    run = run_scenario("svm", "pykvm", timeout=30,
                       machine_hook=_hooks(_advertise("svm"), vm_cr))
    assert run.report.error is not None, run.serial
    assert run.report.error[0] == "svm-disabled" and "SVMDIS" in run.report.error[1]


def test_pykvm_nested_without_the_extension_exits_66_naming_the_backend(capsys, kvm_backend):
    code = main(["nested", "--vendor", "vmx", "--json"])
    doc = json.loads(capsys.readouterr().out)
    if code == 0:
        pytest.skip(f"{kvm_backend} runs the VMX scenario: nothing is missing")
    assert code == status.UNAVAILABLE and doc["status"] == status.UNAVAILABLE
    assert "no VMX" in doc["error"]["message"]
    if kvm_backend == "kvm_pvm":
        assert "kvm_pvm, which offers neither VMX nor SVM" in doc["error"]["message"]


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_the_scenario_under_pykvm(vendor, kvm_backend):
    run = run_scenario(vendor, "pykvm", timeout=120)
    if run.no_extension:
        pytest.skip(f"/dev/kvm is served by {kvm_backend}, which offers no {vendor.upper()} to its "
                    f"guests (the L1 said: {run.report.error[1]}); tests/test_nested_reference.py "
                    "runs this scenario on Bochs/QEMU")  # fmt: skip
    assert run.problems() == [], run.serial
    assert run.report.status == L.STATUS_DONE


def test_a_fault_in_the_l1_is_reported_with_its_registers_not_a_hang():
    # CPUID says VMX and IA32_FEATURE_CONTROL allows it, but this KVM has no VMX MSRs: the
    # probe's RDMSR 0x480 takes #GP, which the L1's IDT catches and reports.
    def feature_control(machine) -> None:
        machine.on_msr(0x3A, read=lambda vcpu: 0x5)  # locked, VMX outside SMX on

    run = run_scenario("vmx", "pykvm", timeout=30,
                       machine_hook=_hooks(_advertise("vmx"), feature_control))
    if run.report.status == L.STATUS_PROBED:
        pytest.skip("this KVM has the VMX capability MSRs: nothing faults")
    code, text = run.report.error
    assert code == "l1-exception" and "vector=0xd" in text and "rcx=0x480" in text
    assert run.report.status == L.STATUS_ERROR and not run.timed_out
    assert any("l1-exception" in p for p in run.problems())
