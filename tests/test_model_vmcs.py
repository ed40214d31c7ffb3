"""VMCS field encodings (SDM Vol. 3D appendix B), exit reasons (appendix C), the VMWRITE image and
the VM-entry checks (SDM Vol. 3C "VM Entries"), checked on hand-decoded values and on the VMX
capability MSRs of a real Haswell-EP."""

from __future__ import annotations

import functools
import struct

import pytest
from dumps import FIXTURES, HASWELL_EP
from hypothesis import given
from hypothesis import strategies as st

from pykvm.model import vmcs
from pykvm.model.hvm import ExitPolicy, HostState, NestedPaging, VcpuState
from pykvm.model.vmcs import (
    VMCS_FIELDS,
    VMCS_RULES,
    VMWRITE_TERMINATOR,
    VMX_EXIT_REASONS,
    Access,
    Area,
    FieldType,
    VmcsImage,
    Width,
    check_vmcs,
    decode_encoding,
    decode_exit_reason,
    encode,
    field,
    lookup,
)
from pykvm.probe.dump import read_dump
from pykvm.probe.vmx import VmxCapabilities, decode_vmx


@functools.cache
def haswell() -> tuple[VmxCapabilities, int]:
    dump = read_dump(FIXTURES / HASWELL_EP)
    caps = decode_vmx(dump.msrs)
    assert caps is not None
    regs = dump.cpuid.get_regs(0x8000_0008)
    assert regs is not None
    return caps, regs.eax & 0xFF


HOST = HostState(cr3=0x5000, rip=0x40_0000, rsp=0x7000)
BITMAPS: dict = {"io_exits": ExitPolicy.BITMAP, "io_bitmap_gpa": 0x20000,
                 "msr_exits": ExitPolicy.BITMAP, "msr_bitmap_gpa": 0x30000}  # fmt: skip


def good_state(**kw: object) -> VcpuState:
    return VcpuState.long_mode(0x1000, 0x8000, 0x2000, nested_paging=NestedPaging(0x10000),
                               **{**BITMAPS, **kw})  # fmt: skip


def good_image() -> VmcsImage:
    caps, _ = haswell()
    return good_state().to_vmcs(caps, HOST)


def violations(image: VmcsImage) -> list[vmcs.Violation]:
    caps, maxphyaddr = haswell()
    return check_vmcs(image, caps, maxphyaddr=maxphyaddr)


def rules(image: VmcsImage) -> dict[str, list[vmcs.Violation]]:
    out: dict[str, list[vmcs.Violation]] = {}
    for v in violations(image):
        out.setdefault(v.rule_id, []).append(v)
    return out


# --- encodings, hand-checked against the SDM tables ------------------------------------------


def test_guest_rip_is_0x681e_natural_width_guest_state_index_15_full() -> None:
    f = field("GUEST_RIP")
    assert f.encoding == 0x681E
    d = decode_encoding(0x681E)
    assert (d.access, d.index, d.type, d.width) == (Access.FULL, 0xF, FieldType.GUEST_STATE,
                                                    Width.NATURAL)
    assert f.area is Area.GUEST_STATE and f.bits == 64 and f.high is None


def test_virtual_processor_id_is_encoding_0() -> None:
    f = field("VIRTUAL_PROCESSOR_ID")
    assert f.encoding == 0x0000
    assert decode_encoding(0) == vmcs.Encoding(Access.FULL, 0, FieldType.CONTROL, Width.BITS16)
    assert f.area is Area.EXECUTION_CONTROLS and f.bits == 16


def test_ept_pointer_is_a_64_bit_control_and_its_high_half_is_encoding_plus_1() -> None:
    f = field("EPT_POINTER")
    assert f.encoding == 0x201A
    assert f.decoded == vmcs.Encoding(Access.FULL, 13, FieldType.CONTROL, Width.BITS64)
    assert f.high == 0x201B
    assert lookup(0x201B) == (f, Access.HIGH)
    assert lookup(0x201A) == (f, Access.FULL)
    assert decode_encoding(0x201B).access is Access.HIGH


