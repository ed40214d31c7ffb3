"""The guest side of the host protocol agrees with the host side, and every guest builds.

- ``guests/include/pykvm.h`` mirrors ``pykvm/x86/layout.py``: ``PYKVM_<NAME>`` there is ``<NAME>`` here.
- Each ``guests/*.S`` opens with the header comment of DESIGN.md (what it does; Mode / Load / entry;
  Exits), and its load address and entry are what the built image really has.
- ``make -C guests BUILD=<dir>`` builds every guest into ``<dir>``, and nothing into ``guests/``.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pykvm.x86 import layout

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "guests"
HEADER = GUESTS / "include" / "pykvm.h"
SOURCES = sorted(GUESTS.glob("*.S"))
NAMES = [source.stem for source in SOURCES]
MAX_IMAGE = 64 * 1024

#: Numbers guest code needs (the host protocol, load addresses, selectors): pykvm.h must have them.
REQUIRED = {
    "REAL_LOAD", "PROTECTED_LOAD", "STACK_TOP", "MMIO_WINDOW",
    "CONSOLE_PORT", "CALL_PORT", "EXCEPTION_PORT",
    "CALL_DONE", "CALL_FAIL", "CALL_SYNC", "CALL_PRINT",
    "SEL_CODE64", "SEL_DATA", "SEL_CODE32", "SEL_CODE16",
    "SEL_USER_CODE32", "SEL_USER_DATA", "SEL_USER_CODE64", "SEL_TSS",
    "TEST_PORT",
}

DEFINE = re.compile(r"^#define[ \t]+PYKVM_(\w+)[ \t]+(\S+)", re.MULTILINE)
HEADER_COMMENT = re.compile(r"\A/\* (?P<file>\S+) - (?P<what>.+?)\n(?P<rest>.*?)\*/", re.DOTALL)
LOAD = re.compile(r"Load: flat at GPA (0x[0-9a-fA-F]+), entry = first byte")
MAKE_TOOLS = ("make", "gcc", "as", "ld", "objcopy")


def header_defines() -> dict[str, str]:
    """``#define PYKVM_<NAME> value`` lines of pykvm.h as ``{NAME: value}`` (the guard has no value)."""
    return dict(DEFINE.findall(HEADER.read_text()))


def header_comment(source: Path) -> re.Match:
    match = HEADER_COMMENT.match(source.read_text())
    assert match, f"{source.name}: must open with /* {source.name} - <what it does> ... */"
    return match


def load_address(source: Path) -> int:
    match = LOAD.search(header_comment(source)["rest"])
    assert match, f"{source.name}: the Load: line must read 'Load: flat at GPA 0x..., entry = first byte'"
    return int(match[1], 16)


def is_real_mode(source: Path) -> bool:
    return "Mode: 16-bit real mode" in header_comment(source)["rest"]


def is_long_mode(source: Path) -> bool:
    return "Mode: 64-bit long mode" in header_comment(source)["rest"]


# ---- pykvm.h mirrors layout.py --------------------------------------------------------------------


@pytest.mark.parametrize("name, text", sorted(header_defines().items()))
def test_define_mirrors_layout(name, text):
    try:
        value = int(text, 0)
    except ValueError:
        pytest.fail(f"PYKVM_{name} must be a plain integer literal, not {text!r}")
    assert hasattr(layout, name), f"pykvm.h defines PYKVM_{name}, but layout.py has no {name}"
    expected = getattr(layout, name)
    assert value == expected, f"PYKVM_{name} is {value:#x} in pykvm.h, {name} is {expected:#x} in layout.py"


def test_header_defines_what_guests_need():
    missing = REQUIRED - header_defines().keys()
    assert not missing, f"pykvm.h lacks PYKVM_ defines for {sorted(missing)}"


# ---- guest sources --------------------------------------------------------------------------------


def test_every_guest_is_here():
    expected = {"hello_real", "hello_protected", "hello_paged", "hello_pae", "hello_long", "cpuid_cpl",
                "io", "triple_fault", "fail", "spin", "wild_write", "sync"}
    assert expected <= set(NAMES), f"missing guests: {sorted(expected - set(NAMES))}"


@pytest.mark.parametrize("source", SOURCES, ids=NAMES)
def test_guest_header_comment(source):
    match = header_comment(source)
    assert match["file"] == source.name
    lines = match["rest"].splitlines()
    for key in ("Mode:", "Load:", "Exits:"):
        assert any(line.lstrip(" *").startswith(key) or f" {key} " in line for line in lines), (
            f"{source.name}: the header comment has no {key} line"
        )
    load = load_address(source)
    assert load == (layout.REAL_LOAD if is_real_mode(source) else layout.PROTECTED_LOAD)


