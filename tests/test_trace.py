"""Instruction tracing (pykvm/trace.py): single-stepped guests give the instruction sequence their
binaries and control flow say, each part disassembled in the mode it runs in; filters and a file.

The expected sequences come from the guest images themselves (objdump's listing and the loop
structure found in it), not from a copy of the tracer's output.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from pykvm import exits
from pykvm.machine import Machine
from pykvm.trace import Tracer, TraceRecord, parse_range
from pykvm.x86 import layout

CONSOLE = b"Hello from real mode\n"


# ---- no KVM needed -----------------------------------------------------------------------------


def test_parse_range():
    assert parse_range("0x1000-0x1100") == (0x1000, 0x1100)
    assert parse_range("4096 - 8192") == (4096, 8192)
    for bad, reason in [("0x1000", "LO-HI"), ("x-0x10", "integers"), ("0x10-0x10", "LO < HI"),
                        ("0x20-0x10", "LO < HI")]:
        with pytest.raises(ValueError, match=reason):
            parse_range(bad)


def test_tracer_checks_its_arguments_before_touching_the_machine():
    machine = SimpleNamespace(vcpus=[])
    with pytest.raises(ValueError, match="count must be at least 1"):
        Tracer(machine, count=0)
    with pytest.raises(ValueError, match="only_range"):
        Tracer(machine, only_range=(0x2000, 0x1000))
    with pytest.raises(ValueError, match="start must be"):
        Tracer(machine, start=-1)


def test_record_line():
    record = TraceRecord(7, 0, 16, 0x100C, 0x100C, b"\xe6\xe9", "out", "0xe9, al", (("rax", 0x48),),
                         "IoOut(port=0xe9)")
    assert record.instruction == "out 0xe9, al"
    line = record.format()
    assert re.match(r"\s+7 16 0000100c  e6 e9\s+out 0xe9, al\s+rax=0x48 -> IoOut\(port=0xe9\)$", line), line
    wide = record._replace(bits=64, address=0x100000, expected=0x100002, exit=None, changes=())
    assert " 64 0000000000100000 " in wide.format()
    assert wide.format().endswith("-> not at 0x100002: interrupt/exception or more steps")
    assert wide.format(cpu_column=True).split()[1] == "cpu0"
    assert record._replace(kind="untraced").format().split()[0] == "-"


# ---- the guests' own listings -------------------------------------------------------------------

LINE = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+?)\s*(?:\t(\S+)\s*(.*?))?\s*$")


def objdump(image: bytes, load: int, machine: str, tmp_path) -> dict[int, tuple[bytes, str, str]]:
    """{address: (bytes, mnemonic, operands)}: objdump's linear listing (AT&T) of a flat image."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (apt-get install binutils)")
    path = tmp_path / "image.bin"
    path.write_bytes(image)
    text = subprocess.run(["objdump", "-D", "-b", "binary", "-m", machine, f"--adjust-vma={load:#x}", str(path)],
                          capture_output=True, text=True, check=True).stdout
    out: dict[int, tuple[bytes, str, str]] = {}
    last = None
    for row in text.splitlines():
        match = LINE.match(row)
        if not match:
            continue
        address, code = int(match[1], 16), bytes.fromhex(match[2])
        if match[3] is None and last is not None:  # a long instruction's bytes go on
            out[last] = (out[last][0] + code, *out[last][1:])
            continue
        out[address] = (code, match[3], match[4] or "")
        last = address
    return out


def branch_target(operands: str) -> int:
    return int(operands.split()[0], 16)


def expected_hello_real(image: bytes, tmp_path) -> tuple[list[int], dict, dict]:
    """The addresses hello_real executes, from its listing: the code before the print loop, the
    loop body once per character of the string it prints, the loop's exit test for the NUL, then
    the DONE call up to its `out` (the `hlt` after DONE never runs)."""
    load = layout.REAL_LOAD
    listing = objdump(image, load, "i8086", tmp_path)
    addrs = sorted(listing)
    back = next(a for a in addrs if listing[a][1] == "jmp" and branch_target(listing[a][2]) < a)
    loop_start = branch_target(listing[back][2])
    leave = next(a for a in addrs if loop_start <= a < back and listing[a][1].startswith("j")
                 and branch_target(listing[a][2]) > back)
    exit_target = branch_target(listing[leave][2])
    string = next(int(m[1], 16) for a in addrs if a < loop_start
                  for m in [re.match(r"\$(0x[0-9a-f]+),%e?si", listing[a][2])] if m)
    text = image[string - load:].split(b"\0", 1)[0]
    done_out = next(a for a in addrs if a >= exit_target and listing[a][1] == "out" and "%eax" in listing[a][2])
    prologue = [a for a in addrs if layout.REAL_LOAD <= a < loop_start]
    body = [a for a in addrs if loop_start <= a <= back]
    sequence = (prologue + body * len(text) + [a for a in body if a <= leave]
                + [a for a in addrs if exit_target <= a <= done_out])
    info = {"loop": (loop_start, back + len(listing[back][0])), "exit": exit_target, "text": text,
            "body": len(body), "done_out": done_out}
    return sequence, listing, info


