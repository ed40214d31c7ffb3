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

The names below are imported from their submodule when first used (PEP 562), so that running a
flat image does not import the Linux loader and telling formats apart does not import pyelftools.
"""

from __future__ import annotations

import importlib

#: Each submodule and the names this package takes from it.
_EXPORTS = {
    "detect": ("FORMATS", "detect_image"),
    "elf": ("ElfError", "ElfImage", "Range", "Segment", "load_elf", "parse_elf", "system_ranges"),
    "multiboot": ("BOOTLOADER_MAGIC", "BootInfo", "LoadedModule", "MmapEntry", "Module", "MultibootError",
                  "MultibootHeader", "find_header", "load_multiboot", "memory_map", "setup_multiboot"),
    "linux": ("BootParams", "E820Entry", "LinuxBoot", "LinuxBootError", "LinuxKernel", "SetupHeader", "StartInfo",
              "Vmlinux", "boot_params_view", "build_zero_page", "bzimage_payload", "detect_compression", "e820_map",
              "load_linux", "parse_bzimage", "parse_vmlinux", "setup_linux", "start_info_view"),
}
_SUBMODULE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_SUBMODULE)


def __getattr__(name: str):
    module = _SUBMODULE.get(name)
    if module is None:
        if name in _EXPORTS:  # a submodule not imported yet (pykvm.loaders.elf)
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_EXPORTS))
