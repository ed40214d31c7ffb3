"""The pytest plugin: test guest code (boot code, freestanding C, a few lines of assembly) under /dev/kvm.

Installed with pykvm as the ``pytest11`` entry point, so it is active in any pytest run; where
plugin autoloading is off, ``-p pykvm.testing`` (or ``pytest_plugins = ["pykvm.testing"]`` in a
root conftest.py) turns it on. What it gives a test:

Fixtures
    ``kvm_machine(mode="long", *, image=None, mem=..., cpus=1, irqchip=False, ...) -> Machine``
        a ready :class:`~pykvm.machine.Machine` with its boot vCPU set up in ``mode`` (with
        ``image`` loaded and entered), closed when the test ends.
    ``guest_asm(source, mode="long", ...) -> GuestImage``, ``guest_c(source, mode="long", ...)``,
    ``guest_build(*files, mode="long", ...)``
        flat guest images built with the system toolchain (gcc, ld, objcopy; ``$PYKVM_CC``,
        ``$PYKVM_LD``, ``$PYKVM_OBJCOPY`` choose others) and cached under pytest's cache directory.
        ``#include "pykvm.h"`` works (the guest side of pykvm's host protocol); an assembly snippet
        without ``_start`` is wrapped (entered at its first line, DONE(0) if it runs off its end);
        C without ``_start`` is entered at ``int main(void)``, whose return value is the DONE status.
        A guest that does not build fails the test with the compiler's error lines, which point
        into the test file itself when the snippet is a literal there.
    ``run_guest(image_or_machine, mode=None, *, timeout=10, check=True, ...) -> GuestResult``
        runs a guest to its end. With ``check`` (the default) the guest's FAIL becomes a pytest
        failure that reads ``guest FAIL at test_x.py:12: assertion failed: n == 3 (value 0x2)``,
        and so do a non-zero DONE status and every :class:`~pykvm.machine.GuestError` (with the
        registers and the code at RIP).
    ``kvm_backend`` the module serving /dev/kvm (kvm_intel, kvm_amd, kvm_pvm) or None.

Functions
    :func:`expect_exit` runs a vCPU to its next exit and asserts its kind and fields;
    :func:`check_outcome` and :func:`format_failure` do for any Outcome what ``run_guest`` does.

Markers and options
    ``@pytest.mark.kvm`` needs /dev/kvm; ``@pytest.mark.kvm_cap("SPLIT_IRQCHIP", ...)`` needs KVM
    capabilities (the names of :class:`pykvm.constants.Cap`). Tests that use ``kvm_machine`` or
    ``run_guest`` are marked ``kvm`` by the plugin. Where the host lacks what a test needs (no
    /dev/kvm, a capability, a mode the backend cannot run, the toolchain) the test is skipped
    with the reason; ``--kvm-required`` (or ``kvm_required = true`` in the ini file) makes each
    such skip a failure, for CI runners that must have KVM. ``--kvm-backend=kvm_amd`` (or
    kvm_intel, kvm_pvm) fails every KVM test unless that module serves /dev/kvm, so that a tier
    meant for one backend cannot pass on another.

Every pytest-xdist worker makes its own VMs; the image cache is shared (written by atomic rename).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, NoReturn, Sequence

import pytest

from . import exits, system
from .constants import Cap
from .images import guests_dir
from .ioctl import KvmUnavailableError, KvmUnsupportedError
from .machine import GuestError, Machine, describe_exit
from .outcome import GuestFailure, Outcome
from .probe.host import kvm_backend as _host_kvm_backend
from .report import CpuState
from .x86 import layout
from .x86.modes import Mode

__all__ = [
    "GuestBuildError",
    "GuestBuildWarning",
    "GuestBuilder",
    "GuestImage",
    "GuestResult",
    "ToolchainMissing",
    "check_outcome",
    "expect_exit",
    "format_failure",
]

#: Bumped whenever what a build produces changes for the same inputs (the wrappers, the flags).
CACHE_VERSION = 1

#: Tests that use these fixtures need /dev/kvm: the plugin marks them ``kvm``.
KVM_FIXTURES = ("kvm_machine", "kvm_reset_machine", "run_guest")

#: Flags for freestanding C guests. No SSE (this machine's KVM emulates CPL0 code and has no
#: SSE/AVX there), no red zone and no CET landing pads (bare-metal code), and no loops turned
#: into calls of memset/memcpy (a guest's own memset would call itself).
C_FLAGS = (
    "-std=gnu11", "-O2", "-Wall", "-Wextra", "-ffreestanding", "-fno-pie", "-fno-pic", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-exceptions", "-fcf-protection=none", "-mgeneral-regs-only",
    "-mno-red-zone", "-fno-tree-loop-distribute-patterns",
)
ASM_FLAGS = ("-Wa,--noexecstack",)
_ASM_SUFFIXES = {".S": "asm", ".sx": "asm", ".s": "asm", ".c": "c", ".o": "obj", ".a": "obj"}
_CODE = {16: ".code16", 32: ".code32", 64: ".code64"}


# ---- images and results ----------------------------------------------------------------------------

class GuestImage(bytes):
    """A flat guest image (the bytes to load) that knows its mode, load address, entry, the files
    it was built from, and its symbols (``image.symbols["boot_info"]``: the address of a label)."""

    mode: Mode
    load: int
    entry: int
    sources: tuple[str, ...]
    elf: bytes
    warnings: str  # what the compiler and assembler warned about (empty: nothing)

    def __new__(cls, data: bytes, *, mode: Mode | str, load: int, entry: int,
                sources: Sequence[str] = (), elf: bytes = b"", warnings: str = "") -> "GuestImage":
        self = super().__new__(cls, data)
        self.mode, self.load, self.entry = Mode(mode), load, entry
        self.sources, self.elf, self.warnings = tuple(sources), elf, warnings
        return self

    def __repr__(self) -> str:
        where = f" from {', '.join(self.sources)}" if self.sources else ""
        return (f"<GuestImage {self.mode.value} mode, {len(self)} bytes at {self.load:#x}, "
                f"entry {self.entry:#x}{where}>")

    @functools.cached_property
    def symbols(self) -> dict[str, int]:
        """Every named symbol of the linked ELF (labels, functions, variables) -> its address."""
        from elftools.elf.elffile import ELFFile

        table = ELFFile(io.BytesIO(self.elf)).get_section_by_name(".symtab") if self.elf else None
        if table is None:
            return {}
        return {s.name: s["st_value"] for s in table.iter_symbols()
                if s.name and s["st_shndx"] != "SHN_UNDEF" and s["st_info"]["type"] != "STT_FILE"}


@dataclasses.dataclass(frozen=True)
class GuestResult(Outcome):
    """What :func:`run_guest` returns: the :class:`~pykvm.outcome.Outcome` plus the console output,
    the SYNC values, and the machine it ran on (open until the test ends: read its memory)."""

    console: bytes = b""
    syncs: tuple[int, ...] = ()
    machine: Machine | None = dataclasses.field(default=None, repr=False, compare=False)


_FILE_PREFIX = re.compile(r"^(?P<file>[^\s:]+\.(?:c|h|S|s|sx|py|cc|cpp|asm|inc)): (?P<rest>.*)$", re.DOTALL)


def format_failure(failure: GuestFailure, image: bytes | None = None) -> str:
    """``guest FAIL at FILE:LINE: MESSAGE (value 0x..)``. The file is the one the message starts
    with (``PYKVM_ASSERT`` writes ``__FILE__: assertion failed: cond``), else the image's only
    source; without either, ``guest FAIL at line N``."""
    message = failure.message
    where = f"line {failure.line}"
    match = _FILE_PREFIX.match(message)
    if match:
        where, message = f"{match['file']}:{failure.line}", match["rest"]
    elif isinstance(image, GuestImage) and len(image.sources) == 1:
        where = f"{image.sources[0]}:{failure.line}"
    return f"guest FAIL at {where}: {message or '(no message)'} (value {failure.value:#x})"


def check_outcome(outcome: Outcome, image: bytes | None = None) -> Outcome:
    """Fail the test (as a pytest failure, without a traceback) unless the guest said DONE(0)."""
    __tracebackhide__ = True
    if outcome.failure is not None:
        pytest.fail(format_failure(outcome.failure, image), pytrace=False)
    if outcome.status != 0:
        said = "wrote to isa-debug-exit: status" if outcome.via == "isa-debug-exit" else "said DONE with status"
        pytest.fail(f"guest {said} {outcome.status} (not 0; pykvm run would exit {outcome.exit_status}); "
                    "run_guest(..., check=False) returns it instead", pytrace=False)
    return outcome


def _guest_error_message(error: GuestError) -> str:
    from .status import of_error

    return f"{type(error).__name__} (pykvm run would exit {of_error(error)}): {error.report()}"


def expect_exit(machine, kind: type | str, /, **fields) -> exits.Exit:
    """Run ``machine`` (or a bare Vcpu) to its next exit and assert that it is a ``kind`` (an
    :mod:`pykvm.exits` class or its name) whose ``fields`` have these values (or satisfy these
    predicates); returns the exit. Nothing handles the exit: the guest is where it stopped.

    ``expect_exit(m, exits.IoOut, port=0x80, data=b"\\x01")``"""
    __tracebackhide__ = True
    vcpu, memory = (machine.vcpu, machine.memory) if isinstance(machine, Machine) else (machine, None)
    if isinstance(kind, str):
        if not isinstance(getattr(exits, kind, None), type):
            raise ValueError(f"no exit kind {kind!r} in pykvm.exits")
        kind = getattr(exits, kind)
    while True:
        exit = vcpu.run()
        if type(exit) is not exits.Intr:  # a signal for someone else
            break
    wanted = f"{kind.__name__}({', '.join(f'{k}={_show(v)}' for k, v in fields.items())})"
    problems = []
    if not isinstance(exit, kind):
        problems.append(f"the next exit is a {type(exit).__name__}")
    else:
        for name, want in fields.items():
            if not hasattr(exit, name):
                raise TypeError(f"{kind.__name__} has no field {name!r} "
                                f"(it has {', '.join(f.name for f in dataclasses.fields(exit))})")
            got = getattr(exit, name)
            got = bytes(got) if isinstance(got, (memoryview, bytearray)) else got
            ok = want(got) if callable(want) and not isinstance(want, type) else got == want
            if not ok:
                problems.append(f"{name} is {_show(got)}")
    if problems:
        state = f"\n{CpuState.capture(vcpu, memory).format()}" if memory is not None else ""
        pytest.fail(f"expected {wanted}, but {', '.join(problems)}: {describe_exit(exit)}{state}", pytrace=False)
    return exit


def _show(value) -> str:
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return f"{value:#x}"
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


# ---- building guests ----------------------------------------------------------------------------------

class GuestBuildError(Exception):
    """The toolchain refused a guest; ``output`` holds its error lines (temporary paths removed)."""

    def __init__(self, what: str, output: str = ""):
        super().__init__(f"{what}\n{output}".rstrip())
        self.what, self.output = what, output


class ToolchainMissing(GuestBuildError):
    """gcc, ld or objcopy is not installed: this host cannot build guests."""


class GuestBuildWarning(UserWarning):
    """The compiler or assembler warned while building a guest."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of a build: an inline snippet (``text``) or a file (``path``), with the name
    its errors and ``__FILE__`` show (``label``)."""

    kind: str  # "asm", "c" or "obj"
    label: str
    text: str | None = None
    path: Path | None = None
    directory: Path | None = None  # a snippet's #include "x.h" also looks here (the test file's directory)


@dataclasses.dataclass(frozen=True)
class Toolchain:
    cc: str = "gcc"
    ld: str = "ld"
    objcopy: str = "objcopy"

    @classmethod
    def from_environment(cls) -> "Toolchain":
        env = os.environ
        return cls(env.get("PYKVM_CC") or "gcc", env.get("PYKVM_LD") or "ld", env.get("PYKVM_OBJCOPY") or "objcopy")

    def missing(self) -> list[str]:
        return [tool for tool in (self.cc, self.ld, self.objcopy) if shutil.which(tool) is None]

    def identity(self) -> dict:
        """What the cache key needs to know of the tools: their paths and versions."""
        return {tool: _tool_version(shutil.which(tool) or tool) for tool in (self.cc, self.ld, self.objcopy)}

    @functools.lru_cache(maxsize=None)
    def ld_extra_flags(self) -> tuple[str, ...]:
        out = _quiet([self.ld, "--help"])
        return ("--no-warn-rwx-segments",) if "--no-warn-rwx-segments" in out else ()

    @functools.lru_cache(maxsize=None)
    def libgcc(self, arch: str) -> tuple[str, ...]:
        """libgcc for ``arch`` (-m32/-m64) where installed: helpers such as 64-bit division on i386."""
        path = _quiet([self.cc, arch, "-print-libgcc-file-name"]).strip()
        return (path,) if path and os.path.isfile(path) else ()


def _quiet(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout
    except OSError:
        return ""


def _tool_version(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return path
    return _tool_version_at(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _tool_version_at(path: str, mtime: int, size: int) -> str:
    first = _quiet([path, "--version"]).partition("\n")[0]
    return f"{path}: {first}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_hash(path: str | Path) -> str | None:
    try:
        return _sha256(Path(path).read_bytes())
    except OSError:
        return None


def _parse_deps(text: str) -> list[str]:
    """The prerequisites of the one rule in a gcc -MD file."""
    body = text.replace("\\\n", " ").partition(": ")[2]
    names = re.findall(r"(?:\\ |[^\s])+", body)
    return [n.replace("\\ ", " ") for n in names]


def _arch(mode: Mode) -> tuple[str, str]:
    """(gcc flag, ld emulation) for code that runs in ``mode``."""
    return ("-m64", "elf_x86_64") if mode is Mode.LONG else ("-m32", "elf_i386")


class GuestBuilder:
    """Builds flat guest images with the system toolchain, cached in ``cache_dir``.

    The cache key is a hash of the inputs (sources, mode, load address, flags, linker script,
    tool versions); an entry also records every header the compiler read, with its hash, and is
    used only while they are unchanged. Entries are written to a temporary file and renamed, so
    several processes (pytest-xdist workers) may build the same guest at once."""

    def __init__(self, cache_dir: str | os.PathLike, toolchain: Toolchain | None = None, *,
                 cwd: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir)
        self.toolchain = toolchain or Toolchain.from_environment()
        self.cwd = Path(cwd or os.getcwd())
        self.include = guests_dir() / "include"
        self.linker_script = guests_dir() / "flat.ld"

    # -- sources --
    def label(self, path: str | os.PathLike) -> str:
        """How a file is named in errors and ``__FILE__``: relative to ``cwd`` when inside it."""
        p = Path(path).absolute()
        try:
            return str(p.relative_to(self.cwd))
        except ValueError:
            return str(p)

    def file(self, path: str | os.PathLike) -> Source:
        p = Path(path)
        if not p.is_absolute():
            p = self.cwd / p
        kind = _ASM_SUFFIXES.get(p.suffix)
        if kind is None:
            raise GuestBuildError(f"{path}: not a guest source (.S, .s, .c, or .o/.a to link)")
        if not p.is_file():
            raise GuestBuildError(f"{path}: no such file")
        return Source(kind, self.label(p), path=p)

    @staticmethod
    def snippet(kind: str, text: str, mode: Mode | str, *, label: str, line: int = 1,
                directory: str | os.PathLike | None = None) -> Source:
        """A snippet as a whole source file: ``pykvm.h`` included, and ``#line`` so that errors,
        ``__LINE__`` and ``__FILE__`` name ``label`` at ``line``. Assembly without ``_start`` is
        wrapped: entered at its first line, DONE(0) if it runs off its end."""
        mode = Mode(mode)
        marker = f'#line {line} "{label}"\n'
        directory = Path(directory) if directory is not None else None
        if kind == "c":
            return Source("c", label, text='#include "pykvm.h"\n' + marker + text + "\n", directory=directory)
        if re.search(r"^\s*_start\s*:|\.glob(a)?l\s+_start\b", text, re.MULTILINE):
            return Source("asm", label, text='#include "pykvm.h"\n' + marker + text + "\n", directory=directory)
        code = _CODE[mode.bits]
        head = f'#include "pykvm.h"\n\t{code}\n\t.section .text.entry, "ax"\n\t.globl _start\n_start:\n'
        tail = '#line 1 "<pykvm: end of snippet>"\n\t.section .text.entry, "ax"\n\tPYKVM_DONE 0\n'
        return Source("asm", label, text=head + marker + text + "\n" + tail, directory=directory)

    # -- building --
    def build(self, sources: Sequence[Source], mode: Mode | str = Mode.LONG, *, load: int | None = None,
              flags: Sequence[str] = (), include: Iterable[str | os.PathLike] = (),
              linker_script: str | os.PathLike | None = None) -> GuestImage:
        """Compile, assemble and link ``sources`` into a flat image (from the cache when it can)."""
        mode = Mode(mode)
        if not sources:
            raise GuestBuildError("nothing to build: no sources")
        if mode is Mode.REAL and any(s.kind == "c" for s in sources):
            raise GuestBuildError("freestanding C needs protected, paged, pae or long mode: gcc's 16-bit "
                                  "code (-m16) assumes that SS and DS share a base, and real mode's do not")
        missing = self.toolchain.missing()
        if missing:
            raise ToolchainMissing(f"building guests needs {', '.join(missing)}: install gcc and binutils "
                                   "(apt-get install build-essential)")
        load = mode.default_load if load is None else load
        script = Path(linker_script).absolute() if linker_script else self.linker_script
        includes = [Path(d).absolute() for d in include]
        key = self._key(sources, mode, load, list(flags), includes, script)
        entry = self.cache_dir / f"{key}.json"
        cached = self._lookup(entry)
        if cached is not None:
            return cached
        image, record = self._build(sources, mode, load, list(flags), includes, script)
        self._store(entry, record)
        return image

    def _key(self, sources, mode, load, flags, includes, script) -> str:
        described = []
        for s in sources:
            content = s.text if s.text is not None else _file_hash(s.path)
            described.append([s.kind, s.label, str(s.path or ""), content])
        key = {
            "version": CACHE_VERSION, "mode": mode.value, "load": load, "flags": flags,
            "include": [str(d) for d in includes], "script": [str(script), _file_hash(script)],
            "sources": described, "directories": [str(s.directory or "") for s in sources],
            "tools": self.toolchain.identity(), "c_flags": C_FLAGS,
        }
        return _sha256(json.dumps(key, sort_keys=True).encode())[:32]

    def _lookup(self, entry: Path) -> GuestImage | None:
        try:
            record = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        if any(_file_hash(path) != digest for path, digest in record["deps"].items()):
            return None
        return _image_from_record(record)

    def _store(self, entry: Path, record: dict) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{entry.stem}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, entry)
        except OSError:  # a read-only cache still builds; it just does not remember
            pass

    def _build(self, sources, mode, load, flags, includes, script) -> tuple[GuestImage, dict]:
        arch, emulation = _arch(mode)
        with tempfile.TemporaryDirectory(prefix="pykvm-build-") as tmpdir:
            tmp = Path(tmpdir)
            run = functools.partial(self._run, tmp=tmp)
            objects, deps, log = [], set(), []
            for i, s in enumerate(sources):
                if s.kind == "obj":
                    objects.append(str(s.path))
                    deps.add(str(s.path))
                    continue
                if s.text is not None:
                    src = tmp / f"{i}{'.c' if s.kind == 'c' else '.S'}"
                    src.write_text(s.text)
                else:
                    src = s.path
                obj, dep = tmp / f"{i}.o", tmp / f"{i}.d"
                incs = [*includes, *([s.directory] if s.directory else []), self.include]
                argv = [self.toolchain.cc, arch, "-c", *(C_FLAGS if s.kind == "c" else ASM_FLAGS),
                        *(f"-I{d}" for d in incs), "-MD", "-MF", str(dep), *flags, "-o", str(obj),
                        str(src) if s.text is not None else s.label]
                what = f"{s.label} does not {'compile' if s.kind == 'c' else 'assemble'}"
                log.append(run(argv, what))
                objects.append(str(obj))
                if dep.is_file():
                    deps.update(str((self.cwd / d).resolve()) for d in _parse_deps(dep.read_text()))
                elif s.path is not None:
                    deps.add(str(s.path))
            if not any(_defines_start(o) for o in objects):
                stub = tmp / "pykvm_start.S"
                stub.write_text(_start_stub(mode))
                run([self.toolchain.cc, arch, "-c", *ASM_FLAGS, f"-I{self.include}", "-o", str(tmp / "pykvm_start.o"),
                     str(stub)], "the start stub does not assemble")
                objects.insert(0, str(tmp / "pykvm_start.o"))
            elf, binary = tmp / "guest.elf", tmp / "guest.bin"
            link = [self.toolchain.ld, "-m", emulation, "-nostdlib", "-static", "-T", str(script), "-z", "noexecstack",
                    *self.toolchain.ld_extra_flags(), f"--defsym=PYKVM_LOAD={load:#x}", "-o", str(elf), *objects,
                    *self.toolchain.libgcc(arch)]
            labels = ", ".join(s.label for s in sources)
            log.append(run(link, f"{labels} does not link", hint=_link_hint))
            run([self.toolchain.objcopy, "-O", "binary", str(elf), str(binary)], f"objcopy failed on {labels}")
            elf_bytes, data = elf.read_bytes(), binary.read_bytes()
        if not data:
            raise GuestBuildError(f"{labels}: the linked guest is empty (no code in .text or .text.entry?)")
        entry, first = _elf_entry_and_load(elf_bytes)
        deps = {d: _file_hash(d) for d in sorted(deps) if not d.startswith((str(tmp), str(tmp.resolve())))}
        record = {
            "image": base64.b64encode(data).decode(), "elf": base64.b64encode(elf_bytes).decode(),
            "mode": mode.value, "load": first if first is not None else load, "entry": entry,
            "sources": [s.label for s in sources], "deps": deps, "log": "\n".join(x for x in log if x),
        }
        return _image_from_record(record), record

    def _run(self, argv: list[str], what: str, *, tmp: Path, hint: Callable[[str], str] | None = None) -> str:
        """Run one tool; its cleaned stderr (warnings) on success, GuestBuildError on failure."""
        try:
            result = subprocess.run(argv, cwd=self.cwd, capture_output=True, text=True)
        except OSError as e:
            raise ToolchainMissing(f"cannot run {argv[0]}: {e.strerror}") from None
        output = _clean(result.stderr + result.stdout, tmp)
        if result.returncode != 0:
            extra = hint(output) if hint else ""
            raise GuestBuildError(f"{what} ({Path(argv[0]).name} exited with status {result.returncode}){extra}:",
                                  output)
        return output


def _clean(text: str, tmp: Path) -> str:
    """Tool output without the temporary build directory and the lines that only name it."""
    lines = []
    for line in text.replace(f"{tmp}/", "").replace(str(tmp), "").splitlines():
        if line.endswith("Assembler messages:"):
            continue
        lines.append(line)
    return "\n".join(lines).strip()


def _link_hint(output: str) -> str:
    if "undefined reference to `main'" in output:
        return "; a C guest without _start is entered at int main(void), whose return value is the DONE status"
    return ""


def _start_stub(mode: Mode) -> str:
    """_start for C guests: call main, DONE(its return value)."""
    return (f'#include "pykvm.h"\n\t{_CODE[mode.bits]}\n\t.section .text.entry, "ax"\n\t.globl _start\n_start:\n'
            "\tcall main\n\tmovl %eax, %ebx\n\tPYKVM_CALL PYKVM_CALL_DONE\n\tPYKVM_HALT_FOREVER\n")


def _defines_start(obj: str) -> bool:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(obj, "rb") as f:
            table = ELFFile(f).get_section_by_name(".symtab")
            return table is not None and any(
                s.name == "_start" and s["st_shndx"] != "SHN_UNDEF" for s in table.iter_symbols())
    except (OSError, ELFError):
        return False  # an archive: _start is expected in an object


def _elf_entry_and_load(elf: bytes) -> tuple[int, int | None]:
    from elftools.elf.elffile import ELFFile

    f = ELFFile(io.BytesIO(elf))
    loads = [seg["p_paddr"] for seg in f.iter_segments() if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]]
    return f["e_entry"], (min(loads) if loads else None)


def _image_from_record(record: dict) -> GuestImage:
    return GuestImage(base64.b64decode(record["image"]), mode=record["mode"], load=record["load"],
                      entry=record["entry"], sources=record["sources"], elf=base64.b64decode(record["elf"]),
                      warnings=record["log"])


# ---- the plugin's state: one per pytest session (and per xdist worker) ---------------------------------

class _Unset:
    pass


class PluginState:
    """What the plugin knows in one session: can KVM run here, which capabilities, the builder."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._kvm_reason: str | None | _Unset = _Unset()
        self._caps: dict[int, bool] = {}
        self._builder: GuestBuilder | None = None

    @property
    def required(self) -> bool:
        return bool(self.config.getoption("kvm_required", False) or self.config.getini("kvm_required"))

    def kvm_unavailable(self) -> str | None:
        """Why this host cannot run guests (None: it can). Opens the device pykvm would open now
        (``pykvm.system.KVM_PATH``), once per session."""
        if isinstance(self._kvm_reason, _Unset):
            try:
                system.Kvm().close()
                self._kvm_reason = None
            except KvmUnavailableError as e:
                self._kvm_reason = f"needs /dev/kvm: {e.strerror}"
        return self._kvm_reason

    def missing_caps(self, caps: Sequence[int]) -> list[int]:
        todo = [c for c in caps if c not in self._caps]
        if todo:
            with system.Kvm() as kvm, kvm.create_vm() as vm:  # VM-level answers (KVM_CAP_CHECK_EXTENSION_VM)
                for cap in todo:
                    self._caps[cap] = vm.check_extension(cap) > 0
        return [c for c in caps if not self._caps[c]]

    def unable(self, reason: str) -> NoReturn:
        """This host cannot run the test: skip, or fail under --kvm-required."""
        __tracebackhide__ = True
        if self.required:
            pytest.fail(f"{reason} (--kvm-required: this runner must be able to run KVM guests)", pytrace=False)
        pytest.skip(reason)

    def builder(self) -> GuestBuilder:
        if self._builder is None:
            cache = getattr(self.config, "cache", None)
            if cache is not None:
                directory = cache.mkdir("pykvm-guests")
            else:  # -p no:cacheprovider
                base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
                directory = Path(base) / "pykvm" / "test-guests"
            self._builder = GuestBuilder(directory, cwd=self.config.rootpath)
        return self._builder


