"""Exits handled in Python and interrupts through KVM's in-kernel irqchip, on real guests."""

from __future__ import annotations

import os
import select
import threading

import pytest

from pykvm import exits
from pykvm.machine import GuestException, GuestTimeout, HandlerError, Machine
from pykvm.x86 import layout
from pykvm.x86.cpuid import X2APIC_ECX_BIT

pytestmark = pytest.mark.kvm


def test_pit_timer_interrupts_through_ioapic_and_lapic(guest):
    with Machine(irqchip=True) as m:
        m.load_flat(guest("timer"), "long")
        assert m.run(timeout=20).ok
    first_vector, ticks = m.syncs
    assert first_vector in (0x30, 0x32)  # KVM's default routing: PIT -> GSI 0 -> IOAPIC pin 0 (0x30)
    assert ticks == 5
    assert m.kvm_stats["irq_injections"] >= 5  # delivered by KVM, not by Python
    assert m.kvm_stats["halt_exits"] >= 1 and "Hlt" not in m.stats.count  # HLT handled in the kernel


def test_ipi_between_two_vcpus(guest):
    with Machine(cpus=2, irqchip=True) as m:
        if not any(e.function == 1 and e.ecx & X2APIC_ECX_BIT for e in m.supported_cpuid):
            pytest.skip("this KVM offers no x2APIC (CPUID.1:ECX[21]), which the smp guest turns on")
        m.load_flat(guest("smp"), "long")
        assert m.run(timeout=20).ok
    assert m.console_output == b"ap: apic 1\nbsp: ipi 0x31 0\n"


def test_msr_read_and_write_emulated_in_python(guest):
    store = {"value": 0xABCD}
    with Machine() as m:
        m.on_msr(layout.TEST_MSR, read=lambda vcpu: store["value"],
                 write=lambda vcpu, value: store.__setitem__("value", value))
        m.on_msr(layout.TEST_MSR + 1, read=lambda vcpu: None)  # refused: the guest takes #GP
        m.load_flat(guest("msr"), "long")
        with pytest.raises(GuestException, match=r"#GP \(vector 13\)"):
            m.run(timeout=10)
    assert m.syncs == [0xABCD, 0x55667788]
    assert store["value"] == 0x1122334455667788
    assert m.stats.count["msr 0x40001000"] == 3 and m.stats.count["msr 0x40001001"] == 1


def test_hypercall_answered_by_python_through_the_hypercall_port(guest):
    seen = []
    with Machine() as m:
        m.on_hypercall(layout.TEST_HYPERCALL, lambda vcpu, args: seen.append(args) or sum(args) * 10)
        m.load_flat(guest("hypercall"), "long")
        assert m.run(timeout=10).ok
    assert seen == [(1, 2, 3, 4)] and m.syncs == [100]


def test_vmcall_exits_to_python(guest, backend):
    if backend == "kvm_pvm":
        pytest.skip("kvm_pvm: VMCALL/VMMCALL at CPL0 never completes (KVM_RUN does not return) and at CPL3 "
                    "KVM answers -KVM_EPERM without an exit; the hypercall port covers hypercalls there")
    seen = []
    with Machine() as m:
        m.on_hypercall(12, lambda vcpu, args: seen.append(args[:3]) or 0)  # KVM_HC_MAP_GPA_RANGE
        m.load_flat(guest("vmcall"), "long")
        assert m.run(timeout=10).ok
    assert seen == [(0x200000, 1, 0)] and m.syncs == [0]


def test_kvm_hypercall_exits_reach_the_handler():
    """The KVM_EXIT_HYPERCALL route, without a guest (this backend cannot produce the exit)."""
    with Machine() as m:
        m.on_hypercall(12, lambda vcpu, args: args[0] + 1)
        handler, key = m._route(exits.Hypercall(12, (41, 0, 0, 0, 0, 0), True))
        handler(exits.Hypercall(12, (41, 0, 0, 0, 0, 0), True), m.vcpu)
        assert key == "hypercall 12" and m.vcpu.kvm_run.hypercall.ret == 42


def test_ioeventfd_and_irqfd_without_python_in_the_path(guest):
    io_fd, irq_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)
    counted = []

    def watcher():  # what a device thread does: wait for the guest's writes, then interrupt it
        total = 0
        while total < 8:
            select.select([io_fd], [], [], 10)
            total += os.eventfd_read(io_fd)
        counted.append(total)
        os.eventfd_write(irq_fd, 1)

    try:
        with Machine(irqchip=True) as m:
            m.vm.ioeventfd(io_fd, layout.EVENTFD_PORT, 1, pio=True)
            m.vm.irqfd(irq_fd, 5)
            threading.Thread(target=watcher, daemon=True).start()
            m.load_flat(guest("eventfd"), "long")
            assert m.run(timeout=20).ok
    finally:
        os.close(io_fd)
        os.close(irq_fd)
    assert counted == [8] and m.syncs == [1]
    assert set(m.stats.count) == {"call port 0xea"}  # not one exit for the writes or the interrupt


