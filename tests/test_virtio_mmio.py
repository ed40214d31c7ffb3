"""The virtio-mmio transport (pykvm/virtio/mmio.py): registers, feature negotiation, status, reset,
notifies through the ioeventfd and trapped, interrupts, the worker thread; Machine.add_virtio.

Most tests drive a transport on a bare GuestMemory through its MMIO handler; the `kvm` ones put
it on a Machine and let a guest notify it through KVM's ioeventfd and take its irqfd interrupt.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pykvm import exits
from pykvm.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
    VirtioMmio,
    VirtioRng,
)
from pykvm.virtio import mmio as regs
from pykvm.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from pykvm.x86 import layout
from virtio_driver import (
    GPA, RAM, Ring, bare_memory, close_memory, interrupts, kick, negotiate, notify, reg_read, reg_write, start,
    wait_interrupt,
)

BUF = 0x40000
OK_STATUS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


class Queues3(VirtioDevice):
    """A device with three queues of different sizes and a 6-byte config space; it records what it was asked."""

    device_id = 42
    name = "test"
    queue_sizes = (4, 16, 256)

    def __init__(self):
        super().__init__()
        self.cfg = bytearray(b"\x01\x02\x03\x04\x05\x06")
        self.calls = []

    def device_features(self):
        return 1 << 3

    def config(self):
        return bytes(self.cfg)

    def config_write(self, offset, data):
        self.cfg[offset : offset + len(data)] = data

    def process(self, index, queue):
        self.calls.append(index)
        for chain in queue:
            queue.push(chain.head, 0)


@pytest.fixture
def memory():
    m = bare_memory()
    yield m
    close_memory(m)


@pytest.fixture
def transport(memory):
    t = VirtioMmio(Queues3(), memory, GPA, threaded=False)
    yield t
    t.close()


# ---- registers ------------------------------------------------------------------------------------
def test_identity_registers(transport):
    assert reg_read(transport, regs.MAGIC_VALUE) == 0x74726976
    assert reg_read(transport, regs.VERSION_REG) == 2
    assert reg_read(transport, regs.DEVICE_ID) == 42
    assert reg_read(transport, regs.VENDOR_ID_REG) == regs.VENDOR_ID


def test_device_features_by_selector(transport):
    reg_write(transport, regs.DEVICE_FEATURES_SEL, 0)
    low = reg_read(transport, regs.DEVICE_FEATURES)
    reg_write(transport, regs.DEVICE_FEATURES_SEL, 1)
    high = reg_read(transport, regs.DEVICE_FEATURES)
    reg_write(transport, regs.DEVICE_FEATURES_SEL, 7)
    assert low == (1 << 3) | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX and high == F_VERSION_1 >> 32
    assert reg_read(transport, regs.DEVICE_FEATURES) == 0


def test_queue_num_max_per_queue_and_zero_past_the_last(transport):
    sizes = []
    for sel in range(4):
        reg_write(transport, regs.QUEUE_SEL, sel)
        sizes.append(reg_read(transport, regs.QUEUE_NUM_MAX))
    assert sizes == [4, 16, 256, 0]


def test_config_space_at_0x100_in_any_width(transport):
    assert reg_read(transport, 0x100, 1) == 1
    assert reg_read(transport, 0x102, 2) == 0x0403
    assert reg_read(transport, 0x100, 4) == 0x04030201
    assert reg_read(transport, 0x104, 4) == 0x0605  # past the end reads 0
    reg_write(transport, 0x101, 0xAA, 1)
    assert transport.device.cfg[1] == 0xAA


def test_registers_take_only_aligned_32_bit_accesses(transport):
    assert reg_read(transport, regs.MAGIC_VALUE, 2) == 0 and reg_read(transport, regs.MAGIC_VALUE + 1, 4) == 0
    reg_write(transport, regs.QUEUE_SEL, 2, size=2)
    assert transport.queue_sel == 0
    assert transport.stats[regs.REGISTER_EXITS] == 3


def test_the_handler_answers_mmio_exits(transport):
    buf = bytearray(4)
    transport.mmio(exits.MmioRead(GPA + regs.MAGIC_VALUE, memoryview(buf)))
    assert buf == b"virt"


def test_shared_memory_regions_absent(transport):
    assert reg_read(transport, regs.SHM_LEN_LOW) == reg_read(transport, regs.SHM_LEN_HIGH) == 0xFFFFFFFF


def test_cmdline_arg_names_size_address_and_irq(memory):
    with VirtioMmio(VirtioRng(), memory, 0xD0001000, 6, threaded=False) as t:
        assert t.cmdline_arg == "virtio_mmio.device=4K@0xd0001000:6"


def test_a_misaligned_window_is_refused(memory):
    with pytest.raises(ValueError, match="4 KiB aligned"):
        VirtioMmio(VirtioRng(), memory, GPA + 0x100)


# ---- feature negotiation and status ---------------------------------------------------------------
def test_features_ok_accepted_for_offered_features(transport):
    assert negotiate(transport, F_VERSION_1 | F_RING_EVENT_IDX) == OK_STATUS
    assert transport.features == F_VERSION_1 | F_RING_EVENT_IDX


def test_features_ok_refused_without_version_1(transport):
    assert negotiate(transport, F_RING_EVENT_IDX) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert transport.features == 0


def test_features_ok_refused_for_features_not_offered(transport):
    assert negotiate(transport, F_VERSION_1 | (1 << 4)) == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_driver_features_are_frozen_after_features_ok(transport):
    negotiate(transport, F_VERSION_1)
    reg_write(transport, regs.DRIVER_FEATURES_SEL, 0)
    reg_write(transport, regs.DRIVER_FEATURES, F_RING_EVENT_IDX)
    assert transport.features == F_VERSION_1


def test_driver_ok_needs_features_ok(transport):
    reg_write(transport, regs.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert reg_read(transport, regs.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert transport.device.queues == []  # not activated


def test_queue_registers_are_ignored_while_the_queue_is_ready(transport, memory):
    negotiate(transport)
    ring = Ring(memory, 1, 16, 0x1000)
    ring.program(transport)
    reg_write(transport, regs.QUEUE_NUM, 4)
    reg_write(transport, regs.QUEUE_DESC_LOW, 0x5000)
    q = transport.queues[1]
    assert q.ready and q.size == 16 and q.desc_addr == ring.desc
    assert reg_read(transport, regs.QUEUE_READY) == 1


def test_a_queue_whose_rings_lie_outside_ram_needs_reset(transport, memory):
    negotiate(transport)
    ring = Ring(memory, 0, 4, 0x1000)
    ring.used = RAM - 16  # the used ring would cross the end of RAM
    ring.program(transport)
    assert reg_read(transport, regs.QUEUE_READY) == 0
    assert reg_read(transport, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert "used ring" in transport.error
    reg_write(transport, regs.STATUS, OK_STATUS)  # the driver cannot clear the device's bit
    assert reg_read(transport, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET
    reg_write(transport, regs.STATUS, 0)
    assert reg_read(transport, regs.STATUS) == 0


def test_reset_forgets_features_queues_and_interrupts(transport, memory):
    rings = start(transport, memory)
    transport.interrupt_status = INT_USED_BUFFER
    rings[0].offer(rings[0].chain([(BUF, 4, True)]))
    reg_write(transport, regs.STATUS, 0)
    assert reg_read(transport, regs.STATUS) == 0 and transport.features == 0
    assert reg_read(transport, regs.INTERRUPT_STATUS) == 0
    assert all(not q.ready and q.last_avail == 0 and q.size == q.max_size for q in transport.queues)
    assert transport.stats[regs.RESETS] == 1 and transport.device.queues == []
    notify(transport, 0)
    assert transport.device.calls == []  # a reset device serves nothing


def test_interrupt_status_and_ack(transport, memory):
    rings = start(transport, memory)
    rings[1].offer(rings[1].chain([(BUF, 4, True)]))
    notify(transport, 1)
    assert interrupts(transport) == 1
    assert reg_read(transport, regs.INTERRUPT_STATUS) == INT_USED_BUFFER
    reg_write(transport, regs.INTERRUPT_ACK, INT_USED_BUFFER)
    assert reg_read(transport, regs.INTERRUPT_STATUS) == 0


def test_config_change_bumps_the_generation_and_interrupts(transport, memory):
    start(transport, memory)
    before = reg_read(transport, regs.CONFIG_GENERATION)
    transport.config_changed()
    assert reg_read(transport, regs.CONFIG_GENERATION) == before + 1
    assert reg_read(transport, regs.INTERRUPT_STATUS) == INT_CONFIG_CHANGE and interrupts(transport) == 1


# ---- notifies ---------------------------------------------------------------------------------------
def test_trapped_and_ioeventfd_notifies_are_counted_apart(transport, memory):
    rings = start(transport, memory)
    for _ in range(3):
        rings[0].offer(rings[0].chain([(BUF, 4, True)]))
        notify(transport, 0)
    rings[2].offer(rings[2].chain([(BUF, 4, True)]))
    kick(transport, 2)
    kick(transport, 2)
    transport.process_pending()
    notify(transport, 9)  # no such queue: counted, nothing served
    assert transport.stats[regs.NOTIFY_TRAPPED] == 4 and transport.stats[regs.NOTIFY_IOEVENTFD] == 2
    assert transport.device.calls == [0, 0, 0, 2]
    assert rings[0].take_used() == [(0, 0)] * 3 and rings[2].take_used() == [(0, 0)]


def test_no_interrupt_when_the_driver_suppresses_it(transport, memory):
    rings = start(transport, memory)
    rings[0].set_used_event(5)  # event index negotiated: interrupt only past entry 5
    rings[0].offer(rings[0].chain([(BUF, 4, True)]))
    notify(transport, 0)
    assert interrupts(transport) == 0 and rings[0].used_idx == 1


# ---- the worker thread --------------------------------------------------------------------------------
def _rng_transport(memory, source=os.urandom):
    return VirtioMmio(VirtioRng(source), memory, GPA, threaded=True)


def test_the_worker_starts_at_driver_ok_and_stops_at_reset_and_close(memory):
    t = _rng_transport(memory)
    try:
        negotiate(t)
        assert t._worker is None
        rings = start(t, memory)
        worker = t._worker
        assert worker is not None and worker.is_alive()
        rings[0].offer(rings[0].chain([(BUF, 32, True)]))
        kick(t, 0)
        assert wait_interrupt(t) == 1 and rings[0].take_used() == [(0, 32)]
        reg_write(t, regs.STATUS, 0)
        assert t._worker is None and not worker.is_alive()
        rings = start(t, memory)
        worker = t._worker
        rings[0].offer(rings[0].chain([(BUF, 8, True)]))
        notify(t, 0)  # trapped: reaches the worker through its kick eventfd
        assert wait_interrupt(t) == 1 and rings[0].take_used() == [(0, 8)]
    finally:
        t.close()
    assert not worker.is_alive()
    t.close()  # idempotent


def test_reset_mid_request_finishes_the_request_in_hand_and_drops_the_rest(memory):
    entered, release = threading.Event(), threading.Event()

    def slow_source(n):
        entered.set()
        release.wait(5)
        return b"\xAA" * n

    t = _rng_transport(memory, slow_source)
    try:
        rings = start(t, memory)
        ring = rings[0]
        for i in range(3):
            ring.set_desc(i, BUF + 0x100 * i, 16, DESC_F_WRITE)
            ring.offer(i)
        kick(t, 0)
        assert entered.wait(5)
        resetter = threading.Thread(target=reg_write, args=(t, regs.STATUS, 0))
        resetter.start()
        time.sleep(0.05)
        assert resetter.is_alive()  # the guest's Status write waits for the request in hand
        release.set()
        resetter.join(5)
        assert not resetter.is_alive() and reg_read(t, regs.STATUS) == 0
        snapshot = memory.read(0, RAM)
        time.sleep(0.05)
        assert memory.read(0, RAM) == snapshot  # nothing touches guest memory after the reset
        assert ring.used_idx == 1 and ring.used_elem(0) == (0, 16)  # the first finished, two dropped
        assert memory.read(BUF, 16) == b"\xAA" * 16 and memory.read(BUF + 0x100, 16) == bytes(16)
    finally:
        release.set()
        t.close()


def test_a_failing_backend_sets_needs_reset_instead_of_killing_the_worker(memory):
    def broken(n):
        raise OSError(5, "entropy source on fire")

    t = _rng_transport(memory, broken)
    try:
        rings = start(t, memory)
        rings[0].offer(rings[0].chain([(BUF, 8, True)]))
        kick(t, 0)
        assert wait_interrupt(t) == 1
        assert reg_read(t, regs.STATUS) & STATUS_DEVICE_NEEDS_RESET
        assert reg_read(t, regs.INTERRUPT_STATUS) == INT_CONFIG_CHANGE
        assert "entropy source on fire" in t.error and t._worker.is_alive()
    finally:
        t.close()


def test_a_malformed_ring_needs_reset_with_a_config_interrupt(memory):
    t = _rng_transport(memory)
    try:
        rings = start(t, memory)
        rings[0].set_desc(0, BUF, 8, DESC_F_WRITE | DESC_F_NEXT, 0)  # a loop
        rings[0].offer(0)
        kick(t, 0)
        assert wait_interrupt(t) == 1
        assert reg_read(t, regs.STATUS) == OK_STATUS | STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET
        assert reg_read(t, regs.INTERRUPT_STATUS) == INT_CONFIG_CHANGE and "loops" in t.error
        assert t.queues[0].broken and rings[0].used_idx == 0
        reg_write(t, regs.STATUS, 0)  # the driver's way out: reset and start again
        rings = start(t, memory)
        rings[0].offer(rings[0].chain([(BUF, 8, True)]))
        kick(t, 0)
        assert wait_interrupt(t) == 1 and rings[0].take_used() == [(0, 8)]
    finally:
        t.close()


# ---- on a machine ---------------------------------------------------------------------------------
@pytest.mark.kvm
def test_add_virtio_places_transports_in_slots():
    from pykvm.machine import Machine

    with Machine(irqchip=True) as m:
        a, b = m.add_virtio(VirtioRng()), m.add_virtio(VirtioRng())
        assert m.virtio == [a, b]
        assert (a.gpa, a.irq, b.gpa, b.irq) == (layout.VIRTIO_MMIO_BASE, layout.VIRTIO_IRQS[0],
                                                layout.VIRTIO_MMIO_BASE + layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQS[1])
        assert a.ioeventfd and b.cmdline_arg == "virtio_mmio.device=4K@0xd0001000:6"
        assert m.bus.mmio_route(b.gpa + 0x70).name == "virtio-rng"
    assert a._closed and b._closed


@pytest.mark.kvm
def test_add_virtio_needs_the_in_kernel_irqchip():
    from pykvm.machine import Machine

    with Machine() as m:
        with pytest.raises(ValueError, match="in-kernel irqchip"):
            m.add_virtio(VirtioRng())


@pytest.mark.kvm
def test_add_virtio_runs_out_of_slots():
    from pykvm.machine import Machine

    with Machine(irqchip=True) as m:
        for _ in layout.VIRTIO_IRQS:
            m.add_virtio(VirtioRng())
        with pytest.raises(ValueError, match="no free virtio-mmio slot"):
            m.add_virtio(VirtioRng())


NOTIFY_AND_WAIT = r"""
#include "apic.h"
	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	SET_GATE 0x35, irq5
	MASK_PICS
	LAPIC_WRITE LAPIC_SVR, $0x1FF
	IOAPIC_ROUTE 5, 0x35
	movabsq	$0xD0000050, %rbx	/* QueueNotify of slot 0: KVM's ioeventfd takes it */
	movl	$0, (%rbx)
	sti