_STATE = pytest.StashKey[PluginState]()
_MACHINES = pytest.StashKey[list]()


def _state(config: pytest.Config) -> PluginState:
    state = config.stash.get(_STATE, None)
    if state is None:
        state = config.stash[_STATE] = PluginState(config)
    return state


def cap_from_name(name: str | int | Cap) -> Cap | int:
    """``"SPLIT_IRQCHIP"``, ``"KVM_CAP_SPLIT_IRQCHIP"``, ``Cap.SPLIT_IRQCHIP`` or a number."""
    if isinstance(name, int):
        try:
            return Cap(name)
        except ValueError:
            return name
    key = str(name).upper().removeprefix("KVM_CAP_")
    try:
        return Cap[key]
    except KeyError:
        raise ValueError(f"unknown KVM capability {name!r} (the names of pykvm.constants.Cap, "
                         "such as SPLIT_IRQCHIP or X86_USER_SPACE_MSR)") from None


def _cap_name(cap: Cap | int) -> str:
    return f"KVM_CAP_{cap.name}" if isinstance(cap, Cap) else f"KVM capability {cap}"


# ---- hooks ------------------------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pykvm", "pykvm: guests under /dev/kvm")
    group.addoption(
        "--kvm-required", action="store_true", default=False, dest="kvm_required",
        help="fail, instead of skipping, the tests this host cannot run (no /dev/kvm, a missing KVM "
             "capability or CPU mode, no guest toolchain): for CI runners that must have KVM",
    )
    parser.addini("kvm_required", type="bool", default=False,
                  help="as --kvm-required: tests this host cannot run fail instead of skipping")
    group.addoption(
        "--kvm-backend", default=None, metavar="MODULE", dest="kvm_backend",
        help="fail the KVM tests unless this module (kvm_intel, kvm_amd, kvm_pvm) serves /dev/kvm: "
             "for a tier meant to run against one backend",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvm: runs a real guest under /dev/kvm (skipped with the reason where /dev/kvm is missing)")
    config.addinivalue_line(
        "markers", "kvm_cap(*names): needs these KVM capabilities (pykvm.constants.Cap names, e.g. "
                   "'SPLIT_IRQCHIP'); skipped with the reason where the host's KVM lacks one")
    _state(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = _state(config)
    reason = state.kvm_unavailable()
    if reason:
        then = "fail (--kvm-required)" if state.required else "skip"
        return [f"pykvm: no KVM here ({reason}); tests that need it {then}"]
    wanted = config.getoption("kvm_backend", None)
    return [f"pykvm: {system.KVM_PATH} served by {_host_kvm_backend() or 'an unknown module'}"
            + (", --kvm-required" if state.required else "")
            + (f", --kvm-backend={wanted}" if wanted else "")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in KVM_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kvm)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = _state(item.config)
    try:
        caps, error = [cap_from_name(name) for mark in item.iter_markers("kvm_cap") for name in mark.args], None
    except ValueError as e:
        caps, error = [], f"@pytest.mark.kvm_cap: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    if not caps and item.get_closest_marker("kvm") is None:
        return
    reason = state.kvm_unavailable()
    if reason:
        state.unable(reason)
    wanted = item.config.getoption("kvm_backend", None)
    if wanted and _host_kvm_backend() != wanted:
        pytest.fail(f"--kvm-backend={wanted}: /dev/kvm is served by "
                    f"{_host_kvm_backend() or 'an unknown module'}", pytrace=False)
    missing = state.missing_caps(caps)
    if missing:
        backend = _host_kvm_backend() or "an unknown KVM module"
        names = " and ".join(_cap_name(c) for c in missing)
        state.unable(f"needs {names}, which this host's KVM ({backend}) does not offer")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    yield
    machines = item.stash.get(_MACHINES, [])
    for n, m in enumerate(machines):
        text = m.console_output.decode("utf-8", "replace")
        if text:
            name = "guest console" + (f" (machine {n})" if len(machines) > 1 else "")
            item.add_report_section("call", name, text)


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kvm_backend() -> str | None:
    """The module serving /dev/kvm: kvm_intel, kvm_amd, kvm_pvm (or None)."""
    return _host_kvm_backend()


@pytest.fixture
def kvm_machine(request: pytest.FixtureRequest):
    """``kvm_machine(mode="long", *, image=None, mem=4 MiB, cpus=1, irqchip=False, load=None,
    entry=None, la57=False, **Machine options) -> Machine``: a machine whose boot vCPU is set up in
    ``mode`` at ``entry`` (default: the mode's load address), with ``image`` loaded (a GuestImage
    brings its own mode, load address and entry). Closed when the test ends. Where the host
    cannot give it (no /dev/kvm, a backend that cannot run the mode, a missing irqchip), the test
    is skipped with the reason (a failure under --kvm-required)."""
    state = _state(request.config)
    machines: list[Machine] = []
    request.node.stash[_MACHINES] = machines

    def make(mode: Mode | str | None = None, *, image: bytes | None = None, mem: int = layout.DEFAULT_MEM_SIZE,
             cpus: int = 1, irqchip: bool | str = False, load: int | None = None, entry: int | None = None,
             la57: bool = False, **options) -> Machine:
        __tracebackhide__ = True
        built = image if isinstance(image, GuestImage) else None
        mode = Mode(mode or (built.mode if built is not None else Mode.LONG))
        if built is not None:
            load = built.load if load is None else load
            entry = built.entry if entry is None else entry
        reason = None
        try:
            m = Machine(mem, cpus=cpus, irqchip=irqchip, **options)
        except (KvmUnavailableError, KvmUnsupportedError) as e:
            reason = str(e.strerror if isinstance(e, KvmUnavailableError) else e)
        if reason:
            state.unable(reason)
        machines.append(m)
        try:
            if image is not None:
                m.load_flat(image, mode, load=load, entry=entry, la57=la57)
            else:
                m.setup(mode, entry if entry is not None else (mode.default_load if load is None else load), la57=la57)
        except KvmUnsupportedError as e:
            reason = str(e)
        if reason:
            state.unable(reason)
        return m

    yield make
    for m in machines:
        m.close()


@pytest.fixture(scope="session")
def _reset_machines():
    pool: dict = {}
    yield pool
    for m, _routes in pool.values():
        m.close()


@pytest.fixture
def kvm_reset_machine(request: pytest.FixtureRequest, _reset_machines):
    """``kvm_reset_machine(image, mode=None, *, mem=4 MiB, cpus=1, irqchip=False, load=None,
    entry=None, **Machine options) -> Machine``: as :func:`kvm_machine`, but built once per session
    for each set of arguments and checkpointed after loading; every test that asks for the same
    arguments gets it reset to that checkpoint (only the pages the last test dirtied are copied
    back, then the vCPU and device state) instead of a new machine. The port, MMIO and exit
    handlers a test registers are taken back too; a test that registers an MSR handler or a
    coalesced zone, which KVM holds, fails (use kvm_machine)."""
    state = _state(request.config)
    machines: list[Machine] = []
    request.node.stash[_MACHINES] = machines
    used = []

    def make(image: bytes, mode: Mode | str | None = None, *, mem: int = layout.DEFAULT_MEM_SIZE, cpus: int = 1,
             irqchip: bool | str = False, load: int | None = None, entry: int | None = None, **options) -> Machine:
        __tracebackhide__ = True
        built = image if isinstance(image, GuestImage) else None
        mode = Mode(mode or (built.mode if built is not None else Mode.LONG))
        try:
            key = (bytes(image), mode, mem, cpus, irqchip, load, entry, tuple(sorted(options.items())))
            hash(key)
        except TypeError:
            pytest.fail("kvm_reset_machine: its arguments must be hashable (a machine is kept per set of them)")
        if key in _reset_machines:
            m, routes = _reset_machines[key]
            m.reset()
            m.bus.restore_routes(routes[0])
            m._exit_handlers.clear()
            m._exit_handlers.update(routes[1])
            m._hypercalls.clear()
            m._hypercalls.update(routes[2])
        else:
            reason = None
            try:
                m = Machine(mem, cpus=cpus, irqchip=irqchip, dirty="auto", **options)
                m.load_flat(image, mode, load=load if built is None or load is not None else built.load,
                            entry=entry if built is None or entry is not None else built.entry)
                m.checkpoint()
            except (KvmUnavailableError, KvmUnsupportedError) as e:
                reason = str(e.strerror if isinstance(e, KvmUnavailableError) else e)
            if reason:
                state.unable(reason)
            routes = (m.bus.save_routes(), dict(m._exit_handlers), dict(m._hypercalls))
            _reset_machines[key] = (m, routes)
        machines.append(m)
        used.append(m)
        return m

    yield make
    for m in used:
        if m._msr_handlers or m._coalesced:
            pytest.fail("kvm_reset_machine: the test registered an MSR handler or a coalesced zone, which KVM "
                        "holds and a reset cannot take back; use kvm_machine for it")


@pytest.fixture
def run_guest(kvm_machine):
    """``run_guest(image_or_machine, mode=None, *, timeout=10, check=True, **kvm_machine options)
    -> GuestResult``: run a guest until it says DONE or FAIL. With ``check``, a FAIL, a non-zero
    DONE and any GuestError (triple fault, unhandled exception, unexpected exit, timeout) fail
    the test with the guest's message; without it, FAIL and DONE come back as data and a
    GuestError is raised."""

    def run(guest, mode: Mode | str | None = None, *, timeout: float | None = 10.0, check: bool = True,
            **options) -> GuestResult:
        __tracebackhide__ = True
        if isinstance(guest, Machine):
            if mode is not None or options:
                raise TypeError("run_guest(machine) runs the machine as it is set up: give the mode and "
                                "the machine options to kvm_machine")
            m, image = guest, None
        else:
            m, image = kvm_machine(mode, image=guest, **options), guest
        try:
            outcome = m.run(timeout=timeout)
        except GuestError as e:
            if not check:
                raise
            error = _guest_error_message(e)
        else:
            error = None
        if error:
            pytest.fail(error, pytrace=False)
        result = GuestResult(**{f.name: getattr(outcome, f.name) for f in dataclasses.fields(Outcome)},
                             console=m.console_output, syncs=tuple(m.syncs), machine=m)
        if check:
            check_outcome(result, image)
        return result

    return run


def _caller_snippet_place(text: str, builder: GuestBuilder, depth: int) -> tuple[str, int, Path]:
    """Where ``text`` is in the caller's file, as (label, line of its first character, directory),
    so that errors and ``__LINE__`` point into the test file; else (a made-up name, 1, directory)."""
    frame = sys._getframe(depth)
    filename = frame.f_code.co_filename
    try:
        source = Path(filename).read_text()
    except (OSError, UnicodeDecodeError):
        source = ""
    starts, where = [], source.find(text) if text.strip() else -1
    while where >= 0:
        starts.append(source.count("\n", 0, where) + 1)
        where = source.find(text, where + 1)
    # the one occurrence, or (the same text in several tests) the first one at or after the call
    after = [line for line in starts if line >= frame.f_lineno]
    if len(starts) == 1 or after:
        return builder.label(filename), starts[0] if len(starts) == 1 else after[0], Path(filename).parent
    return f"{Path(filename).stem}_{frame.f_code.co_name}", 1, Path(filename).parent


def _build_or_fail(state: PluginState, fixture: str, build: Callable[[], GuestImage]) -> GuestImage:
    __tracebackhide__ = True
    try:
        image = build()
        if image.warnings:  # at the test's line that asked for the guest
            warnings.warn(GuestBuildWarning(image.warnings), stacklevel=3)
        return image
    except ToolchainMissing as e:
        missing, error = str(e), None
    except GuestBuildError as e:
        missing, error = None, f"{fixture}: {e}"
    # outside the except blocks: the failure alone, not "during handling of the above exception"
    if missing:
        state.unable(missing)
    pytest.fail(error, pytrace=False)


def _snippet_builder(request: pytest.FixtureRequest, kind: str, fixture: str):
    state = _state(request.config)
    suffix = ".c" if kind == "c" else ".S"

    def build(source: str | os.PathLike, mode: Mode | str = Mode.LONG, *, load: int | None = None,
              flags: Sequence[str] = (), include: Iterable[str | os.PathLike] = (),
              link: Iterable[str | os.PathLike] = (), linker_script: str | os.PathLike | None = None,
              name: str | None = None) -> GuestImage:
        __tracebackhide__ = True
        builder = state.builder()

        def go() -> GuestImage:
            if isinstance(source, os.PathLike):
                first = builder.file(source)
            else:
                label, line, directory = _caller_snippet_place(source, builder, 4)
                if name:
                    label, line = name, 1
                if not label.endswith((".py", suffix)):
                    label += suffix
                first = builder.snippet(kind, source, mode, label=label, line=line, directory=directory)
            return builder.build([first, *(builder.file(p) for p in link)], mode, load=load, flags=flags,
                                 include=include, linker_script=linker_script)

        return _build_or_fail(state, fixture, go)

    return build


@pytest.fixture(scope="session")
def guest_asm(request: pytest.FixtureRequest):
    """``guest_asm(source, mode="long", *, load=None, flags=(), include=(), link=(), linker_script=None,
    name=None) -> GuestImage``: assemble a snippet (GNU as, AT&T syntax, through the C preprocessor,
    ``pykvm.h`` included) or a file (a Path) and link it, with the files in ``link``, into a flat
    image. A snippet without ``_start`` is entered at its first line and says DONE(0) if it runs
    off its end."""
    return _snippet_builder(request, "asm", "guest_asm")


@pytest.fixture(scope="session")
def guest_c(request: pytest.FixtureRequest):
    """``guest_c(source, mode="long", *, load=None, flags=(), include=(), link=(), linker_script=None,
    name=None) -> GuestImage``: compile freestanding C (a snippet or a Path; ``pykvm.h`` included)
    and link it, with the files in ``link``, into a flat image. Without a ``_start`` anywhere,
    the guest is entered at ``int main(void)`` and its return value is the DONE status."""
    return _snippet_builder(request, "c", "guest_c")


@pytest.fixture(scope="session")
def guest_build(request: pytest.FixtureRequest):
    """``guest_build(*files, mode="long", load=None, flags=(), include=(), linker_script=None) ->
    GuestImage``: build a guest from source files (.S, .s, .c; .o and .a are linked as they are),
    linked in order. The entry is ``_start`` (or, without one, ``int main(void)``)."""
    state = _state(request.config)

    def build(*files: str | os.PathLike, mode: Mode | str = Mode.LONG, load: int | None = None,
              flags: Sequence[str] = (), include: Iterable[str | os.PathLike] = (),
              linker_script: str | os.PathLike | None = None) -> GuestImage:
        __tracebackhide__ = True
        builder = state.builder()
        return _build_or_fail(state, "guest_build", lambda: builder.build(
            [builder.file(f) for f in files], mode, load=load, flags=flags, include=include,
            linker_script=linker_script))

    return build