@pytest.mark.parametrize("name, encoding, area", [
    ("VM_EXIT_REASON", 0x4402, Area.EXIT_INFORMATION),
    ("EXIT_QUALIFICATION", 0x6400, Area.EXIT_INFORMATION),
    ("GUEST_PHYSICAL_ADDRESS", 0x2400, Area.EXIT_INFORMATION),
    ("HOST_RIP", 0x6C16, Area.HOST_STATE),
    ("HOST_CS_SELECTOR", 0x0C02, Area.HOST_STATE),
    ("GUEST_ES_SELECTOR", 0x0800, Area.GUEST_STATE),
    ("GUEST_CS_AR_BYTES", 0x4816, Area.GUEST_STATE),
    ("VMCS_LINK_POINTER", 0x2800, Area.GUEST_STATE),
    ("GUEST_IA32_EFER", 0x2806, Area.GUEST_STATE),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002, Area.EXECUTION_CONTROLS),
    ("SECONDARY_VM_EXEC_CONTROL", 0x401E, Area.EXECUTION_CONTROLS),
    ("CR3_TARGET_COUNT", 0x400A, Area.EXECUTION_CONTROLS),
    ("TSC_OFFSET", 0x2010, Area.EXECUTION_CONTROLS),
    ("VM_EXIT_CONTROLS", 0x400C, Area.EXIT_CONTROLS),
    ("VM_EXIT_MSR_LOAD_ADDR", 0x2008, Area.EXIT_CONTROLS),
    ("VM_ENTRY_CONTROLS", 0x4012, Area.ENTRY_CONTROLS),
    ("VM_ENTRY_INTR_INFO_FIELD", 0x4016, Area.ENTRY_CONTROLS),
])  # fmt: skip
def test_hand_checked_encodings_and_areas(name: str, encoding: int, area: Area) -> None:
    assert field(name).encoding == encoding
    assert field(name).area is area
    assert field(encoding).name == name


def test_every_field_decodes_and_the_table_is_consistent() -> None:
    encodings = [f.encoding for f in VMCS_FIELDS.values()]
    assert len(set(encodings)) == len(encodings)
    type_area = {FieldType.GUEST_STATE: {Area.GUEST_STATE}, FieldType.HOST_STATE: {Area.HOST_STATE},
                 FieldType.EXIT_INFORMATION: {Area.EXIT_INFORMATION},
                 FieldType.CONTROL: {Area.EXECUTION_CONTROLS, Area.EXIT_CONTROLS,
                                     Area.ENTRY_CONTROLS}}  # fmt: skip
    for f in VMCS_FIELDS.values():
        d = f.decoded
        assert d.access is Access.FULL, f.name
        assert f.area in type_area[d.type], f.name
        assert (f.width, f.index, f.type) == (d.width, d.index, d.type)
    assert {f.area for f in VMCS_FIELDS.values()} == set(Area)


def test_counts() -> None:
    assert len(VMCS_FIELDS) >= 190
    assert len(VMX_EXIT_REASONS) >= 80
    by_width = {w: sum(1 for f in VMCS_FIELDS.values() if f.width == w) for w in Width}
    assert all(by_width.values())


@pytest.mark.parametrize("bad", [0x1000, 0x8000, 0x1_0000, 0x6801, 0x0001, 0x4003, 2**32, -1])
def test_malformed_encodings_are_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        decode_encoding(bad)


def test_unknown_names_and_encodings() -> None:
    with pytest.raises(KeyError, match="GUEST_RIPP"):
        field("GUEST_RIPP")
    with pytest.raises(KeyError, match="0x6830"):
        field(0x6830)  # well-formed but no such field
    with pytest.raises(ValueError, match="reserved"):
        field(0x1800)


@given(access=st.integers(0, 1), index=st.integers(0, 0x1FF), kind=st.integers(0, 3),
       width=st.integers(0, 3))  # fmt: skip