1:	hlt
	cmpl	$0, got(%rip)
	je	1b
	cli
	movabsq	$0xD0000060, %rbx	/* InterruptStatus (an exit), then InterruptACK */
	movl	(%rbx), %eax
	movl	%eax, 4(%rbx)
	movl	%eax, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0
irq5:
	movl	$1, got(%rip)
	pushq	%rdi
	LAPIC_WRITE LAPIC_EOI, $0
	popq	%rdi
	iretq
	.data
got:	.long 0
"""


@pytest.mark.kvm
def test_a_guest_notify_goes_through_the_ioeventfd_and_the_interrupt_through_the_irqfd(guest_asm):
    """The guest's QueueNotify write wakes the worker without an exit; the worker fills the request
    and interrupts the guest through the irqfd on IOAPIC pin 5."""
    from pykvm.machine import Machine

    image = guest_asm(NOTIFY_AND_WAIT)
    with Machine(irqchip=True) as m:
        t = m.add_virtio(VirtioRng(lambda n: b"\x5A" * n))
        rings = start(t, m.memory, base=0x300000)  # the driver's set-up, done from the host
        rings[0].offer(rings[0].chain([(0x310000, 64, True)]))
        m.load_flat(image, image.mode, load=image.load, entry=image.entry)
        outcome = m.run(timeout=20)
        assert outcome.ok and m.syncs == [INT_USED_BUFFER]
        assert rings[0].take_used() == [(0, 64)] and m.memory.read(0x310000, 64) == b"\x5A" * 64
        assert t.stats[regs.NOTIFY_IOEVENTFD] == 1 and t.stats[regs.NOTIFY_TRAPPED] == 0
        assert t.stats[regs.INTERRUPTS] == 1
        virtio_exits = {k: n for k, n in m.stats.count.items() if k.startswith("virtio-rng")}
        assert list(virtio_exits.values()) == [2]  # InterruptStatus and InterruptACK; no exit for the notify
