"""Live migration (pykvm/migration.py), Machine.request, and the control socket (pykvm/control.py):
a counting guest moved between two pykvm processes while it runs, going on with nothing lost,
through the dirty bitmap and the dirty ring; a migration that fails (a dropped connection, a
destination that refuses) leaves the source running, unharmed."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pykvm import migration
from pykvm.images import guest_image
from pykvm.ioctl import KvmUnsupportedError
from pykvm.machine import Machine, Paused
from pykvm.migration import Incoming, MigrationError, migrate
from pykvm.outcome import Outcome
from pykvm.x86 import layout

pytestmark = pytest.mark.kvm

MEM = 32 << 20
ROUNDS = 600  # counter.S rounds (RBX): about 1.5 s on kvm_pvm, long enough to migrate mid-run
PYKVM = [sys.executable, "-m", "pykvm"]


def _counter(mem: int = MEM, rounds: int = ROUNDS, **kwargs) -> Machine:
    m = Machine(mem, **kwargs)
    m.load_flat(guest_image("counter").read_bytes(), "long")
    regs = m.vcpu.get_regs()
    regs.rbx = rounds
    m.vcpu.set_regs(regs)
    return m


def _expected(rounds: int = ROUNDS) -> bytes:
    return b"".join(b"count %08x\n" % n for n in range(1, rounds + 1))


_reference: dict = {}


def _reference_ram(rounds: int = ROUNDS, mem: int = MEM) -> str:
    """The digest of the RAM an uninterrupted run of the counter leaves."""
    key = (rounds, mem)
    if key not in _reference:
        with _counter(mem, rounds) as m:
            assert m.run(timeout=120).ok
            assert m.console_output == _expected(rounds)
            _reference[key] = hashlib.sha256(m.ram._map[:]).hexdigest()
    return _reference[key]


DEST = textwrap.dedent("""
    import hashlib, json, sys
    from pykvm.migration import Incoming, MigrationError
    with Incoming(sys.argv[1]) as incoming:
        print(incoming.address, flush=True)
        try:
            m, info = incoming.accept(max_mem=int(sys.argv[3]) or None, timeout=30, wait=60)
        except MigrationError as e:
            json.dump({"error": str(e)}, open(sys.argv[2], "w"))
            sys.exit(0)
    with m:
        arrived = hashlib.sha256(m.ram._map[:]).hexdigest()
        if len(sys.argv) > 4:  # guests/dirty_rate.S: its pacing port answered, and told to stop at once
            from pykvm.x86.layout import BENCH_PORT
            m.on_port(BENCH_PORT, lambda exit, vcpu: None, count=4, name="pacer")
            m.memory.write_u64(int(sys.argv[4]), 1)
        outcome = m.run(timeout=120)
        json.dump({"info": info, "status": outcome.status, "console": m.console_output.decode(),
                   "ram": hashlib.sha256(m.ram._map[:]).hexdigest(), "arrived": arrived,
                   "r10": m.vcpu.get_regs().r10}, open(sys.argv[2], "w"))
