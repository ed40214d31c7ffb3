"""QEMU's firmware configuration device (fw_cfg), x86 I/O port interface.

Compatible with QEMU's ``docs/specs/fw_cfg.rst`` ("Guest-side Hardware Interface") and
``hw/nvram/fw_cfg.c``:

* Selector, port 0x510: a 16-bit write selects an item and resets the data offset to 0. The
  key's bit 15 picks the architecture-specific bank, bit 14 (the old write channel) is ignored
  for reading, as in QEMU. A key with no item, or past the last file slot, reads as zeros.
* Data, port 0x511: each 8-bit read returns the next byte of the selected item and advances the
  offset; past the item's end a read returns 0. Writes are ignored (QEMU v2.4+). As in QEMU, the
  two ports form one 2-byte region: an 8-bit read at either port reads data, a 16-bit write at
  either port selects, and any other access is ignored (reads give 0). String reads (``rep
  insb``) arrive as one exit and fill every byte.
* DMA, ports 0x514-0x51B, only when the device is given guest ``memory``: the big-endian 64-bit
  address of a ``FWCfgDmaAccess {be32 control; be32 length; be64 address}``, written as two
  32-bit halves (the write to the low half at 0x518 starts the transfer). Control bits: 0 error,
  1 read, 2 skip, 3 select (key in bits 16-31), 4 write (every item here is read-only, so a
  write sets the error bit). The device writes the control word back: 0 when done, bit 0 on
  error. Reads of the DMA ports return the signature "QEMU CFG". ``FW_CFG_ID`` says whether
  DMA is there (bit 1) besides the traditional interface (bit 0).

Items: FW_CFG_SIGNATURE "QEMU", FW_CFG_ID, FW_CFG_UUID (16 bytes), FW_CFG_RAM_SIZE (le64),
FW_CFG_NOGRAPHIC (le16), FW_CFG_NB_CPUS (le16), FW_CFG_BOOT_MENU (le16), FW_CFG_MAX_CPUS (le16),
FW_CFG_IRQ0_OVERRIDE (0x8002, le32: ISA IRQ 0 is wired to IOAPIC pin 2, as on QEMU's PC),
the kernel command line when set (FW_CFG_CMDLINE_SIZE le32 with the NUL, FW_CFG_CMDLINE_DATA),
and FW_CFG_FILE_DIR: ``be32 count`` then ``{be32 size; be16 select; be16 reserved; char
name[56]}`` per file, sorted by name as QEMU sorts them (so a file's selector, 0x20 + its place
in that order, can change when a file is added; look it up by name).
"""

from __future__ import annotations

import struct

from .. import exits
from .base import Device, field

FW_CFG_PORT = 0x510  # selector; data is FW_CFG_PORT + 1
FW_CFG_DMA_PORT = 0x514

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_ACPI_TABLES = FW_CFG_ARCH_LOCAL + 0
FW_CFG_SMBIOS_ENTRIES = FW_CFG_ARCH_LOCAL + 1
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3

FW_CFG_VERSION = 0x01  # FW_CFG_ID bit 0: the traditional interface
FW_CFG_VERSION_DMA = 0x02  # FW_CFG_ID bit 1: the DMA interface

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_SIGNATURE = b"QEMU CFG"

FILE_NAME_SIZE = 56
MAX_FILES = FW_CFG_ENTRY_MASK + 1 - FW_CFG_FILE_FIRST
_DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address
_FILE = struct.Struct(">IHH56s")
_ZERO_CHUNK = 1 << 20


