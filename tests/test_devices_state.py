"""Device state for snapshot / restore (issue 17): every device model says what its state is,
``save()`` gives plain JSON data, and a device built again with the same arguments and given that
state by ``restore()`` saves the same state and answers the guest's next accesses the same way."""

from __future__ import annotations

import calendar
import importlib
import inspect
import io
import json
import pkgutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pykvm.devices
from pykvm import exits
from pykvm.devices.acpi_pm import PM_TIMER_FREQUENCY, PWRBTN_EN, TMR_EN, AcpiPm
from pykvm.devices.base import ConsoleDevice, Device
from pykvm.devices.bus import Bus
from pykvm.devices.cmos import Cmos
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.debugcon import DebugConsole
from pykvm.devices.fw_cfg import FW_CFG_FILE_FIRST, FwCfg
from pykvm.devices.harness import PortHarness
from pykvm.devices.i8042 import I8042, Reset
from pykvm.devices.ioapic import IOAPIC_GPA, Ioapic
from pykvm.devices.pc_testdev import IOMEM_GPA, PcTestdev
from pykvm.devices.pci import I440fxHostBridge, PciFunction, PciHost, Piix3IsaBridge
from pykvm.devices.pci_testdev import PciTestDev
from pykvm.devices.postcode import PostCode
from pykvm.devices.reset import ResetControl, SystemControlB
from pykvm.devices.uart import COM1_PORT, Uart16550
from fake_timer import FakeTimer

# Classes whose whole state is their base class's (so they need not say it again), and why.
STATE_IS_THE_BASES = {
    DebugConsole: "the console position (ConsoleDevice)",
    I440fxHostBridge: "its configuration space (PciFunction)",
    Piix3IsaBridge: "its configuration space, PIRQ routes included (PciFunction)",
}
TIME_FIELDS = {"ticks", "periodic_in"}  # follow the host clock: compared with a tolerance


def device_classes() -> set[type]:
    for info in pkgutil.iter_modules(pykvm.devices.__path__):
        importlib.import_module(f"pykvm.devices.{info.name}")
    found, todo = set(), [Device]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("pykvm.devices.") and not inspect.isabstract(sub):
                found.add(sub)
    return found


def states_unsaid(classes) -> list[str]:
    return [c.__name__ for c in classes
            if c not in STATE_IS_THE_BASES and not ("save" in vars(c) and "restore" in vars(c))]


# ---- builders: a device as the machine builds it, and registers driven to a non-trivial state ----
class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Timers(list):
    """The timer factory a device takes (true even before its first timer: ``timer or ...``)."""

    def __bool__(self) -> bool:
        return True

    def __call__(self, callback):
        self.append(FakeTimer(callback))
        return self[-1]


class Levels(list):
    @property
    def level(self) -> int:
        return self[-1] if self else 0


