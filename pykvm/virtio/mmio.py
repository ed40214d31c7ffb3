"""The virtio-mmio transport, register layout version 2 (virtio-v1.2 §4.2.2), as a pykvm bus device.

:class:`VirtioMmio` puts one :class:`~pykvm.virtio.VirtioDevice` at ``gpa`` (a 4 KiB window:
registers below 0x100, the device's configuration space from 0x100). The hot paths stay out of the
vCPU's exit loop:

- each queue's notification is a KVM ioeventfd on QueueNotify (datamatch = the queue index,
  4 bytes), so a guest's notify wakes the device's worker thread without a KVM_RUN exit;
- interrupts leave through an irqfd on the device's GSI (edge: one eventfd write per interrupt),
  after the worker has set InterruptStatus.

The worker thread (one per device) polls the queue eventfds, the device's own fds (console
input...) and a stop eventfd; it runs from DRIVER_OK until a reset or :meth:`VirtioMmio.close`.
A reset (Status = 0) first stops the queues handing out chains, lets the worker finish the request
in hand, joins it, then resets: the guest's Status write returns only when no request is in
flight. A plain (trapped) write to QueueNotify works too, for drivers whose write the ioeventfd
does not match or a transport without a VM; it is counted apart (:attr:`VirtioMmio.stats`).

Snapshots, restore and migration (:mod:`pykvm.snapshot`): :meth:`VirtioMmio.quiesce` (called with
every vCPU stopped, before any state is read) lets the worker finish the request in hand and stop,
serves the notifies that came before the stop in the caller's thread, and flushes the irqfd (KVM
injects an irqfd's interrupt from a work item: deassigning the irqfd waits for it), so that the
rings in guest memory, the transport's state and the interrupt controllers agree. The worker then
stays *parked*: it watches only what a running guest does (its notifies, a trapped QueueNotify)
and :attr:`VirtioMmio.resume_when` (the machine's "the vCPUs run again"), not host input, so that
nothing reaches guest memory between the state and the last pages a migration sends. A parked
worker that wakes serves every queue once and goes on as before. :meth:`VirtioMmio.save` gives the
registers, each queue's configuration and ring position and the backend's own state;
:meth:`VirtioMmio.restore` puts them back (the ioeventfds and the irqfd are wired at creation) and
parks the worker, which serves what is pending once the restored machine runs.

Without ``vm`` the transport serves a bare :class:`~pykvm.memory.GuestMemory` (unit tests): the
queue eventfds and the interrupt eventfd (:attr:`VirtioMmio.irq_fd`) are the same, nobody but the
test reads or writes them. With ``threaded=False`` there is no worker: a trapped notify is served
at once in the caller's thread and :meth:`VirtioMmio.process_pending` serves the eventfds.
"""

from __future__ import annotations

import os
import select
import threading
from collections import Counter

from .. import exits
from ..devices.base import Device, field
from . import (
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    TRANSPORT_FEATURES,
    F_VERSION_1,
    VirtioDevice,
)
from .queue import Virtqueue, VirtqueueError

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D564B50  # "PKVM"
WINDOW = 0x1000  # bytes of guest-physical space per transport
CONFIG = 0x100  # where the device configuration space starts

# register offsets (§4.2.2)
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC

_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0), QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0), QUEUE_DEVICE_HIGH: ("device_addr", 32),
}

# statistics keys
NOTIFY_IOEVENTFD = "notifies (ioeventfd)"
NOTIFY_TRAPPED = "notifies (trapped)"
INTERRUPTS = "interrupts (irqfd)"
SUPPRESSED = "interrupts suppressed"
REGISTER_EXITS = "register exits"
CONFIG_INTERRUPTS = "config interrupts"
RESETS = "resets"
ERRORS = "device errors"  # times the device went to DEVICE_NEEDS_RESET
HOST_ERRORS = "host errors"  # of those, failures on the host side (a backend raised something else than VirtqueueError)

PARK_POLL = 0.02  # seconds between a parked worker's looks at resume_when


