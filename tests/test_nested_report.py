"""Parsing what the L1 hypervisors print, on recorded output of real runs (tests/data/nested_*.txt:
the VMX L1 under Bochs corei7_skylake_x, the SVM L1 under QEMU TCG, a refused VMX image)."""

from __future__ import annotations

from pathlib import Path

from pykvm.nested import layout as L
from pykvm.nested.blob import SCENARIO_EXITS
from pykvm.nested.report import describe_qualification, parse_report

DATA = Path(__file__).parent / "data"


def recorded(name: str):
    return parse_report((DATA / name).read_text())


def test_a_recorded_vmx_run_parses_into_its_exits_and_reports():
    r = recorded("nested_vmx_bochs_skylake_x.txt")
    assert (r.cpu, r.vendor, r.status, r.starts, r.resets) == ("GenuineIntel", "vmx", 0x10, 1, 0)
    assert r.blob == {"name": "scenario", "vendor": "vmx", "size": 0x180000, "flags": 0}
    assert r.neutral_exits == SCENARIO_EXITS and r.completed and r.unparsed == []
    assert [e.vendor_name for e in r.exits[:5]] == ["CPUID", "IO_INSTRUCTION", "IO_INSTRUCTION",
                                                    "VMCALL", "EPT_VIOLATION"]  # fmt: skip
    ept = r.exits[4]
    assert (ept.gpa, ept.qualification) == (L.L2_RO_PAGE + 0x10, 0x1AA)
    assert ept.meaning == "write, readable, executable, linear-address-valid, final-translation"
    assert r.l2_reports[1] == (L.L2_VALUE_A, L.L2_VALUE_B, L.L2_VALUE_A)
    assert r.notes[0] == "vmptrst vmcs=0x1002000" and r.notes[-1] == "vmxoff"


def test_a_recorded_svm_run_parses_with_exitinfo_decoded():
    r = recorded("nested_svm_qemu.txt")
    assert (r.cpu, r.vendor, r.status) == ("AuthenticAMD", "svm", 0x10)
    assert r.neutral_exits == SCENARIO_EXITS
    assert [e.vendor_name for e in r.exits[-2:]] == ["VMMCALL", "HLT"]
    npf = r.exits[4]
    assert npf.meaning == "present, write, user, final-gPA" and npf.gpa == 0x40010
    assert r.exits[1].meaning == "out port 0x80, 1 byte"


def test_a_refused_image_parses_into_the_entry_failure():
    r = recorded("nested_vmx_bochs_rflags_reserved.txt")
    assert r.entry_failure == {"kind": "invalid-state", "reason": 0x80000021, "qual": 0}
    assert r.failure_text() == "invalid-state reason=0x80000021"
    assert r.exits == [] and r.status == L.STATUS_ENTRY_FAILED and not r.completed


def test_probe_output_gives_msrs_and_address_width():
    r = recorded("bochs_skylake_x_probe.txt")
    assert r.msrs[0x480] == 0xD810000000002B and r.msrs[0x3A] == 0x5
    assert r.cpuid[0x8000_0008]["eax"] & 0xFF == 40 and r.status == L.STATUS_PROBED


def test_resets_errors_and_foreign_lines():
    text = ("SeaBIOS (version 1.16)\nnested: start pykvm L1 hypervisor cpu=AuthenticAMD\n"
            "garbage\nnested: start pykvm L1 hypervisor cpu=AuthenticAMD\n"
            "nested: error no-svm: this CPU has no SVM (CPUID 8000_0001h:ECX[2] is 0)\n"
            "nested: exit x reason=zz\n")  # fmt: skip
    r = parse_report(text)
    assert r.starts == 2 and r.resets == 1
    assert r.error == ("no-svm", "this CPU has no SVM (CPUID 8000_0001h:ECX[2] is 0)")
    assert r.status is None and not r.finished
    assert r.unparsed == ["nested: exit x reason=zz"]


def test_io_qualifications_of_both_vendors():
    # VMX: size-1 in 2:0, IN bit 3, string 4, rep 5, port 31:16; SVM: IN bit 0, STR 2, REP 3, SZ 4..6
    assert describe_qualification("vmx", "io", 0x3F8_0000 | 0x8 | 0x1) == "in port 0x3f8, 2 bytes"
    assert describe_qualification("vmx", "io", 0x80_0000 | 0x30 | 0x3) == "rep outs port 0x80, 4 bytes"
    assert describe_qualification("svm", "io", 0x81_0000 | 0x40 | 0xD) == "rep ins port 0x81, 4 bytes"
    assert describe_qualification("svm", "cpuid", 0) == ""
