"""pykvm's structure layouts, ioctl numbers and constants, checked against the installed <linux/kvm.h>.

Every value is keyed by the C expression that computes it (``sizeof(struct kvm_regs)``,
``offsetof(struct kvm_run, io.port)``, ``KVM_GET_REGS``); one generated C program prints them all.
"""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from cffi import FFI

from pykvm import constants
from pykvm._ffi import _cdef_text, ffi
from pykvm.ioctl import REQUESTS

CC = shutil.which("cc")
HEADER = Path("/usr/include/linux/kvm.h")
_MISSING = ("no C compiler (cc) on PATH (apt-get install build-essential)" if CC is None else ""
            if HEADER.exists() else f"no {HEADER} (apt-get install linux-libc-dev)")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)

CType = type(ffi.typeof("int"))
STRUCTS = re.findall(r"^struct (\w+) \{", _cdef_text("kvm.h"), re.MULTILINE)

#: Enum -> prefix of its <linux/kvm.h> macros.
ENUM_PREFIXES: dict[type[enum.IntEnum], str] = {
    constants.Cap: "KVM_CAP_",
    constants.ExitReason: "KVM_EXIT_",
    constants.InternalErrorSub: "KVM_INTERNAL_ERROR_",
    constants.SystemEventType: "KVM_SYSTEM_EVENT_",
    constants.MpState: "KVM_MP_STATE_",
}
#: Groups whose members may be newer than the installed header.
NEWER_ALLOWED = {"Cap", "ExitReason"}


def _macro_groups() -> dict[str, dict[str, int]]:
    """Macro name -> pykvm's value, per group: requests, each enum, the module-level flags."""
    groups = {cls.__name__: {prefix + m.name: int(m) for m in cls} for cls, prefix in ENUM_PREFIXES.items()}
    groups["flags"] = {"KVM_" + n: v for n, v in vars(constants).items() if n.isupper() and type(v) is int}
    groups["requests"] = dict(REQUESTS)
    return groups


MACROS = _macro_groups()


def _offsets(ctype: CType, prefix: str = "", base: int = 0) -> Iterator[tuple[str, int]]:
    """(dotted path, offset) of each field; recurses into anonymous struct/union types.

    cffi already flattens anonymous *members* into ``.fields``, matching C's direct naming.
    Bitfields have no offsetof and are left to the size check.
    """
    for name, field in ctype.fields:
        if field.bitsize != -1:
            continue
        path, offset, ftype = prefix + name, base + field.offset, field.type
        yield path, offset
        if ftype.kind == "array":
            path, ftype = path + "[0]", ftype.item
        if ftype.kind in ("struct", "union") and "$" in ftype.cname:
            yield from _offsets(ftype, path + ".", offset)


def layout(cffi: FFI, name: str) -> dict[str, int]:
    """sizeof and every field offset of ``struct name`` as ``cffi`` declares it."""
    ctype = cffi.typeof(f"struct {name}")
    values = {f"sizeof(struct {name})": cffi.sizeof(ctype)}
    values.update((f"offsetof(struct {name}, {path})", off) for path, off in _offsets(ctype))
    return values


def header_values(exprs: Iterable[str], workdir: Path) -> dict[str, int | None]:
    """Compile and run a C program printing each expression; a macro not defined gives None."""
    body = []
    for expr in exprs:
        show = f'printf("%s %lld\\n", "{expr}", (long long)({expr}));'
        body.append(f'#ifdef {expr}\n{show}\n#else\nputs("{expr} -");\n#endif' if expr.isidentifier() else show)
    src, exe = workdir / "kvm_layout.c", workdir / "kvm_layout"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm.h>\n#include <linux/kvm_para.h>\n\nint main(void)\n{\n"
                   + "\n".join(body) + "\nreturn 0;\n}\n")
    for cmd in ([CC, "-std=gnu11", "-o", str(exe), str(src)], [str(exe)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"{cmd[0]} failed:\n{proc.stderr}", pytrace=False)
    pairs = (line.rsplit(" ", 1) for line in proc.stdout.splitlines())
    return {expr: None if value == "-" else int(value) for expr, value in pairs}


def compare(ours: dict[str, int], header: dict[str, int | None]) -> tuple[list[str], list[str]]:
    """(mismatches, names the header lacks) of pykvm's values against the header's."""
    wrong = [f"{expr}: pykvm {value:#x}, header {header[expr]:#x}"
             for expr, value in ours.items() if header[expr] is not None and header[expr] != value]
    return wrong, [expr for expr in ours if header[expr] is None]


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | None]:
    """Every value the tests compare, as the installed header gives it (one compile)."""
    exprs = [e for name in STRUCTS for e in layout(ffi, name)] + [m for g in MACROS.values() for m in g]
    return header_values(exprs, tmp_path_factory.mktemp("layout"))


def test_structs_found() -> None:
    assert {"kvm_regs", "kvm_run", "kvm_vcpu_events", "kvm_irqchip"} <= set(STRUCTS)


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_layout(name: str, header: dict[str, int | None]) -> None:
    wrong, _ = compare(layout(ffi, name), header)
    assert not wrong, f"struct {name} differs from <linux/kvm.h>:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("group", MACROS)
def test_macros(group: str, header: dict[str, int | None]) -> None:
    wrong, absent = compare(MACROS[group], header)
    if group not in NEWER_ALLOWED:
        wrong += [f"{name}: not in header" for name in absent]
    elif absent:
        warnings.warn(f"{group}: not in header (newer), not checked: {', '.join(absent)}", stacklevel=1)
    assert not wrong, f"{group} differs from <linux/kvm.h>:\n  " + "\n  ".join(wrong)


def test_checker_reports_mismatches(tmp_path: Path) -> None:
    """A wrong cdef (kvm_regs without rdx..r15) and an unknown request are both caught."""
    wrong_ffi = FFI()
    wrong_ffi.cdef("typedef uint64_t __u64; struct kvm_regs { __u64 rax, rbx, rcx; __u64 rip, rflags; };")
    ours = layout(wrong_ffi, "kvm_regs") | {"KVM_NO_SUCH_REQUEST": 1}
    wrong, absent = compare(ours, header_values(ours, tmp_path))
    assert "sizeof(struct kvm_regs): pykvm 0x28, header 0x90" in wrong
    assert "offsetof(struct kvm_regs, rip): pykvm 0x18, header 0x80" in wrong
    assert "offsetof(struct kvm_regs, rax): pykvm 0x0, header 0x0" not in wrong
    assert absent == ["KVM_NO_SUCH_REQUEST"]
