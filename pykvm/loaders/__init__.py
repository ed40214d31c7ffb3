"""Loaders: put a guest image into guest memory and say how to enter it.

- :mod:`.detect`    ``detect_image(data)`` -> "flat" | "elf" | "multiboot", by content
- :mod:`.elf`       ``load_elf(memory, data, name=...)`` -> :class:`ElfImage` (pyelftools; ET_EXEC only)
- :mod:`.multiboot` ``load_multiboot(memory, data, path=..., cmdline=..., modules=...)`` ->
  :class:`BootInfo`, then ``setup_multiboot(vcpu, memory, info)`` (multiboot 1, as QEMU ``-kernel``)
- :mod:`.linux`     ``load_linux(memory, kernel, name=..., cmdline=..., initrd=...)`` -> :class:`LinuxBoot`,
  then ``setup_linux(vcpu, memory, boot)`` (a bzImage at its 64-bit entry, a vmlinux through PVH
  or startup_64; ``parse_bzimage``, ``boot_params_view`` for the setup header and the zero page)

Flat images need no loader: :meth:`pykvm.machine.Machine.load_flat`. Every error is a
:class:`pykvm.images.ImageError` subclass whose message names the image and the problem.
"""

from .detect import FORMATS, detect_image
from .elf import ElfError, ElfImage, Range, Segment, load_elf, parse_elf, system_ranges
from .linux import (
    BootParams,
    E820Entry,
    LinuxBoot,
    LinuxBootError,
    LinuxKernel,
    SetupHeader,
    StartInfo,
    Vmlinux,
    boot_params_view,
    build_zero_page,
    bzimage_payload,
    detect_compression,
    e820_map,
    load_linux,
    parse_bzimage,
    parse_vmlinux,
    setup_linux,
    start_info_view,
)
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
    "BootParams", "E820Entry", "LinuxBoot", "LinuxBootError", "LinuxKernel", "SetupHeader", "StartInfo",
    "Vmlinux", "boot_params_view", "build_zero_page", "bzimage_payload", "detect_compression", "e820_map",
    "load_linux", "parse_bzimage", "parse_vmlinux", "setup_linux", "start_info_view",
]