class Memory:
    """Guest RAM for fw_cfg's DMA: ``read`` / ``write`` on a bytearray from address 0."""

    def __init__(self, size: int = 0x10000):
        self.ram = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa + size > len(self.ram):
            raise ValueError("outside RAM")
        return bytes(self.ram[gpa : gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > len(self.ram):
            raise ValueError("outside RAM")
        self.ram[gpa : gpa + len(data)] = data


def mmio_write(bus: Bus, gpa: int, value: int, size: int = 4) -> None:
    bus.mmio_handler(gpa)(exits.MmioWrite(gpa, value.to_bytes(size, "little")), None)


def mmio_read(bus: Bus, gpa: int, size: int = 4) -> int:
    buf = bytearray(size)
    bus.mmio_handler(gpa)(exits.MmioRead(gpa, memoryview(buf)), None)
    return int.from_bytes(buf, "little")


def cmos_reg(h: PortHarness, index: int, value: int | None = None) -> int | None:
    h.out(0x70, index)
    if value is None:
        return h.inp(0x71)
    h.out(0x71, value)
    return None


NOW = calendar.timegm((2024, 2, 29, 13, 45, 56, 0, 0, 0)) + 0.25


class Built:
    """A device, how to reach it, and what it drives."""

    def __init__(self, device, harness=None, **parts):
        self.device = device
        self.h = harness if harness is not None else PortHarness(device)
        self.__dict__.update(parts)


def build_uart(drive=True):
    levels, out = Levels(), io.BytesIO()
    dev = Uart16550(out, irq=levels.append)
    b = Built(dev, levels=levels, out=out)
    if drive:
        h = b.h
        h.out(COM1_PORT + 3, 0x80)  # DLAB: divisor 0x0C01
        h.out(COM1_PORT, 0x01)
        h.out(COM1_PORT + 1, 0x0C)
        h.out(COM1_PORT + 3, 0x1B)  # 8 bits, even parity
        h.out(COM1_PORT + 2, 0x47)  # FIFO on, cleared, trigger 4
        h.out(COM1_PORT + 4, 0x0B)  # DTR RTS OUT2
        h.out(COM1_PORT + 7, 0x5A)
        h.out(COM1_PORT + 1, 0x07)  # RDI THRI RLSI
        h.outs(COM1_PORT, b"hello\n")
        dev.feed(b"0123456789abcdefXY")  # 16 taken, two overruns: LSR.OE
    return b


def build_debugcon(drive=True):
    out = io.BytesIO()
    b = Built(DebugConsole(out), out=out)
    if drive:
        b.h.outs(0xE9, b"boot: ok\n")
    return b


def build_cmos(drive=True, wall=NOW, mono=100.0):
    wall, mono, levels, timers = Clock(wall), Clock(mono), Levels(), Timers()
    dev = Cmos(below_4g=256 << 20, ncpus=2, clock=wall, monotonic=mono, irq=levels.append, timer=timers)
    b = Built(dev, wall=wall, mono=mono, levels=levels, timers=timers)
    if drive:
        h = b.h
        cmos_reg(h, 0x0B, 0x82)  # SET: the guest sets the clock to 2001-09-09 01:46:40
        for index, value in ((0, 0x40), (2, 0x46), (4, 0x01), (7, 0x09), (8, 0x09), (9, 0x01), (0x32, 0x20)):
            cmos_reg(h, index, value)
        cmos_reg(h, 0x0B, 0x02)
        cmos_reg(h, 0x0A, 0x2F)  # 2 Hz
        cmos_reg(h, 0x0B, 0x42)  # PIE
        mono.now += 0.5
        timers[0].fire()  # PF, IRQF: IRQ 8 raised
        mono.now += 0.2
        cmos_reg(h, 0x40, 0xA5)  # a RAM byte
        cmos_reg(h, 0x01, 0xC0)  # alarm seconds: don't care
        h.out(0x70, 0x8D)  # index D, NMI disabled
    return b


def build_acpi_pm(drive=True, mono=1000.0):
    mono, levels, timers = Clock(mono), Levels(), Timers()
    dev = AcpiPm(irq=levels.append, monotonic=mono, timer=timers)
    b = Built(dev, mono=mono, levels=levels, timers=timers)
    if drive:
        b.h.out(0x602, PWRBTN_EN | TMR_EN, 2)
        b.h.out(0xAFE2, 0x03)  # GPE0_EN
        dev.power_button()  # PWRBTN_STS: the SCI is raised
        mono.now += 0.001
    return b


def build_fw_cfg(drive=True):
    memory = Memory()
    dev = FwCfg(128 << 20, 2, memory=memory)
    dev.set_cmdline("console=ttyS0")
    dev.add_file("etc/boot-order", b"/pci@i0cf8/disk@0\n")
    b = Built(dev, memory=memory)
    if drive:
        b.h.out(0x510, FW_CFG_FILE_FIRST, 2)
        b.h.ins(0x511, 5)
        b.h.out(0x514, int.from_bytes((0).to_bytes(4, "big"), "little"), 4)  # DMA address, high half
    return b


def build_i8042(drive=True):
    levels = Levels()
    b = Built(I8042(irq=levels.append), levels=levels)
    if drive:
        b.h.out(0x64, 0xAA)  # self-test: 0x55 waits, SYS set, IRQ 1
        b.h.out(0x64, 0xA7)  # aux off
        b.h.out(0x64, 0xD1)  # the next byte is the output port
    return b


def build_ioapic(drive=True):
    sent, routes = [], []
    dev = Ioapic(lambda a, d: sent.append((a, d)), set_routes=routes.append)
    bus = Bus()
    dev.attach(bus)
    b = Built(dev, harness=bus, sent=sent, routes=routes)
    if drive:
        for index, value in ((0x00, 3 << 24), (0x13, 1 << 24), (0x12, 0x8031), (0x14, 0x30)):
            mmio_write(bus, IOAPIC_GPA, index)
            mmio_write(bus, IOAPIC_GPA + 0x10, value)
        dev.set_irq(1, 1)  # level pin 1: delivered, remote IRR set
        dev.set_irq(5, 1)  # a line on a masked pin
        mmio_write(bus, IOAPIC_GPA, 0x12, 1)
    return b


def build_pc_testdev(drive=True):
    lines = {}

    def irq(n):
        lines[n] = Levels()
        return lines[n].append

    dev = PcTestdev(irq=irq)
    bus = PortHarness(dev)
    b = Built(dev, harness=bus, lines=lines)
    if drive:
        bus.out(0xE0, 0xDEADBEEF, 4)
        bus.out(0x2003, 1)
        bus.out(0x200E, 1)
        bus.out(0xE4, 0x12345678, 4)
        mmio_write(bus.bus, IOMEM_GPA + 0x100, 0x11223344)
    return b


class PinnedDev(PciFunction):
    """A function with INTA# and an I/O BAR."""

    qemu_name = "pinned"
    vendor_id, device_id = 0x1234, 0x0001
    interrupt_pin = 1

    def __init__(self):
        super().__init__()
        self.declare_bar(0, 16, "io")


def build_pci(drive=True):
    gsis, msis, eventfds = {}, [], []

    def irq(gsi):
        gsis[gsi] = Levels()
        return gsis[gsi].append

    host = PciHost(irq, lambda a, d: msis.append((a, d)))
    testdev = host.add(PciTestDev(membar=1 << 20, on_ioeventfds=eventfds.append))
    pinned = host.add(PinnedDev())
    h = PortHarness(host)
    b = Built(host, harness=h, gsis=gsis, testdev=testdev, pinned=pinned, eventfds=eventfds)
    if drive:
        host.assign_resources()
        io_bar = testdev.bar_address(1)
        h.out(io_bar, 2)  # portio-datamatch-eventfd
        h.outs(io_bar + 0x85, b"\xfa\xfa\xce")  # two match
        pinned.set_irq(1)
        host.config_write(testdev.slot, 0, 0x40, 4, 0xCAFEF00D)  # device-specific space
        h.out(0xCF8, 0x80000000 | pinned.slot << 11 | 0x3C, 4)
    return b


BUILDERS = {
    AcpiPm: build_acpi_pm,
    Cmos: build_cmos,
    DebugConsole: build_debugcon,
    DebugExit: lambda drive=True: Built(DebugExit()),
    FwCfg: build_fw_cfg,
    I8042: build_i8042,
    Ioapic: build_ioapic,
    PcTestdev: build_pc_testdev,
    PciHost: build_pci,
    Uart16550: build_uart,
}


def _post(drive=True):
    b = Built(PostCode())
    if drive:
        b.h.out(0x80, 0x3F)
        b.h.out(0x80, 0x42)
    return b


def _reset(drive=True):
    b = Built(ResetControl())
    if drive:
        b.h.out(0xCF9, 0x02)
    return b


def _port_b(drive=True):
    b = Built(SystemControlB())
    if drive:
        b.h.out(0x61, 0x03)
        b.h.inp(0x61)
    return b


BUILDERS.update({PostCode: _post, ResetControl: _reset, SystemControlB: _port_b})
# Reached through PciHost's state (bus 0 belongs to the host); ConsoleDevice and PciFunction
# are bases, their state checked through the classes above.
THROUGH = {ConsoleDevice: Uart16550, PciFunction: PciHost, I440fxHostBridge: PciHost,
           Piix3IsaBridge: PciHost, PciTestDev: PciHost}


def same_state(saved: dict, again: dict) -> None:
    assert saved.keys() == again.keys()
    for key in saved:
        if key in TIME_FIELDS and saved[key] is not None:
            assert again[key] == pytest.approx(saved[key], rel=0, abs=1e-6 if key != "ticks" else 2)
        else:
            assert again[key] == saved[key], key


def round_trip(cls, **kwargs):
    a = BUILDERS[cls](**kwargs)
    state = a.device.save()
    assert json.loads(json.dumps(state)) == state
    b = BUILDERS[cls](drive=False)
    b.device.restore(json.loads(json.dumps(state)))
    same_state(state, b.device.save())
    return a, b, state


# ---- every device says its state -----------------------------------------------------------------
def test_every_device_class_overrides_save_and_restore():
    classes = device_classes()
    assert Uart16550 in classes and PciTestDev in classes
    assert states_unsaid(classes) == []


def test_the_check_catches_a_device_that_does_not_say_its_state():
    class Quiet(Device):
        pass

    class HalfSaid(Device):
        def save(self):
            return {}

    class MorePci(PciFunction):  # a new function with its own registers must say them too
        pass

    unsaid = states_unsaid({Quiet, HalfSaid, MorePci, PostCode, DebugConsole})
    assert sorted(unsaid) == ["HalfSaid", "MorePci", "Quiet"]
    with pytest.raises(NotImplementedError, match="Quiet"):
        Quiet().save()


def test_every_device_class_has_a_state_test():
    assert device_classes() <= set(BUILDERS) | set(THROUGH)


@pytest.mark.parametrize("cls", sorted(BUILDERS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_save_restore_save_gives_the_same_plain_state(cls):
    round_trip(cls)


# ---- bad input -----------------------------------------------------------------------------------
def _fields():
    for cls in sorted(BUILDERS, key=lambda c: c.__name__):
        for name in BUILDERS[cls]().device.save():
            yield pytest.param(cls, name, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("cls, name", list(_fields()))
def test_restore_names_a_missing_or_wrong_typed_field(cls, name):
    state = BUILDERS[cls]().device.save()
    fresh = BUILDERS[cls](drive=False).device
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match=repr(name)):
        fresh.restore(missing)
    with pytest.raises(ValueError, match=repr(name)):
        fresh.restore({**state, name: [None]})
    fresh.restore(state)  # and it still takes a good one


def test_restore_refuses_what_is_not_a_state():
    with pytest.raises(ValueError):
        PostCode().restore([1, 2])
    with pytest.raises(ValueError, match="'x'"):
        DebugExit().restore({"x": 1})
    DebugExit().restore({})


def test_restore_refuses_a_value_out_of_range_and_names_it():
    with pytest.raises(ValueError, match="'lcr'"):
        build_uart(drive=False).device.restore({**build_uart().device.save(), "lcr": 256})
    with pytest.raises(ValueError, match="'rx'"):
        build_uart(drive=False).device.restore({**build_uart().device.save(), "rx": "zz"})
    with pytest.raises(ValueError, match="'ram'"):
        build_cmos(drive=False).device.restore({**build_cmos().device.save(), "ram": "00"})
    state = build_uart().device.save()
    with pytest.raises(ValueError, match="'rx'"):  # 17 bytes: more than the FIFO holds
        build_uart(drive=False).device.restore({**state, "rx": "00" * 17})


def test_pci_host_refuses_another_bus_and_names_the_function_field():
    a = build_pci()
    state = a.device.save()
    other = PciHost()
    with pytest.raises(ValueError, match="'functions'"):
        other.restore(state)
    bad = json.loads(json.dumps(state))
    bad["functions"][2]["state"].pop("counts")
    with pytest.raises(ValueError, match=r"00:02\.0.*'counts'"):
        build_pci(drive=False).device.restore(bad)
    bad = json.loads(json.dumps(state))
    bad["functions"][2]["state"]["config"] = bad["functions"][3]["state"]["config"]  # another device's
    with pytest.raises(ValueError, match="'config'"):
        build_pci(drive=False).device.restore(bad)


# ---- the restored device behaves the same ----------------------------------------------------------
def regs(h: PortHarness, port: int, count: int) -> list[int]:
    return [h.inp(port + i) for i in range(count)]


def test_uart_receiver_interrupt_and_console_continue():
    a, b, state = round_trip(Uart16550)
    assert state["written"] == 6 and state["rx"] == b"0123456789abcdef".hex()
    assert b.levels == [1]  # the line driven to the saved level
    assert b.out.getvalue() == b"" and b.device.dropped == 6  # nothing re-emitted
    for dev in (a, b):
        assert dev.h.inp(COM1_PORT + 2) == 0xC6  # line status (the overrun) first, FIFO on
        assert dev.h.inp(COM1_PORT + 5) == 0x63  # DR THRE TEMT OE; the read clears OE
        assert dev.h.inp(COM1_PORT + 2) == 0xC4  # then data available: 16 >= trigger 4
    assert a.h.ins(COM1_PORT, 16) == b.h.ins(COM1_PORT, 16) == b"0123456789abcdef"
    for dev in (a, b):
        assert dev.h.inp(COM1_PORT + 2) == 0xC2  # THRE, still pending
        assert dev.h.inp(COM1_PORT + 2) == 0xC1  # reported once
        assert dev.levels.level == 0
        dev.h.out(COM1_PORT + 3, 0x9B)
        assert (dev.h.inp(COM1_PORT), dev.h.inp(COM1_PORT + 1)) == (0x01, 0x0C)
        dev.h.out(COM1_PORT + 3, 0x1B)
    b.h.out(COM1_PORT, ord("!"))
    assert b.out.getvalue() == b"!" and b.device.save()["written"] == 7


def test_uart_restores_a_raised_line_and_is_then_in_step():
    a, b, state = round_trip(Uart16550)
    assert state["irq"] == 1 and b.device.irq_level == 1


uart_ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("feed"), st.integers(0, 20), st.integers(0, 255)),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=uart_ops, after=st.lists(st.integers(0, 7), max_size=30))
def test_uart_random_registers_save_restore_equivalence(before, after):
    a = build_uart(drive=False)
    for op, reg, value in before:
        if op == "w":
            a.h.out(COM1_PORT + reg, value)
        elif op == "r":
            a.h.inp(COM1_PORT + reg)
        else:
            a.device.feed(bytes((value + i) & 0xFF for i in range(reg)))
    state = a.device.save()
    assert json.loads(json.dumps(state)) == state
    b = build_uart(drive=False)
    b.device.restore(json.loads(json.dumps(state)))
    assert b.device.save() == state
    assert b.levels.level == a.levels.level == state["irq"]
    for reg in after:  # the same reads give the same values and the same line
        assert b.h.inp(COM1_PORT + reg) == a.h.inp(COM1_PORT + reg), reg
        assert b.levels.level == a.levels.level
    a.device.feed(b"zz")
    b.device.feed(b"zz")
    assert b.device.save() == {**a.device.save(), "written": b.device.save()["written"]}


def test_debugcon_position_continues_without_the_text_again():
    a, b, state = round_trip(DebugConsole)
    assert state == {"written": 9}
    assert b.out.getvalue() == b"" and b.device.captured == b"" and b.device.dropped == 9
    b.h.out(0xE9, ord("$"))
    assert b.out.getvalue() == b"$" and b.device.save() == {"written": 10}
    assert b.h.inp(0xE9) == 0xE9


def test_post_code_reset_control_and_port_b_read_the_same():
    a, b, _ = round_trip(PostCode)
    assert (b.device.last, b.device.writes) == (0x42, 2)
    a, b, _ = round_trip(ResetControl)
    assert b.h.inp(0xCF9) == a.h.inp(0xCF9) == 0x02
    a, b, _ = round_trip(SystemControlB)
    assert [b.h.inp(0x61) for _ in range(3)] == [a.h.inp(0x61) for _ in range(3)]  # the refresh bit's phase too


def test_cmos_clock_continues_and_the_periodic_interrupt_still_fires():
    a = build_cmos()
    state = a.device.save()
    assert state["periodic_in"] == pytest.approx(0.3)  # 0.5 s period, 0.2 s into it
    b = build_cmos(drive=False, wall=NOW + 10, mono=5000.0)  # ten seconds later, on another host
    b.device.restore(json.loads(json.dumps(state)))
    same_state(state, b.device.save())
    assert b.levels == [1]  # IRQF was set: IRQ 8 is up again
    (timer,) = b.timers
    assert timer.deadline == pytest.approx(5000.3)
    a.wall.now += 10
    for index in (0, 2, 4, 7, 8, 9, 0x32, 0x40, 0x0A & 0x7F, 0x0B):
        assert cmos_reg(b.h, index) == cmos_reg(a.h, index), index
    assert cmos_reg(b.h, 0) == 0x50  # 01:46:40 + the 10 s that passed on the host
    assert cmos_reg(b.h, 0x0C) == 0xD0  # IRQF PF UF; the read clears them and lowers IRQ 8
    assert b.levels == [1, 0]
    b.mono.now = 5000.3
    timer.fire()
    assert b.levels == [1, 0, 1] and timer.deadline == pytest.approx(5000.8)
    assert cmos_reg(b.h, 0x0C) & 0xC0 == 0xC0


def test_cmos_saved_while_the_guest_sets_the_clock():
    a = build_cmos(drive=False)
    cmos_reg(a.h, 0x0B, 0x82)
    cmos_reg(a.h, 0x04, 0x23)
    state = a.device.save()
    b = build_cmos(drive=False, wall=NOW + 100)
    assert state["latched"] is not None and state["periodic_in"] is None
    b.device.restore(json.loads(json.dumps(state)))
    assert b.device.save() == state and b.timers == []  # nothing to time
    assert cmos_reg(b.h, 0x04) == 0x23  # the latched hour, not the running clock
    cmos_reg(b.h, 0x0B, 0x02)  # SET cleared: the clock starts from what was latched
    assert cmos_reg(b.h, 0x04) == 0x23 and cmos_reg(b.h, 0x02) == 0x45


def test_acpi_pm_timer_continues_from_its_count_and_the_sci_is_raised():
    a = build_acpi_pm()
    state = a.device.save()
    b = build_acpi_pm(drive=False, mono=7.0)  # another host's clock
    b.device.restore(json.loads(json.dumps(state)))
    same_state(state, b.device.save())
    assert b.levels == [1]
    assert b.h.inp(0x608, 4) == a.h.inp(0x608, 4) == state["ticks"] & 0xFFFFFF
    (timer,) = b.timers  # the carry timer, armed where the count reaches bit 23's next change
    assert timer.deadline == pytest.approx(7.0 + (state["overflow_tick"] - state["ticks"]) / PM_TIMER_FREQUENCY)
    for port, size in ((0x600, 2), (0x602, 2), (0x604, 2), (0xAFE0, 1), (0xAFE2, 1)):
        assert b.h.inp(port, size) == a.h.inp(port, size)
    b.h.out(0x600, 0x100, 2)  # clear PWRBTN_STS: the SCI drops
    assert b.levels == [1, 0]
    b.mono.now = timer.deadline
    timer.fire()
    assert b.levels == [1, 0, 1] and b.h.inp(0x600, 2) & 1  # TMR_STS on time


def test_fw_cfg_read_goes_on_at_the_same_offset():
    a, b, state = round_trip(FwCfg)
    assert state["key"] == FW_CFG_FILE_FIRST and state["offset"] == 5
    assert a.h.ins(0x511, 14) == b.h.ins(0x511, 14) == b"i0cf8/disk@0\n\0"
    # DMA: the saved high half and a low half written now give one access structure
    for dev in (a, b):
        dev.memory.ram[0x100:0x110] = struct.pack(">IIQ", 0x0A, 4, 0x200)  # select key 0, read 4 bytes
        dev.h.out(0x518, int.from_bytes((0x100).to_bytes(4, "big"), "little"), 4)
        assert dev.memory.ram[0x200:0x204] == b"QEMU"


def test_i8042_output_buffer_irq_and_waiting_command():
    a, b, state = round_trip(I8042)
    assert b.levels == [1]
    assert a.h.inp(0x64) == b.h.inp(0x64)
    assert a.h.inp(0x60) == b.h.inp(0x60) == 0x55
    assert b.levels == [1, 0]
    assert isinstance(b.h.out(0x60, 0x00), Reset)  # the waiting 0xD1 takes it: reset line low


def test_ioapic_redirection_routes_and_remote_irr():
    a, b, state = round_trip(Ioapic)
    assert b.routes == [a.routes[-1]]  # KVM is told the EOI routes again
    assert b.sent == []  # nothing delivered twice
    for index in (0x00, 0x01, 0x12, 0x13, 0x14, 0x1A):
        for dev in (a, b):
            mmio_write(dev.h, IOAPIC_GPA, index)
        assert mmio_read(b.h, IOAPIC_GPA + 0x10) == mmio_read(a.h, IOAPIC_GPA + 0x10), hex(index)
    assert mmio_read(b.h, IOAPIC_GPA, 1) == mmio_read(a.h, IOAPIC_GPA, 1)
    sent_before = len(a.sent)
    for dev in (a, b):
        dev.device.eoi(0x31)  # pin 1 still asserted: delivered again
    assert b.sent == a.sent[sent_before:] and len(b.sent) == 1
    for dev in (a, b):
        mmio_write(dev.h, IOAPIC_GPA, 0x1A)
        mmio_write(dev.h, IOAPIC_GPA + 0x10, 0x41)  # unmask pin 5 (edge): no edge was latched
    assert b.sent == a.sent[sent_before:]


def test_pc_testdev_lines_register_and_memory():
    a, b, state = round_trip(PcTestdev)
    assert {n: l for n, l in b.lines.items() if l} == {3: [1], 14: [1]}  # the lines driven again
    assert b.h.inp(0xE0, 4) == 0xDEADBEEF and b.h.inp(0xE9, 2) == 0xADBE
    assert mmio_read(b.h.bus, IOMEM_GPA + 0x100) == 0x11223344
    assert b.device.flushed == [0x12345000]


def test_pci_bars_mapped_at_the_same_addresses_and_tests_go_on():
    a, b, state = round_trip(PciHost)
    for dev in (a.testdev, a.pinned):
        other = b.device.function_at(dev.slot)
        for index, bar in enumerate(dev.bars):
            if bar is not None:
                assert b.device.routed(other, index) == a.device.routed(dev, index) is not None
    io_bar = a.testdev.bar_address(1)
    assert b.testdev.bar_address(1) == io_bar
    assert b.eventfds[-1] == a.eventfds[-1]  # the selected test's ioeventfd, at the same port
    assert regs(b.h, io_bar, 16) == regs(a.h, io_bar, 16)  # header: test 5, count 2
    assert b.testdev.count(5) == 2
    b.h.out(io_bar + 0x85, 0xFA)
    assert b.testdev.count(5) == 3
    assert b.h.inp(0xCFC, 1) == a.h.inp(0xCFC, 1) == 11  # CONFIG_ADDRESS kept: the interrupt line
    assert b.device.config_read(b.testdev.slot, 0, 0x40) == 0xCAFEF00D
    gsi = a.device.intx_gsi(a.pinned)
    assert b.gsis[gsi] == [1]  # INTA# of the pinned function, routed through PIIX3 again
    mem_bar = a.testdev.bar_address(0)
    assert mmio_read(b.h.bus, mem_bar, 1) == mmio_read(a.h.bus, mem_bar, 1)


ioapic_ops = st.lists(st.one_of(
    st.tuples(st.just("reg"), st.sampled_from([0x00, 0x01, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15]),
              st.sampled_from([0, 0x30, 0x8030, 0x18031, 0x10030, 1 << 24, 0xFFFFFFFF])),
    st.tuples(st.just("irq"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("eoi"), st.sampled_from([0x30, 0x31]), st.just(0)),
), max_size=30)


@settings(max_examples=100, deadline=None)
@given(before=ioapic_ops, after=ioapic_ops)
def test_ioapic_random_accesses_save_restore_equivalence(before, after):
    def apply(b, ops):
        for op, x, y in ops:
            if op == "reg":
                mmio_write(b.h, IOAPIC_GPA, x)
                mmio_write(b.h, IOAPIC_GPA + 0x10, y)
            elif op == "irq":
                b.device.set_irq(x, y)
            else:
                b.device.eoi(x)

    a = build_ioapic(drive=False)
    apply(a, before)
    state = a.device.save()
    b = build_ioapic(drive=False)
    b.device.restore(json.loads(json.dumps(state)))
    assert b.device.save() == state
    assert b.routes[-1] == (a.routes[-1] if a.routes else [])  # KVM told the routes, even none
    sent = len(a.sent)
    apply(a, after)
    apply(b, after)
    assert b.sent == a.sent[sent:]  # the same messages from here on
    assert b.device.save() == a.device.save()


@settings(max_examples=100, deadline=None)
@given(before=st.lists(st.tuples(st.sampled_from([0x60, 0x64]), st.sampled_from(
    [0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAD, 0xD0, 0xD1, 0xD2, 0x01, 0x45, 0xFF])), max_size=20),
    after=st.lists(st.sampled_from([0x60, 0x64]), max_size=6))
def test_i8042_random_commands_save_restore_equivalence(before, after):
    a = build_i8042(drive=False)
    for port, value in before:
        a.h.out(port, value)
    state = a.device.save()
    b = build_i8042(drive=False)
    b.device.restore(json.loads(json.dumps(state)))
    assert b.device.save() == state and b.levels.level == a.levels.level
    for port in after:
        assert b.h.inp(port) == a.h.inp(port)
        assert b.levels.level == a.levels.level
