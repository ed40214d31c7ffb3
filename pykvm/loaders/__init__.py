"""Loaders: put a guest image into guest memory and say how to enter it.

- :mod:`.detect`    ``detect_image(data)`` -> "flat" | "elf" | "multiboot", by content
- :mod:`.elf`       ``load_elf(memory, data, name=...)`` -> :class:`ElfImage` (pyelftools; ET_EXEC only)
- :mod:`.multiboot` ``load_multiboot(memory, data, path=..., cmdline=..., modules=...)`` ->
  :class:`BootInfo`, then ``setup_multiboot(vcpu, memory, info)`` (multiboot 1, as QEMU ``-kernel``)

Flat images need no loader: :meth:`pykvm.machine.Machine.load_flat`. Every error is a
:class:`pykvm.images.ImageError` subclass whose message names the image and the problem.
"""

from .detect import FORMATS, detect_image
from .elf import ElfError, ElfImage, Range, Segment, load_elf, parse_elf, system_ranges
from .multiboot import (
    BOOTLOADER_MAGIC,
    BootInfo,
    LoadedModule,
    MmapEntry,
    Module,
    MultibootError,
    MultibootHeader,
    find_header,
    load_multiboot,
    memory_map,
    setup_multiboot,
)

__all__ = [
    "FORMATS", "detect_image",
    "ElfError", "ElfImage", "Range", "Segment", "load_elf", "parse_elf", "system_ranges",
    "BOOTLOADER_MAGIC", "BootInfo", "LoadedModule", "MmapEntry", "Module", "MultibootError",
    "MultibootHeader", "find_header", "load_multiboot", "memory_map", "setup_multiboot",
]
