"""Argument types for the command line: numbers with bounds and sizes, each refusing bad text in
one line that names what was expected."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

_SIZE = re.compile(r"^(0x[0-9a-f]+|\d+)\s*([kmg]i?b?)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def number(kind: type = int, *, minimum=None, maximum=None, what: str = "a number") -> Callable[[str], int | float]:
    """An argparse type: ``kind`` (int accepts 0x.. too) within [minimum, maximum]."""

    def parse(text: str):
        try:
            value = int(text, 0) if kind is int else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not {what}: {text!r} (must be finite)")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {text}")
        return value

    return parse


def size(text: str) -> int:
    """'64M', '1G', '512KiB', '0x400000' -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4M, 64MiB, 1G, 0x400000)")
    return int(m.group(1), 0) * _UNITS[(m.group(2) or "")[:1].lower()]
