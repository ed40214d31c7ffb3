"""A multiboot kernel on pykvm's PC platform: SMP, ACPI/MP tables, fw_cfg, CMOS, UART, isa-debug-exit."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from pykvm import status
from pykvm.images import guests_dir
from pykvm.machine import Machine

pytestmark = pytest.mark.kvm

MEM = 32 << 20


@pytest.fixture(scope="module")
def platform_kernel() -> tuple[str, bytes]:
    subprocess.run(["make", "-s", "-C", str(guests_dir())], check=True)
    path = guests_dir() / "build" / "multiboot_platform.elf"
    return str(path), path.read_bytes()


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_kernel_finds_its_cpus_and_memory_and_exits_with_the_right_status(platform_kernel, cpus):
    path, data = platform_kernel
    with Machine(MEM, cpus=cpus, irqchip=True) as m:
        uart = m.add_pc_devices()
        assert m.load_kernel(data, path=path) == "multiboot"
        outcome = m.run(timeout=30)
    text = uart.captured.decode()
    assert f"fw_cfg: cpus {cpus}, ram 32 MiB\r\n" in text
    assert f"acpi: cpus {cpus}, ioapic 0xfec00000\r\n" in text
    assert f"mptable: cpus {cpus}, ioapic 0xfec00000\r\n" in text
    assert "cmos: ram 32 MiB; multiboot: ram 32 MiB\r\n" in text
    assert f"smp: {cpus} of {cpus} cpus up\r\n" in text and "FAIL" not in text
    assert outcome.status == (cpus << 1) | 1  # isa-debug-exit: (value << 1) | 1, value = CPUs up
    assert m.stats.count["DebugExit 0xf4-0xf7"] == 1 and m.stats.count["Uart16550 0x3f8-0x3ff"] > 100


def test_uart_receive_interrupt(platform_kernel):
    path, data = platform_kernel
    with Machine(MEM, cpus=2, irqchip=True) as m:
        uart = m.add_pc_devices()
        m.load_kernel(data, path=path, cmdline="uart-irq")

        stopped = threading.Event()

        def type_a_key():
            # Only once the kernel asks: a key typed before it resets the FIFOs is lost, and on a
            # slow host (the kvm_amd tier under TCG) the prompt can take many seconds to come.
            while b"waiting for input" not in uart.captured:
                if stopped.wait(0.01):
                    return
            uart.feed(b"k")

        threading.Thread(target=type_a_key, daemon=True).start()
        try:
            outcome = m.run(timeout=60)
        finally:
            stopped.set()
    assert "uart: got 'k' by interrupt\r\n" in uart.captured.decode()
    assert outcome.status == (2 << 1) | 1


def test_kernel_from_the_command_line_with_stdin_on_the_uart(platform_kernel):
    """The user types once the kernel asks (input sent earlier is lost when it resets the FIFOs, as
    on a real 16550)."""
    path, _ = platform_kernel
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", path, "--smp", "2", "--mem", "32M", "--append", "uart-irq",
         "--stats", "--timeout", "30"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.decode())
        if line.startswith(b"uart: waiting for input"):
            proc.stdin.write(b"z")
            proc.stdin.flush()
            break
    out, err = proc.communicate(timeout=60)
    out, err = "".join(lines) + out.decode(), err.decode()
    assert proc.returncode == 5, err
    assert "smp: 2 of 2 cpus up" in out and "uart: got 'z' by interrupt" in out
    assert "Exits handled in Python" in err and "Uart16550 0x3f8-0x3ff" in err


def test_kernel_larger_than_memory(platform_kernel, tmp_path, capsys):
    """A kernel's segments must fit in guest memory; bytes after them in the file (debug info,
    padding) do not count."""
    from pykvm.cli import main

    path, data = platform_kernel
    assert main(["run", path, "--mem", "1M"]) == status.USAGE
    err = capsys.readouterr().err
    assert err == (f"pykvm: error: {path}: segment 0 at 0x100000 (size {_first_segment_size(data):#x}) "
                   "does not fit in 1 MiB of guest memory; use --mem\n")
    padded = tmp_path / "padded.elf"
    padded.write_bytes(data + bytes(MEM))  # a file larger than guest memory, but its segments fit
    with Machine(MEM, irqchip=True) as m:
        uart = m.add_pc_devices()
        assert m.load_kernel(padded.read_bytes(), path=str(padded)) == "multiboot"
        assert m.run(timeout=30).status == 3 and b"smp: 1 of 1 cpus up" in uart.captured


def _first_segment_size(data: bytes) -> int:
    from pykvm.loaders import parse_elf

    return parse_elf(data).load_segments[0].memsz


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: d[:40], "truncated"),  # an ELF header cut short
        (lambda d: d[:18] + b"\x28\x00" + d[20:], "machine"),  # e_machine = ARM
    ],
)
def test_malformed_elf_from_the_command_line(platform_kernel, tmp_path, capsys, mangle, message):
    from pykvm.cli import main

    data = platform_kernel[1]
    header_at = data.find(b"\x02\xb0\xad\x1b")  # break the multiboot header too, so ELF parsing decides
    broken = bytearray(mangle(data))
    if 0 <= header_at < len(broken):
        broken[header_at] = 0
    bad = tmp_path / "bad.elf"
    bad.write_bytes(bytes(broken))
    assert main(["run", str(bad)]) == status.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"pykvm: error: {bad}") and message in err.lower() and err.count("\n") == 1


def test_malformed_multiboot_header(tmp_path, capsys):
    from pykvm.cli import main

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x02\xb0\xad\x1b" + (3).to_bytes(4, "little") + b"\x00\x00\x00\x00" + bytes(64))
    assert main(["run", str(bad)]) == status.USAGE
    err = capsys.readouterr().err
    assert "malformed multiboot header at offset 0x0" in err and err.count("\n") == 1
