"""Snapshot cases beyond one counting vCPU (pykvm/snapshot.py): two vCPUs saved mid-count (and
before the AP's INIT/SIPI), a COM1 interrupt pending at the snapshot, and files this KVM must
refuse (a CPUID feature bit it does not offer, a damaged header). Each running case restores in
another process and compares the console, the UART's output and every page with an uninterrupted
run of the same deterministic guest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

from pykvm import snapshot
from pykvm.constants import MpState
from pykvm.machine import Machine, Paused
from pykvm.snapshot import SnapshotError

PAGE = snapshot.PAGE

#: In another process: restore argv[1], report the state it came back in, run it to its end, and
#: write what it did to argv[2] (console and COM1 output as hex: only what came after the restore).
RESTORE = textwrap.dedent("""
    import hashlib, json, sys
    from pykvm.machine import Machine
    m = Machine.from_snapshot(sys.argv[1])
    uart = next((d for d in m._devices if type(d).__name__ == "Uart16550"), None)
    digests = lambda: [hashlib.sha256(m.memory.read(gpa, 4096)).hexdigest() for gpa in range(0, m.ram.size, 4096)]
    doc = {"before": digests(), "mp_states": [v.get_mp_state() for v in m.vcpus],
           "uart": uart.save() if uart else None}
    outcome = m.run(timeout=60)
    doc.update(after=digests(), status=outcome.status, syncs=m.syncs, console=m.debugcon.captured.hex(),
               serial=uart.captured.hex() if uart else "")
    json.dump(doc, open(sys.argv[2], "w"))
""")


def _digests(m) -> list[str]:
    return [hashlib.sha256(m.memory.read(gpa, PAGE)).hexdigest() for gpa in range(0, m.ram.size, PAGE)]


def _restore_elsewhere(path, tmp_path) -> dict:
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(path), str(result)], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(result.read_text())
    doc["console"], doc["serial"] = bytes.fromhex(doc["console"]), bytes.fromhex(doc["serial"])
    return doc


def _symbols(name: str) -> dict[str, int]:
    """The labels of a built guest (its .elf next to the .bin) -> their addresses."""
    from elftools.elf.elffile import ELFFile

    from pykvm.images import guest_image

    with open(guest_image(name).with_suffix(".elf"), "rb") as f:
        return {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name}


def _lapic_bits(vcpu_doc: dict, offset: int) -> int:
    """A 256-bit local APIC register (ISR 0x100, TMR 0x180, IRR 0x200) of a saved vCPU as an int."""
    regs = bytes.fromhex(vcpu_doc["structs"]["lapic"])
    return sum(struct.unpack_from("<I", regs, offset + 0x10 * i)[0] << (32 * i) for i in range(8))


def _ioapic(vm_doc: dict) -> tuple[int, list[int]]:
    """(IRR, the 24 redirection entries) of the saved in-kernel IOAPIC (struct kvm_irqchip, chip 2)."""
    raw = bytes.fromhex(vm_doc["irqchips"]["2"])
    irr = struct.unpack_from("<I", raw, 8 + 16)[0]  # chip_id, pad; base_address, ioregsel, id, irr
    return irr, list(struct.unpack_from("<24Q", raw, 8 + 24))


# ---- two vCPUs -----------------------------------------------------------------------------------

SMP_ROUNDS = 100  # guests/smp_counter.S SMPC_ROUNDS
SMP_PAGES = 256
SMP_REGION = 0x200000
LINE = re.compile(rb"cpu([01]) count ([0-9a-f]{8})\n")


def _counts(console: bytes) -> dict[int, list[int]]:
    """Each vCPU's round numbers in the order it printed them."""
    out: dict[int, list[int]] = {0: [], 1: []}
    for cpu, n in LINE.findall(console):
        out[int(cpu)].append(int(n, 16))
    return out


def _smp_machine(guest) -> Machine:
    m = Machine(cpus=2, irqchip=True)
    m.load_flat(guest("smp_counter"), "long")
    return m


@pytest.fixture(scope="module")
def smp_reference(guest):
    """The uninterrupted run: its console and every page at DONE."""
    with _smp_machine(guest) as m:
        assert m.run(timeout=60).ok
        return m.debugcon.captured, _digests(m)