def test_encode_decode_round_trip(access: int, index: int, kind: int, width: int) -> None:
    if access == 1 and width != Width.BITS64:
        with pytest.raises(ValueError):
            encode(access, index, kind, width)
        return
    enc = encode(access, index, kind, width)
    assert 0 <= enc <= 0x7FFF and not enc & 0x1000
    d = decode_encoding(enc)
    assert (d.access, d.index, d.type, d.width) == (access, index, kind, width)
    assert d.encode() == enc


def _valid(enc: int) -> bool:
    return not enc & 0x1000 and (not enc & 1 or (enc >> 13) & 3 == 1)


@given(st.integers(0, 0x7FFF).filter(_valid))
def test_any_valid_encoding_round_trips(enc: int) -> None:
    assert decode_encoding(enc).encode() == enc


# --- exit reasons ----------------------------------------------------------------------------


@pytest.mark.parametrize("number, name", [
    (0, "EXCEPTION_NMI"), (1, "EXTERNAL_INTERRUPT"), (2, "TRIPLE_FAULT"), (10, "CPUID"),
    (12, "HLT"), (18, "VMCALL"), (28, "CR_ACCESS"), (30, "IO_INSTRUCTION"), (31, "MSR_READ"),
    (32, "MSR_WRITE"), (33, "INVALID_STATE"), (48, "EPT_VIOLATION"), (49, "EPT_MISCONFIG"),
    (52, "PREEMPTION_TIMER"), (55, "XSETBV"), (74, "BUS_LOCK"), (77, "TDCALL"),
])  # fmt: skip
def test_exit_reasons(number: int, name: str) -> None:
    assert VMX_EXIT_REASONS[number].name == name


def test_unused_exit_reasons_are_absent_and_the_field_decodes() -> None:
    for n in (35, 38, 42):
        assert n not in VMX_EXIT_REASONS
    reason, flags = decode_exit_reason(0x8000_0021)
    assert reason is not None and reason.name == "INVALID_STATE"
    assert flags == ("VM-entry failure",)
    assert decode_exit_reason(0x1234)[0] is None
    with pytest.raises(ValueError):
        decode_exit_reason(2**32)


# --- the image ---------------------------------------------------------------------------------


def test_image_refuses_values_wider_than_the_field() -> None:
    img = VmcsImage()
    with pytest.raises(ValueError, match="VIRTUAL_PROCESSOR_ID .*16-bit"):
        img["VIRTUAL_PROCESSOR_ID"] = 0x1_0000
    with pytest.raises(ValueError, match="VM_ENTRY_CONTROLS"):
        img[0x4012] = 1 << 32
    with pytest.raises(TypeError):
        img["GUEST_RIP"] = "0x1000"  # type: ignore[assignment]
    with pytest.raises(KeyError):
        img["NO_SUCH_FIELD"] = 1
    img[vmcs.field("GUEST_RIP")] = 2**64 - 1
    assert img[0x681E] == img["GUEST_RIP"] == 2**64 - 1


def test_vmwrite_table_and_packed_bytes_round_trip() -> None:
    img = VmcsImage({"GUEST_RIP": 0x1000, "EPT_POINTER": 0x1_2345_601E, "VM_EXIT_REASON": 12,
                     "VIRTUAL_PROCESSOR_ID": 1})  # fmt: skip
    table = img.to_vmwrite_table()
    assert table == [(0x0000, 1), (0x201A, 0x1_2345_601E), (0x681E, 0x1000)]  # read-only left out
    assert (0x4402, 12) in img.to_vmwrite_table(include_read_only=True)
    split = img.to_vmwrite_table(split_64=True)
    assert (0x201A, 0x2345_601E) in split and (0x201B, 0x1) in split
    assert VmcsImage.from_vmwrite_table(split)["EPT_POINTER"] == 0x1_2345_601E
    data = img.to_bytes()
    assert len(data) == 16 * 4
    assert struct.unpack_from("<QQ", data, 16) == (0x201A, 0x1_2345_601E)
    assert struct.unpack_from("<QQ", data, 48) == (VMWRITE_TERMINATOR, 0)
    back = VmcsImage.from_bytes(data)
    assert back == VmcsImage({k: v for k, v in img.items() if k != "VM_EXIT_REASON"})
    assert len(img.to_bytes(terminated=False)) == 48
    with pytest.raises(ValueError, match="multiple of 16"):
        VmcsImage.from_bytes(b"\0" * 17)


