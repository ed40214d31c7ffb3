"""The cffi cdef text of ``cdefs/*.h`` and the pre-parsed module made from it (``pykvm._kvm_cffi``).

Parsing the cdef text with pycparser costs tens of milliseconds at every start-up. cffi's
out-of-line ABI mode does that parse once: ``ffi.set_source("pykvm._kvm_cffi", None)`` and
``emit_python_code()`` write a pure-Python module holding the parsed declarations (no C compiler
is involved; the functions are still found with ``dlopen`` at run time). :mod:`pykvm._ffi` imports
it when it was made from exactly the text of these files, and parses the text in-line otherwise.

Where the module comes from:

- a wheel or ``pip install .``: the build (``setup.py``'s ``build_py``) writes it into the package;
- an editable install (``pip install -e .``, ``make setup``): the same step writes ``pykvm/_kvm_cffi.py``
  into the checkout (git ignores it);
- otherwise, or after an edit of a ``.h`` file: the first import parses the text in-line and writes
  the module beside ``pykvm/_ffi.py`` when that directory is writable (not when Python is told not
  to write bytecode), so the next start-up is fast again.

This module imports nothing beyond the standard library; :func:`build_ffi` imports cffi when called.
``python -m pykvm.cdefs FILE`` writes the module to FILE.
"""

from __future__ import annotations

import os

#: The cdef files, in the order they are declared.
CDEF_FILES = ("kvm.h", "libc.h", "net.h")
#: The generated module's import name (cffi records it in the module).
MODULE_NAME = "pykvm._kvm_cffi"
#: The generated module's file name, beside ``pykvm/_ffi.py``.
MODULE_FILE = "_kvm_cffi.py"

_DIR = os.path.dirname(os.path.abspath(__file__))


def cdef_text(name: str) -> str:
    """The text of one cdef file (``"kvm.h"``)."""
    with open(os.path.join(_DIR, name), encoding="utf-8") as f:
        return f.read()


def cdef_texts() -> tuple[str, ...]:
    """The text of every cdef file, in :data:`CDEF_FILES` order."""
    return tuple(cdef_text(name) for name in CDEF_FILES)


def build_ffi(texts: tuple[str, ...] | None = None):
    """A ``cffi.FFI`` with every cdef declared and ``set_source(MODULE_NAME, None)`` (ABI mode)."""
    from cffi import FFI

    ffi = FFI()
    for text in cdef_texts() if texts is None else texts:
        ffi.cdef(text)
    ffi.set_source(MODULE_NAME, None)
    return ffi


def write_module(path: str, ffi=None, texts: tuple[str, ...] | None = None) -> None:
    """Write the pre-parsed module to ``path`` (atomically: a reader sees the old file or the new one).

    ``ffi`` is a :func:`build_ffi` result for ``texts`` (both default to the files here). The module
    records the cdef text it was made from as ``CDEF_TEXTS``: :mod:`pykvm._ffi` uses it only when
    that is the text of the files it reads, so an edited ``.h`` never runs with stale declarations.
    """
    import contextlib
    import io

    texts = cdef_texts() if texts is None else tuple(texts)
    ffi = build_ffi(texts) if ffi is None else ffi
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # cffi says "generating FILE" on stdout
            ffi.emit_python_code(tmp)
        with open(tmp, "a", encoding="utf-8") as f:
            f.write("\n# The text of cdefs/*.h this module was made from (pykvm._ffi compares it).\n")
            f.write(f"CDEF_FILES = {CDEF_FILES!r}\n")
            f.write(f"CDEF_TEXTS = {texts!r}\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

