"""The scenario blob pykvm builds for its L1 hypervisors, checked offline.

The VMCS table, the VMCB, the EPT/NPT tables and the L2's page tables in the blob are walked and
decoded back with pykvm.model, so the data the L1 receives is shown to say what the scenario
needs: the L2's GPAs land in the blob's L2 area, the read-only page faults with the right
address, the two CR3s map the switch address to different pages, the remap PTE repoints it, and
the host state is the L1 image's own symbols. The VMX capabilities are real: Bochs's
corei7_skylake_x as the L1 read them (tests/data) and a Haswell-EP dump.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from dumps import FIXTURES, HASWELL_EP

from pykvm.model import paging
from pykvm.model.vmcb import VmcbImage
from pykvm.model.vmcs import VmcsImage
from pykvm.nested import layout as L
from pykvm.nested.blob import (
    BREAKAGES,
    OFF_IOPM,
    OFF_VMCS,
    OFF_VMCS_TABLE,
    GuestImages,
    build_blob,
    predicted_failure,
)
from pykvm.nested.run import default_build_dir
from pykvm.probe.dump import read_dump
from pykvm.probe.vmx import decode_vmx

DATA = Path(__file__).parent / "data"


@functools.cache
def bochs_caps():
    text = (DATA / "bochs_skylake_x_probe.txt").read_text()
    msrs = {int(a, 16): int(b, 16) for a, b in re.findall(r"msr index=(\w+) value=(\w+)", text)}
    return decode_vmx(msrs)


@functools.cache
def images(vendor: str) -> GuestImages:
    return GuestImages(default_build_dir(vendor), vendor)


def vmx_blob(**kw):
    return build_blob("vmx", images("vmx"), caps=bochs_caps(), **kw)


def svm_blob(**kw):
    return build_blob("svm", images("svm"), **kw)


def header(blob) -> dict:
    values = L.HEADER.unpack_from(blob.data)
    return dict(zip((n for n, _ in L.HEADER_FIELDS), values))


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_header_names_the_vendor_size_and_base(vendor):
    blob = vmx_blob() if vendor == "vmx" else svm_blob()
    h = header(blob)
    assert h["magic"] == L.NESTED_MAGIC and h["version"] == L.NESTED_VERSION
    assert h["vendor"] == (L.VENDOR_VMX if vendor == "vmx" else L.VENDOR_SVM)
    assert h["size"] == len(blob.data) == L.L2_MEM_OFFSET + L.L2_MEM_SIZE
    assert h["base"] == L.NESTED_BASE and h["flags"] == 0
    assert h["name"].rstrip(b"\0") == b"scenario"
    assert h["expected_exits"] == len(blob.expected_exits) == 12


def test_the_vmcs_table_in_the_blob_is_the_model_image():
    blob = vmx_blob()
    h = header(blob)
    assert h["vmcs_table"] == L.NESTED_BASE + OFF_VMCS_TABLE
    table = blob.data[OFF_VMCS_TABLE:OFF_VMCS_TABLE + 16 * (h["vmcs_count"] + 1)]
    assert VmcsImage.from_bytes(table) == blob.vmcs
    assert int.from_bytes(table[-16:-8], "little") == 2**64 - 1  # the terminator
    assert blob.violations == []


def test_the_vmcs_host_state_is_the_l1_images_own():
    sym = images("vmx").l1_symbols
    vmcs = vmx_blob().vmcs
    assert vmcs["HOST_RIP"] == sym["vmx_exit_entry"]
    assert vmcs["HOST_RSP"] == sym["l1_host_stack_top"]
    assert vmcs["HOST_CR3"] == sym["l1_pml4"]
    assert vmcs["HOST_GDTR_BASE"] == sym["gdt"] and vmcs["HOST_IDTR_BASE"] == sym["l1_idt"]
    assert vmcs["HOST_TR_BASE"] == sym["l1_tss"] and vmcs["HOST_TR_SELECTOR"] == 0x18
    assert vmcs["GUEST_RIP"] == L.L2_CODE and vmcs["GUEST_CR3"] == L.L2_CR3_A
    assert vmcs["VIRTUAL_PROCESSOR_ID"] == 1


def test_the_vmcb_in_the_blob_is_the_model_image_and_every_port_exits():
    blob = svm_blob()
    h = header(blob)
    assert h["vmcb"] == L.NESTED_BASE + OFF_VMCS
    vmcb = VmcbImage.from_bytes(blob.data[OFF_VMCS:OFF_VMCS + 4096])
    assert vmcb == blob.vmcb
    assert vmcb.get("RIP") == L.L2_CODE and vmcb.get("CR3") == L.L2_CR3_A
    assert vmcb.get("GUEST_ASID") == 1 and vmcb.get("N_CR3") == blob.nested.root
    assert vmcb.get("IOPM_BASE_PA") == L.NESTED_BASE + OFF_IOPM
    assert blob.data[OFF_IOPM:OFF_IOPM + 0x3000] == b"\xff" * 0x3000
    assert blob.violations == []


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_nested_tables_map_the_l2_memory_into_the_blob_with_a_read_only_page(vendor):
    blob = vmx_blob() if vendor == "vmx" else svm_blob()
    l2_base = L.NESTED_BASE + L.L2_MEM_OFFSET
    for gpa in (0, L.L2_CODE, L.L2_PAGE_A + 0x123, L.L2_MEM_SIZE - 1):
        assert paging.translate_gpa(blob.memory, gpa, blob.nested).address == l2_base + gpa
    write = paging.translate_gpa(blob.memory, L.L2_RO_PAGE + 0x10, blob.nested, write=True)
    if vendor == "vmx":
        assert isinstance(write.fault, paging.EptViolation) and write.fault.gpa == L.L2_RO_PAGE + 0x10
    else:
        assert isinstance(write.fault, paging.NestedPageFault)
        assert write.fault.exitinfo2 == L.L2_RO_PAGE + 0x10
    assert paging.translate_gpa(blob.memory, L.L2_MEM_SIZE, blob.nested).fault is not None


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_two_dimensional_walks_give_the_pages_the_l2_expects(vendor):
    blob = vmx_blob() if vendor == "vmx" else svm_blob()
    l2_base = L.NESTED_BASE + L.L2_MEM_OFFSET

    def read_u32(va: int, cr3: int) -> int:
        w = paging.walk(blob.memory, va, paging.PagingContext(paging.LONG4, cr3), blob.nested)
        assert w.ok, w.fault
        assert w.reference_count == 24  # 4-level guest under 4-level EPT/NPT, no caches
        return blob.memory.read_u32(w.address)

    assert read_u32(L.L2_SWITCH_VA, L.L2_CR3_A) == L.L2_VALUE_A
    assert read_u32(L.L2_SWITCH_VA, L.L2_CR3_B) == L.L2_VALUE_B
    assert read_u32(L.L2_TAG_VA, L.L2_CR3_A) == L.L2_VALUE_A
    # what HC_REMAP writes repoints the tag address at page B
    h = header(blob)
    assert l2_base <= h["tag_pte"] < l2_base + L.L2_MEM_SIZE
    blob.memory.write_u64(h["tag_pte"], h["tag_pte_value"])
    assert read_u32(L.L2_TAG_VA, L.L2_CR3_A) == L.L2_VALUE_B
    code = images(vendor).l2_code
    assert blob.memory.read(l2_base + L.L2_CODE, len(code)) == code


def test_a_haswell_vmcs_passes_the_checker_too():
    caps = decode_vmx(read_dump(FIXTURES / HASWELL_EP).msrs)
    assert build_blob("vmx", images("vmx"), caps=caps, maxphyaddr=46).violations == []


@pytest.mark.parametrize(("name", "vendor", "rule", "predicted"), [
    ("reserved-control", "vmx", "exec.reserved", "vmfail-valid error=7"),
    ("bad-eptp-walk", "vmx", "exec.eptp", "vmfail-valid error=7"),
    ("noncanonical-rip", "vmx", "guest.rip", "invalid-state reason=0x80000021"),
    ("reserved-control", "svm", "intercept.vmrun", "vmexit-invalid"),
    ("asid-zero", "svm", "asid.zero", "vmexit-invalid"),
    ("svme-clear", "svm", "efer.svme", "vmexit-invalid"),
])  # fmt: skip
def test_each_breakage_breaks_its_rule_and_predicts_the_refusal(name, vendor, rule, predicted):
    blob = vmx_blob(breakage=name) if vendor == "vmx" else svm_blob(breakage=name)
    assert [v.rule_id for v in blob.violations] == [rule]
    assert blob.predicted_failure == predicted
    assert header(blob)["flags"] == L.NESTED_EXPECT_ENTRY_FAILURE
    assert blob.expected_exits == ()


def test_breakages_refuse_the_wrong_vendor_and_unknown_names():
    with pytest.raises(ValueError, match="does not apply to svm"):
        svm_blob(breakage="bad-eptp-walk")
    with pytest.raises(ValueError, match="unknown breakage"):
        vmx_blob(breakage="nope")
    assert set(BREAKAGES) >= {"reserved-control", "noncanonical-rip", "bad-eptp-walk"}


def test_triple_fault_starts_the_l2_at_its_ud2():
    blob = vmx_blob(triple_fault=True)
    assert blob.vmcs["GUEST_RIP"] == images("vmx").l2_symbols["l2_triple_fault"]
    assert blob.vmcs["GUEST_IDTR_LIMIT"] == 0
    assert header(blob)["flags"] == L.NESTED_TRIPLE_FAULT
    assert blob.expected_exits == ("shutdown",)


def test_predicted_failure_orders_controls_before_host_before_guest():
    from pykvm.model.vmcs import Violation

    guest = Violation("guest.rip", "SDM 27.3.1.4", "x", "GUEST_RIP")
    host = Violation("host.cr0", "SDM 27.2.2", "x", "HOST_CR0")
    ctl = Violation("exec.reserved", "SDM 27.2.1.1", "x", "PIN_BASED_VM_EXEC_CONTROL")
    assert predicted_failure("vmx", [guest, host, ctl]) == "vmfail-valid error=7"
    assert predicted_failure("vmx", [guest, host]) == "vmfail-valid error=8"
    assert predicted_failure("vmx", [guest]) == "invalid-state reason=0x80000021"
    assert predicted_failure("vmx", []) is None


def test_the_tlb_model_keeps_a_tagged_entry_over_the_exit_and_drops_it_at_the_flush():
    from pykvm.nested.run import model_tagging

    assert vmx_blob().state.tlb_tag == 1
    assert model_tagging("vmx", 1) == "kept"  # VPID 1: the transitions flush nothing
    assert model_tagging("vmx", 0) == "flushed"  # no VPID: every VM exit/entry flushes
    assert model_tagging("svm", 1) == "kept"  # ASID-tagged; TLB_CONTROL 0 at VMRUN
