"""VMX capability MSR decoding (Intel SDM Vol. 3D appendix A), on the real MSRs of the dumps.

Expected values were read from the dumps (MSRs 0x480-0x490) and match what is publicly known of
these parts: Core 2 (Conroe) has VMX without secondary controls, hence no EPT/VPID/unrestricted
guest; Haswell added VMCS shadowing and EPT A/D flags but not yet PML (Broadwell); 5-level EPT
and tertiary controls arrived with Sapphire Rapids / Alder Lake-era cores.
"""

from __future__ import annotations

import functools
import json

import pytest
from dumps import (
    ALDER_LAKE_N,
    AMD,
    CONROE,
    FIXTURES,
    HASWELL_EP,
    INTEL,
    SAPPHIRE_RAPIDS,
    ZHAOXIN,
)
from hypothesis import given
from hypothesis import strategies as st

from pykvm.probe.dump import Dump, read_dump
from pykvm.probe.vmx import (
    CONTROL_NAMES,
    DEFAULT1,
    ControlGroup,
    Setting,
    VmxCapabilities,
    classify,
    decode_basic,
    decode_controls,
    decode_cr_fixed,
    decode_ept_vpid_cap,
    decode_misc,
    decode_tertiary,
    decode_vmcs_enum,
    decode_vmx,
)

VMX_DUMPS = [*INTEL, ZHAOXIN]


@functools.cache
def load(name: str) -> Dump:
    return read_dump(FIXTURES / name)


@functools.cache
def vmx(name: str) -> VmxCapabilities:
    caps = decode_vmx(load(name).msrs)
    assert caps is not None
    return caps


# --- Conroe: the first VMX generation -------------------------------------------------------------


def test_conroe_basic() -> None:
    basic = vmx(CONROE).basic
    assert basic.raw == 0x001A_0400_0000_0007
    assert (basic.revision_id, basic.vmcs_size, basic.memory_type_name) == (7, 1024, "WB")
    assert basic.dual_monitor_smm and not basic.true_controls and not basic.ins_outs_info


def test_conroe_has_no_secondary_controls_so_no_ept_or_vpid() -> None:
    caps = vmx(CONROE)
    # IA32_VMX_PROCBASED_CTLS = 77B9FFFE_0401E172: bit 63 (31 of allowed-1) is clear.
    assert caps.procbased is not None and caps.procbased.raw >> 63 == 0
    assert caps.procbased.setting("activate secondary controls") is Setting.NO
    assert not caps.secondary_controls
    assert caps.procbased2 is None and caps.ept_vpid is None
    assert not (caps.ept or caps.vpid or caps.unrestricted_guest or caps.vmcs_shadowing)
    assert 0x48B not in load(CONROE).msrs and 0x48C not in load(CONROE).msrs
    assert caps.missing_msrs == ()  # nothing that should exist is missing


def test_conroe_forces_cr3_exiting_and_debug_controls() -> None:
    caps = vmx(CONROE)
    assert caps.procbased is not None and caps.exit is not None and caps.entry is not None
    assert caps.procbased.setting("CR3-load exiting") is Setting.FORCED
    assert caps.procbased.setting("CR3-store exiting") is Setting.FORCED
    assert caps.exit.setting("save debug controls") is Setting.FORCED
    assert caps.entry.setting("load debug controls") is Setting.FORCED
    assert caps.procbased.setting("use TPR shadow") is Setting.YES
    assert caps.procbased.setting("monitor trap flag") is Setting.NO
    assert caps.pinbased is not None and caps.pinbased.setting("virtual NMIs") is Setting.NO
    assert not caps.preemption_timer


# --- Haswell-EP -----------------------------------------------------------------------------------


