"""Snapshots (pykvm/snapshot.py): the file format checked section by section, and a running guest
saved, restored in another process, and going on from the same point with the same memory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from pykvm import snapshot
from pykvm.machine import Machine, Paused
from pykvm.snapshot import SnapshotError

PAGE = snapshot.PAGE


def _ram(pages: int, used: dict[int, bytes]) -> bytearray:
    ram = bytearray(pages * PAGE)
    for n, data in used.items():
        ram[n * PAGE : n * PAGE + len(data)] = data
    return ram


def _sections():
    return [("header", {"kvm_api_version": 12, "note": "ü"}), ("vcpu0", {"structs": {"regs": "00" * 8}})]


def test_a_file_reads_back_as_written_with_zero_pages_left_as_holes(tmp_path):
    path = tmp_path / "s.snap"
    ram = _ram(4096, {0: b"\x01" * PAGE, 7: b"seven", 4095: b"\xff" * 10})  # 16 MiB, three pages used
    sizes = snapshot.write(path, _sections(), ram)
    assert sizes["pages_saved"] == 3 and sizes["ram"] == len(ram)
    assert os.stat(path).st_blocks * 512 < 1 << 20  # 16 MiB of RAM, well under 1 MiB on disk
    snap = snapshot.read(path)
    assert snap.sections == dict(_sections()) and snap.memory_size == len(ram)
    assert snap.memory_offset % PAGE == 0
    with snap.map_memory() as mem:
        assert mem[:] == ram
        mem[0:4] = b"copy"  # copy-on-write: the file keeps its bytes
    assert snapshot.read(path).map_memory()[0:4] == b"\x01" * 4


def _corrupt(path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def test_a_damaged_section_is_named_with_its_crc(tmp_path):
    path = tmp_path / "s.snap"
    snapshot.write(path, _sections(), _ram(16, {3: b"three"}))
    raw = path.read_bytes()
    at = raw.index(b'"structs"')
    _corrupt(path, at + 2, b"X")
    with pytest.raises(SnapshotError, match=r"section vcpu0: CRC 0x[0-9a-f]{8}, the file says 0x[0-9a-f]{8}"):
        snapshot.read(path)


def test_damaged_memory_is_caught_when_it_is_mapped(tmp_path):
    path = tmp_path / "s.snap"
    snapshot.write(path, _sections(), _ram(16, {3: b"three"}))
    snap = snapshot.read(path)
    _corrupt(path, snap.memory_offset + 3 * PAGE + 1, b"H")
    with pytest.raises(SnapshotError, match="section memory: CRC"):
        snapshot.read(path).map_memory()


def test_truncated_files_another_version_and_other_files_are_refused(tmp_path):
    path = tmp_path / "s.snap"
    snapshot.write(path, _sections(), _ram(16, {15: b"last"}))
    raw = path.read_bytes()
    for cut, message in ((10, "not a pykvm snapshot"), (40, "truncated: section 1 of 4 is missing"), (60, "truncated: section header has"),
                         (len(raw) - 100, "truncated: section memory needs")):
        (tmp_path / "cut").write_bytes(raw[:cut])
        with pytest.raises(SnapshotError, match=message):
            snapshot.read(tmp_path / "cut")
    (tmp_path / "v2").write_bytes(raw[:8] + (2).to_bytes(4, "little") + raw[12:])
    with pytest.raises(SnapshotError, match="format version 2; this pykvm reads version 1"):
        snapshot.read(tmp_path / "v2")
    with pytest.raises(SnapshotError, match="cannot open"):
        snapshot.read(tmp_path / "missing")


# ---- a running machine ---------------------------------------------------------------------------

RESTORE = textwrap.dedent("""
    import hashlib, json, sys
    from pykvm.machine import Machine
    m = Machine.from_snapshot(sys.argv[1], console=sys.stdout.buffer)
    digests = lambda: [hashlib.sha256(m.memory.read(gpa, 4096)).hexdigest() for gpa in range(0, m.ram.size, 4096)]
    before = digests()
    outcome = m.run(timeout=120)
    json.dump({"before": before, "after": digests(), "status": outcome.status}, open(sys.argv[2], "w"))