@pytest.mark.kvm
def test_smp_reference_run_counts_both_vcpus_to_the_end(smp_reference):
    console, _ = smp_reference
    assert _counts(console) == {0: list(range(1, SMP_ROUNDS + 1)), 1: list(range(1, SMP_ROUNDS + 1))}
    assert console.startswith(b"bsp: start\nbsp: init sent\n")  # the AP may print before "sipi sent"
    assert re.findall(rb"bsp: [a-z ]+\n", console) == [b"bsp: start\n", b"bsp: init sent\n", b"bsp: sipi sent\n",
                                                     b"bsp: both done\n"]
    assert console.endswith(b"bsp: both done\n")


#: Where the source is paused: (text on the console, vCPU 1's MP state then or None when it may be
#: either running or halted, the vCPU whose region is complete for round n and n).
SMP_POINTS = {
    "ap-not-started": (b"bsp: start\n", MpState.UNINITIALIZED, None),
    "ap-init-received": (b"bsp: init sent\n", MpState.INIT_RECEIVED, None),
    "bsp-mid-count": (b"cpu0 count 00000010\n", None, (0, 0x10)),
    "ap-mid-count": (b"cpu1 count 00000030\n", None, (1, 0x30)),
}


@pytest.mark.kvm
@pytest.mark.parametrize("point", list(SMP_POINTS))
def test_two_vcpus_restored_in_another_process_count_on_to_the_same_memory(guest, tmp_path, smp_reference, point):
    """guests/smp_counter.S paused with its AP not yet started, between INIT and SIPI (mp_state
    INIT_RECEIVED, in the in-kernel LAPIC), or with both counting: restored in another process,
    each vCPU's count goes on from where it stopped (nothing repeated, nothing lost) and every
    page at DONE is the uninterrupted run's."""
    text, ap_state, complete = SMP_POINTS[point]
    ref_console, ref_end = smp_reference
    path = tmp_path / "smp.snap"
    with _smp_machine(guest) as m:
        def after(exit, vcpu):
            if text in m.debugcon.captured:
                m.pause()

        m.after_exit = after
        assert isinstance(m.run(timeout=60), Paused)
        m.snapshot(path)
        at_snapshot, saved_console = _digests(m), m.debugcon.captured
        m.after_exit = None
        assert m.run(timeout=60).ok  # the source goes on too, to the same end
        assert _digests(m) == ref_end
        assert _counts(m.debugcon.captured) == _counts(ref_console)

    snap = snapshot.read(path)
    assert snap.header["vcpus"] == 2 and "lapic" in snap.sections["vcpu1"]["structs"]
    saved_states = [snap.sections[f"vcpu{i}"]["mp_state"] for i in (0, 1)]
    assert saved_states[0] == MpState.RUNNABLE
    if ap_state is not None:
        assert saved_states[1] == ap_state
    else:
        assert saved_states[1] in (MpState.RUNNABLE, MpState.HALTED)
    before = _counts(saved_console)
    if complete is not None:  # the vCPU that printed round n has written round n to every page
        cpu, n = complete
        assert before[cpu][-1] == n
        with snap.map_memory() as mem:
            counters = _symbols("smp_counter")["counters"]
            assert struct.unpack_from("<Q", mem, counters + 8 * cpu)[0] == n  # its own counter
            for p in range(SMP_PAGES):
                at = SMP_REGION + (cpu << 20) + p * PAGE
                assert struct.unpack_from("<Q", mem, at + (n % 512) * 8)[0] == cpu << 32 | n << 16 | p
                assert struct.unpack_from("<Q", mem, at + ((n + 1) % 512) * 8)[0] == 0  # not round n + 1 yet

    doc = _restore_elsewhere(path, tmp_path)
    assert doc["status"] == 0
    assert doc["mp_states"] == saved_states  # vCPU 1's MP state and LAPIC came back as saved
    assert doc["before"] == at_snapshot
    assert doc["after"] == ref_end  # every page as the uninterrupted run left it
    after = _counts(doc["console"])
    for cpu in (0, 1):
        assert before[cpu] + after[cpu] == list(range(1, SMP_ROUNDS + 1)), f"vCPU {cpu}"
    assert saved_console.count(b"bsp: ") + doc["console"].count(b"bsp: ") == 4  # each BSP line once
    assert doc["console"].endswith(b"bsp: both done\n")


# ---- a COM1 interrupt pending at the snapshot ----------------------------------------------------

UART_VECTOR = 0x24  # guests/uart_irq.S
UART_PIN = 4
MESSAGE = b"sent by THRE irqs\n"
INTERRUPTS = len(MESSAGE) + 1
REMOTE_IRR, LEVEL, MASKED = 1 << 14, 1 << 15, 1 << 16


