"""QEMU's ``pc-testdev``: the ISA test device kvm-unit-tests drives on x86 (``-device pc-testdev``).

Every region as QEMU's ``hw/misc/pc-testdev.c`` defines it:

* 0xE0-0xE3 ``pc-testdev-ioport``: one 32-bit data register. An access of ``size`` bytes at
  0xE0 + k reads or writes bytes k .. k + size - 1 of it (QEMU's mask ``(~0 >> (32 - bits)) <<
  8k``, truncated to 32 bits), so ``out %al/%ax/%eax, $0xe0`` followed by ``in`` of the same
  width reads the value back -- ``x86/realmode.c``'s ``test_io`` checks exactly that, in big
  real mode, for 8, 16 and 32 bits, with immediate and DX port numbers.
* 0xE4-0xE7 ``pc-testdev-flush-page``: a 32-bit write names a guest-physical address; QEMU
  ``mprotect``s the host page behind it to PROT_NONE and back, so KVM drops its mapping (the
  MMU notifier zaps the EPT/NPT or shadow entry) and the next guest access faults it in again.
  ``x86/eventinj.c`` uses it to make the stack page of an IRET fault in the middle of NMI
  delivery. Here the write calls ``flush_page(gpa & ~0xFFF)`` if the machine gave one (which
  can do the same mprotect on its mapping of guest RAM) and is otherwise a no-op: the guest
  still runs correctly, only that test's fault path goes untested. Reads return 0. QEMU accepts
  only 4-byte accesses here; narrower writes are dropped, as QEMU's memory core drops them.
* 0xE8-0xEB ``pc-testdev-ioport-byte``: the same data register as 0xE0, but QEMU implements
  this region with byte accesses only (``impl.max_access_size = 1``), so a 16- or 32-bit access
  is split into byte accesses at consecutive ports (the result is the same for accesses that
  stay within the four ports; bytes past 0xEB are dropped / read 0xFF).
* 0x2000-0x2017 ``pc-testdev-irq-line``: a byte write of ``v`` at 0x2000 + n sets ISA interrupt
  line n to ``v != 0`` (``qemu_set_irq(isa_get_irq(isa, n), !!v)``); reads return 0. This is
  kvm-unit-tests' ``set_irq_line(line, level)`` (``lib/x86/apic.c``), which ``x86/ioapic.c``
  uses to raise and lower lines 0x0E and 0x0D for its edge / level / coalescing tests.
  ``irq(n)`` must return the callable for line n (``Machine.irq`` does); it is called with the
  level on every write, even a repeated one, as QEMU's ``qemu_set_irq`` is (a repeated 1 on a
  level-triggered IOAPIC pin whose Remote IRR is clear delivers the interrupt again, and
  ``test_ioapic_level_sequential`` counts on that). Lines 16-23 exist in the region, but QEMU
  asserts on them (``isa_get_irq`` has 16 ISA lines); here they reach ``irq(n)`` too, which on
  pykvm's ``pc`` is I/O APIC pin n. :attr:`PcTestdev.levels` remembers the last level per line.
  Only 1-byte writes count (QEMU: ``valid.max_access_size = 1``).
* MMIO 0xFF000000-0xFF00FFFF ``pc-testdev-iomem``: 64 KiB of plain little-endian memory behind
  MMIO exits (reads return what was written, initially 0), for tests of MMIO emulation.
"""

from __future__ import annotations

from typing import Callable

from .. import exits
from .base import Device, Irq, field, hex_field, int_list

IOPORT = 0xE0
FLUSH_PORT = 0xE4
IOPORT_BYTE = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_GPA = 0xFF000000
IOMEM_LEN = 0x10000
PAGE_MASK = ~0xFFF


