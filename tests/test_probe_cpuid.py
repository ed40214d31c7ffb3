"""CPUID tables and decoders (vendor, signature, brand, feature bits, the SVM leaf), on real dumps.

Every expected value below was read from the dump itself and checked against public
documentation: Intel's DisplayFamily_DisplayModel lists (06_0FH Conroe, 06_3FH Haswell-EP,
06_8FH Sapphire Rapids, 06_BEH Alder Lake-N), AMD families (0Fh K8, 10h Barcelona, 17h Zen,
1Ah Zen 5), NPT arriving with Barcelona, 1 GiB pages arriving with family 10h, LA57 on
Sapphire Rapids only among these.
"""

from __future__ import annotations

import functools
import json

import pytest
from dumps import (
    ALDER_LAKE_N,
    ALL,
    AMD,
    BARCELONA,
    CONROE,
    FIXTURES,
    GRANITE_RIDGE,
    HASWELL_EP,
    INTEL,
    SAPPHIRE_RAPIDS,
    SUMMIT_RIDGE,
    WINDSOR,
    ZHAOXIN,
)
from hypothesis import given
from hypothesis import strategies as st

from pykvm.probe.cpuid import (
    CpuidRegs,
    CpuidTable,
    Signature,
    brand_string,
    hypervisor_signature,
    summarize,
    vendor,
)
from pykvm.probe.dump import Dump, read_dump
from pykvm.probe.svm import SVM_FEATURES, decode_svm, decode_svm_leaf


@functools.cache
def load(name: str) -> Dump:
    return read_dump(FIXTURES / name)


def table(name: str) -> CpuidTable:
    return load(name).cpuid


# --- identity -------------------------------------------------------------------------------------

# (family, model, stepping), as the Linux kernel computes them.
SIGNATURES = {
    CONROE: (0x6, 0x0F, 6),
    HASWELL_EP: (0x6, 0x3F, 2),
    ALDER_LAKE_N: (0x6, 0xBE, 0),
    SAPPHIRE_RAPIDS: (0x6, 0x8F, 8),
    WINDSOR: (0xF, 0x43, 3),
    BARCELONA: (0x10, 0x02, 1),
    SUMMIT_RIDGE: (0x17, 0x01, 1),
    GRANITE_RIDGE: (0x1A, 0x44, 0),
    ZHAOXIN: (0x7, 0x3B, 1),
}
BRANDS = {
    CONROE: "Intel(R) Core(TM)2 CPU         X6800  @ 2.93GHz",
    HASWELL_EP: "Intel(R) Xeon(R) CPU E5-2630 v3 @ 2.40GHz",
    ALDER_LAKE_N: "Intel(R) N95",
    SAPPHIRE_RAPIDS: "Intel(R) Xeon(R) w7-2475X",
    WINDSOR: "AMD Athlon(tm) 64 X2 Dual Core Processor 6400+",
    BARCELONA: "Quad-Core AMD Opteron(tm) Processor 2347 HE",
    SUMMIT_RIDGE: "AMD Ryzen 5 1500X Quad-Core Processor",
    GRANITE_RIDGE: "AMD Ryzen 9 9950X 16-Core Processor",
    ZHAOXIN: "ZHAOXIN KaiXian KX-U6780A@2.7GHz",  # leading spaces stripped
}


@pytest.mark.parametrize("name", ALL)
def test_vendor(name: str) -> None:
    assert vendor(table(name)) == name[:12]
    assert summarize(table(name)).vendor in ("GenuineIntel", "AuthenticAMD", "CentaurHauls")


@pytest.mark.parametrize("name", ALL)
def test_signature_and_brand(name: str) -> None:
    dump = load(name)
    sig = summarize(dump.cpuid).signature
    assert sig is not None and (sig.family, sig.model, sig.stepping) == SIGNATURES[name]
    assert brand_string(dump.cpuid) == BRANDS[name]
    # Where the dump's header has them, AIDA64's own decoding agrees.
    if "CPUID Revision" in dump.info:
        assert int(dump.info["CPUID Revision"].rstrip("h"), 16) == sig.raw
    if "CPUID CPU Name" in dump.info:  # AIDA64 collapses runs of spaces
        assert " ".join(BRANDS[name].split()) == dump.info["CPUID CPU Name"]


# --- feature bits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_vmx_svm_and_hypervisor_bits(name: str) -> None:
    s = summarize(table(name))
    assert s.vmx is (name not in AMD)  # Intel and Zhaoxin: VMX
    assert s.svm is (name in AMD)
    # All nine dumps were taken on bare metal.
    assert s.hypervisor is False and s.hypervisor_signature is None