def traced(image: bytes, mode: str, **kwargs) -> tuple[Machine, Tracer, object, str]:
    """Run ``image`` under a Tracer (keep=True); (machine, tracer, outcome, trace text)."""
    out = kwargs.pop("output", None) or io.StringIO()
    machine = Machine(console=io.BytesIO(), **kwargs.pop("machine", {}))
    try:
        machine.load_flat(image, mode)
        with Tracer(machine, output=out, keep=True, **kwargs) as tracer:
            outcome = machine.run(timeout=30)
    finally:
        machine.close()
    return machine, tracer, outcome, out.getvalue() if isinstance(out, io.StringIO) else ""


# ---- KVM: what a trace shows --------------------------------------------------------------------


@pytest.mark.kvm
def test_hello_real_trace_is_its_instruction_sequence(guest, tmp_path):
    image = guest("hello_real")
    sequence, listing, info = expected_hello_real(image, tmp_path)
    machine, tracer, outcome, text = traced(image, "real")

    assert outcome.ok and machine.console_output == CONSOLE
    records = tracer.records
    assert [r.address for r in records] == sequence
    for r in records:
        code, mnemonic, _ = listing[r.address]
        assert r.code == code, f"{r.address:#x}: traced bytes {r.code.hex()} vs objdump's {code.hex()}"
        assert r.bits == 16
        # capstone (Intel) names string instructions by width (lodsb); objdump (AT&T) as lods
        assert r.mnemonic.startswith(mnemonic), f"{r.address:#x}: {r.mnemonic} vs objdump's {mnemonic}"
    assert tracer.steps == tracer.printed == len(sequence) and tracer.stopped is None
    assert text.splitlines() == [r.format() for r in records]

    # the loop's `out` to the console is printed in its place, with the exit and the byte it wrote
    outs = [r for r in records if r.exit and "port=0xe9" in r.exit]
    assert len(outs) == len(info["text"])
    assert bytes(int(r.exit.rsplit("data=", 1)[1].rstrip(")"), 16) for r in outs) == info["text"]
    # the run ends at DONE: the last instruction is its `out`, then nothing (no hang on the hlt)
    assert records[-1].address == info["done_out"] and "port=0xea" in records[-1].exit
    # changed registers: lodsb moves SI on by one each time; a taken jump shows RIP
    lods = [r for r in records if r.mnemonic.startswith("lods")]
    si = [dict(r.changes)["rsi"] for r in lods]
    assert si == list(range(si[0], si[0] + len(si)))
    back = next(r for r in records if r.mnemonic == "jmp")
    assert dict(back.changes)["rip"] == info["loop"][0]


@pytest.mark.kvm
def test_modeswitch_is_disassembled_in_each_mode(guest):
    image = guest("modeswitch")
    machine, tracer, outcome, _ = traced(image, "real")
    assert outcome.ok and machine.console_output == b"RPL\n"
    records = tracer.records
    by_address = {r.address: r for r in records}

    # the same bytes, 48 89 C3, in each part: dec/mov in 16- and 32-bit code, REX.W mov in 64-bit
    offsets = [m.start() for m in re.finditer(re.escape(b"\x48\x89\xc3"), image)]
    assert len(offsets) == 3
    a16, a32, a64 = (layout.REAL_LOAD + off for off in offsets)
    assert (by_address[a16].bits, by_address[a16].instruction) == (16, "dec ax")
    assert (by_address[a16 + 1].bits, by_address[a16 + 1].instruction) == (16, "mov bx, ax")
    assert (by_address[a32].bits, by_address[a32].instruction) == (32, "dec eax")
    assert (by_address[a32 + 1].bits, by_address[a32 + 1].instruction) == (32, "mov ebx, eax")
    assert (by_address[a64].bits, by_address[a64].instruction, by_address[a64].code) == (64, "mov rbx, rax",
                                                                                       b"\x48\x89\xc3")
    assert a32 + 1 in by_address and a64 + 1 not in by_address

    # the widths only go up, 16 -> 32 -> 64, and each part holds its letter's `out`
    bits = [r.bits for r in records]
    assert bits == sorted(bits) and set(bits) == {16, 32, 64}
    letters = {chr(int(r.exit.rsplit("data=", 1)[1].rstrip(")"), 16)): r.bits
               for r in records if r.exit and "port=0xe9" in r.exit}
    assert letters == {"R": 16, "P": 32, "L": 64, "\n": 64}

    # changed registers: the control registers and EFER as each write lands
    writes = [dict(r.changes) for r in records if r.mnemonic == "mov" and r.op_str.startswith("cr")]
    assert writes[0]["cr0"] & 1 == 1  # CR0.PE
    assert writes[-1]["cr0"] >> 31 == 1  # CR0.PG, and with EFER.LME that makes EFER.LMA
    assert writes[-1]["efer"] & (1 << 10)
    assert any("cr3" in w for w in writes) and any(w.get("cr4", 0) & 0x20 for w in writes)  # CR4.PAE
    wrmsr = next(r for r in records if r.mnemonic == "wrmsr")
    assert dict(wrmsr.changes)["efer"] & (1 << 8)  # EFER.LME
    far = [r for r in records if r.mnemonic == "ljmp"]
    assert [dict(r.changes)["cs"] for r in far] == [layout.SEL_CODE32, layout.SEL_CODE64]
    assert [r.bits for r in far] == [16, 32]  # each decoded in the mode it jumps from
    lgdt = next(r for r in records if r.mnemonic == "lgdt")
    assert {"gdt.base", "gdt.limit"} <= dict(lgdt.changes).keys()


