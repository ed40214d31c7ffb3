"""virtio-blk (pykvm/virtio/blk.py) on a raw image: requests driven through the transport from a
Python driver in a bare GuestMemory; errors as statuses, nothing written outside the image."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pykvm.virtio import F_VERSION_1, STATUS_DEVICE_NEEDS_RESET, VirtioBlk, VirtioError, VirtioMmio
from pykvm.virtio import blk
from pykvm.virtio import mmio as regs
from pykvm.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from virtio_driver import GPA, bare_memory, close_memory, interrupts, notify, reg_read, start

SECTORS = 64
HDR = 0x20000  # request headers
OUT = 0x30000  # data the driver writes
IN = 0x50000  # buffers the device fills
STATUS = 0x70000


def pattern(sectors: int = SECTORS) -> bytes:
    return b"".join(bytes([i & 0xFF]) * 512 for i in range(sectors))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern())
    return path


@pytest.fixture
def memory():
    m = bare_memory()
    yield m
    close_memory(m)


class Disk:
    """A VirtioBlk behind a transport, started by the Python driver, and a way to send requests."""

    def __init__(self, memory, path, readonly=False, features=None):
        self.memory = memory
        self.t = VirtioMmio(VirtioBlk(path, readonly=readonly), memory, GPA, threaded=False)
        self.ring = start(self.t, memory, features=features)[0]
        self.dev = self.t.device

    def request(self, kind, sector=0, out=b"", in_len=0, *, split=None):
        """One request; returns (status, used length, bytes read). ``split`` cuts the header and the
        data into pieces of that many bytes (the driver may lay a request out any way it likes)."""
        m = self.memory
        m.write(HDR, struct.pack("<IIQ", kind, 0, sector))
        m.write(OUT, out)
        m.write(STATUS, b"\xEE")
        stream = [(HDR, 16, False)] + ([(OUT, len(out), False)] if out else [])
        if split:
            stream = [(a + o, min(split, n - o), w) for a, n, w in stream for o in range(0, n, split)]
        buffers = stream + ([(IN, in_len, True)] if in_len else []) + [(STATUS, 1, True)]
        self.ring.offer(self.ring.chain(buffers))
        notify(self.t, 0)
        (head, used), = self.ring.take_used()
        return m.read_u8(STATUS), used, m.read(IN, in_len)


@pytest.fixture
def disk(memory, image):
    d = Disk(memory, image)
    yield d
    d.t.close()


def test_config_and_features(disk):
    cfg = disk.dev.config()
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg)
    assert (capacity, size_max, seg_max) == (SECTORS, blk.SIZE_MAX, blk.SEG_MAX)
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
    assert reg_read(disk.t, 0x100, 4) == SECTORS and reg_read(disk.t, 0x104, 4) == 0
    f = disk.dev.device_features()
    assert f & blk.F_FLUSH and f & blk.F_SEG_MAX and f & blk.F_SIZE_MAX and not f & blk.F_RO


def test_read_sectors(disk):
    assert disk.request(blk.T_IN, 3, in_len=1024) == (blk.S_OK, 1025, pattern()[3 * 512 : 5 * 512])


def test_write_sectors_changes_only_them(disk, image):
    assert disk.request(blk.T_OUT, 10, out=b"\x77" * 1024)[:2] == (blk.S_OK, 1)
    expected = bytearray(pattern())
    expected[10 * 512 : 12 * 512] = b"\x77" * 1024
    assert image.read_bytes() == expected


def test_header_and_data_split_across_many_descriptors(disk, image):
    data = bytes(range(256)) * 4
    assert disk.request(blk.T_OUT, 5, out=data, split=13)[0] == blk.S_OK
    assert image.read_bytes()[5 * 512 : 7 * 512] == data
    assert disk.request(blk.T_IN, 5, in_len=1024, split=3)[2] == data


def test_read_through_an_indirect_table(disk, memory):
    ring = disk.ring
    memory.write(HDR, struct.pack("<IIQ", blk.T_IN, 0, 7))
    table = 0x80000
    ring.set_desc(0, HDR, 16, DESC_F_NEXT, 1, table=table)
    ring.set_desc(1, IN, 512, DESC_F_WRITE | DESC_F_NEXT, 2, table=table)
    ring.set_desc(2, STATUS, 1, DESC_F_WRITE, 0, table=table)
    ring.set_desc(0, table, 48, DESC_F_INDIRECT)
    ring.offer(0)
    notify(disk.t, 0)
    assert ring.take_used() == [(0, 513)] and memory.read_u8(STATUS) == blk.S_OK
    assert memory.read(IN, 512) == bytes([7]) * 512


@pytest.mark.parametrize("kind, sector, out, in_len", [
    (blk.T_IN, SECTORS, b"", 512),  # at the capacity
    (blk.T_IN, SECTORS - 1, b"", 1024),  # across it
    (blk.T_OUT, SECTORS - 1, b"\x01" * 1024, 0),
    (blk.T_OUT, (1 << 64) - 1, b"\x01" * 512, 0),  # sector * 512 would wrap
    (blk.T_OUT, 1 << 55, b"\x01" * 512, 0),
    (blk.T_OUT, 0, b"\x01" * 100, 0),  # not whole sectors
    (blk.T_IN, 0, b"", 511),
])
def test_requests_outside_the_image_or_not_whole_sectors_are_ioerr(disk, image, kind, sector, out, in_len):
    status, used, data = disk.request(kind, sector, out=out, in_len=in_len)
    assert (status, used) == (blk.S_IOERR, 1)
    assert data == bytes(in_len)  # nothing read into the buffers
    assert image.read_bytes() == pattern()  # nothing written, the size unchanged


def test_unknown_request_type_is_unsupp(disk):
    assert disk.request(99)[0] == blk.S_UNSUPP


def test_a_header_too_short_is_ioerr(disk, memory):
    disk.ring.offer(disk.ring.chain([(HDR, 8, False), (STATUS, 1, True)]))
    notify(disk.t, 0)
    assert disk.ring.take_used() == [(0, 1)] and memory.read_u8(STATUS) == blk.S_IOERR


def test_a_request_without_a_status_byte_needs_reset(disk, image):
    disk.memory.write(HDR, struct.pack("<IIQ", blk.T_OUT, 0, 0))
    disk.ring.offer(disk.ring.chain([(HDR, 16, False), (OUT, 512, False)]))
    notify(disk.t, 0)
    assert reg_read(disk.t, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET and "no status byte" in disk.t.error
    assert disk.ring.used_idx == 0 and image.read_bytes() == pattern()
    assert interrupts(disk.t) == 1  # the configuration-change interrupt


def test_malformed_ring_is_needs_reset_not_a_host_error(disk, image):
    disk.ring.set_desc(0, HDR, 16, DESC_F_NEXT, 1)
    disk.ring.set_desc(1, 0x7FFFFFFF0000, 512, DESC_F_NEXT, 2)  # outside RAM
    disk.ring.set_desc(2, STATUS, 1, DESC_F_WRITE)
    disk.ring.offer(0)
    notify(disk.t, 0)
    assert reg_read(disk.t, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert "outside guest RAM" in disk.t.error and image.read_bytes() == pattern()


def test_get_id(disk):
    status, used, data = disk.request(blk.T_GET_ID, in_len=20)
    assert status == blk.S_OK and data == b"disk.img".ljust(20, b"\0") and used == 9


def test_flush_syncs_before_it_completes(disk, monkeypatch):
    seen = []
    monkeypatch.setattr(blk.os, "fdatasync", lambda fd: seen.append((fd, disk.ring.used_idx)))
    assert disk.request(blk.T_OUT, 0, out=bytes(512))[0] == blk.S_OK
    assert seen == []  # FLUSH negotiated: writes are cached until the driver flushes
    assert disk.request(blk.T_FLUSH)[:2] == (blk.S_OK, 1)
    assert seen == [(disk.dev.fileno(), 1)]  # synced while the used ring still showed only the write


def test_without_the_flush_feature_every_write_is_write_through(memory, image, monkeypatch):
    d = Disk(memory, image, features=F_VERSION_1)
    try:
        seen = []
        monkeypatch.setattr(blk.os, "fdatasync", lambda fd: seen.append(d.ring.used_idx))
        assert d.request(blk.T_OUT, 0, out=bytes(512))[0] == blk.S_OK
        assert seen == [0]  # before the write was acknowledged
    finally:
        d.t.close()


def test_read_only_disk(memory, image):
    d = Disk(memory, image, readonly=True)
    try:
        assert d.dev.device_features() & blk.F_RO and not d.dev.discard
        assert d.request(blk.T_OUT, 0, out=b"\x01" * 512)[0] == blk.S_IOERR
        assert d.request(blk.T_IN, 0, in_len=512)[0] == blk.S_OK
        assert d.request(blk.T_FLUSH)[0] == blk.S_OK
        assert d.request(blk.T_DISCARD, out=struct.pack("<QII", 0, 1, 0))[0] == blk.S_UNSUPP
        assert image.read_bytes() == pattern()
    finally:
        d.t.close()


def test_discard_punches_holes_inside_the_named_sectors(disk, image):
    if not disk.dev.discard:
        pytest.skip("this file system cannot punch holes: VIRTIO_BLK_F_DISCARD is not offered")
    assert disk.dev.device_features() & blk.F_DISCARD
    segs = struct.pack("<QII", 8, 8, 0) + struct.pack("<QII", 40, 2, blk.DISCARD_F_UNMAP)
    assert disk.request(blk.T_DISCARD, out=segs)[0] == blk.S_OK
    expected = bytearray(pattern())
    expected[8 * 512 : 16 * 512] = bytes(8 * 512)
    expected[40 * 512 : 42 * 512] = bytes(2 * 512)
    assert image.read_bytes() == expected and image.stat().st_size == SECTORS * 512


@pytest.mark.parametrize("segs, status", [
    (struct.pack("<QII", SECTORS - 1, 2, 0), blk.S_IOERR),  # past the end
    (struct.pack("<QII", 0, 1, 0) + struct.pack("<QII", SECTORS, 1, 0), blk.S_IOERR),  # one bad: none done
    (struct.pack("<QII", 0, 1, 2), blk.S_UNSUPP),  # unknown flags
    (b"\0" * 15, blk.S_IOERR),  # not whole segments
    (struct.pack("<QII", 0, 1, 0) * (blk.MAX_DISCARD_SEG + 1), blk.S_IOERR),
])
def test_bad_discards(disk, image, segs, status):
    if not disk.dev.discard:
        pytest.skip("this file system cannot punch holes")
    assert disk.request(blk.T_DISCARD, out=segs)[0] == status
    assert image.read_bytes() == pattern()


# ---- bad host input ---------------------------------------------------------------------------------
def test_missing_image(tmp_path):
    with pytest.raises(VirtioError, match=r"disk image .*nope.img: no such file$"):
        VirtioBlk(tmp_path / "nope.img")


def test_read_only_image_asked_read_write(image):
    image.chmod(0o444)
    with pytest.raises(VirtioError, match=r"is read-only \(mode 0444\); ask for it read-only .*,ro\)$"):
        VirtioBlk(image)
    assert VirtioBlk(image, readonly=True).capacity == SECTORS


def test_image_size_not_whole_sectors(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(1000))
    with pytest.raises(VirtioError, match="its size \\(1000 bytes\\) is not a multiple of 512 bytes"):
        VirtioBlk(path)


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(VirtioError, match="not a regular file"):
        VirtioBlk(tmp_path)


def test_errors_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError) as info:
        VirtioBlk(tmp_path / "missing")
    assert "\n" not in str(info.value)


KILL_AFTER_FLUSH = textwrap.dedent("""
    import os, struct, sys, time
    sys.path.insert(0, sys.argv[2])
    from virtio_driver import GPA, bare_memory, notify, start
    from pykvm.virtio import VirtioBlk, VirtioMmio
    m = bare_memory()
    t = VirtioMmio(VirtioBlk(sys.argv[1]), m, GPA, threaded=False)
    ring = start(t, m)[0]
    m.write(0x20000, struct.pack("<IIQ", 1, 0, 2)); m.write(0x30000, b"acknowledged" * 100)
    ring.offer(ring.chain([(0x20000, 16, False), (0x30000, 1024, False), (0x70000, 1, True)]))
    m.write(0x20100, struct.pack("<IIQ", 4, 0, 0))
    ring.offer(ring.chain([(0x20100, 16, False), (0x70001, 1, True)], first=3))
    notify(t, 0)
    assert ring.take_used() == [(0, 1), (3, 1)] and m.read(0x70000, 2) == bytes(2)
    print("acked", flush=True)
    time.sleep(60)
