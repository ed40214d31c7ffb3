"""The one cffi FFI object: the KVM structures of ``cdefs/`` and the C functions pykvm calls.

ABI mode (``ffi.dlopen(None)``): nothing is compiled, at install time or ever. The declarations
come pre-parsed from ``pykvm._kvm_cffi`` (cffi's out-of-line ABI mode, generated from ``cdefs/*.h``
by the build, see :mod:`pykvm.cdefs`) when that module was made from exactly the text of the
``.h`` files; otherwise the text is parsed here (pycparser, tens of milliseconds) and the module is
written for the next start-up where the package directory is writable. Both give the same ``ffi``
and ``lib``; ``tests/test_ffi.py`` checks that they agree type by type.
"""

from __future__ import annotations

import os
import sys

try:
    from . import cdefs as _cdefs
except ImportError:  # a bare checkout on sys.path: cdefs/ sits beside pykvm/, installed as pykvm.cdefs
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "pykvm.cdefs", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cdefs",
                                    "__init__.py"))
    _cdefs = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _cdefs
    _spec.loader.exec_module(_cdefs)

CDEF_FILES = _cdefs.CDEF_FILES


def _cdef_text(name: str) -> str:
    return _cdefs.cdef_text(name)


def _generated(texts: tuple[str, ...]):
    """The pre-parsed FFI of ``pykvm._kvm_cffi`` if it was made from ``texts``, else None."""
    try:
        from . import _kvm_cffi
    except Exception:  # missing, or made by a cffi this _cffi_backend cannot load
        return None
    if getattr(_kvm_cffi, "CDEF_TEXTS", None) != texts:
        return None  # stale: a .h file changed since it was generated
    return _kvm_cffi.ffi


def _inline(texts: tuple[str, ...], directory: str = os.path.dirname(os.path.abspath(__file__))):
    """Parse ``texts`` here, and write the pre-parsed module into ``directory`` for the next
    start-up where we may."""
    ffi = _cdefs.build_ffi(texts)
    if not sys.dont_write_bytecode:  # as for .pyc files: PYTHONDONTWRITEBYTECODE / -B write nothing
        try:
            _cdefs.write_module(os.path.join(directory, _cdefs.MODULE_FILE), ffi, texts)
        except OSError:
            pass  # a read-only installation: correct, only slower to start
    return ffi


_texts = _cdefs.cdef_texts()
#: How ``ffi`` was made this time: "generated" (pykvm._kvm_cffi) or "inline" (the cdef text parsed here).
SOURCE = "generated"
ffi = _generated(_texts)
if ffi is None:
    SOURCE = "inline"
    ffi = _inline(_texts)
del _texts
lib = ffi.dlopen(None)
