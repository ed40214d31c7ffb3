"""The nested scenario on the reference platforms: the Intel L1 under Bochs, the AMD L1 under QEMU's
TCG and under Bochs. These are the runs this host can make (its KVM, kvm_pvm, offers no VMX or SVM
to guests: tests/test_nested_pykvm.py runs the same scenario under pykvm where KVM does).

Each run boots the L1 twice (``probe``: the capability MSRs; then the scenario with the blob
pykvm built for them) and checks every L2 exit, every value the L2 reported, the entry failures
pykvm's checker predicted, and the platforms' two known deviations from the manuals.
"""

from __future__ import annotations

import json

import pytest

from pykvm import status
from pykvm.cli import main
from pykvm.nested import layout as L
from pykvm.nested.blob import SCENARIO_EXITS
from pykvm.nested.platforms import bochs_available, qemu_available
from pykvm.nested.run import ImageRejected, run_scenario

needs_bochs = pytest.mark.skipif(bochs_available() is not None, reason=str(bochs_available()))
needs_qemu = pytest.mark.skipif(qemu_available() is not None, reason=str(qemu_available()))

SIGNATURE = int.from_bytes(b"pykv", "little")
REPORTS = [
    (SIGNATURE, L.L2_IN_VALUE, 0x1235),
    (L.L2_VALUE_A, L.L2_VALUE_B, L.L2_VALUE_A),
]


def check_scenario(run) -> None:
    """What every complete run must show, whatever the vendor."""
    r = run.report
    assert run.problems() == [], run.serial
    assert r.status == L.STATUS_DONE and r.starts == 1 and not run.timed_out
    assert r.neutral_exits == SCENARIO_EXITS
    assert [e.l1_name for e in r.exits] == list(SCENARIO_EXITS)  # the L1's names agree
    assert r.l2_reports[:2] == REPORTS
    assert r.l2_reports[3] == (L.L2_VALUE_B, 0, 0)  # after the flush: the new mapping
    assert run.tlb_tagging in ("kept", "flushed") and run.tlb_model == "kept"
    out, inp = r.exits[1], r.exits[2]
    assert out.meaning == "out port 0x80, 1 byte" and inp.meaning == "in port 0x81, 1 byte"
    npf = r.exits[4]
    assert npf.gpa == L.L2_RO_PAGE + 0x10
    assert "write" in npf.meaning


# ---- Intel VT-x under Bochs -----------------------------------------------------------------


@needs_bochs
@pytest.mark.parametrize("model", ["corei7_skylake_x", "corei7_haswell_4770"])
def test_vmx_scenario_on_bochs(model):
    run = run_scenario("vmx", "bochs", cpu_model=model)
    check_scenario(run)
    r = run.report
    assert r.cpu == "GenuineIntel" and run.caps is not None
    assert [e.code for e in r.exits[:5]] == [10, 30, 30, 18, 48]
    # EPT violation: a data write to a readable, executable (not writable) page
    assert "write" in r.exits[4].meaning and "readable" in r.exits[4].meaning
    assert "writable" not in r.exits[4].meaning
    # the VMCS the L1 loaded is the region pykvm named, and it left VMX operation
    assert f"vmptrst vmcs={L.NESTED_BASE + 0x2000:#x}" in r.notes
    assert "flush invvpid type=0x1 vpid=0x1" in r.notes and r.notes[-1] == "vmxoff"


@needs_bochs
@pytest.mark.parametrize("breakage", ["reserved-control", "bad-eptp-walk", "rflags-reserved"])
def test_vmx_broken_images_fail_vm_entry_as_the_checker_predicts(breakage):
    with pytest.raises(ImageRejected) as rejected:
        run_scenario("vmx", "bochs", breakage=breakage)
    assert rejected.value.violations
    run = run_scenario("vmx", "bochs", breakage=breakage, check=False)
    assert run.report.entry_failure is not None, run.serial
    assert run.report.failure_text() == run.blob.predicted_failure == rejected.value.predicted
    assert run.report.status == L.STATUS_ENTRY_FAILED and run.report.exits == []
    assert run.problems() == []