class PcTestdev(Device):
    """``pc-testdev``: ports 0xE0-0xEB and 0x2000-0x2017, MMIO 0xFF000000 + 64 KiB."""

    byte_registers = False  # 0xE0 takes whole accesses; 0xE8 is split here, as QEMU splits it

    def __init__(
        self,
        *,
        irq: Callable[[int], Irq | None] | None = None,
        flush_page: Callable[[int], None] | None = None,
        iomem_gpa: int = IOMEM_GPA,
    ) -> None:
        super().__init__()
        self.ports = ((IOPORT, 4), (FLUSH_PORT, 4), (IOPORT_BYTE, 4), (IRQ_PORT, IRQ_LINES))
        self.mmio_ranges = ((iomem_gpa, IOMEM_LEN),)
        self.iomem_gpa = iomem_gpa
        self._irq_factory = irq
        self._lines: dict[int, Irq | None] = {}
        self.flush_page = flush_page
        self.data = 0  # the 32-bit test register behind 0xE0 and 0xE8
        self.levels = [0] * IRQ_LINES
        self.flushed: list[int] = []  # pages named at 0xE4, newest last (the last 16)
        self.iomem = bytearray(IOMEM_LEN)

    # ---- state --------------------------------------------------------------------------------
    def save(self) -> dict:
        with self._lock:
            return {"data": self.data, "levels": list(self.levels), "flushed": list(self.flushed),
                    "iomem": self.iomem.hex()}

    def restore(self, state: dict) -> None:
        data = field(state, "data", int, limit=1 << 32)
        levels = int_list(state, "levels", IRQ_LINES, limit=2)
        flushed = field(state, "flushed", list)
        if len(flushed) > 16 or not all(isinstance(p, int) and not isinstance(p, bool) for p in flushed):
            raise ValueError("saved field 'flushed' is not a list of at most 16 page addresses")
        iomem = hex_field(state, "iomem", IOMEM_LEN)
        with self._lock:
            self.data, self.flushed, self.iomem[:] = data, list(flushed), iomem
            for n, level in enumerate(levels):
                if level != self.levels[n]:  # the lines as the guest left them
                    self.levels[n] = level
                    line = self._line(n)
                    if line is not None:
                        line(level)

    # ---- the data register --------------------------------------------------------------------
    def _data_read(self, offset: int, size: int) -> int:
        shift = 8 * (offset & 3)
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
        return (self.data & mask) >> shift

    def _data_write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * (offset & 3)
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
        self.data = (self.data & ~mask | (value << shift) & mask) & 0xFFFFFFFF

    def _line(self, n: int) -> Irq | None:
        if n not in self._lines:
            self._lines[n] = self._irq_factory(n) if self._irq_factory is not None else None
        return self._lines[n]

    # ---- ports --------------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        if IOPORT <= port < IOPORT + 4:
            return self._data_read(port - IOPORT, size)
        if IOPORT_BYTE <= port < IOPORT_BYTE + 4:
            value = 0
            for i in range(size):
                byte = self._data_read(port + i - IOPORT_BYTE, 1) if port + i < IOPORT_BYTE + 4 else 0xFF
                value |= byte << (8 * i)
            return value
        return 0  # the flush and irq-line regions read 0

    def write(self, port: int, size: int, value: int) -> None:
        if IOPORT <= port < IOPORT + 4:
            self._data_write(port - IOPORT, size, value)
        elif IOPORT_BYTE <= port < IOPORT_BYTE + 4:
            for i in range(size):
                if port + i < IOPORT_BYTE + 4:
                    self._data_write(port + i - IOPORT_BYTE, 1, value >> (8 * i))
        elif FLUSH_PORT <= port < FLUSH_PORT + 4:
            if size == 4:
                page = value & PAGE_MASK & 0xFFFFFFFF
                self.flushed = self.flushed[-15:] + [page]
                if self.flush_page is not None:
                    self.flush_page(page)
        elif IRQ_PORT <= port < IRQ_PORT + IRQ_LINES and size == 1:
            n = port - IRQ_PORT
            level = 1 if value else 0
            self.levels[n] = level
            line = self._line(n)
            if line is not None:
                line(level)
        return None

    # ---- the I/O memory window ----------------------------------------------------------------
    def mmio(self, exit, vcpu=None) -> None:
        offset = exit.gpa - self.iomem_gpa
        size = len(exit.data)
        with self._lock:
            if isinstance(exit, exits.MmioRead):
                chunk = bytes(self.iomem[offset : offset + size]).ljust(size, b"\0")
                exit.data[:size] = chunk
                return None
            data = bytes(exit.data)[: max(0, IOMEM_LEN - offset)]
            self.iomem[offset : offset + len(data)] = data
            return None
