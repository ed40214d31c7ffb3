"""The vendor-neutral vCPU state: one description, a VMCS image and a VMCB image that pass their
vendor's checks, and exit names shared by both vendors."""

from __future__ import annotations

import functools

import pytest
from dumps import CONROE, FIXTURES, HASWELL_EP
from hypothesis import given
from hypothesis import strategies as st

from pykvm.model import vmcb, vmcs
from pykvm.model.hvm import (
    NEUTRAL_EXITS,
    ExitPolicy,
    HostState,
    NestedPaging,
    Segment,
    VcpuState,
    check,
    neutral_exit_svm,
    neutral_exit_vmx,
)
from pykvm.probe.dump import read_dump
from pykvm.probe.vmx import VmxCapabilities, decode_vmx


@functools.cache
def caps() -> VmxCapabilities:
    c = decode_vmx(read_dump(FIXTURES / HASWELL_EP).msrs)
    assert c is not None
    return c


HOST = HostState(cr3=0x5000, rip=0x40_0000, rsp=0x7000)
MAPS: dict = {"io_exits": ExitPolicy.BITMAP, "io_bitmap_gpa": 0x20000,
              "msr_exits": ExitPolicy.BITMAP, "msr_bitmap_gpa": 0x30000}  # fmt: skip
NPT = NestedPaging(0x10000)


def test_segment_formats() -> None:
    code = Segment.flat_code64()
    assert code.vmx_access_rights == 0xA09B  # G, L, P, S, type B
    assert code.svm_attrib == 0xA9B
    data = Segment.flat_data()
    assert data.vmx_access_rights == 0xC093 and data.svm_attrib == 0xC93
    assert Segment.null().vmx_access_rights == 0x1_0000 and Segment.null().svm_attrib == 0
    assert Segment.tss().vmx_access_rights == 0x8B
    with pytest.raises(ValueError, match="selector"):
        Segment(selector=0x1_0000)
    with pytest.raises(ValueError, match="dpl"):
        Segment(dpl=4)


@given(st.builds(Segment, selector=st.integers(0, 0xFFFF), base=st.integers(0, 2**64 - 1),
                 limit=st.integers(0, 2**32 - 1), type=st.integers(0, 15), s=st.booleans(),
                 dpl=st.integers(0, 3), present=st.booleans(), avl=st.booleans(),
                 l=st.booleans(), db=st.booleans(), g=st.booleans()))  # fmt: skip
def test_vmx_and_svm_attribute_formats_agree(seg: Segment) -> None:
    ar, attrib = seg.vmx_access_rights, seg.svm_attrib
    assert attrib & 0xFF == ar & 0xFF  # type, S, DPL, P
    assert attrib >> 8 == ar >> 12  # AVL, L, D/B, G
    assert not ar & 0xF00


@pytest.mark.parametrize("state", [
    VcpuState.long_mode(0x1000, 0x8000, 0x2000, nested_paging=NPT, **MAPS),
    VcpuState.long_mode(0xFFFF_8000_0000_1000, 0xFFFF_8000_0000_8000, 0x2000, **MAPS),
    VcpuState.protected_mode(0x1000, 0x2000, nested_paging=NPT, tlb_tag=7, **MAPS),
    VcpuState.real_mode(0x7C00, nested_paging=NPT, **MAPS),
], ids=["long+npt", "long-high", "protected+npt", "real+npt"])  # fmt: skip
def test_one_state_two_good_images(state: VcpuState) -> None:
    assert check(state, caps(), HOST, maxphyaddr=46) == {"vmcs": [], "vmcb": []}


def test_controls_carry_the_must_be_1_bits() -> None:
    c = caps()
    img = VcpuState.long_mode(0x1000, 0x8000, 0x2000, **MAPS).to_vmcs(c, HOST)
    assert c.pinbased is not None and c.procbased is not None and c.exit is not None
    assert img["PIN_BASED_VM_EXEC_CONTROL"] & c.pinbased.must_be_1 == c.pinbased.must_be_1
    assert img["CPU_BASED_VM_EXEC_CONTROL"] & c.procbased.must_be_1 == c.procbased.must_be_1
    assert img["VM_EXIT_CONTROLS"] & c.exit.must_be_1 == c.exit.must_be_1
    assert img["VM_EXIT_CONTROLS"] & vmcs.EXIT_HOST_64
    assert img["VM_ENTRY_CONTROLS"] & vmcs.ENTRY_IA32E
    # Haswell's TRUE MSR lets CR3-load/store exiting be 0, so the image leaves them 0
    assert not img["CPU_BASED_VM_EXEC_CONTROL"] & (1 << 15 | 1 << 16)
    # CR4.VMXE is forced in the guest and owned by the host; the guest reads its own CR4
    assert img["GUEST_CR4"] & vmcs.CR4_VMXE and img["CR4_GUEST_HOST_MASK"] & vmcs.CR4_VMXE
    assert img["CR4_READ_SHADOW"] == 0x20
    assert img["VIRTUAL_PROCESSOR_ID"] == 1
    assert img["VMCS_LINK_POINTER"] == 2**64 - 1