def test_haswell_ep() -> None:
    caps = vmx(HASWELL_EP)
    assert caps.basic.true_controls and caps.basic.ins_outs_info and caps.basic.revision_id == 0x12
    assert caps.ept and caps.vpid and caps.unrestricted_guest and caps.vmcs_shadowing
    assert caps.posted_interrupts and caps.preemption_timer
    assert caps.procbased2 is not None
    assert caps.procbased2.setting("enable PML") is Setting.NO  # PML came with Broadwell
    assert caps.procbased2.setting("enable VM functions") is Setting.YES
    assert not caps.tertiary_controls and caps.procbased3 is None
    ept = caps.ept_vpid
    assert ept is not None and ept.raw == 0x0000_0F01_0633_4141
    assert ept.walk_length_4 and not ept.walk_length_5 and ept.max_walk_length == 4
    assert ept.pages_2mb and ept.pages_1gb and ept.memtype_wb and ept.memtype_uc
    assert ept.invept and ept.invept_single_context and ept.invept_all_context
    assert ept.accessed_dirty and ept.execute_only and not ept.advanced_exit_info
    assert ept.invvpid and ept.invvpid_individual_address and ept.invvpid_single_context
    assert ept.invvpid_all_context and ept.invvpid_single_context_retaining_globals
    # VM functions may be enabled, so IA32_VMX_VMFUNC should exist, but AIDA64 did not dump it.
    assert caps.vmfunc is None and caps.missing_msrs == (0x491,)


def test_haswell_true_controls_make_default1_controls_optional() -> None:
    caps = vmx(HASWELL_EP)
    assert caps.procbased is not None and caps.procbased.true_msr == 0x48E
    # PROCBASED low 0401E172 forces CR3-load/store exiting; TRUE_PROCBASED low 04006172 does not.
    assert caps.procbased.raw & 0xFFFF_FFFF == 0x0401_E172
    true_raw = caps.procbased.true_raw
    assert true_raw is not None and true_raw & 0xFFFF_FFFF == 0x0400_6172
    assert caps.procbased.setting("CR3-load exiting") is Setting.DEFAULT1
    assert caps.procbased.setting("CR3-store exiting") is Setting.DEFAULT1
    assert caps.exit is not None and caps.exit.setting("save debug controls") is Setting.DEFAULT1
    assert caps.entry is not None and caps.entry.setting("load debug controls") is Setting.DEFAULT1
    assert caps.procbased.setting("bit1") is Setting.FORCED  # reserved default-1 bit, still forced


def test_haswell_misc_and_fixed_bits() -> None:
    caps = vmx(HASWELL_EP)
    misc = caps.misc
    assert misc is not None and misc.raw == 0x3004_81E5
    assert misc.preemption_timer_rate == 5 and misc.stores_efer_lma
    assert misc.activity_hlt and misc.activity_shutdown and misc.activity_wait_for_sipi
    assert misc.cr3_targets == 4 and misc.max_msr_list_entries == 512
    assert misc.vmwrite_any_field and misc.smm_vmxoff_blocking and misc.rdmsr_smbase_in_smm
    assert not misc.pt_in_vmx and not misc.zero_length_injection and misc.mseg_revision == 0
    assert caps.cr0_fixed is not None and caps.cr0_fixed.must_be_1_names == ("PE", "NE", "PG")
    assert caps.cr4_fixed is not None and caps.cr4_fixed.must_be_1_names == ("VMXE",)
    assert "LA57" not in caps.cr4_fixed.may_be_1_names and "SMEP" in caps.cr4_fixed.may_be_1_names
    assert caps.vmcs_enum_max_index == 0x15


# --- Sapphire Rapids and Alder Lake-N -------------------------------------------------------------


