"""pykvm-qemu: QEMU's command line, its listings, its refusals and its exit statuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pykvm import qemu, status
from pykvm.qemu import UsageError, parse_args, parse_memory, parse_smp, split_opts

KUT_LINE = ("--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev "
            "-device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio -device pci-testdev "
            "-machine accel=kvm -kernel x.flat -smp 2 -initrd env.txt").split() + ["-append", "a b"]


def run_qemu(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm.qemu", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_qemu_comma_lists():
    assert split_opts("a,b=c,,d,e") == ["a", "b=c,d", "e"]
    assert split_opts("") == [""]
    assert parse_memory("256") == 256 << 20
    assert parse_memory("size=1G") == 1 << 30
    assert parse_memory("512M") == parse_memory("0.5G") == 512 << 20
    assert parse_smp("4") == parse_smp("cpus=4,sockets=1") == parse_smp("sockets=2,cores=2") == 4


def test_kvm_unit_tests_command_line_parses():
    config = parse_args(KUT_LINE)
    assert (config.kernel, config.initrd, config.cpus, config.no_reboot, config.defaults) == ("x.flat", "env.txt", 2,
                                                                                              True, False)
    assert config.append == "a b"
    assert [d.name for d in config.devices] == ["pc-testdev", "isa-debug-exit", "pci-testdev"]
    assert config.devices[1].props == {"iobase": "0xf4", "iosize": "0x4"}
    assert config.pit_reinject is False and config.accel == "kvm" and config.pit is True
    assert parse_args(["-machine", "pc,pit=off"]).pit is False


@pytest.mark.parametrize("argv, message", [
    (["-usb"], "-usb: invalid option (not one pykvm-qemu implements"),
    (["-device", "e1000"], "-device e1000: 'e1000' is not a valid device model name"),
    (["-device", "isa-debug-exit,iobase=0x10000"], "iobase 0x10000 is not a port"),
    (["-device", "pc-testdev,foo=1"], "property 'pc-testdev.foo' is not one pykvm-qemu implements"),
    (["-machine", "accel=tcg"], "-machine accel=tcg: pykvm-qemu runs guests under KVM only"),
    (["-machine", "microvm"], "unsupported machine type 'microvm'"),
    (["-cpu", "Skylake-Server"], "-cpu Skylake-Server: pykvm-qemu offers the CPU KVM offers"),
    (["-cpu", "host,+frobnicate"], "'+frobnicate' is not a CPU feature or property pykvm-qemu implements"),
    (["-cpu", "host,hv_passthrough"], "'hv_passthrough' is not a CPU feature or property"),
    (["-m", "lots"], "-m lots: not a size"),
    (["-smp", "64"], "-smp 64: Invalid SMP CPUs 64. The max CPUs supported by machine 'pc' is 15"),
    (["-smp", "2,maxcpus=4"], "no CPU hotplug"),
    (["-serial", "tcp::4444"], "-serial tcp::4444: pykvm-qemu takes stdio, file:PATH, null, none or chardev:ID"),
    (["-serial", "stdio", "-serial", "null", "-kernel", "/dev/null"], "-serial given twice"),
    (["-display", "gtk"], "-display gtk: pykvm-qemu has no display"),
    (["-global", "e1000.mac=x"], "-global e1000.mac=x: pykvm-qemu implements only kvm-pit.lost_tick_policy"),
    (["-S"], "-S: pykvm-qemu starts stopped only for gdb"),
    (["-kernel"], "-kernel: requires an argument"),
    (["-chardev", "socket,id=x,path=/tmp/s"], "-chardev socket,id=x,path=/tmp/s: pykvm-qemu has the stdio"),
    (["-device", "isa-debugcon,chardev=nope"], "needs chardev=ID of a -chardev given before it"),
    ([], "no -kernel: pykvm-qemu has no firmware to boot a disk"),
])
def test_bad_command_lines_are_one_line_naming_the_option_and_exit_1(argv, message, capsys):
    assert qemu.main(argv) == qemu.EXIT_BAD_COMMAND_LINE == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("pykvm-qemu: ") and message in err, err


def test_memory_beyond_the_host_is_refused(capsys):
    assert qemu.main(["-m", "64T", "-kernel", "/dev/null"]) == 1
    assert "-m 67108864M: pykvm-qemu puts all RAM below 3328 MiB" in capsys.readouterr().err


def test_bad_kernels_are_refused_in_one_line(tmp_path, capsys):
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\x90" * 64)
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(0x202) + b"HdrS" + bytes(64))
    assert qemu.main(["-kernel", str(tmp_path / "missing")]) == 1
    assert f"could not load kernel '{tmp_path / 'missing'}': " in capsys.readouterr().err
    assert qemu.main(["-kernel", str(flat)]) == 1
    assert capsys.readouterr().err == f"pykvm-qemu: -kernel {flat}: not a multiboot or ELF kernel\n"
    assert qemu.main(["-kernel", str(bz)]) == 1
    assert "(a Linux bzImage: the Linux boot protocol is not implemented yet)" in capsys.readouterr().err


def test_listings_answer_in_qemu_s_format():
    """kvm-unit-tests' x86/run greps `-device '?'` for "pc-testdev" and "pci-testdev" before it starts."""
    devices = run_qemu("-device", "?")
    assert devices.returncode == 0
    assert '\nname "pc-testdev", bus ISA\n' in devices.stdout
    assert 'name "pci-testdev", bus PCI, desc "PCI Test Device"' in devices.stdout
    assert 'name "isa-debug-exit", bus ISA' in devices.stdout
    assert run_qemu("-accel", "help").stdout == "Accelerators supported in QEMU binary:\nkvm\n"
    assert run_qemu("-machine", "accel=help").stdout == run_qemu("-accel", "help").stdout
    machines = run_qemu("-machine", "help").stdout
    assert machines.startswith("Supported machines are:\npc ") and "\nq35 " in machines
    version = run_qemu("-version").stdout
    assert version.startswith(f"QEMU emulator version {qemu.QEMU_VERSION} (pykvm-qemu ")
    helptext = run_qemu("-help").stdout
    assert helptext.splitlines()[0] == version.splitlines()[0]  # kvm-unit-tests reads the version from -h
    for option in qemu.OPTIONS:
        assert f"\n-{option}" in helptext


