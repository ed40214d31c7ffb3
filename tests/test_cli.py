"""`pykvm run`: exit codes, console streaming, JSON, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from pykvm import status, system
from pykvm.cli import main, parse_size
from pykvm.images import guest_image

GUEST_NAMES = ("hello_long", "hello_real", "hello_protected", "cpuid_cpl", "sync", "io", "page_fault", "fail",
               "triple_fault", "spin", "wild_write")


@pytest.fixture(scope="module")
def built(guest):
    """Paths of built guests (the `guest` fixture builds them)."""
    for name in GUEST_NAMES:
        guest(name)
    return {name: str(guest_image(name)) for name in GUEST_NAMES}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, text=True, timeout=60)


def test_parse_size():
    assert parse_size("4M") == parse_size("4MiB") == 4 << 20
    assert parse_size("0x400000") == 4 << 20
    assert parse_size("1G") == 1 << 30


@pytest.mark.kvm
def test_default_guest_runs_and_exits_zero():
    result = run_cli("run")
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello from long mode\n", "")


@pytest.mark.kvm
@pytest.mark.parametrize(
    "name, mode, code, stdout, stderr_start",
    [
        ("hello_protected", "protected", 0, "Hello from protected mode\n", ""),
        ("cpuid_cpl", "long", 0, None, ""),
        ("sync", "protected", 0, "", ""),
        ("io", "protected", status.GUEST_STOPPED, "", "pykvm: error: unexpected exit: IoOut(port=0x600, size=1, count=1, data=11)\n"),
        ("page_fault", "long", status.GUEST_STOPPED, "", "pykvm: error: guest exception #PF (vector 14) at rip=0x100000 cs=0x8"),
    ],
)
def test_guests_from_the_command_line(built, name, mode, code, stdout, stderr_start):
    result = run_cli("run", built[name], "--mode", mode, "--strict")
    assert result.returncode == code, result.stderr
    if stdout is not None:
        assert result.stdout == stdout
    assert result.stderr.startswith(stderr_start)
    assert (result.stderr == "") == (code == 0)


@pytest.mark.kvm
def test_real_mode_image_and_trace_exits(built):
    result = run_cli("run", built["hello_real"], "--mode", "real", "--trace-exits")
    assert result.returncode == 0
    assert result.stdout == "Hello from real mode\n"
    lines = result.stderr.splitlines()
    assert lines[0] == "exit 1: IoOut(port=0xe9, size=1, count=1, data=48)"  # 'H'
    assert lines[-1] == "exit 22: IoOut(port=0xea, size=4, count=1, data=01000000)"  # DONE


@pytest.mark.kvm
def test_json_is_one_document(built):
    result = run_cli("run", built["hello_long"], "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0
    assert doc["result"] == "done" and doc["status"] == 0
    assert doc["console"] == "Hello from long mode\n" and doc["exits"] == 22


@pytest.mark.kvm
def test_guest_fail_exits_70(built):
    result = run_cli("run", built["fail"])
    assert result.returncode == status.GUEST_FAILED == 70
    assert result.stderr == "pykvm: error: guest FAIL at line 12: fail.S: expected failure (value 0x2a)\n"


@pytest.mark.kvm
def test_triple_fault_reports_registers(built, kvm_backend):
    result = run_cli("run", built["triple_fault"])
    assert result.returncode == status.GUEST_STOPPED == 72
    if kvm_backend == "kvm_amd":  # the registers are gone by the exit: the report says so
        assert result.stderr.startswith("pykvm: error: the guest triple-faulted (KVM_EXIT_SHUTDOWN); KVM had "
                                        "already reset the vCPU")  # fmt: skip
        assert "\nmode: real" in result.stderr and "rip=0000fff0" in result.stderr and "cs=f000/ffff0000" in result.stderr
        return
    assert result.stderr.startswith("pykvm: error: the guest triple-faulted (KVM_EXIT_SHUTDOWN)\nmode: long")
    assert "rip=0000000000100007" in result.stderr and "[ud2]" in result.stderr


@pytest.mark.kvm
def test_runaway_guest_is_stopped_by_timeout(built):
    result = run_cli("run", built["spin"], "--mode", "real", "--timeout", "0.5")
    assert result.returncode == status.TIMEOUT == 74
    assert result.stdout == "spinning\n"
    assert "the guest ran past the 0.5 s timeout" in result.stderr and "[jmp 0x1010]" in result.stderr


@pytest.mark.kvm
def test_ctrl_c_stops_the_guest_and_reports_it(built):
    # As at a terminal: SIGINT handled by default, even where the suite itself was started with it
    # ignored (a background job of a shell without job control), which a child would inherit.
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", built["spin"], "--mode", "real"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        assert proc.stdout.readline() == "spinning\n"  # the guest is at (or right before) its endless loop
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()  # a failed test leaves no spinning guest behind
        proc.wait()
    assert proc.returncode == 130
    assert err.startswith("pykvm: error: interrupted (Ctrl-C)\nmode: real") and "[jmp 0x1010]" in err


@pytest.mark.kvm
def test_unmapped_write_is_reported(built):
    result = run_cli("run", built["wild_write"], "--json", "--strict")
    doc = json.loads(result.stdout)
    assert result.returncode == doc["status"] == status.GUEST_STOPPED
    assert doc["error"]["kind"] == "UnexpectedExit"
    assert doc["error"]["exit"] == "MmioWrite(gpa=0xe0000000, data=55)"
    assert doc["error"]["state"]["regs"]["rax"] == 0xE0000000


@pytest.mark.parametrize(
    "args, message",
    [
        (["nonexistent.bin"], "nonexistent.bin: no such guest image"),
        (["/dev/null"], "/dev/null: is not a regular file (a device, FIFO or socket), not a guest image"),
        (["."], ".: is a directory, not a guest image"),
    ],
)
def test_bad_images_give_one_line_and_exit_64(args, message, capsys):
    assert main(["run", *args]) == status.USAGE == 64
    assert capsys.readouterr().err == f"pykvm: error: {message}\n"


def test_empty_image(tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert main(["run", str(empty)]) == status.USAGE
    assert capsys.readouterr().err == f"pykvm: error: {empty}: the image is empty\n"


def test_oversized_image(tmp_path, capsys):
    image = tmp_path / "big.bin"
    image.write_bytes(b"\x90" * (2 << 20))
    assert main(["run", str(image), "--mem", "2M"]) == status.USAGE
    assert capsys.readouterr().err == (
        f"pykvm: error: {image}: the image ({2 << 20} bytes) is larger than the {1 << 20} bytes "
        "of guest memory it must fit in\n"
    )


@pytest.mark.kvm
@pytest.mark.parametrize(
    "args, message",
    [
        (["--entry", "0x900000"], "entry point 0x900000 is outside guest memory (0x0-0x400000)"),
        (["--load", "0x500000"], "load address 0x500000 is outside guest memory (0-0x400000)"),
    ],
)
def test_addresses_outside_guest_memory(built, args, message, capsys):
    assert main(["run", built["hello_long"], *args]) == status.USAGE
    assert capsys.readouterr().err == f"pykvm: error: {message}\n"


@pytest.mark.kvm
def test_without_strict_unassigned_accesses_go_nowhere_as_on_qemu(built):
    """The write to 0xE0000000 that --strict stops on is dropped; the guest goes on to DONE(0)."""
    result = run_cli("run", built["wild_write"], "--stats")
    assert (result.returncode, result.stdout) == (0, "")
    assert "unassigned mmio" in result.stderr


def test_usage_errors_exit_64(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--mem", "lots"])
    assert info.value.code == status.USAGE == 64
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_missing_kvm_device_says_how_to_fix(monkeypatch, capsys):
    monkeypatch.setattr(system, "KVM_PATH", "/nonexistent/kvm")
    assert main(["run"]) == status.UNAVAILABLE == 66
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pykvm: error: /nonexistent/kvm does not exist: this host has no KVM.")
    assert "modprobe kvm_intel" in err


@pytest.mark.kvm
def test_no_permission_on_kvm_device_says_how_to_fix(tmp_path):
    """In a private mount namespace, a mode-000 node replaces /dev/kvm and the CLI runs without
    capabilities, so opening it fails with EACCES as it would for a user outside the kvm group."""
    tools = [t for t in ("unshare", "setpriv", "mount") if shutil.which(t) is None]
    if os.geteuid() != 0 or tools:
        pytest.skip(f"needs root and unshare, setpriv, mount ({', '.join(tools) or 'not root'}; "
                    "apt-get install util-linux mount)")
    node = tmp_path / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    node.chmod(0)
    script = f"mount --bind {node} /dev/kvm && exec setpriv --bounding-set=-all --inh-caps=-all " \
             f"{sys.executable} -m pykvm run"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == status.UNAVAILABLE, result.stderr
    assert result.stderr == (
        "pykvm: error: permission denied opening /dev/kvm: add your user to the 'kvm' group "
        "(sudo usermod -aG kvm $USER, then log in again) or run as root\n"
    )


@pytest.mark.kvm
def test_dump_pagetables(built):
    doc = json.loads(run_cli("run", built["hello_long"], "--json", "--dump-pagetables").stdout)
    tables = doc["page_tables"]
    assert (tables["paging"], tables["cr3"]) == ("4-level", 0x21000)
    assert tables["mappings"] == [{"va": 0, "pa": 0, "size": 4 << 30, "write": True, "user": True, "execute": True}]
    real = json.loads(run_cli("run", built["hello_real"], "--mode", "real", "--json", "--dump-pagetables").stdout)
    assert real["page_tables"] == {"paging": None, "cr3": 0, "mappings": []}
    text = run_cli("run", built["hello_long"], "--dump-pagetables")
    assert "Page tables (4-level, CR3 0x21000)" in text.stderr and "rwx user" in text.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("name, args, text", [
    ("hello_long", [], "Hello from long mode\n"),  # ELF64: long mode
    ("hello_protected", [], "Hello from protected mode\n"),  # ELF32: protected mode
    ("hello_real", ["--mode", "real"], "Hello from real mode\n"),
])
def test_elf_images_are_detected_by_content(built, name, args, text):
    result = run_cli("run", built[name].replace(".bin", ".elf"), *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, text, "")


@pytest.mark.kvm
def test_trace_from_the_command_line(built, tmp_path):
    result = run_cli("run", built["hello_real"], "--mode", "real", "--trace-count", "6")
    assert (result.returncode, result.stdout) == (0, "Hello from real mode\n")
    lines = result.stderr.splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["1", "2", "3", "4", "5", "6"]
    assert "out 0xe9, al" in lines[5] and "IoOut(port=0xe9" in lines[5]
    assert lines[6].startswith("trace: ") and "stopped after 6 instructions" in lines[6]
    out = tmp_path / "trace.txt"
    result = run_cli("run", built["hello_real"], "--mode", "real", "--trace-file", str(out),
                     "--trace-range", "0x1000-0x1010")
    assert result.returncode == 0 and out.read_text().count("lodsb") == len("Hello from real mode\n") + 1


def test_bad_trace_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--trace-range", "0x2000-0x1000"])
    assert info.value.code == status.USAGE and "need 0 <= LO < HI" in capsys.readouterr().err


@pytest.mark.kvm
@pytest.mark.guest_debug("sw")
def test_gdb_attaches_to_pykvm_run(built):
    """`pykvm run --gdb :PORT --wait-gdb` with real gdb: break at the first `out`, read rax, detach."""
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (apt-get install gdb)")
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", built["hello_long"], "--gdb", f":{port}",
                             "--wait-gdb"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().startswith(f"pykvm: gdb server on 127.0.0.1:{port}, waiting for gdb")
        gdb = subprocess.run(
            ["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}", "-ex", "break *0x10000b",
             "-ex", "continue", "-ex", "printf \"rax=%x\\n\", $rax", "-ex", "detach"],
            capture_output=True, text=True, timeout=60,
        )
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "rax=48" in gdb.stdout, gdb.stdout + gdb.stderr  # 'H', about to be written
    assert (proc.returncode, out) == (0, "Hello from long mode\n")


def test_gdb_and_trace_do_not_mix(capsys):
    assert main(["run", "--gdb", ":1234", "--trace"]) == status.USAGE
    assert "use one at a time" in capsys.readouterr().err


def test_json_errors_are_one_document_too(capsys):
    assert main(["run", "/nonexistent/image.bin", "--json"]) == status.USAGE
    out, err = capsys.readouterr()
    assert json.loads(out) == {"result": "error", "status": status.USAGE, "error": {
        "kind": "ImageError", "message": "/nonexistent/image.bin: no such guest image"}}
    assert err == "pykvm: error: /nonexistent/image.bin: no such guest image\n"


@pytest.mark.kvm
def test_stats_time_the_exits_only_when_asked(built):
    """--stats turns Machine.time_exits on: every exit kind it lists has handling time; --json
    without --stats carries no stats at all (and the run loop reads no clock per exit)."""
    doc = json.loads(run_cli("run", built["hello_long"], "--json", "--stats").stdout)
    rows = doc["stats"]["exits"]
    assert rows and all(row["count"] >= 1 and row["seconds"] > 0 for row in rows)
    assert "stats" not in json.loads(run_cli("run", built["hello_long"], "--json").stdout)
