"""Shared fixtures: pykvm's built guests and the backend in use.

The `kvm` marker (skip with the reason where /dev/kvm is missing; --kvm-required makes that a
failure) comes from pykvm's own pytest plugin, pykvm/testing.py.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from pykvm.images import ImageError, guest_image, guests_dir
from pykvm.probe.host import kvm_backend
from pykvm.system import Kvm

# Loaded by its pytest11 entry point where pykvm is installed (then this line does nothing: the
# entry point has the module's name); this covers PYTEST_DISABLE_PLUGIN_AUTOLOAD and checkouts.
pytest_plugins = ["pykvm.testing"]


@pytest.fixture(scope="session")
def guest():
    """``guest(name)`` -> the bytes of pykvm's guest ``guests/NAME.S``, built with make if needed."""

    @functools.lru_cache(maxsize=None)
    def load(name: str) -> bytes:
        try:
            return guest_image(name).read_bytes()
        except ImageError as e:
            pytest.fail(f"guest {name} is not built and cannot be built here ({e}); run `make guests`")

    return load


@pytest.fixture(scope="session")
def virtio_kernel() -> tuple[str, bytes]:
    """(path, bytes) of the virtio test kernel (guests/virtio/, a multiboot ELF), built with make."""
    subprocess.run(["make", "-s", "-C", str(guests_dir())], check=True)
    path = guests_dir() / "build" / "virtio_driver.elf"
    return str(path), path.read_bytes()


@pytest.fixture(scope="session")
def backend() -> str | None:
    """The module serving /dev/kvm: kvm_intel, kvm_amd, kvm_pvm (or None)."""
    return kvm_backend()


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k


# ---- guest debugging on the reference host ------------------------------------------------------
# Under the kvm_amd reference host (scripts/refhost: QEMU TCG's emulated AMD-V) some of KVM's
# guest-debug features do not work, whoever drives KVM: scripts/guest_debug_repro.c (a C program,
# no pykvm) shows which. There, and only there, a test marked guest_debug("sw", ...) skips when the
# repro shows one of its cases not working, with the repro's own verdict as the reason. On every
# other host these tests run, and fail if pykvm is wrong.
REPRO_SOURCE = Path(__file__).resolve().parent.parent / "scripts" / "guest_debug_repro.c"
REPRO_CASES = ("sw", "step", "stepio", "stephlt", "stepemu", "rearmed", "hw")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (a distribution kernel's boot: minutes each)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are deselected (not skipped) unless --slow is given: `make test-linux`
    and the kvm_amd tier run them."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "guest_debug(*cases): needs these KVM guest-debug cases of "
                   "scripts/guest_debug_repro.c (sw: INT3 breakpoints, hw: DR0-DR3, step, ...); on the "
                   "reference host (PYKVM_REFHOST) skipped where the repro shows the host lacks one")


def _repro_verdicts(tmp: Path) -> dict[str, str]:
    """{case: the repro's verdict line} for the cases it found NOT AS DOCUMENTED (long mode)."""
    binary = tmp / "guest_debug_repro"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(REPRO_SOURCE)], check=True)
    try:
        out = subprocess.run([str(binary), "long"], stdout=subprocess.PIPE, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        # the case that hung is the last one started and not finished
        started = [line.split(":")[0] for line in out.splitlines() if line.split(":")[0] in REPRO_CASES]
        out += f"\n{started[-1] if started else 'sw'} NOT AS DOCUMENTED: hung (no exit within 120 s)"
    bad = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in REPRO_CASES and "NOT AS DOCUMENTED" in line:
            bad[words[0]] = " ".join(words)
    return bad


@pytest.fixture(scope="session")
def _host_debug_gaps(tmp_path_factory) -> dict[str, str]:
    return _repro_verdicts(tmp_path_factory.mktemp("repro"))


@pytest.fixture(autouse=True)
def _guest_debug_gate(request):
    mark = request.node.get_closest_marker("guest_debug")
    if mark is None or not os.environ.get("PYKVM_REFHOST"):
        return
    gaps = request.getfixturevalue("_host_debug_gaps")
    missing = [gaps[case] for case in mark.args if case in gaps]
    if missing:
        pytest.skip(f"{os.environ['PYKVM_REFHOST']} under QEMU TCG lacks it without pykvm too: "
                    f"scripts/guest_debug_repro.c long says {'; '.join(missing)} (README, 'The kvm_amd tier')")