@needs_bochs
def test_vmx_noncanonical_rip_is_rejected_and_bochs_shows_its_known_deviation():
    with pytest.raises(ImageRejected, match=r"SDM 27\.3\.1\.4"):
        run_scenario("vmx", "bochs", breakage="noncanonical-rip")
    run = run_scenario("vmx", "bochs", breakage="noncanonical-rip", check=False)
    # The SDM says VM entry fails (invalid guest state); Bochs 2.7 skips that check.
    assert run.blob.predicted_failure == "invalid-state reason=0x80000021"
    assert run.deviation is not None and "canonical" in run.deviation
    assert run.report.exits[0].rip == 0x0000_8000_0000_0000


@needs_bochs
def test_vmx_l2_triple_fault_is_a_shutdown_exit_on_bochs():
    run = run_scenario("vmx", "bochs", triple_fault=True)
    assert run.problems() == [], run.serial
    assert run.report.neutral_exits == ("shutdown",) and run.report.exits[0].code == 2
    assert run.report.status == L.STATUS_L2_SHUTDOWN and run.report.resets == 0


# ---- AMD-V under QEMU TCG and Bochs ---------------------------------------------------------


@needs_qemu
def test_svm_scenario_on_qemu():
    run = run_scenario("svm", "qemu")
    check_scenario(run)
    r = run.report
    assert [e.code for e in r.exits[:5]] == [0x72, 0x7B, 0x7B, 0x81, 0x400]
    npf = r.exits[4]
    assert npf.qualification >> 32 & 1 and npf.qualification & 0b11 == 0b11  # final gPA, P, W
    assert any(n.startswith("flush invlpga va=0x401000 asid=0x1") for n in r.notes)


@needs_bochs
def test_svm_scenario_on_bochs_ryzen():
    run = run_scenario("svm", "bochs")
    check_scenario(run)
    assert run.cpu_model == "ryzen" and run.report.cpu == "AuthenticAMD"
    assert "flush invlpga va=0x401000 asid=0x1 tlb_control=0x3" in run.report.notes


@needs_qemu
@pytest.mark.parametrize("breakage", ["reserved-control", "asid-zero", "svme-clear"])
def test_svm_broken_images_fail_vmrun_as_the_checker_predicts(breakage):
    with pytest.raises(ImageRejected, match="APM"):
        run_scenario("svm", "qemu", breakage=breakage)
    run = run_scenario("svm", "qemu", breakage=breakage, check=False)
    assert run.report.failure_text() == "vmexit-invalid" == run.blob.predicted_failure
    assert run.report.entry_failure["code"] & 0xFFFF_FFFF == 0xFFFF_FFFF
    assert run.report.status == L.STATUS_ENTRY_FAILED and run.problems() == []


@needs_bochs
@pytest.mark.parametrize("breakage", ["reserved-control", "asid-zero", "svme-clear"])
def test_svm_broken_images_fail_vmrun_on_bochs_too(breakage):
    run = run_scenario("svm", "bochs", breakage=breakage, check=False)
    assert run.report.failure_text() == "vmexit-invalid" == run.blob.predicted_failure
    assert run.report.entry_failure["code"] == 2**64 - 1  # Bochs stores the full 64-bit -1
    assert run.report.status == L.STATUS_ENTRY_FAILED and run.problems() == []


@needs_qemu
def test_svm_l2_triple_fault_is_a_shutdown_exit_on_qemu():
    run = run_scenario("svm", "qemu", triple_fault=True)
    assert run.problems() == [], run.serial
    assert run.report.neutral_exits == ("shutdown",) and run.report.exits[0].code == 0x7F
    assert run.report.status == L.STATUS_L2_SHUTDOWN


@needs_bochs
def test_svm_l2_triple_fault_resets_bochs_and_the_run_is_stopped():
    run = run_scenario("svm", "bochs", triple_fault=True, timeout=60)
    assert not run.timed_out and run.report.resets >= 1  # the runner stopped the reset loop
    assert run.deviation is not None and "resets the whole machine" in run.deviation
    assert any("reset" in p for p in run.problems())


