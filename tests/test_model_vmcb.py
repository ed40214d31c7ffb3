"""VMCB layout (APM Vol. 2 appendix B, Linux struct vmcb_control_area / vmcb_save_area), SVM exit
codes (appendix C) and the VMRUN consistency checks (APM 15.5.1, 15.20)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.model import vmcb
from pykvm.model.hvm import ExitPolicy, NestedPaging, VcpuState
from pykvm.model.vmcb import (
    CONTROL_AREA_SIZE,
    RESERVED_RANGES,
    SAVE_AREA_OFFSET,
    SAVE_AREA_SIZE,
    SVM_EXIT_CODES,
    VMCB_FIELDS,
    VMCB_RULES,
    VmcbArea,
    VmcbImage,
    check_vmcb,
    svm_exit,
)

MAPS: dict = {"io_exits": ExitPolicy.BITMAP, "io_bitmap_gpa": 0x20000,
              "msr_exits": ExitPolicy.BITMAP, "msr_bitmap_gpa": 0x30000}  # fmt: skip


def good_vmcb() -> VmcbImage:
    return VcpuState.long_mode(0x1000, 0x8000, 0x2000, nested_paging=NestedPaging(0x10000),
                               **MAPS).to_vmcb()  # fmt: skip


def rule_ids(image: VmcbImage, **kw: int) -> list[str]:
    return [v.rule_id for v in check_vmcb(image, **kw)]


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, offset, size", [
    ("INTERCEPT_CR_READ", 0x000, 2), ("INTERCEPT_CR_WRITE", 0x002, 2),
    ("INTERCEPT_EXCEPTIONS", 0x008, 4), ("INTERCEPT_MISC1", 0x00C, 4),
    ("INTERCEPT_MISC2", 0x010, 4), ("INTERCEPT_MISC3", 0x014, 4),
    ("PAUSE_FILTER_THRESHOLD", 0x03C, 2), ("PAUSE_FILTER_COUNT", 0x03E, 2),
    ("IOPM_BASE_PA", 0x040, 8), ("MSRPM_BASE_PA", 0x048, 8), ("TSC_OFFSET", 0x050, 8),
    ("GUEST_ASID", 0x058, 4), ("TLB_CONTROL", 0x05C, 1), ("V_INTR_CONTROL", 0x060, 4),
    ("INTERRUPT_SHADOW", 0x068, 4), ("EXITCODE", 0x070, 8), ("EXITINFO1", 0x078, 8),
    ("EXITINFO2", 0x080, 8), ("EXITINTINFO", 0x088, 8), ("NESTED_CTL", 0x090, 8),
    ("EVENTINJ", 0x0A8, 8), ("N_CR3", 0x0B0, 8), ("VIRT_EXT", 0x0B8, 8),
    ("VMCB_CLEAN", 0x0C0, 4), ("NRIP", 0x0C8, 8), ("GUEST_INSN_LEN", 0x0D0, 1),
    ("GUEST_INSN_BYTES", 0x0D1, 15), ("AVIC_BACKING_PAGE", 0x0E0, 8), ("VMSA_PA", 0x108, 8),
    ("ES_SELECTOR", 0x400, 2), ("CS_ATTRIB", 0x412, 2), ("CS_LIMIT", 0x414, 4),
    ("CS_BASE", 0x418, 8), ("TR_BASE", 0x498, 8), ("CPL", 0x4CB, 1), ("EFER", 0x4D0, 8),
    ("CR4", 0x548, 8), ("CR3", 0x550, 8), ("CR0", 0x558, 8), ("DR7", 0x560, 8), ("DR6", 0x568, 8),
    ("RFLAGS", 0x570, 8), ("RIP", 0x578, 8), ("RSP", 0x5D8, 8), ("RAX", 0x5F8, 8),
    ("STAR", 0x600, 8), ("KERNEL_GS_BASE", 0x620, 8), ("SYSENTER_EIP", 0x638, 8),
    ("CR2", 0x640, 8), ("G_PAT", 0x668, 8), ("DBGCTL", 0x670, 8), ("LASTEXCPTO", 0x690, 8),
    ("SPEC_CTRL", 0x6E0, 8),
])  # fmt: skip
def test_hand_checked_offsets(name: str, offset: int, size: int) -> None:
    f = VMCB_FIELDS[name]
    assert (f.offset, f.size) == (offset, size)


def test_fields_do_not_overlap_and_fit_their_areas() -> None:
    fields = sorted(VMCB_FIELDS.values(), key=lambda f: f.offset)
    for a, b in itertools.pairwise(fields):
        assert a.end <= b.offset, (a.name, b.name)
    for f in fields:
        if f.area is VmcbArea.CONTROL:
            assert 0 <= f.offset and f.end <= CONTROL_AREA_SIZE, f.name
        else:
            assert SAVE_AREA_OFFSET <= f.offset and f.end <= SAVE_AREA_OFFSET + SAVE_AREA_SIZE
    assert fields[-1].end == SAVE_AREA_OFFSET + SAVE_AREA_SIZE  # SPEC_CTRL ends the 744 bytes


def test_reserved_ranges_are_the_kernels_reserved_members() -> None:
    starts = {s for s, _ in RESERVED_RANGES}
    # control: reserved_1 .. reserved_10; save: reserved_0xa0, 0xcc, 0xd8, 0x180, 0x248, 0x298
    assert starts == {0x018, 0x05D, 0x06C, 0x0C4, 0x0E8, 0x100, 0x110, 0x122, 0x148,
                      0x4A0, 0x4CC, 0x4D8, 0x580, 0x648, 0x698}


def test_bitfields() -> None:
    img = VmcbImage()
    img["V_INTR_CONTROL"] = 1 << 8 | 1 << 24 | 0x5
    img["EVENTINJ"] = 1 << 31 | 3 << 8 | 1 << 11 | 14 | 0x6 << 32
    v = img.bits("V_INTR_CONTROL")
    assert (v["V_IRQ"], v["V_INTR_MASKING"], v["V_TPR"], v["AVIC_ENABLE"]) == (1, 1, 5, 0)
    assert img.bits("EVENTINJ") == {"VECTOR": 14, "TYPE": 3, "EV": 1, "V": 1, "ERRORCODE": 6}
    assert vmcb.BITFIELDS["NESTED_CTL"]["NP_ENABLE"] == (0, 1)
    with pytest.raises(KeyError, match="RIP has no named sub-fields"):
        img.bits("RIP")


def test_intercept_bits() -> None:
    assert vmcb.INTERCEPT_MISC1_BITS["CPUID"] == 18
    assert vmcb.INTERCEPT_MISC1_BITS["HLT"] == 24
    assert vmcb.INTERCEPT_MISC1_BITS["IOIO_PROT"] == 27
    assert vmcb.INTERCEPT_MISC1_BITS["SHUTDOWN"] == 31
    assert vmcb.INTERCEPT_MISC2_BITS["VMRUN"] == 0
    assert vmcb.INTERCEPT_MISC2_BITS["VMMCALL"] == 1
    assert vmcb.INTERCEPT_MISC2_BITS["CR15_WRITE_TRAP"] == 31


# --- the image ---------------------------------------------------------------------------------


def test_image_bytes_follow_the_layout() -> None:
    img = VmcbImage()
    img["RIP"] = 0x1122_3344_5566_7788
    img["GUEST_ASID"] = 1
    img["GUEST_INSN_BYTES"] = b"\x0f\x01\xd9"
    data = img.to_bytes()
    assert len(data) == 4096
    assert data[0x578:0x580] == bytes.fromhex("8877665544332211")
    assert data[0x058:0x05C] == b"\1\0\0\0"
    assert data[0x0D1:0x0E0] == b"\x0f\x01\xd9" + bytes(12)
    assert VmcbImage.from_bytes(data) == img
    assert img["GUEST_INSN_BYTES"] == b"\x0f\x01\xd9" + bytes(12)
    assert img.nonzero().keys() == {"RIP", "GUEST_ASID", "GUEST_INSN_BYTES"}


def test_image_errors_name_the_field() -> None:
    img = VmcbImage()
    with pytest.raises(ValueError, match=r"TLB_CONTROL \(VMCB 0x05c\) is 1 byte"):
        img["TLB_CONTROL"] = 0x100
    with pytest.raises(ValueError, match="CS_SELECTOR"):
        img.set_segment("CS", 0x1_0000, 0, 0, 0)
    with pytest.raises(KeyError, match="NCR3"):
        img["NCR3"] = 0
    with pytest.raises(ValueError, match="4096 bytes"):
        VmcbImage.from_bytes(bytes(4095))
    with pytest.raises(ValueError, match="GUEST_INSN_BYTES holds 15"):
        img["GUEST_INSN_BYTES"] = bytes(16)
    img["EXITCODE"] = -1
    assert img["EXITCODE"] == 2**64 - 1


@given(st.sampled_from([f for f in VMCB_FIELDS.values() if f.is_int]), st.data())
def test_any_integer_field_round_trips_through_bytes(
    f: vmcb.VmcbField, data: st.DataObject
) -> None:
    value = data.draw(st.integers(0, 2 ** (8 * f.size) - 1))
    img = VmcbImage()
    img[f.name] = value
    back = VmcbImage.from_bytes(img.to_bytes())
    assert back[f.name] == value
    assert back.nonzero().keys() <= {f.name}


# --- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize("code, name", [
    (0x000, "READ_CR0"), (0x013, "WRITE_CR3"), (0x027, "READ_DR7"), (0x041, "EXCP_DB"),
    (0x04E, "EXCP_PF"), (0x060, "INTR"), (0x064, "VINTR"), (0x072, "CPUID"), (0x078, "HLT"),
    (0x07B, "IOIO"), (0x07C, "MSR"), (0x07F, "SHUTDOWN"), (0x080, "VMRUN"), (0x081, "VMMCALL"),
    (0x08D, "XSETBV"), (0x08F, "EFER_WRITE_TRAP"), (0x0A2, "INVPCID"), (0x400, "NPF"),
    (0x403, "VMGEXIT"), (-1, "INVALID"),
])  # fmt: skip
def test_exit_codes(code: int, name: str) -> None:
    e = svm_exit(code)
    assert e is not None and e.name == name


def test_exit_code_table() -> None:
    assert svm_exit(2**64 - 1) is svm_exit(-1)
    assert svm_exit(0x0A7) is None
    assert len(SVM_EXIT_CODES) >= 170


# --- VMRUN consistency checks ------------------------------------------------------------------


def test_a_good_vmcb_passes() -> None:
    assert check_vmcb(good_vmcb()) == []
    assert check_vmcb(good_vmcb(), maxphyaddr=48) == []


def test_efer_svme_clear() -> None:
    img = good_vmcb()
    img["EFER"] &= ~vmcb.EFER_SVME
    (v,) = check_vmcb(img)
    assert v.rule == "APM 15.5.1: EFER.SVME is 0" and v.field == "EFER"


def test_asid_0() -> None:
    img = good_vmcb()
    img["GUEST_ASID"] = 0
    (v,) = check_vmcb(img)
    assert v.rule_id == "asid.zero" and v.field == "GUEST_ASID" and v.section == "APM 15.5.1"


def test_vmrun_intercept_clear() -> None:
    img = good_vmcb()
    img["INTERCEPT_MISC2"] &= ~1
    assert rule_ids(img) == ["intercept.vmrun"]


@pytest.mark.parametrize("name, value, rule", [
    ("CR0", 0x8005_0033 & ~(1 << 30) | 1 << 29, "cr0.cd_nw"),
    ("CR0", 0x1_8005_0033, "cr0.upper"),
    ("CR3", 1 << 52, "cr3.mbz"),
    ("CR4", 0x20 | 1 << 13, "cr4.mbz"),  # VMXE is reserved on AMD
    ("DR6", 0x1_FFFF_0FF0, "dr6.upper"),
    ("DR7", 0x1_0000_0400, "dr7.upper"),
    ("EFER", 0x1500 | 1 << 9, "efer.mbz"),
    ("CR4", 0, "long.pae"),
    ("CS_ATTRIB", 0x29B | 1 << 10, "long.cs"),
    ("CR4", 0x20 | 1 << 23, "cet.wp_or_none"),
])  # fmt: skip
def test_state_rules(name: str, value: int, rule: str) -> None:
    img = good_vmcb()
    img[name] = value
    got = rule_ids(img)
    if rule == "cet.wp_or_none":  # CR0.WP is 1 in the good state: CET alone is fine
        assert got == []
        img["CR0"] &= ~(1 << 16)
        assert rule_ids(img) == ["cet.wp"]
    else:
        assert got == [rule]


def test_long_mode_without_protection() -> None:
    img = good_vmcb()
    img["CR0"] &= ~1
    assert rule_ids(img) == ["long.pe"]


def test_permission_maps_beyond_the_physical_limit() -> None:
    img = good_vmcb()
    img["MSRPM_BASE_PA"] = (1 << 40) - 0x1000  # the 8 KB map crosses 2^40
    img["IOPM_BASE_PA"] = (1 << 40) - 0x3000  # the 12 KB map just fits
    got = check_vmcb(img, maxphyaddr=40)
    assert [v.rule_id for v in got] == ["msrpm.limit"]
    assert "40-bit physical-address limit" in got[0].message


def test_illegal_event_injection() -> None:
    img = good_vmcb()
    img["EVENTINJ"] = 1 << 31 | 1 << 8 | 0x20  # TYPE 1 is reserved
    (v,) = check_vmcb(img)
    assert v.rule == "APM 15.20: EVENTINJ.TYPE 1 is reserved" and v.field == "EVENTINJ"
    img["EVENTINJ"] = 1 << 31 | 3 << 8 | 2  # exception with the NMI vector
    assert "vector 2" in check_vmcb(img)[0].message
    img["EVENTINJ"] = 1 << 31 | 3 << 8 | 1 << 11 | 14 | 0x6 << 32  # #PF with error code: fine
    assert check_vmcb(img) == []
    img["EVENTINJ"] = 3 << 8 | 2  # not valid: ignored
    assert check_vmcb(img) == []


def test_gpat_checked_with_nested_paging() -> None:
    img = good_vmcb()
    img["G_PAT"] = 0x0007_0406_0007_0402
    assert rule_ids(img) == ["gpat"]
    img["NESTED_CTL"] = 0
    assert rule_ids(img) == []


def test_reserved_bytes_are_named() -> None:
    img = good_vmcb()
    data = bytearray(img.to_bytes())
    data[0x020] = 1
    data[0x5A0] = 0xFF
    got = check_vmcb(VmcbImage.from_bytes(data))
    assert [(v.rule_id, v.field) for v in got] == [("reserved", "reserved@0x018"),
                                                  ("reserved", "reserved@0x580")]
    assert "first at 0x020" in got[0].message


def test_rules_cite_the_apm() -> None:
    assert all(r.section.startswith("APM ") for r in VMCB_RULES.values())
