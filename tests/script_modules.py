"""The project's scripts (scripts/NAME, no .py suffix) loaded as modules, for their unit tests."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME as a module (not run as __main__)."""
    module_name = name.replace("-", "_") + "_script"
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