def test_the_console_script_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "pykvm-qemu"]
    assert ep.value == "pykvm.qemu:main"


# ---- guests under pykvm-qemu ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def platform_kernel() -> tuple[str, bytes]:
    from pykvm.images import guests_dir

    subprocess.run(["make", "-s", "-C", str(guests_dir())], check=True)
    path = guests_dir() / "build" / "multiboot_platform.elf"
    return str(path), path.read_bytes()


def _platform(platform_kernel):
    return platform_kernel[0]


@pytest.mark.kvm
def test_a_multiboot_kernel_runs_with_qemu_s_statuses(platform_kernel):
    path = _platform(platform_kernel)
    result = run_qemu("-nodefaults", "-display", "none", "-serial", "stdio", "-machine", "accel=kvm", "-m", "64",
                      "-smp", "2", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-kernel", path)
    assert "smp: 2 of 2 cpus up" in result.stdout, result.stderr
    assert result.returncode == (2 << 1) | 1 and result.stderr == ""


@pytest.mark.kvm
def test_without_isa_debug_exit_the_write_goes_nowhere_and_the_guest_halts(platform_kernel):
    """As on QEMU: port 0xf4 is unassigned without the device, so the kernel halts for ever after
    it; the runner's timeout (SIGTERM) ends it with QEMU's line and a status that is no pass."""
    path = _platform(platform_kernel)
    proc = subprocess.Popen([sys.executable, "-m", "pykvm.qemu", "-nodefaults", "-serial", "stdio", "-m", "64",
                             "-kernel", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("platform: exit"):
                break
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "platform: exit 1\n" in lines
    assert err.startswith("pykvm-qemu: terminating on signal 15\n"), err
    assert proc.returncode == status.INTERRUPTED


@pytest.fixture(scope="module")
def echo_kernels(tmp_path_factory):
    from test_nested_platforms import build_kernel  # tests/data/mb_echo.S, a tiny multiboot kernel

    d = tmp_path_factory.mktemp("mb_echo")
    return {"echo": build_kernel(d / "mb_echo.elf"), "reset": build_kernel(d / "mb_reset.elf", "RESET")}


def _echo_line(kernel, module):
    return ["-nodefaults", "-display", "none", "-serial", "stdio", "-machine", "accel=kvm", "-m", "32",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-kernel", str(kernel),
            "-append", "hello world", "-initrd", f"{module} its args"]


@pytest.mark.kvm
def test_kernel_append_and_initrd_reach_the_kernel_as_qemu_passes_them(echo_kernels, tmp_path):
    module = tmp_path / "env.txt"
    module.write_text("FIRST=1\nSECOND=2\n")
    result = run_qemu(*_echo_line(echo_kernels["echo"], module))
    assert result.stdout.splitlines() == ["mb-echo start", f"cmdline: {echo_kernels['echo']} hello world",
                                          f"module: {module} its args", "line: FIRST=1", "mb-echo end"]
    assert (result.returncode, result.stderr) == ((0x21 << 1) | 1, "")


@pytest.mark.skipif(not __import__("shutil").which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not "
                    "installed (apt-get install qemu-system-x86): nothing to compare with")
def test_qemu_itself_gives_the_same_serial_output_and_status(echo_kernels, tmp_path):
    """The same command line under QEMU's TCG: what pykvm-qemu must match."""
    module = tmp_path / "env.txt"
    module.write_text("FIRST=1\n")
    line = [a if a != "accel=kvm" else "accel=tcg" for a in _echo_line(echo_kernels["echo"], module)]
    result = subprocess.run(["qemu-system-x86_64", *line], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.stdout.splitlines() == ["mb-echo start", f"cmdline: {echo_kernels['echo']} hello world",
                                          f"module: {module} its args", "line: FIRST=1", "mb-echo end"]
    assert result.returncode == (0x21 << 1) | 1


@pytest.mark.kvm
def test_a_triple_fault_is_reported_with_registers_and_never_as_a_pass(echo_kernels):
    """mb_echo -DRESET triple-faults after its banner. QEMU with -no-reboot exits 0 there (a runner
    that reads 0 as a pass would pass it); pykvm-qemu stops it and exits 72 with the registers."""
    result = run_qemu("-nodefaults", "-no-reboot", "-serial", "stdio", "-m", "32", "-kernel",
                      str(echo_kernels["reset"]))
    assert result.stdout.startswith("mb-echo start")
    assert result.returncode == status.GUEST_STOPPED, result.stderr
    # A triple fault on VMX/SVM; kvm_pvm's emulator gives up on the int3 through a zero-limit IDT first
    assert result.stderr.startswith(("pykvm-qemu: the guest triple-faulted (KVM_EXIT_SHUTDOWN)",
                                     "pykvm-qemu: unexpected exit: InternalError(EMULATION"))
    assert "rip=" in result.stderr and "code at 0x" in result.stderr


@pytest.mark.kvm
def test_acpi_s3_sleeps_until_the_rtc_alarm_and_resumes_at_the_waking_vector(guest_asm, kvm_machine):
    """As kvm-unit-tests' s3: enable the RTC wake event, arm the alarm for every second, enter S3;
    the machine wakes on the alarm and the boot CPU goes on in real mode at the FACS's vector."""
    import struct

    from pykvm.devices.acpi_pm import Suspend

    image = guest_asm("""
        .code32
        mov $0x400, %ax; mov $0x602, %dx; outw %ax, %dx      /* PM1_EN: RTC_EN */
        mov $1, %al; outb %al, $0x70; mov $0xc0, %al; outb %al, $0x71   /* alarm: don't care, every second */
        mov $3, %al; outb %al, $0x70; mov $0xc0, %al; outb %al, $0x71
        mov $5, %al; outb %al, $0x70; mov $0xc0, %al; outb %al, $0x71
        mov $0xb, %al; outb %al, $0x70; inb $0x71, %al; or $0x20, %al; mov %al, %bl
        mov $0xb, %al; outb %al, $0x70; mov %bl, %al; outb %al, $0x71   /* register B: AIE */
        mov $0x2400, %ax; mov $0x604, %dx; outw %ax, %dx     /* PM1a_CNT: SLP_TYP 1 (S3), SLP_EN */
    1:  jmp 1b
    """, "protected")
    m = kvm_machine("protected", image=image, irqchip=True, strict=False)
    m.add_qemu_pc(False)
    facs = struct.unpack("<I", m.memory.read(m.acpi.tables["FACP"] + 36, 4))[0]
    m.memory.write(facs + 12, struct.pack("<I", 0x1010))  # CS:IP = 0x101:0
    m.memory.write(0x1010, bytes.fromhex("b82100" "baf400" "ef" "f4"))  # mov ax,0x21; mov dx,0xf4; out dx,ax; hlt
    outcome = m.run(timeout=10)
    # (the alarm may already have woken the machine by now: it rings every second)
    assert isinstance(outcome, Suspend) and outcome.state == 3
    assert m.woken.wait(5), "the RTC alarm did not wake the machine"
    m.resume_from_s3()
    sregs = m.vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base, m.vcpu.get_regs().rip, sregs.cr0 & 1) == (0x101, 0x1010, 0, 0)
    resumed = m.run(timeout=10)
    assert resumed.via == "isa-debug-exit" and resumed.exit_status == (0x21 << 1) | 1
    assert m.acpi_pm.pm1_sts & (1 << 15 | 1 << 10) == (1 << 15 | 1 << 10)  # WAK_STS and RTC_STS


def test_first_on_path_under_qemu_s_name(tmp_path):
    """A runner that looks up qemu-system-x86_64 on PATH finds pykvm-qemu under that name."""
    import os
    import shutil

    script = shutil.which("pykvm-qemu", path=os.path.dirname(sys.executable)) or shutil.which("pykvm-qemu")
    if script is None:
        pytest.skip("the pykvm-qemu console script is not installed (pip install -e .)")
    (tmp_path / "qemu-system-x86_64").symlink_to(script)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = shutil.which("qemu-system-x86_64", path=env["PATH"])
    result = subprocess.run([found, "-device", "help"], capture_output=True, text=True, env=env, timeout=60)
    assert found == str(tmp_path / "qemu-system-x86_64")
    assert result.returncode == 0 and 'name "pc-testdev", bus ISA' in result.stdout
