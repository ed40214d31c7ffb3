"""Kernels from outside the project, started with QEMU's command line: under pykvm-qemu, and under
QEMU itself (TCG) with the same line as the reference.

The kernels come from Debian's packages (scripts/outside_kernels.py --setup, which `make
test-outside` runs); where one is missing its tests skip, naming how to get it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import os

import pytest
from script_modules import load_script

outside = load_script("outside_kernels.py")
XEN = outside.kernel_path("xen")
if os.environ.get("PYKVM_OUTSIDE_REQUIRED") and not XEN.exists():  # make test-outside: a skip would hide it
    raise RuntimeError(f"PYKVM_OUTSIDE_REQUIRED is set but {XEN} is missing (scripts/outside_kernels.py --setup)")
needs_xen = pytest.mark.skipif(not XEN.exists(), reason=f"no Xen hypervisor in {outside.CACHE} (make test-outside, "
                               "or scripts/outside_kernels.py --setup as root)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
XEN_APPEND = "console=com1 com1=115200 loglvl=all"
#: What a Xen that booted as far as a dom0 says, in order (each a regular expression).
XEN_MILESTONES = [
    r"\(XEN\) Xen version 4\.\d+",
    r"\(XEN\) ACPI: RSDP [0-9A-F]+",
    r"\(XEN\) ACPI: FACP [0-9A-F]+",
    r"\(XEN\) ACPI: APIC [0-9A-F]+",
    r"\(XEN\) ACPI: PM-Timer IO Port: 0x608 \(24 bits\)",
    r"\(XEN\) ACPI: IOAPIC \(id\[0x0\d\] address\[0xfec00000\] gsi_base\[0\]\)",
    r"\(XEN\) SMP: Allowing (?P<cpus>\d+) CPUs",
    r"\(XEN\) Brought up (?P<up>\d+) CPUs",
    r"\(XEN\) \*\*\* Building a PV Dom0 \*\*\*",
    r"\(XEN\) Could not construct domain 0",
    r"\(XEN\) Reboot in five seconds",
]


def xen_line(module, cpus: int, accel: str) -> list[str]:
    return ["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-machine", f"accel={accel}",
            "-m", "512", "-smp", str(cpus), "-kernel", str(XEN), "-append", XEN_APPEND, "-initrd", str(module)]


def milestones(serial: str) -> dict[str, str]:
    """The XEN_MILESTONES found, in order, with their groups; stops at the first one missing."""
    found, pos = {}, 0
    for pattern in XEN_MILESTONES:
        m = re.compile(pattern, re.MULTILINE).search(serial, pos)
        if m is None:
            break
        found[pattern] = m.group(0)
        found.update(m.groupdict())
        pos = m.end()
    return found


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    path = tmp_path_factory.mktemp("xen") / "not-a-dom0.txt"
    path.write_text("no kernel here\n")  # Xen panics at building dom0 from it: the run's end point
    return path


@needs_xen
@pytest.mark.kvm
@pytest.mark.parametrize("cpus", [1, 2])
def test_xen_boots_under_pykvm_qemu_to_its_dom0_panic_and_resets(module, cpus, kvm_backend):
    result = subprocess.run([sys.executable, "-m", "pykvm.qemu", *xen_line(module, cpus, "kvm")],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if re.search(r"GENERAL PROTECTION FAULT", result.stdout) and "init_amd" in result.stdout:
        # Seen with kvm_amd on QEMU's TCG EPYC model (make test-amd): Xen 4.17's init_amd reads MSR
        # 0xC0011028, which that KVM answers with #GP; an AMD host's KVM may do the same.
        pytest.skip(f"{kvm_backend} answers an RDMSR in Xen's init_amd with #GP and Xen panics before it "
                    "brings up its CPUs (README, 'Test kernels from outside')")
    found = milestones(result.stdout)
    missing = [p for p in XEN_MILESTONES if p not in found]
    assert not missing, f"first missing: {missing[0]}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert found["cpus"] == found["up"] == str(cpus)
    # pykvm's FADT has a reset register (QEMU's pc FADT, revision 1, has none: Xen resets otherwise there)
    assert "(XEN) Resetting with ACPI MEMORY or I/O RESET_REG." in result.stdout
    assert (result.returncode, result.stderr) == (0, "")  # the reset, under -no-reboot: QEMU's status 0


@needs_xen
@needs_qemu
def test_xen_reaches_the_same_milestones_under_qemu_tcg(module):
    """The reference: QEMU 7.2's TCG with its SeaBIOS, the same command line."""
    result = subprocess.run(["qemu-system-x86_64", *xen_line(module, 2, "tcg")], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    found = milestones(result.stdout)
    missing = [p for p in XEN_MILESTONES if p not in found]
    assert not missing, f"first missing: {missing[0]}\n{result.stdout[-3000:]}"
    assert found["cpus"] == found["up"] == "2" and result.returncode == 0