def test_good_image_groups_into_the_areas() -> None:
    areas = good_image().by_area()
    assert "GUEST_RIP" in areas[Area.GUEST_STATE] and "HOST_RIP" in areas[Area.HOST_STATE]
    assert "EPT_POINTER" in areas[Area.EXECUTION_CONTROLS]
    assert "VM_EXIT_CONTROLS" in areas[Area.EXIT_CONTROLS]
    assert "VM_ENTRY_CONTROLS" in areas[Area.ENTRY_CONTROLS]
    assert areas[Area.EXIT_INFORMATION] == {}


# --- the VM-entry checks on Haswell-EP ---------------------------------------------------------


def test_a_good_long_mode_image_passes() -> None:
    assert violations(good_image()) == []


def test_good_protected_and_real_mode_images_pass() -> None:
    caps, _ = haswell()
    pm = VcpuState.protected_mode(0x1000, 0x2000, nested_paging=NestedPaging(0x10000), **BITMAPS)
    assert violations(pm.to_vmcs(caps, HOST)) == []
    rm = VcpuState.real_mode(0x7C00, nested_paging=NestedPaging(0x10000), **BITMAPS)
    img = rm.to_vmcs(caps, HOST)
    assert img["SECONDARY_VM_EXEC_CONTROL"] & vmcs.PROC2_UNRESTRICTED
    assert violations(img) == []


def test_reserved_control_bit_is_named() -> None:
    img = good_image()
    img["PIN_BASED_VM_EXEC_CONTROL"] |= 1 << 8
    img["CPU_BASED_VM_EXEC_CONTROL"] |= 1  # bit 0: reserved, Haswell allows only 0
    found = rules(img)["exec.reserved"]
    assert {v.field for v in found} == {"PIN_BASED_VM_EXEC_CONTROL", "CPU_BASED_VM_EXEC_CONTROL"}
    assert ("SDM 27.2.1.1: reserved bit 0 of the primary processor-based VM-execution controls is 1"
            in [v.rule for v in found])
    msgs = [v.message for v in found]
    assert "reserved bit 8 of the pin-based VM-execution controls is 1" in msgs


def test_named_control_the_processor_lacks_and_must_be_1_bits() -> None:
    img = good_image()
    img["CPU_BASED_VM_EXEC_CONTROL"] |= vmcs.PROC_TERTIARY  # Haswell has no tertiary controls
    img["VM_ENTRY_CONTROLS"] &= ~(1 << 4)  # a default-1 bit the TRUE MSR still forces
    got = rules(img)
    assert any("activate tertiary controls" in v.message and "IA32_VMX_TRUE_PROCBASED_CTLS" in
               v.message for v in got["exec.reserved"])
    assert got["entry.reserved"][0].field == "VM_ENTRY_CONTROLS"
    assert "bit 4 of the VM-entry controls is 0" in got["entry.reserved"][0].message


def test_non_canonical_guest_rip() -> None:
    img = good_image()
    img["GUEST_RIP"] = 0x0000_8000_0000_0000
    (v,) = violations(img)
    assert v.rule_id == "guest.rip" and v.field == "GUEST_RIP"
    assert v.rule.startswith("SDM 27.3.1.4") and "not canonical" in v.rule


def test_eptp_with_walk_length_3() -> None:
    img = good_image()
    img["EPT_POINTER"] = (img["EPT_POINTER"] & ~0x38) | (2 << 3)
    (v,) = violations(img)
    assert v.field == "EPT_POINTER" and v.section == "SDM 27.2.1.1"
    assert "page-walk length 3 (bits 5:3 = 2)" in v.message