""")


def test_a_flushed_write_survives_a_kill_right_after_the_acknowledgement(image):
    proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FLUSH, str(image), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "acked\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert image.read_bytes()[2 * 512 : 4 * 512] == (b"acknowledged" * 100)[:1024]


# ---- hostile drivers --------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402

from virtio_driver import (  # noqa: E402
    RAM, changed_outside, drive_hostile, hostile_rings, hostile_strategy, lay_out_hostile, readable_streams,
)


def named_sectors(streams) -> set[int]:
    """Every sector some chain's readable bytes name for a write or a discard (a generous superset)."""
    named = set()
    for stream in streams:
        if len(stream) < 16:
            continue
        kind, _, sector = struct.unpack_from("<IIQ", stream)
        if kind == blk.T_OUT:
            named.update(range(sector, min(sector + -(-(len(stream) - 16) // 512), SECTORS)))
        elif kind == blk.T_DISCARD:
            for at in range(16, len(stream) - 15, 16):
                first, count, _ = struct.unpack_from("<QII", stream, at)
                named.update(range(first, min(first + count, SECTORS)))
    return named


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=hostile_strategy())
def test_random_rings_never_raise_nor_write_outside_the_buffers_or_the_named_sectors(tmp_path, case):
    path = tmp_path / "hostile.img"
    path.write_bytes(pattern())
    memory = bare_memory()
    try:
        with VirtioMmio(VirtioBlk(path), memory, GPA, threaded=False) as t:
            allowed = lay_out_hostile(memory, t, case)
            before = memory.read(0, RAM)
            named = named_sectors(readable_streams(memory, hostile_rings(memory, t)))
            drive_hostile(t)
            assert t.stats[regs.HOST_ERRORS] == 0, t.error
            assert changed_outside(before, memory.read(0, RAM), allowed) == []
        after = path.read_bytes()
        assert len(after) == SECTORS * 512
        changed = {s for s in range(SECTORS) if after[s * 512 : (s + 1) * 512] != pattern()[s * 512 : (s + 1) * 512]}
        assert changed <= named
    finally:
        close_memory(memory)
