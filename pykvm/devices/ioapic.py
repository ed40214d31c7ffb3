"""An 82093AA I/O APIC in Python, for KVM's split irqchip (the local APICs stay in the kernel).

Register-level behaviour after the Intel 82093AA I/O Advanced Programmable Interrupt Controller
datasheet (290566-001), "3.0 Register Description", with the choices KVM's in-kernel IOAPIC
(``arch/x86/kvm/ioapic.c``) and QEMU's ``hw/intc/ioapic.c`` make where the datasheet leaves room.

Memory-mapped at 0xFEC00000 (4 KiB), two 32-bit registers and, on version 0x20, a third:

======  ========  ==========================================================================
offset  name      use
======  ========  ==========================================================================
0x00    IOREGSEL  bits 0-7 select the register that IOWIN reads and writes
0x10    IOWIN     the selected register
0x40    EOI       (version 0x20 only) write a vector: as an EOI broadcast for that vector
======  ========  ==========================================================================

Registers behind IOWIN:

=========  ============  ===================================================================
index      name          bits
=========  ============  ===================================================================
0x00       IOAPICID      24-27 the APIC ID (read/write)
0x01       IOAPICVER     0-7 version (0x11 or 0x20), 16-23 the highest redirection entry (23)
0x02       IOAPICARB     24-27 the arbitration ID (read-only; loaded from the ID)
0x10-0x3F  IOREDTBL0-23  two registers per pin (low dword at 0x10 + 2 * pin): 0-7 vector,
                         8-10 delivery mode, 11 destination mode (1 logical), 12 delivery
                         status (read-only), 13 polarity (1 active low), 14 remote IRR
                         (read-only), 15 trigger mode (1 level), 16 mask; 56-63 destination
=========  ============  ===================================================================

Other indices read 0 and ignore writes. Accesses narrower than 32 bits read and write the
addressed bytes of a register (a byte write to IOREGSEL is the usual one); an access that
is not inside IOREGSEL, IOWIN or EOI reads 0 and is dropped. Every entry is masked at reset.

Interrupts: :meth:`Ioapic.set_irq` sets an input pin's level (1 asserted, 0 deasserted; like
KVM_IRQ_LINE, the level is the logical assertion, the polarity bit is stored but not applied,
as in KVM and QEMU). A pin interrupts the local APICs by an MSI built from its redirection
entry (Intel SDM vol. 3, 11.11 "Message Signalled Interrupts")::

    address = 0xFEE00000 | destination << 12 | destination mode << 2
    data    = vector | delivery mode << 8 | 1 << 14 (assert) | trigger mode << 15

handed to the ``signal_msi(address, data)`` callable (the machine passes ``Vm.signal_msi``):

* edge-triggered: delivered on a rising edge of an unmasked pin; an edge on a masked pin is
  lost (the datasheet: "edge-sensitive interrupts signalled on a masked interrupt pin are
  ignored").
* level-triggered: delivered while the pin is asserted, unmasked and remote IRR is clear; the
  delivery sets remote IRR, which :meth:`Ioapic.eoi` (the local APIC's EOI broadcast: KVM's
  ``KVM_EXIT_IOAPIC_EOI``) clears, re-delivering if the pin is still asserted. A pin asserted
  while masked stays pending and is delivered when unmasked. Changing an entry to edge clears
  its remote IRR (as QEMU and KVM).

With the split irqchip the local APIC tells user space of an EOI only for vectors it was told
the IOAPIC handles: KVM takes them from the MSI routes in the first ``args[0]`` GSIs of the
routing table (``KVM_CAP_SPLIT_IRQCHIP``, ``kvm_scan_ioapic_routes``). ``set_routes`` (optional)
is called with ``[(gsi, address, data), ...]``, one MSI route per pin that is unmasked or
level-triggered (GSI = pin; a masked level entry keeps its route so that an EOI after the
guest masked the pin in its handler still exits, as QEMU keeps it), each time the set changes,
for the machine to install with ``KVM_SET_GSI_ROUTING``. Without routes KVM never reports an
EOI, and a level-triggered pin keeps remote IRR set after its first interrupt.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import exits
from .base import Device, field, int_list

IOAPIC_GPA = 0xFEC00000
IOAPIC_SIZE = 0x1000
PINS = 24  # redirection entries; also the GSIs the machine reserves with KVM_CAP_SPLIT_IRQCHIP

IOREGSEL = 0x00
IOWIN = 0x10
EOI = 0x40  # version 0x20 only

REG_ID = 0x00
REG_VER = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

# Redirection entry fields (low dword; the destination is bits 56-63).
VECTOR = 0xFF
DELIVERY_MODE_SHIFT = 8
DEST_MODE = 1 << 11
DELIVERY_STATUS = 1 << 12
POLARITY = 1 << 13
REMOTE_IRR = 1 << 14
TRIGGER_LEVEL = 1 << 15
MASK = 1 << 16
DEST_SHIFT = 56
READ_ONLY = DELIVERY_STATUS | REMOTE_IRR
# Bits software can write: the low dword's 0-16 less the read-only ones, and the destination.
WRITABLE = (0x1FFFF & ~READ_ONLY) | (0xFF << DEST_SHIFT)

MSI_ADDRESS = 0xFEE00000
MSI_DEST_SHIFT = 12
MSI_DEST_MODE_SHIFT = 2
MSI_DELIVERY_MODE_SHIFT = 8
MSI_LEVEL_ASSERT = 1 << 14
MSI_TRIGGER_LEVEL = 1 << 15

SignalMsi = Callable[[int, int], object]
SetRoutes = Callable[[list[tuple[int, int, int]]], object]


def msi_message(entry: int) -> tuple[int, int]:
    """The MSI (address, data) that redirection entry ``entry`` (64 bits) sends."""
    dest = (entry >> DEST_SHIFT) & 0xFF
    address = MSI_ADDRESS | dest << MSI_DEST_SHIFT | (1 if entry & DEST_MODE else 0) << MSI_DEST_MODE_SHIFT
    data = (entry & VECTOR) | ((entry >> DELIVERY_MODE_SHIFT) & 7) << MSI_DELIVERY_MODE_SHIFT | MSI_LEVEL_ASSERT
    if entry & TRIGGER_LEVEL:
        data |= MSI_TRIGGER_LEVEL
    return address, data


class Ioapic(Device):
    """An 82093AA I/O APIC with 24 pins that interrupts through ``signal_msi(address, data)``."""

    def __init__(
        self,
        signal_msi: SignalMsi,
        *,
        set_routes: SetRoutes | None = None,
        id: int = 0,
        version: int = 0x11,
        gpa: int = IOAPIC_GPA,
    ) -> None:
        super().__init__()
        if version not in (0x11, 0x20):
            raise ValueError(f"IOAPIC version must be 0x11 or 0x20, not {version:#x}")
        if not 0 <= id <= 0xF:
            raise ValueError(f"IOAPIC ID must be 0-15, not {id}")
        self.signal_msi = signal_msi
        self.set_routes = set_routes
        self.version = version
        self.gpa = gpa
        self.mmio_ranges = ((gpa, IOAPIC_SIZE),)
        self.id = id
        self.ioregsel = 0
        self.redirection = [MASK] * PINS
        self.lines = 0  # input pin levels, bit per pin
        self.irr = 0  # pins with an interrupt to deliver (level: asserted; edge: a latched edge)
        self.delivered = 0  # messages sent (statistics and tests)
        self._routes: list[tuple[int, int, int]] | None = None

    def __repr__(self) -> str:
        return f"<Ioapic {self.gpa:#x} version={self.version:#x} lines={self.lines:#08x} irr={self.irr:#08x}>"

    # ---- state --------------------------------------------------------------------------------
    def save(self) -> dict:
        with self._lock:
            return {"id": self.id, "ioregsel": self.ioregsel, "redirection": list(self.redirection),
                    "lines": self.lines, "irr": self.irr}

    def restore(self, state: dict) -> None:
        id = field(state, "id", int, limit=0x10)
        ioregsel = field(state, "ioregsel", int, limit=0x100)
        redirection = int_list(state, "redirection", PINS, limit=1 << 64)
        lines = field(state, "lines", int, limit=1 << PINS)
        irr = field(state, "irr", int, limit=1 << PINS)
        with self._lock:
            self.id, self.ioregsel, self.lines, self.irr = id, ioregsel, lines, irr
            self.redirection = [entry & (WRITABLE | READ_ONLY) for entry in redirection]
            # Nothing to deliver: a saved IRR bit is one the entry holds back (masked, remote IRR).
            # KVM learns the EOI routes again, as after the guest's own writes.
            self._publish_routes()

    # ---- the interrupt inputs -----------------------------------------------------------------
    def set_irq(self, pin: int, level: int) -> None:
        """Set input ``pin`` to ``level`` (1 asserted, 0 deasserted), from any thread."""
        if not 0 <= pin < PINS:
            raise ValueError(f"IOAPIC pin must be 0-{PINS - 1}, not {pin}")
        bit = 1 << pin
        with self._lock:
            old = self.lines & bit
            self.lines = self.lines | bit if level else self.lines & ~bit
            entry = self.redirection[pin]
            if entry & TRIGGER_LEVEL:
                self.irr = self.irr | bit if level else self.irr & ~bit
            elif level and not old and not entry & MASK:
                self.irr |= bit  # a rising edge; one on a masked pin is ignored (82093AA)
            self._service(pin)

    def irq(self, pin: int) -> Callable[[int], None]:
        """A device's interrupt output wired to ``pin``: ``irq(pin)(level)``."""
        if not 0 <= pin < PINS:
            raise ValueError(f"IOAPIC pin must be 0-{PINS - 1}, not {pin}")
        return lambda level: self.set_irq(pin, level)

    def eoi(self, vector: int) -> None:
        """An EOI for ``vector`` from a local APIC: clear remote IRR of the level-triggered entries
        with that vector and deliver again those whose pin is still asserted."""
        with self._lock:
            self._eoi(vector & 0xFF)

    def eoi_exit(self, exit: exits.IoapicEoi, vcpu=None) -> None:
        """A handler for ``KVM_EXIT_IOAPIC_EOI`` (``Machine.on_exit(exits.IoapicEoi, ...)``)."""
        self.eoi(exit.vector)

    def _eoi(self, vector: int) -> None:
        for pin, entry in enumerate(self.redirection):
            if entry & VECTOR == vector and entry & REMOTE_IRR:
                self.redirection[pin] = entry & ~REMOTE_IRR
                self._service(pin)

    def _service(self, pin: int) -> None:
        """Deliver ``pin``'s interrupt if it has one and may send it now (lock held)."""
        bit = 1 << pin
        entry = self.redirection[pin]
        if not self.irr & bit or entry & MASK:
            return
        if entry & TRIGGER_LEVEL:
            if entry & REMOTE_IRR:
                return
            self.redirection[pin] = entry | REMOTE_IRR
        else:
            self.irr &= ~bit
        self.delivered += 1
        self.signal_msi(*msi_message(entry))

    # ---- registers ----------------------------------------------------------------------------
    def mmio(self, exit, vcpu=None) -> None:
        """Answer an :class:`~pykvm.exits.MmioRead` / :class:`~pykvm.exits.MmioWrite` exit."""
        offset = exit.gpa - self.gpa
        reg, shift = offset & ~3, 8 * (offset & 3)
        size = len(exit.data)
        known = reg in (IOREGSEL, IOWIN) or (reg == EOI and self.version == 0x20)
        fits = (offset & 3) + size <= 4
        width = (1 << (8 * size)) - 1
        with self._lock:
            if isinstance(exit, exits.MmioRead):
                exit.reply((self._read_register(reg) >> shift) & width if known and fits else 0)
                return
            if not (known and fits):
                return
            value = exit.value
            if size < 4:  # merge the bytes written into the register's current value
                old = self._read_register(reg) if reg != EOI else 0
                value = (old & ~(width << shift) | value << shift) & 0xFFFFFFFF
            self._write_register(reg, value)

    def _read_register(self, reg: int) -> int:
        if reg == IOREGSEL:
            return self.ioregsel
        if reg == IOWIN:
            return self.read_indexed(self.ioregsel)
        return 0  # EOI is write-only

    def _write_register(self, reg: int, value: int) -> None:
        if reg == IOREGSEL:
            self.ioregsel = value & 0xFF
        elif reg == IOWIN:
            self.write_indexed(self.ioregsel, value)
        elif reg == EOI:
            self._eoi(value & 0xFF)

    def read_indexed(self, index: int) -> int:
        """The 32-bit register at ``index`` (what IOWIN reads after IOREGSEL = index)."""
        if index == REG_ID:
            return self.id << 24
        if index == REG_VER:
            return (PINS - 1) << 16 | self.version
        if index == REG_ARB:
            return self.id << 24
        if REG_REDTBL <= index < REG_REDTBL + 2 * PINS:
            entry = self.redirection[(index - REG_REDTBL) >> 1]
            return entry >> 32 if index & 1 else entry & 0xFFFFFFFF
        return 0

    def write_indexed(self, index: int, value: int) -> None:
        """Write the 32-bit register at ``index`` (what IOWIN does after IOREGSEL = index)."""
        value &= 0xFFFFFFFF
        if index == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        if not REG_REDTBL <= index < REG_REDTBL + 2 * PINS:
            return  # VER, ARB and the reserved indices are read-only
        pin = (index - REG_REDTBL) >> 1
        old = self.redirection[pin]
        if index & 1:
            new = (old & 0xFFFFFFFF) | value << 32
        else:
            new = (old & ~0xFFFFFFFF) | value
        entry = (new & WRITABLE) | (old & READ_ONLY)
        if not entry & TRIGGER_LEVEL:
            entry &= ~REMOTE_IRR  # an edge entry has no remote IRR
        self.redirection[pin] = entry
        bit = 1 << pin
        if entry & TRIGGER_LEVEL:
            self.irr = self.irr | bit if self.lines & bit else self.irr & ~bit
        elif (old & TRIGGER_LEVEL) or (entry & MASK):
            self.irr &= ~bit  # no edge latched across a switch to edge, nor on a masked pin
        self._publish_routes()
        self._service(pin)

    def _publish_routes(self) -> None:
        if self.set_routes is None:
            return
        routes = [(pin, *msi_message(entry)) for pin, entry in enumerate(self.redirection)
                  if not entry & MASK or entry & TRIGGER_LEVEL]
        if routes != self._routes:
            self.set_routes(routes)
            self._routes = routes