# name: (pcid, invpcid, la57, pdpe1gb, nx, physical bits, linear bits)
FEATURES = {
    CONROE: (False, False, False, False, True, 36, 48),
    HASWELL_EP: (True, True, False, True, True, 46, 48),
    ALDER_LAKE_N: (True, True, False, True, True, 39, 48),
    SAPPHIRE_RAPIDS: (True, True, True, True, True, 52, 57),
    WINDSOR: (False, False, False, False, True, 40, 48),
    BARCELONA: (False, False, False, True, True, 48, 48),
    SUMMIT_RIDGE: (False, False, False, True, True, 48, 48),
    ZHAOXIN: (True, True, False, True, True, 40, 48),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_paging_features_and_address_widths(name: str) -> None:
    s = summarize(table(name))
    got = (s.pcid, s.invpcid, s.la57, s.pdpe1gb, s.nx, s.phys_addr_bits, s.linear_addr_bits)
    assert got == FEATURES[name]
    assert s.long_mode is True


def test_la57_goes_with_57_bit_linear_addresses() -> None:
    for name in ALL:
        s = summarize(table(name))
        assert s.la57 is (s.linear_addr_bits == 57)


def test_out_of_range_leaves_are_absent_and_their_features_false() -> None:
    windsor = table(WINDSOR)
    assert windsor.max_basic_leaf == 1  # K8 rev F: basic leaves 0 and 1 only
    assert windsor.get_regs(7) is None  # absent, not zeros
    assert windsor.in_range(7) is False
    assert summarize(windsor).la57 is False and summarize(windsor).invpcid is False
    assert windsor.max_extended_leaf == 0x8000_0018
    assert windsor.bit(0x8000_0019, "eax", 0) is False


def test_in_range_leaf_missing_from_the_dump_is_unknown() -> None:
    barcelona = table(BARCELONA)
    assert barcelona.max_basic_leaf == 5
    assert barcelona.leaves()[:5] == (0, 1, 2, 3, 5)  # AIDA64 did not dump leaf 4 on this AMD part
    assert barcelona.get_regs(4) is None
    assert barcelona.in_range(4) is True
    assert barcelona.bit(4, "eax", 0) is None
    assert barcelona.in_range(0x4000_0000) is None  # hypervisor range: no maximum to go by


def test_all_logical_cpus_agree_on_the_features() -> None:
    for name in ALL:
        summaries = {summarize(cpu.cpuid) for cpu in load(name).cpus}
        assert len(summaries) == 1, name


def test_summary_to_json() -> None:
    data = json.loads(json.dumps(summarize(table(HASWELL_EP)).to_json()))
    assert data["signature"] == {"raw": 0x306F2, "family": 6, "model": 0x3F, "stepping": 2}
    assert data["vmx"] is True and data["hypervisor_signature"] is None


# --- SVM leaf -------------------------------------------------------------------------------------


def test_svm_k8_windsor_64_asids_no_npt() -> None:
    svm = decode_svm(table(WINDSOR))
    assert svm is not None
    assert (svm.revision, svm.nasid, svm.features_raw, svm.features) == (1, 64, 0, ())
    assert not svm.npt


def test_svm_barcelona_has_npt() -> None:
    svm = decode_svm(table(BARCELONA))
    assert svm is not None and svm.nasid == 64
    assert svm.features == ("npt", "lbrv", "svm_lock")
    assert svm.npt and not svm.has("nrip_save")


def test_svm_zen_32768_asids_avic_vmcb_clean() -> None:
    svm = decode_svm(table(SUMMIT_RIDGE))
    assert svm is not None and svm.nasid == 32768
    for feature in ("npt", "nrip_save", "vmcb_clean", "flushbyasid", "decodeassists", "avic",
                    "v_vmsave_vmload", "vgif"):  # fmt: skip
        assert svm.has(feature), feature
    assert not svm.has("x2avic") and not svm.has("vnmi")
    assert svm.unknown_bits == (11,)  # EDX 0x0001BCFF: bit 11 is reserved in the APM
    assert "bit11" in svm.features


def test_svm_granite_ridge() -> None:
    svm = decode_svm(table(GRANITE_RIDGE))
    assert svm is not None and svm.features_raw == 0xFEBB_9DFF and svm.nasid == 32768
    for feature in ("npt", "vmcb_clean", "vgif", "v_spec_ctrl", "vnmi", "idle_hlt"):
        assert svm.has(feature), feature
    assert not svm.has("avic") and not svm.has("x2avic")  # EDX bits 13 and 18 are clear
    assert svm.unknown_bits == (8, 11, 31)  # set, but named by neither cpufeatures.h nor kcpuid


@pytest.mark.parametrize("name", [*INTEL, ZHAOXIN])
def test_no_svm_leaf_on_intel_or_zhaoxin(name: str) -> None:
    assert decode_svm(table(name)) is None


def test_svm_leaf_decoding_and_names() -> None:
    info = decode_svm_leaf((0x1, 0x8000, 0, (1 << 0) | (1 << 25) | (1 << 31)))
    assert info.features == ("npt", "vnmi", "bit31")
    assert info.has("bit31") and not info.has("bit30")
    with pytest.raises(KeyError):
        info.has("no-such-feature")
    with pytest.raises(ValueError):
        decode_svm_leaf((0, 0, 0))
    # Linux names from cpufeatures.h word 15, at the kernel's bit positions.
    assert {SVM_FEATURES[b] for b in (0, 1, 2, 3, 4, 5, 6, 7, 10, 12, 13, 15, 16, 18, 20, 25)} == {
        "npt", "lbrv", "svm_lock", "nrip_save", "tsc_scale", "vmcb_clean", "flushbyasid",
        "decodeassists", "pausefilter", "pfthreshold", "avic", "v_vmsave_vmload", "vgif",
        "x2avic", "v_spec_ctrl", "vnmi",
    }  # fmt: skip


def test_svm_leaf_needs_the_svm_bit() -> None:
    leaf_a = (1, 64, 0, 1)
    no_svm = CpuidTable({(0x8000_0000, 0): (0x8000_000A, 0, 0, 0), (0x8000_0001, 0): (0, 0, 0, 0),
                         (0x8000_000A, 0): leaf_a})  # fmt: skip
    assert decode_svm(no_svm) is None
    with_svm = CpuidTable({**no_svm, (0x8000_0001, 0): (0, 0, 1 << 2, 0)})
    assert decode_svm(with_svm) == decode_svm_leaf(leaf_a)


# --- the table itself and synthetic inputs --------------------------------------------------------


def test_hypervisor_signature() -> None:
    kvm = CpuidTable(
        {
            (0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
            (1, 0): (0x306F2, 0, 1 << 31, 0),
            # "KVMKVMKVM\0\0\0" in EBX, ECX, EDX
            (0x4000_0000, 0): (0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x0000004D),
        }
    )
    s = summarize(kvm)
    assert s.hypervisor is True and s.hypervisor_signature == "KVMKVMKVM"
    assert s.vendor == "GenuineIntel"
    # Without the hypervisor bit the 0x4000_0000 leaf means nothing.
    bare = CpuidTable({**kvm, (1, 0): (0x306F2, 0, 0, 0)})
    assert hypervisor_signature(bare) is None


def test_empty_table_knows_nothing() -> None:
    s = summarize(CpuidTable())
    assert s.vendor is None and s.signature is None and s.brand is None
    assert s.vmx is None and s.la57 is None and s.phys_addr_bits is None


@pytest.mark.parametrize(
    "entries",
    [
        {(0, 0): (0, 0, 0)},
        {(0, 0): (0, 0, 0, 1 << 32)},
        {(0, 0): (0, 0, 0, -1)},
        {(-1, 0): (0, 0, 0, 0)},
        {(0,): (0, 0, 0, 0)},
    ],
)
def test_table_rejects_bad_entries(entries: dict) -> None:
    with pytest.raises(ValueError):
        CpuidTable(entries)


def test_table_mapping_behaviour() -> None:
    t = CpuidTable([((7, 1), (1, 2, 3, 4)), ((7, 0), (1, 0, 0, 0))])
    assert list(t) == [(7, 0), (7, 1)]
    assert t[(7, 1)] == CpuidRegs(1, 2, 3, 4) and t[(7, 1)].ecx == 3
    assert t.get_regs(7, 2) is None and (7, 2) not in t
    assert t == CpuidTable({(7, 0): (1, 0, 0, 0), (7, 1): (1, 2, 3, 4)})
    assert hash(t) == hash(CpuidTable(dict(t)))
    with pytest.raises(ValueError):
        t.bit(7, "eax", 32)
    with pytest.raises(ValueError):
        t.bit(7, "rax", 0)


u32 = st.integers(0, 0xFFFF_FFFF)


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=12, max_size=12))
def test_vendor_string_round_trip(text: str) -> None:
    raw = text.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))
    assert vendor(CpuidTable({(0, 0): (1, ebx, ecx, edx)})) == text


@given(u32)
def test_signature_fields(eax: int) -> None:
    sig = Signature.from_eax(eax)
    base_family = (eax >> 8) & 0xF
    assert sig.stepping == eax & 0xF
    assert sig.model & 0xF == (eax >> 4) & 0xF
    if base_family != 0xF:
        assert sig.family == base_family
    else:
        assert sig.family == 0xF + ((eax >> 20) & 0xFF)
    assert sig.model >> 4 == (((eax >> 16) & 0xF) if sig.family >= 6 else 0)


@given(st.dictionaries(st.tuples(u32, u32), st.tuples(u32, u32, u32, u32), max_size=30), u32,
       st.sampled_from(["eax", "ebx", "ecx", "edx"]), st.integers(0, 31))  # fmt: skip
def test_bit_agrees_with_the_registers(entries: dict, leaf: int, reg: str, bit: int) -> None:
    t = CpuidTable(entries)
    regs = t.get_regs(leaf)
    answer = t.bit(leaf, reg, bit)
    if regs is not None:
        assert answer == bool((regs.reg(reg) >> bit) & 1)
    elif t.in_range(leaf) is False:
        assert answer is False
    else:
        assert answer is None