def test_eptp_memory_type_and_reserved_bits() -> None:
    img = good_image()
    img["EPT_POINTER"] = (img["EPT_POINTER"] & ~7) | 1 | 0x100 | (1 << 50)
    msgs = [v.message for v in violations(img)]
    assert any("memory type 1" in m for m in msgs)
    assert any("reserved bits 11:8" in m for m in msgs)
    assert any("bits 63:46" in m for m in msgs)


def test_vpid_0_with_enable_vpid() -> None:
    img = good_image()
    img["VIRTUAL_PROCESSOR_ID"] = 0
    (v,) = violations(img)
    assert v.rule == "SDM 27.2.1.1: VPID is 0 while 'enable VPID' is 1"
    assert v.field == "VIRTUAL_PROCESSOR_ID"


def test_unrestricted_guest_needs_ept() -> None:
    img = good_image()
    img["SECONDARY_VM_EXEC_CONTROL"] = (img["SECONDARY_VM_EXEC_CONTROL"] & ~vmcs.PROC2_EPT) \
        | vmcs.PROC2_UNRESTRICTED
    assert "exec.unrestricted" in rules(img)


def test_control_field_rules() -> None:
    img = good_image()
    img["CR3_TARGET_COUNT"] = 5
    img["IO_BITMAP_A"] = 0x20010
    img["MSR_BITMAP"] = 1 << 46
    img["PIN_BASED_VM_EXEC_CONTROL"] |= vmcs.PIN_VIRTUAL_NMIS
    img["PIN_BASED_VM_EXEC_CONTROL"] &= ~vmcs.PIN_NMI
    img["VM_EXIT_MSR_LOAD_COUNT"] = 1
    img["VM_EXIT_MSR_LOAD_ADDR"] = 0x1008
    got = rules(img)
    assert got["exec.cr3_target_count"][0].message.startswith("CR3-target count 5")
    assert "not 4096-byte aligned" in got["exec.io_bitmap"][0].message
    assert "46-bit physical-address width" in got["exec.msr_bitmap"][0].message
    assert got["exec.virtual_nmis"][0].field == "PIN_BASED_VM_EXEC_CONTROL"
    assert got["exit.msr_lists"][0].field == "VM_EXIT_MSR_LOAD_ADDR"


def test_event_injection_rules() -> None:
    img = good_image()
    img["VM_ENTRY_INTR_INFO_FIELD"] = 1 << 31 | 3 << 8 | 14  # #PF without 'deliver error code'
    assert [v.rule_id for v in violations(img)] == ["entry.event"]
    img["VM_ENTRY_INTR_INFO_FIELD"] = 1 << 31 | 3 << 8 | 1 << 11 | 14
    img["VM_ENTRY_EXCEPTION_ERROR_CODE"] = 0x1_0000
    assert "error-code bits 31:16" in violations(img)[0].message
    img["VM_ENTRY_INTR_INFO_FIELD"] = 1 << 31 | 2 << 8 | 3  # NMI with vector 3
    assert "vector 3, not 2" in violations(img)[0].message
    img["VM_ENTRY_INTR_INFO_FIELD"] = 1 << 31 | 0 << 8 | 0x20  # external interrupt with IF = 0
    assert [v.rule_id for v in violations(img)] == ["guest.rflags_if"]


def test_host_state_rules() -> None:
    img = good_image()
    img["HOST_CS_SELECTOR"] = 0
    img["HOST_SS_SELECTOR"] = 0x13  # RPL 3
    img["HOST_CR4"] &= ~vmcs.CR4_VMXE
    img["HOST_RIP"] = 0x1234_0000_0000_0000
    img["HOST_IA32_EFER"] &= ~vmcs.EFER_LMA
    img["HOST_IA32_PAT"] = 0x02
    got = rules(img)
    assert got["host.cs_tr"][0].field == "HOST_CS_SELECTOR"
    assert got["host.selector"][0].field == "HOST_SS_SELECTOR"
    assert "CR4.VMXE (bit 13) is 0" in got["host.cr4"][0].message
    assert got["host.address_space"][0].field == "HOST_RIP"
    assert "LMA" in got["host.efer"][0].message
    assert "PAT entry 0 holds 2" in got["host.pat"][0].message