""")


def _digests(m) -> list[str]:
    return [hashlib.sha256(m.memory.read(gpa, PAGE)).hexdigest() for gpa in range(0, m.ram.size, PAGE)]


def _pause_at(m, text: bytes) -> None:
    def after(exit, vcpu):
        if m.debugcon.captured.endswith(text):
            m.pause()

    m.after_exit = after


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_a_counting_guest_restored_in_another_process_goes_on_where_it_stopped(guest, tmp_path, irqchip):
    path = tmp_path / "counter.snap"
    with Machine(irqchip=irqchip) as m:
        m.load_flat(guest("counter"), "long")
        _pause_at(m, b"count 00000010\n")
        assert isinstance(m.run(timeout=120), Paused)
        sizes = m.snapshot(path)
        at_snapshot = _digests(m)
        assert sizes["pages_saved"] < m.ram.size // PAGE  # zero pages are not written
        m.after_exit = None
        assert m.run(timeout=120).ok  # the source goes on too, to compare the ends
        source_out, source_end = m.debugcon.captured, _digests(m)
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(path), str(result)], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(result.read_text())
    assert doc["status"] == 0
    assert doc["before"] == at_snapshot  # every page as it was saved
    assert doc["after"] == source_end  # and as the source left it after the same rounds
    expected = source_out[source_out.index(b"count 00000011") :]
    assert proc.stdout == expected  # the count goes on from 0x11, nothing repeated or lost
    assert proc.stdout.endswith(b"count 000000c8\n")


@pytest.mark.kvm
def test_a_snapshot_needs_the_vcpus_stopped(guest, tmp_path):
    with Machine() as m:
        m.load_flat(guest("counter"), "long")
        errors = []

        def after(exit, vcpu):
            if not errors:
                try:
                    m.snapshot(tmp_path / "x.snap")
                except RuntimeError as e:
                    errors.append(str(e))

        m.after_exit = after
        assert m.run(timeout=120).ok  # refused, and the run was not harmed
    assert errors == ["a snapshot is taken between runs: pause the machine first (Machine.pause)"]
    assert not (tmp_path / "x.snap").exists()


@pytest.mark.kvm
def test_a_snapshot_whose_msr_this_kvm_lacks_is_refused(guest, tmp_path):
    path, forged = tmp_path / "s.snap", tmp_path / "forged.snap"
    with Machine() as m:
        m.load_flat(guest("counter"), "long")
        _pause_at(m, b"count 00000002\n")
        m.run(timeout=120)
        m.snapshot(path)
    snap = snapshot.read(path)
    sections = [(name, doc) for name, doc in snap.sections.items()]
    sections[0][1]["msr_indices"].append(0x4B564DFF)  # an MSR index no KVM has
    with snap.map_memory() as mem:
        snapshot.write(forged, sections, mem)
    with pytest.raises(SnapshotError, match="cannot restore MSR 0x4b564dff"):
        Machine.from_snapshot(forged)


# ---- the command line ----------------------------------------------------------------------------

def _pykvm(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pykvm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


@pytest.mark.kvm
def test_run_snapshot_on_a_signal_then_restore_goes_on_from_there(tmp_path, backend, request):
    """The UART, fw_cfg, CMOS and the rest of pykvm run's PC devices are saved too: the restored
    run's output is the source's from the count after the snapshot on."""
    from pykvm.images import guest_image

    if backend != "kvm_pvm":
        # Seen twice on the kvm_amd reference host (Debian 6.1 under QEMU 10 TCG): the source's own
        # console lost the byte it was printing when SIGUSR1 came. Not understood yet: an open
        # defect of --snapshot-on SIGNAL there, reported as an expected failure until it is fixed.
        request.applymarker(pytest.mark.xfail(
            reason="kvm_amd: a console byte is lost around a SIGUSR1 snapshot (open defect, issue 17)", strict=False))

    path = tmp_path / "vm.snap"
    proc = _pykvm("run", str(guest_image("counter")), "--snapshot-on", "USR1", str(path))
    first = proc.stdout.readline()  # the guest is running
    assert first.startswith(b"count ")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert re.search(rb"pykvm: snapshot .*vm.snap: 4096 KiB of guest memory, \d+ pages written", err)
    source = first + out
    restored = subprocess.run([sys.executable, "-m", "pykvm", "restore", str(path)], capture_output=True, timeout=120)
    assert restored.returncode == 0, restored.stderr.decode()
    everything = "".join(f"count {n:08x}\n" for n in range(1, 201)).encode()
    assert source == everything  # the source ran on to its end after the snapshot
    # the restored run prints the rest from where the snapshot was taken, mid-line too, no more
    assert restored.stdout and everything.endswith(restored.stdout) and len(restored.stdout) < len(source)


@pytest.mark.kvm
def test_run_snapshot_on_exit_saves_where_the_timeout_stopped_it(tmp_path):
    from pykvm.images import guest_image

    path = tmp_path / "vm.snap"
    source = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest_image("counter")), "--timeout", "0.2",
                             "--snapshot-on", "exit", str(path)], capture_output=True, timeout=120)
    assert source.returncode == 74, source.stderr.decode()  # the timeout's status, as without a snapshot
    assert b"ran past the 0.2 s timeout" in source.stderr
    doc = json.loads(subprocess.run([sys.executable, "-m", "pykvm", "restore", str(path), "--json"],
                                    capture_output=True, timeout=120).stdout)
    assert doc["status"] == 0 and doc["result"] == "done"
    everything = "".join(f"count {n:08x}\n" for n in range(1, 201))
    assert source.stdout and len(source.stdout) < len(everything)
    assert source.stdout.decode() + doc["console"] == everything  # not a byte lost or repeated, mid-line too


def test_snapshot_on_refuses_what_it_cannot_catch():
    from pykvm.snapcli import parse_snapshot_on

    assert parse_snapshot_on("usr1", "f").signum == signal.SIGUSR1
    assert parse_snapshot_on("SIGHUP", "f").signum == signal.SIGHUP
    assert parse_snapshot_on("exit", "f").signum is None
    for bad in ("KILL", "STOP", "nonsense"):
        with pytest.raises(ValueError, match="not a signal pykvm can catch"):
            parse_snapshot_on(bad, "f")


def test_restore_of_a_bad_file_is_one_line_and_status_64(tmp_path):
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot at all")
    for name, message in (("junk.snap", "not a pykvm snapshot"), ("missing.snap", "cannot open")):
        proc = subprocess.run([sys.executable, "-m", "pykvm", "restore", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 64 and proc.stderr.count("\n") == 1 and message in proc.stderr


RESTORE_TIMER = textwrap.dedent("""
    import json, sys
    from pykvm.machine import Machine
    m = Machine.from_snapshot(sys.argv[1])
    outcome = m.run(timeout=60)
    json.dump({"status": outcome.status, "syncs": m.syncs}, open(sys.argv[2], "w"))