def test_coalesced_mmio_and_pio_reach_their_handlers_in_order(guest):
    mmio, pio = [], []
    with Machine() as m:
        m.on_mmio(layout.MMIO_WINDOW, 4, lambda exit, vcpu: mmio.append(exit.value), name="register")
        m.on_port(layout.TEST_PORT, lambda exit, vcpu: pio.append(exit.value), name="port")
        m.coalesce_mmio(layout.MMIO_WINDOW, 4)
        m.coalesce_pio(layout.TEST_PORT, 2)
        m.load_flat(guest("coalesced"), "long")
        outcome = m.run(timeout=10)
    assert mmio == pio == list(range(1, 201))
    coalesced = m.stats.count["register 0xd0000000-0xd0000003 (coalesced)"] + m.stats.count["port 0x600 (coalesced)"]
    assert coalesced > 300  # most of the 400 writes never left the kernel on their own
    assert outcome.exits == 400 - coalesced + 1  # the rest (ring full) exited, then DONE


def test_a_raising_handler_stops_the_vm_and_names_the_exit(guest):
    def broken(exit, vcpu):
        raise RuntimeError("device on fire")

    with Machine() as m:
        m.on_port(layout.TEST_PORT, broken, count=2, name="broken device")
        m.load_flat(guest("io"), "protected")
        with pytest.raises(HandlerError, match=r"the handler for IoOut\(port=0x600, size=1, count=1, data=11\) "
                                               r"raised RuntimeError: device on fire") as info:
            m.run(timeout=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.state.mode == "protected"


def test_overlapping_device_ranges_are_refused():
    with Machine() as m:
        m.on_port(0x3F8, lambda e, v: None, count=8, name="uart")
        with pytest.raises(ValueError, match=r"port 0x3fc already belongs to uart 0x3f8-0x3ff"):
            m.on_port(0x3FC, lambda e, v: None, name="other")
        m.on_mmio(0xD0000000, 0x1000, lambda e, v: None, name="a")
        with pytest.raises(ValueError, match=r"b 0xd0000800-0xd00017ff overlaps a 0xd0000000-0xd0000fff"):
            m.on_mmio(0xD0000800, 0x1000, lambda e, v: None, name="b")


def test_a_flooding_console_stays_bounded(guest):
    # 512 bytes: a slow host (kvm_amd under QEMU TCG writes about 4000 a second) still overflows it
    with Machine(console_limit=512) as m:
        m.load_flat(guest("flood"), "real")
        with pytest.raises(GuestTimeout):
            m.run(timeout=1)
    assert len(m.console_output) == 512 and set(m.console_output) == {ord("x")}
    assert m.console_dropped > 0
    assert m.console_dropped + 512 == m.stats.count["console 0xe9"]  # every byte counted, few kept


def test_smp_needs_the_irqchip():
    with pytest.raises(ValueError, match="more than 1 needs the in-kernel irqchip"):
        Machine(cpus=2)


def test_a_coalesced_write_can_end_the_run_or_raise(guest):
    from pykvm.outcome import Outcome

    def ends_at_five(exit, vcpu):
        return Outcome(7) if exit.value == 5 else None

    with Machine() as m:
        m.on_mmio(layout.MMIO_WINDOW, 4, ends_at_five, name="register")
        m.on_port(layout.TEST_PORT, lambda exit, vcpu: None, name="port")
        m.coalesce_mmio(layout.MMIO_WINDOW, 4)
        m.load_flat(guest("coalesced"), "long")
        assert m.run(timeout=10).status == 7

    def broken(exit, vcpu):
        raise RuntimeError("device on fire")

    with Machine() as m:
        m.on_mmio(layout.MMIO_WINDOW, 4, broken, name="register")
        m.on_port(layout.TEST_PORT, lambda exit, vcpu: None, name="port")
        m.coalesce_mmio(layout.MMIO_WINDOW, 4)
        m.load_flat(guest("coalesced"), "long")
        with pytest.raises(HandlerError, match=r"the handler for MmioWrite\(gpa=0xd0000000, data=01000000\) raised"):
            m.run(timeout=10)


def test_exits_are_counted_always_and_timed_only_when_asked(guest):
    """Machine.stats counts every exit; seconds stay 0 unless time_exits (pykvm run --stats) is on."""
    for timed in (False, True):
        with Machine() as m:
            m.time_exits = timed
            m.load_flat(guest("hello_real"), "real")
            outcome = m.run(timeout=20)
        text = b"Hello from real mode\n"
        assert outcome.ok and m.console_output == text
        assert m.stats.count["console 0xe9"] == len(text) and outcome.exits == m.exit_count
        assert (m.stats.seconds["console 0xe9"] > 0) is timed