def test_ept_on_a_processor_without_secondary_controls_is_reported() -> None:
    conroe = decode_vmx(read_dump(FIXTURES / CONROE).msrs)
    assert conroe is not None and conroe.procbased2 is None
    state = VcpuState.long_mode(0x1000, 0x8000, 0x2000, nested_paging=NPT, **MAPS)
    got = vmcs.check_vmcs(state.to_vmcs(conroe, HOST), conroe)
    msgs = {v.message for v in got if v.rule_id == "exec.reserved"}
    assert ("bit 31 (activate secondary controls) of the primary processor-based VM-execution "
            "controls is 1, which IA32_VMX_PROCBASED_CTLS does not allow") in msgs
    assert ("bit 1 (enable EPT) of the secondary processor-based VM-execution controls is 1, "
            "which this processor (it has no IA32_VMX_PROCBASED_CTLS2) does not allow") in msgs


def test_without_caps_the_default1_class_is_used() -> None:
    img = VcpuState.long_mode(0x1000, 0x8000, 0x2000, **MAPS).to_vmcs(None, HOST)
    assert img["CPU_BASED_VM_EXEC_CONTROL"] & 0x0401_E172 == 0x0401_E172
    assert vmcs.check_vmcs(img) == []


def test_wishes_map_to_both_vendors() -> None:
    st_ = VcpuState.long_mode(0x1000, 0x8000, 0x2000, exit_on_hlt=False, exception_bitmap=1 << 14,
                              io_exits=ExitPolicy.ALL, io_bitmap_gpa=0x20000,
                              msr_exits=ExitPolicy.BITMAP, msr_bitmap_gpa=0x30000)  # fmt: skip
    x = st_.to_vmcs(caps(), HOST)
    assert not x["CPU_BASED_VM_EXEC_CONTROL"] & vmcs.PROC_HLT
    assert x["CPU_BASED_VM_EXEC_CONTROL"] & vmcs.PROC_UNCOND_IO
    assert x["CPU_BASED_VM_EXEC_CONTROL"] & vmcs.PROC_MSR_BITMAPS
    assert x["EXCEPTION_BITMAP"] == 1 << 14 and x["MSR_BITMAP"] == 0x30000
    b = st_.to_vmcb()
    m1 = b.get("INTERCEPT_MISC1")
    assert not m1 >> vmcb.INTERCEPT_MISC1_BITS["HLT"] & 1
    assert m1 >> vmcb.INTERCEPT_MISC1_BITS["CPUID"] & 1
    assert m1 >> vmcb.INTERCEPT_MISC1_BITS["IOIO_PROT"] & 1
    assert b.get("INTERCEPT_EXCEPTIONS") == 1 << 14
    assert b.get("IOPM_BASE_PA") == 0x20000 and b.get("MSRPM_BASE_PA") == 0x30000
    assert b.get("EFER") & vmcb.EFER_SVME and b.get("GUEST_ASID") == 1
    assert b.get("RIP") == 0x1000 and b.get("CS_ATTRIB") == 0xA9B


def test_second_level_paging_and_tlb_tag() -> None:
    st_ = VcpuState.long_mode(0x1000, 0x8000, 0x2000,
                              nested_paging=NestedPaging(0x10000, accessed_dirty=True), tlb_tag=5,
                              **MAPS)  # fmt: skip
    x = st_.to_vmcs(None, HOST)
    assert x["EPT_POINTER"] == 0x10000 | 6 | 3 << 3 | 1 << 6
    assert x["SECONDARY_VM_EXEC_CONTROL"] & (vmcs.PROC2_EPT | vmcs.PROC2_VPID)
    assert x["VIRTUAL_PROCESSOR_ID"] == 5
    b = st_.to_vmcb()
    assert b.get("NESTED_CTL") & vmcb.NP_ENABLE and b.get("N_CR3") == 0x10000
    assert b.get("GUEST_ASID") == 5


def test_tlb_tag_0_means_no_vpid_and_an_illegal_asid() -> None:
    st_ = VcpuState.long_mode(0x1000, 0x8000, 0x2000, tlb_tag=0, **MAPS)
    x = st_.to_vmcs(None, HOST)
    assert "VIRTUAL_PROCESSOR_ID" not in x
    assert not x.get("SECONDARY_VM_EXEC_CONTROL") & vmcs.PROC2_VPID
    assert [v.rule_id for v in vmcb.check_vmcb(st_.to_vmcb())] == ["asid.zero"]