""")


class _Destination:
    """A pykvm destination in another process, listening on a UNIX socket."""

    def __init__(self, tmp_path, max_mem: int = 0, stop_flag: int | None = None) -> None:
        self.result = tmp_path / "dest.json"
        extra = [] if stop_flag is None else [str(stop_flag)]
        self.proc = subprocess.Popen([sys.executable, "-c", DEST, f"unix:{tmp_path}/dest.sock", str(self.result),
                                      str(max_mem), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.address = self.proc.stdout.readline().decode().strip()
        assert self.address.startswith("unix:"), self.proc.stderr.read().decode()

    def wait(self) -> dict:
        _, err = self.proc.communicate(timeout=180)
        assert self.proc.returncode == 0, err.decode()
        return json.loads(self.result.read_text())


def _run_in_thread(m: Machine) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["outcome"] = m.run(timeout=120)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def _wait_for(m: Machine, text: bytes) -> None:
    deadline = time.monotonic() + 60
    while text not in m.console_output:
        assert time.monotonic() < deadline, f"the guest never printed {text!r}"
        time.sleep(0.002)


def _machine_or_skip(dirty: str, **kwargs) -> Machine:
    try:
        return _counter(dirty=dirty, **kwargs)
    except KvmUnsupportedError as e:  # no dirty ring here, or kvm_pvm's, which loses pages
        pytest.skip(str(e))


# ---- a running guest moved to another process ------------------------------------------------------

@pytest.mark.parametrize("dirty,irqchip", [("bitmap", False), ("ring", False), ("bitmap", True)],
                         ids=["bitmap", "ring", "bitmap-irqchip"])
def test_a_counting_guest_moves_to_another_process_and_goes_on_with_nothing_lost(tmp_path, dirty, irqchip):
    reference = _reference_ram()
    with _machine_or_skip(dirty, irqchip=irqchip) as m:
        dest = _Destination(tmp_path)
        thread, box = _run_in_thread(m)
        _wait_for(m, b"count 00000020\n")
        report = migrate(m, dest.address, downtime=0.02)
        thread.join(60)
        assert "error" not in box, box.get("error")
        outcome = box["outcome"]
        assert outcome.via == "migrated" and outcome.to == dest.address and outcome.status == 0
        here = m.console_output
        with pytest.raises(MigrationError, match="has moved to"):
            migrate(m, dest.address)
    there = dest.wait()
    assert there["status"] == 0
    # the count goes on where the source stopped: nothing repeated, nothing lost
    assert here + there["console"].encode() == _expected()
    assert b"count 00000020\n" in here and len(there["console"]) > 0
    assert there["ram"] == reference  # every page as an uninterrupted run leaves it
    assert report.dirty == dirty
    assert report.rounds and report.final is not None
    assert report.rounds[0].pages >= 512  # at least the counter's pattern, which is not zero
    assert 0 < report.downtime < report.seconds
    assert report.bytes >= report.pages * migration.PAGE
    assert there["info"]["pages"] == report.pages


def test_two_vcpus_move_mid_count_and_each_count_goes_on(tmp_path):
    """guests/smp_counter.S (two vCPUs, each counting over its own region) moved while both count:
    each vCPU's sequence goes on at the destination with nothing repeated or lost, and the memory
    at the end is an uninterrupted run's. The source is slowed after each exit (Machine.sleep,
    which a stop for the migration cuts short), to a crawl once the migration starts, so that the
    move falls mid-count however slow the backend's migration is (kvm_amd under TCG)."""
    image = guest_image("smp_counter").read_bytes()
    with Machine(MEM, cpus=2, irqchip=True) as ref:
        ref.load_flat(image, "long")
        assert ref.run(timeout=60).ok
        reference = hashlib.sha256(ref.ram._map[:]).hexdigest()
    with Machine(MEM, cpus=2, irqchip=True) as m:
        m.load_flat(image, "long")
        moving = threading.Event()
        m.after_exit = lambda exit, vcpu: m.sleep(0.5 if moving.is_set() else 0.004)
        dest = _Destination(tmp_path)
        thread, box = _run_in_thread(m)
        _wait_for(m, b"cpu1 count 00000005\n")
        moving.set()
        report = migrate(m, dest.address, downtime=0.02)
        thread.join(60)
        assert "error" not in box, box.get("error")
        assert box["outcome"].via == "migrated"
        here = m.console_output.decode()
    there = dest.wait()
    assert there["status"] == 0 and there["ram"] == reference
    lines = (here + there["console"]).splitlines()
    for cpu in (0, 1):
        counts = [line for line in lines if line.startswith(f"cpu{cpu} count ")]
        assert counts == [f"cpu{cpu} count {n:08x}" for n in range(1, 101)], cpu
    for cpu in (0, 1):  # each vCPU was moved mid-count: its count ends at the destination
        assert f"cpu{cpu} count 00000064" not in here and f"cpu{cpu} count 00000064" in there["console"]
    assert lines[-1] == "bsp: both done"
    assert report.final is not None


def test_a_guest_that_outruns_the_budget_is_stopped_after_max_rounds_and_still_loses_nothing(tmp_path):
    with _counter() as m:
        dest = _Destination(tmp_path)
        thread, box = _run_in_thread(m)
        _wait_for(m, b"count 00000020\n")
        report = migrate(m, dest.address, downtime=1e-6, max_rounds=2)  # no set of pages fits a microsecond
        thread.join(60)
        here = m.console_output
    there = dest.wait()
    assert not report.converged and len(report.rounds) == 2 and report.final.pages > 0
    assert "not met" in report.summary()
    assert here + there["console"].encode() == _expected() and there["ram"] == _reference_ram()