def test_guest_register_rules() -> None:
    img = good_image()
    img["GUEST_RFLAGS"] = 0x8  # bit 1 clear, reserved bit 3 set
    img["GUEST_CR0"] &= ~vmcs.CR0_NE
    img["GUEST_IA32_EFER"] &= ~vmcs.EFER_LMA
    img["GUEST_GDTR_LIMIT"] = 0x1_0000
    got = rules(img)
    assert {v.message for v in got["guest.rflags"]} == {"RFLAGS reserved bits [3] are 1",
                                                         "RFLAGS bit 1 is 0"}
    assert "CR0.NE (bit 5) is 0" in got["guest.cr0"][0].message
    assert "guest EFER.LMA is 0 but 'IA-32e mode guest' is 1" in got["guest.efer"][0].message
    assert got["guest.dtr"][0].field == "GUEST_GDTR_LIMIT"


def test_guest_segment_rules() -> None:
    img = good_image()
    img["GUEST_SS_AR_BYTES"] |= 3 << 5  # SS.DPL 3 while CS.DPL 0 and SS.RPL 0
    img["GUEST_TR_AR_BYTES"] = (img["GUEST_TR_AR_BYTES"] & ~0xF) | 9  # available, not busy
    img["GUEST_CS_AR_BYTES"] |= 1 << 14  # L and D/B both 1
    img["GUEST_DS_AR_BYTES"] |= 0x100  # reserved bit 8
    img["GUEST_LDTR_AR_BYTES"] = 0x82  # usable LDT, fine
    img["GUEST_LDTR_SELECTOR"] = 0x24  # TI = 1
    got = rules(img)
    assert {v.field for v in got["guest.seg.dpl"]} >= {"GUEST_CS_AR_BYTES", "GUEST_SS_AR_BYTES"}
    assert "TR type 9 is not a busy TSS (11)" in got["guest.seg.type"][0].message
    assert got["guest.seg.cs_l_db"][0].field == "GUEST_CS_AR_BYTES"
    assert got["guest.seg.reserved"][0].field == "GUEST_DS_AR_BYTES"
    assert got["guest.seg.selector"][0].field == "GUEST_LDTR_SELECTOR"


def test_activity_and_interruptibility() -> None:
    img = good_image()
    img["GUEST_ACTIVITY_STATE"] = 4
    img["GUEST_INTERRUPTIBILITY_INFO"] = 0b11 | 1 << 5
    got = rules(img)
    assert "activity state 4 is not supported" in got["guest.activity"][0].message
    msgs = [v.message for v in got["guest.interruptibility"]]
    assert "blocking by STI and by MOV SS are both 1" in msgs
    assert "interruptibility-state reserved bits 31:5 are not 0" in msgs


def test_without_caps_the_sdm_defaults_apply() -> None:
    img = good_state().to_vmcs(None, HOST)
    assert check_vmcs(img) == []
    img["CPU_BASED_VM_EXEC_CONTROL"] |= 1 << 0  # no SDM name: reserved everywhere
    (v,) = check_vmcs(img)
    assert v.message == "reserved bit 0 of the primary processor-based VM-execution controls is 1"
    img["CPU_BASED_VM_EXEC_CONTROL"] &= ~(1 << 0) & ~(1 << 1)  # default-1 bit
    (v,) = check_vmcs(img)
    assert "default-1 class" in v.message


def test_every_rule_cites_an_sdm_section_and_violations_read_well() -> None:
    for rule in VMCS_RULES.values():
        assert rule.section.startswith("SDM 27.")
    v = vmcs.Violation("exec.vpid", "SDM 27.2.1.1", "VPID is 0", "VIRTUAL_PROCESSOR_ID", 0)
    assert str(v) == "SDM 27.2.1.1: VPID is 0 [VIRTUAL_PROCESSOR_ID = 0x0]"
