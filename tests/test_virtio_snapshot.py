"""Snapshots, restore and live migration of machines with virtio devices (VirtioMmio.save/restore,
the virtio parts of a machine's recipe, pykvm.snapshot.build_machine).

The workload is the virtio test kernel's ``soak=N`` (guests/virtio/soak.c): N rounds, each a
checked write and read-back of one disk sector and a line on the virtio-console, the round's line
on the debug console. The kernel checks every request (status, used length, the head returned),
so a request lost or done twice around the snapshot makes it FAIL. The machine is paused mid-way,
snapshotted, and restored in another process on a copy of its disk image as it was at the
snapshot (a snapshot does not hold disk contents): the rounds go on from there to the end, the
outputs have nothing repeated or lost, and the disk ends as an uninterrupted run leaves it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pykvm import exits
from pykvm.machine import Machine, Paused
from pykvm.snapshot import SnapshotError

pytestmark = pytest.mark.kvm

MEM = 32 << 20
SECTOR = 512
DISK_SECTORS = 64
ROUNDS = 200
FIRST, SPAN = 8, 40  # soak.c: round r writes sector FIRST + r % SPAN


def soak_pattern(r: int, s: int) -> bytes:
    return bytes((s * 37 + i * 3 + r * 11 + 0x5A) & 0xFF for i in range(SECTOR))


def soak_image(before: bytes, rounds: int = ROUNDS) -> bytes:
    """The disk after `rounds` rounds, computed: each sector holds its last round's pattern."""
    image = bytearray(before)
    for r in range(rounds):
        s = FIRST + r % SPAN
        image[s * SECTOR:(s + 1) * SECTOR] = soak_pattern(r, s)
    return bytes(image)


def soak_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("soak: round ")]


@pytest.fixture
def disk(tmp_path):
    """A 64-sector image of random bytes; returns (path, its bytes)."""
    image = os.urandom(DISK_SECTORS * SECTOR)
    path = tmp_path / "disk.img"
    path.write_bytes(image)
    return path, image


def soak_machine(virtio_kernel, image, words: str = f"soak={ROUNDS}", console: bool = True) -> Machine:
    from pykvm.virtio.blk import VirtioBlk
    from pykvm.virtio.console import VirtioConsole

    path, data = virtio_kernel
    m = Machine(MEM, irqchip=True)
    try:
        transports = [m.add_virtio(VirtioBlk(image))]
        if console:
            transports.append(m.add_virtio(VirtioConsole()))
        m.load_kernel(data, path=path, cmdline=" ".join([*(t.cmdline_arg for t in transports), words]))
    except BaseException:
        m.close()
        raise
    return m


_reference: dict = {}


def reference(virtio_kernel, tmp_path, before: bytes) -> dict:
    """An uninterrupted run on a copy of the disk: its debug console text, virtio-console output
    and the image it leaves."""
    image = tmp_path / "reference.img"
    image.write_bytes(before)
    with soak_machine(virtio_kernel, image) as m:
        outcome = m.run(timeout=120)
        text = m.console_output.decode()
        console = m.virtio[1].device.captured
    assert outcome.status == 0 and outcome.failure is None and "virtio: all done\n" in text, text
    after = image.read_bytes()
    assert after == soak_image(before)  # the workload is what soak.c says
    return {"text": text, "console": console, "image": after}


RESTORE = textwrap.dedent("""
    import json, sys
    from pykvm.machine import Machine
    m = Machine.from_snapshot(sys.argv[1])
    with m:
        recipe = m.recipe["platform"]
        outcome = m.run(timeout=120)
        json.dump({"status": outcome.status, "failure": str(outcome.failure) if outcome.failure else None,
                   "text": m.console_output.decode(), "console": m.virtio[1].device.captured.decode(),
                   "console_total": m.virtio[1].device.output.capture.total, "recipe": recipe,
                   "stats": [dict(t.stats) for t in m.virtio]}, open(sys.argv[2], "w"))
""")


def restore_elsewhere(snap, result) -> dict:
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(snap), str(result)], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(result.read_text())


def pause_after_line(m: Machine, line: bytes):
    def after(exit, vcpu):
        if m.debugcon.captured.endswith(line):
            m.pause()

    m.after_exit = after


def pause_after_notifies(m: Machine, n: int):
    """At the first exit after the disk's transport has seen n notifies (ioeventfd): the request
    may still be in the worker's hands, or its interrupt on the way."""

    def after(exit, vcpu):
        if m.virtio[0].stats["notifies (ioeventfd)"] >= n:
            m.pause()

    m.after_exit = after


