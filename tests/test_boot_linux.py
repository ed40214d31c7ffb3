"""A distribution kernel (Debian's linux-image-amd64, the newest /boot/vmlinuz-*) under ``pykvm boot``.

Marked slow (minutes): `make test-linux` runs them here, the kvm_amd tier (`make test-amd`) inside
the reference host. What each backend can show:

- kvm_pvm: the kernel's own code is emulated and a stock kernel's user space cannot run there
  (DESIGN.md), so the test reads what the early boot echoes from the zero page pykvm built: the
  command line and the e820 map, as far as the kernel gets within the time limit.
- a hardware-style KVM (kvm_amd, kvm_intel): the full boot. pykvm's initramfs loads the virtio
  modules and runs a script that writes a marker to the virtio-blk disk and powers off; the host
  reads the marker in the image file, and a second boot reads it back through the guest's driver.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.boot import find_kernel

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MEM = 256 << 20
EARLY_TIMEOUT = 240  # seconds of the emulated early boot on kvm_pvm
FULL_TIMEOUT = 600  # a full boot under the kvm_amd reference host (QEMU TCG under it) takes minutes


def kernel() -> Path:
    try:
        return find_kernel()
    except ValueError as e:
        pytest.fail(f"{e} (make test-linux installs one: scripts/system-deps linux)")


def boot(*args: str, timeout: float) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "pykvm", "boot", "--json", "--kernel", str(kernel()), "--mem", str(MEM),
           "--timeout", str(timeout), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
    try:
        doc = json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pykvm boot printed no JSON document (status {run.returncode}): {run.stderr[-2000:]}")
    print(json.dumps({k: v for k, v in doc.items() if k != "console"}, indent=2))
    print(doc.get("console", "")[-6000:])
    return run.returncode, doc


def e820_lines(console: str) -> list[tuple[int, int, str]]:
    return [(int(a, 16), int(b, 16), kind) for a, b, kind in
            re.findall(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", console)]


def test_the_kernel_echoes_pykvms_zero_page(backend, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (8 << 20))
    marker = "pykvm-echo-" + os.urandom(4).hex()
    timeout = EARLY_TIMEOUT if backend == "kvm_pvm" else FULL_TIMEOUT
    status, doc = boot("--disk", str(disk), "--append", marker, timeout=timeout)
    console = doc["console"]
    # the command line pykvm put at cmd_line_ptr, echoed by setup_arch
    assert f"Command line: {doc['cmdline']}" in console
    assert marker in doc["cmdline"]
    # the e820 map from the zero page: low RAM, the BIOS area reserved, RAM from 1 MiB to the end
    table = e820_lines(console)
    assert table, console[-3000:]
    assert table[0][0] == 0 and table[0][2] == "usable"
    assert any(start == 0x100000 and end == MEM - 1 and kind == "usable" for start, end, kind in table), table
    assert any(start <= 0xF0000 <= end and kind == "reserved" for start, end, kind in table), table
    assert doc["phases"]["first console byte"] < doc["phases"]["end"]
    if backend == "kvm_pvm":
        # the early boot, then a stop pykvm reports (the time limit, or the emulator giving up)
        assert status != 0 and doc["ending"] != "power-off", doc["ending"]
        return
    assert status == 0 and doc["ending"] == "power-off", doc["ending"]
    assert "pykvm-init: user space is up" in console
    assert "vda" in console  # virtio-blk probed the disk pykvm offered
    assert "virtio_rng" in console


def test_a_marker_written_through_virtio_blk_survives_into_a_second_boot(backend, tmp_path):
    if backend == "kvm_pvm":
        pytest.skip("kvm_pvm cannot run a stock kernel's user space (its CPL3 system calls never reach the "
                    "kernel): the full boot runs on the kvm_amd reference host, `make test-amd`")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (4 << 20))
    marker = "pykvm-marker-" + os.urandom(6).hex()
    write = tmp_path / "write.sh"
    write.write_text(f"echo {marker} | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null && echo wrote-marker\n")
    status, doc = boot("--disk", str(disk), "--init-script", str(write), timeout=FULL_TIMEOUT)
    assert status == 0 and doc["ending"] == "power-off", doc["ending"]
    assert "wrote-marker" in doc["console"]
    data = disk.read_bytes()
    assert data[8 * 512 : 8 * 512 + len(marker) + 1] == marker.encode() + b"\n"
    assert data[: 8 * 512] == bytes(8 * 512) and data[8 * 512 + 512 :].strip(b"\0") == b""

    read = tmp_path / "read.sh"
    read.write_text("echo \"read-back: $(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -n 1)\"\n"
                    "echo \"cpus: $(grep -c ^processor /proc/cpuinfo)\"\n")
    status, doc = boot("--disk", f"{disk},ro", "--init-script", str(read), "--smp", "2", "--stats",
                       "--console", "virtio", timeout=FULL_TIMEOUT)
    assert status == 0, doc["ending"]
    assert f"read-back: {marker}" in doc["console"]  # through hvc0: virtio-console
    assert "cpus: 2" in doc["console"]  # the kernel's own log went to hvc0 only in part: ask user space
    assert doc["stats"]["virtio"]["VirtioConsole@0xd0001000"]["notifies (ioeventfd)"] > 0
    blk = doc["stats"]["virtio"]["VirtioBlk@0xd0000000"]
    assert blk["notifies (ioeventfd)"] > 0 and blk["notifies (trapped)"] == 0, blk  # no Python exit per notify
