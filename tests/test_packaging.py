"""The distribution ships every subpackage and the data files pykvm reads at run time."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.MULTILINE | re.DOTALL).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_every_subpackage_is_declared():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pykvm").rglob("__init__.py")
    }
    assert found <= declared_packages(), f"missing from pyproject.toml packages: {sorted(found - declared_packages())}"
    assert {"pykvm.cdefs", "pykvm.guests"} <= declared_packages()