DIRTY_BASE = 0x200000  # guests/dirty_rate.S: its region, and the stop flag in the quadword below it
DIRTY_STOP = DIRTY_BASE - 8


def test_a_guest_dirtying_at_cpl3_with_no_pacing_moves_with_its_memory_intact(tmp_path):
    """guests/dirty_rate.S at CPL3 (kvm_pvm runs it natively), unpaced, rewriting its 16 MiB
    region batch after batch while pre-copy runs: the source's RAM when its vCPU stopped is the
    RAM the destination got, and the guest goes on there in the same batch: the destination
    raises the guest's stop flag, so the guest ends its batch (if it was stopped mid-batch, by
    the migration's kick: its only exits are the pacing port's) and stops. Whether pre-copy kept up
    depends on the backend's speed: scripts/bench_migrate.py --rates max-cpl3 measures it."""
    region, batch = 4096, 1024
    with Machine(MEM) as m:
        m.load_flat(guest_image("dirty_rate").read_bytes(), "long")
        regs = m.vcpu.get_regs()
        regs.rcx, regs.r8, regs.rdx = batch, region, 1
        m.vcpu.set_regs(regs)
        batches = []
        m.on_port(layout.BENCH_PORT, lambda exit, vcpu: batches.append(exit.value), count=4, name="pacer")
        dest = _Destination(tmp_path, stop_flag=DIRTY_STOP)
        thread, box = _run_in_thread(m)
        deadline = time.monotonic() + 60
        while len(batches) < region // batch + 1:  # the whole region written once, and more
            assert time.monotonic() < deadline and thread.is_alive(), box
            time.sleep(0.001)
        report = migrate(m, dest.address, downtime=0.01, max_rounds=5)
        thread.join(60)
        assert box["outcome"].via == "migrated", box
        stopped_ram = hashlib.sha256(m.ram._map[:]).hexdigest()
        regs = m.vcpu.get_regs()
        assert m.vcpu.get_sregs().cs.selector & 3 == 3  # it was moved at CPL3
    there = dest.wait()
    print(report.summary())
    assert there["arrived"] == stopped_ram and there["status"] == 0
    assert there["r10"] == regs.r10 and regs.r10 - batches[-1] in (0, 1)  # its batch number went on
    assert len(report.rounds) >= 2 and report.rounds[1].pages > 0  # it dirtied pages while pre-copy ran
    assert report.final.pages > 0


def test_a_machine_between_runs_moves_too(tmp_path):
    with _counter() as m:
        m.after_exit = lambda exit, vcpu: m.pause() if m.console_output.endswith(b"count 00000005\n") else None
        assert isinstance(m.run(timeout=60), Paused)
        m.after_exit = None
        dest = _Destination(tmp_path)
        report = migrate(m, dest.address)
        assert report.converged and len(report.rounds) == 1 and report.final.pages == 0  # nothing ran since
        here = m.console_output
    there = dest.wait()
    assert here + there["console"].encode() == _expected() and there["ram"] == _reference_ram()


# ---- failures: the source runs on -------------------------------------------------------------------

