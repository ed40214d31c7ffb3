"""The AIDA64/InstLatx64 dump parser, on the real dumps of tests/data/cpuid/."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from dumps import (
    ALDER_LAKE_N,
    ALL,
    BARCELONA,
    CONROE,
    EVERY,
    FIXTURES,
    GRANITE_RIDGE,
    HASWELL_EP,
    NEHALEM_EP,
    SAPPHIRE_RAPIDS,
    SUMMIT_RIDGE,
    WINDSOR,
    ZHAOXIN,
)
from hypothesis import given
from hypothesis import strategies as st

from pykvm.cli import main
from pykvm.probe.dump import (
    Dump,
    DumpFormatError,
    NotADumpError,
    looks_like_dump,
    parse_dump,
    read_dump,
)

# Logical CPUs in each dump (its "Logical CPU #N" sections).
CPU_COUNTS = {CONROE: 2, HASWELL_EP: 16, ALDER_LAKE_N: 4, SAPPHIRE_RAPIDS: 40, WINDSOR: 2,
              BARCELONA: 8, SUMMIT_RIDGE: 8, GRANITE_RIDGE: 32, ZHAOXIN: 8,
              NEHALEM_EP: 1}  # fmt: skip
# Older dumps have one "MSR Registers" section that names no CPU.
SINGLE_MSR_SECTION = {CONROE, WINDSOR, BARCELONA, SUMMIT_RIDGE}


@functools.cache
def load(name: str) -> Dump:
    return read_dump(FIXTURES / name)


def text_of(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- every fixture --------------------------------------------------------------------------------


def test_the_fixture_folder_holds_exactly_the_named_dumps() -> None:
    # The dumps are in the repository; tests/dumps.py names each one, and names no absent file.
    assert sorted(p.name for p in FIXTURES.iterdir()) == sorted([*EVERY, "README.md"])


@pytest.mark.parametrize("name", EVERY)
def test_file_name_vendor_and_signature_match_leaves_0_and_1(name: str) -> None:
    # InstLatx64 names files <vendor string><leaf 1 EAX, 7 hex digits>_...; check every CPU.
    m = re.match(r"^(GenuineIntel|AuthenticAMD|CentaurHauls)([0-9A-F]{7})_", name)
    assert m is not None
    dump = load(name)
    assert len(dump.cpus) == CPU_COUNTS[name]
    for cpu in dump.cpus:
        leaf0 = cpu.cpuid[(0, 0)]
        vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
        assert vendor.decode() == m.group(1)
        assert cpu.cpuid[(1, 0)].eax == int(m.group(2), 16)


@pytest.mark.parametrize("name", ALL)
def test_msr_sections(name: str) -> None:
    dump = load(name)
    if name in SINGLE_MSR_SECTION:
        assert all(not cpu.msrs for cpu in dump.cpus)
        assert dump.unassigned_msrs and dump.msrs is dump.unassigned_msrs
        assert 0x1B in dump.msrs or name == BARCELONA  # IA32_APIC_BASE
    else:
        assert not dump.unassigned_msrs
        assert all(cpu.msrs for cpu in dump.cpus)  # one MSR section per logical CPU
        assert dump.msrs == dump.cpu(0).msrs
        # IA32_APIC_BASE: base 0xFEE00000, APIC enabled (bit 11), BSP flag (bit 8) on CPU #0 ...
        assert all(cpu.msrs[0x1B] & 0xFFFF_F800 == 0xFEE0_0800 for cpu in dump.cpus)
        assert dump.cpu(0).msrs[0x1B] & 0x100
        # ... and on no other CPU, except in the Granite Ridge dump, whose 32 "per-CPU" MSR
        # sections all show the BSP flag: there they were evidently all read on the BSP.
        others_bsp = {bool(cpu.msrs[0x1B] & 0x100) for cpu in dump.cpus[1:]}
        assert others_bsp == {name == GRANITE_RIDGE}


def test_counts_every_record_line() -> None:
    for name in EVERY:
        text = text_of(name)
        n_records = len(re.findall(r"^CPUID [0-9A-F]{8}: ", text, re.MULTILINE))
        dump = load(name)
        assert sum(len(cpu.cpuid) for cpu in dump.cpus) == n_records  # no duplicates, none lost


# --- variants of the format seen in the fixtures --------------------------------------------------


def test_subleaf_markers_are_hex() -> None:
    spr = load(SAPPHIRE_RAPIDS).cpuid
    assert spr.subleaves(7) == (0, 1, 2)
    assert spr.get_regs(7, 1) == (0x0000_1C30, 0, 0, 0)  # "CPUID 00000007: 00001C30-... [SL 01]"
    adl = load(ALDER_LAKE_N).cpuid
    assert adl.get_regs(0xD, 0x0B) == (0x10, 0, 1, 0)  # "[SL 0B]"
    # A leaf without [SL nn] is sub-leaf 0: Conroe's leaf 7 line has no marker.
    assert load(CONROE).cpuid.get_regs(7) == (0, 0, 0, 0)


def test_comments_with_unbalanced_brackets_are_ignored() -> None:
    # "CPUID 80000006: 00000000-00000000-10008140-00000000 [L2: 4096 KB] / L3: 0 KB]"
    assert load(ZHAOXIN).cpuid.get_regs(0x8000_0006) == (0, 0, 0x1000_8140, 0)


def test_info_lines_starting_with_cpuid_are_not_records() -> None:
    # "CPUID Manufacturer: GenuineIntel", "CPUID CPU Name    : ...", "CPUID Revision    : 000306F2h"
    dump = load(HASWELL_EP)
    assert dump.info["CPUID Manufacturer"] == "GenuineIntel"
    assert dump.info["CPUID Revision"] == "000306F2h"
    assert dump.info["CPU Alias"] == "Haswell-EP"
    assert load(WINDSOR).info["CPUID Manufacturer"] == "AuthenticAMD"  # "Key : value" spacing


def test_sampled_msrs_keep_the_last_read() -> None:
    # MSR 000000E7 is listed three times, the first two marked [S200]; the last one counts.
    assert load(CONROE).msrs[0xE7] == 0x0000_0193_6E83_2D16
    # MSR C0010293 (P-state status) sampled five times with comments, then read once more.
    assert load(SUMMIT_RIDGE).msrs[0xC001_0293] == 0x0000_0000_0011_C89C


def test_failed_msr_reads() -> None:
    dump = load(HASWELL_EP)
    assert 0x49 in dump.failed_msrs and 0x49 not in dump.msrs  # "MSR 00000049: < FAILED >"
    assert load(SUMMIT_RIDGE).failed_msrs == {0xC001_0070}


def test_last_cpu_of_a_per_cpu_dump_has_its_own_msrs() -> None:
    spr = load(SAPPHIRE_RAPIDS)
    assert spr.cpu(39).msrs[0x480] == 0x03DA_0500_0000_0013
    with pytest.raises(KeyError, match="no logical CPU #40"):
        spr.cpu(40)


def test_crlf_and_utf16_files_parse_the_same(tmp_path: Path) -> None:
    original = load(CONROE)
    path = tmp_path / "conroe-utf16.txt"
    path.write_bytes(text_of(CONROE).replace("\n", "\r\n").encode("utf-16"))
    again = read_dump(path)
    assert [c.cpuid for c in again.cpus] == [c.cpuid for c in original.cpus]
    assert again.msrs == original.msrs


def test_to_json_is_plain_data() -> None:
    import json

    data = json.loads(json.dumps(load(WINDSOR).to_json()))
    assert data["cpus"][0]["cpuid"][0] == {
        "leaf": 0, "subleaf": 0, "eax": 1, "ebx": 0x68747541, "ecx": 0x444D4163, "edx": 0x69746E65,
    }  # fmt: skip
    assert {"index": 0x1B, "value": 0xFEE0_0900} in data["unassigned_msrs"]


# --- older dumps: sub-leaves as repeated lines without [SL nn] -----------------------------------

# Nehalem-EP's four caches, CPUID 4 sub-leaves 0-3, as the untagged lines of that dump.
NHM_LEAF4 = [
    "CPUID 00000004: 1C004121-01C0003F-0000003F-00000000",
    "CPUID 00000004: 1C004122-00C0003F-0000007F-00000000",
    "CPUID 00000004: 1C004143-01C0003F-000001FF-00000000",
    "CPUID 00000004: 1C03C163-03C0003F-00001FFF-00000002",
]
NHM_LEAF0 = "CPUID 00000000: 0000000B-756E6547-6C65746E-49656E69"


def test_nehalem_ep_untagged_lines_are_subleaves_in_order() -> None:
    dump = load(NEHALEM_EP)
    assert [c.index for c in dump.cpus] == [0]  # no headers: all of it is logical CPU #0
    table = dump.cpuid
    assert len(table) == 25  # 25 record lines, none merged
    assert table.subleaves(4) == (0, 1, 2, 3)
    assert table.get_regs(4, 0) == (0x1C00_4121, 0x01C0_003F, 0x0000_003F, 0)
    assert table.get_regs(4, 1) == (0x1C00_4122, 0x00C0_003F, 0x0000_007F, 0)
    assert table.get_regs(4, 2) == (0x1C00_4143, 0x01C0_003F, 0x0000_01FF, 0)
    assert table.get_regs(4, 3) == (0x1C03_C163, 0x03C0_003F, 0x0000_1FFF, 2)
    # EAX[7:5] is the cache level and EAX[4:0] its type (1 data, 2 instruction, 3 unified):
    # L1D, L1I, L2, L3, the order the CPU enumerates them in.
    eaxes = [table.get_regs(4, n).eax for n in range(4)]
    assert [(eax >> 5 & 7, eax & 0x1F) for eax in eaxes] == [(1, 1), (1, 2), (2, 3), (3, 3)]
    assert table.subleaves(0xB) == (0, 1)
    assert table.get_regs(0xB, 0) == (1, 2, 0x100, 0)  # SMT level: 2 threads
    assert table.get_regs(0xB, 1) == (4, 8, 0x201, 0)  # core level: 8 logical CPUs
    # ECX[7:0] of leaf 0Bh echoes the sub-leaf asked for: the numbering is the CPU's own.
    assert [table.get_regs(0xB, n).ecx & 0xFF for n in (0, 1)] == [0, 1]
    assert table.subleaves(1) == (0,) and table.get_regs(1).ecx & 1 << 5  # one line; VMX
    assert dump.msrs == {} and dump.failed_msrs == frozenset() and dump.unassigned_msrs == {}


def test_untagged_numbering_restarts_at_every_section_header() -> None:
    text = "\n".join([
        "------[ Logical CPU #0 ]------",
        NHM_LEAF0,
        *NHM_LEAF4[:2],
        "------[ Logical CPU #1 ]------",
        NHM_LEAF0,
        *NHM_LEAF4[1:],
    ]) + "\n"  # fmt: skip
    dump = parse_dump(text)
    cpu0, cpu1 = dump.cpu(0).cpuid, dump.cpu(1).cpuid
    assert cpu0.subleaves(4) == (0, 1) and cpu1.subleaves(4) == (0, 1, 2)
    assert cpu0.get_regs(4, 0).eax == 0x1C00_4121 and cpu0.get_regs(4, 1).eax == 0x1C00_4122
    assert [cpu1.get_regs(4, n).eax for n in range(3)] == [0x1C00_4122, 0x1C00_4143, 0x1C03_C163]
    assert cpu0.subleaves(0) == cpu1.subleaves(0) == (0,)
    # A header that names no CPU restarts the count too (its records belong to CPU #0): the
    # repeat of CPU #0's first leaf-4 line there is sub-leaf 0 again, and agrees.
    again = parse_dump(text + "------[ CPUID Registers ]------\n" + NHM_LEAF4[0] + "\n")
    assert again.cpu(0).cpuid == cpu0
    with pytest.raises(DumpFormatError, match=r"line 11: CPUID 00000004 sub-leaf 0x0 \(untagged "
                                              r"line 1 of the leaf in its section\) of logical CPU "
                                              r"#0 differs from line 3"):
        parse_dump(text + "------[ CPUID Registers ]------\n" + NHM_LEAF4[1] + "\n")


def test_an_identical_untagged_repeat_is_the_next_subleaf() -> None:
    # Sub-leaves can be equal (all zeros, say); dropping one would renumber those after it.
    zeros = "CPUID 0000000D: 00000000-00000000-00000000-00000000"
    text = "\n".join([
        "CPUID 0000000D: 00000007-00000340-00000340-00000000",
        zeros,
        zeros,
        "CPUID 0000000D: 00000100-00000240-00000000-00000000",
    ])  # fmt: skip
    table = parse_dump(text).cpuid
    assert table.subleaves(0xD) == (0, 1, 2, 3)
    assert table.get_regs(0xD, 1) == table.get_regs(0xD, 2) == (0, 0, 0, 0)
    assert table.get_regs(0xD, 3) == (0x100, 0x240, 0, 0)


def test_tagged_and_untagged_lines_of_one_leaf_must_agree() -> None:
    # An untagged line is numbered by its place among the untagged lines; a tagged one by its tag.
    agreeing = "\n".join([NHM_LEAF4[0], NHM_LEAF4[1] + " [SL 01]", NHM_LEAF4[1]])
    table = parse_dump(agreeing).cpuid
    assert table.subleaves(4) == (0, 1)
    assert table.get_regs(4, 1).eax == 0x1C00_4122
    # The tagged line contradicts the second untagged line (sub-leaf 1) before it ...
    tagged_after = "\n".join([NHM_LEAF4[0], NHM_LEAF4[1], NHM_LEAF4[2] + " [SL 01]"])
    with pytest.raises(DumpFormatError, match=r"line 3: CPUID 00000004 sub-leaf 0x1 of logical "
                                              r"CPU #0 differs from line 2"):
        parse_dump(tagged_after)
    # ... or the second untagged line contradicts the tagged sub-leaf 1 before it.
    tagged_first = "\n".join([NHM_LEAF4[2] + " [SL 01]", NHM_LEAF4[0], NHM_LEAF4[1]])
    with pytest.raises(DumpFormatError) as info:
        parse_dump(tagged_first, source="mixed")
    assert info.value.lineno == 3 and info.value.line == NHM_LEAF4[1]
    assert str(info.value) == (
        f"mixed: line 3: CPUID 00000004 sub-leaf 0x1 (untagged line 2 of the leaf in its section) "
        f"of logical CPU #0 differs from line 1: {NHM_LEAF4[1]!r}"
    )


def test_probe_from_the_nehalem_ep_dump_reports_vt_x(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / NEHALEM_EP)
    assert main(["probe", "--json", "--from-dump", path]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    doc = json.loads(captured.out)
    assert doc["origin"] == path
    assert (doc["cpu"]["summary"]["vmx"], doc["cpu"]["summary"]["svm"]) == (True, False)
    assert doc["verdict"]["acceleration"] == "VT-x"
    assert main(["probe", "--from-dump", path]) == 0
    out = capsys.readouterr().out
    assert "the dumped CPU has VT-x" in out and "differs from line" not in out


# --- malformed input ------------------------------------------------------------------------------


def _corrupt(text: str, lineno: int, new_line: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = new_line
    return "\n".join(lines) + "\n"


def _first_line_number(text: str, prefix: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(prefix))


@pytest.mark.parametrize(
    "bad",
    [
        "CPUID 00000001: 000006F6-00020800-0000E3BD",  # a register missing
        "CPUID 00000001: 000006F6-00020800-0000E3BD-BFEBFBFG",  # not hex
        "CPUID 0000001: 000006F6-00020800-0000E3BD-BFEBFBFF",  # 7-digit leaf
        "CPUID 00000001 000006F6-00020800-0000E3BD-BFEBFBFF",  # no colon
        "CPUID 00000001: 000006F6-00020800-0000E3BD-BFEBFBFF junk",  # trailing text, no bracket
        "CPUID 00000004: 04000121-01C0003F-0000003F-00000001 [SL XY]",  # bad sub-leaf
    ],
)
def test_malformed_cpuid_line_names_line_number_and_line(bad: str) -> None:
    text = text_of(CONROE)
    lineno = _first_line_number(text, "CPUID 00000001:")
    with pytest.raises(DumpFormatError) as info:
        parse_dump(_corrupt(text, lineno, bad), source="conroe")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.lineno == lineno and err.line == bad
    assert f"line {lineno}" in str(err) and repr(bad) in str(err) and "conroe" in str(err)


@pytest.mark.parametrize(
    "bad",
    [
        "MSR 00000480: 001A-0400-0000",  # three groups
        "MSR 00000480: 001A04000000007",  # no groups
        "MSR 00000480: < FAIL >",
        "MSR 480: 001A-0400-0000-0007",
    ],
)
def test_malformed_msr_line(bad: str) -> None:
    text = text_of(CONROE)
    lineno = _first_line_number(text, "MSR 00000480:")
    with pytest.raises(DumpFormatError, match=rf"line {lineno}: malformed MSR line"):
        parse_dump(_corrupt(text, lineno, bad))


def test_conflicting_duplicate_cpuid_line() -> None:
    text = (
        "CPUID 00000000: 0000000A-756E6547-6C65746E-49656E69 [SL 00]\n"
        "CPUID 00000000: 0000000B-756E6547-6C65746E-49656E69 [SL 00]\n"
    )
    with pytest.raises(DumpFormatError, match=r"line 2: CPUID 00000000 sub-leaf 0x0 of logical "
                                              r"CPU #0 differs from line 1"):
        parse_dump(text)
    # The same record twice is harmless.
    first = text.splitlines()[0]
    assert len(parse_dump(first + "\n" + first).cpuid) == 1
    # So is the same untagged record in a second section of the same CPU: it is sub-leaf 0 again.
    untagged = "CPUID 00000000: 0000000A-756E6547-6C65746E-49656E69"
    header = "------[ Logical CPU #0 ]------"
    twice = f"{header}\n{untagged}\n{header}\n{untagged}\n"
    assert dict(parse_dump(twice).cpuid) == {(0, 0): (0xA, 0x756E6547, 0x6C65746E, 0x49656E69)}


def test_a_text_file_that_is_not_a_dump() -> None:
    with pytest.raises(NotADumpError, match=r"README\.md: not an AIDA64/InstLatx64 CPUID dump"):
        read_dump(FIXTURES / "README.md")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x7fELF\x02\x01\x01\x00\x00\x00",
        b"hello\nworld\n",
        b"MSR 00000010: 0000-0000-0000-0001\n",
    ],
)
def test_other_non_dumps(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(content)
    with pytest.raises(NotADumpError, match="not an AIDA64/InstLatx64 CPUID dump"):
        read_dump(path)
    assert not looks_like_dump(content.decode("latin-1"))


def test_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_dump(tmp_path / "absent.txt")


def test_minimal_dump_without_headers() -> None:
    dump = parse_dump("CPUID 00000000: 00000001-68747541-444D4163-69746E65 [AuthenticAMD]\n")
    assert [c.index for c in dump.cpus] == [0]
    assert dump.cpuid.max_basic_leaf == 1
    assert dump.msrs == {}


# --- property: formatting records and parsing them gives the values back --------------------------

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


@given(
    st.dictionaries(
        st.tuples(u32, st.integers(0, 0xFF)), st.tuples(u32, u32, u32, u32), max_size=20
    ),
    st.dictionaries(u32, st.one_of(st.none(), u64), max_size=20),
    st.booleans(),
)
def test_round_trip(cpuid: dict, msrs: dict, with_comments: bool) -> None:
    lines = [
        "------[ CPUID Registers / Logical CPU #3 ]------",
        "",
        "CPUID 00000000: 00000001-00000000-00000000-00000000",
    ]
    table = {(0, 0): (1, 0, 0, 0)}
    for (leaf, sub), regs in cpuid.items():
        if (leaf, sub) == (0, 0):
            continue
        table[(leaf, sub)] = regs
        line = f"CPUID {leaf:08X}: " + "-".join(f"{r:08X}" for r in regs)
        if sub or with_comments:
            line += f" [SL {sub:02X}]"
        if with_comments:
            line += " [a comment] / with ] brackets ["
        lines.append(line)
    lines += ["", "------[ MSR Registers / Logical CPU #3 ]------", ""]
    for index, value in msrs.items():
        if value is None:
            lines.append(f"MSR {index:08X}: < FAILED >")
        else:
            h = f"{value:016X}"
            comment = " [S200]" if with_comments else ""
            lines.append(f"MSR {index:08X}: {h[0:4]}-{h[4:8]}-{h[8:12]}-{h[12:16]}{comment}")
    dump = parse_dump("\n".join(lines))
    assert [c.index for c in dump.cpus] == [3]
    assert dict(dump.cpuid) == table
    assert dict(dump.msrs) == {k: v for k, v in msrs.items() if v is not None}
    assert dump.failed_msrs == {k for k, v in msrs.items() if v is None}