def test_fail_header_names_the_fail_line():
    text = (GUESTS / "fail.S").read_text()
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "PYKVM_FAIL __LINE__" in row)
    assert f"FAIL(line={line}, value=0x2a" in header_comment(GUESTS / "fail.S")["rest"]


# ---- building ------------------------------------------------------------------------------------


def _need_tools():
    missing = [tool for tool in MAKE_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building guests needs {', '.join(missing)} (apt-get install build-essential)")


def _make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-C", str(GUESTS), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _source_tree() -> set[Path]:
    return {p for p in GUESTS.rglob("*") if "build" not in p.relative_to(GUESTS).parts and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    _need_tools()
    out = tmp_path_factory.mktemp("guests-build")
    before = _source_tree()
    _make(f"BUILD={out}")
    assert _source_tree() == before, "building with BUILD=<dir> wrote into guests/"
    return out


def _elf(data: bytes) -> tuple[int, int, int, list[tuple[int, int, int, int]]]:
    """(class, machine, entry, [(p_type, p_offset, p_paddr, p_filesz), ...]) of a little-endian ELF."""
    assert data[:4] == b"\x7fELF" and data[5] == 1, "not a little-endian ELF"
    klass = data[4]
    if klass == 1:
        _, machine, _, entry, phoff, _, _, _, phentsize, phnum = struct.unpack_from("<HHIIIIIHHH", data, 16)
        phdrs = [struct.unpack_from("<8I", data, phoff + i * phentsize) for i in range(phnum)]
        segments = [(p[0], p[1], p[3], p[4]) for p in phdrs]
    else:
        _, machine, _, entry, phoff, _, _, _, phentsize, phnum = struct.unpack_from("<HHIQQQIHHH", data, 16)
        phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
        segments = [(p[0], p[2], p[4], p[5]) for p in phdrs]
    return klass, machine, entry, segments


@pytest.mark.parametrize("source", SOURCES, ids=NAMES)
def test_guest_builds_to_flat_image(build, source):
    image = (build / f"{source.stem}.bin").read_bytes()
    elf = (build / f"{source.stem}.elf").read_bytes()
    assert 0 < len(image) < MAX_IMAGE, f"{source.stem}.bin is {len(image)} bytes"

    klass, machine, entry, segments = _elf(elf)
    if is_long_mode(source):
        assert (klass, machine) == (2, 62), "a long-mode guest is an ELF64 x86-64 image"
    else:
        assert (klass, machine) == (1, 3), "a real- or protected-mode guest is an ELF32 i386 image"

    load = load_address(source)
    assert entry == load, f"entry {entry:#x} is not the load address {load:#x} the header names"
    loads = [s for s in segments if s[0] == 1]  # PT_LOAD
    assert len(loads) == 1, f"expected one PT_LOAD segment, got {len(loads)}"
    _, offset, paddr, filesz = loads[0]
    assert paddr == load
    # The flat image is that segment, so its first bytes are the instructions at the entry.
    assert image == elf[offset:offset + filesz]
    assert image[:16] == elf[offset + entry - paddr : offset + filesz][:16]


def test_make_one_guest_into_a_cache_dir(tmp_path):
    """The call pykvm makes: ``make -C <guests> BUILD=<cache> <cache>/NAME.bin``."""
    _need_tools()
    target = tmp_path / "hello_long.bin"
    _make(f"BUILD={tmp_path}", str(target))
    assert target.stat().st_size > 0
    assert (tmp_path / "hello_long.elf").exists()
    assert not (tmp_path / "hello_real.bin").exists(), "asked for one guest, built others"


@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_c_part_compiles_freestanding(tmp_path, arch):
    """The C half of pykvm.h compiles cleanly for a freestanding guest in both widths."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (apt-get install build-essential)")
    source = tmp_path / "guest.c"
    source.write_text(
        '#include "pykvm.h"\n'
        "void _start(void)\n{\n"
        '\tpykvm_puts("hi\\n");\n'
        "\tpykvm_outb(PYKVM_TEST_PORT, pykvm_inb(PYKVM_TEST_PORT));\n"
        "\tpykvm_outw(PYKVM_TEST_PORT, pykvm_inw(PYKVM_TEST_PORT));\n"
        "\tpykvm_outl(PYKVM_TEST_PORT, pykvm_inl(PYKVM_TEST_PORT));\n"
        "\tpykvm_sync(1);\n"
        '\tpykvm_print("printed");\n'
        "\tPYKVM_ASSERT(pykvm_inb(PYKVM_TEST_PORT) == 1, 0x2a);\n"
        "\tpykvm_done(0);\n}\n"
    )
    result = subprocess.run(
        ["gcc", arch, "-O2", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-nostdlib", "-fno-pie",
         "-mgeneral-regs-only", f"-I{HEADER.parent}", "-c", str(source), "-o", str(tmp_path / "guest.o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