@pytest.mark.kvm
def test_registers_from_kvm_run_match_the_ioctls(guest, kvm):
    from pykvm.constants import Cap

    image = guest("modeswitch")
    _, fast, _, fast_text = traced(image, "real")
    _, slow, _, slow_text = traced(image, "real", sync_regs=False)
    assert not slow.sync_regs
    assert fast.sync_regs == bool(kvm.check_extension(Cap.SYNC_REGS) & 3 == 3)
    assert fast_text == slow_text


# ---- KVM: filters and output --------------------------------------------------------------------


@pytest.mark.kvm
def test_count_stops_tracing_and_the_guest_runs_on(guest, tmp_path):
    image = guest("hello_real")
    sequence, _, _ = expected_hello_real(image, tmp_path)
    machine, tracer, outcome, text = traced(image, "real", count=5)
    assert [r.address for r in tracer.records] == sequence[:5]
    assert len(text.splitlines()) == 5 and tracer.stopped == "count"
    assert outcome.ok and machine.console_output == CONSOLE  # single-step off, the rest ran untraced
    assert "stopped after 5 instructions" in tracer.summary()


@pytest.mark.kvm
def test_range_prints_only_the_loop(guest, tmp_path):
    image = guest("hello_real")
    sequence, _, info = expected_hello_real(image, tmp_path)
    lo, hi = info["loop"]
    machine, tracer, outcome, _ = traced(image, "real", only_range=(lo, hi))
    assert outcome.ok and machine.console_output == CONSOLE
    assert [r.address for r in tracer.records] == [a for a in sequence if lo <= a < hi]
    assert tracer.printed == info["body"] * len(info["text"]) + 3  # + lods, test, je for the NUL
    assert tracer.steps == len(sequence)  # every instruction was still single-stepped


@pytest.mark.kvm
def test_start_and_end_bound_the_trace(guest, tmp_path):
    image = guest("hello_real")
    sequence, _, info = expected_hello_real(image, tmp_path)
    start, end = info["loop"][0], info["exit"]
    machine, tracer, outcome, _ = traced(image, "real", start=start, end=end)
    assert outcome.ok and machine.console_output == CONSOLE
    assert [r.address for r in tracer.records] == sequence[sequence.index(start): sequence.index(end)]
    assert tracer.stopped == "end"


@pytest.mark.kvm
def test_trace_to_a_file(guest, tmp_path):
    path = tmp_path / "trace.txt"
    with open(path, "w") as f:
        _, tracer, outcome, _ = traced(guest("modeswitch"), "real", output=f)
    assert outcome.ok
    lines = path.read_text().splitlines()
    assert lines == [r.format() for r in tracer.records] and len(lines) == tracer.printed > 30


# ---- KVM: exits, halts and code that does not single-step --------------------------------------


def _bench():
    """A machine for bench_io.S, with its port and hypercall answered: (machine, Hlt exits seen)."""
    machine = Machine(console=io.BytesIO())
    hlts = []
    machine.on_exit(exits.Hlt, lambda exit, vcpu: hlts.append(exit))
    machine.on_port(layout.BENCH_PORT, lambda exit, vcpu: exit.reply(0x41) if isinstance(exit, exits.IoIn) else None)
    machine.on_hypercall(layout.BENCH_HYPERCALL, lambda vcpu, args: 0x1234)
    return machine, hlts