def _fake_destination(tmp_path, behave):
    """A destination that speaks the protocol as ``behave(stream)`` says, then closes."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen: dict = {"tags": []}

    def serve():
        conn, _ = listener.accept()
        stream = migration._Stream(conn, "the source")
        try:
            behave(stream, seen)
        except MigrationError:
            pass
        finally:
            conn.close()
            listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"unix:{path}", seen


def _drop_after_pages(n):
    def behave(stream, seen):
        stream.receive_json("HELO")
        stream.send(b"OKAY")
        for _ in range(n):
            tag, _ = stream.receive()
            seen["tags"].append(tag)
    return behave


def _take_until_done(stream, seen):
    stream.receive_json("HELO")
    stream.send(b"OKAY")
    while True:
        tag, _ = stream.receive()
        seen["tags"].append(tag)
        if tag == b"DONE":
            return


def _drop_before_run(stream, seen):
    _take_until_done(stream, seen)  # and never says RUN!


def _refuse_state(stream, seen):
    _take_until_done(stream, seen)
    stream.send_json(b"FAIL", {"error": "no room for it"})


@pytest.mark.parametrize("behave,message", [
    (_drop_after_pages(2), "closed the connection|failed while sending PAGE"),
    (_drop_before_run, "closed the connection .waiting for the destination's word that it runs"),
    (_refuse_state, "could not take the state: no room for it"),
], ids=["mid-pre-copy", "after-the-state", "state-refused"])
def test_a_migration_that_fails_leaves_the_source_running_with_nothing_lost(tmp_path, behave, message):
    with _counter() as m:
        address, seen = _fake_destination(tmp_path, behave)
        thread, box = _run_in_thread(m)
        _wait_for(m, b"count 00000010\n")
        with pytest.raises(MigrationError, match=message):
            migrate(m, address, downtime=0.02, timeout=10)
        thread.join(120)
        assert "error" not in box, box.get("error")
        assert box["outcome"].ok and box["outcome"].via == "done"  # the guest ran to its end here
        assert m.console_output == _expected()
        assert hashlib.sha256(m.ram._map[:]).hexdigest() == _reference_ram()
    assert b"PAGE" in seen["tags"]


def test_a_destination_with_less_memory_refuses_and_the_source_runs_on(tmp_path):
    dest = _Destination(tmp_path, max_mem=16 << 20)
    with _counter() as m:
        thread, box = _run_in_thread(m)
        _wait_for(m, b"count 00000010\n")
        with pytest.raises(MigrationError, match="refused the machine: the source's guest has 32 MiB of memory; "
                                                 "this destination takes at most 16 MiB"):
            migrate(m, dest.address)
        thread.join(120)
        assert box["outcome"].ok and m.console_output == _expected()
    assert "at most 16 MiB" in dest.wait()["error"]


def test_nobody_at_the_address_and_bad_addresses_are_clear_errors(tmp_path):
    with _counter() as m:
        with pytest.raises(MigrationError, match="cannot reach the destination unix:.*nothing"):
            migrate(m, f"unix:{tmp_path}/nothing")
        for bad in ("nowhere", "tcp:host:port", "1.2.3.4:70000"):
            with pytest.raises(ValueError, match="a migration address is"):
                migrate(m, bad)
        assert m.run(timeout=60).ok  # unharmed


def test_a_destination_refuses_what_is_not_a_migration(tmp_path):
    with Incoming(f"unix:{tmp_path}/d.sock") as incoming:
        def talk():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(tmp_path / "d.sock"))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
            time.sleep(0.5)
            s.close()
        threading.Thread(target=talk, daemon=True).start()
        with pytest.raises(MigrationError):
            incoming.accept(timeout=5, wait=10)


def test_damaged_pages_are_caught_by_their_crc(tmp_path):
    a, b = socket.socketpair()
    sender, receiver = migration._Stream(a, "x"), migration._Stream(b, "the source")
    payload = struct.pack("<III", 1, 3, 1) + b"\x11" * migration.PAGE
    a.sendall(migration.HEAD.pack(b"PAGE", 0x1234, len(payload)) + payload)
    with pytest.raises(MigrationError, match=r"message PAGE: CRC 0x[0-9a-f]{8}, the stream says 0x00001234"):
        receiver.receive()
    sender.close()
    receiver.close()


# ---- Machine.request ---------------------------------------------------------------------------------

def test_a_request_runs_between_exits_and_the_run_goes_on():
    with _counter(rounds=200) as m:
        seen = []
        futures = []

        def ask(exit, vcpu):
            if m.console_output.endswith(b"count 00000010\n") and not futures:
                # from another thread, as a control socket asks
                threading.Thread(target=lambda: futures.append(m.request(lambda: seen.append(
                    (threading.current_thread().name, m.in_run, m.console_output))))).start()

        m.after_exit = ask
        outcome = m.run(timeout=60)
        assert outcome.ok and m.console_output == _expected(200)  # the run went on to its end
        futures[0].result(timeout=5)
        thread, in_run, output = seen[0]
        assert thread == "MainThread" and not in_run  # in run()'s thread, the vCPUs stopped
        assert output.startswith(b"".join(b"count %08x\n" % n for n in range(1, 0x11)))


def test_a_request_that_returns_an_outcome_ends_the_run_and_one_that_raises_does_not():
    with _counter(rounds=200) as m:
        futures = []

        def boom():
            raise OSError(28, "No space left on device")

        def ask(exit, vcpu):
            if m.console_output.endswith(b"count 00000003\n") and not futures:
                futures.append(m.request(boom))
            if m.console_output.endswith(b"count 00000008\n") and len(futures) == 1:
                futures.append(m.request(lambda: Outcome(5, via="request")))

        m.after_exit = ask
        outcome = m.run(timeout=60)
        assert outcome.status == 5 and outcome.via == "request"
        assert isinstance(futures[0].exception(), OSError)
        assert m.console_output.endswith(b"count 00000008\n")
        # between runs a request is served at once, in the caller's thread
        assert m.request(lambda: m.in_run).result(timeout=1) is False
        assert m.run(timeout=60).ok and m.console_output == _expected(200)


def test_a_pause_asked_between_runs_is_not_lost():
    with _counter(rounds=200) as m:
        m.pause()
        first = m.run(timeout=60)
        assert isinstance(first, Paused) and m.console_output == b""
        assert m.run(timeout=60).ok and m.console_output == _expected(200)


# ---- the command line ----------------------------------------------------------------------------------

def _pykvm(*args, **kwargs):
    return subprocess.Popen([*PYKVM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _wait_socket(path, proc):
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _long_expected() -> bytes:
    return _expected(1000)  # guests/counter_long.S


def test_pykvm_migrate_moves_a_running_pykvm_run_to_pykvm_run_incoming(tmp_path):
    control = str(tmp_path / "vm.sock")
    dest = _pykvm("run", "--incoming", "127.0.0.1:0", "--incoming-wait", "60", "--timeout", "120", "--json")
    said = dest.stderr.readline().decode()  # TCP on loopback, on the port the destination took
    assert said.startswith("pykvm: waiting for a migration on tcp:127.0.0.1:"), said
    incoming = said.split(" on ", 1)[1].strip()
    source = _pykvm("run", str(guest_image("counter_long")), "--mem", "32M", "--control", control, "--timeout", "120")
    _wait_socket(control, source)
    time.sleep(0.3)
    asked = subprocess.run([*PYKVM, "migrate", "--control", control, incoming, "--downtime", "20", "--json"],
                           capture_output=True, timeout=120)
    assert asked.returncode == 0, asked.stderr.decode()
    report = json.loads(asked.stdout)
    assert report["result"] == "migrated" and report["to"] == incoming and report["downtime"] > 0
    assert report["rounds"] and report["dirty"] == "bitmap"
    out, err = source.communicate(timeout=120)
    assert source.returncode == 76, err.decode()  # not a pass: the guest's outcome is the destination's
    assert b"pykvm: migrated to " + incoming.encode() in err
    dest_out, dest_err = dest.communicate(timeout=180)
    assert dest.returncode == 0, dest_err.decode()
    doc = json.loads(dest_out)
    assert doc["status"] == 0 and doc["incoming"]["pages"] == report["pages"]
    assert out + doc["console"].encode() == _long_expected()
    assert not os.path.exists(control)  # the control socket goes with the run


def test_pykvm_snapshot_saves_a_running_guest_that_runs_on_and_restores(tmp_path):
    control, snap = str(tmp_path / "vm.sock"), tmp_path / "mid.snap"
    source = _pykvm("run", str(guest_image("counter_long")), "--mem", "32M", "--control", control, "--timeout", "120")
    _wait_socket(control, source)
    time.sleep(0.3)
    asked = subprocess.run([*PYKVM, "snapshot", "--control", control, str(snap), "--json"], capture_output=True,
                           timeout=60)
    assert asked.returncode == 0, asked.stderr.decode()
    answer = json.loads(asked.stdout)
    assert answer["result"] == "saved" and answer["pages_saved"] > 512
    status = subprocess.run([*PYKVM, "snapshot", "--control", control, "/proc/no/such/dir.snap"],
                            capture_output=True, timeout=60)
    out, err = source.communicate(timeout=120)
    assert source.returncode == 0, err.decode()
    assert out == _long_expected()  # the source ran on, to its end
    if status.returncode != 64 or b"no/such/dir" not in status.stderr:  # the guest may have ended first
        assert b"no such control socket" in status.stderr
    restored = subprocess.run([*PYKVM, "restore", str(snap)], capture_output=True, timeout=180)
    assert restored.returncode == 0, restored.stderr.decode()
    assert restored.stdout and _long_expected().endswith(restored.stdout)
    assert len(restored.stdout) < len(out)  # it went on from mid-run (mid-line, maybe: each byte is an exit)


def test_the_control_socket_answers_status_and_refuses_bad_requests(tmp_path):
    from pykvm.control import ControlError, ControlServer, call

    with _counter(rounds=200) as m, ControlServer(m, str(tmp_path / "c.sock")) as server:
        path = server.path
        assert os.stat(path).st_mode & 0o777 == 0o600
        answer = call(path, {"command": "status"})
        assert answer == {"ok": True, "running": False, "exits": 0, "mem": MEM, "vcpus": 1, "migrated_to": None}
        with pytest.raises(ControlError, match="unknown command 'reboot'") as e:
            call(path, {"command": "reboot"})
        assert e.value.status == 64
        with pytest.raises(ControlError, match="bad request"):
            call(path, {"command": "snapshot"})
        with pytest.raises(OSError, match="in use by another pykvm"):
            ControlServer(m, path)
        assert m.run(timeout=60).ok


def test_pykvm_run_incoming_refuses_image_options_and_a_guest_too_large(tmp_path):
    bad = subprocess.run([*PYKVM, "run", "--incoming", "127.0.0.1:0", "--smp", "2"], capture_output=True, timeout=60)
    assert bad.returncode == 64 and b"--smp cannot be given with it" in bad.stderr
    incoming = f"unix:{tmp_path}/in.sock"
    dest = _pykvm("run", "--incoming", incoming, "--mem", "8M", "--incoming-wait", "60")
    _wait_socket(incoming[5:], dest)
    with _counter() as m:
        with pytest.raises(MigrationError, match="at most 8 MiB"):
            migrate(m, incoming)
        assert m.run(timeout=60).ok
    _, err = dest.communicate(timeout=60)
    assert dest.returncode == 64
    assert err.decode().splitlines()[-1] == ("pykvm: error: migration: refused the source's machine: the source's "
                                             "guest has 32 MiB of memory; this destination takes at most 8 MiB")


def test_a_guest_that_ends_during_a_migration_ends_well_and_the_migration_fails_clearly(tmp_path):
    """The source's guest (guests/wait_input.S) ends while the destination is still answering HELO:
    the run ends as the guest said, pykvm run waits for the migration in progress before it closes
    the machine (it copies from guest RAM), and pykvm migrate says nothing was moved. The guest ends
    when the test writes a byte to its COM1 (pykvm run's stdin), after the destination saw HELO, so
    the order holds on any backend, however slow."""
    hello, ended = threading.Event(), threading.Event()

    def slow_hello(stream, seen):
        stream.receive_json("HELO")
        hello.set()
        ended.wait(120)  # until the source's guest has ended
        stream.send(b"OKAY")
        while True:
            seen["tags"].append(stream.receive()[0])

    address, seen = _fake_destination(tmp_path, slow_hello)
    control = str(tmp_path / "vm.sock")
    source = _pykvm("run", str(guest_image("wait_input")), "--mem", "32M", "--control", control, "--timeout", "300",
                    stdin=subprocess.PIPE)
    _wait_socket(control, source)
    asking = _pykvm("migrate", "--control", control, address)
    assert hello.wait(120), "the migration never started"
    source.stdin.write(b"Z")
    source.stdin.flush()
    expected = b"waiting\ngot Z\n"
    out = b""
    while len(out) < len(expected):  # the run flushes its console when it ends
        chunk = source.stdout.read(len(expected) - len(out))
        assert chunk, source.stderr.read().decode()
        out += chunk
    ended.set()
    rest, err = source.communicate(timeout=120)
    assert source.returncode == 0, err.decode()
    assert out + rest == expected
    stdout, stderr = asking.communicate(timeout=120)
    asked = subprocess.CompletedProcess(asking.args, asking.returncode, stdout, stderr)
    assert asked.returncode == 68, asked.stderr.decode()
    assert b"the guest's run ended before the stop-and-copy: nothing was moved; its run here has ended" in asked.stderr
