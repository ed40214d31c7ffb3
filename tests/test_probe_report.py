"""`pykvm probe`: the verdict, the JSON schema, the command line, and bad input."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import jsonschema
import pytest
from dumps import CONROE, EVERY, FIXTURES, HASWELL_EP, SUMMIT_RIDGE, WINDSOR

from pykvm import status, system
from pykvm.cli import main
from pykvm.probe import hostcpu
from pykvm.probe import report as report_mod
from pykvm.probe.dump import read_dump
from pykvm.probe.kvm import collect_kvm
from pykvm.probe.report import probe

SCHEMA = json.loads(resources.files("pykvm.probe").joinpath("probe.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def probe_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["probe", "--json", *args])
    doc = json.loads(capsys.readouterr().out)
    VALIDATOR.validate(doc)
    return code, doc


def test_the_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.kvm
def test_this_host_tells_the_truth(capsys, backend):
    code, doc = probe_json(capsys)
    verdict = doc["verdict"]
    assert code == 0 and verdict["usable"] is True
    assert doc["kvm"]["backend"]["module"] == backend
    cpu = doc["cpu"]["summary"]
    assert cpu["vendor"] == next(line.split(":")[1].strip() for line in open("/proc/cpuinfo") if
                                 line.startswith("vendor_id"))
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert (cpu["vmx"], cpu["svm"]) == ("vmx" in flags, "svm" in flags)
    if backend == "kvm_pvm":
        assert verdict["acceleration"] == "software (kvm_pvm)"
        assert verdict["nested"] is False and verdict["second_level_paging"] is None
        nested = next(f for f in verdict["findings"] if f["topic"] == "nested")
        assert nested["level"] == "warn" and "kvm_pvm offers neither to guests" in nested["message"]
        assert doc["kvm"]["guest_vmx"] is False and doc["kvm"]["guest_svm"] is False


@pytest.mark.kvm
def test_sections_and_the_table_output(capsys):
    code, doc = probe_json(capsys, "--section", "vmx")
    assert set(doc) == {"origin", "vmx", "verdict", "errors"}
    assert main(["probe"]) == code
    out = capsys.readouterr().out
    for title in ("CPU", "VMX", "SVM", "KVM", "Verdict"):
        assert title in out
    assert "can run KVM guests" in out


@pytest.mark.parametrize("name", EVERY)
def test_every_dump_decodes_to_valid_json(capsys, name):
    code, doc = probe_json(capsys, "--from-dump", str(FIXTURES / name))
    assert code == 0  # every fixture has VT-x or AMD-V
    assert doc["origin"] == str(FIXTURES / name) and "kvm" in doc and doc["kvm"] is None


@pytest.mark.parametrize(
    "name, acceleration, paging, tagging",
    [
        (CONROE, "VT-x", None, None),  # VMX without secondary controls: no EPT, no VPID
        (HASWELL_EP, "VT-x", "EPT", "VPID"),
        (WINDSOR, "AMD-V", None, "ASID"),  # K8 rev F: SVM without nested paging, 64 ASIDs
        (SUMMIT_RIDGE, "AMD-V", "NPT", "ASID"),
    ],
)
def test_dump_verdicts(name, acceleration, paging, tagging):
    verdict = probe(FIXTURES / name).verdict
    assert (verdict.acceleration, verdict.second_level_paging, verdict.tlb_tagging) == (acceleration, paging, tagging)
    assert verdict.usable is None and verdict.exit_code == 0


def test_windsor_reports_its_64_asids():
    report = probe(FIXTURES / WINDSOR)
    assert report.svm.nasid == 64 and not report.svm.has("npt")
    assert any("ASIDs (64 of them)" in f.message for f in report.verdict.findings)


# ---- bad input: one clear line, and the rest of the report still prints -----------------------


def test_empty_dump(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["probe", "--from-dump", str(empty)]) == status.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"pykvm: error: {empty}: ") and err.count("\n") == 1


def test_malformed_and_truncated_dumps_name_the_line(tmp_path, capsys):
    lines = (FIXTURES / HASWELL_EP).read_text(errors="replace").splitlines()
    cpuid_at = next(i for i, line in enumerate(lines) if line.startswith("CPUID 00000001"))
    truncated = tmp_path / "truncated.txt"
    truncated.write_text("\n".join(lines[:cpuid_at] + [lines[cpuid_at][:24]]) + "\n")
    assert main(["probe", "--from-dump", str(truncated)]) == status.USAGE
    err = capsys.readouterr().err
    assert f"line {cpuid_at + 1}" in err and err.count("\n") == 1


def test_a_cpu_with_neither_extension_is_not_usable(tmp_path, capsys):
    dump = tmp_path / "plain.txt"
    dump.write_text(  # leaf 0 "GenuineIntel", leaf 1 without VMX, no extended SVM
        "CPUID 00000000: 00000001-756E6547-6C65746E-49656E69\n"
        "CPUID 00000001: 00000F29-00010800-00004400-BFEBFBFF\n"
        "CPUID 80000000: 80000001-00000000-00000000-00000000\n"
        "CPUID 80000001: 00000000-00000000-00000000-00000000\n"
    )
    code, doc = probe_json(capsys, "--from-dump", str(dump))
    assert code == status.UNAVAILABLE
    assert doc["verdict"]["acceleration"] is None and doc["vmx"] == [] and doc["svm"] is None
    assert doc["verdict"]["findings"][0]["message"] == "the dumped CPU has neither VT-x (VMX) nor AMD-V (SVM)"


def test_missing_kvm_device_still_reports_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(system, "KVM_PATH", "/nonexistent/kvm")
    code, doc = probe_json(capsys)
    assert code == status.UNAVAILABLE
    assert doc["verdict"]["usable"] is False
    assert doc["cpu"]["summary"]["vendor"]  # the CPU part was still gathered
    fail = next(f for f in doc["verdict"]["findings"] if f["level"] == "fail")
    assert "does not exist" in fail["message"] and fail["fix"]


def test_unreadable_msr_device_is_reported_and_the_rest_prints(monkeypatch, tmp_path, capsys):
    """A VT-x host whose /dev/cpu/N/msr is missing: the hardware VMX source carries the fix."""
    haswell = read_dump(FIXTURES / HASWELL_EP)
    monkeypatch.setattr(report_mod, "host_cpuid", lambda: (haswell.cpuid, "cpuid instruction", None))
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)
    code, doc = probe_json(capsys)
    hardware = next(s for s in doc["vmx"] if s["source"] == "hardware")
    assert hardware["caps"] is None and "modprobe msr" in hardware["error"]
    assert "modprobe msr" in doc["errors"]["vmx.hardware"]
    assert doc["cpu"]["summary"]["vmx"] is True and doc["verdict"]["findings"]


# ---- the verdict's advice, on synthetic hosts -------------------------------------------------------


def host_info(module: str, **params):
    info = collect_kvm("/nonexistent/kvm")
    backend = dataclasses.replace(info.backend, module=module, **params)
    device = dataclasses.replace(info.device, exists=True, accessible=True, open_error=None)
    return dataclasses.replace(info, backend=backend, device=device, api_version=12, guest_vmx=False, guest_svm=False)


def test_intel_host_with_nested_off_says_how_to_turn_it_on():
    haswell = probe(FIXTURES / HASWELL_EP)
    verdict = report_mod.judge(haswell.cpu, haswell.vmx, None, host_info("kvm_intel", nested=False, ept=True, vpid=True))
    assert (verdict.usable, verdict.acceleration, verdict.nested) == (True, "VT-x", False)
    assert (verdict.second_level_paging, verdict.tlb_tagging) == ("EPT", "VPID")
    nested = next(f for f in verdict.findings if f.topic == "nested")
    assert "modprobe kvm_intel nested=1" in nested.fix


def test_amd_host_with_npt_off_warns():
    zen = probe(FIXTURES / SUMMIT_RIDGE)
    verdict = report_mod.judge(zen.cpu, (), zen.svm, host_info("kvm_amd", nested=True, npt=False))
    assert (verdict.acceleration, verdict.second_level_paging, verdict.tlb_tagging) == ("AMD-V", None, "ASID")
    paging = next(f for f in verdict.findings if f.topic == "second-level paging")
    assert paging.level == "warn"


def test_vmx_cpu_without_kvm_module_says_load_it():
    haswell = probe(FIXTURES / HASWELL_EP)
    info = collect_kvm("/nonexistent/kvm")
    verdict = report_mod.judge(haswell.cpu, haswell.vmx, None, dataclasses.replace(
        info, backend=dataclasses.replace(info.backend, module=None)))
    assert verdict.usable is False and verdict.exit_code == status.UNAVAILABLE
    fail = next(f for f in verdict.findings if f.level == "fail")
    assert fail.fix.startswith("load the module: modprobe kvm_intel")


def test_device_without_permission_says_join_the_group():
    info = collect_kvm("/nonexistent/kvm")
    device = dataclasses.replace(info.device, exists=True, accessible=False, group="kvm", in_group=False,
                                 listed_in_group=False, open_error="permission denied opening /dev/kvm")
    verdict = report_mod.judge(None, (), None, dataclasses.replace(info, device=device))
    fail = next(f for f in verdict.findings if f.level == "fail")
    assert fail.fix == "add your user to group 'kvm' (sudo usermod -aG kvm $USER) and log in again"


# ---- pykvm compare ---------------------------------------------------------------------------------


@pytest.mark.kvm
def test_compare_marks_this_host(capsys):
    assert main(["compare", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["origin"] == "host" and len(doc["rows"]) >= 40
    cpu = probe().cpu
    for row in doc["rows"]:  # a column is never marked supported for an extension the CPU lacks
        assert not (row["intel_support"] and not cpu.vmx), row
        assert not (row["amd_support"] and not cpu.svm), row
    assert main(["compare"]) == 0
    out = capsys.readouterr().out
    assert "Intel VT-x" in out and "AMD-V" in out and "what this host supports" in out


def test_compare_from_a_dump(capsys):
    assert main(["compare", "--json", "--from-dump", str(FIXTURES / SUMMIT_RIDGE)]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {row["key"]: row for row in doc["rows"]}
    assert doc["asids"] == 32768
    assert rows["nested_paging"]["amd_support"] is True and rows["nested_paging"]["intel_support"] is False
    assert rows["apic"]["amd_support"] is True  # AVIC


def test_a_dump_without_vmx_msrs_leaves_ept_and_vpid_unknown(tmp_path, capsys):
    dump = tmp_path / "cpuid_r.txt"  # `cpuid -r` output: CPUID only, no MSRs
    dump.write_text("CPU 0:\n"
                    "   0x00000000 0x00: eax=0x0000000d ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69\n"
                    "   0x00000001 0x00: eax=0x000306f2 ebx=0x00000800 ecx=0x00000020 edx=0x00000000\n")
    code, doc = probe_json(capsys, "--from-dump", str(dump))
    verdict = doc["verdict"]
    assert code == 0 and verdict["acceleration"] == "VT-x" and verdict["features_known"] is False
    assert not any(f["level"] == "warn" for f in verdict["findings"])
    assert main(["probe", "--from-dump", str(dump), "--section", "cpu"]) == 0
    assert "unknown (not in the dump)" in capsys.readouterr().out