def pause_at_interrupt_status_read(m: Machine, n: int):
    """At the n-th read of the disk's InterruptStatus: the guest's interrupt handler is running."""
    seen = [0]
    gpa = m.virtio[0].gpa + 0x60

    def after(exit, vcpu):
        if isinstance(exit, exits.MmioRead) and exit.gpa == gpa:
            seen[0] += 1
            if seen[0] == n:
                m.pause()

    m.after_exit = after


PAUSES = {
    "after-round-57": lambda m: pause_after_line(m, b"soak: round 57 sector 25 ok\n"),
    "after-150-notifies": lambda m: pause_after_notifies(m, 150),
    "in-the-interrupt-handler": lambda m: pause_at_interrupt_status_read(m, 120),
}


def source_goes_on(m: Machine, path, at_snapshot, ref: dict) -> tuple[str, bytes]:
    """Right after ``m.snapshot()``: the disk is copied to ``at_snapshot`` as the snapshot's guest
    left it, then the source goes on too (its parked workers wake when the vCPUs run) to the
    uninterrupted run's end. Returns the debug console text and the virtio-console output at the
    snapshot."""
    shutil.copyfile(path, at_snapshot)
    source_text, source_console = m.console_output.decode(), m.virtio[1].device.captured
    done = len(soak_lines(source_text))
    assert 0 < done < ROUNDS - 20, source_text  # mid-way
    outcome = m.run(timeout=120)
    assert outcome.status == 0 and outcome.failure is None, m.console_output.decode()
    assert soak_lines(m.console_output.decode()) == soak_lines(ref["text"])
    assert m.virtio[1].device.captured == ref["console"]
    return source_text, source_console


def restored_goes_on(snap, path, at_snapshot, ref: dict, source_text: str, source_console: bytes, tmp_path) -> None:
    """With the source's machine closed: its disk is the uninterrupted run's; then the snapshot,
    restored in another process on the disk as it was at the snapshot, goes on to the same end."""
    assert path.read_bytes() == ref["image"]
    shutil.copyfile(at_snapshot, path)  # the restore opens the same path: the image as it was at the snapshot
    there = restore_elsewhere(snap, tmp_path / "result.json")
    assert there["status"] == 0 and there["failure"] is None, there["text"]
    assert "FAIL" not in there["text"] and f"soak: {ROUNDS} rounds done\n" in there["text"]
    assert "virtio: all done\n" in there["text"]
    # the rounds go on from the next one: nothing repeated, nothing lost
    assert soak_lines(source_text) + soak_lines(there["text"]) == soak_lines(ref["text"])
    # the virtio-console's output too, and it counts on from where the source's stood
    assert source_console + there["console"].encode() == ref["console"]
    assert there["console_total"] == len(ref["console"])
    # every request the driver made after the restore reached the disk, once
    assert path.read_bytes() == ref["image"]
    assert [p[0] for p in there["recipe"]] == ["virtio", "virtio"]
    blk_notifies = there["stats"][0].get("notifies (ioeventfd)", 0)
    assert blk_notifies > 0 and there["stats"][0].get("notifies (trapped)", 0) == 0


@pytest.mark.parametrize("where", list(PAUSES))
def test_a_soaking_guest_restored_in_another_process_goes_on_to_the_same_end(virtio_kernel, disk, tmp_path, where):
    path, before = disk
    ref = reference(virtio_kernel, tmp_path, before)
    snap, at_snapshot = tmp_path / "soak.snap", tmp_path / "at-snapshot.img"
    with soak_machine(virtio_kernel, path) as m:
        PAUSES[where](m)
        assert isinstance(m.run(timeout=120), Paused)
        m.after_exit = None
        m.snapshot(snap)
        at_the_snapshot = source_goes_on(m, path, at_snapshot, ref)
    restored_goes_on(snap, path, at_snapshot, ref, *at_the_snapshot, tmp_path)


