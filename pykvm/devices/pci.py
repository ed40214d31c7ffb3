"""PCI for a QEMU ``pc``-like platform: the host bridge's configuration mechanisms, bus 0, BARs, INTx, MSI, MSI-X.

What is modelled, and after which source (register behaviour checked against QEMU's
``hw/pci/pci.c``, ``hw/pci/pci_host.c``, ``hw/pci/pcie_host.c``, ``hw/pci/msi.c``,
``hw/pci/msix.c``, ``hw/pci-host/i440fx.c``, ``hw/isa/piix3.c`` and SeaBIOS ``src/fw/pciinit.c``):

Configuration mechanism #1 (:class:`PciHost`, ports 0xCF8-0xCFF)
    0xCF8 is the 32-bit CONFIG_ADDRESS register: bit 31 enable, 16-23 bus, 11-15 device, 8-10
    function, 0-7 register. Only a 32-bit write at 0xCF8 sets it (QEMU ignores narrower ones);
    it reads back as written, at any width. 0xCF9 (byte accesses) is the PIIX3 reset control
    register: bit 1 (system reset) is kept, writing bit 2 calls ``reset()`` if one was given.
    0xCFC-0xCFF is CONFIG_DATA: an 8/16/32-bit access at 0xCFC + k reaches register
    ``(CONFIG_ADDRESS | k) & 0xFF`` -- OR, as QEMU's ``pci_host_data_read``, so the low bits of
    CONFIG_ADDRESS count (kvm-unit-tests puts unaligned register numbers there). An access
    running past 0xFF is cut there. With bit 31 clear, or no function at that address, a read
    returns all ones and a write is dropped.

ECAM (PCIe enhanced configuration access, ``ecam_base``, default 0xE0000000)
    256 buses x 32 devices x 8 functions x 4 KiB = 256 MiB of MMIO; the offset is
    ``bus << 20 | device << 15 | function << 12 | register``. 1-, 2- and 4-byte accesses (an
    8-byte one is two 4-byte ones). Every function has a 4 KiB configuration space here; the
    extended part (0x100-0xFFF) reads 0 (an empty extended-capability list) and ignores writes,
    except what a device defines. (QEMU answers all ones beyond 0x100 for a conventional PCI
    function; pykvm treats every function as having the 4 KiB space.) ``ecam_base``,
    ``ecam_size``, ``ecam_bus_start`` and ``ecam_bus_end`` are what an ACPI MCFG describes.
    QEMU's ``pc`` (i440FX) machine has no ECAM, its ``q35`` has; pykvm offers both mechanisms
    on one bus 0, and ``ecam_base=None`` leaves ECAM out.

Configuration header (type 0), per function, masks as QEMU's ``pci_init_wmask`` / ``w1cmask``
    vendor, device, revision, class, header type, subsystem IDs, capability pointer, interrupt
    pin: read-only. Command: bits 0 I/O, 1 memory, 2 bus master, 8 SERR#, 10 INTx disable
    writable. Status: bits 8, 11-15 write-1-to-clear, bit 3 (interrupt status) and bit 4
    (capability list) read-only. Cache line size, latency timer and interrupt line: writable
    (QEMU hardwires the latency timer to 0; PCI 3.0 lets it be writable, as here). BARs: the
    address bits above the size writable, the type bits read-only, so writing all ones reads
    back ``~(size - 1) | flags`` (64-bit BARs: both dwords). 0x40-0xFF: writable device-specific
    space (QEMU's default) except the capabilities, which are read-only but for their control
    fields. Subsystem vendor/device default to 0x1AF4:0x1100 as QEMU's
    ``pci_set_default_subsystem_id``.

BAR decoding (QEMU's ``pci_bar_address`` / ``pci_update_mappings``)
    An I/O BAR decodes while command bit 0 is set, a memory BAR while bit 1 is; an address of 0,
    a range that wraps, a 32-bit BAR reaching 0xFFFFFFFF, or an I/O range past 0xFFFF (the bus
    has 64 KiB of ports) does not decode -- so sizing a live BAR unmaps it until it is written
    back. :class:`PciHost` keeps the :class:`~pykvm.devices.bus.Bus` routes in step: a BAR that
    moves, or whose decoding is turned off, has its route removed and (if it decodes) added at
    the new place. A BAR that would overlap another route stays unmapped until it no longer
    does (QEMU would layer them by priority).

Bus 0 (QEMU ``pc``)
    00.0 :class:`I440fxHostBridge` (8086:1237 rev 2, class 0x060000), 01.0
    :class:`Piix3IsaBridge` (8086:7000, class 0x060100, header type 0x80: multi-function, as
    QEMU creates it with ``pci_create_simple_multifunction``; its IDE/USB/ACPI functions are
    not modelled and read all ones). :meth:`PciHost.add` puts further functions in the next free
    slot (from 2) or where asked.

INTx (i440FX / PIIX3)
    A function's pin (1-4 = INTA#-INTD#) reaches PIRQ ``(pin - 1 + slot - 1) & 3`` (QEMU's
    ``pci_slot_get_pirq``); PIIX3 registers 0x60-0x63 (PIRQRC[A-D], 0x80 = disabled at reset)
    route each PIRQ to an ISA IRQ, which is the GSI. A GSI's level is the OR of every asserted
    function behind every PIRQ routed to it (QEMU's ``piix3_set_irq_level``); the host calls
    ``irq(gsi)`` once per GSI to get the level callable and calls it only on changes. A
    function's line counts as asserted while it holds it (:meth:`PciFunction.set_irq`), command
    bit 10 is clear and neither MSI nor MSI-X is enabled; status bit 3 shows the raw level.

MSI (capability 0x05, ``hw/pci/msi.c``)
    32- or 64-bit address, 1-32 vectors, optional per-vector masking (mask and pending bits).
    Message control bits 0 (enable) and 4-6 (multiple message enable, clamped to the capable
    count) are writable. :meth:`PciFunction.msi_notify` sends ``signal_msi(address, data)`` with
    the vector in the low data bits; a masked vector sets its pending bit, and unmasking
    delivers it.

MSI-X (capability 0x11, ``hw/pci/msix.c``)
    The table (16 bytes a vector: address low/high, data, vector control bit 0 = mask, masked at
    reset) and the PBA (one bit a vector, read-only) live in BARs the function declared.
    Message control bit 15 enables, bit 14 masks the whole function. A vector signalled while
    masked (by its entry, by the function mask) sets its pending bit; unmasking it delivers it
    and clears the bit. Signalling while MSI-X is disabled does nothing.

Both kinds of message are memory writes by the function, so they are dropped while its bus
master bit (command bit 2) is clear (QEMU sends them through the bus-master address space).

Firmware assignment (:meth:`PciHost.assign_resources`, SeaBIOS's ``pci_setup``)
    pykvm loads ``-kernel`` guests without a BIOS, so the host does what SeaBIOS would have:
    PIRQ[A-D] -> IRQ 10, 10, 11, 11 (SeaBIOS ``pci_irqs`` / ``piix_isa_bridge_setup``), each
    function's interrupt line set to its routed IRQ, I/O BARs packed from 0xC000 and memory
    BARs from :data:`~pykvm.x86.layout.MMIO_WINDOW` (0xD0000000) up to the ECAM window, largest
    first, each naturally aligned, and the command register's I/O / memory bits set for
    functions with such BARs (and bus master, as pykvm's choice: SeaBIOS sets I/O, memory and
    SERR# and leaves bus mastering to drivers).

Locking: the host's lock covers CONFIG_ADDRESS; each function has a re-entrant lock over its
configuration space and registers (held while its BAR handlers run, so a device may call
:meth:`~PciFunction.set_irq` or :meth:`~PciFunction.notify` from them); route and INTx
bookkeeping have locks of their own, taken after a function's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .. import exits
from ..outcome import Outcome
from ..x86.layout import MMIO_WINDOW
from .base import Device, IrqLine, field, hex_field

# ---- configuration header offsets and bits (PCI Local Bus 3.0, 6.2) ------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BASE_ADDRESS_0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_SIZE = 0x40

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WMASK = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_DEVSEL_MEDIUM = 1 << 9
STATUS_W1C = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)

HEADER_TYPE_MULTI_FUNCTION = 0x80

BAR_SPACE_IO = 0x01
BAR_MEM_TYPE_64 = 0x04
BAR_MEM_PREFETCH = 0x08

CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11

MSI_FLAGS_ENABLE = 0x0001
MSI_FLAGS_QMASK = 0x000E  # multiple message capable (log2)
MSI_FLAGS_QSIZE = 0x0070  # multiple message enable (log2)
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_MASKBIT = 0x0100

MSIX_FLAGS_QSIZE = 0x07FF
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_ENABLE = 0x8000
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_CTRL_MASKBIT = 1

CONFIG_SPACE_SIZE = 0x100  # what mechanism #1 reaches
EXT_CONFIG_SPACE_SIZE = 0x1000  # what ECAM reaches

# ---- the platform --------------------------------------------------------------------------------
CONFIG_ADDRESS_PORT = 0xCF8
RESET_CONTROL_PORT = 0xCF9  # PIIX3 RCR
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 1 << 31
RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04

ECAM_BASE = 0xE0000000
ECAM_BUS_SIZE = 1 << 20

PCI_IO_BASE = 0xC000  # SeaBIOS's I/O window for the root bus of pc
PCI_IO_LIMIT = 0x10000
PCI_MEM_BASE = MMIO_WINDOW  # guest RAM is below it
PCI_MEM_LIMIT = 0xFEC00000  # the IOAPIC; used when there is no ECAM window to stop at

SEABIOS_PCI_IRQS = (10, 10, 11, 11)  # SeaBIOS pciinit.c pci_irqs[]: PIRQA-D
PIIX_PIRQC = 0x60  # PIIX3 PIRQRC[A-D]
PIIX_NUM_PIRQS = 4
ISA_NUM_IRQS = 16

FIRST_FREE_SLOT = 2
SLOTS = 32
FUNCTIONS = 8

BAR_KINDS = ("mem32", "mem64", "io")

IrqFactory = Callable[[int], Callable[[int], None]]
SignalMsi = Callable[[int, int], object]


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


@dataclass
class Bar:
    """One declared BAR: ``size`` bytes (a power of two) of ``kind`` "mem32", "mem64" or "io"."""

    index: int
    size: int
    kind: str
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    @property
    def is_64(self) -> bool:
        return self.kind == "mem64"

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.is_io:
            return BAR_SPACE_IO
        return (BAR_MEM_TYPE_64 if self.is_64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)


class Mapping(NamedTuple):
    """Where a BAR decodes now: ``space`` "io" or "mem", the first address, the size."""

    space: str
    address: int
    size: int


class PciFunction(Device):
    """One PCI function (type 0 header) with a configuration space builder.

    A subclass sets the class attributes (or passes them to ``__init__``), declares its BARs with
    :meth:`declare_bar` and capabilities with :meth:`add_capability` / :meth:`add_msi` /
    :meth:`add_msix` in its ``__init__``, and answers its BARs in :meth:`bar_read` /
    :meth:`bar_write` (offsets relative to the BAR, accesses of at most ``max_access_size``
    bytes: wider ones arrive split into little-endian pieces, as QEMU's ``impl.max_access_size``).
    A device-specific configuration register is handled by overriding :meth:`write_config`
    (called after the masked write, as a QEMU ``config_write`` that calls the default first).
    """

    qemu_name = ""  # the QEMU type name (``-device <qemu_name>``)
    description = ""  # QEMU's dc->desc
    vendor_id = 0xFFFF
    device_id = 0xFFFF
    revision = 0
    class_code = 0  # 24 bits: class << 16 | subclass << 8 | programming interface
    header_type = 0
    subsystem_vendor_id = 0x1AF4  # PCI_SUBVENDOR_ID_REDHAT_QUMRANET
    subsystem_id = 0x1100  # PCI_SUBDEVICE_ID_QEMU
    interrupt_pin = 0  # 0 none, 1-4 INTA#-INTD#
    max_access_size = 4  # BAR accesses wider than this are split

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self.config = bytearray(EXT_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(EXT_CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(EXT_CONFIG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self.host: PciHost | None = None
        self.slot: int | None = None
        self.function: int | None = None
        self._cap_next = HEADER_SIZE
        self._cap_last_next_ptr = CAPABILITY_LIST
        self._intx_level = 0
        self.msi_cap = 0
        self.msix_cap = 0
        self._msix_vectors = 0
        self._msix_table = bytearray()
        self._msix_pba = bytearray()
        self._msix_table_bar = self._msix_table_off = 0
        self._msix_pba_bar = self._msix_pba_off = 0
        self._build_header()

    # ---- configuration space builder -------------------------------------------------------------
    def _build_header(self) -> None:
        c = self.config
        self._put(VENDOR_ID, 2, self.vendor_id)
        self._put(DEVICE_ID, 2, self.device_id)
        c[REVISION_ID] = self.revision
        self._put(CLASS_PROG, 3, self.class_code)
        c[HEADER_TYPE] = self.header_type
        self._put(SUBSYSTEM_VENDOR_ID, 2, self.subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, self.subsystem_id)
        c[INTERRUPT_PIN] = self.interrupt_pin
        self.set_wmask(COMMAND, 2, COMMAND_WMASK)
        self.w1cmask[STATUS : STATUS + 2] = STATUS_W1C.to_bytes(2, "little")
        for reg in (CACHE_LINE_SIZE, LATENCY_TIMER, INTERRUPT_LINE):
            self.wmask[reg] = 0xFF
        self.wmask[HEADER_SIZE:CONFIG_SPACE_SIZE] = b"\xff" * (CONFIG_SPACE_SIZE - HEADER_SIZE)

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = (value & _mask(size)).to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        """Make the bits of ``mask`` in the ``size``-byte register at ``offset`` guest-writable."""
        self.wmask[offset : offset + size] = (mask & _mask(size)).to_bytes(size, "little")

    def declare_bar(self, index: int, size: int, kind: str = "mem32", prefetchable: bool = False) -> Bar:
        """Declare BAR ``index`` (0-5): ``size`` bytes (a power of two; I/O >= 4, memory >= 16)."""
        if kind not in BAR_KINDS:
            raise ValueError(f"BAR kind must be one of {BAR_KINDS}, not {kind!r}")
        last = index + (1 if kind == "mem64" else 0)
        if not 0 <= index <= last <= 5:
            raise ValueError(f"BAR {index} ({kind}) does not fit in BARs 0-5")
        if self.bars[index] is not None or (kind == "mem64" and self.bars[last] is not None):
            raise ValueError(f"BAR {index} is declared already")
        if index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].is_64:
            raise ValueError(f"BAR {index} is the upper half of 64-bit BAR {index - 1}")
        minimum = 4 if kind == "io" else 16
        if size < minimum or size & (size - 1) or (kind != "mem64" and size > 1 << 31):
            raise ValueError(f"a {kind} BAR's size is a power of two >= {minimum}, not {size:#x}")
        if kind == "io" and size > 0x10000:
            raise ValueError(f"an I/O BAR of {size:#x} bytes does not fit in the 64 KiB of ports")
        if kind == "io" and prefetchable:
            raise ValueError("an I/O BAR is not prefetchable")
        bar = Bar(index, size, kind, prefetchable)
        self.bars[index] = bar
        reg = BASE_ADDRESS_0 + 4 * index
        wmask = ~(size - 1)
        self._put(reg, 4, bar.flags)
        if bar.is_64:
            self.set_wmask(reg, 8, wmask)
        else:
            self.set_wmask(reg, 4, wmask)
        return bar

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body``: the bytes after its ID and next pointer) to the list.

        Returns its offset. Its bytes are read-only but for ``wmask`` (same length as ``body``);
        status bit 4 is set and the previous capability (or 0x34) points at it.
        """
        size = 2 + len(body)
        offset = self._cap_next
        if offset + size > CONFIG_SPACE_SIZE:
            raise ValueError(f"no room for a {size}-byte capability at {offset:#x}")
        if wmask is not None and len(wmask) != len(body):
            raise ValueError("a capability's wmask is as long as its body")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2 : offset + size] = body
        self.wmask[offset : offset + size] = bytes(size)
        if wmask is not None:
            self.wmask[offset + 2 : offset + size] = wmask
        self.config[self._cap_last_next_ptr] = offset
        self._cap_last_next_ptr = offset + 1
        self._cap_next = (offset + size + 3) & ~3
        self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        return offset

    def add_msi(self, vectors: int = 1, address64: bool = True, per_vector_mask: bool = False) -> int:
        """Add an MSI capability for ``vectors`` (1, 2, 4, 8, 16 or 32) vectors; returns its offset."""
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI supports 1-32 vectors, a power of two, not {vectors}")
        if self.msi_cap:
            raise ValueError("the function has an MSI capability already")
        flags = (vectors.bit_length() - 1) << 1
        flags |= MSI_FLAGS_64BIT if address64 else 0
        flags |= MSI_FLAGS_MASKBIT if per_vector_mask else 0
        length = 2 + 4 + (4 if address64 else 0) + 4 + (8 if per_vector_mask else 0)  # body, after id/next
        body = bytearray(length)
        wmask = bytearray(length)
        body[0:2] = flags.to_bytes(2, "little")
        wmask[0:2] = (MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE).to_bytes(2, "little")
        wmask[2:6] = (0xFFFFFFFC).to_bytes(4, "little")
        data = 6
        if address64:
            wmask[6:10] = b"\xff" * 4
            data = 10
        wmask[data : data + 2] = b"\xff\xff"
        if per_vector_mask:
            mask = data + 4 if address64 else data + 2 + 2
            wmask[mask : mask + 4] = ((1 << vectors) - 1).to_bytes(4, "little")
        self.msi_cap = self.add_capability(CAP_ID_MSI, bytes(body), bytes(wmask))
        return self.msi_cap

    def add_msix(self, vectors: int, table_bar: int, table_offset: int = 0,
                 pba_bar: int | None = None, pba_offset: int | None = None) -> int:
        """Add an MSI-X capability with ``vectors`` (1-2048) vectors, its table at ``table_offset``
        in ``table_bar`` and its PBA (default: the same BAR, after the table, 8-byte aligned) in
        BARs declared already. Returns the capability's offset."""
        if not 1 <= vectors <= 2048:
            raise ValueError(f"MSI-X supports 1-2048 vectors, not {vectors}")
        if self.msix_cap:
            raise ValueError("the function has an MSI-X capability already")
        pba_bar = table_bar if pba_bar is None else pba_bar
        table_size = vectors * MSIX_ENTRY_SIZE
        pba_size = (vectors + 63) // 64 * 8
        if pba_offset is None:
            pba_offset = table_offset + table_size if pba_bar == table_bar else 0
        for bar_index, off, size, what in ((table_bar, table_offset, table_size, "table"),
                                           (pba_bar, pba_offset, pba_size, "PBA")):
            bar = self.bars[bar_index] if 0 <= bar_index <= 5 else None
            if bar is None or bar.is_io:
                raise ValueError(f"the MSI-X {what} needs a declared memory BAR, not BAR {bar_index}")
            if off & 7 or off + size > bar.size:
                raise ValueError(f"the MSI-X {what} ({size:#x} bytes at {off:#x}) does not fit BAR {bar_index}")
        if pba_bar == table_bar and table_offset < pba_offset + pba_size and pba_offset < table_offset + table_size:
            raise ValueError("the MSI-X table and PBA overlap")
        body = bytearray(10)
        body[0:2] = (vectors - 1).to_bytes(2, "little")
        body[2:6] = (table_offset | table_bar).to_bytes(4, "little")
        body[6:10] = (pba_offset | pba_bar).to_bytes(4, "little")
        wmask = bytearray(10)
        wmask[0:2] = (MSIX_FLAGS_MASKALL | MSIX_FLAGS_ENABLE).to_bytes(2, "little")
        self.msix_cap = self.add_capability(CAP_ID_MSIX, bytes(body), bytes(wmask))
        self._msix_vectors = vectors
        self._msix_table = bytearray(table_size)
        for v in range(vectors):
            self._msix_table[v * MSIX_ENTRY_SIZE + 12] = MSIX_ENTRY_CTRL_MASKBIT
        self._msix_pba = bytearray(pba_size)
        self._msix_table_bar, self._msix_table_off = table_bar, table_offset
        self._msix_pba_bar, self._msix_pba_off = pba_bar, pba_offset
        return self.msix_cap

    # ---- state ------------------------------------------------------------------------------------
    def save(self) -> dict:
        # The configuration space holds command, BARs and MSI; the MSI-X table and PBA are BAR memory.
        with self._lock:
            return {"config": self.config.hex(), "intx": self._intx_level,
                    "msix_table": self._msix_table.hex(), "msix_pba": self._msix_pba.hex()}

    def restore(self, state: dict) -> None:
        config = hex_field(state, "config", EXT_CONFIG_SPACE_SIZE)
        if config[VENDOR_ID:DEVICE_ID + 2] != self.config[VENDOR_ID:DEVICE_ID + 2]:
            raise ValueError(f"saved field 'config' is the configuration space of {config[:4].hex()}, "
                             f"not of this function's {self.config[:4].hex()}")
        intx = field(state, "intx", int, limit=2)
        with self._lock:
            table = hex_field(state, "msix_table", len(self._msix_table))
            pba = hex_field(state, "msix_pba", len(self._msix_pba))
            self.config[:], self._intx_level = config, intx
            self._msix_table[:], self._msix_pba[:] = table, pba
            self.update_mappings()  # the BARs decode where the saved registers say, as after a write
            self._update_intx()

    # ---- configuration accesses (the host calls these) --------------------------------------------
    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes of configuration space at ``offset`` (cut at the end of the space)."""
        with self._lock:
            end = min(offset + size, EXT_CONFIG_SPACE_SIZE)
            return int.from_bytes(self.config[offset:end], "little") if offset < end else 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` through the read-only / writable / W1C masks."""
        with self._lock:
            end = min(offset + size, EXT_CONFIG_SPACE_SIZE)
            if offset >= end:
                return
            old_msix_masked = self._msix_function_masked()
            for a in range(offset, end):
                byte = (value >> (8 * (a - offset))) & 0xFF
                wm, w1c = self.wmask[a], self.w1cmask[a]
                self.config[a] = ((self.config[a] & ~wm) | (byte & wm)) & ~(byte & w1c) & 0xFF
            length = end - offset
            if _overlaps(offset, length, COMMAND, 2) or _overlaps(offset, length, BASE_ADDRESS_0, 24):
                self.update_mappings()
            if self.msi_cap and _overlaps(offset, length, self.msi_cap, self._msi_size()):
                self._msi_config_written()
            if self.msix_cap and _overlaps(offset, length, self.msix_cap + 3, 1):
                self._msix_config_written(old_msix_masked)
            if _overlaps(offset, length, COMMAND, 2) or self.msi_cap or self.msix_cap:
                self._update_intx()
            self.write_config(offset, length, value & _mask(length))

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Device-specific reaction to a configuration write (called after it, with the lock held)."""

    # ---- BARs ------------------------------------------------------------------------------------
    def bar_mapping(self, index: int) -> Mapping | None:
        """Where BAR ``index`` decodes now (QEMU's ``pci_bar_address``), or None."""
        bar = self.bars[index]
        if bar is None:
            return None
        cmd = self.command
        reg = BASE_ADDRESS_0 + 4 * index
        size = bar.size
        if bar.is_io:
            if not cmd & COMMAND_IO:
                return None
            addr = self._get(reg, 4) & ~(size - 1)
            last = addr + size - 1
            if addr == 0 or last >= PCI_IO_LIMIT:
                return None
            return Mapping("io", addr, size)
        if not cmd & COMMAND_MEMORY:
            return None
        addr = self._get(reg, 8 if bar.is_64 else 4) & ~(size - 1) & _mask(8)
        last = addr + size - 1
        if addr == 0 or last >= (_mask(8) if bar.is_64 else 0xFFFFFFFF):
            return None
        return Mapping("mem", addr, size)

    def bar_address(self, index: int) -> int | None:
        """The address BAR ``index`` decodes at now, or None."""
        with self._lock:
            mapping = self.bar_mapping(index)
            return mapping.address if mapping else None

    def mappings(self) -> dict[int, Mapping]:
        """Every decoding BAR: index -> :class:`Mapping`."""
        out = {}
        for bar in self.bars:
            if bar is not None:
                mapping = self.bar_mapping(bar.index)
                if mapping is not None:
                    out[bar.index] = mapping
        return out

    def update_mappings(self) -> None:
        """Tell the host where the BARs decode now (after the command register or a BAR changed)."""
        if self.host is not None:
            self.host._update_mappings(self, self.mappings())

    def bars_moved(self) -> None:
        """Called after the host moved this function's routes (a hook; the caller may hold locks)."""

    def bar_access(self, index: int, exit, vcpu=None) -> Outcome | None:
        """Answer a port or MMIO exit that hit BAR ``index`` (the host's route handler)."""
        with self._lock:
            mapping = self.bar_mapping(index)
            if mapping is None:  # raced with a move: nobody answers now
                if isinstance(exit, (exits.IoIn, exits.MmioRead)):
                    exit.data[:] = b"\xff" * len(exit.data)
                return None
            if isinstance(exit, exits.IoOut):
                size = exit.size
                for i in range(0, size * exit.count, size):
                    value = int.from_bytes(exit.data[i : i + size], "little")
                    result = self._bar_write(index, exit.port - mapping.address, size, value)
                    if result is not None:
                        return result
                return None
            if isinstance(exit, exits.IoIn):
                size = exit.size
                for i in range(0, size * exit.count, size):
                    value = self._bar_read(index, exit.port - mapping.address, size)
                    exit.data[i : i + size] = value.to_bytes(size, "little")
                return None
            offset = exit.gpa - mapping.address
            if isinstance(exit, exits.MmioWrite):
                return self._bar_write(index, offset, len(exit.data), exit.value)
            exit.reply(self._bar_read(index, offset, len(exit.data)))
            return None

    def _bar_read(self, index: int, offset: int, size: int) -> int:
        step = min(size, self.max_access_size)
        value = 0
        for i in range(0, size, step):
            value |= (self._bar_read_one(index, offset + i, step) & _mask(step)) << (8 * i)
        return value

    def _bar_write(self, index: int, offset: int, size: int, value: int) -> Outcome | None:
        step = min(size, self.max_access_size)
        for i in range(0, size, step):
            result = self._bar_write_one(index, offset + i, step, (value >> (8 * i)) & _mask(step))
            if result is not None:
                return result
        return None

    def _bar_read_one(self, index: int, offset: int, size: int) -> int:
        if self.msix_cap:
            hit = self._msix_region(index, offset, size)
            if hit is not None:
                buf, start = hit
                return int.from_bytes(buf[start : start + size], "little")
        return self.bar_read(index, offset, size)

    def _bar_write_one(self, index: int, offset: int, size: int, value: int) -> Outcome | None:
        if self.msix_cap:
            hit = self._msix_region(index, offset, size)
            if hit is not None:
                buf, start = hit
                if buf is self._msix_table:
                    self._msix_table_write(start, size, value)
                return None  # the PBA is read-only
        return self.bar_write(index, offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """A read of ``size`` bytes at ``offset`` in BAR ``index`` (subclasses; lock held). Default 0."""
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> Outcome | None:
        """A write to BAR ``index`` (subclasses; lock held); an Outcome ends the run. Default: dropped."""
        return None

    # ---- INTx ------------------------------------------------------------------------------------
    def set_irq(self, level: int) -> None:
        """Drive this function's INTx pin (1 asserted, 0 deasserted; level-triggered)."""
        with self._lock:
            self._intx_level = 1 if level else 0
            status = self._get(STATUS, 2) & ~STATUS_INTERRUPT
            self._put(STATUS, 2, status | (STATUS_INTERRUPT if self._intx_level else 0))
            self._update_intx()

    def intx_asserted(self) -> bool:
        """Whether the pin counts as asserted on the bus now (see the module docstring)."""
        return bool(self._intx_level and self.config[INTERRUPT_PIN]
                    and not self.command & COMMAND_INTX_DISABLE
                    and not self.msi_enabled() and not self.msix_enabled())

    def _update_intx(self) -> None:
        if self.host is not None:
            self.host._intx_changed(self)

    # ---- MSI -------------------------------------------------------------------------------------
    def _msi_flags(self) -> int:
        return self._get(self.msi_cap + 2, 2) if self.msi_cap else 0

    def _msi_size(self) -> int:
        flags = self._msi_flags()
        return 2 + 2 + 4 + (4 if flags & MSI_FLAGS_64BIT else 0) + 4 + (8 if flags & MSI_FLAGS_MASKBIT else 0)

    def _msi_data_off(self) -> int:
        return self.msi_cap + (0x0C if self._msi_flags() & MSI_FLAGS_64BIT else 0x08)

    def _msi_mask_off(self) -> int:
        return self.msi_cap + (0x10 if self._msi_flags() & MSI_FLAGS_64BIT else 0x0C)

    def msi_enabled(self) -> bool:
        return bool(self._msi_flags() & MSI_FLAGS_ENABLE)

    def _msi_vectors_enabled(self) -> int:
        return 1 << ((self._msi_flags() & MSI_FLAGS_QSIZE) >> 4)

    def msi_notify(self, vector: int = 0) -> bool:
        """Signal MSI ``vector``; True if a message went out (False: disabled, masked -> pending, dropped)."""
        with self._lock:
            flags = self._msi_flags()
            if not flags & MSI_FLAGS_ENABLE or not 0 <= vector < self._msi_vectors_enabled():
                return False
            if flags & MSI_FLAGS_MASKBIT:
                if self._get(self._msi_mask_off(), 4) & (1 << vector):
                    pending = self._msi_mask_off() + 4
                    self._put(pending, 4, self._get(pending, 4) | (1 << vector))
                    return False
            return self._msi_send(vector)

    def _msi_send(self, vector: int) -> bool:
        flags = self._msi_flags()
        address = self._get(self.msi_cap + 4, 4)
        if flags & MSI_FLAGS_64BIT:
            address |= self._get(self.msi_cap + 8, 4) << 32
        data = self._get(self._msi_data_off(), 2)
        nvec = self._msi_vectors_enabled()
        if nvec > 1:
            data = (data & ~(nvec - 1)) | vector
        return self._send_message(address, data)

    def _msi_config_written(self) -> None:
        flags = self._msi_flags()
        capable = (flags & MSI_FLAGS_QMASK) >> 1
        if (flags & MSI_FLAGS_QSIZE) >> 4 > capable:  # clamp multiple message enable, as QEMU
            self._put(self.msi_cap + 2, 2, (flags & ~MSI_FLAGS_QSIZE) | capable << 4)
        if not flags & MSI_FLAGS_ENABLE or not flags & MSI_FLAGS_MASKBIT:
            return
        mask_off = self._msi_mask_off()
        pending_off = mask_off + 4
        nvec = self._msi_vectors_enabled()
        pending = self._get(pending_off, 4) & ((1 << nvec) - 1)  # vectors no longer enabled are dropped
        self._put(pending_off, 4, pending)
        mask = self._get(mask_off, 4)
        for vector in range(nvec):
            if pending & (1 << vector) and not mask & (1 << vector):
                self._put(pending_off, 4, self._get(pending_off, 4) & ~(1 << vector))
                self._msi_send(vector)

    # ---- MSI-X -----------------------------------------------------------------------------------
    def msix_enabled(self) -> bool:
        return bool(self.msix_cap and self._get(self.msix_cap + 2, 2) & MSIX_FLAGS_ENABLE)

    def _msix_function_masked(self) -> bool:
        if not self.msix_cap:
            return True
        flags = self._get(self.msix_cap + 2, 2)
        return not flags & MSIX_FLAGS_ENABLE or bool(flags & MSIX_FLAGS_MASKALL)

    def _msix_entry_masked(self, vector: int) -> bool:
        return bool(self._msix_table[vector * MSIX_ENTRY_SIZE + 12] & MSIX_ENTRY_CTRL_MASKBIT)

    def msix_masked(self, vector: int) -> bool:
        """Whether MSI-X ``vector`` is masked (by its entry, by the function mask, or MSI-X disabled)."""
        return self._msix_function_masked() or self._msix_entry_masked(vector)

    def msix_pending(self, vector: int) -> bool:
        return bool(self._msix_pba[vector // 8] & (1 << (vector % 8)))

    def _msix_set_pending(self, vector: int, pending: bool) -> None:
        bit = 1 << (vector % 8)
        if pending:
            self._msix_pba[vector // 8] |= bit
        else:
            self._msix_pba[vector // 8] &= ~bit & 0xFF

    def msix_notify(self, vector: int) -> bool:
        """Signal MSI-X ``vector``; True if a message went out (masked: its pending bit is set)."""
        with self._lock:
            if not self.msix_enabled() or not 0 <= vector < self._msix_vectors:
                return False
            if self.msix_masked(vector):
                self._msix_set_pending(vector, True)
                return False
            return self._msix_send(vector)

    def _msix_send(self, vector: int) -> bool:
        entry = self._msix_table[vector * MSIX_ENTRY_SIZE : (vector + 1) * MSIX_ENTRY_SIZE]
        address = int.from_bytes(entry[0:8], "little")
        data = int.from_bytes(entry[8:12], "little")
        return self._send_message(address, data)

    def _msix_unmasked(self, vector: int) -> None:
        if not self.msix_masked(vector) and self.msix_pending(vector):
            self._msix_set_pending(vector, False)
            self._msix_send(vector)

    def _msix_region(self, index: int, offset: int, size: int):
        table_end = self._msix_table_off + len(self._msix_table)
        if index == self._msix_table_bar and self._msix_table_off <= offset and offset + size <= table_end:
            return self._msix_table, offset - self._msix_table_off
        pba_end = self._msix_pba_off + len(self._msix_pba)
        if index == self._msix_pba_bar and self._msix_pba_off <= offset and offset + size <= pba_end:
            return self._msix_pba, offset - self._msix_pba_off
        return None

    def _msix_table_write(self, start: int, size: int, value: int) -> None:
        vector = start // MSIX_ENTRY_SIZE
        was_masked = self.msix_masked(vector)
        self._msix_table[start : start + size] = value.to_bytes(size, "little")
        if was_masked:
            self._msix_unmasked(vector)

    def _msix_config_written(self, was_function_masked: bool) -> None:
        if was_function_masked and not self._msix_function_masked():
            for vector in range(self._msix_vectors):
                self._msix_unmasked(vector)

    def msix_entry(self, vector: int) -> tuple[int, int, bool]:
        """MSI-X table entry ``vector``: (address, data, masked bit)."""
        entry = self._msix_table[vector * MSIX_ENTRY_SIZE : (vector + 1) * MSIX_ENTRY_SIZE]
        return (int.from_bytes(entry[0:8], "little"), int.from_bytes(entry[8:12], "little"),
                bool(entry[12] & MSIX_ENTRY_CTRL_MASKBIT))

    # ---- messages --------------------------------------------------------------------------------
    def notify(self, vector: int = 0) -> bool:
        """Signal ``vector`` the way the guest set up: MSI-X if enabled, else MSI if enabled."""
        with self._lock:
            if self.msix_enabled():
                return self.msix_notify(vector)
            if self.msi_enabled():
                return self.msi_notify(vector)
            return False

    def _send_message(self, address: int, data: int) -> bool:
        if not self.command & COMMAND_MASTER or self.host is None:
            return False  # a memory write by a function that may not master the bus
        return self.host._signal_msi(address, data)

    # ---- description -----------------------------------------------------------------------------
    @property
    def bdf(self) -> str:
        slot = "??" if self.slot is None else f"{self.slot:02x}"
        return f"00:{slot}.{self.function if self.function is not None else '?'}"

    def describe(self) -> str:
        """One line, as ``lspci -n`` would print it, with the QEMU name and description."""
        return (f"{self.bdf} {self.class_code >> 8:04x}: {self.vendor_id:04x}:{self.device_id:04x}"
                f" {self.qemu_name} ({self.description})")


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


class I440fxHostBridge(PciFunction):
    """00.0: the i440FX PCI and memory controller, as QEMU's ``i440FX`` PCI function (PAM / SMRAM
    registers are plain device-specific bytes here)."""

    qemu_name = "i440FX"
    description = "Host bridge"
    vendor_id = 0x8086
    device_id = 0x1237  # PCI_DEVICE_ID_INTEL_82441
    revision = 0x02
    class_code = 0x060000  # PCI_CLASS_BRIDGE_HOST


class Piix3IsaBridge(PciFunction):
    """01.0: the PIIX3 PCI-to-ISA bridge with its PIRQ router (registers 0x60-0x63), reset values
    as QEMU's ``piix3_reset``."""

    qemu_name = "PIIX3"
    description = "ISA bridge"
    vendor_id = 0x8086
    device_id = 0x7000  # PCI_DEVICE_ID_INTEL_82371SB_0
    class_code = 0x060100  # PCI_CLASS_BRIDGE_ISA
    header_type = HEADER_TYPE_MULTI_FUNCTION

    RESET_VALUES = {0x04: 0x07, 0x05: 0x00, 0x06: 0x00, 0x07: 0x02, 0x4C: 0x4D, 0x4E: 0x03, 0x4F: 0x00,
                    0x60: 0x80, 0x61: 0x80, 0x62: 0x80, 0x63: 0x80, 0x69: 0x02, 0x70: 0x80,
                    0x76: 0x0C, 0x77: 0x0C, 0x78: 0x02, 0x79: 0x00, 0x80: 0x00, 0x82: 0x00, 0xA0: 0x08,
                    0xA8: 0x0F}

    def __init__(self) -> None:
        super().__init__()
        for reg, value in self.RESET_VALUES.items():
            self.config[reg] = value

    def pirq_route(self, pirq: int) -> int | None:
        """The ISA IRQ PIRQ ``pirq`` (0-3 = A-D) is routed to, or None (disabled: bit 7 set)."""
        irq = self.config[PIIX_PIRQC + pirq]
        return irq if irq < ISA_NUM_IRQS else None

    def write_config(self, offset: int, size: int, value: int) -> None:
        if _overlaps(offset, size, PIIX_PIRQC, PIIX_NUM_PIRQS) and self.host is not None:
            self.host._intx_routing_changed()


class _BarRoute:
    """A bus handler for one BAR at one place (the bus calls ``handler(exit, vcpu)``)."""

    __slots__ = ("function", "index")

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function = function
        self.index = index

    def __call__(self, exit, vcpu=None):
        return self.function.bar_access(self.index, exit, vcpu)


class PciHost(Device):
    """The host bridge's configuration mechanisms and bus 0 (see the module docstring).

    ``irq``: ``irq(gsi)`` returns the callable taking the level of that GSI (called once per GSI).
    ``signal_msi``: ``signal_msi(address, data)`` delivers a message (the machine passes
    ``Vm.signal_msi``). ``reset``: called for a PIIX3 reset-control CPU reset (0xCF9 bit 2); what it
    returns (an Outcome) ends the run. ``ecam_base``: where the ECAM window is, or None for none.
    """

    ports = ((CONFIG_ADDRESS_PORT, 8),)
    byte_registers = False

    def __init__(self, irq: IrqFactory | None = None, signal_msi: SignalMsi | None = None, *,
                 reset: Callable[[], Outcome | None] | None = None,
                 ecam_base: int | None = ECAM_BASE, ecam_buses: int = 256) -> None:
        super().__init__()
        if not 1 <= ecam_buses <= 256:
            raise ValueError(f"ECAM covers 1-256 buses, not {ecam_buses}")
        if ecam_base is not None and ecam_base % (ecam_buses * ECAM_BUS_SIZE):
            raise ValueError(f"the ECAM window at {ecam_base:#x} is not aligned to its size")
        self._irq = irq
        self._signal = signal_msi
        self._reset = reset
        self.config_address = 0
        self.reset_control = 0
        self.ecam_base = ecam_base
        self.ecam_bus_start = 0
        self.ecam_bus_end = ecam_buses - 1
        self.ecam_size = ecam_buses * ECAM_BUS_SIZE if ecam_base is not None else 0
        self.mmio_ranges = ((ecam_base, self.ecam_size),) if ecam_base is not None else ()
        self.bus = None
        self._functions: dict[int, PciFunction] = {}  # devfn -> function
        self._map_lock = threading.Lock()
        self._wanted: dict[tuple[int, int], Mapping] = {}  # (devfn, bar) -> where it should decode
        self._mapped: dict[tuple[int, int], Mapping] = {}  # (devfn, bar) -> where its route is
        self._irq_lock = threading.Lock()
        self._gsi_lines: dict[int, IrqLine] = {}
        self.host_bridge = self.add(I440fxHostBridge(), slot=0)
        self.isa_bridge = self.add(Piix3IsaBridge(), slot=1)

    # ---- building the bus ------------------------------------------------------------------------
    def add(self, device: PciFunction, slot: int | None = None, function: int = 0) -> PciFunction:
        """Put ``device`` on bus 0 at ``slot`` (default: the next free slot from 2), function
        ``function`` (a function other than 0 needs a function 0 in its slot, whose header type
        then gets the multi-function bit). Returns ``device``."""
        if device.host is not None:
            raise ValueError(f"{device.qemu_name or type(device).__name__} is on a bus already")
        if not 0 <= function < FUNCTIONS:
            raise ValueError(f"a PCI function number is 0-7, not {function}")
        if slot is None:
            if function != 0:
                raise ValueError("give the slot of a function other than 0")
            free = [s for s in range(FIRST_FREE_SLOT, SLOTS) if (s << 3) not in self._functions]
            if not free:
                raise ValueError("bus 0 has no free slot")
            slot = free[0]
        if not 0 <= slot < SLOTS:
            raise ValueError(f"a PCI slot is 0-31, not {slot}")
        devfn = slot << 3 | function
        if devfn in self._functions:
            raise ValueError(f"00:{slot:02x}.{function} is taken by {self._functions[devfn].describe()}")
        if function != 0:
            first = self._functions.get(slot << 3)
            if first is None:
                raise ValueError(f"00:{slot:02x}.{function} needs a function 0 in slot {slot:#x}")
            with first.lock:
                first.config[HEADER_TYPE] |= HEADER_TYPE_MULTI_FUNCTION
        device.host, device.slot, device.function = self, slot, function
        self._functions[devfn] = device
        with device.lock:
            device.update_mappings()
        return device

    def function_at(self, slot: int, function: int = 0) -> PciFunction | None:
        return self._functions.get(slot << 3 | function)

    @property
    def functions(self) -> list[PciFunction]:
        """Every function on bus 0, in devfn order."""
        return [self._functions[d] for d in sorted(self._functions)]

    def attach(self, bus) -> None:
        """Register 0xCF8-0xCFF and the ECAM window on ``bus``, and the routes of decoding BARs."""
        super().attach(bus)
        with self._map_lock:
            self.bus = bus
            moved = self._reconcile()
        self._tell_moved(moved)

    def describe(self) -> list[str]:
        """One line per function, for an ``info pci``-like listing."""
        return [f.describe() for f in self.functions]

    # ---- state ------------------------------------------------------------------------------------
    def save(self) -> dict:
        # Bus 0's functions are saved here: the machine holds the host, the host holds them.
        with self._lock:
            functions = [{"devfn": devfn, "type": type(f).__name__, "state": f.save()}
                         for devfn, f in sorted(self._functions.items())]
            return {"config_address": self.config_address, "reset_control": self.reset_control,
                    "functions": functions}

    def restore(self, state: dict) -> None:
        config_address = field(state, "config_address", int, limit=1 << 32)
        reset_control = field(state, "reset_control", int, limit=0x100)
        functions = field(state, "functions", list)
        built = [{"devfn": devfn, "type": type(f).__name__} for devfn, f in sorted(self._functions.items())]
        saved = [{k: f.get(k) for k in ("devfn", "type")} if isinstance(f, dict) else f for f in functions]
        if saved != built:
            raise ValueError(f"saved field 'functions' is bus 0 with {saved}, this one has {built}")
        with self._lock:
            self.config_address, self.reset_control = config_address, reset_control & RCR_SYS_RST
            for saved_function in functions:
                function = self._functions[saved_function["devfn"]]
                try:
                    function.restore(field(saved_function, "state", dict))
                except ValueError as e:
                    raise ValueError(f"function {function.bdf}: {e}") from None

    # ---- mechanism #1 ----------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        if port == RESET_CONTROL_PORT and size == 1:
            return self.reset_control
        if port < CONFIG_DATA_PORT:
            return (self.config_address >> (8 * (port - CONFIG_ADDRESS_PORT))) & _mask(size)
        address = self.config_address
        if not address & CONFIG_ENABLE:
            return _mask(size)
        return self._config_read(address >> 16 & 0xFF, address >> 8 & 0xFF,
                                 (address | (port - CONFIG_DATA_PORT)) & 0xFF, size, CONFIG_SPACE_SIZE)

    def write(self, port: int, size: int, value: int) -> Outcome | None:
        if port == RESET_CONTROL_PORT and size == 1:
            if value & RCR_RST_CPU and self._reset is not None:
                return self._reset()
            self.reset_control = value & RCR_SYS_RST
            return None
        if port == CONFIG_ADDRESS_PORT and size == 4:
            self.config_address = value & 0xFFFFFFFF
            return None
        if port < CONFIG_DATA_PORT:
            return None  # QEMU drops all but 32-bit writes at 0xCF8
        address = self.config_address
        if address & CONFIG_ENABLE:
            self._config_write(address >> 16 & 0xFF, address >> 8 & 0xFF,
                               (address | (port - CONFIG_DATA_PORT)) & 0xFF, size, value, CONFIG_SPACE_SIZE)
        return None

    # ---- config access, by either mechanism ------------------------------------------------------
    def _config_read(self, bus: int, devfn: int, reg: int, size: int, limit: int) -> int:
        function = self._functions.get(devfn) if bus == 0 else None
        if function is None:
            return _mask(size)
        return function.config_read(reg, min(size, limit - reg))

    def _config_write(self, bus: int, devfn: int, reg: int, size: int, value: int, limit: int) -> None:
        function = self._functions.get(devfn) if bus == 0 else None
        if function is not None:
            length = min(size, limit - reg)
            function.config_write(reg, length, value & _mask(length))

    def config_read(self, slot: int, function: int, reg: int, size: int = 4) -> int:
        """A configuration read on bus 0 as the guest would make it (for the machine and tests)."""
        return self._config_read(0, slot << 3 | function, reg, size, EXT_CONFIG_SPACE_SIZE)

    def config_write(self, slot: int, function: int, reg: int, size: int, value: int) -> None:
        """A configuration write on bus 0 as the guest would make it."""
        self._config_write(0, slot << 3 | function, reg, size, value, EXT_CONFIG_SPACE_SIZE)

    # ---- ECAM ------------------------------------------------------------------------------------
    def mmio(self, exit, vcpu=None) -> None:
        """Answer an ECAM access (1, 2, 4 bytes; 8 as two 4-byte ones)."""
        offset = exit.gpa - self.ecam_base
        size = len(exit.data)
        step = 4 if size == 8 else size
        if isinstance(exit, exits.MmioRead):
            value = 0
            for i in range(0, size, step):
                value |= self._ecam_read(offset + i, step) << (8 * i)
            exit.reply(value)
            return
        value = exit.value
        for i in range(0, size, step):
            self._ecam_write(offset + i, step, (value >> (8 * i)) & _mask(step))

    def _ecam_decode(self, offset: int, size: int):
        bus = self.ecam_bus_start + (offset >> 20)
        reg = offset & 0xFFF
        return bus, (offset >> 12) & 0xFF, reg, min(size, EXT_CONFIG_SPACE_SIZE - reg)

    def _ecam_read(self, offset: int, size: int) -> int:
        bus, devfn, reg, length = self._ecam_decode(offset, size)
        if bus > self.ecam_bus_end:
            return _mask(size)
        return self._config_read(bus, devfn, reg, length, EXT_CONFIG_SPACE_SIZE)

    def _ecam_write(self, offset: int, size: int, value: int) -> None:
        bus, devfn, reg, length = self._ecam_decode(offset, size)
        if bus <= self.ecam_bus_end:
            self._config_write(bus, devfn, reg, length, value, EXT_CONFIG_SPACE_SIZE)

    # ---- BAR routes ------------------------------------------------------------------------------
    def _update_mappings(self, function: PciFunction, mappings: dict[int, Mapping]) -> None:
        devfn = function.slot << 3 | function.function
        with self._map_lock:
            for key in [k for k in self._wanted if k[0] == devfn]:
                del self._wanted[key]
            for index, mapping in mappings.items():
                self._wanted[(devfn, index)] = mapping
            moved = self._reconcile()
        self._tell_moved(moved)

    def _reconcile(self) -> set[int]:
        """Make the bus routes follow ``_wanted`` (map lock held); returns the devfns whose routes moved."""
        moved: set[int] = set()
        if self.bus is None:
            return moved
        for key, mapping in list(self._mapped.items()):
            if self._wanted.get(key) != mapping:
                if mapping.space == "io":
                    self.bus.remove_port(mapping.address, mapping.size)
                else:
                    self.bus.remove_mmio(mapping.address, mapping.size)
                del self._mapped[key]
                moved.add(key[0])
        for key, mapping in sorted(self._wanted.items()):
            if key in self._mapped:
                continue
            function = self._functions[key[0]]
            handler = _BarRoute(function, key[1])
            name = f"{function.qemu_name or type(function).__name__} {function.bdf} BAR{key[1]}"
            try:
                if mapping.space == "io":
                    self.bus.add_port(mapping.address, handler, mapping.size, name=name)
                else:
                    self.bus.add_mmio(mapping.address, mapping.size, handler, name=name)
            except ValueError:
                continue  # overlaps another route: stays unmapped until one of them moves
            self._mapped[key] = mapping
            moved.add(key[0])
        return moved

    def _tell_moved(self, moved: Iterable[int]) -> None:
        for devfn in moved:
            self._functions[devfn].bars_moved()

    def routed(self, function: PciFunction, index: int) -> Mapping | None:
        """Where the bus routes BAR ``index`` of ``function`` now (None: not routed)."""
        with self._map_lock:
            return self._mapped.get((function.slot << 3 | function.function, index))

    # ---- INTx ------------------------------------------------------------------------------------
    def pirq(self, function: PciFunction) -> int | None:
        """The PIRQ (0-3 = A-D) ``function``'s interrupt pin reaches, or None if it has no pin."""
        pin = function.config[INTERRUPT_PIN]
        if not 1 <= pin <= 4:
            return None
        return (pin - 1 + function.slot - 1) & 3

    def intx_gsi(self, function: PciFunction) -> int | None:
        """The GSI ``function``'s pin is routed to now (through PIIX3 PIRQRC), or None."""
        pirq = self.pirq(function)
        return None if pirq is None else self.isa_bridge.pirq_route(pirq)

    def _intx_changed(self, function: PciFunction) -> None:
        self._intx_routing_changed()

    def _intx_routing_changed(self) -> None:
        with self._irq_lock:
            levels: dict[int, int] = {}
            pirq_level = [0] * PIIX_NUM_PIRQS
            for f in self._functions.values():
                pirq = self.pirq(f)
                if pirq is not None and f.intx_asserted():
                    pirq_level[pirq] = 1
            for pirq in range(PIIX_NUM_PIRQS):
                gsi = self.isa_bridge.pirq_route(pirq)
                if gsi is not None:
                    levels[gsi] = levels.get(gsi, 0) | pirq_level[pirq]
            for gsi in set(levels) | set(self._gsi_lines):
                line = self._gsi_lines.get(gsi)
                level = levels.get(gsi, 0)
                if line is None:
                    if not level:
                        continue
                    line = self._gsi_lines[gsi] = IrqLine(self._irq(gsi) if self._irq is not None else None)
                line.set(level)

    def gsi_level(self, gsi: int) -> int:
        """The level the host drives on ``gsi`` now."""
        line = self._gsi_lines.get(gsi)
        return line.level if line is not None else 0

    # ---- MSI -------------------------------------------------------------------------------------
    def _signal_msi(self, address: int, data: int) -> bool:
        if self._signal is None:
            return False
        self._signal(address, data)
        return True

    # ---- firmware --------------------------------------------------------------------------------
    def assign_resources(self, *, io_base: int = PCI_IO_BASE, mem_base: int = PCI_MEM_BASE,
                         mem_limit: int | None = None, bus_master: bool = True,
                         pci_irqs: tuple[int, int, int, int] = SEABIOS_PCI_IRQS) -> list[tuple[PciFunction, int, int]]:
        """Program bus 0 as SeaBIOS would before the guest runs (see the module docstring).

        Returns ``[(function, bar index, address), ...]`` for every BAR placed. Raises ValueError
        if the BARs do not fit the windows (I/O: ``io_base``-0xFFFF, memory: ``mem_base`` up to the
        ECAM window, or ``mem_limit``).
        """
        if mem_limit is None:
            mem_limit = self.ecam_base if self.ecam_base is not None and self.ecam_base > mem_base else PCI_MEM_LIMIT
        for pirq, irq in enumerate(pci_irqs):
            self.isa_bridge.config_write(PIIX_PIRQC + pirq, 1, irq)
        bars = [(f, bar) for f in self.functions for bar in f.bars if bar is not None]
        placed = []
        for space, base, limit in (("io", io_base, PCI_IO_LIMIT), ("mem", mem_base, mem_limit)):
            todo = sorted((fb for fb in bars if fb[1].is_io == (space == "io")),
                          key=lambda fb: (-fb[1].size, fb[0].slot, fb[0].function, fb[1].index))
            cursor = base
            for function, bar in todo:
                address = (cursor + bar.size - 1) & ~(bar.size - 1)
                if address + bar.size > limit:
                    raise ValueError(f"{function.describe()} BAR{bar.index} ({bar.size:#x} bytes) does not fit"
                                     f" the {space} window {base:#x}-{limit - 1:#x}")
                reg = BASE_ADDRESS_0 + 4 * bar.index
                function.config_write(reg, 4, address & 0xFFFFFFFF)
                if bar.is_64:
                    function.config_write(reg + 4, 4, address >> 32)
                placed.append((function, bar.index, address))
                cursor = address + bar.size
        for function in self.functions:
            pin = function.config[INTERRUPT_PIN]
            if 1 <= pin <= 4:
                function.config_write(INTERRUPT_LINE, 1, pci_irqs[(pin - 1 + function.slot - 1) & 3])
            kinds = {bar.is_io for bar in function.bars if bar is not None}
            set_bits = (COMMAND_IO if True in kinds else 0) | (COMMAND_MEMORY if False in kinds else 0)
            if set_bits and bus_master:
                set_bits |= COMMAND_MASTER
            if set_bits:
                function.config_write(COMMAND, 2, function.command | set_bits)
        return placed


def qemu_device_help(classes: Iterable[type[PciFunction]]) -> list[str]:
    """``-device help``-style lines for PCI device classes: ``name "x", bus PCI, desc "..."``."""
    return [f'name "{c.qemu_name}", bus PCI, desc "{c.description}"' for c in classes if c.qemu_name]
