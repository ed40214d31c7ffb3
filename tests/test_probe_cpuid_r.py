"""``cpuid -r`` output (Todd Allen's cpuid tool) read by the dump parser.

``data/cpuid_r_epyc.txt`` is real output of ``cpuid -r`` (cpuid 20230120, Debian) on a KVM guest
with an AMD EPYC processor, trimmed to the first logical CPU and the start of the second. Its
/proc/cpuinfo said at capture: vendor_id AuthenticAMD, cpu family 25, model 17, stepping 1,
model name "AMD EPYC", flags with "hypervisor", "pdpe1gb", "pcid", "invpcid" and without "vmx",
"svm" or "la57". The values below were read off the file by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.probe.cpuid import summarize, vendor
from pykvm.probe.dump import DumpFormatError, NotADumpError, looks_like_dump, parse_dump, read_dump
from pykvm.probe.svm import decode_svm
from pykvm.probe.vmx import decode_vmx

EPYC = Path(__file__).resolve().parent / "data" / "cpuid_r_epyc.txt"
TEXT = EPYC.read_text()
LINES = TEXT.splitlines()
RECORD = "   0x00000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff"
RECORD_LINENO = LINES.index(RECORD) + 1  # 3: CPU 0's leaf 1
CPU1_LINENO = LINES.index("CPU 1:") + 1  # 87


def test_the_saved_output_parses_into_two_logical_cpus() -> None:
    dump = read_dump(EPYC)
    assert dump.source == str(EPYC)
    assert [cpu.index for cpu in dump.cpus] == [0, 1]
    assert [len(cpu.cpuid) for cpu in dump.cpus] == [85, 3]  # every record line, none lost
    assert dump.msrs == {} and dump.failed_msrs == frozenset() and dict(dump.info) == {}
    assert parse_dump(TEXT).cpus == dump.cpus  # same result from text


def test_vendor_signature_and_virtualization_bits_match_proc_cpuinfo() -> None:
    summary = summarize(read_dump(EPYC).cpuid)
    assert summary.vendor == "AuthenticAMD"  # leaf 0: ebx 68747541 edx 69746e65 ecx 444d4163
    assert summary.brand == "AMD EPYC"  # 0x80000002: "AMD " "EPYC", then zeros
    sig = summary.signature
    assert sig is not None and sig.raw == 0x00A1_0F11
    assert (sig.family, sig.model, sig.stepping) == (25, 17, 1)  # 0xF + 0xA, 0x1 << 4 | 0x1
    assert summary.vmx is False  # leaf 1 ECX 0xfffa3203: bit 5 clear
    assert summary.svm is False  # 0x80000001 ECX 0x004003f3: bit 2 clear
    assert summary.hypervisor is True  # leaf 1 ECX bit 31
    assert summary.hypervisor_signature == "KVMKVMKVM"
    assert (summary.pcid, summary.invpcid, summary.la57) == (True, True, False)
    assert (summary.nx, summary.pdpe1gb, summary.long_mode) == (True, True, True)
    assert (summary.max_basic_leaf, summary.max_extended_leaf) == (0x1C, 0x8000_0021)
    assert (summary.phys_addr_bits, summary.linear_addr_bits) == (48, 48)


def test_no_svm_leaf_decoded_without_svm_and_no_vmx_msrs() -> None:
    dump = read_dump(EPYC)
    assert dump.cpuid.get_regs(0x8000_000A) == (0, 0, 0, 0)  # captured, all zero ...
    assert decode_svm(dump.cpuid) is None  # ... but SVM is not enumerated
    assert decode_vmx(dump.msrs) is None


def test_subleaves_and_per_cpu_values() -> None:
    dump = read_dump(EPYC)
    cpu0 = dump.cpu(0).cpuid
    assert cpu0.subleaves(0xD) == (0, 1, 2, 5, 6, 7, 0xB, 0xC)
    assert cpu0.get_regs(7, 1) == (0x20, 0, 0, 0)
    assert cpu0.get_regs(0x8000_001D, 3) == (0x4163, 0x03C0_003F, 0x7FFF, 1)
    # Leaf 1 EBX[31:24] is the initial APIC ID: 0 on CPU 0, 1 on CPU 1.
    assert cpu0.get_regs(1).ebx == 0x0002_0800
    assert dump.cpu(1).cpuid.get_regs(1).ebx == 0x0102_0800
    assert dump.cpu(1).cpuid.leaves() == (0, 1, 2)


def test_one_cpu_header_and_headerless_records_are_cpu_0() -> None:
    upper_hex = "0x00000001 0x00: eax=0x00A10F11 ebx=0x00020800 ecx=0xFFFA3203 edx=0x178BFBFF"
    for text in (f"CPU:\n{RECORD}\n", f"{RECORD}\n", f"\n\n{upper_hex}"):
        dump = parse_dump(text)
        assert [cpu.index for cpu in dump.cpus] == [0]
        assert dump.cpuid.get_regs(1) == (0x00A1_0F11, 0x0002_0800, 0xFFFA_3203, 0x178B_FBFF)


def test_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(("\ufeff" + TEXT.replace("\n", "\r\n")).encode("utf-8"))
    assert read_dump(path).cpus == read_dump(EPYC).cpus


def test_looks_like_dump() -> None:
    assert looks_like_dump(TEXT)
    assert not looks_like_dump("CPU 0:\n")


# --- malformed and truncated input ----------------------------------------------------------------


def _replace_line(lineno: int, new_line: str) -> str:
    lines = list(LINES)
    lines[lineno - 1] = new_line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "bad",
    [
        "0x00000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203",  # a register missing
        "0x00000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbfg",  # not hex
        "0x00000001 0x00: eax=0x0a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff",  # 7 digits
        "0x0000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff",  # leaf
        "0x00000001: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff",  # no sub-leaf
        "0x00000001 0x00 eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff",  # no colon
        "0x00000001 0x00: ebx=0x00020800 eax=0x00a10f11 ecx=0xfffa3203 edx=0x178bfbff",  # order
        "0x00000001 0x00: eax=0x00a10f11 ebx=0x00020800 ecx=0xfffa3203 edx=0x178bfbff junk",
        "CPUID 00000001: 00A10F11-00020800-FFFA3203-178BFBFF",  # the other format, mixed in
        "   some text",
    ],
)
def test_malformed_line_names_line_number_and_line(bad: str) -> None:
    with pytest.raises(DumpFormatError) as info:
        parse_dump(_replace_line(RECORD_LINENO, bad), source="epyc")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.lineno, err.line) == (RECORD_LINENO, bad)
    assert f"epyc: line {RECORD_LINENO}: " in str(err) and repr(bad) in str(err)


def test_output_cut_in_the_middle_of_a_line() -> None:
    cut = TEXT[: TEXT.index("edx=0x178bfbff", TEXT.index("CPU 1:"))]  # CPU 1's leaf 1, no EDX
    malformed = rf"line {CPU1_LINENO + 2}: malformed cpuid -r record"
    with pytest.raises(DumpFormatError, match=malformed):
        parse_dump(cut)


def test_output_cut_after_a_header() -> None:
    cut = "\n".join(LINES[:CPU1_LINENO]) + "\n"  # ends with "CPU 1:"
    with pytest.raises(DumpFormatError, match=rf"line {CPU1_LINENO}: CPU header without records"):
        parse_dump(cut)
    with pytest.raises(DumpFormatError, match=r"line 1: CPU header without records"):
        parse_dump("CPU 0:\nCPU 1:\n" + RECORD)


def test_a_cpu_listed_twice_and_conflicting_records() -> None:
    twice = r"line 3: logical CPU #0 listed twice \(first on line 1\)"
    with pytest.raises(DumpFormatError, match=twice):
        parse_dump(f"CPU 0:\n{RECORD}\nCPU 0:\n{RECORD}\n")
    other = RECORD.replace("ebx=0x00020800", "ebx=0x01020800")
    differs = r"line 3: CPUID 00000001 .*CPU #0 differs from line 2"
    with pytest.raises(DumpFormatError, match=differs):
        parse_dump(f"CPU 0:\n{RECORD}\n{other}\n")
    assert len(parse_dump(f"CPU 0:\n{RECORD}\n{RECORD}\n").cpuid) == 1  # the same twice is fine


def test_text_without_records_is_not_a_dump() -> None:
    with pytest.raises(NotADumpError):
        parse_dump("CPU zero:\nnothing here\n")


# --- property: formatting records as cpuid -r does and parsing them gives the values back ---------

u32 = st.integers(0, 0xFFFF_FFFF)


@given(
    st.dictionaries(
        st.integers(0, 7),
        st.dictionaries(st.tuples(u32, st.integers(0, 0xFF)), st.tuples(u32, u32, u32, u32),
                        min_size=1, max_size=8),
        min_size=1, max_size=3,
    )
)  # fmt: skip
def test_round_trip(cpus: dict[int, dict[tuple[int, int], tuple[int, int, int, int]]]) -> None:
    lines = []
    for index, table in cpus.items():
        lines.append(f"CPU {index}:")
        for (leaf, sub), (a, b, c, d) in table.items():
            regs = f"eax=0x{a:08x} ebx=0x{b:08x} ecx=0x{c:08x} edx=0x{d:08x}"
            lines.append(f"   0x{leaf:08x} 0x{sub:02x}: {regs}")
    dump = parse_dump("\n".join(lines))
    assert {cpu.index: dict(cpu.cpuid) for cpu in dump.cpus} == cpus


def test_live_cpuid_r_output_parses_and_matches_the_host() -> None:
    """`cpuid -1 -r` on this machine: pykvm parses it and agrees with its own CPUID of the host."""
    import shutil
    import subprocess

    from pykvm.probe.hostcpu import host_cpuid

    if shutil.which("cpuid") is None:
        pytest.skip("the cpuid tool is not installed (apt-get install cpuid)")
    text = subprocess.run(["cpuid", "-1", "-r"], capture_output=True, text=True, check=True, timeout=60).stdout
    live = parse_dump(text, "cpuid -1 -r")
    table, _, error = host_cpuid()
    assert error is None and table is not None
    assert vendor(live.cpuid) == vendor(table)
    for leaf in (0x0, 0x7, 0x80000000, 0x80000001, 0x8000000A):  # no per-CPU fields in these
        if (leaf, 0) in table:
            assert live.cpuid[(leaf, 0)] == table[(leaf, 0)], hex(leaf)
