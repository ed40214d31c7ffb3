"""Build step: write cffi's pre-parsed ABI module (pykvm/_kvm_cffi.py) from cdefs/*.h.

Everything else is declared in pyproject.toml. ``build_py`` (which ``pip install .``, a wheel build
and ``pip install -e .`` all run) writes the module into the package it builds: build/lib/pykvm/
for a wheel, the checkout's pykvm/ for an editable install. No C compiler is involved (cffi's
out-of-line ABI mode: ``set_source(name, None)``); see cdefs/__init__.py.
"""

from __future__ import annotations

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdefs():
    """cdefs/__init__.py (pykvm.cdefs once installed), loaded from the source tree."""
    spec = importlib.util.spec_from_file_location("_pykvm_cdefs", os.path.join(HERE, "cdefs", "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_cffi(build_py):
    """build_py, then the pre-parsed cffi module beside pykvm/_ffi.py."""

    def run(self):
        super().run()
        cdefs = _cdefs()
        if getattr(self, "editable_mode", False):
            target = os.path.join(HERE, "pykvm")
        else:
            target = os.path.join(self.build_lib, "pykvm")
        os.makedirs(target, exist_ok=True)
        path = os.path.join(target, cdefs.MODULE_FILE)
        self.announce(f"writing {path} (cffi's pre-parsed declarations of cdefs/*.h)", level=2)
        cdefs.write_module(path)
        self._cffi_module = path

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        path = getattr(self, "_cffi_module", None)
        return outputs + [path] if path and not getattr(self, "editable_mode", False) else outputs


setup(cmdclass={"build_py": build_py_with_cffi})
