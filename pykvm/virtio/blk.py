"""virtio-blk (virtio-v1.2 §5.2) on a raw image file.

A request is one chain: a 16-byte header (``le32 type, le32 reserved, le64 sector``) at the start
of its readable bytes, the data (readable for writes and discards, writable for reads and GET_ID),
and one status byte, the last writable byte. Supported: T_IN, T_OUT, T_FLUSH, T_GET_ID and,
where the image's file system can punch holes, T_DISCARD (``fallocate(PUNCH_HOLE | KEEP_SIZE)``).

Guarantees: every request is checked against the capacity (in 512-byte sectors, fixed when the
image is opened) before the file is touched, so nothing is ever written outside the image; a
request that names sectors beyond it, a data length that is not whole sectors, a write to a
read-only disk get VIRTIO_BLK_S_IOERR, an unknown type VIRTIO_BLK_S_UNSUPP. T_FLUSH completes
only after ``fdatasync``; where the driver did not negotiate VIRTIO_BLK_F_FLUSH the device is
write-through (``fdatasync`` after every write before it completes), so a write or flush the
guest has seen acknowledged survives pykvm being killed (and the host crashing). A chain with no
status byte cannot be answered: its queue gets DEVICE_NEEDS_RESET (as any malformed ring).
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from cffi import FFI

from . import ID_BLOCK, VirtioDevice, VirtioError
from .queue import Chain, VirtqueueError

SECTOR = 512

# feature bits (§5.2.3)
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13

# request types and statuses (§5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
QUEUE_SIZE = 128
SEG_MAX = QUEUE_SIZE - 2  # data segments a request may have (header and status take the other two)
SIZE_MAX = 1 << 20  # the largest data segment the driver may use
MAX_DISCARD_SEG = 32
MAX_DISCARD_SECTORS = (1 << 32) - 1  # one segment's num_sectors is 32-bit anyway
DISCARD_ALIGNMENT = 4096 // SECTOR  # sectors: hole punching works on file-system blocks
CONFIG_SIZE = 60  # up to write_zeroes_may_unmap and its padding

_HEADER = struct.Struct("<IIQ")
_DISCARD_SEG = struct.Struct("<QII")
DISCARD_F_UNMAP = 1

_ffi = FFI()
_ffi.cdef("int fallocate(int fd, int mode, long offset, long len);")
_libc = _ffi.dlopen(None)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of a file, its size kept; reads there give zeros.
    Raises OSError (EOPNOTSUPP where the file system cannot)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = _ffi.errno
        raise OSError(err, os.strerror(err))


class _Status(Exception):
    """A request's outcome other than S_OK (raised inside the request handler)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioDevice):
    """A disk: the raw image at ``path`` (its size a multiple of 512 bytes), read-write unless
    ``readonly``. ``serial`` is what T_GET_ID answers (default: the file's name, at most 20 bytes).

    ``stats`` counts requests by outcome and bytes read and written."""

    device_id = ID_BLOCK
    name = "blk"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str | os.PathLike, readonly: bool = False, *, serial: str | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.readonly = readonly
        self._fd = -1
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise VirtioError(f"disk image {self.path}: no such file") from None
        except OSError as e:
            raise VirtioError(f"disk image {self.path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise VirtioError(f"disk image {self.path}: not a regular file (a raw image file is needed)")
        if st.st_size % SECTOR:
            raise VirtioError(f"disk image {self.path}: its size ({st.st_size} bytes) is not a multiple of "
                              f"{SECTOR} bytes")
        ask_ro = (f"disk image {self.path} is read-only ({{}}); ask for it read-only "
                  f"(readonly=True, --disk {self.path},ro)")
        if not readonly and not st.st_mode & 0o222:  # marked read-only: even root is not to write it
            raise VirtioError(ask_ro.format(f"mode {stat.S_IMODE(st.st_mode):04o}"))
        try:
            self._fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            if readonly or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise VirtioError(f"disk image {self.path}: {e.strerror}") from None
            raise VirtioError(ask_ro.format(e.strerror.lower())) from None
        self.capacity = st.st_size // SECTOR  # sectors, fixed for the device's life
        self.serial = (serial if serial is not None else os.path.basename(self.path)).encode()[:ID_BYTES]
        self.discard = not readonly and self._can_punch_holes(st.st_size)
        self.stats = {"requests": 0, "ok": 0, "ioerr": 0, "unsupp": 0, "bytes read": 0, "bytes written": 0,
                      "flushes": 0, "discards": 0}

    def _can_punch_holes(self, size: int) -> bool:
        """Whether the image's file system punches holes: a probe past the end (nothing there to lose)."""
        end = -(-size // 4096) * 4096
        try:
            punch_hole(self._fd, end, 4096)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                return False
            raise
        return True

    def __repr__(self) -> str:
        return f"<VirtioBlk {self.path} {self.capacity} sectors{' ro' if self.readonly else ''}>"

    # ---- what the device offers -----------------------------------------------------------------
    def device_features(self) -> int:
        features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
        if self.readonly:
            features |= F_RO
        if self.discard:
            features |= F_DISCARD
        return features

    def config(self) -> bytes:
        """capacity, size_max, seg_max, geometry (0), blk_size, topology (0), writeback (0),
        max_discard_sectors, max_discard_seg, discard_sector_alignment, write-zeroes fields (0)."""
        data = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", data, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", data, 20, SECTOR)
        if self.discard:
            struct.pack_into("<III", data, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT)
        return bytes(data)

    # ---- requests -------------------------------------------------------------------------------
    def process(self, index: int, queue) -> None:
        for chain in queue:
            written = self.handle(chain)
            queue.push(chain.head, written)

    def handle(self, chain: Chain) -> int:
        """Carry out one request and write its status byte; returns the bytes written into the chain."""
        space = chain.writable_len
        if space == 0:
            raise VirtqueueError(f"virtio-blk: the request at head {chain.head} has no status byte")
        self.stats["requests"] += 1
        try:
            written = self._request(chain, space - 1)
            status = S_OK
        except _Status as e:
            written, status = 0, e.status
        except OSError:  # the host's I/O failed (EIO, ENOSPC...): the guest sees an I/O error
            written, status = 0, S_IOERR
        chain.write(space - 1, bytes([status]))
        self.stats[{S_OK: "ok", S_IOERR: "ioerr", S_UNSUPP: "unsupp"}[status]] += 1
        return written + 1

    def _request(self, chain: Chain, data_in: int) -> int:
        """Do the request; ``data_in`` writable bytes precede the status byte. Returns data bytes written."""
        if chain.readable_len < _HEADER.size:
            raise _Status(S_IOERR, "no request header")
        kind, _, sector = _HEADER.unpack(chain.read(0, _HEADER.size))
        data_out = chain.readable_len - _HEADER.size
        if kind == T_IN:
            offset = self._range(sector, data_in)
            self._read(chain.write_views(0, data_in), offset, data_in)
            self.stats["bytes read"] += data_in
            return data_in
        if kind == T_OUT:
            if self.readonly:
                raise _Status(S_IOERR, "write to a read-only disk")
            offset = self._range(sector, data_out)
            self._write(chain.read_views(_HEADER.size, data_out), offset, data_out)
            if not self.features & F_FLUSH:
                os.fdatasync(self._fd)  # write-through: the driver cannot ask for a flush
            self.stats["bytes written"] += data_out
            return 0
        if kind == T_FLUSH:
            if not self.readonly:
                os.fdatasync(self._fd)
            self.stats["flushes"] += 1
            return 0
        if kind == T_GET_ID:
            return chain.write(0, self.serial[: min(data_in, ID_BYTES)])
        if kind == T_DISCARD and self.discard:
            self._discard(chain.read(_HEADER.size, data_out))
            return 0
        raise _Status(S_UNSUPP, f"request type {kind}")

    def _range(self, sector: int, length: int) -> int:
        """The file offset of ``length`` bytes at ``sector``, checked against the capacity."""
        if length % SECTOR:
            raise _Status(S_IOERR, f"a data length of {length} bytes is not whole sectors")
        if sector > self.capacity or length // SECTOR > self.capacity - sector:
            raise _Status(S_IOERR, f"sectors {sector}+{length // SECTOR} are beyond the capacity {self.capacity}")
        return sector * SECTOR

    def _read(self, views: list[memoryview], offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = os.preadv(self._fd, _skip(views, done), offset + done)
            if n <= 0:  # the image shrank under the device
                raise _Status(S_IOERR, "short read")
            done += n

    def _write(self, views: list[memoryview], offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = os.pwritev(self._fd, _skip(views, done), offset + done)
            if n <= 0:
                raise _Status(S_IOERR, "short write")
            done += n

    def _discard(self, segments: bytes) -> None:
        if self.readonly:
            raise _Status(S_IOERR, "discard on a read-only disk")
        if not segments or len(segments) % _DISCARD_SEG.size or len(segments) // _DISCARD_SEG.size > MAX_DISCARD_SEG:
            raise _Status(S_IOERR, f"{len(segments)} bytes of discard segments")
        ranges = []
        for sector, count, flags in _DISCARD_SEG.iter_unpack(segments):
            if flags & ~DISCARD_F_UNMAP:
                raise _Status(S_UNSUPP, f"discard flags {flags:#x}")
            ranges.append((self._range(sector, count * SECTOR), count * SECTOR))
        for offset, length in ranges:  # all checked before any is done
            if length:
                punch_hole(self._fd, offset, length)
        self.stats["discards"] += len(ranges)

    # ---- snapshots ------------------------------------------------------------------------------
    def recipe(self) -> dict:
        """The image is named, not saved: a restore opens the same file (a snapshot does not hold
        the disk's contents; the image must be the one the guest left, of the same size)."""
        return {"type": "blk", "path": os.path.abspath(self.path), "readonly": self.readonly,
                "serial": self.serial.decode(errors="replace"), "sectors": self.capacity}

    def save(self) -> dict:
        return {"sectors": self.capacity, "discard": self.discard}

    def restore(self, state: dict) -> None:
        from ..devices.base import field

        sectors = field(state, "sectors", int)
        if sectors != self.capacity:
            raise ValueError(f"disk image {self.path} has {self.capacity} sectors; the saved machine's had {sectors}")
        if field(state, "discard", bool) and not self.discard and self.features & F_DISCARD:
            raise ValueError(f"disk image {self.path}: the guest uses discard, but this host's file system "
                             "cannot punch holes in it")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        return self._fd


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The views with their first ``n`` bytes dropped (for resuming a partial preadv/pwritev)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
