"""Paravirtual devices: virtio 1.x over MMIO (virtio-v1.2 §2, §4.2, §5).

Three layers, each in its own module:

- :mod:`pykvm.virtio.queue`: split virtqueues in guest memory (descriptor tables, available and
  used rings, indirect descriptors, the event index), read with every address checked.
  A malformed ring is a :class:`~pykvm.virtio.queue.VirtqueueError`: the guest's error.
- :mod:`pykvm.virtio.mmio`: the virtio-mmio transport (register layout version 2), a pykvm
  bus device: feature negotiation, status and reset, queue notifications through KVM ioeventfds
  and interrupts through an irqfd, and the device's worker thread.
- backends, one per device type: :class:`~pykvm.virtio.blk.VirtioBlk`,
  :class:`~pykvm.virtio.console.VirtioConsole`, :class:`~pykvm.virtio.rng.VirtioRng`. Each is a
  :class:`VirtioDevice`: it says what it offers (ID, queues, features, config space) and serves
  its queues in the transport's worker thread.

Errors, as everywhere in pykvm: bad host input (a missing disk image...) raises
:class:`VirtioError` when the backend is made; whatever a guest driver does wrong becomes a device
status (``VIRTIO_BLK_S_IOERR``...) or ``DEVICE_NEEDS_RESET`` with a configuration-change
interrupt, never an exception in the host.

``Machine.add_virtio(device)`` puts a backend on a machine (:mod:`pykvm.machine`).
"""

from __future__ import annotations

# ---- device status (§2.1) -------------------------------------------------------------------------
STATUS_ACKNOWLEDGE = 0x01  # the guest found the device
STATUS_DRIVER = 0x02  # the guest has a driver for it
STATUS_DRIVER_OK = 0x04  # the driver is ready: the device may use its queues
STATUS_FEATURES_OK = 0x08  # the driver's features are accepted (the device clears it if not)
STATUS_DEVICE_NEEDS_RESET = 0x40  # the device hit an error it cannot recover from without a reset
STATUS_FAILED = 0x80  # the driver gave up on the device

# ---- reserved feature bits (§6) -------------------------------------------------------------------
F_RING_INDIRECT_DESC = 1 << 28  # descriptors may point at indirect tables
F_RING_EVENT_IDX = 1 << 29  # used_event / avail_event suppress notifications and interrupts
F_VERSION_1 = 1 << 32  # virtio 1.x (not legacy): required by this transport
TRANSPORT_FEATURES = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1  # offered for every device

# ---- device IDs (§5) ------------------------------------------------------------------------------
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4

# ---- interrupt status bits (§4.2.2, InterruptStatus) ------------------------------------------------
INT_USED_BUFFER = 0x1  # a queue's used ring was updated
INT_CONFIG_CHANGE = 0x2  # the configuration space (or the status: DEVICE_NEEDS_RESET) changed


class VirtioError(ValueError):
    """A virtio backend cannot be made from what the host gave it (one line that says why)."""


class VirtioDevice:
    """A virtio device type: what it offers a driver and how it serves its queues.

    Subclasses set :attr:`device_id`, :attr:`name` and :attr:`queue_sizes` (the QueueNumMax of each
    queue) and override the methods below. The transport calls :meth:`activate` when the driver
    sets DRIVER_OK, then :meth:`process` from its worker thread whenever the driver notifies a
    queue, and :meth:`wake` when one of :meth:`wake_fds` becomes readable (input from the host).
    A device raises :class:`~pykvm.virtio.queue.VirtqueueError` (from the queue it is walking)
    for a malformed ring; the transport then sets DEVICE_NEEDS_RESET. Interrupts for used buffers
    are the transport's business; a device whose configuration changes calls
    ``self.transport.config_changed()``.
    """

    device_id = 0
    name = "virtio"
    queue_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.transport = None  # the VirtioMmio serving this device (set when it is attached)
        self.queues: list = []  # the transport's Virtqueue objects (valid from activate on)
        self.features = 0  # the features the driver accepted (valid from activate on)

    def device_features(self) -> int:
        """The device-specific feature bits offered (the transport adds VERSION_1 and the ring features)."""
        return 0

    def config(self) -> bytes:
        """The device configuration space as it reads now (little-endian fields)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver's write of ``data`` at ``offset`` of the configuration space (ignored by default)."""

    def activate(self, features: int, queues: list) -> None:
        """The driver set DRIVER_OK with ``features`` negotiated; ``queues`` are the transport's queues."""
        self.features = features
        self.queues = queues

    def process(self, index: int, queue) -> None:
        """Serve every buffer the driver made available on queue ``index`` (worker thread)."""

    def wake_fds(self) -> list[int]:
        """File descriptors the worker polls for this device besides the queue notifications."""
        return []

    def wake(self, fd: int) -> None:
        """``fd`` (one of :meth:`wake_fds`) is readable: do the work it signals (worker thread)."""

    def reset(self) -> None:
        """The driver reset the device (the worker has stopped): forget per-session state."""
        self.features = 0
        self.queues = []

    # ---- snapshots, restore, migration -----------------------------------------------------------
    def recipe(self) -> dict | None:
        """How to build this backend again, as plain data (``{"type": "blk", ...}``, see
        :func:`pykvm.snapshot.build_machine`), or None where it is made of something that is not
        data (a function, an input file descriptor): a machine with it is not snapshotted or moved."""
        return None

    def save(self) -> dict:
        """The backend's own state (beyond the transport's and the rings in guest memory), taken with
        its transport quiesced (no request in flight). Plain data, as ``Device.save``."""
        raise NotImplementedError(f"virtio {self.name} ({type(self).__name__}) does not say what its state is")

    def restore(self, state: dict) -> None:
        """Put back what :meth:`save` gave, on a backend built from :meth:`recipe` and activated
        with the saved features and queues; raises ValueError naming what does not fit."""
        raise NotImplementedError(f"virtio {self.name} ({type(self).__name__}) cannot take a saved state")

    def close(self) -> None:
        """Release host resources (files, threads). Idempotent."""


from .queue import Chain, Virtqueue, VirtqueueError  # noqa: E402  (modules below use the names above)
from .mmio import VirtioMmio  # noqa: E402
from .blk import VirtioBlk  # noqa: E402
from .console import VirtioConsole  # noqa: E402
from .rng import VirtioRng  # noqa: E402

__all__ = [
    "Chain", "Virtqueue", "VirtqueueError", "VirtioDevice", "VirtioError", "VirtioMmio",
    "VirtioBlk", "VirtioConsole", "VirtioRng",
]
