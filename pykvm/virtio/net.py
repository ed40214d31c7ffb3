"""virtio-net (virtio-v1.2 §5.1) on a host TAP device.

Two queues: receiveq (0) and transmitq (1); no control queue, no multiqueue, no offloads. Every
buffer on either queue starts with the 12-byte ``struct virtio_net_hdr_v1``, which is also what
the TAP puts in front of each frame (``IFF_VNET_HDR``, header size 12: :mod:`pykvm.virtio.tap`), so
frames move between the rings and the TAP with one ``readv`` / ``writev`` on views of guest memory:

- transmit: each chain's readable bytes (header, then the frame) are written to the TAP as they
  are; the chain goes back with 0 bytes written. A chain shorter than the header, or one the TAP
  refuses, is counted in ``stats["tx errors"]`` and returned all the same.
- receive: when the TAP has a frame, the device takes the next receive chain and reads the frame
  (header first) into its writable buffers, sets ``num_buffers`` to 1 (the device never merges
  buffers: VIRTIO_NET_F_MRG_RXBUF is not offered), and returns it with the length read. A frame
  that arrives while the driver has posted no receive buffer is dropped and counted
  (``stats["rx dropped (no buffer)"]``), as a NIC with a full ring drops it; one longer than the
  buffers is cut to them (``stats["rx truncated"]``).

The TAP's file descriptor is one of :meth:`VirtioNet.wake_fds`, so the transport's worker thread
polls it together with the queue notification eventfds: no thread of this device's own.

Features offered: VIRTIO_NET_F_MAC (the configuration space holds the MAC address) and
VIRTIO_NET_F_STATUS (the link status, always up); the transport adds VIRTIO_F_VERSION_1 and the
ring features. With no offload features the driver must post receive buffers of at least
12 + 1514 bytes (§5.1.6.3.1); smaller ones still work for frames that fit.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter

from . import ID_NET, VirtioDevice, VirtioError
from .tap import VNET_HDR_SIZE, Tap

F_MAC = 1 << 5
F_STATUS = 1 << 16
S_LINK_UP = 1

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256
MAX_FRAME = 65535  # the largest frame (without its header) the device sends to the TAP
RX_BUDGET = 64  # frames taken from the TAP per wake-up, so that transmits are not starved
NUM_BUFFERS = 10  # offset of le16 num_buffers in struct virtio_net_hdr_v1

# statistics keys
RX_FRAMES = "rx frames"
RX_BYTES = "rx bytes"
RX_DROPPED = "rx dropped (no buffer)"
RX_TRUNCATED = "rx truncated"
RX_BAD_BUFFERS = "rx buffers too small for the header"
TX_FRAMES = "tx frames"
TX_BYTES = "tx bytes"
TX_ERRORS = "tx errors"

_MAC_TEXT = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(mac: str | bytes | None) -> bytes:
    """Six bytes of a unicast MAC address: ``"52:54:00:12:34:56"``, 6 bytes, or None for a random
    locally administered one (52:54:00:xx:xx:xx, the prefix QEMU and kvmtool use)."""
    if mac is None:
        return b"\x52\x54\x00" + os.urandom(3)
    if isinstance(mac, str):
        if not _MAC_TEXT.match(mac):
            raise VirtioError(f"MAC address {mac!r} is not six hex bytes separated by colons (like 52:54:00:12:34:56)")
        raw = bytes.fromhex(mac.replace(":", ""))
    elif isinstance(mac, (bytes, bytearray)) and len(mac) == 6:
        raw = bytes(mac)
    else:
        raise VirtioError(f"a MAC address is a string like 52:54:00:12:34:56 or 6 bytes, not {mac!r}")
    if raw[0] & 1:
        raise VirtioError(f"MAC address {format_mac(raw)} is a multicast address: a NIC needs a unicast one")
    if raw == bytes(6):
        raise VirtioError("MAC address 00:00:00:00:00:00 is not a station address")
    return raw


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class VirtioNet(VirtioDevice):
    """A network card whose wire is the TAP interface ``tap`` (created if it does not exist; needs
    CAP_NET_ADMIN). ``tap`` may also be an open :class:`~pykvm.virtio.tap.Tap`, which the device
    then owns. ``mac`` is the guest's address (random 52:54:00:xx:xx:xx by default).

    :attr:`stats` counts frames and bytes each way, drops and errors."""

    device_id = ID_NET
    name = "net"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: str | Tap, mac: str | bytes | None = None) -> None:
        super().__init__()
        self.mac = parse_mac(mac)  # before the TAP: a bad MAC leaves nothing to close
        self.tap = tap if isinstance(tap, Tap) else Tap(tap)
        self.stats: Counter[str] = Counter()
        self._held = None  # a receive chain taken when the TAP turned out empty, used for the next frame
        self._spill = bytearray(VNET_HDR_SIZE + MAX_FRAME + 4)  # frames dropped, or the cut-off tail of one

    def __repr__(self) -> str:
        return f"<VirtioNet tap={self.tap.name} mac={format_mac(self.mac)}>"

    # ---- what the device offers -----------------------------------------------------------------
    def device_features(self) -> int:
        return F_MAC | F_STATUS

    def config(self) -> bytes:
        """mac[6], le16 status (VIRTIO_NET_S_LINK_UP)."""
        return self.mac + struct.pack("<H", S_LINK_UP)

    def wake_fds(self) -> list[int]:
        return [self.tap.fileno()] if self.tap.fd >= 0 else []

    # ---- the queues -------------------------------------------------------------------------------
    def process(self, index: int, queue) -> None:
        if index == TRANSMITQ:
            self._transmit(queue)
        # receiveq: new buffers need nothing now; the next frame from the TAP takes them

    def wake(self, fd: int) -> None:
        """The TAP has frames: deliver them to the receive buffers (or drop them without any)."""
        if self.queues:
            self._receive(self.queues[RECEIVEQ])

    def _transmit(self, queue) -> None:
        stats, tap = self.stats, self.tap
        for chain in queue:
            length = chain.readable_len
            if length < VNET_HDR_SIZE or length > VNET_HDR_SIZE + MAX_FRAME:
                stats[TX_ERRORS] += 1
            else:
                try:
                    tap.write_from(chain.read_views(0, length))
                except OSError:  # the TAP refused the frame (a bad header, the interface gone): a lost frame
                    stats[TX_ERRORS] += 1
                else:
                    stats[TX_FRAMES] += 1
                    stats[TX_BYTES] += length - VNET_HDR_SIZE
            queue.push(chain.head, 0)

    def _receive(self, queue) -> None:
        stats, tap, spill = self.stats, self.tap, self._spill
        for _ in range(RX_BUDGET):
            chain, self._held = self._held, None
            if chain is None:
                chain = queue.pop()
            if chain is None:  # no buffer posted: the frame is dropped
                if not tap.read_into([spill]):
                    return
                stats[RX_DROPPED] += 1
                continue
            room = chain.writable_len
            if room < VNET_HDR_SIZE:
                stats[RX_BAD_BUFFERS] += 1
                queue.push(chain.head, 0)
                continue
            n = tap.read_into([*chain.write_views(0, room), spill])
            if not n:
                self._held = chain  # the TAP is empty after all: keep the buffer for the next frame
                return
            if n > room:
                stats[RX_TRUNCATED] += 1
                n = room
            chain.write(NUM_BUFFERS, b"\x01\x00")
            stats[RX_FRAMES] += 1
            stats[RX_BYTES] += n - VNET_HDR_SIZE
            queue.push(chain.head, n)

    # ---- snapshots --------------------------------------------------------------------------------
    def recipe(self) -> dict:
        """The TAP by name (a restore opens or creates it in its own network namespace) and the MAC."""
        return {"type": "net", "tap": self.tap.name, "mac": format_mac(self.mac)}

    def save(self) -> dict:
        return {"mac": format_mac(self.mac), "held": None if self._held is None else self._held.head,
                "stats": dict(self.stats)}

    def restore(self, state: dict) -> None:
        from ..devices.base import field

        mac = field(state, "mac", str)
        if mac != format_mac(self.mac):
            raise ValueError(f"the saved MAC address is {mac}, this device's {format_mac(self.mac)}")
        held = field(state, "held", (int, type(None)))
        self.stats = Counter({str(k): int(v) for k, v in field(state, "stats", dict).items()})
        self._held = None
        if held is not None:
            if not self.queues:
                raise ValueError("a receive buffer was held, but the device is not active")
            from .queue import VirtqueueError

            try:
                self._held = self.queues[RECEIVEQ].retake(held)
            except VirtqueueError as e:
                raise ValueError(f"the held receive buffer: {e}") from None

    # ---- life cycle -------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._held = None

    def close(self) -> None:
        """Close the TAP (the interface goes away unless someone else holds it). Idempotent."""
        self._held = None
        self.tap.close()