@pytest.mark.kvm
@pytest.mark.parametrize("traced_run", [False, True], ids=["untraced", "traced"])
def test_hlt_exits_as_without_tracing(guest, traced_run):
    """A single-stepped hlt does not halt (kvm_pvm): the tracer makes the Hlt exit KVM would have."""
    machine, hlts = _bench()
    with machine:
        machine.load_flat(guest("bench_io"), "real")
        regs = machine.vcpu.get_regs()
        regs.rax, regs.rcx = layout.BENCH_LOOP_HLT, 3
        machine.vcpu.set_regs(regs)
        tracer = Tracer(machine, output=io.StringIO(), keep=True)
        if traced_run:
            tracer.attach()
        outcome = machine.run(timeout=10)
        tracer.finish()
    assert outcome.ok and len(hlts) == 3
    if traced_run:
        halts = [r for r in tracer.records if r.mnemonic == "hlt"]
        assert len(halts) == 3 and all(r.exit == "Hlt" for r in halts)


@pytest.mark.kvm
def test_a_read_shows_its_result_and_a_handler_its_changes(guest):
    for loop in (layout.BENCH_LOOP_IN, layout.BENCH_LOOP_HYPERCALL):
        machine, _ = _bench()
        with machine:
            machine.load_flat(guest("bench_io"), "real")
            regs = machine.vcpu.get_regs()
            regs.rax, regs.rcx = loop, 2
            machine.vcpu.set_regs(regs)
            with Tracer(machine, output=io.StringIO(), keep=True) as tracer:
                assert machine.run(timeout=10).ok
        if loop == layout.BENCH_LOOP_IN:
            ins = [r for r in tracer.records if r.mnemonic == "in"]
            assert len(ins) == 2 and all(r.exit.startswith("IoIn(port=0x700") for r in ins)
            assert dict(ins[0].changes)["rax"] & 0xFF == 0x41  # AL as the host answered
        else:
            host = [r for r in tracer.records if r.kind == "host"]
            assert len(host) == 2 and all(dict(r.changes) == {"rax": 0x1234} for r in host)


@pytest.mark.kvm
def test_hlt_with_the_irqchip_waits_for_the_interrupt(guest):
    """timer.S halts between PIT ticks; traced, each hlt waits for a tick. A slow host (kvm_amd
    under QEMU TCG traces about 100 instructions a second) takes some of the 100 Hz ticks while
    stepping rather than halted, and one may land between the last check and the cli."""
    machine, tracer, outcome, _ = traced(guest("timer"), "long", machine={"irqchip": True})
    assert outcome.ok and machine.syncs[1] >= 5
    halts = [r for r in tracer.records if r.mnemonic == "hlt"]
    assert 1 <= len(halts) <= machine.syncs[1] and all(r.exit == "halted until an interrupt" for r in halts)
    assert any(r.expected is not None for r in tracer.records)  # the interrupts' steps are marked


@pytest.mark.kvm
def test_two_vcpus(guest):
    """smp.S: the BSP starts the AP (INIT/SIPI), which sends it an IPI; both are traced."""
    machine, tracer, outcome, text = traced(guest("smp"), "long", machine={"cpus": 2, "irqchip": True})
    assert outcome.ok and machine.console_output == b"ap: apic 1\nbsp: ipi 0x31 0\n"
    cpus = {r.cpu for r in tracer.records}
    assert cpus == {0, 1} and all(line.split()[1] in ("cpu0", "cpu1") for line in text.splitlines())
    ap_bits = {r.bits for r in tracer.records if r.cpu == 1}
    assert ap_bits == {16}  # the AP's trampoline is real-mode code


@pytest.mark.kvm
def test_cpl3_code(guest, backend):
    """cpuid_cpl.S ends at CPL3. On kvm_pvm CPL3 code gets no single-step exits: the trace says so
    with (untraced) lines that end at each exit, down to DONE."""
    machine, tracer, outcome, _ = traced(guest("cpuid_cpl"), "long")
    assert outcome.ok and machine.console_output.endswith(b"cpl: 0\ncpl: 3\n")
    last = tracer.records[-1]
    assert "port=0xea" in last.exit  # DONE, printed however it was reached
    if backend == "kvm_pvm":
        untraced = [r for r in tracer.records if r.kind == "untraced"]
        assert len(untraced) == tracer.untraced == len("cpl: 3\n") + 1
        assert "stretches ran without single-step exits" in tracer.summary()
    else:
        assert tracer.untraced == 0


@pytest.mark.kvm
def test_finish_gives_the_vcpu_back(guest):
    with Machine(console=io.BytesIO()) as machine:
        machine.load_flat(guest("hello_real"), "real")
        tracer = Tracer(machine, output=io.StringIO(), count=3).attach()
        with pytest.raises(RuntimeError, match="attached already"):
            tracer.attach()
        assert machine.run(timeout=10).ok
        tracer.finish()
        tracer.finish()  # idempotent
        assert "run" not in vars(machine.vcpu) and machine.vcpu.kvm_run.kvm_valid_regs == 0
    assert tracer.rate > 0 and tracer.seconds > 0