""")


@pytest.mark.kvm
def test_a_running_pit_and_the_in_kernel_irqchip_go_on_after_a_restore(guest, tmp_path):
    """guests/timer.S paused 20 ms in, halted between PIT ticks (5 at 100 Hz before it reports):
    restored in another process, the ticks keep coming through the restored PIC/IOAPIC/PIT/LAPIC
    state and the guest counts the rest of them to DONE. (Without the VM section put back, the
    new VM's PIT is not programmed and the guest waits for ever: seen by hand.)"""
    import threading

    path = tmp_path / "timer.snap"
    with Machine(irqchip=True) as m:
        m.load_flat(guest("timer"), "long")
        threading.Timer(0.02, m.pause).start()
        assert isinstance(m.run(timeout=60), Paused)
        assert m.syncs == []  # it has not counted its 5 ticks yet
        m.snapshot(path)
    doc = snapshot.read(path)
    assert set(doc.sections["vm"]["irqchips"]) == {"0", "1", "2"} and doc.sections["vm"]["pit"]
    assert "lapic" in doc.sections["vcpu0"]["structs"]
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", RESTORE_TIMER, str(path), str(result)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(result.read_text())
    assert out["status"] == 0 and out["syncs"][0] in (0x30, 0x32) and out["syncs"][1] >= 5  # vector, then ticks


@pytest.mark.kvm
def test_the_xsave_area_comes_back_whole_and_a_larger_one_is_refused(guest, tmp_path):
    """The XSAVE area is saved as KVM_GET_XSAVE2 gives it where KVM_CAP_XSAVE2 is offered (its
    whole size); XMM3 and XMM15, loaded by the guest before the exit the snapshot is taken at,
    still hold their values when a restored machine goes on (guests/xmm_keep.S checks them)."""
    path = tmp_path / "x.snap"
    with Machine() as m:
        m.load_flat(guest("xmm_keep"), "long")
        _pause_at(m, b"x")
        assert isinstance(m.run(timeout=60), Paused)
        m.snapshot(path)
        size = snapshot.xsave_size(m.vm)
    saved = snapshot.read(path).sections["vcpu0"]["structs"]["xsave"]
    assert len(saved) == 2 * size and size >= 4096
    with Machine.from_snapshot(path) as m2:
        outcome = m2.run(timeout=60)
        assert outcome.ok, outcome.failure
    with pytest.raises(SnapshotError, match="the saved XSAVE area is 8192 bytes; this host's KVM takes 4096"):
        snapshot._xsave_from_hex("00" * 8192, 4096, "vcpu0.xsave")


QEMU_PC_RESTORE = textwrap.dedent("""
    import hashlib, json, sys
    from pykvm.machine import Machine
    m = Machine.from_snapshot(sys.argv[1], console=sys.stdout.buffer)
    outcome = m.run(timeout=120)
    digests = [hashlib.sha256(m.memory.read(gpa, 4096)).hexdigest() for gpa in range(0, m.ram.size, 4096)]
    json.dump({"after": digests, "status": outcome.status, "via": outcome.via,
               "devices": [type(d).__name__ for d in m._devices], "functions": sorted(m.pci._functions)},
              open(sys.argv[2], "w"))
""")


@pytest.mark.kvm
def test_a_guest_on_qemus_pc_is_restored_with_its_pci_bus_and_devices(guest, tmp_path):
    """A machine built with add_qemu_pc (PCI host with a pci-testdev, ACPI PM, RTC, fw_cfg, i8042,
    isa-debug-exit, isa-debugcon) is snapshotted mid-run and goes on in another process; the
    counter's DONE lands on an isa-debug-exit put at pykvm's call port."""
    path = tmp_path / "pc.snap"
    with Machine(irqchip=True, strict=False) as m:
        m.add_qemu_pc(False, debug_exits=((0xEA, 4),), debugcons=((0xE9, None),), pci_testdevs=1)
        m.load_flat(guest("counter"), "long")
        _pause_at(m, b"count 00000010\n")
        assert isinstance(m.run(timeout=120), Paused)
        m.snapshot(path)
        m.after_exit = None
        end = m.run(timeout=120)
        assert end.via == "isa-debug-exit" and end.status == 3  # DONE's call number 1: (1 << 1) | 1
        source_out, source_end, devices = m.debugcon.captured, _digests(m), [type(d).__name__ for d in m._devices]
        functions = sorted(m.pci._functions)
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", QEMU_PC_RESTORE, str(path), str(result)], capture_output=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(result.read_text())
    assert (doc["via"], doc["status"]) == ("isa-debug-exit", 3)
    assert doc["devices"] == devices and doc["functions"] == functions and len(functions) >= 2  # the testdev among them
    assert proc.stdout == source_out[source_out.index(b"count 00000011") :]
    assert doc["after"] == source_end


@pytest.mark.kvm
def test_a_machine_with_the_split_irqchip_comes_back_with_its_python_ioapic(guest, tmp_path):
    """irqchip="split": the local APICs in the kernel, the IOAPIC in Python (a device model that
    saves its redirection table); a guest restored in another process goes on to the same end."""
    path = tmp_path / "split.snap"
    with Machine(irqchip="split") as m:
        m.load_flat(guest("counter"), "long")
        entry = m.ioapic.save()
        # a programmed redirection entry, as a guest leaves it, must come back as it was
        m.ioapic.write_indexed(0x10 + 2 * 4, 0x00010031)  # pin 4, low half: vector 0x31, masked
        _pause_at(m, b"count 00000010\n")
        assert isinstance(m.run(timeout=120), Paused)
        saved_ioapic = m.ioapic.save()
        assert saved_ioapic != entry
        m.snapshot(path)
        m.after_exit = None
        assert m.run(timeout=120).ok
        source_out, source_end = m.debugcon.captured, _digests(m)
    sections = snapshot.read(path).sections
    assert sections["vm"]["irqchips"] == {} and "lapic" in sections["vcpu0"]["structs"]
    assert [d["type"] for d in sections["devices"]["devices"]][:2] == ["DebugConsole", "Ioapic"]
    assert sections["devices"]["devices"][1]["state"] == saved_ioapic
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(path), str(result)], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(result.read_text())
    assert doc["status"] == 0 and doc["after"] == source_end
    assert proc.stdout == source_out[source_out.index(b"count 00000011") :]
