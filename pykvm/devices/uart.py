"""An 8250 / 16550A UART (COM1: ports 0x3F8-0x3FF, IRQ 4).

Register-level behaviour after the TI (National) PC16550D datasheet, "8.0 Registers" (Table II,
Summary of Registers) and "8.6 FIFO Interrupt Mode Operation", with the choices QEMU's
``hw/char/serial.c`` makes where the datasheet leaves room:

==========  ======  ===========================================================================
offset      DLAB    register
==========  ======  ===========================================================================
0           0       RBR (read: next received byte) / THR (write: transmit a byte)
0, 1        1       DLL / DLM: the baud-rate divisor (stored; this model has no line timing)
1           0       IER: 0 ERBFI (data available), 1 ETBEI (THR empty), 2 ELSI (line status),
                    3 EDSSI (modem status); bits 4-7 read 0
2           -       IIR (read): bit 0 = 0 while an interrupt is pending, bits 1-3 its source
                    (0x6 line status > 0x4 data available / 0xC character timeout > 0x2 THR
                    empty > 0x0 modem status), bits 6-7 set while FIFOs are enabled (FCR0)
2           -       FCR (write): 0 enable FIFOs (changing it clears them; the other bits are
                    only programmed while it is 1), 1 clear RX FIFO, 2 clear TX FIFO, 3 DMA
                    mode, 6-7 RX trigger level (1, 4, 8, 14 bytes)
3           -       LCR: word length, stop bits, parity (stored), 7 DLAB
4           -       MCR: 0 DTR, 1 RTS, 2 OUT1, 3 OUT2, 4 LOOP (loopback: THR goes to RBR,
                    the MSR inputs follow DTR/RTS/OUT1/OUT2, the line input is disconnected)
5           -       LSR: 0 DR, 1 OE, 5 THRE, 6 TEMT (read clears OE; writes are ignored)
6           -       MSR: 0-3 deltas (cleared by the read), 4 CTS, 5 DSR, 6 RI, 7 DCD; with
                    no modem attached CTS, DSR and DCD read 1 (as QEMU)
7           -       SCR: scratch
==========  ======  ===========================================================================

Interrupts: the THR-empty interrupt is the classic one. It becomes pending when THR empties
and when ETBEI goes from 0 to 1 while THR is empty (the rule Windows and Linux's THRE test
depend on; QEMU does the same), and it is cleared by a read of IIR that reports it or by a write
to THR. The line level is "an enabled source is pending" (``irq(1)`` / ``irq(0)`` on a change).
On a PC board the INTR pin reaches the PIC only through the OUT2 gate; QEMU does not model the
gate, and neither does this model unless ``out2_gates_irq=True``.

Transmission is instant: a byte written to THR is output at once, so THR and the transmitter are
empty again right after the write (THRE and TEMT read 1), and the THR-empty interrupt is
re-raised, lowering the line and raising it again so an edge-triggered interrupt controller
sees a new edge (as QEMU does). The bytes go to ``stream`` (flushed at each newline) and the
newest ``limit`` bytes are kept in :attr:`captured`: a guest flooding the port costs bounded
memory.

Reception: the host calls :meth:`feed` from any thread (the machine's stdin reader). The
receiver holds 16 bytes with FIFOs enabled, 1 byte (RBR) without. A byte arriving at a full
receiver is an overrun: LSR.OE is set, and the byte is lost (FIFO mode: the FIFO keeps its
bytes) or replaces the unread RBR byte (16450 mode), as the datasheet says. A flood from the
host therefore never holds more than 16 bytes; a host that would rather not lose input waits for
room with :meth:`wait_for_space`, as QEMU's character backend waits on ``can_receive``.
Data-available is signalled once the FIFO reaches its trigger level; below it, the datasheet's
character timeout (IIR 0xC, after four character times without activity) is reported at once,
since this model has no line timing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import BinaryIO

from .base import DEFAULT_CAPTURE_LIMIT, ConsoleDevice, ConsoleOutput, Irq, IrqLine, field, hex_field

COM1_PORT = 0x3F8
COM1_IRQ = 4
COM2_PORT = 0x2F8
COM2_IRQ = 3
FIFO_SIZE = 16

# register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C  # character timeout (FIFO mode)
IIR_FIFO = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_KEPT = 0xC9  # the bits FCR keeps: enable, DMA mode, trigger level
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_NO_MODEM = MSR_DCD | MSR_DSR | MSR_CTS  # what QEMU reports without a modem


class Uart16550(ConsoleDevice):
    """A 16550A UART at ``port`` (8 ports) raising its interrupt through ``irq``."""

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        port: int = COM1_PORT,
        irq: Irq | None = None,
        limit: int = DEFAULT_CAPTURE_LIMIT,
        out2_gates_irq: bool = False,
    ) -> None:
        super().__init__()
        self.ports = ((port, 8),)
        self.base = port
        self.output = ConsoleOutput(stream, limit)
        self.line = IrqLine(irq)
        self.out2_gates_irq = out2_gates_irq
        self._space = threading.Condition(self._lock)
        self.overruns = 0  # bytes lost to a full receiver
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.divisor = 0
        self._rx: deque[int] = deque()
        self._rbr = 0  # the last byte read (16450 mode reads it again when RBR is empty)
        self._line_errors = 0  # LSR OE/PE/FE/BI, cleared by reading LSR
        self._thr_ipending = False
        self._msr_lines = MSR_NO_MODEM
        self._msr_delta = 0

    # ---- host side ----------------------------------------------------------------------------


    @property
    def irq_level(self) -> int:
        return self.line.level

    def feed(self, data: bytes) -> int:
        """Bytes arriving on the serial line (thread-safe). Returns how many found room in the
        receiver; each of the others was an overrun (LSR.OE set, the byte lost)."""
        with self._lock:
            if self.mcr & MCR_LOOP:
                return 0  # loopback disconnects the line input
            taken = sum(self._receive(b) for b in data)
            self._update()
            return taken

    def space(self) -> int:
        """How many bytes the receiver can take now without an overrun."""
        with self._lock:
            return self._room()

    def wait_for_space(self, timeout: float | None = None) -> int:
        """Block until the guest has made room in the receiver (or ``timeout`` passed); return
        the room. A host feeder that loops ``feed(data[:wait_for_space()])`` never overruns."""
        with self._space:
            self._space.wait_for(self._room, timeout)
            return self._room()

    # ---- state --------------------------------------------------------------------------------
    def save(self) -> dict:
        # IIR is not a register of its own: it follows from IER, the FIFO, the line errors, the
        # THRE flag and the modem deltas, so those are what is kept.
        with self._lock:
            return {"written": self.output.capture.total, "ier": self.ier, "fcr": self.fcr, "lcr": self.lcr,
                    "mcr": self.mcr, "scr": self.scr, "divisor": self.divisor, "rx": bytes(self._rx).hex(), "rbr": self._rbr,
                    "line_errors": self._line_errors, "thr_ipending": self._thr_ipending,
                    "msr_lines": self._msr_lines, "msr_delta": self._msr_delta, "irq": self.line.level}

    def restore(self, state: dict) -> None:
        byte = {name: field(state, name, int, limit=0x100)
                for name in ("ier", "fcr", "lcr", "mcr", "scr", "rbr", "line_errors", "msr_lines", "msr_delta")}
        divisor = field(state, "divisor", int, limit=0x10000)
        rx = hex_field(state, "rx")
        if len(rx) > (FIFO_SIZE if byte["fcr"] & FCR_ENABLE else 1):
            raise ValueError(f"saved field 'rx' holds {len(rx)} bytes, more than the receiver takes")
        thr_ipending = field(state, "thr_ipending", bool)
        irq = field(state, "irq", int, limit=2)
        with self._lock:
            self._restore_console(state)
            self.ier, self.fcr, self.lcr = byte["ier"] & 0x0F, byte["fcr"] & FCR_KEPT, byte["lcr"]
            self.mcr, self.scr, self._rbr = byte["mcr"] & 0x1F, byte["scr"], byte["rbr"]
            self.divisor, self._rx = divisor, deque(rx)
            self._line_errors, self._thr_ipending = byte["line_errors"] & LSR_ERRORS, thr_ipending
            self._msr_lines, self._msr_delta = byte["msr_lines"] & 0xF0, byte["msr_delta"] & 0x0F
            self.line.set(irq)
            self._space.notify_all()

    # ---- receiver -----------------------------------------------------------------------------
    def _capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _room(self) -> int:
        return max(0, self._capacity() - len(self._rx))

    def _receive(self, byte: int) -> bool:
        if len(self._rx) < self._capacity():
            self._rx.append(byte)
            return True
        self._line_errors |= LSR_OE
        self.overruns += 1
        if not self.fcr & FCR_ENABLE:
            self._rx[0] = byte  # 16450 mode: the new byte destroys the unread one
        return False

    def _read_rbr(self) -> int:
        if self._rx:
            self._rbr = self._rx.popleft()
            self._space.notify_all()
            return self._rbr
        return 0 if self.fcr & FCR_ENABLE else self._rbr

    # ---- interrupts ---------------------------------------------------------------------------
    def _pending(self) -> int:
        """The IIR source bits of the highest-priority enabled pending interrupt, or IIR_NO_INT."""
        ier = self.ier
        if ier & IER_RLSI and self._line_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if not self.fcr & FCR_ENABLE:
                return IIR_RDI
            trigger = TRIGGER_LEVELS[self.fcr >> 6]
            return IIR_RDI if len(self._rx) >= trigger else IIR_CTI
        if ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update(self) -> None:
        level = self._pending() != IIR_NO_INT
        if self.out2_gates_irq and (not self.mcr & MCR_OUT2 or self.mcr & MCR_LOOP):
            level = False
        self.line.set(level)

    def _set_msr_lines(self, lines: int) -> None:
        changed = lines ^ self._msr_lines
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if changed & MSR_RI and not lines & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge of RI
        self._msr_lines = lines

    # ---- registers ----------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        reg = port - self.base
        dlab = self.lcr & LCR_DLAB
        if reg == RBR:
            if dlab:
                return self.divisor & 0xFF
            value = self._read_rbr()
            self._update()
            return value
        if reg == IER:
            return self.divisor >> 8 if dlab else self.ier
        if reg == IIR:
            source = self._pending()
            if source == IIR_THRI:
                self._thr_ipending = False  # reading IIR that reports THRE clears it
                self._update()
            return source | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = LSR_THRE | LSR_TEMT | self._line_errors | (LSR_DR if self._rx else 0)
            if self._line_errors:
                self._line_errors = 0
                self._update()
            return value
        if reg == MSR:
            value = self._msr_lines | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update()
            return value
        return self.scr

    def write(self, port: int, size: int, value: int):
        reg = port - self.base
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif reg == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                changed = (self.ier ^ value) & IER_THRI
                self.ier = value & 0x0F
                if changed:
                    # THR is always empty here (transmission is instant), so enabling ETBEI
                    # raises the THRE interrupt at once; disabling it forgets it.
                    self._thr_ipending = bool(self.ier & IER_THRI)
                self._update()
        elif reg == FCR:
            if (value ^ self.fcr) & FCR_ENABLE:
                self._rx.clear()  # switching between FIFO and 16450 mode empties the FIFOs
            if value & FCR_ENABLE:
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
                self.fcr = value & FCR_KEPT
            else:
                self.fcr = 0
            self._space.notify_all()
            self._update()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
            self._update_modem_lines()
            self._update()
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only (the datasheet reserves LSR writes for factory test).

    def _transmit(self, byte: int) -> None:
        self._thr_ipending = False
        self._update()
        if self.mcr & MCR_LOOP:
            self._receive(byte)
        else:
            self.output.emit(bytes((byte,)))
        self._thr_ipending = True  # THR (and the shift register) empty again
        self._update()

    def _update_modem_lines(self) -> None:
        mcr = self.mcr
        if mcr & MCR_LOOP:
            lines = (
                (MSR_CTS if mcr & MCR_RTS else 0)
                | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0)
                | (MSR_DCD if mcr & MCR_OUT2 else 0)
            )
        else:
            lines = MSR_NO_MODEM
        self._set_msr_lines(lines)
