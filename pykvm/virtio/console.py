"""virtio-console (virtio-v1.2 §5.3), port 0 only: Linux's hvc0.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the guest's output. The
output goes to a stream (flushed at each newline) and is kept in a
:class:`~pykvm.devices.base.BoundedCapture` (:attr:`VirtioConsole.captured`), as pykvm's other
consoles do. Input comes from a file descriptor or a binary stream: a feeder thread reads it into
a bounded buffer and wakes the device's worker, which copies it into the receive buffers the
driver has posted (input that arrives while there are none waits for them). With
VIRTIO_CONSOLE_F_EMERG_WRITE the driver may also write a byte to ``emerg_wr`` in the configuration
space (an early console, no queue needed).
"""

from __future__ import annotations

import os
import select
import struct
import threading
from typing import BinaryIO

from ..devices.base import DEFAULT_CAPTURE_LIMIT, ConsoleOutput
from . import ID_CONSOLE, VirtioDevice

F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 64
EMERG_WR = 8  # config offset of le32 emerg_wr (after le16 cols, le16 rows, le32 max_nr_ports)
INPUT_LIMIT = 64 * 1024  # bytes of input buffered while the guest posts no receive buffers


class VirtioConsole(VirtioDevice):
    """A console on port 0: guest output to ``output`` (a binary stream, or None to only capture
    it), host input from ``input`` (a file descriptor, a binary stream, or None).

    :attr:`captured` is the newest ``limit`` bytes of output, :attr:`dropped` how many older
    ones were let go."""

    device_id = ID_CONSOLE
    name = "console"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: BinaryIO | None = None, input: BinaryIO | int | None = None, *,
                 limit: int = DEFAULT_CAPTURE_LIMIT) -> None:
        super().__init__()
        self.output = ConsoleOutput(output, limit)
        self.input = input
        self._pending = bytearray()
        self._input_lock = threading.Lock()
        self._room = threading.Event()
        self._room.set()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._feeder: threading.Thread | None = None
        self._closed = False
        self.input_bytes = 0  # bytes delivered to the guest

    @property
    def captured(self) -> bytes:
        """The newest bytes the guest wrote (at most the capture limit)."""
        return self.output.capture.getvalue()

    @property
    def dropped(self) -> int:
        """Output bytes no longer kept in :attr:`captured` (they did reach the stream)."""
        return self.output.capture.dropped

    # ---- what the device offers -----------------------------------------------------------------
    def device_features(self) -> int:
        return F_EMERG_WRITE

    def config(self) -> bytes:
        """cols, rows (0: unknown), max_nr_ports (1), emerg_wr (reads 0)."""
        return struct.pack("<HHII", 0, 0, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR and data:
            self.output.emit(data[:1])

    # ---- input ----------------------------------------------------------------------------------
    def activate(self, features: int, queues: list) -> None:
        super().activate(features, queues)
        if self.input is not None and self._feeder is None and not self._closed:
            self._feeder = threading.Thread(target=self._feed, name="virtio-console input", daemon=True)
            self._feeder.start()

    def feed(self, data: bytes) -> None:
        """Queue ``data`` as input for the guest (what the feeder thread does with what it reads)."""
        with self._input_lock:
            self._pending += data
            if len(self._pending) >= INPUT_LIMIT:
                self._room.clear()
        os.eventfd_write(self._wake_fd, 1)

    def _read_input(self) -> bytes:
        """The next input bytes; b"" at the end of the input or when the device closes."""
        source = self.input
        fd = source if isinstance(source, int) else _fileno(source)
        if fd is not None:
            ready = select.select([fd, self._stop_fd], [], [])[0]
            if self._stop_fd in ready:
                return b""
            try:
                return os.read(fd, 4096)
            except BlockingIOError:
                return self._read_input()
            except OSError:
                return b""
        read = getattr(source, "read1", None) or source.read
        return read(4096) or b""

    def _feed(self) -> None:
        while not self._closed:
            while not self._room.wait(0.1):
                if self._closed:
                    return
            data = self._read_input()
            if not data:
                return
            self.feed(data)

    def _deliver(self) -> None:
        """Copy pending input into the receive buffers the driver posted, as far as they go."""
        queue = self.queues[RECEIVEQ] if self.queues else None
        if queue is None:
            return
        while True:
            with self._input_lock:
                if not self._pending:
                    return
            chain = queue.pop()
            if chain is None:
                return
            with self._input_lock:
                n = chain.write(0, bytes(self._pending[: chain.writable_len]))
                del self._pending[:n]
                if len(self._pending) < INPUT_LIMIT:
                    self._room.set()
            self.input_bytes += n
            queue.push(chain.head, n)

    # ---- the worker's side ----------------------------------------------------------------------
    def process(self, index: int, queue) -> None:
        if index == TRANSMITQ:
            for chain in queue:
                for view in chain.read_views(0, chain.readable_len):
                    self.output.emit(bytes(view))
                queue.push(chain.head, 0)
        elif index == RECEIVEQ:
            self._deliver()

    def wake_fds(self) -> list[int]:
        return [self._wake_fd]

    def wake(self, fd: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._deliver()

    # ---- snapshots ------------------------------------------------------------------------------
    def recipe(self) -> dict | None:
        """A console without host input; its output goes where the restorer says (or nowhere).
        One reading a host stream or file descriptor is not data: None."""
        return {"type": "console", "limit": self.output.capture.limit} if self.input is None else None

    def save(self) -> dict:
        # Where the output is, not what it showed (it reached the stream already); input the
        # guest has not taken yet.
        with self._input_lock:
            pending = bytes(self._pending)
        return {"written": self.output.capture.total, "pending": pending.hex(), "input_bytes": self.input_bytes}

    def restore(self, state: dict) -> None:
        from ..devices.base import field, hex_field

        written = field(state, "written", int, limit=1 << 63)
        pending = hex_field(state, "pending")
        self.input_bytes = field(state, "input_bytes", int)
        self.output.capture.clear()
        self.output.capture.total = written  # the saved bytes count as dropped
        with self._input_lock:
            self._pending[:] = pending
            if len(self._pending) >= INPUT_LIMIT:
                self._room.clear()
        if pending:
            os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._stop_fd, 1)
        self._room.set()
        if self._feeder is not None and self._feeder is not threading.current_thread():
            self._feeder.join(timeout=1)
        if self._feeder is None or not self._feeder.is_alive():
            os.close(self._wake_fd)
            os.close(self._stop_fd)
        stream = self.output.stream
        if stream is not None:
            stream.flush()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