def test_unpaged_guests_need_ept_on_vmx_but_not_on_svm() -> None:
    pe = ("CR0.PE (bit 0) is 0 but IA32_VMX_CR0_FIXED0/1 requires 1 (only 'unrestricted guest' "
          "lets it be 0)")
    pg = ("CR0.PG (bit 31) is 0 but IA32_VMX_CR0_FIXED0/1 requires 1 (only 'unrestricted guest' "
          "lets it be 0)")
    for st_, expected in ((VcpuState.real_mode(0x7C00, **MAPS), {pe, pg}),
                          (VcpuState.protected_mode(0x1000, 0x2000, **MAPS), {pg})):
        got = vmcs.check_vmcs(st_.to_vmcs(caps(), HOST), caps())
        assert {v.message for v in got} == expected
        assert {v.field for v in got} == {"GUEST_CR0"}
        assert vmcb.check_vmcb(st_.to_vmcb()) == []


def test_impossible_wishes_raise() -> None:
    base = VcpuState.long_mode(0x1000, 0x8000, 0x2000, **MAPS)
    with pytest.raises(ValueError, match="CPUID"):
        base.replace(exit_on_cpuid=False).to_vmcs(None, HOST)
    with pytest.raises(ValueError, match="VMCALL"):
        base.replace(exit_on_hypercall=False).to_vmcs(None, HOST)
    with pytest.raises(ValueError, match="activity"):
        base.replace(activity="hlt").to_vmcb()
    with pytest.raises(ValueError, match="io_bitmap_gpa"):
        base.replace(io_bitmap_gpa=None).to_vmcb()
    with pytest.raises(ValueError, match="msr_bitmap_gpa"):
        base.replace(msr_bitmap_gpa=None).to_vmcs(None, HOST)
    # what SVM can do: no CPUID intercept, no VMMCALL intercept
    b = base.replace(exit_on_cpuid=False, exit_on_hypercall=False).to_vmcb()
    assert not b.get("INTERCEPT_MISC1") >> vmcb.INTERCEPT_MISC1_BITS["CPUID"] & 1
    assert b.get("INTERCEPT_MISC2") == 1  # VMRUN only
    assert base.replace(activity="hlt").to_vmcs(None, HOST)["GUEST_ACTIVITY_STATE"] == 1


def test_vmwrite_bytes_of_a_state_round_trip() -> None:
    img = VcpuState.long_mode(0x1000, 0x8000, 0x2000, nested_paging=NPT, **MAPS).to_vmcs(caps(),
                                                                                       HOST)
    data = img.to_bytes()
    assert len(data) == 16 * (len(img) + 1)
    assert vmcs.VmcsImage.from_bytes(data) == img
    assert vmcs.VmcsImage.from_vmwrite_table(img.to_vmwrite_table(split_64=True)) == img


# --- neutral exits -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, vmx_reason, svm_code", [
    ("cpuid", 10, 0x72), ("hlt", 12, 0x78), ("io", 30, 0x7B), ("hypercall", 18, 0x81),
    ("npf", 48, 0x400), ("shutdown", 2, 0x7F), ("invalid_state", 33, -1),
    ("external_interrupt", 1, 0x60), ("interrupt_window", 7, 0x64), ("xsetbv", 55, 0x8D),
    ("exception", 0, 0x4E), ("cr_access", 28, 0x13),
])  # fmt: skip
def test_neutral_names(name: str, vmx_reason: int, svm_code: int) -> None:
    assert neutral_exit_vmx(vmx_reason) == name
    assert neutral_exit_vmx(0x8000_0000 | vmx_reason) == name  # flags ignored
    assert neutral_exit_svm(svm_code) == name


def test_msr_exits_split_by_exitinfo1() -> None:
    assert neutral_exit_vmx(31) == "msr_read" and neutral_exit_vmx(32) == "msr_write"
    assert neutral_exit_svm(0x7C, exitinfo1=0) == "msr_read"
    assert neutral_exit_svm(0x7C, exitinfo1=1) == "msr_write"
    assert neutral_exit_svm(0x7C) == "msr"
    assert neutral_exit_vmx(49) == "npf_misconfig" and neutral_exit_svm(0x7E) is None


def test_neutral_table_refers_to_defined_exits_only() -> None:
    for e in NEUTRAL_EXITS.values():
        assert e.vmx or e.svm, e.name
        for r in e.vmx:
            assert r in vmcs.VMX_EXIT_REASONS, (e.name, r)
        for c in e.svm:
            assert vmcb.svm_exit(c) is not None, (e.name, hex(c))