# ---- platforms without the extension, and the command line ----------------------------------


@needs_qemu
def test_a_cpu_without_svm_is_reported_by_the_l1():
    run = run_scenario("svm", "qemu", cpu_model="qemu64,-svm")
    assert run.no_extension and run.report.error[0] == "no-svm"
    assert run.report.status == L.STATUS_NO_EXTENSION and run.blob is None  # stopped at the probe


@needs_qemu
def test_svm_without_nested_paging_is_reported_by_the_l1():
    run = run_scenario("svm", "qemu", cpu_model="qemu64")  # QEMU's qemu64 has SVM, not NPT
    assert run.no_extension and run.report.error[0] == "no-npt"
    assert run.report.exits == [] and run.report.status == L.STATUS_NO_EXTENSION


@needs_qemu
def test_cli_no_svm_on_qemu_exits_66(capsys):
    assert main(["nested", "--platform", "qemu", "--cpu-model", "qemu64,-svm"]) == status.UNAVAILABLE
    assert "no SVM" in capsys.readouterr().err


def test_cli_vmx_on_qemu_is_refused_with_the_reason(capsys):
    assert main(["nested", "--platform", "qemu", "--vendor", "vmx"]) == status.UNAVAILABLE
    assert "QEMU's TCG does not emulate VMX" in capsys.readouterr().err


@needs_bochs
@needs_qemu
def test_cli_reference_runs_both_vendors_side_by_side(capsys):
    assert main(["nested", "--platform", "reference", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "ok"
    runs = {r["vendor"]: r for r in doc["runs"]}
    assert runs["vmx"]["platform"] == "bochs" and runs["svm"]["platform"] == "qemu"
    for r in runs.values():
        assert [e["neutral"] for e in r["report"]["exits"]] == list(SCENARIO_EXITS)
        assert r["problems"] == []
    assert main(["nested", "--platform", "reference"]) == 0
    text = capsys.readouterr().out
    assert "The same L2 under both vendors" in text and "EPT_VIOLATION" in text and "NPF" in text


@needs_bochs
def test_cli_rejects_a_broken_image_before_launch(capsys):
    assert main(["nested", "--platform", "bochs", "--break", "bad-eptp-walk", "--json"]) == status.USAGE
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["violations"][0]["rule"] == "exec.eptp"
    assert doc["error"]["predicted"] == "vmfail-valid error=7"


def _writable_ro_page(blob) -> bytes:
    """The blob's bytes with the EPT/NPT leaf of L2_RO_PAGE given write access (and nothing else
    changed): if the L1 used any table but pykvm's, the write would still fault."""
    from pykvm.model import paging

    walk = paging.translate_gpa(blob.memory, L.L2_RO_PAGE, blob.nested)
    leaf = walk.references[-1]
    assert leaf.dimension == "nested" and leaf.level == 1
    data = bytearray(blob.data)
    offset = leaf.address - L.NESTED_BASE
    bit = paging.EPT_W if blob.vendor == "vmx" else paging.RW
    data[offset:offset + 8] = (leaf.value | bit).to_bytes(8, "little")
    return bytes(data)


@pytest.mark.parametrize("vendor", [
    pytest.param("svm", marks=needs_qemu), pytest.param("vmx", marks=needs_bochs)])  # fmt: skip
def test_the_l1_walks_pykvms_nested_tables(vendor):
    from pykvm.nested.run import run_l1

    platform = "qemu" if vendor == "svm" else "bochs"
    run = run_scenario(vendor, platform)
    assert "npf" in run.report.neutral_exits
    changed = run_l1(platform, _images(vendor), blob=_writable_ro_page(run.blob))
    exits = list(SCENARIO_EXITS)
    exits.remove("npf")  # the write to the once read-only page now simply happens
    assert changed.report.neutral_exits == tuple(exits), changed.serial
    assert changed.report.status == L.STATUS_DONE


def _images(vendor):
    from pykvm.nested.blob import GuestImages
    from pykvm.nested.run import default_build_dir

    return GuestImages(default_build_dir(vendor), vendor)
