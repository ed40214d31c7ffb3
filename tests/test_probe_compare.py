"""The VT-x / AMD-V comparison table, on the real dumps of tests/data/cpuid/."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import capstone
import pytest

from dumps import (
    CONROE,
    EVERY,
    FIXTURES,
    HASWELL_EP,
    SAPPHIRE_RAPIDS,
    WINDSOR,
)

from pykvm.probe.compare import INSTRUCTIONS, Comparison, Instruction, compare, detect_iommu
from pykvm.probe.cpuid import summarize
from pykvm.probe.dump import read_dump
from pykvm.probe.svm import decode_svm
from pykvm.probe.vmx import decode_vmx

EPYC_GUEST = Path(__file__).resolve().parent / "data" / "cpuid_r_epyc.txt"

ZEN = "AuthenticAMD0800F11_K17_Zen3_CPUID.txt"  # a Ryzen 5 1500X: Zen 1, family 17h

ROW_COUNT = 44
NO_MECHANISM = re.compile(r"^\(none[:)]")  # a cell that names nothing: never supported


@functools.cache
def of(path: Path, iommu: str | None = None) -> Comparison:
    dump = read_dump(path)
    return compare(summarize(dump.cpuid), decode_vmx(dump.msrs), decode_svm(dump.cpuid), iommu)


def fixture(name: str, iommu: str | None = None) -> Comparison:
    return of(FIXTURES / name, iommu)


# --- real machines --------------------------------------------------------------------------------


def test_haswell_ep_has_ept_and_vpid_and_no_amd_v() -> None:
    c = fixture(HASWELL_EP)
    assert c.vendor == "GenuineIntel" and c.asids is None
    for key in ("nested_paging", "tlb_tag", "insn_inv_nested", "insn_inv_tagged", "apic",
                "posted", "nested_state", "npt_ad", "npt_1g"):  # fmt: skip
        assert c.row(key).intel_support is True, key
    assert c.row("npt_exec").intel_support is False  # mode-based execute control: not yet
    assert c.row("ipi").intel_support is False  # no tertiary controls
    assert c.row("insn_launch").intel_support is None  # SMX: not in the CPUID summary
    assert c.row("npt_root").note.endswith("page-walk length 4, with EPT accessed/dirty flags.")
    assert "VPIDs 1-65535 for guests" in c.row("tlb_tag").note
    assert all(row.amd_support is False for row in c.rows)


def test_k8_windsor_has_svm_without_nested_paging() -> None:
    c = fixture(WINDSOR)
    assert c.asids == 64
    assert c.row("nested_paging").amd_support is False
    assert c.row("insn_run").amd_support is True  # SVM itself
    assert c.row("caching").amd_support is False  # no VMCB clean bits
    assert c.row("tlb_tag").amd_support is True
    assert "64 ASIDs (63 for guests)" in c.row("tlb_tag").note
    assert all(row.intel_support is False for row in c.rows)


def test_zen_has_npt_avic_and_32768_asids() -> None:
    c = fixture(ZEN)
    assert c.asids == 32768
    assert "32768 ASIDs" in c.row("tlb_tag").note
    for key in ("nested_paging", "npt_1g", "apic", "posted", "caching", "tlb_flush_context",
                "nested_state", "nested_gif", "decode", "next_rip", "pause", "tsc"):  # fmt: skip
        assert c.row(key).amd_support is True, key
    assert c.row("x2apic").amd_support is False  # x2AVIC came with Zen 4
    assert c.row("insn_broadcast").amd_support is None  # INVLPGB: not in the CPUID summary
    assert all(row.intel_support is False for row in c.rows)


def test_conroe_has_vmx_without_ept() -> None:
    c = fixture(CONROE)
    assert c.row("insn_run").intel_support is True
    assert c.row("nested_paging").intel_support is False
    assert c.row("tlb_tag").intel_support is False
    assert c.row("npt_root").note == ""  # no EPT capability to describe


def test_an_unread_msr_is_unknown_not_absent() -> None:
    # The Sapphire Rapids dump allows tertiary controls but lacks IA32_VMX_PROCBASED_CTLS3.
    assert fixture(SAPPHIRE_RAPIDS).row("ipi").intel_support is None
    assert fixture(SAPPHIRE_RAPIDS).row("nested_paging").intel_support is True
    # VMX present by CPUID, capability MSRs not read: mechanisms known, capabilities unknown.
    dump = read_dump(FIXTURES / HASWELL_EP)
    c = compare(summarize(dump.cpuid), None, None, None)
    assert c.row("insn_run").intel_support is True
    assert c.row("nested_paging").intel_support is None
    assert c.row("structure").note == ""


@pytest.mark.parametrize("name", EVERY)
def test_every_fixture_gives_a_complete_table(name: str) -> None:
    c = fixture(name)
    assert len(c.rows) == ROW_COUNT
    for row in c.rows:
        assert row.topic and row.aspect and row.intel and row.amd
        if NO_MECHANISM.match(row.intel):
            assert row.intel_support is False, row.key
        if NO_MECHANISM.match(row.amd):
            assert row.amd_support is False, row.key


def test_iommu_rows_follow_the_iommu_given() -> None:
    assert (fixture(HASWELL_EP).row("iommu").intel_support, fixture(ZEN).row("iommu").amd_support) \
        == (None, None)  # fmt: skip
    intel = fixture(HASWELL_EP, "vt-d").row("iommu")
    amd = fixture(ZEN, "amd-vi").row("iommu_linux")
    assert (intel.intel_support, intel.amd_support) == (True, False)
    assert (amd.intel_support, amd.amd_support) == (False, True)
    assert fixture(HASWELL_EP, "amd-vi").row("iommu").intel_support is False


def test_a_guest_without_nested_virtualization_supports_neither() -> None:
    # This repository's own capture: an EPYC KVM guest that sees neither VMX nor SVM.
    c = of(EPYC_GUEST)
    assert c.vendor == "AuthenticAMD" and c.asids is None
    assert all(row.intel_support is False and row.amd_support is False for row in c.rows)


def test_no_data_at_all() -> None:
    c = compare(None, None, None, None)
    assert len(c.rows) == ROW_COUNT
    for row in c.rows:
        assert row.intel_support is (False if NO_MECHANISM.match(row.intel) else None), row.key
        assert row.amd_support is (False if NO_MECHANISM.match(row.amd) else None), row.key


def test_rows_are_grouped_by_topic_with_unique_keys() -> None:
    c = compare(None, None, None, None)
    keys = [row.key for row in c.rows]
    assert len(set(keys)) == len(keys) and all(keys)
    topics = [row.topic for row in c.rows]
    assert topics == sorted(topics, key=c.topics.index)  # each topic's rows are contiguous
    assert c.topics[:3] == ("CPU modes", "control structure", "instructions")
    with pytest.raises(KeyError, match="no comparison row 'nope'"):
        c.row("nope")


def test_bad_iommu_name() -> None:
    with pytest.raises(ValueError, match="iommu must be"):
        compare(None, None, None, "intel")


def test_json_round_trip() -> None:
    c = of(EPYC_GUEST, "amd-vi")
    data = json.loads(json.dumps(c.to_json()))
    assert Comparison.from_json(data) == c
    assert data["rows"][0] == {
        "topic": "CPU modes", "aspect": "new processor modes", "key": "modes",
        "intel": c.rows[0].intel, "amd": c.rows[0].amd,
        "intel_support": False, "amd_support": False, "note": c.rows[0].note,
    }  # fmt: skip


# --- instructions: the table checks itself --------------------------------------------------------

_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def _disassemble(code: bytes, tmp_path: Path) -> tuple[str, int] | None:
    """(mnemonic, length) of the first instruction: capstone, else GNU objdump if installed."""
    for insn in _MD.disasm(code, 0):
        return insn.mnemonic, insn.size
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    path = tmp_path / "code.bin"
    path.write_bytes(code)
    out = subprocess.run([objdump, "-D", "-b", "binary", "-m", "i386:x86-64", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    m = re.search(r"^\s*0:\t((?:[0-9a-f]{2} )+)\s*\t(\S+)", out, re.M)
    return None if m is None else (m.group(2), len(m.group(1).split()))


@pytest.mark.parametrize("insn", INSTRUCTIONS, ids=lambda i: i.mnemonic)
def test_opcode_bytes_disassemble_to_the_mnemonic(insn: Instruction, tmp_path: Path) -> None:
    code = insn.encoding()
    decoded = _disassemble(code, tmp_path)
    if decoded is None:  # capstone 5 does not know INVLPGB/TLBSYNC
        pytest.skip(f"capstone {capstone.__version__} cannot decode {insn} and objdump is absent "
                    "(apt-get install binutils)")
    assert decoded == (insn.mnemonic.lower(), len(code))


def test_encoding_of_modrm_forms() -> None:
    by_name = {i.mnemonic: i for i in INSTRUCTIONS}
    assert by_name["VMXON"].encoding() == bytes([0xF3, 0x0F, 0xC7, 0x30])  # /6: [rax]
    assert by_name["VMPTRST"].encoding() == bytes([0x0F, 0xC7, 0x38])  # /7
    assert by_name["INVEPT"].encoding() == bytes([0x66, 0x0F, 0x38, 0x80, 0x08])  # rcx, [rax]


def test_every_instruction_is_in_exactly_one_row_and_every_opcode_shown_is_one() -> None:
    c = compare(None, None, None, None)
    cells = [cell for row in c.rows for cell in (row.intel, row.amd)]
    for insn in INSTRUCTIONS:
        assert sum(cell.count(str(insn)) for cell in cells) == 1, insn
    shown = {m for cell in cells for m in re.findall(r"\b[A-Z]+ \([0-9A-F]{2}[0-9A-F /r]*\)", cell)}
    assert shown == {str(insn) for insn in INSTRUCTIONS}


# --- detect_iommu ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["sys/class/iommu/dmar0/", "sys/class/iommu/dmar1/"], "vt-d"),
        (["sys/class/iommu/ivhd0/"], "amd-vi"),
        (["sys/class/iommu/", "sys/firmware/acpi/tables/DMAR"], "vt-d"),
        (["sys/firmware/acpi/tables/IVRS", "sys/firmware/acpi/tables/APIC"], "amd-vi"),
        (["sys/class/iommu/", "sys/firmware/acpi/tables/APIC"], None),
        ([], None),
    ],
)
def test_detect_iommu(tmp_path: Path, paths: list[str], expected: str | None) -> None:
    for p in paths:
        target = tmp_path / p
        if p.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
    assert detect_iommu(tmp_path) == expected

