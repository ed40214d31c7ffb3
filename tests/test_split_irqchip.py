"""The split irqchip (KVM_CAP_SPLIT_IRQCHIP): local APICs in the kernel, the IOAPIC in Python."""

from __future__ import annotations

import errno
import platform
import threading
import time

import pytest

from pykvm import exits
from pykvm.constants import Cap
from pykvm.devices.ioapic import Ioapic
from pykvm.ioctl import KvmError
from pykvm.machine import Machine
from pykvm.system import Kvm
from pykvm.x86 import layout

pytestmark = pytest.mark.kvm



@pytest.fixture(autouse=True)
def split_irqchip():
    with Kvm() as kvm:
        if not kvm.check_extension(Cap.SPLIT_IRQCHIP):
            pytest.skip("this KVM offers no split irqchip (KVM_CAP_SPLIT_IRQCHIP)")


def test_a_host_thread_interrupts_the_guest_through_the_python_ioapic(guest):
    """guests/eventfd.S without the eventfds: its 8 port writes come to Python, and on the 8th a
    host thread raises GSI 5; the IOAPIC (programmed by the guest with MMIO exits) sends the MSI."""
    writes, raised = [], threading.Event()
    timing = {}

    def eventfd_port(exit, vcpu):
        writes.append(exit.value)
        if len(writes) == 8:
            raised.set()

    with Machine(irqchip="split") as m:
        m.on_port(layout.EVENTFD_PORT, eventfd_port, name="eventfd port")
        line = m.irq(5)

        def device():
            if raised.wait(10):
                time.sleep(0.05)  # let the guest reach its HLT
                timing["raised"] = time.perf_counter()
                line(1)
                line(0)

        m.on_sync = lambda value: timing.setdefault("synced", time.perf_counter())
        threading.Thread(target=device, daemon=True).start()
        m.load_flat(guest("eventfd"), "long")
        assert m.run(timeout=20).ok
    assert writes == [8, 7, 6, 5, 4, 3, 2, 1] and m.syncs == [1]
    assert m.ioapic.redirection[5] & 0x1FFFF == 0x35 and m.ioapic.delivered == 1
    assert m.stats.count["Ioapic 0xfec00000-0xfec00fff"] == 4  # IOAPIC_ROUTE: two IOREGSEL + two IOWIN writes
    assert m.stats.count["eventfd port 0x610"] == 8
    assert "Hlt" not in m.stats.count and m.kvm_stats["halt_exits"] >= 1  # HLT waits in the kernel's LAPIC
    assert m.kvm_stats["irq_injections"] >= 1
    assert timing["synced"] - timing["raised"] < 5  # woken from HLT by the MSI


def test_ipi_between_two_vcpus_with_the_split_irqchip(guest):
    """INIT, SIPI and the fixed IPI are the in-kernel local APICs' business."""
    with Machine(cpus=2, irqchip="split") as m:
        m.load_flat(guest("smp"), "long")
        assert m.run(timeout=20).ok
    assert m.console_output == b"ap: apic 1\nbsp: ipi 0x31 0\n"


def test_the_split_machine_has_a_python_ioapic_and_no_pit():
    with Machine(irqchip="split") as m:
        assert isinstance(m.ioapic, Ioapic) and m.ioapic.id == 1  # as the MP table says: ID = CPUs
        route = m.bus.mmio_route(0xFEC00010)
        assert route is not None and (route.start, route.size) == (0xFEC00000, 0x1000)
        assert m._route(exits.IoapicEoi(0x35))[0] == m.ioapic.eoi_exit
        with pytest.raises(KvmError, match=r"KVM_GET_PIT2: \[Errno 6\]"):  # pykvm made no PIT
            m.vm.get_pit2()
        # Whether KVM lets one be made without its PIC differs by kernel: 6.18 refuses with ENOENT,
        # 6.1 (the kvm_amd reference host's) makes one, whose interrupts then reach no pin.
        try:
            m.vm.create_pit2()
        except KvmError as e:
            assert e.errno == errno.ENOENT and e.ioctl == "KVM_CREATE_PIT2"
        else:
            assert tuple(map(int, platform.release().split(".")[:2])) < (6, 18), platform.release()
        with pytest.raises(KvmError, match="KVM_CREATE_IRQCHIP"):
            m.vm.create_irqchip()


def test_irq_lines_map_to_ioapic_pins_as_on_a_pc():
    seen = []
    with Machine(irqchip="split") as m:
        m.ioapic.set_irq = lambda pin, level: seen.append((pin, level))
        m.irq(0)(1)  # the ISA IRQ 0 override: pin 2
        m.irq(23)(1)
        m.irq(4)(0)
        with pytest.raises(ValueError, match="GSI 2 reaches no IOAPIC pin"):
            m.irq(2)
        with pytest.raises(ValueError, match="GSI 24 reaches no IOAPIC pin"):
            m.irq(24)
    assert seen == [(2, 1), (23, 1), (4, 0)]


def test_bad_irqchip_arguments():
    with pytest.raises(ValueError, match="the split irqchip has no in-kernel PIT"):
        Machine(irqchip="split", pit=True)
    with pytest.raises(ValueError, match="irqchip must be True, False or 'split', not 'kernel'"):
        Machine(irqchip="kernel")


@pytest.mark.parametrize("before", ["create_vcpu", "create_irqchip"])
def test_split_irqchip_must_come_before_the_vcpus_and_instead_of_the_irqchip(before):
    with Kvm() as kvm, kvm.create_vm() as vm:
        getattr(vm, before)()
        with pytest.raises(KvmError, match=r"KVM_ENABLE_CAP: \[Errno 17\] File exists"):
            vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)


def test_the_absent_pics_take_writes_and_read_all_ones():
    with Machine(irqchip="split") as m:
        for port in (0x20, 0x21, 0xA0, 0xA1):
            handler, key = m._route(exits.IoOut(port, 1, 1, b"\xff"))
            assert handler(exits.IoOut(port, 1, 1, b"\xff"), m.vcpu) is None
            reply = exits.IoIn(port, 1, 1, memoryview(bytearray(1)))
            handler(reply, m.vcpu)
            assert bytes(reply.data) == b"\xff" and key.startswith("8259 PIC (absent)")
