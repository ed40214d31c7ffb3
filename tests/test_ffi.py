"""pykvm._ffi: the pre-parsed module (cffi's out-of-line ABI mode) and the in-line cdef parse give the
same declarations, a stale module is never used, and the build writes the module."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import pykvm
from pykvm import _ffi, cdefs

ROOT = Path(__file__).resolve().parents[1]


def load_generated(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("kvm_cffi_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declarations(ffi, lib) -> dict[str, object]:
    """Every declared type's size, alignment and fields (offset, type, bit size), and every function."""
    typedefs, structs, unions = ffi.list_types()
    out: dict[str, object] = {}
    for name in typedefs:
        out[name] = ffi.typeof(name).cname
    for kind, names in (("struct", structs), ("union", unions)):
        for name in names:
            ctype = ffi.typeof(f"{kind} {name}")
            out[ctype.cname] = (ffi.sizeof(ctype), ffi.alignof(ctype),
                                [(f, ft.offset, ft.type.cname, ft.bitsize) for f, ft in ctype.fields or ()])
    for name in dir(lib):
        out[f"lib.{name}"] = ffi.typeof(getattr(lib, name)).cname
    return out


@pytest.fixture(scope="module")
def inline_ffi():
    return cdefs.build_ffi()


def test_generated_module_declares_what_the_cdef_text_does(tmp_path: Path, inline_ffi) -> None:
    path = tmp_path / cdefs.MODULE_FILE
    cdefs.write_module(str(path))
    generated = load_generated(path)
    assert generated.CDEF_TEXTS == cdefs.cdef_texts()
    assert generated.CDEF_FILES == cdefs.CDEF_FILES
    expected = declarations(inline_ffi, inline_ffi.dlopen(None))
    assert "struct kvm_run" in expected and "lib.ioctl" in expected
    assert declarations(generated.ffi, generated.ffi.dlopen(None)) == expected


def test_pykvm_ffi_matches_the_cdef_text(inline_ffi) -> None:
    """Whichever way pykvm._ffi was made in this process, it is the cdef text's declarations."""
    assert _ffi.SOURCE in ("generated", "inline")
    assert declarations(_ffi.ffi, _ffi.lib) == declarations(inline_ffi, inline_ffi.dlopen(None))


def test_a_stale_or_foreign_module_is_not_used(monkeypatch, tmp_path: Path) -> None:
    texts = cdefs.cdef_texts()
    path = tmp_path / cdefs.MODULE_FILE
    cdefs.write_module(str(path), texts=texts)

    def installed(module):
        """``module`` as what ``from . import _kvm_cffi`` finds (None: importing it raises ImportError)."""
        monkeypatch.setitem(sys.modules, cdefs.MODULE_NAME, module)
        if module is None:
            monkeypatch.delattr(pykvm, "_kvm_cffi", raising=False)
        else:
            monkeypatch.setattr(pykvm, "_kvm_cffi", module, raising=False)

    module = load_generated(path)
    installed(module)
    assert _ffi._generated(texts) is module.ffi
    edited = (texts[0] + "\nstruct added_later { int x; };\n", *texts[1:])
    assert _ffi._generated(edited) is None  # a .h edited after the module was written
    installed(types.ModuleType(cdefs.MODULE_NAME))
    assert _ffi._generated(texts) is None  # no CDEF_TEXTS: not made by cdefs.write_module
    installed(None)
    assert _ffi._generated(texts) is None


def test_inline_parse_writes_the_module_unless_bytecode_is_off(monkeypatch, tmp_path: Path) -> None:
    texts = cdefs.cdef_texts()
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    _ffi._inline(texts, str(tmp_path))
    assert not (tmp_path / cdefs.MODULE_FILE).exists()
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    ffi = _ffi._inline(texts, str(tmp_path))
    assert ffi.sizeof("struct kvm_run") == _ffi.ffi.sizeof("struct kvm_run")
    assert load_generated(tmp_path / cdefs.MODULE_FILE).CDEF_TEXTS == texts
    assert [name for name in os.listdir(tmp_path) if name != "__pycache__"] == [cdefs.MODULE_FILE]  # no temporary file
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):
        return  # root writes anywhere: nothing more to see
    assert _ffi._inline(texts, str(read_only)) is not None  # slower, still correct
    assert os.listdir(read_only) == []


def test_build_py_writes_the_module_into_the_package(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    module = load_generated(tmp_path / "pykvm" / cdefs.MODULE_FILE)
    assert module.CDEF_TEXTS == cdefs.cdef_texts()
    assert (tmp_path / "pykvm" / "cdefs" / "kvm.h").exists()