def test_sapphire_rapids_5_level_ept_and_tertiary_controls() -> None:
    caps = vmx(SAPPHIRE_RAPIDS)
    assert caps.ept_vpid is not None
    assert caps.ept_vpid.walk_length_5 and caps.ept_vpid.max_walk_length == 5
    assert caps.ept_vpid.advanced_exit_info and caps.ept_vpid.supervisor_shadow_stack
    assert caps.tertiary_controls  # "activate tertiary controls" may be 1 (PROCBASED bit 49)
    assert caps.procbased is not None and (caps.procbased.raw >> 49) & 1
    # ... but the dump holds neither IA32_VMX_PROCBASED_CTLS3 (0x492) nor IA32_VMX_VMFUNC (0x491).
    assert caps.procbased3 is None and caps.missing_msrs == (0x491, 0x492)
    assert caps.basic.vmcs_size == 1280 and caps.basic.no_error_code_entry
    assert caps.basic.other_bits == (57,)  # set, reserved in the SDM tables used here
    assert caps.cr4_fixed is not None and "LA57" in caps.cr4_fixed.may_be_1_names
    assert caps.exit is not None and caps.exit.setting("load CET state") is Setting.YES
    assert caps.exit.setting("activate secondary controls") is Setting.YES
    assert caps.entry is not None and caps.entry.setting("load PKRS") is Setting.YES
    assert caps.procbased2 is not None and caps.procbased2.setting("enable PML") is Setting.YES
    # This w7-2475X reports VMCS shadowing as not allowed (PROCBASED2 allowed-1 = CFFF3FFF).
    assert caps.procbased2.may_be_1 == 0xCFFF_3FFF and not caps.vmcs_shadowing


def test_alder_lake_n_4_level_ept_only() -> None:
    caps = vmx(ALDER_LAKE_N)
    assert caps.ept_vpid is not None and caps.ept_vpid.max_walk_length == 4
    assert caps.ept and caps.vpid and caps.vmcs_shadowing and caps.tertiary_controls


# --- Zhaoxin (CentaurHauls) -----------------------------------------------------------------------


def test_zhaoxin_vmx() -> None:
    caps = vmx(ZHAOXIN)
    assert caps.basic.revision_id == 7 and caps.basic.true_controls
    assert caps.ept and caps.vpid and caps.unrestricted_guest and not caps.vmcs_shadowing
    assert not caps.posted_interrupts and not caps.preemption_timer
    assert caps.ept_vpid is not None and caps.ept_vpid.max_walk_length == 4
    assert not caps.ept_vpid.accessed_dirty
    assert load(ZHAOXIN).msrs[0x3A] == 0x5  # IA32_FEATURE_CONTROL: locked, VMX outside SMX


@pytest.mark.parametrize("name", AMD)
def test_amd_dumps_have_no_vmx_msrs(name: str) -> None:
    assert decode_vmx(load(name).msrs) is None
    assert decode_vmx(load(name).unassigned_msrs) is None


# --- consistency on all real data -----------------------------------------------------------------


@pytest.mark.parametrize("name", VMX_DUMPS)
def test_real_data_is_consistent(name: str) -> None:
    caps = vmx(name)
    for part in caps.control_msrs:
        assert part.must_be_1 & ~part.may_be_1 == 0, part.group  # must-be-1 within may-be-1
        assert all(c.setting is not Setting.CONTRADICTORY for c in part.controls)
        if part.group in DEFAULT1:
            # The legacy MSRs report the whole default-1 class as must-be-1 (SDM A.2).
            assert part.raw & DEFAULT1[part.group] == DEFAULT1[part.group]
    # The CR0/CR4 fixed bits: FIXED0 within FIXED1; PE, NE, PG and VMXE must be 1.
    for cr in (caps.cr0_fixed, caps.cr4_fixed):
        assert cr is not None and cr.fixed0 & ~cr.fixed1 == 0
    assert caps.cr0_fixed is not None and caps.cr0_fixed.fixed0 == 0x8000_0021
    assert caps.cr4_fixed is not None and caps.cr4_fixed.fixed0 == 0x2000
    # IA32_VMX_EPT_VPID_CAP is there exactly when EPT or VPID may be enabled.
    assert (caps.ept_vpid is not None) == (caps.ept or caps.vpid)
    assert caps.basic.memory_type_name == "WB" and caps.basic.vmcs_size <= 4096


@pytest.mark.parametrize("name", [HASWELL_EP, ALDER_LAKE_N, SAPPHIRE_RAPIDS, ZHAOXIN])
def test_every_logical_cpu_reports_the_same_vmx_capabilities(name: str) -> None:
    decoded = {decode_vmx(cpu.msrs) for cpu in load(name).cpus}
    assert len(decoded) == 1


