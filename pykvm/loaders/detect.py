"""Tell a guest image's format by its content: "multiboot", "elf" or "flat".

A valid multiboot header in the first 8192 bytes wins, whatever the file's format (an ELF kernel
with a multiboot header is booted as multiboot, as QEMU's ``-kernel`` does); then the ELF magic;
anything else is a flat binary. A multiboot magic number whose checksum is wrong (and no valid
header after it) raises :class:`~pykvm.loaders.multiboot.MultibootError` naming the offset: a file
that almost is a multiboot kernel should not quietly run as something else.
"""

from __future__ import annotations

from typing import Literal

from .elf import ELF_MAGIC
from .multiboot import find_header

ImageFormat = Literal["flat", "elf", "multiboot"]
FORMATS: tuple[ImageFormat, ...] = ("flat", "elf", "multiboot")


def detect_image(data: bytes, *, name: str = "image") -> ImageFormat:
    """``"multiboot"``, ``"elf"`` or ``"flat"`` for the bytes of an image (``name`` is for errors)."""
    if find_header(data, name=name) is not None:
        return "multiboot"
    if bytes(data[:4]) == ELF_MAGIC:
        return "elf"
    return "flat"
