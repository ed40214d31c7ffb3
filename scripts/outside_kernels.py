#!/usr/bin/env python3
"""Kernels from outside that are started with QEMU's command line, fetched from Debian's packages.

    scripts/outside_kernels.py --setup    # as root: apt-get download + unpack into the cache
    scripts/outside_kernels.py --check    # what is there, what is missing (exit 0 / 4)
    scripts/outside_kernels.py --path xen # the path of one kernel

The packages are downloaded (``apt-get download``) and unpacked with ``dpkg-deb -x`` into
``~/.cache/pykvm-outside/`` ($PYKVM_OUTSIDE_CACHE), not installed: installing a hypervisor
package would change the host's boot configuration. What is fetched:

* ``xen``: the Xen hypervisor of ``xen-hypervisor-*-amd64`` (Debian 12: 4.17), a multiboot
  kernel (``/boot/xen-*.gz``, unpacked). ``qemu-system-x86_64 -kernel xen -initrd MODULE`` boots
  it: it parses the ACPI tables, brings the CPUs up through the local APICs, picks a platform
  timer and panics when the module is no dom0 kernel ("Could not construct domain 0"), then
  resets through the FADT's reset register.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("PYKVM_OUTSIDE_CACHE", Path.home() / ".cache" / "pykvm-outside"))
UNAVAILABLE = 4


def xen_package() -> str | None:
    """The newest xen-hypervisor-X.Y-amd64 package apt knows of."""
    try:
        out = subprocess.run(["apt-cache", "search", "--names-only", r"^xen-hypervisor-[0-9.]+-amd64$"],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    names = re.findall(r"^(xen-hypervisor-[0-9.]+-amd64) ", out, re.MULTILINE)
    return max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)], default=None)


def kernel_path(name: str) -> Path:
    return CACHE / name


def setup() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    if kernel_path("xen").exists():
        print(f"outside_kernels: xen already in {CACHE}")
        return 0
    package = xen_package()
    if package is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        package = xen_package()
    if package is None:
        print("outside_kernels: no xen-hypervisor-*-amd64 package in apt's lists (apt-get update as root)")
        return UNAVAILABLE
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode or not debs:
            print(f"outside_kernels: apt-get download {package} failed: {proc.stderr.strip()}")
            return UNAVAILABLE
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        images = sorted((Path(tmp) / "x" / "boot").glob("xen-*.gz"))
        if not images:
            print(f"outside_kernels: {debs[0].name} has no /boot/xen-*.gz")
            return UNAVAILABLE
        with gzip.open(images[-1]) as src, open(kernel_path("xen"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        (CACHE / "xen.source").write_text(f"{debs[0].name}: {images[-1].name}, gunzipped\n")
    print(f"outside_kernels: xen from {(CACHE / 'xen.source').read_text().strip()} -> {kernel_path('xen')}")
    return 0


def check() -> int:
    if kernel_path("xen").exists():
        print(f"xen: {kernel_path('xen')} ({(CACHE / 'xen.source').read_text().strip()})")
        return 0
    print(f"xen: missing from {CACHE} (scripts/outside_kernels.py --setup, as root: apt-get download "
          f"{xen_package() or 'xen-hypervisor-*-amd64'})")
    return UNAVAILABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--setup", action="store_true")
    group.add_argument("--check", action="store_true")
    group.add_argument("--path", metavar="NAME", choices=("xen",))
    args = parser.parse_args(argv)
    if args.setup:
        return setup()
    if args.check:
        return check()
    path = kernel_path(args.path)
    print(path)
    return 0 if path.exists() else UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