def test_a_snapshot_waits_for_the_request_the_worker_holds_and_both_copies_go_on_to_the_same_end(
        virtio_kernel, disk, tmp_path):
    """The disk's worker is held inside a write (its pwritev, the 60th) when the vCPUs are paused:
    the run returns with that request still in the worker's hands, the snapshot waits for it
    (VirtioMmio.quiesce) and holds its completion, and the source and a restore elsewhere both go
    on to the uninterrupted run's end, each request reaching the disk once."""
    path, before = disk
    ref = reference(virtio_kernel, tmp_path, before)
    snap, at_snapshot = tmp_path / "soak.snap", tmp_path / "at-snapshot.img"
    held, release = threading.Event(), threading.Event()
    with soak_machine(virtio_kernel, path) as m:
        blk = m.virtio[0].device
        real_write, writes, holder = blk._write, [0], []

        def write(*args):
            writes[0] += 1
            if writes[0] == 60:
                holder.append(threading.current_thread().name)
                held.set()
                assert release.wait(60)
            return real_write(*args)

        blk._write = write  # an instance attribute: the recipe and the saved state stay VirtioBlk's
        box: dict = {}
        runner = threading.Thread(target=lambda: box.update(outcome=m.run(timeout=120)))
        runner.start()
        assert held.wait(60), "the guest never made 60 writes"
        m.pause()
        runner.join(30)
        assert not runner.is_alive() and isinstance(box["outcome"], Paused)  # vCPUs stopped, the write held
        assert holder == [f"virtio-blk@{m.virtio[0].gpa:#x}"] and not release.is_set()  # the worker thread
        saving = threading.Thread(target=lambda: box.update(saved=m.snapshot(snap)))
        saving.start()
        saving.join(0.5)
        assert saving.is_alive() and "saved" not in box  # it waits for the request in hand
        release.set()
        saving.join(60)
        assert "saved" in box
        at_the_snapshot = source_goes_on(m, path, at_snapshot, ref)  # that write is in both
    restored_goes_on(snap, path, at_snapshot, ref, *at_the_snapshot, tmp_path)


def test_a_disk_image_of_another_size_is_refused_with_the_reason(virtio_kernel, disk, tmp_path):
    path, before = disk
    snap = tmp_path / "soak.snap"
    with soak_machine(virtio_kernel, path) as m:
        pause_after_line(m, b"soak: round 3 sector 11 ok\n")
        assert isinstance(m.run(timeout=120), Paused)
        m.snapshot(snap)
    with open(path, "ab") as f:
        f.write(bytes(SECTOR))
    with pytest.raises(SnapshotError, match=rf"disk image {re.escape(str(path))} is {(DISK_SECTORS + 1) * SECTOR} bytes; "
                                            rf"the saved machine's was {DISK_SECTORS * SECTOR} \(a snapshot does not hold"):
        Machine.from_snapshot(snap)
    os.unlink(path)
    with pytest.raises(SnapshotError, match="virtio blk: disk image .* no such file"):
        Machine.from_snapshot(snap)


def test_backends_that_are_not_data_keep_the_machine_from_being_snapshotted(virtio_kernel, tmp_path):
    from pykvm.virtio.console import VirtioConsole
    from pykvm.virtio.rng import VirtioRng

    read_end, write_end = os.pipe()
    try:
        with Machine(MEM, irqchip=True) as m:
            m.add_virtio(VirtioRng())
            m.add_virtio(VirtioConsole(input=read_end))  # a host fd is not data
            assert m.recipe["platform"] == [["virtio", {"type": "rng"}], ["virtio", None]]
            with pytest.raises(SnapshotError, match="its virtio part does not say what its state is"):
                m.snapshot(tmp_path / "x.snap")
        with Machine(MEM, irqchip=True) as m:
            m.add_virtio(VirtioRng(lambda n: bytes(n)))  # a function is not data
            with pytest.raises(SnapshotError, match="its virtio part does not say"):
                m.snapshot(tmp_path / "x.snap")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert not (tmp_path / "x.snap").exists()


def test_an_idle_machine_with_every_describable_backend_round_trips_its_recipe(virtio_kernel, disk, tmp_path):
    """blk, console and rng, never started: the restored machine has the same parts in the same
    slots, and saves the same transport state again."""
    from pykvm import snapshot
    from pykvm.virtio.blk import VirtioBlk
    from pykvm.virtio.console import VirtioConsole
    from pykvm.virtio.rng import VirtioRng

    path, _ = disk
    snap = tmp_path / "idle.snap"
    with Machine(MEM, irqchip=True) as m:
        for backend in (VirtioBlk(path, readonly=True), VirtioConsole(), VirtioRng()):
            m.add_virtio(backend)
        m.snapshot(snap)
        recipe = m.recipe
        states = [t.save() for t in m.virtio]
    with Machine.from_snapshot(snap) as r:
        assert r.recipe == recipe
        assert [(t.gpa, t.irq, t.device.name) for t in r.virtio] == [(0xD0000000, 5, "blk"), (0xD0001000, 6, "console"),
                                                                     (0xD0002000, 7, "rng")]
        assert r.virtio[0].device.readonly and r.virtio[0].device.path == str(path)
        assert [t.save() for t in r.virtio] == states
    assert snapshot.read(snap).header["recipe"]["platform"][0][1]["sectors"] == DISK_SECTORS


