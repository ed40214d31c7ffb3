"""virtio-rng (virtio-v1.2 §5.4): host entropy for the guest.

One queue (requestq): the driver posts writable buffers, the device fills them from ``source``
(``os.urandom`` by default) and returns them with the number of bytes written. A request is
filled up to :data:`MAX_REQUEST` bytes, so one chain cannot make the host produce the guest's
whole RAM in entropy.
"""

from __future__ import annotations

import os
from typing import Callable

from . import ID_RNG, VirtioDevice

QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024  # bytes of entropy per request at most


class VirtioRng(VirtioDevice):
    """An entropy source: ``source(n)`` returns (up to) ``n`` random bytes. ``bytes_given``
    counts what the guest received."""

    device_id = ID_RNG
    name = "rng"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__()
        if not callable(source):
            raise TypeError(f"the rng source must be a function of a byte count, not {type(source).__name__}")
        self.source = source
        self.bytes_given = 0

    def process(self, index: int, queue) -> None:
        for chain in queue:
            want = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(0, bytes(self.source(want))[:want]) if want else 0
            self.bytes_given += written
            queue.push(chain.head, written)

    def recipe(self) -> dict | None:
        """Only the host's own entropy (os.urandom) is data; another source is a function."""
        return {"type": "rng"} if self.source is os.urandom else None

    def save(self) -> dict:
        return {"bytes_given": self.bytes_given}

    def restore(self, state: dict) -> None:
        from ..devices.base import field

        self.bytes_given = field(state, "bytes_given", int)