class VirtioMmio(Device):
    """One virtio device behind a virtio-mmio register window at ``gpa``, interrupting on GSI ``irq``.

    ``vm`` (a :class:`~pykvm.vm.Vm`) wires the queue notifications to KVM ioeventfds and the
    interrupt to an irqfd on ``irq``. Attributes: :attr:`device`, :attr:`queues`,
    :attr:`status`, :attr:`stats`, :attr:`error` (the last reason for DEVICE_NEEDS_RESET),
    :attr:`ioeventfd` (whether the notifications bypass the exit loop).
    """

    byte_registers = False

    def __init__(self, device: VirtioDevice, memory, gpa: int, irq: int | None = None, *, vm=None,
                 threaded: bool = True, size: int = WINDOW) -> None:
        super().__init__()
        self._lock = threading.RLock()  # register state; re-entered when an error in a register write interrupts
        if not isinstance(device, VirtioDevice):
            raise TypeError(f"a virtio transport needs a VirtioDevice, not {type(device).__name__}")
        if gpa % WINDOW or size < WINDOW:
            raise ValueError(f"a virtio-mmio window must be 4 KiB aligned and at least 4 KiB (gpa={gpa:#x}, size={size:#x})")
        if vm is not None and irq is None:
            raise ValueError("a virtio-mmio transport on a VM needs the GSI of its interrupt (irq=)")
        self.device = device
        self.memory = memory
        self.gpa, self.size, self.irq = gpa, size, irq
        self.mmio_ranges = ((gpa, size),)
        self.vm = vm
        self.threaded = threaded
        self.stats: Counter[str] = Counter()
        self.error: str | None = None
        self.queues = [Virtqueue(memory, i, n) for i, n in enumerate(device.queue_sizes)]
        self.offered = device.device_features() | TRANSPORT_FEATURES
        self.config_generation = 0
        self._reset_registers()
        self._life = threading.Lock()  # serializes starting / stopping the worker
        self._worker: threading.Thread | None = None
        self._trapped: set[int] = set()
        self._closed = False
        self._fds: list[int] = []
        self.queue_fds = [self._eventfd() for _ in self.queues]
        self.irq_fd = self._eventfd()
        self._stop_fd = self._eventfd()
        self._kick_fd = self._eventfd()  # trapped notifies, for the worker
        self._resume_fd = self._eventfd()  # wakes a parked worker (resume)
        #: Called by a parked worker (see quiesce) every PARK_POLL seconds: True when it may go on
        #: (Machine.add_virtio sets it to "the vCPUs run"); None: only the guest's notifies wake it.
        self.resume_when = None
        self._quiet = False  # quiesced: nothing served since (save needs it)
        self._assigned: list[tuple[int, int]] = []  # (fd, queue index) given to KVM_IOEVENTFD
        self.ioeventfd = False
        self._irqfd = False
        try:
            if vm is not None:
                self._wire(vm)
        except BaseException:
            self.close()
            raise
        device.transport = self

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _wire(self, vm) -> None:
        from ..ioctl import KvmError

        vm.irqfd(self.irq_fd, self.irq)
        self._irqfd = True
        try:
            for i, fd in enumerate(self.queue_fds):
                vm.ioeventfd(fd, self.gpa + QUEUE_NOTIFY, 4, datamatch=i)
                self._assigned.append((fd, i))
            self.ioeventfd = True
        except KvmError as e:  # notifies then trap: slower, still correct
            self.error = f"no ioeventfd for QueueNotify ({e}); notifies exit to Python"
            self._unwire_ioeventfds()

    def _unwire_ioeventfds(self) -> None:
        from ..ioctl import KvmError

        for fd, i in self._assigned:
            try:
                self.vm.ioeventfd(fd, self.gpa + QUEUE_NOTIFY, 4, datamatch=i, deassign=True)
            except (KvmError, OSError):
                pass  # the VM is gone already: so are its ioeventfds
        self._assigned.clear()
        self.ioeventfd = False

    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0

    @property
    def cmdline_arg(self) -> str:
        """How Linux (and pykvm's virtio test kernel) is told where this device is."""
        return f"virtio_mmio.device={self.size // 1024}K@{self.gpa:#x}:{self.irq}"

    @property
    def features(self) -> int:
        """The negotiated features (valid once FEATURES_OK is accepted)."""
        return self.driver_features if self.status & STATUS_FEATURES_OK else 0

    def __repr__(self) -> str:
        return (f"<VirtioMmio {self.device.name} gpa={self.gpa:#x} irq={self.irq} status={self.status:#x} "
                f"ioeventfd={self.ioeventfd}>")

    def attach(self, bus) -> None:
        """Register the register window on ``bus`` under the device's name."""
        bus.add_mmio(self.gpa, self.size, self.mmio, f"virtio-{self.device.name}")

    # ---- the bus side -------------------------------------------------------------------------
    def mmio(self, exit, vcpu=None) -> None:
        """Answer an MMIO exit in the register window (a bus handler)."""
        offset = exit.gpa - self.gpa
        if isinstance(exit, exits.MmioWrite):
            self.write(offset, len(exit.data), int.from_bytes(exit.data, "little"))
        else:
            exit.reply(self.read(offset, exit.size))
        return None

    def read(self, offset: int, size: int) -> int:
        """The value a driver's read of ``size`` bytes at ``offset`` returns."""
        with self._lock:
            self.stats[REGISTER_EXITS] += 1
            if offset >= CONFIG:
                data = self.device.config()[offset - CONFIG : offset - CONFIG + size]
                return int.from_bytes(data.ljust(size, b"\0"), "little")
            if size != 4 or offset % 4:
                return 0  # registers are 32-bit wide and aligned (§4.2.2.2)
            return self._read_register(offset) & 0xFFFFFFFF

    def _read_register(self, offset: int) -> int:
        queue = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.offered >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(bool(queue and queue.ready))
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length -1
        if offset in (SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF
        return 0  # write-only or reserved

    def write(self, offset: int, size: int, value: int) -> None:
        """Take a driver's write of ``value`` (``size`` bytes) at ``offset``."""
        if offset == STATUS and size == 4 and value == 0:
            with self._lock:
                self.stats[REGISTER_EXITS] += 1
            self.reset()
            return
        start = serve = False
        with self._lock:
            self.stats[REGISTER_EXITS] += 1
            if offset >= CONFIG:
                self.device.config_write(offset - CONFIG, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                return
            if offset == QUEUE_NOTIFY:
                self.stats[NOTIFY_TRAPPED] += 1
                if value < len(self.queues):
                    self._trapped.add(value)
                    if self.threaded:
                        os.eventfd_write(self._kick_fd, 1)
                    else:
                        serve = bool(self.status & STATUS_DRIVER_OK)
            else:
                start = self._write_register(offset, value)
        if serve:
            self._service_trapped()
        if start:
            self._start_worker()

    def _write_register(self, offset: int, value: int) -> bool:
        """A register write (lock held); True when the worker should start (DRIVER_OK)."""
        queue = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if not self.status & STATUS_FEATURES_OK and self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            if queue and not queue.ready:
                queue.size = value
        elif offset in _QUEUE_ADDRESS:
            if queue and not queue.ready:
                name, shift = _QUEUE_ADDRESS[offset]
                setattr(queue, name, (getattr(queue, name) & ~(0xFFFFFFFF << shift)) | (value << shift))
        elif offset == QUEUE_READY:
            if queue and value & 1 and not queue.ready:
                try:
                    queue.enable(self.features)
                except VirtqueueError as e:
                    self._needs_reset(str(e))
            elif queue and not value & 1 and queue.ready:
                queue.ready = False  # the driver takes the queue back (virtio 1.x allows it before DRIVER_OK)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            return self._write_status(value)
        return False

    def _write_status(self, value: int) -> bool:
        """A non-zero Status write (lock held): FEATURES_OK checked, DRIVER_OK activates the device."""
        value &= ~STATUS_DEVICE_NEEDS_RESET  # the device's bit: the driver cannot set or clear it
        old = self.status
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            unknown = self.driver_features & ~self.offered
            if unknown or not self.driver_features & F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # refused: the driver reads Status back and sees it clear
        if value & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            value &= ~STATUS_DRIVER_OK  # no activation without accepted features
        self.status = value | (old & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            for queue in self.queues:
                queue.set_features(self.driver_features)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            try:
                self.device.activate(self.driver_features, self.queues)
            except Exception as e:  # a host-side failure while activating: the guest sees a broken device
                self.stats[HOST_ERRORS] += 1
                self._needs_reset(f"activating the device failed: {type(e).__name__}: {e}")
                return False
            return self.threaded
        return False

    # ---- reset and life cycle -----------------------------------------------------------------
    def reset(self) -> None:
        """Reset the device (Status = 0): stop handing out chains, let the worker finish the
        request in hand and stop, then forget the driver's features, queues and status."""
        for queue in self.queues:
            queue.halted = True
        self._stop_worker()
        with self._lock:
            self.stats[RESETS] += 1
            try:
                self.device.reset()
            except Exception as e:  # host-side trouble: recorded, the reset still happens
                self.error = f"resetting the device failed: {type(e).__name__}: {e}"
                self.stats[ERRORS] += 1
            for queue in self.queues:
                queue.reset()
            self._trapped.clear()
            self._reset_registers()

    def _start_worker(self, parked: bool = False) -> None:
        with self._life:
            if self._worker is not None or self._closed:
                return
            self._drain(self._stop_fd)
            self._drain(self._resume_fd)
            if not parked:
                self._quiet = False
            self._worker = threading.Thread(target=self._run_worker, args=(parked,),
                                            name=f"virtio-{self.device.name}@{self.gpa:#x}", daemon=True)
            self._worker.start()

    def _stop_worker(self) -> None:
        with self._life:
            worker, self._worker = self._worker, None
            if worker is None:
                return
            os.eventfd_write(self._stop_fd, 1)
            if worker is not threading.current_thread():
                worker.join()

    # ---- snapshots, restore, migration --------------------------------------------------------
    def quiesce(self) -> None:
        """With every vCPU stopped: no request in flight, and nothing pending left unserved. The
        worker finishes the request in hand and stops; the notifies that came before are served
        here; the irqfd is flushed (its interrupts are in the irqchip when this returns); the worker
        is parked (see the module text) until the guest runs again."""
        self._stop_worker()
        if self._closed:
            return
        if self.status & STATUS_DRIVER_OK:
            for index, fd in enumerate(self.queue_fds):
                n = self._drain(fd)
                if n:
                    with self._lock:
                        self.stats[NOTIFY_IOEVENTFD] += n
                    self._service(index)
            self._drain(self._kick_fd)
            self._service_trapped()
        self._flush_irqfd()
        self._quiet = True
        if self.threaded and self.status & STATUS_DRIVER_OK:
            self._start_worker(parked=True)

    def resume(self) -> None:
        """Let a parked worker go on now (it serves every queue once), without waiting for the
        guest or :attr:`resume_when`."""
        if self._worker is not None:
            os.eventfd_write(self._resume_fd, 1)
        elif self.threaded and self.status & STATUS_DRIVER_OK and not self._closed:
            self._start_worker()
            os.eventfd_write(self._resume_fd, 1)

    def _flush_irqfd(self) -> None:
        """KVM injects an irqfd's interrupt (to the IOAPIC) from a work item; deassigning the irqfd
        waits for those in flight. Assigned again at once."""
        if self.vm is None or not self._irqfd:
            return
        self.vm.irqfd(self.irq_fd, self.irq, deassign=True)
        self._irqfd = False
        self.vm.irqfd(self.irq_fd, self.irq)
        self._irqfd = True

    def save(self) -> dict:
        """The transport's registers, each queue's configuration and position in its rings, and
        the backend's own state (VirtioDevice.save). Quiesces first if that was not done."""
        if not self._quiet:
            self.quiesce()
        with self._lock:
            return {"device_id": self.device.device_id, "offered": self.offered, "status": self.status,
                    "driver_features": self.driver_features, "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel, "queue_sel": self.queue_sel,
                    "interrupt_status": self.interrupt_status, "config_generation": self.config_generation,
                    "error": self.error, "queues": [q.save() for q in self.queues], "device": self.device.save()}

    def restore(self, state: dict) -> None:
        """Put back what :meth:`save` gave, on a transport built with the same backend (the
        rings are in the restored guest memory). The worker is parked: it serves what is pending
        when the guest runs (see the module text). Raises ValueError naming what does not fit."""
        device_id = field(state, "device_id", int)
        if device_id != self.device.device_id:
            raise ValueError(f"saved for virtio device {device_id}, this transport has {self.device.name} "
                             f"({self.device.device_id})")
        regs = {name: field(state, name, int, limit=1 << 64) for name in (
            "offered", "status", "driver_features", "device_features_sel", "driver_features_sel", "queue_sel",
            "interrupt_status", "config_generation")}
        error = field(state, "error", (str, type(None)))
        queues = field(state, "queues", list)
        device_state = field(state, "device", dict)
        if len(queues) != len(self.queues):
            raise ValueError(f"saved {len(queues)} queues, {self.device.name} has {len(self.queues)}")
        if regs["status"] & STATUS_FEATURES_OK and regs["driver_features"] & ~self.offered:
            raise ValueError(f"the guest negotiated features {regs['driver_features'] & ~self.offered:#x} that "
                             f"{self.device.name} does not offer here (offered {self.offered:#x}, "
                             f"saved {regs['offered']:#x})")
        for queue in self.queues:
            queue.halted = True
        self._stop_worker()
        with self._lock:
            for queue, saved in zip(self.queues, queues):
                queue.restore(saved)
            self.status, self.driver_features = regs["status"], regs["driver_features"]
            self.device_features_sel, self.driver_features_sel = regs["device_features_sel"], regs["driver_features_sel"]
            self.queue_sel, self.interrupt_status = regs["queue_sel"], regs["interrupt_status"]
            self.config_generation, self.error = regs["config_generation"] & 0xFFFFFFFF, error
            self._trapped.clear()
            for fd in (*self.queue_fds, self._kick_fd):
                self._drain(fd)  # notifies of a history the state replaces (a fast reset)
            self.device.reset()
            if self.status & STATUS_DRIVER_OK:
                self.device.activate(self.driver_features, self.queues)
            self.device.restore(device_state)
        self._quiet = True
        if self.threaded and self.status & STATUS_DRIVER_OK:
            self._start_worker(parked=True)

    def close(self) -> None:
        """Stop the worker, take the eventfds back from KVM, close the backend. Idempotent."""
        if self._closed:
            return
        for queue in self.queues:
            queue.halted = True
        self._stop_worker()
        self._closed = True
        if self.vm is not None:
            from ..ioctl import KvmError

            self._unwire_ioeventfds()
            if self._irqfd:
                try:
                    self.vm.irqfd(self.irq_fd, self.irq, deassign=True)
                except (KvmError, OSError):
                    pass
                self._irqfd = False
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.device.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the device side ----------------------------------------------------------------------
    @staticmethod
    def _drain(fd: int) -> int:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def _needs_reset(self, reason: str) -> None:
        """The device cannot go on: DEVICE_NEEDS_RESET and a configuration-change interrupt."""
        with self._lock:
            self.error = reason
            self.stats[ERRORS] += 1
            first = not self.status & STATUS_DEVICE_NEEDS_RESET
            self.status |= STATUS_DEVICE_NEEDS_RESET
            active = self.status & STATUS_DRIVER_OK
        if first and active:
            self._interrupt(INT_CONFIG_CHANGE)

    def config_changed(self) -> None:
        """The device's configuration space changed: a new ConfigGeneration and an interrupt."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            active = self.status & STATUS_DRIVER_OK
        if active:
            self._interrupt(INT_CONFIG_CHANGE)

    def _interrupt(self, cause: int) -> None:
        with self._lock:
            self.interrupt_status |= cause
            self.stats[INTERRUPTS] += 1
            if cause & INT_CONFIG_CHANGE:
                self.stats[CONFIG_INTERRUPTS] += 1
            if not self._closed:
                os.eventfd_write(self.irq_fd, 1)  # the irqfd: one edge on the device's GSI

    def _service(self, index: int) -> None:
        """Serve queue ``index``: the device takes its chains, then the interrupt if one is due."""
        queue = self.queues[index]
        if not queue.ready or queue.broken or queue.halted:
            return
        self._guarded(lambda: self.device.process(index, queue), queue)
        self._signal_used()

    def _guarded(self, work, queue=None) -> None:
        """Run device work; a guest's ring error or a host-side failure becomes DEVICE_NEEDS_RESET."""
        try:
            work()
        except VirtqueueError as e:
            if queue is not None:
                queue.broken = str(e)
            self._needs_reset(str(e))
        except Exception as e:  # a bug or a host failure in the backend: the guest sees a broken device
            with self._lock:
                self.stats[HOST_ERRORS] += 1
            self._needs_reset(f"{self.device.name}: {type(e).__name__}: {e}")

    def _signal_used(self) -> None:
        """One used-buffer interrupt if any queue's driver wants one for what the device returned."""
        due = False
        for queue in self.queues:
            try:
                want = queue.needs_interrupt()
            except Exception:  # the rings went away under the device
                want = False
            due = due or want
        if due:
            self._interrupt(INT_USED_BUFFER)

    def _service_trapped(self) -> None:
        with self._lock:
            pending, self._trapped = self._trapped, set()
        for index in sorted(pending):
            self._service(index)

    def process_pending(self) -> None:
        """Serve whatever is signalled now, in the caller's thread (``threaded=False``; tests)."""
        if not self.status & STATUS_DRIVER_OK:
            return
        for index, fd in enumerate(self.queue_fds):
            n = self._drain(fd)
            if n:
                self.stats[NOTIFY_IOEVENTFD] += n
                self._service(index)
        self._service_trapped()
        for fd in self.device.wake_fds():
            if select.select([fd], [], [], 0)[0]:
                self._guarded(lambda: self.device.wake(fd))
                self._signal_used()

    def _wait_parked(self) -> bool:
        """A parked worker's wait: True when the guest notified (or a trapped notify, resume(), or
        resume_when says the vCPUs run), False when the worker is to stop."""
        poller = select.poll()
        for fd in (self._stop_fd, self._kick_fd, self._resume_fd, *self.queue_fds):
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll(int(PARK_POLL * 1000))
            if any(fd == self._stop_fd for fd, _ in events):
                return False
            check = self.resume_when
            if events or (check is not None and check()):
                return True

    def _serve_all(self) -> None:
        """Every queue once and the device's host input: work that may be pending after a restore."""
        for index in range(len(self.queues)):
            self._service(index)
        for fd in self.device.wake_fds():
            if select.select([fd], [], [], 0)[0]:
                self._guarded(lambda: self.device.wake(fd))
                self._signal_used()

    def _run_worker(self, parked: bool = False) -> None:
        if parked:
            if not self._wait_parked():
                return
            self._quiet = False
            self._drain(self._resume_fd)
            self._serve_all()
        poller = select.poll()
        roles: dict[int, tuple[str, int]] = {self._stop_fd: ("stop", 0), self._kick_fd: ("kick", 0),
                                             self._resume_fd: ("resume", 0)}
        for index, fd in enumerate(self.queue_fds):
            roles[fd] = ("queue", index)
        for fd in self.device.wake_fds():
            roles[fd] = ("wake", 0)
        for fd in roles:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                role, index = roles[fd]
                if role == "stop":
                    return
                if role == "queue":
                    n = self._drain(fd)
                    with self._lock:
                        self.stats[NOTIFY_IOEVENTFD] += n
                    self._service(index)
                elif role == "kick":
                    self._drain(fd)
                    self._service_trapped()
                elif role == "resume":
                    self._drain(fd)
                else:
                    self._guarded(lambda: self.device.wake(fd))
                    self._signal_used()