def _uart_machine(guest, trigger: str):
    m = Machine(irqchip=True)
    uart = m.add_pc_devices()
    m.load_flat(guest("uart_irq"), "long")
    regs = m.vcpu.get_regs()
    regs.rbx = {"edge": 0, "level": 1}[trigger]
    m.vcpu.set_regs(regs)
    return m, uart


@pytest.fixture(scope="module")
def uart_reference(guest):
    """The uninterrupted run of each trigger mode: console, COM1 output, syncs, pages at DONE."""
    runs = {}
    for trigger in ("edge", "level"):
        m, uart = _uart_machine(guest, trigger)
        with m:
            assert m.run(timeout=60).ok
            runs[trigger] = (m.debugcon.captured, uart.captured, m.syncs, _digests(m))
    return runs


#: kvm_pvm takes a level-triggered IOAPIC interrupt without holding it in service: while the ISR
#: runs with the line still high the IOAPIC delivers it again (KVM_GET_LAPIC shows the vector in
#: IRR, none in ISR), so after the last byte one more interrupt comes with no source (IIR 01),
#: snapshot or not. A real KVM keeps remote IRR set until the guest's EOI, when the line is low.
KVM_PVM_LEVEL_EXTRA = b"isr %02x iir 01\n" % (INTERRUPTS + 1)


@pytest.mark.kvm
@pytest.mark.parametrize("trigger", ["edge", "level"])
def test_uart_reference_runs_take_one_interrupt_a_byte(uart_reference, backend, trigger):
    console, serial, syncs, _ = uart_reference[trigger]
    isr_lines = b"".join(b"isr %02x iir 02\n" % n for n in range(1, INTERRUPTS + 1))
    expected = b"armed\n" + (b"unmasked\n" if trigger == "level" else b"") + isr_lines + b"done\n"
    interrupts = INTERRUPTS
    if trigger == "level" and backend == "kvm_pvm":
        expected, interrupts = expected + KVM_PVM_LEVEL_EXTRA, INTERRUPTS + 1
    assert console == expected and serial == MESSAGE and syncs == [interrupts]


#: (trigger, where the source is paused, what the saved state must show): "pending" the vector
#: waits in the LAPIC's IRR, not in service, with interrupts off; "ioapic" it waits in the masked
#: level pin's IRR of the IOAPIC, the LAPIC has nothing; "in-service" the ISR runs (interrupts
#: off, RIP in it), IIR not read yet, the line still high; "in-service+pending" the ISR has
#: written THR, raising the interrupt again (edge: a new edge in the LAPIC's IRR; level: held in
#: the IOAPIC by remote IRR until the EOI); "last-in-service" the last interrupt's ISR, which
#: will clear the source (IIR read, then IER = 0) and raise nothing more: a level line the
#: restored irqchip still held high would come in again after its EOI.
UART_POINTS = [
    ("edge", b"armed\n", "pending"),
    ("edge", b"isr 03", "in-service"),
    ("edge", b"isr 03 iir 02\n", "in-service+pending"),
    ("level", b"armed\n", "ioapic"),
    ("level", b"unmasked\n", "pending"),
    ("level", b"isr 03", "in-service"),
    ("level", b"isr 03 iir 02\n", "in-service+pending"),
    ("edge", b"isr 13", "last-in-service"),
    ("level", b"isr 13", "last-in-service"),
]
RFLAGS_IF = 1 << 9


def _rip_rflags(vcpu_doc: dict) -> tuple[int, int]:
    return struct.unpack_from("<QQ", bytes.fromhex(vcpu_doc["structs"]["regs"]), 16 * 8)  # after the 16 GPRs


@pytest.mark.kvm
@pytest.mark.parametrize("trigger, text, state", UART_POINTS,
                         ids=[f"{t}-{s}" for t, _, s in UART_POINTS])