DEST = textwrap.dedent("""
    import json, sys
    from pykvm.migration import Incoming, MigrationError
    with Incoming(sys.argv[1]) as incoming:
        print(incoming.address, flush=True)
        m, info = incoming.accept(timeout=30, wait=60)
    with m:
        outcome = m.run(timeout=120)
        json.dump({"info": info, "status": outcome.status, "failure": str(outcome.failure) if outcome.failure else None,
                   "text": m.console_output.decode(), "console": m.virtio[1].device.captured.decode()},
                  open(sys.argv[2], "w"))
""")


def test_a_soaking_guest_migrates_mid_run_and_goes_on_to_the_same_end(virtio_kernel, disk, tmp_path):
    """Live migration to another process on the same host: the destination opens the same image
    (the guest's writes so far are in it), the dirty pages the virtio worker wrote (used rings, the
    read-back buffers) go with the guest's own, and the rounds go on with nothing lost."""
    from pykvm.migration import migrate

    path, before = disk
    ref = reference(virtio_kernel, tmp_path, before)
    result = tmp_path / "dest.json"
    dest = subprocess.Popen([sys.executable, "-c", DEST, f"unix:{tmp_path}/dest.sock", str(result)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        address = dest.stdout.readline().decode().strip()
        assert address.startswith("unix:"), dest.stderr.read().decode()
        with soak_machine(virtio_kernel, path, words=f"soak={ROUNDS * 2}") as m:
            m.after_exit = lambda exit, vcpu: m.sleep(0.002)  # slowed, so that the move falls mid-run
            box: dict = {}
            thread = threading.Thread(target=lambda: box.setdefault("outcome", m.run(timeout=180)))
            thread.start()
            deadline = time.monotonic() + 60
            while b"soak: round 40 " not in m.console_output:
                assert time.monotonic() < deadline and thread.is_alive(), m.console_output.decode()
                time.sleep(0.005)
            report = migrate(m, address, downtime=0.02)
            thread.join(60)
            assert box["outcome"].via == "migrated", box
            here, here_console = m.console_output.decode(), m.virtio[1].device.captured
        _, err = dest.communicate(timeout=300)
        assert dest.returncode == 0, err.decode()
    finally:
        dest.kill()
        dest.wait()
    there = json.loads(result.read_text())
    assert there["status"] == 0 and there["failure"] is None, there["text"]
    assert "FAIL" not in there["text"] and f"soak: {ROUNDS * 2} rounds done\n" in there["text"]
    expected = [f"soak: round {r} sector {FIRST + r % SPAN} ok" for r in range(ROUNDS * 2)]
    assert 40 <= len(soak_lines(here)) < ROUNDS * 2 - 20
    assert soak_lines(here) + soak_lines(there["text"]) == expected
    assert here_console + there["console"].encode() == b"".join(
        b"soak %d sector %d\n" % (r, FIRST + r % SPAN) for r in range(ROUNDS * 2))
    assert path.read_bytes() == soak_image(before, ROUNDS * 2)
    assert report.final is not None and report.rounds


# ---- the transport and the queues alone (no VM: the rings in a bare GuestMemory) -------------------
def test_the_device_s_writes_into_guest_memory_are_marked_for_dirty_tracking():
    """KVM's dirty log sees only the guest's writes: the buffers a chain's device filled and the used
    ring are marked in GuestMemory.written when the chain goes back (a migration sends them again)."""
    from virtio_driver import Ring, bare_memory, close_memory

    from pykvm.virtio.queue import Virtqueue

    memory = bare_memory()
    try:
        ring = Ring(memory, 0, 8, 0x1000)
        q = Virtqueue(memory, 0, 8)
        q.size, q.desc_addr, q.driver_addr, q.device_addr = 8, ring.desc, ring.avail, ring.used
        q.enable()
        ring.offer(ring.chain([(0x20000, 16, False), (0x30FF0, 0x20, True)]))
        memory.written = set()
        chain = q.pop()
        chain.write(0, b"x" * 0x20)
        assert memory.written == set()  # marked once written and returned, not before
        q.push(chain.head, 0x20)
        assert memory.written == {0x30, 0x31, ring.used >> 12}  # both pages of the buffer, the used ring
        assert 0x20 not in memory.written  # the readable buffer: the device did not write it
    finally:
        memory.written = None
        close_memory(memory)


def test_a_notify_pending_at_the_save_is_served_and_a_restored_transport_serves_what_is_pending_once_it_runs():
    from virtio_driver import GPA, bare_memory, close_memory, kick, start

    from pykvm.virtio.mmio import VirtioMmio
    from pykvm.virtio.rng import VirtioRng

    memory = bare_memory()
    try:
        source = VirtioMmio(VirtioRng(lambda n: b"\xaa" * n), memory, GPA)
        (ring,) = start(source, memory)
        ring.offer(ring.chain([(0x20000, 8, True)]))
        kick(source, 0)  # notified; the worker may or may not have it yet
        state = source.save()  # quiesces: served before the state is taken
        assert state["queues"][0]["used_idx"] == 1 and ring.used_idx == 1
        assert memory.read(0x20000, 8) == b"\xaa" * 8
        source.close()

        # the guest offers another buffer and is stopped before its notify: the restored device
        # serves it once it runs, not before (its interrupt would land before the irqchip's state)
        ring.offer(ring.chain([(0x21000, 8, True)], first=1))
        running = threading.Event()
        dest = VirtioMmio(VirtioRng(lambda n: b"\xbb" * n), memory, GPA)
        dest.resume_when = running.is_set
        dest.restore(state)
        assert dest.save()["queues"][0] == state["queues"][0]
        time.sleep(0.1)
        assert ring.used_idx == 1  # parked
        running.set()
        deadline = time.monotonic() + 5
        while ring.used_idx != 2:
            assert time.monotonic() < deadline, "the restored transport never served the pending buffer"
            time.sleep(0.005)
        assert memory.read(0x21000, 8) == b"\xbb" * 8 and dest.queues[0].last_avail == 2
        dest.close()
    finally:
        close_memory(memory)


# ---- virtio-net: in a private network namespace, as tests/test_virtio_net.py runs it --------------------
NET_RESTORE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from test_virtio_net import bring_up
    from pykvm.machine import Machine
    with Machine.from_snapshot(sys.argv[1]) as m:  # opens the TAP by its name again
        bring_up()
        outcome = m.run(timeout=120)
        json.dump({"status": outcome.status, "text": m.console_output.decode(), "recipe": m.recipe["platform"],
                   "net": dict(m.virtio[0].device.stats)}, open(sys.argv[2], "w"))
""")


def _net_snapshot_and_restore(kernel_path: str, tmp: str):
    from test_virtio_net import GUEST_IP, GUEST_MAC, HOST_IP, TAP, bring_up

    from pykvm.virtio.net import VirtioNet

    snap, result = os.path.join(tmp, "net.snap"), os.path.join(tmp, "net.json")
    with Machine(MEM, irqchip=True) as m:
        t = m.add_virtio(VirtioNet(TAP, mac=GUEST_MAC))
        bring_up()
        with open(kernel_path, "rb") as f:
            m.load_kernel(f.read(), path=kernel_path, cmdline=f"{t.cmdline_arg} net={HOST_IP}/{GUEST_IP}")
        def after(exit, vcpu):
            if b"net: mac " in m.console_output:
                m.pause()

        m.after_exit = after
        paused = isinstance(m.run(timeout=120), Paused)
        m.snapshot(snap)
        recipe = m.recipe["platform"]
        here = m.console_output.decode()
    # the source is gone, and its TAP with it: the restore makes it again
    proc = subprocess.run([sys.executable, "-c", NET_RESTORE, snap, result, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    with open(result) as f:
        there = json.load(f)
    return paused, recipe, here, there["status"], there["text"], there["recipe"], there["net"]


def test_a_virtio_net_machine_snapshotted_after_probing_gets_its_arp_reply_after_the_restore(virtio_kernel, tmp_path):
    import test_virtio_net

    if test_virtio_net.NETNS_REASON is not None:
        pytest.skip(test_virtio_net.NETNS_REASON)
    paused, recipe, here, status, text, recipe_there, net = test_virtio_net.in_netns(
        _net_snapshot_and_restore, virtio_kernel[0], str(tmp_path), timeout=240)
    assert paused and "net: mac 52:54:00:12:34:56, link up" in here and "arp reply" not in here
    assert recipe == recipe_there == [["virtio", {"type": "net", "tap": "pykvmtap0", "mac": "52:54:00:12:34:56"}]]
    assert status == 0 and "FAIL" not in text, text
    assert "net: arp reply from " in text and "virtio: all done\n" in text, text
    assert net["tx frames"] >= 1 and net["rx frames"] >= 1, net