@pytest.mark.parametrize("name", VMX_DUMPS)
def test_to_json(name: str) -> None:
    data = json.loads(json.dumps(vmx(name).to_json()))
    assert data["basic"]["raw"] == load(name).msrs[0x480]
    assert data["summary"]["ept"] is vmx(name).ept
    settings = {c["setting"] for part in ("pinbased", "procbased", "exit", "entry")
                for c in data[part]["controls"]}  # fmt: skip
    assert settings <= {"yes", "no", "forced", "default-1"}


# --- decoders on synthetic values -----------------------------------------------------------------


def test_named_controls_at_their_sdm_positions() -> None:
    names = CONTROL_NAMES
    assert names[ControlGroup.PINBASED][0] == "external-interrupt exiting"
    assert names[ControlGroup.PROCBASED][21] == "use TPR shadow"
    assert names[ControlGroup.PROCBASED][17] == "activate tertiary controls"
    assert names[ControlGroup.PROCBASED][31] == "activate secondary controls"
    assert names[ControlGroup.PROCBASED2][1] == "enable EPT"
    assert names[ControlGroup.PROCBASED2][5] == "enable VPID"
    assert names[ControlGroup.PROCBASED2][7] == "unrestricted guest"
    assert names[ControlGroup.PROCBASED2][14] == "VMCS shadowing"
    assert names[ControlGroup.PROCBASED3][4] == "IPI virtualization"
    assert names[ControlGroup.EXIT][15] == "acknowledge interrupt on exit"
    assert names[ControlGroup.ENTRY][9] == "IA-32e mode guest"
    for group, table in names.items():
        assert len(set(table.values())) == len(table), group  # unique within a group


def test_tertiary_is_allowed_1_only() -> None:
    t = decode_tertiary((1 << 4) | (1 << 63))
    assert t.setting("IPI virtualization") is Setting.YES
    assert t.setting("enable HLAT") is Setting.NO
    assert t.setting("bit63") is Setting.YES and t.must_be_1 == 0
    assert [c.name for c in t.controls if c.may_be_1] == ["IPI virtualization", "bit63"]


def test_decode_vmx_tertiary_and_vmfunc_when_present() -> None:
    msrs = dict(load(SAPPHIRE_RAPIDS).msrs)
    msrs[0x491] = 0x1  # EPTP switching
    msrs[0x492] = 0x10  # IPI virtualization
    caps = decode_vmx(msrs)
    assert caps is not None and caps.missing_msrs == ()
    assert caps.vmfunc is not None and caps.vmfunc.eptp_switching
    assert caps.vmfunc.functions == ("EPTP switching",)
    assert caps.procbased3 is not None and caps.procbased3.allows("IPI virtualization")


def test_small_decoders() -> None:
    assert decode_vmcs_enum(0x2E) == 0x17
    cap = decode_ept_vpid_cap(0x0001_0F01_06F3_41C1)  # Sapphire Rapids
    assert cap.hlat_prefix_size == 1 and cap.walk_length_5
    assert decode_ept_vpid_cap(0).max_walk_length is None
    cr0 = decode_cr_fixed("cr0", 0x8000_0021, 0xFFFF_FFFF)
    assert cr0.must_be_1_names == ("PE", "NE", "PG")
    misc = decode_misc(0x0000_0001_0E00_0000)
    assert misc.max_msr_list == 7 and misc.max_msr_list_entries == 4096 and misc.mseg_revision == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: decode_basic(-1),
        lambda: decode_basic(1 << 64),
        lambda: decode_controls("pinbased", 1 << 64),
        lambda: decode_controls("procbased3", 0),
        lambda: decode_controls("procbased2", 0, true_raw=0),
        lambda: decode_controls("nonsense", 0),
        lambda: decode_cr_fixed("cr3", 0, 0),
    ],
)
def test_bad_arguments(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_unknown_control_name() -> None:
    with pytest.raises(KeyError):
        decode_controls("pinbased", 0).setting("enable EPT")


# --- properties -----------------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)
groups = st.sampled_from([ControlGroup.PINBASED, ControlGroup.PROCBASED, ControlGroup.EXIT,
                          ControlGroup.ENTRY])  # fmt: skip


@given(st.integers(0, 31), st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF),
       st.one_of(st.none(), st.integers(0, 0xFFFF_FFFF)))  # fmt: skip