def test_a_pending_uart_interrupt_is_taken_once_after_a_restore(guest, tmp_path, uart_reference, trigger, text, state):
    """guests/uart_irq.S sends its line one THR-empty interrupt a byte, IRQ 4 through the IOAPIC
    (edge or level). Paused with the interrupt pending (interrupts off, or a masked level pin, or
    raised again inside the ISR): the UART's state says so (IER, THR-empty pending, the line
    high), the irqchip state holds it, and restored in another process the guest takes it and
    every later one exactly once: the console, COM1's bytes and the memory are the uninterrupted
    run's (an interrupt lost would hang the guest; one doubled, or a level line the restored
    irqchip held high after the UART lowered it, would print an ISR line too many, with IIR 01,
    in the guest's closing window with interrupts on, and count more)."""
    ref_console, ref_serial, ref_syncs, ref_end = uart_reference[trigger]
    path = tmp_path / "uart.snap"
    m, uart = _uart_machine(guest, trigger)
    with m:
        def after(exit, vcpu):
            if m.debugcon.captured.endswith(text):
                m.pause()

        m.after_exit = after
        assert isinstance(m.run(timeout=60), Paused)
        m.snapshot(path)
        at_snapshot, saved_console, saved_serial = _digests(m), m.debugcon.captured, uart.captured
        m.after_exit = None
        assert m.run(timeout=60).ok
        assert (m.debugcon.captured, uart.captured, m.syncs, _digests(m)) == (ref_console, ref_serial, ref_syncs, ref_end)

    snap = snapshot.read(path)
    (saved_uart,) = [d["state"] for d in snap.sections["devices"]["devices"] if d["type"] == "Uart16550"]
    assert saved_uart["ier"] == 0x02 and saved_uart["thr_ipending"] and saved_uart["irq"] == 1  # the line is high
    vector = 1 << UART_VECTOR
    irr, isr = _lapic_bits(snap.sections["vcpu0"], 0x200), _lapic_bits(snap.sections["vcpu0"], 0x100)
    ioapic_irr, redir = _ioapic(snap.sections["vm"])
    entry, pin = redir[UART_PIN], 1 << UART_PIN
    rip, rflags = _rip_rflags(snap.sections["vcpu0"])
    symbols = _symbols("uart_irq")
    in_isr = symbols["isr"] <= rip < symbols["isr_end"]
    assert entry & 0xFF == UART_VECTOR and bool(entry & LEVEL) == (trigger == "level")
    assert not rflags & RFLAGS_IF  # taken or not, nothing more can come in at this point
    if state == "ioapic":
        assert entry & MASKED and ioapic_irr & pin and not (irr | isr) & vector and not in_isr
    elif state == "pending":
        assert irr & vector and not isr & vector and not entry & MASKED and not in_isr
    else:
        # In the ISR. (A real KVM shows the vector in the LAPIC's ISR here; kvm_pvm's KVM_GET_LAPIC
        # never does, and keeps a level vector in IRR while its handler runs: not asserted.)
        assert in_isr
        if state == "in-service+pending":
            if trigger == "edge":
                assert irr & vector
            else:
                assert entry & REMOTE_IRR and ioapic_irr & pin
    if state in ("pending", "ioapic"):
        assert b"isr" not in saved_console  # not taken yet

    doc = _restore_elsewhere(path, tmp_path)
    assert doc["uart"] == saved_uart  # the model came back with the line high
    assert doc["status"] == 0 and doc["syncs"] == ref_syncs  # as many interrupts as the uninterrupted run
    assert saved_console + doc["console"] == ref_console
    assert saved_serial + doc["serial"] == ref_serial == MESSAGE
    assert doc["before"] == at_snapshot and doc["after"] == ref_end


# ---- files this KVM refuses ----------------------------------------------------------------------

def _counter_snapshot(guest, path) -> None:
    with Machine() as m:
        m.load_flat(guest("counter"), "long")

        def after(exit, vcpu):
            if m.debugcon.captured.endswith(b"count 00000002\n"):
                m.pause()

        m.after_exit = after
        assert isinstance(m.run(timeout=60), Paused)
        m.snapshot(path)


