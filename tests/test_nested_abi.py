"""The L1 hypervisors' header (guests/nested/nested.h) and pykvm.nested.layout say the same.

A C program built against the header prints every constant and each field offset of
``struct nested_blob``; both must match the Python side, and every constant of the header must
have a Python twin (a new one added to one side only fails here).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pykvm.nested import layout

ROOT = Path(__file__).resolve().parents[1]
NESTED = ROOT / "guests" / "nested"
HEADER = NESTED / "nested.h"
L1_HEADER = NESTED / "l1.h"
DEFINE = re.compile(r"^#define[ \t]+([A-Z][A-Z0-9_]*)[ \t]+(\S+)", re.MULTILINE)


def _defines(path: Path) -> list[str]:
    return [name for name, _ in DEFINE.findall(path.read_text()) if not name.endswith("_H")]


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt-get install build-essential)")
    names = _defines(HEADER) + [n for n in _defines(L1_HEADER) if n.startswith("STATUS_")]
    fields = [name for name, _ in layout.HEADER_FIELDS]
    # Not <stdio.h>: the kernel's print.h declares its own putc.
    lines = ['#include "l1.h"', "int printf(const char *, ...);", "int main(void) {"]
    lines += [f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in names]
    lines += [f'printf("offset.{f} %zu\\n", __builtin_offsetof(struct nested_blob, {f}));' for f in fields]
    lines += ['printf("sizeof %zu\\n", sizeof(struct nested_blob));', "return 0; }"]
    tmp = tmp_path_factory.mktemp("nested_abi")
    src, exe = tmp / "abi.c", tmp / "abi"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-w", "-I", str(NESTED), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_constant_of_the_header_has_its_python_twin(c_values):
    names = [n for n in c_values if not n.startswith(("offset.", "sizeof"))]
    assert len(names) >= 38  # every #define of nested.h and the STATUS_ codes of l1.h
    missing = [n for n in names if not hasattr(layout, n)]
    assert not missing, f"pykvm/nested/layout.py lacks {missing}"
    wrong = {n: (c_values[n], getattr(layout, n)) for n in names if getattr(layout, n) != c_values[n]}
    assert not wrong, f"header vs layout.py differ (C, Python): {wrong}"


def test_the_blob_header_layout_matches_struct_nested_blob(c_values):
    offsets = layout.header_offsets()
    assert {f: c_values[f"offset.{f}"] for f in offsets} == offsets
    assert c_values["sizeof"] == layout.HEADER.size


def test_the_magic_spells_pykvmnst():
    assert layout.NESTED_MAGIC.to_bytes(8, "little") == b"PYKVMNST"


def test_the_l2_layout_fits_and_does_not_overlap():
    regions = sorted([
        (layout.L2_GDT, 0x1000), (layout.L2_TSS, 0x1000), (layout.L2_CR3_A, 0x10000),
        (layout.L2_CR3_B, 0x10000), (layout.L2_CODE, 0x10000), (layout.L2_RO_PAGE, 0x1000),
        (layout.L2_PAGE_A, 0x1000), (layout.L2_PAGE_B, 0x1000),
    ])  # fmt: skip
    for (a, size), (b, _) in itertools.pairwise(regions):
        assert a + size <= b, f"{a:#x}+{size:#x} overlaps {b:#x}"
    assert regions[-1][0] + regions[-1][1] <= layout.L2_STACK_TOP <= layout.L2_MEM_SIZE
    assert layout.L2_MEM_OFFSET + layout.L2_MEM_SIZE <= layout.NESTED_MAX_SIZE
    # the linear addresses the scenario switches lie outside the identity-mapped L2 memory
    assert layout.L2_SWITCH_VA >= layout.L2_MEM_SIZE and layout.L2_TAG_VA >= layout.L2_MEM_SIZE
