"""Each subcommand imports only what it uses: which modules are loaded, never how long it took.

A fresh interpreter runs ``pykvm.cli.main(argv)`` and reports ``sys.modules`` afterwards; speed is
measured by ``scripts/bench_startup.py``, as a ratio to the interpreter's own start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: What `pykvm run` of a flat image never needs: the probe, the models, the nested and Linux boot
#: machinery, the debugger and tracer, virtio, pyelftools (ELF images only), capstone (--trace only),
#: rich (--stats / --dump-pagetables only), and cffi's cdef parser (pykvm._kvm_cffi is pre-parsed).
#: (ctypes is loaded: ioctl_opt, which computes the request numbers, imports it.)
NOT_FOR_RUN = ("pykvm.probe", "pykvm.model", "pykvm.nested", "pykvm.boot", "pykvm.gdbstub", "pykvm.trace",
               "pykvm.virtio", "pykvm.loaders.linux", "pykvm.initramfs", "pykvm.qemu", "pykvm.testing",
               "elftools", "capstone", "rich", "cffi", "pycparser")

_WRAPPER = """
import json, sys
from pykvm.cli import main
try:
    status = main(sys.argv[2:])
except SystemExit as e:  # --help
    status = e.code
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "modules": sorted(sys.modules)}, f)
"""


def imported_by(tmp_path, *argv: str) -> tuple[int, set[str]]:
    """(exit status, every module in sys.modules) after ``pykvm ARGV`` in a fresh interpreter."""
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(out), *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert out.exists(), proc.stderr
    doc = json.loads(out.read_text())
    return doc["status"], set(doc["modules"])


def loaded(modules: set[str], *packages: str) -> list[str]:
    """The modules of ``modules`` that are, or are inside, one of ``packages``."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def _generated_ffi_in_use() -> bool:
    code = "import pykvm._ffi as f; print(f.SOURCE)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "generated"


@pytest.mark.kvm
def test_run_of_the_default_guest_imports_only_what_it_uses(tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    status, modules = imported_by(tmp_path, "run", "--serial", "none")
    assert status == 0
    assert "pykvm.machine" in modules and "pykvm.loaders.detect" in modules  # it did run a guest
    unexpected = NOT_FOR_RUN if _generated_ffi_in_use() else tuple(m for m in NOT_FOR_RUN if m not in ("cffi",
                                                                                                      "pycparser"))
    assert loaded(modules, *unexpected) == []


def test_probe_json_does_not_import_rich_or_the_run_machinery(tmp_path):
    status, modules = imported_by(tmp_path, "probe", "--json", "--from-dump",
                                  str(_dump("cpuid/AuthenticAMD0800F11_K17_Zen3_CPUID.txt")))
    assert status in (0, 66)
    assert "pykvm.probe.report" in modules
    assert loaded(modules, "rich", "pykvm.machine", "pykvm.model", "pykvm.nested", "pykvm.boot", "pykvm.loaders",
                  "elftools", "capstone") == []


def test_a_subcommand_builds_only_its_own_parser(tmp_path):
    status, modules = imported_by(tmp_path, "run", "--help")
    assert status == 0
    assert loaded(modules, "pykvm.model", "pykvm.nested", "pykvm.boot", "pykvm.probe", "pykvm.machine") == []


def test_the_top_level_help_still_lists_every_subcommand(capsys):
    from pykvm import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert f"    {name}" in listed, name


def test_loaders_are_imported_when_first_used(tmp_path):
    code = ("import json, sys, pykvm.loaders as L\n"
            "subs = lambda: sorted(m for m in sys.modules if m.startswith('pykvm.loaders.'))\n"
            "before = subs(); L.detect_image; after = subs()\n"
            "from pykvm.loaders import load_linux\n"
            "print(json.dumps([before, after, load_linux.__module__, 'elftools' in sys.modules]))")
    before, after, module, elftools = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                                text=True, check=True).stdout)
    assert before == [] and "pykvm.loaders.detect" in after and "pykvm.loaders.linux" not in after
    assert module == "pykvm.loaders.linux"
    assert not elftools  # telling formats apart and the Linux loader need no pyelftools
    from pykvm import loaders

    assert all(getattr(loaders, name) is not None for name in loaders.__all__)
    assert set(loaders.__all__) <= set(dir(loaders))


def _dump(name: str):
    from pathlib import Path

    path = Path(__file__).resolve().parent / "data" / name
    if not path.exists():
        pytest.skip(f"no {path.name} in tests/data")
    return path