def _rewrite_section(src, dst, name: str, edit) -> None:
    """Copy snapshot ``src`` to ``dst`` with section ``name``'s JSON changed by ``edit(doc)`` and its
    CRC computed again, in the layout the module docstring gives (written here, not by
    snapshot.write): the file head, each section's 32-byte head and payload, the memory section
    on the next page boundary of the file."""
    raw = open(src, "rb").read()
    magic, version, count = snapshot.FILE_HEAD.unpack_from(raw)
    out = bytearray(raw[: snapshot.FILE_HEAD.size])
    at = snapshot.FILE_HEAD.size
    for _ in range(count):
        head_name, flags, length, crc = snapshot.SECTION_HEAD.unpack_from(raw, at)
        at += snapshot.SECTION_HEAD.size
        if head_name.rstrip(b"\0") == b"memory":
            out += raw[at - snapshot.SECTION_HEAD.size : at]
            mem_start = -(-at // PAGE) * PAGE
            out += bytes(-(-len(out) // PAGE) * PAGE - len(out))
            out += raw[mem_start : mem_start + length]
            break
        payload = raw[at : at + length]
        at += length
        if head_name.rstrip(b"\0") == name.encode():
            doc = json.loads(payload)
            edit(doc)
            payload = json.dumps(doc, separators=(",", ":")).encode()
            length, crc = len(payload), zlib.crc32(payload)
        out += snapshot.SECTION_HEAD.pack(head_name, flags, length, crc) + payload
    else:
        raise AssertionError("no memory section")
    open(dst, "wb").write(out)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _missing_feature_bits(kvm) -> list[tuple[int, int, str, int]]:
    """(function, index, register, one bit) of every feature register this KVM's supported CPUID
    leaves a bit clear in, per snapshot.FEATURE_REGISTERS."""
    offered = {(e.function, e.index): e for e in kvm.supported_cpuid()}
    out = []
    for (function, index), regs in snapshot.FEATURE_REGISTERS.items():
        if (function, index) not in offered:
            continue
        for reg in regs:
            have = getattr(offered[(function, index)], reg)
            clear = [b for b in range(32) if not have >> b & 1]
            if clear:
                out.append((function, index, reg, 1 << clear[-1]))
    return out


@pytest.mark.kvm
def test_a_snapshot_whose_guest_saw_a_cpuid_bit_this_kvm_lacks_is_refused(guest, tmp_path, kvm):
    path, same, forged = tmp_path / "s.snap", tmp_path / "same.snap", tmp_path / "forged.snap"
    _counter_snapshot(guest, path)
    missing = _missing_feature_bits(kvm)
    assert missing, "this KVM offers every bit of every feature register: nothing to forge"

    _rewrite_section(path, same, "header", lambda doc: None)  # the rewriter itself changes nothing that matters
    with Machine.from_snapshot(same) as m:
        assert m.run(timeout=60).ok and m.debugcon.captured.startswith(b"count 00000003\n")

    for function, index, reg, bit in missing[:3]:  # a few registers, each refused with its name
        def add_bit(doc):
            (entry,) = [e for e in doc["cpuid"] if (e["function"], e["index"]) == (function, index)]
            entry[reg] |= bit

        _rewrite_section(path, forged, "header", add_bit)
        assert snapshot.read(forged).header["cpuid"] != snapshot.read(path).header["cpuid"]
        fds = _open_fds()
        with pytest.raises(SnapshotError) as caught:
            Machine.from_snapshot(forged)
        assert str(caught.value) == (f"{forged}: the guest saw CPUID.{function:#x}.{index}:{reg.upper()} bits "
                                     f"{bit:#x} that this host's KVM does not offer")
        assert _open_fds() == fds  # the refusal left no KVM or VM descriptor open


@pytest.mark.kvm
def test_a_cpuid_bit_added_through_snapshot_write_is_refused_too(guest, tmp_path, kvm):
    path, forged = tmp_path / "s.snap", tmp_path / "forged.snap"
    _counter_snapshot(guest, path)
    function, index, reg, bit = _missing_feature_bits(kvm)[0]
    snap = snapshot.read(path)
    sections = list(snap.sections.items())
    for entry in sections[0][1]["cpuid"]:
        if (entry["function"], entry["index"]) == (function, index):
            entry[reg] |= bit
    with snap.map_memory() as mem:
        snapshot.write(forged, sections, mem)
    with pytest.raises(SnapshotError, match=re.escape(f"CPUID.{function:#x}.{index}:{reg.upper()} bits {bit:#x}")):
        Machine.from_snapshot(forged)


@pytest.mark.kvm
@pytest.mark.parametrize("where", ["payload", "crc"])
def test_a_damaged_header_is_named(guest, tmp_path, where):
    path = tmp_path / "s.snap"
    _counter_snapshot(guest, path)
    raw = bytearray(path.read_bytes())
    head = snapshot.FILE_HEAD.size
    name, _flags, length, crc = snapshot.SECTION_HEAD.unpack_from(raw, head)
    assert name.rstrip(b"\0") == b"header"
    if where == "payload":
        at = raw.index(b'"kvm_api_version"', head) + 2
        raw[at] ^= 0x20  # still JSON-looking, a byte off
    else:
        struct.pack_into("<I", raw, head + 28, crc ^ 1)  # the CRC field of the section head
    path.write_bytes(raw)
    fds = _open_fds()
    with pytest.raises(SnapshotError, match=rf"^{re.escape(str(path))}: section header: CRC 0x[0-9a-f]{{8}}, "
                                            rf"the file says 0x[0-9a-f]{{8}}$"):
        Machine.from_snapshot(path)
    assert _open_fds() == fds
