"""An initramfs for ``pykvm boot``: a cpio (newc) archive with a static busybox, the kernel's
virtio modules and an ``/init`` script, built in memory.

The archive format is the kernel's "new ASCII" cpio (Documentation/driver-api/early-userspace/
buffer-format.rst): per entry a 110-byte header of "070701" and 13 eight-digit hex fields, the
NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; a "TRAILER!!!" entry ends it.

The modules come from ``/lib/modules/VERSION`` (the kernel package's own tree, matched by the
version string in the bzImage header), in the order ``modules.dep`` gives, so that ``/init`` can
``insmod`` them one after the other: virtio-mmio and the blk, console, rng and net drivers. A
kernel with those drivers built in needs none of them.
"""

from __future__ import annotations

import lzma
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")  # Debian's busybox-static installs /bin/busybox
#: The drivers /init loads, in this order once their dependencies (from modules.dep) are in.
VIRTIO_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng", "virtio_net")
MODULES_DIR = Path("/lib/modules")
CPIO_MAGIC = b"070701"
TRAILER = "TRAILER!!!"

#: Printed by /init (and read by the host): the line that says user space runs.
INIT_BANNER = "pykvm-init: user space is up"


class InitramfsError(ValueError):
    """The initramfs cannot be built (no static busybox, a module that is missing)."""


@dataclass
class Entry:
    name: str
    mode: int
    data: bytes = b""


@dataclass
class Archive:
    """A cpio newc archive being assembled: directories, files and symlinks."""

    entries: list[Entry] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.strip("/")
        parent = os.path.dirname(name)
        if parent and parent not in self._names:
            self.add(parent, stat.S_IFDIR | 0o755)
        if name in self._names:
            raise InitramfsError(f"initramfs: {name} added twice")
        self._names.add(name)
        self.entries.append(Entry(name, mode, data))

    def directory(self, name: str) -> None:
        if name.strip("/") not in self._names:
            self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, mode: int) -> None:
        self.add(name, mode)

    def pack(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate([*self.entries, Entry(TRAILER, 0)], start=1):
            out += _header(ino if e.name != TRAILER else 0, e.mode, len(e.data), e.name,
                           nlink=2 if stat.S_ISDIR(e.mode) else 1,
                           rdev=(5, 1) if e.name == "dev/console" else (0, 0))
            out += e.data + b"\0" * (-len(e.data) % 4)
        return bytes(out)


def _header(ino: int, mode: int, size: int, name: str, *, nlink: int, rdev: tuple[int, int]) -> bytes:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
    head = CPIO_MAGIC + b"".join(b"%08X" % f for f in fields)
    return head + raw + b"\0" * (-(len(head) + len(raw)) % 4)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a newc archive (for tests and ``--json``)."""
    entries, pos = {}, 0
    while True:
        if data[pos : pos + 6] != CPIO_MAGIC:
            raise InitramfsError(f"not a newc cpio archive at offset {pos:#x}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == TRAILER:
            return entries
        entries[name] = (mode, data[data_at : data_at + size])
        pos = data_at + size + (-size % 4)


def find_busybox() -> Path:
    for candidate in BUSYBOX_PATHS:
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    raise InitramfsError("no static busybox for the initramfs: install busybox-static "
                         "(apt-get install busybox-static) or pass --initrd FILE")


def _is_static(path: Path) -> bool:
    """True for an ELF executable with no PT_INTERP (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP = 3


def module_files(version: str, names=VIRTIO_MODULES, root: Path = MODULES_DIR) -> list[Path]:
    """The .ko files of ``names`` and their dependencies, dependencies first, from modules.dep.
    Modules the kernel has built in (modules.builtin) are left out; an unknown one is an error."""
    tree = root / version
    try:
        dep_text = (tree / "modules.dep").read_text()
    except OSError as e:
        raise InitramfsError(f"no module tree for kernel {version} ({tree}/modules.dep: {e.strerror}); "
                             "install its linux-image package or pass --initrd FILE") from None
    builtin = set()
    try:
        builtin = {_module_name(line) for line in (tree / "modules.builtin").read_text().split()}
    except OSError:
        pass
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_text.splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, [_module_name(d) for d in rest.split()])
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in deps:
            raise InitramfsError(f"kernel {version} has no module {name} ({tree}/modules.dep)")
        for dep in reversed(deps[name][1]):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(name)

    for name in names:
        visit(name.replace("-", "_"))
    return [tree / deps[name][0] for name in order]


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)  # busybox's insmod loads plain ELF
    if path.suffix in (".gz", ".zst"):
        raise InitramfsError(f"{path}: compressed modules other than xz are not supported; pass --initrd FILE")
    return data


def init_script(*, console: str, script: str | None, interactive: bool, modules: list[str]) -> str:
    """/init: mount the pseudo file systems, load the modules, show what the virtio drivers found,
    then run ``script`` (a shell script, from ``--init-script``) or an interactive shell, and power off."""
    loads = "\n".join(f"insmod /lib/modules/{m} 2>/dev/null || echo \"pykvm-init: insmod {m} failed\""
                      for m in modules)
    tail = script if script is not None else ("setsid cttyhack sh" if interactive else "")
    # console=hvc0 names a console whose driver (virtio_console) is a module: the kernel opened
    # no /dev/console for init, so init takes hvc0 once the module made it
    hvc = ("for i in 1 2 3 4 5; do [ -e /dev/hvc0 ] && break; sleep 1; done\n"
           "[ -e /dev/hvc0 ] && exec </dev/hvc0 >/dev/hvc0 2>&1\n" if console == "virtio" else "")
    return f"""#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
{loads}
{hvc}echo "{INIT_BANNER} ($(uname -r), console {console})"
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] && echo "pykvm-init: virtio device $(cat $d/device) at $(basename $(readlink -f $d/..))"
done
[ -e /proc/partitions ] && grep -q vd /proc/partitions && echo "pykvm-init: disks:" && grep vd /proc/partitions
[ -e /sys/class/misc/hw_random/rng_current ] && echo "pykvm-init: rng $(cat /sys/class/misc/hw_random/rng_current)"
{tail}
echo "pykvm-init: powering off"
sync
poweroff -f
"""


def build_initramfs(*, kernel_version: str | None, console: str = "ttyS0", script: str | None = None,
                    interactive: bool = False, busybox: Path | None = None,
                    module_root: Path = MODULES_DIR) -> bytes:
    """The initramfs ``pykvm boot`` gives a kernel when no --initrd is given. ``kernel_version``
    None: no modules (a kernel with the drivers built in)."""
    busybox = busybox or find_busybox()
    archive = Archive()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "lib/modules"):
        archive.directory(d)
    archive.node("dev/console", stat.S_IFCHR | 0o600)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in ("sh", "mount", "insmod", "echo", "cat", "grep", "poweroff", "reboot", "sync", "dd",
                   "setsid", "cttyhack", "ls", "uname", "readlink", "basename", "mkdir", "sleep", "hexdump",
                   "od", "head", "cmp", "dmesg", "ip", "ifconfig", "ping", "mknod", "true", "false", "test", "["):
        archive.symlink(f"bin/{applet}", "busybox")
    modules: list[str] = []
    if kernel_version is not None:
        for path in module_files(kernel_version, root=module_root):
            name = path.name.removesuffix(".xz")
            archive.file(f"lib/modules/{name}", _module_bytes(path))
            modules.append(name)
    archive.file("init", init_script(console=console, script=script, interactive=interactive,
                                     modules=modules).encode(), 0o755)
    return archive.pack()
