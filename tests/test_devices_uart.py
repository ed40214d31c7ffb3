"""The 16550A UART on a synthetic bus: registers, interrupts, FIFO, overrun, host input."""

from __future__ import annotations

import io
import threading
import time

import pytest

from pykvm.devices.harness import PortHarness
from pykvm.devices.uart import COM1_PORT, Uart16550

THR = RBR = DLL = COM1_PORT
IER = DLM = COM1_PORT + 1
IIR = FCR = COM1_PORT + 2
LCR = COM1_PORT + 3
MCR = COM1_PORT + 4
LSR = COM1_PORT + 5
MSR = COM1_PORT + 6
SCR = COM1_PORT + 7


class Line:
    """Records every level the UART drives its interrupt line to."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, level: int) -> None:
        self.calls.append(level)

    @property
    def level(self) -> int:
        return self.calls[-1] if self.calls else 0


@pytest.fixture
def uart():
    line = Line()
    stream = io.BytesIO()
    dev = Uart16550(stream, irq=line)
    return dev, PortHarness(dev), line, stream


def test_reset_state_matches_the_datasheet(uart):
    _, bus, line, _ = uart
    assert bus.inp(IER) == 0x00
    assert bus.inp(IIR) == 0x01  # no interrupt pending, FIFOs off
    assert bus.inp(LCR) == 0x00
    assert bus.inp(MCR) == 0x00
    assert bus.inp(LSR) == 0x60  # THRE | TEMT
    assert bus.inp(MSR) == 0xB0  # DCD, DSR, CTS with no modem (as QEMU)
    assert line.calls == []


def test_divisor_latch_and_transmit(uart):
    dev, bus, line, stream = uart
    bus.out(LCR, 0x80)  # DLAB
    bus.out(DLL, 0x01)
    bus.out(DLM, 0x00)
    assert (bus.inp(DLL), bus.inp(DLM)) == (0x01, 0x00)
    bus.out(LCR, 0x03)  # 8N1, DLAB off
    assert dev.divisor == 1
    for b in b"Hi\n":
        bus.out(THR, b)
    assert stream.getvalue() == b"Hi\n"
    assert dev.captured == b"Hi\n"
    assert bus.inp(LSR) & 0x60 == 0x60  # transmission is instant: THR and shift register empty
    assert line.calls == []  # no interrupt enabled


def test_ier_keeps_its_low_nibble_and_scr_is_scratch(uart):
    _, bus, _, _ = uart
    bus.out(IER, 0xFF)
    assert bus.inp(IER) == 0x0F
    bus.out(SCR, 0x5A)
    assert bus.inp(SCR) == 0x5A


def test_thre_interrupt_fires_on_enable_and_reading_iir_clears_it(uart):
    _, bus, line, _ = uart
    bus.out(IER, 0x02)  # ETBEI with THR empty: the interrupt is pending at once
    assert line.calls == [1]
    assert bus.inp(IIR) == 0x02
    assert line.calls == [1, 0]  # the read that reported THRE cleared it
    assert bus.inp(IIR) == 0x01
    bus.out(IER, 0x02)  # no rising edge of ETBEI: nothing new
    assert line.calls == [1, 0]
    bus.out(IER, 0x00)
    bus.out(IER, 0x02)  # ETBEI 0 -> 1 again: pending again (what Windows and Linux rely on)
    assert line.calls == [1, 0, 1]


def test_thr_write_clears_thre_then_raises_it_again_with_a_new_edge(uart):
    _, bus, line, stream = uart
    bus.out(IER, 0x02)
    bus.out(THR, ord("x"))
    assert line.calls == [1, 0, 1]  # lowered by the write, raised when THR empties again
    assert bus.inp(IIR) == 0x02
    assert stream.getvalue() == b"x"


def test_received_data_raises_rx_interrupt_and_reads_in_order(uart):
    dev, bus, line, _ = uart
    bus.out(IER, 0x01)
    assert dev.feed(b"a") == 1
    assert bus.inp(LSR) & 0x01  # DR
    assert bus.inp(IIR) == 0x04
    assert line.level == 1
    assert bus.inp(RBR) == ord("a")
    assert bus.inp(LSR) & 0x01 == 0
    assert bus.inp(IIR) == 0x01
    assert line.calls == [1, 0]


def test_fifo_mode_reports_fifo_bits_trigger_level_and_timeout(uart):
    dev, bus, line, _ = uart
    bus.out(FCR, 0xC7)  # enable + clear both FIFOs, trigger level 14
    bus.out(IER, 0x01)
    assert bus.inp(IIR) == 0xC1
    dev.feed(b"abc")  # below the trigger level: character timeout
    assert bus.inp(IIR) == 0xCC
    dev.feed(bytes(range(11)))
    assert bus.inp(IIR) == 0xC4  # 14 bytes: data available
    assert bus.ins(RBR, 3) == b"abc"  # rep insb reads three bytes in one exit
    assert bus.inp(IIR) == 0xCC
    bus.out(FCR, 0x03)  # clear the RX FIFO
    assert bus.inp(LSR) & 0x01 == 0 and line.level == 0
    bus.out(FCR, 0x00)  # back to 16450 mode
    assert bus.inp(IIR) == 0x01


def test_fifo_overrun_sets_oe_and_drops_the_new_bytes(uart):
    dev, bus, line, _ = uart
    bus.out(FCR, 0x01)
    bus.out(IER, 0x05)  # data available + line status
    assert dev.feed(bytes(range(20))) == 16
    assert dev.overruns == 4
    assert bus.inp(IIR) == 0xC6  # line status outranks data available
    assert bus.inp(LSR) == 0x63  # OE | DR | THRE | TEMT
    assert bus.inp(LSR) == 0x61  # reading LSR cleared OE
    assert bus.inp(IIR) == 0xC4
    assert bus.ins(RBR, 16) == bytes(range(16))  # the FIFO kept the first 16
    assert bus.inp(RBR) == 0  # empty FIFO reads 0 (as QEMU)
    assert line.level == 0


def test_16450_mode_overrun_replaces_the_unread_byte(uart):
    dev, bus, _, _ = uart
    assert dev.space() == 1
    assert dev.feed(b"ab") == 1
    assert bus.inp(LSR) & 0x03 == 0x03
    assert bus.inp(RBR) == ord("b")
    assert bus.inp(RBR) == ord("b")  # RBR holds the last byte


def test_a_host_flood_is_bounded(uart):
    dev, bus, _, _ = uart
    bus.out(FCR, 0x01)
    assert dev.feed(b"x" * 1_000_000) == 16
    assert dev.space() == 0
    assert dev.overruns == 1_000_000 - 16
    assert bus.ins(RBR, 17) == b"x" * 16 + b"\0"  # 16 bytes held, no more


def test_wait_for_space_lets_a_feeder_thread_deliver_everything(uart):
    dev, bus, _, _ = uart
    bus.out(FCR, 0x01)
    message = bytes(range(256)) * 2

    def feeder():
        data = message
        while data:
            room = dev.wait_for_space(timeout=5)
            assert room
            data = data[dev.feed(data[:room]) :]

    thread = threading.Thread(target=feeder)
    thread.start()
    received = bytearray()
    deadline = time.monotonic() + 10
    while len(received) < len(message) and time.monotonic() < deadline:
        if bus.inp(LSR) & 0x01:
            received.append(bus.inp(RBR))
    thread.join(5)
    assert bytes(received) == message
    assert dev.overruns == 0


def test_loopback_routes_thr_to_rbr_and_mcr_to_msr(uart):
    dev, bus, _, stream = uart
    bus.out(MCR, 0x1A)  # LOOP | OUT2 | RTS: the Linux 8250 probe's loopback check
    assert bus.inp(MSR) & 0xF0 == 0x90  # DCD (from OUT2) | CTS (from RTS)
    bus.out(THR, ord("z"))
    assert stream.getvalue() == b""
    assert bus.inp(LSR) & 0x01
    assert bus.inp(RBR) == ord("z")
    assert dev.feed(b"q") == 0  # the line input is disconnected in loopback


def test_modem_status_interrupt_and_deltas(uart):
    _, bus, line, _ = uart
    bus.out(IER, 0x08)
    bus.out(MCR, 0x10)  # loopback with every output off: CTS, DSR and DCD drop
    assert bus.inp(IIR) == 0x00  # modem status pending
    assert line.level == 1
    assert bus.inp(MSR) == 0x0B  # DCTS | DDSR | DDCD, lines all low
    assert line.level == 0
    bus.out(MCR, 0x14)  # OUT1 -> RI rises: no TERI yet
    assert bus.inp(MSR) == 0x40
    bus.out(MCR, 0x10)  # RI falls: trailing edge
    assert bus.inp(MSR) == 0x04


def test_out2_gates_the_interrupt_when_asked():
    line = Line()
    dev = Uart16550(irq=line, out2_gates_irq=True)
    bus = PortHarness(dev)
    bus.out(IER, 0x02)
    assert line.calls == []  # pending, but OUT2 is off
    bus.out(MCR, 0x08)
    assert line.calls == [1]


def test_captured_output_is_bounded_but_the_stream_gets_everything():
    stream = io.BytesIO()
    dev = Uart16550(stream, limit=100)
    bus = PortHarness(dev)
    data = bytes(i & 0xFF for i in range(1000))
    for b in data:
        bus.out(THR, b)
    assert stream.getvalue() == data
    assert dev.captured == data[-100:]
    assert dev.dropped == 900


def test_a_16_bit_write_is_split_into_byte_registers(uart):
    _, bus, _, stream = uart
    bus.out(THR, 0x0141, size=2)  # THR <- 0x41, IER <- 0x01 (as an ISA bus splits the cycle)
    assert stream.getvalue() == b"A"
    assert bus.inp(IER) == 0x01
    assert bus.inp(LSR, size=2) == 0xB060  # LSR | MSR << 8


def test_attach_registers_eight_ports():
    dev = Uart16550()
    bus = PortHarness(dev).bus
    assert all(bus.port_handler(p) == dev.io for p in range(0x3F8, 0x400))
    assert bus.port_handler(0x3F7) is None and bus.port_handler(0x400) is None
