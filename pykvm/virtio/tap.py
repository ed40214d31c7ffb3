"""A TAP network device for virtio-net: ``/dev/net/tun`` with the virtio-net v1 header on every frame.

``Tap("pykvmtap0")`` creates (or attaches to) the TAP interface of that name in the caller's network
namespace with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, sets the header size to 12 bytes
(``struct virtio_net_hdr_v1``, the header of virtio 1.x, ``TUNSETVNETHDRSZ``) and turns every
offload off (``TUNSETOFFLOAD 0``: the guest is offered no checksum or segmentation offload, so it
hands over complete frames and gets complete frames). Each ``read`` gives one frame with its 12-byte
header in front, each ``write`` takes one: the layout of a virtqueue buffer, so ``VirtioNet`` moves
buffers between the rings and the TAP with ``readv``/``writev`` and no copy in Python.

Creating a TAP device needs CAP_NET_ADMIN (in the owning user namespace of the network namespace).
The interface is not persistent: it goes away when the file descriptor is closed. The ioctls go
through cffi's ``ioctl`` (never ``fcntl.ioctl``, see DESIGN.md); the request numbers are computed
with ioctl_opt from ``cdefs/net.h`` sizes, and checked against <linux/if_tun.h> by the tests.
"""

from __future__ import annotations

import errno as _errno
import os

from ioctl_opt import IOC, IOC_READ, IOC_WRITE

from .._ffi import ffi, lib
from . import VirtioError

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16  # the name and its terminating NUL
VNET_HDR_SIZE = 12  # sizeof(struct virtio_net_hdr_v1)

# <linux/if_tun.h>
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

_TUN_MAGIC = ord("T")


def _tun(direction: int, nr: int, ctype: str | None) -> int:
    return IOC(direction, _TUN_MAGIC, nr, ffi.sizeof(ctype) if ctype else 0)


#: The TUN requests pykvm issues, by their <linux/if_tun.h> names. TUNSETIFF takes a struct ifreq *
#: but is declared _IOW('T', 202, int) in the header, so its number encodes sizeof(int).
REQUESTS: dict[str, int] = {
    "TUNSETIFF": _tun(IOC_WRITE, 202, "int"),
    "TUNGETFEATURES": _tun(IOC_READ, 207, "unsigned int"),
    "TUNSETOFFLOAD": _tun(IOC_WRITE, 208, "unsigned int"),
    "TUNGETIFF": _tun(IOC_READ, 210, "unsigned int"),
    "TUNGETVNETHDRSZ": _tun(IOC_READ, 215, "int"),
    "TUNSETVNETHDRSZ": _tun(IOC_WRITE, 216, "int"),
}

_ULONG = "unsigned long"


class TapError(VirtioError):
    """A TAP device could not be opened or set up; one line that says why (and the fix, where there is one).

    ``.errno`` is the errno of the failed call, or None for an argument refused before any call.
    """

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


def tun_ioctl(fd: int, name: str, arg) -> int:
    """Issue the TUN ioctl ``name`` on ``fd`` through cffi; a failure raises OSError(errno) at once."""
    if not isinstance(arg, ffi.CData):
        arg = ffi.cast(_ULONG, arg)
    ret = lib.ioctl(fd, REQUESTS[name], arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def check_name(name: str) -> bytes:
    """The interface name as the kernel takes it (ASCII, 1 to 15 bytes, no '/', ':' or white space)."""
    if not isinstance(name, str):
        raise TapError(f"a TAP device name is a str, not {type(name).__name__}")
    raw = name.encode("ascii", "replace")
    if not raw:
        raise TapError("a TAP device needs a name (e.g. tap=pykvmtap0)")
    if len(raw) >= IFNAMSIZ:
        raise TapError(f"TAP device name {name!r} is too long: {len(raw)} bytes, at most {IFNAMSIZ - 1}")
    if name in (".", "..") or any(c in name for c in "/: \t\n") or not name.isascii() or not name.isprintable():
        raise TapError(f"TAP device name {name!r} is not a valid interface name")
    return raw


class Tap:
    """One TAP interface, opened for frames with a 12-byte virtio-net v1 header. Closes with the object.

    ``fd`` is non-blocking: ``read_into`` returns 0 when no frame is waiting.
    """

    def __init__(self, name: str, *, tun_path: str = TUN_PATH):
        raw = check_name(name)
        self.name = name
        try:
            self.fd = os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(f"creating TAP device {name} needs {tun_path}, which does not exist: "
                           "load the tun module (modprobe tun)", _errno.ENOENT) from None
        except PermissionError as e:
            raise TapError(f"creating TAP device {name}: cannot open {tun_path}: {e.strerror}", e.errno) from None
        except OSError as e:
            raise TapError(f"creating TAP device {name}: cannot open {tun_path}: {e.strerror}", e.errno) from None
        try:
            self._setup(raw)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _setup(self, raw: bytes) -> None:
        name = self.name
        ifr = ffi.new("struct ifreq *")
        ffi.memmove(ifr.ifr_name, raw, len(raw))
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        try:
            tun_ioctl(self.fd, "TUNSETIFF", ifr)
        except OSError as e:
            if e.errno == _errno.EPERM:
                raise TapError(f"creating TAP device {name} needs CAP_NET_ADMIN: "
                               "run as root or give pykvm the capability", e.errno) from None
            if e.errno == _errno.EBUSY:
                raise TapError(f"TAP device {name} is in use by another process (or is not a TAP device)",
                               e.errno) from None
            if e.errno == _errno.EINVAL:
                raise TapError(f"{name} exists and is not a TAP device with these flags "
                               "(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)", e.errno) from None
            raise TapError(f"creating TAP device {name}: {e.strerror}", e.errno) from None
        self.name = ffi.string(ifr.ifr_name).decode("ascii")
        hdr = ffi.new("int *", VNET_HDR_SIZE)
        try:
            tun_ioctl(self.fd, "TUNSETVNETHDRSZ", hdr)
            tun_ioctl(self.fd, "TUNSETOFFLOAD", 0)
        except OSError as e:
            raise TapError(f"setting up TAP device {name}: {e.strerror}", e.errno) from None

    # ---- state, as the kernel reports it ---------------------------------------------------------

    def vnet_hdr_size(self) -> int:
        """The header size the kernel puts in front of each frame. Wraps ``TUNGETVNETHDRSZ``."""
        size = ffi.new("int *")
        tun_ioctl(self.fd, "TUNGETVNETHDRSZ", size)
        return size[0]

    def flags(self) -> int:
        """The interface's IFF_* flags. Wraps ``TUNGETIFF``."""
        ifr = ffi.new("struct ifreq *")
        tun_ioctl(self.fd, "TUNGETIFF", ifr)
        return ifr.ifr_ifru.ifru_flags & 0xFFFF

    # ---- frames -----------------------------------------------------------------------------------

    def read_into(self, buffers) -> int:
        """Read one frame (12-byte header first) into the writable ``buffers``; 0 if none is waiting.

        A frame longer than the buffers is cut to their size by the kernel (the rest is lost).
        """
        try:
            return os.readv(self.fd, buffers)
        except BlockingIOError:
            return 0

    def write_from(self, buffers) -> int:
        """Send one frame (12-byte header first) gathered from ``buffers``; its length in bytes."""
        return os.writev(self.fd, buffers)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the TAP fd (the interface goes away with it); idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fd={self.fd})"
