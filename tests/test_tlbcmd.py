"""`pykvm tlb`: the trace format and its errors, the policies on a hand-made trace, JSON, tables, plots."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json

import pytest

from pykvm import status
from pykvm.cli import Parser
from pykvm.model import tlbcmd
from pykvm.model.tlb import Policy, replay
from pykvm.model.workload import TRACE_FORMAT, TraceError, Workload, parse_trace, read_trace

SMALL = ["--accesses", "4000", "--vms", "2", "--procs", "2", "--working-set", "16"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pykvm")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tlbcmd.add_parser(sub)
    return parser


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    args = build_parser().parse_args(["tlb", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---- the trace format ---------------------------------------------------------------------------------

# Each access line's outcome under (untagged, tagged, tagged+pcid), as a comment.
HANDMADE = """\
# one guest, two processes, a VM exit in between
W 1
C 1 1
A 1 1 0x1000          # miss miss miss
W 0
A 0 0 ffff888000000000 4K G   # the host: miss miss miss (a 1-D walk)
W 1
A 1 1 0x1000          # untagged: flushed by the world switches; tagged: hit
C 1 2
A 1 2 1000            # another process at the same address: a miss everywhere
C 1 1
A 1 1 0x1000          # back to process 1: only tagged+pcid kept its entry
I invpcid 1 1
A 1 1 0x1000          # INVPCID single-context of PCID 1 (0 without PCIDs): a miss everywhere
"""


def test_handmade_trace_under_each_policy():
    trace = parse_trace(HANDMADE.splitlines(), "handmade")
    assert trace.accesses == 6
    misses = {p.value: replay(trace, p).misses for p in Policy}
    assert misses == {"untagged": 6, "tagged": 5, "tagged+pcid": 4}
    tagged = replay(trace, "tagged")
    assert (tagged.world_switches, tagged.context_switches, tagged.invalidations) == (3, 3, 1)
    assert (tagged.walks_1d, tagged.walk_refs_1d) == (1, 4)
    # each guest walk is cold: a CR3 load or the INVPCID emptied PCID 0's paging-structure caches first
    assert (tagged.walks_2d, tagged.walk_refs_2d) == (4, 4 * 24)
    pcid = replay(trace, "tagged+pcid")  # PCID 1 cold, PCID 2 cold, PCID 1 after INVPCID emptied its caches
    assert (pcid.walks_2d, pcid.walk_refs_2d) == (3, 3 * 24)
    untagged = replay(trace, "untagged")
    assert untagged.flushes == 3 + 3 + 1  # world switches, CR3 loads, the INVPCID


def test_accesses_in_another_context_imply_the_switches():
    explicit = parse_trace(["W 2", "C 2 5", "A 2 5 0x1000", "W 0", "A 0 0 0x2000"])
    implicit = parse_trace(["A 2 5 0x1000", "A 0 0 0x2000"])
    assert (explicit.pages, explicit.events) == (implicit.pages, implicit.events)


def test_page_sizes_global_bits_and_invalidations_parse():
    trace = parse_trace([
        "A 1 0 0x40000000 1G",
        "A 1 0 0x200000 2m g",
        "a 1 0 0x3000 G",
        "I invlpg 0x3000",
        "I invpcid 0 3 0x3000",
        "I invvpid 2",
        "I invept 1 1",
        "I invlpga 1 0x3000",
        "I tlb_control 1 7   # a comment",
        "",
    ])
    assert [(a >> 1) & 3 for a in trace.pages] == [2, 1, 0]
    assert [a & 1 for a in trace.pages] == [0, 1, 1]
    names = [e[1] for _, e in trace.events if e[0] == "I"]
    assert names == ["invlpg", "invpcid", "invvpid", "invept", "invlpga", "tlb_control"]
    assert trace.events[-1][1] == ("I", "tlb_control", (1, 7), 9)


def test_written_traces_read_back(tmp_path):
    trace = Workload(accesses=3000, world_switch_every=100, vms=2, seed=4).generate()
    path = tmp_path / "w.trace"
    with open(path, "w") as fp:
        trace.write(fp)
    again = read_trace(str(path))
    assert again.pages == trace.pages
    assert [e for _, e in again.events] == [e for _, e in trace.events]
    assert [replay(again, p).misses for p in Policy] == [replay(trace, p).misses for p in Policy]


def test_every_invalidation_form_reads_back(tmp_path):
    lines = ["A 1 2 0x1000", "I invlpg 0x1000", "I invpcid 0 2 0x1000", "I invpcid 1 2", "I invpcid 2",
             "I invpcid 3", "I invvpid 0 1 0x1000", "I invvpid 1 1", "I invvpid 2", "I invvpid 3 1",
             "I invept 1 1", "I invept 2", "I invlpga 1 0x1000", "I tlb_control 1 3", "A 0 0 0x200123 2M G"]
    trace = parse_trace(lines)
    out = io.StringIO()
    trace.write(out)
    assert out.getvalue().splitlines() == ["W 1", "C 1 2", *lines[:-1], "W 0", "A 0 0 0x200000 2M G"]


@pytest.mark.parametrize("line, message", [
    ("X 1 2", "unknown event 'X'"),
    ("A 1 0", "an access is A <vm> <pcid> <va>"),
    ("A 1 0 0xzz", "address '0xzz' is not a hex number"),
    ("A 1 x 0x1000", "PCID 'x' is not a number"),
    ("A 1 4096 0x1000", "PCID 4096 is out of range (0-4095)"),
    ("A 1 0 0x1000 3M", "not a page size"),
    ("A 1 0 0x1000 G 2M", "not a page size"),
    ("W", "a world switch is W <vm>"),
    ("W 99999", "VM 99999 is out of range"),
    ("C 1", "a context switch is C <vm> <pcid>"),
    ("I", "an invalidation needs a kind"),
    ("I invlpq 0x1000", "unknown invalidation 'invlpq'"),
    ("I invvpid 4 1", "invvpid has no type 4"),
    ("I invvpid 1", "invvpid type 1 takes 1 argument"),
    ("I invvpid 1 0", "VPID 0 is refused"),
    ("I invept 1 0", "VM 0 is the host"),
    ("I invept 0 1", "invept has no type 0"),
    ("I invpcid 0 1", "invpcid type 0 takes 2 arguments"),
    ("I tlb_control 1 2", "TLB_CONTROL 2 is reserved"),
    ("I invlpga 1", "invlpga takes 2 arguments"),
])
def test_malformed_lines_are_named(line, message):
    lines = ["# header", "W 1", "A 1 0 0x1000", line, "A 1 0 0x2000"]
    with pytest.raises(TraceError) as info:
        parse_trace(lines, "bad.trace")
    assert info.value.line == 4
    assert str(info.value).startswith("bad.trace:4: ")
    assert message in str(info.value)
    assert repr(line.strip()) in str(info.value)


# ---- the command --------------------------------------------------------------------------------------


def test_help_documents_the_trace_format(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["tlb", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "A <vm> <pcid> <va> [4K|2M|1G] [G]" in out
    assert "examples:" in out and "tagged+pcid" in out
    assert TRACE_FORMAT.splitlines()[0] in out


def test_json_document_shape(capsys):
    code, out, err = run([*SMALL, "--world-switch-every", "100", "--json"], capsys)
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["source"]["kind"] == "workload" and doc["source"]["workload"]["accesses"] == 4000
    assert doc["policies"] == ["untagged", "tagged", "tagged+pcid"]
    assert doc["tlb"]["sets"] == 16 and doc["tlb"]["pwc"] == [4, 4, 32]
    assert doc["sweep"] is False and doc["plot"] is None
    (point,) = doc["points"]
    assert point["world_switch_every"] == 100 and point["accesses"] == 4000
    assert isinstance(point["world_switches_per_1000"], float)
    results = {r["policy"]: r for r in point["results"]}
    assert set(results) == {"untagged", "tagged", "tagged+pcid"}
    for r in results.values():
        for key in ("accesses", "hits", "misses", "flushes", "entries_flushed", "walks_1d", "walk_refs_1d",
                    "walks_2d", "walk_refs_2d"):
            assert isinstance(r[key], int), key
        assert r["hits"] + r["misses"] == r["accesses"] == 4000
        assert 0.0 <= r["miss_rate"] <= 1.0
    assert results["tagged"]["misses"] < results["untagged"]["misses"]
    assert "tagging cuts misses" in doc["note"]


def test_sweep_json_has_a_point_per_rate(capsys):
    code, out, _ = run([*SMALL, "--sweep", "--sweep-every", "1000,100", "--policy", "untagged",
                        "--policy", "tagged", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert [p["world_switch_every"] for p in doc["points"]] == [1000, 100]
    assert [[r["policy"] for r in p["results"]] for p in doc["points"]] == [["untagged", "tagged"]] * 2
    low, high = doc["points"]
    assert low["world_switches_per_1000"] < high["world_switches_per_1000"]


def test_table_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich wraps headers to the width it finds (80 without a terminal)
    code, out, err = run([*SMALL, "--levels", "1", "--pwc", "none"], capsys)
    assert (code, err) == (0, "")
    assert "L1 16 sets x 4 ways; paging-structure caches none" in out
    for policy in ("untagged", "tagged", "tagged+pcid", "refs/access", "note: at"):
        assert policy in out


def test_a_trace_file(tmp_path, capsys):
    path = tmp_path / "handmade.trace"
    path.write_text(HANDMADE)
    code, out, _ = run([str(path), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["source"] == {"kind": "trace", "path": str(path), "accesses": 6, "events": {"W": 3, "C": 3, "I": 1}}
    assert [r["misses"] for r in doc["points"][0]["results"]] == [6, 5, 4]


def test_a_trace_on_standard_input(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(HANDMADE))
    code, out, _ = run(["-", "--json", "--policy", "tagged"], capsys)
    assert code == 0 and json.loads(out)["points"][0]["results"][0]["misses"] == 5


def test_a_malformed_trace_file_exits_64_naming_the_line(tmp_path, capsys):
    path = tmp_path / "bad.trace"
    path.write_text("W 1\nA 1 0 0x1000\nA 1 0 0x10g0\n")
    code, out, err = run([str(path)], capsys)
    assert (code, out) == (status.USAGE, "")
    assert err == (f"pykvm: error: malformed trace: {path}:3: address '0x10g0' is not a hex number: "
                   "'A 1 0 0x10g0'\n")


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/x.trace"], "cannot read the trace /nonexistent/x.trace"),
    (["some.trace", "--sweep"], "take no TRACE file"),
    (["--plot", "out.pdf"], "must end in .png or .svg"),
    (["--sweep", "--write-trace", "x"], "--write-trace writes one generated trace"),
    (["--pwc", "4,32"], "pwc_entries needs 3 sizes"),
])
def test_usage_errors_exit_64(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert (code, out) == (status.USAGE, "")
    assert err.startswith("pykvm: error: ") and message in err


def test_an_empty_trace_is_refused(tmp_path, capsys):
    path = tmp_path / "empty.trace"
    path.write_text("# nothing\nW 1\n")
    code, _, err = run([str(path)], capsys)
    assert code == status.USAGE and "no accesses" in err


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["tlb", "--sweep-every", "100,0"])
    assert info.value.code == status.USAGE
    assert "at least 1" in capsys.readouterr().err


def test_write_trace(tmp_path, capsys):
    path = tmp_path / "gen.trace"
    code, _, _ = run([*SMALL, "--write-trace", str(path), "--json"], capsys)
    assert code == 0
    trace = read_trace(str(path))
    assert trace.accesses == 4000


needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install 'pykvm-driver[plot]')")


@needs_matplotlib
@pytest.mark.parametrize("name, magic", [("tlb.png", b"\x89PNG\r\n\x1a\n"), ("tlb.svg", b"<?xml")])
def test_plot_writes_a_file(tmp_path, capsys, name, magic):
    path = tmp_path / name
    code, out, _ = run([*SMALL, "--plot", str(path), "--sweep-every", "1000,100,30"], capsys)
    assert code == 0
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 5000
    assert f"plot: {path}" in out


def test_plot_without_matplotlib_exits_66(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, _, err = run(["--plot", "x.png"], capsys)
    assert code == status.UNAVAILABLE
    assert "pip install 'pykvm-driver[plot]'" in err


def test_wired_into_pykvm_cli(capsys):
    from pykvm import cli

    code = cli.main(["tlb", *SMALL, "--json"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["points"][0]["results"]) == 3
