"""The one cffi FFI object: the KVM structures of ``cdefs/`` and the C functions pykvm calls.

ABI mode (``ffi.dlopen(None)``): nothing is compiled at install time.
"""

from __future__ import annotations

from importlib import resources

from cffi import FFI

CDEF_FILES = ("kvm.h", "libc.h", "net.h")


def _cdef_text(name: str) -> str:
    return resources.files("pykvm.cdefs").joinpath(name).read_text(encoding="utf-8")


ffi = FFI()
for _name in CDEF_FILES:
    ffi.cdef(_cdef_text(_name))
lib = ffi.dlopen(None)
