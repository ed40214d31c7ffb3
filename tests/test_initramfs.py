"""pykvm's initramfs for ``pykvm boot``: the cpio archive, the module order, the /init script."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pykvm.initramfs import (
    INIT_BANNER,
    Archive,
    InitramfsError,
    build_initramfs,
    find_busybox,
    init_script,
    module_files,
    read_cpio,
)


def fake_module_tree(root: Path, version: str = "9.9.9-test") -> Path:
    tree = root / version
    (tree / "kernel/drivers/virtio").mkdir(parents=True)
    deps = {
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/virtio/virtio_mmio.ko": ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/block/virtio_blk.ko": ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/char/virtio_console.ko": ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/char/hw_random/virtio-rng.ko": ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/net/core/failover.ko": [],
        "kernel/drivers/net/net_failover.ko": ["kernel/net/core/failover.ko"],
        "kernel/drivers/net/virtio_net.ko": ["kernel/drivers/net/net_failover.ko", "kernel/net/core/failover.ko",
                                             "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"],
    }
    for path in deps:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(b"\x7fELF module " + path.encode())
    (tree / "modules.dep").write_text("".join(f"{p}: {' '.join(d)}\n" for p, d in deps.items()))
    (tree / "modules.builtin").write_text("")
    return tree


def test_archive_round_trip():
    a = Archive()
    a.file("bin/tool", b"abc", 0o755)
    a.symlink("bin/sh", "tool")
    a.node("dev/console", stat.S_IFCHR | 0o600)
    entries = read_cpio(a.pack())
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, b"abc")
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"tool")
    assert stat.S_ISDIR(entries["bin"][0]) and stat.S_ISDIR(entries["dev"][0])  # parents made first
    assert list(entries).index("bin") < list(entries).index("bin/tool")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio(1) to cross-check the archive")
def test_archive_reads_with_gnu_cpio(tmp_path):
    a = Archive()
    a.file("etc/hello", b"hello world\n")
    a.symlink("etc/link", "hello")
    listing = subprocess.run(["cpio", "-t", "-v"], input=a.pack(), capture_output=True, check=True).stdout.decode()
    assert "etc/hello" in listing and "etc/link -> hello" in listing


def test_module_order_puts_dependencies_first(tmp_path):
    fake_module_tree(tmp_path)
    names = [p.name for p in module_files("9.9.9-test", root=tmp_path)]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_mmio.ko")
    assert names.index("failover.ko") < names.index("net_failover.ko") < names.index("virtio_net.ko")
    assert len(names) == len(set(names)) == 9


def test_builtin_modules_are_left_out(tmp_path):
    tree = fake_module_tree(tmp_path)
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    names = [p.name for p in module_files("9.9.9-test", root=tmp_path)]
    assert "virtio_mmio.ko" not in names and "virtio_blk.ko" in names


def test_missing_module_tree_and_module(tmp_path):
    with pytest.raises(InitramfsError, match=r"no module tree for kernel 1\.2\.3"):
        module_files("1.2.3", root=tmp_path)
    tree = fake_module_tree(tmp_path)
    (tree / "modules.dep").write_text("kernel/drivers/virtio/virtio_ring.ko:\n")
    with pytest.raises(InitramfsError, match="has no module virtio"):
        module_files("9.9.9-test", root=tmp_path)


def test_init_script_loads_modules_then_runs_the_script():
    text = init_script(console="ttyS0", script="echo marker", interactive=False, modules=["a.ko", "b.ko"])
    assert text.startswith("#!/bin/sh\n")
    assert text.index("insmod /lib/modules/a.ko") < text.index("insmod /lib/modules/b.ko") < text.index(INIT_BANNER)
    assert text.index(INIT_BANNER) < text.index("echo marker") < text.index("poweroff -f")


def test_build_initramfs_with_a_fake_busybox(tmp_path):
    fake_module_tree(tmp_path / "modules")
    busybox = Path(find_busybox()) if _has_static_busybox() else None
    if busybox is None:
        pytest.skip("no static busybox here (apt-get install busybox-static)")
    data = build_initramfs(kernel_version="9.9.9-test", module_root=tmp_path / "modules", script="true")
    entries = read_cpio(data)
    assert entries["bin/busybox"][1] == busybox.read_bytes()
    assert entries["bin/sh"][1] == b"busybox"
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600
    assert entries["lib/modules/virtio_blk.ko"][1].startswith(b"\x7fELF")
    assert entries["init"][0] & 0o111 and INIT_BANNER.encode() in entries["init"][1]


def _has_static_busybox() -> bool:
    try:
        find_busybox()
    except InitramfsError:
        return False
    return True