def test_classify_is_a_function_of_the_bits(bit: int, a0: int, a1: int, legacy: int | None) -> None:
    s = classify(bit, a0, a1, legacy)
    must, may = (a0 >> bit) & 1, (a1 >> bit) & 1
    legacy_must = legacy is not None and (legacy >> bit) & 1
    expected = (
        Setting.CONTRADICTORY if must and not may
        else Setting.NO if not may
        else Setting.FORCED if must
        else Setting.DEFAULT1 if legacy_must
        else Setting.YES
    )  # fmt: skip
    assert s is expected
    assert s.may_be_1 == bool(may and s is not Setting.CONTRADICTORY)
    assert s.may_be_0 == (not must)


@given(groups, u64, st.one_of(st.none(), u64))
def test_decode_controls_matches_the_msr(
    group: ControlGroup, raw: int, true_raw: int | None
) -> None:
    part = decode_controls(group, raw, true_raw)
    effective = raw if true_raw is None else true_raw
    assert part.must_be_1 == effective & 0xFFFF_FFFF and part.may_be_1 == effective >> 32
    bits = [c.bit for c in part.controls]
    assert bits == sorted(set(bits))  # each control at most once, in bit order
    for c in part.controls:
        assert c.setting is classify(c.bit, part.must_be_1, part.may_be_1,
                                     None if true_raw is None else raw & 0xFFFF_FFFF)  # fmt: skip
        assert c.name == CONTROL_NAMES[group].get(c.bit, f"bit{c.bit}")
    # Every named control is listed; an unnamed bit is listed exactly when it is not "no".
    listed = set(bits)
    for bit in range(32):
        setting = classify(bit, part.must_be_1, part.may_be_1,
                           None if true_raw is None else raw & 0xFFFF_FFFF)  # fmt: skip
        assert (bit in listed) == (bit in CONTROL_NAMES[group] or setting is not Setting.NO)
    # When allowed-0 is within allowed-1 (as on real processors) nothing is contradictory,
    # and each control is exactly one of yes / no / forced (/ default-1 with TRUE MSRs).
    if part.must_be_1 & ~part.may_be_1 == 0:
        allowed = {Setting.YES, Setting.NO, Setting.FORCED}
        if true_raw is not None:
            allowed.add(Setting.DEFAULT1)
        assert {c.setting for c in part.controls} <= allowed
        assert {c.bit for c in part.controls if c.setting is Setting.FORCED} == {
            b for b in range(32) if (part.must_be_1 >> b) & 1
        }


@given(u64)
def test_basic_fields_cover_the_register(raw: int) -> None:
    b = decode_basic(raw)
    rebuilt = (
        b.revision_id
        | b.vmcs_size << 32
        | b.phys_addr_32bit << 48
        | b.dual_monitor_smm << 49
        | b.memory_type << 50
        | b.ins_outs_info << 54
        | b.true_controls << 55
        | b.no_error_code_entry << 56
        | sum(1 << bit for bit in b.other_bits)
    )
    assert rebuilt == raw


@given(u64)
def test_misc_fields_cover_the_defined_bits(raw: int) -> None:
    m = decode_misc(raw)
    rebuilt = (
        m.preemption_timer_rate
        | m.stores_efer_lma << 5
        | m.activity_hlt << 6
        | m.activity_shutdown << 7
        | m.activity_wait_for_sipi << 8
        | m.pt_in_vmx << 14
        | m.rdmsr_smbase_in_smm << 15
        | m.cr3_targets << 16
        | m.max_msr_list << 25
        | m.smm_vmxoff_blocking << 28
        | m.vmwrite_any_field << 29
        | m.zero_length_injection << 30
        | m.mseg_revision << 32
    )
    reserved = (0x1F << 9) | (1 << 31)  # bits 13:9 and 31
    assert rebuilt == raw & ~reserved