class FwCfg(Device):
    """fw_cfg at ports 0x510-0x511 (and DMA at 0x514-0x51B when ``memory`` is given).

    ``memory`` is anything with ``read(gpa, size) -> bytes`` and ``write(gpa, data)`` (a
    :class:`pykvm.memory.GuestMemory`).
    """

    byte_registers = False  # the selector is one 16-bit register

    def __init__(
        self,
        ram_size: int,
        ncpus: int = 1,
        *,
        max_cpus: int | None = None,
        uuid: bytes = bytes(16),
        nographic: bool = True,
        irq0_override: bool = True,
        memory=None,
        port: int = FW_CFG_PORT,
        dma_port: int = FW_CFG_DMA_PORT,
    ) -> None:
        super().__init__()
        if len(uuid) != 16:
            raise ValueError(f"a UUID is 16 bytes, not {len(uuid)}")
        if not 1 <= ncpus <= (max_cpus or ncpus) <= 0xFFFF:
            raise ValueError(f"bad CPU counts: {ncpus} present, {max_cpus} at most")
        self.memory = memory
        self.base = port
        self.dma_base = dma_port if memory is not None else None
        self.ports = ((port, 2),) + (((dma_port, 8),) if memory is not None else ())
        self._items: dict[int, bytes] = {}
        self._files: dict[str, bytes] = {}
        self._dma_high = 0
        self.add_item(FW_CFG_SIGNATURE, b"QEMU")
        self.add_item(FW_CFG_ID, struct.pack("<I", FW_CFG_VERSION | (FW_CFG_VERSION_DMA if memory is not None else 0)))
        self.add_item(FW_CFG_UUID, bytes(uuid))
        self.add_item(FW_CFG_RAM_SIZE, struct.pack("<Q", ram_size))
        self.add_item(FW_CFG_NOGRAPHIC, struct.pack("<H", int(nographic)))
        self.add_item(FW_CFG_NB_CPUS, struct.pack("<H", ncpus))
        self.add_item(FW_CFG_BOOT_MENU, struct.pack("<H", 0))
        self.add_item(FW_CFG_MAX_CPUS, struct.pack("<H", max_cpus or ncpus))
        if irq0_override:
            self.add_item(FW_CFG_IRQ0_OVERRIDE, struct.pack("<I", 1))
        self._rebuild_directory()
        self._key = FW_CFG_SIGNATURE  # reset selects the signature (QEMU's fw_cfg_reset)
        self._offset = 0

    # ---- contents -----------------------------------------------------------------------------
    def add_item(self, key: int, data: bytes) -> None:
        """Set the numbered item ``key`` (below FW_CFG_FILE_FIRST, or arch-local 0x8000-0x801F)."""
        if (not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL or key == FW_CFG_FILE_DIR
                or key & FW_CFG_ENTRY_MASK >= FW_CFG_FILE_FIRST):
            raise ValueError(f"fw_cfg key {key:#x} is not a numbered item (files use add_file)")
        with self._lock:
            self._items[key] = bytes(data)

    def set_cmdline(self, cmdline: str | bytes) -> None:
        """The kernel command line, as QEMU's -append: FW_CFG_CMDLINE_SIZE and _DATA (with NUL)."""
        data = (cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)) + b"\0"
        self.add_item(FW_CFG_CMDLINE_SIZE, struct.pack("<I", len(data)))
        self.add_item(FW_CFG_CMDLINE_DATA, data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file (e.g. ``opt/org.example/config``); returns its selector now (files
        are kept sorted by name, so adding another file can renumber it: see :meth:`selector`)."""
        raw = name.encode("ascii")
        if not raw or len(raw) >= FILE_NAME_SIZE or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-{FILE_NAME_SIZE - 1} ASCII characters")
        if len(data) >= 1 << 32:
            raise ValueError(f"fw_cfg file {name!r} is too large ({len(data)} bytes)")
        with self._lock:
            if name in self._files:
                raise ValueError(f"duplicate fw_cfg file name: {name}")
            if len(self._files) >= MAX_FILES:
                raise ValueError(f"fw_cfg holds at most {MAX_FILES} files")
            self._files[name] = bytes(data)
            self._rebuild_directory()
        return self.selector(name)

    def selector(self, name: str) -> int:
        """The key that selects file ``name``."""
        return FW_CFG_FILE_FIRST + sorted(self._files).index(name)

    def _rebuild_directory(self) -> None:
        names = sorted(self._files)
        entries = b"".join(
            _FILE.pack(len(self._files[n]), FW_CFG_FILE_FIRST + i, 0, n.encode("ascii"))
            for i, n in enumerate(names)
        )
        self._items[FW_CFG_FILE_DIR] = struct.pack(">I", len(names)) + entries
        self._by_key = {FW_CFG_FILE_FIRST + i: self._files[n] for i, n in enumerate(names)}

    def item(self, key: int) -> bytes:
        """The bytes a guest reads after selecting ``key`` (empty when there is no such item)."""
        key &= ~FW_CFG_WRITE_CHANNEL
        if key & FW_CFG_ENTRY_MASK >= FW_CFG_FILE_FIRST:
            return self._by_key.get(key, b"") if not key & FW_CFG_ARCH_LOCAL else b""
        return self._items.get(key, b"")

    # ---- state: where the guest is reading (the items are configuration) -----------------------
    def save(self) -> dict:
        with self._lock:
            return {"key": self._key, "offset": self._offset, "dma_high": self._dma_high}

    def restore(self, state: dict) -> None:
        key = field(state, "key", int, limit=0x10000)
        offset = field(state, "offset", int, limit=1 << 63)
        dma_high = field(state, "dma_high", int, limit=1 << 32)
        with self._lock:
            self._key, self._offset, self._dma_high = key, offset, dma_high

    # ---- registers ----------------------------------------------------------------------------
    def _select(self, key: int) -> None:
        self._key = key & 0xFFFF
        self._offset = 0

    def _advance(self, n: int) -> bytes:
        """Up to ``n`` bytes of the selected item from the offset, which moves past them."""
        chunk = self.item(self._key)[self._offset : self._offset + n]
        self._offset += len(chunk)
        return chunk

    def _read_data(self, n: int) -> bytes:
        chunk = self._advance(n)
        return chunk + bytes(n - len(chunk))  # past the end: zeros

    def io(self, exit, vcpu=None):
        if isinstance(exit, exits.IoIn) and exit.port in (self.base, self.base + 1) and exit.size == 1:
            with self._lock:  # a `rep insb` of a whole item in one go
                exit.data[:] = self._read_data(exit.count)
            return None
        return super().io(exit, vcpu)

    def read(self, port: int, size: int) -> int:
        if port in (self.base, self.base + 1):
            return self._read_data(1)[0] if size == 1 else 0
        offset = port - self.dma_base
        # Big-endian register: the guest sees the signature's bytes in order at 0x514-0x51B.
        return int.from_bytes(DMA_SIGNATURE[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, port: int, size: int, value: int):
        if port in (self.base, self.base + 1):
            if size == 2:
                self._select(value)
            return  # data writes are ignored
        # The DMA address register is big-endian: the bytes the guest wrote, in order, are the
        # address (a guest does outl(cpu_to_be32(addr)), so `value` here is byte-swapped).
        be = int.from_bytes(value.to_bytes(size, "little"), "big")
        offset = port - self.dma_base
        if size == 4 and offset == 0:
            self._dma_high = be
        elif size == 4 and offset == 4:
            address, self._dma_high = (self._dma_high << 32) | be, 0
            self._dma(address)

    def _dma(self, address: int) -> None:
        memory = self.memory
        try:
            control, length, target = _DMA_ACCESS.unpack(memory.read(address, _DMA_ACCESS.size))
        except ValueError:
            return  # the access structure itself is not in RAM: nothing to report it in
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        error = 0
        if control & DMA_CTL_READ:
            data = self._advance(length)
            try:
                memory.write(target, data)
                # Past the item's end QEMU writes zeros; in bounded chunks, whatever the length.
                done = len(data)
                while done < length:
                    n = min(length - done, _ZERO_CHUNK)
                    memory.write(target + done, bytes(n))
                    done += n
            except ValueError:
                error = DMA_CTL_ERROR
        elif control & DMA_CTL_WRITE:
            error = DMA_CTL_ERROR  # every item is read-only
        elif control & DMA_CTL_SKIP:
            self._advance(length)
        try:
            memory.write(address, struct.pack(">I", error))
        except ValueError:
            pass
