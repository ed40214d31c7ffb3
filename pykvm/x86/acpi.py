"""ACPI tables that let a kernel find its CPUs and the I/O APIC: RSDP, XSDT, RSDT, FADT, DSDT, MADT.

Layouts from the ACPI Specification 6.5: 5.2.5.3 (RSDP), 5.2.6 (system description table
header), 5.2.7 (RSDT), 5.2.8 (XSDT), 5.2.9 (FADT), 5.2.11.1 (DSDT), 5.2.12 (MADT) with
5.2.12.2 (Processor Local APIC), 5.2.12.3 (I/O APIC), 5.2.12.5 (Interrupt Source Override) and
5.2.12.7 (Local APIC NMI).

What is built, and why:

* RSDP, revision 2 (ACPI 2.0+): checksum over the first 20 bytes, extended checksum over all 36.
  It sits at ``base_gpa``, 16-byte aligned; OSes that scan for it (Linux without a boot
  protocol that hands it over) look in 0xE0000-0xFFFFF, so that is the default place.
* XSDT (and an RSDT for ACPI 1.0 readers), listing the FADT and the MADT.
* MADT: the local APIC at 0xFEE00000, PCAT_COMPAT (there are 8259s), one Processor Local APIC
  per CPU (ACPI processor UID = APIC ID = index, enabled), one I/O APIC (ID ``ncpus`` unless
  given, 0xFEC00000, GSI base 0), the ISA IRQ 0 -> GSI 2 override (flags 0: "conforms to the
  bus", which for ISA is edge-triggered, active high; QEMU writes the same), and a Local APIC
  NMI on LINT1 of every processor.
* FADT, revision 6.5, HW_REDUCED_ACPI: the spec requires a FADT (and through it a DSDT) in
  every ACPI system, and a kernel that finds none turns ACPI off after reading the MADT. A
  hardware-reduced FADT needs no PM timer, SCI or PM1 blocks, which this machine does not have
  (Firecracker and Cloud Hypervisor describe their machines the same way). IAPC_BOOT_ARCH says
  there are legacy devices and an 8042 and no VGA; CENTURY points at CMOS 0x32; the reset
  register is the 8042's command port (write 0xFE to port 0x64), which
  :class:`pykvm.devices.i8042.I8042` turns into a reset.
* DSDT: a valid, empty definition block (no namespace devices: kernels probe the legacy UART,
  RTC and 8042 directly, Linux because of IAPC_BOOT_ARCH).

A machine with the irq0 override must route the PIT's GSI 0 to I/O APIC pin 2 (KVM's default
routing sends GSI n to pin n; QEMU installs the 0 -> 2 route with KVM_SET_GSI_ROUTING), or build
the tables with ``irq0_override=False``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ACPI_BASE = 0xE0000  # default: the start of the area an OS scans for the RSDP
RSDP_SCAN_START, RSDP_SCAN_END = 0xE0000, 0x100000
LAPIC_GPA = 0xFEE00000
IOAPIC_GPA = 0xFEC00000
CMOS_CENTURY = 0x32
MAX_XAPIC_CPUS = 254  # xAPIC IDs 0-254 (0xFF is broadcast), and one left for the I/O APIC

OEM_ID = b"PYKVM "
CREATOR_ID = b"PKVM"

# MADT entry types
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_PCAT_COMPAT = 1
LAPIC_ENABLED = 1

# FADT
FADT_REVISION = 6
FADT_MINOR_REVISION = 5  # ACPI 6.5
FADT_LENGTH = 276
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
RESET_PORT = 0x64  # the 8042 command port...
RESET_VALUE = 0xFE  # ...and its "pulse reset" command

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes


def checksum8(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    buf = bytearray(data)
    buf[offset] = 0
    buf[offset] = checksum8(buf)
    return bytes(buf)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (checksum filled in) and ``body``."""
    table_id = (b"PYKVM" + signature)[:8]
    header = _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, table_id, 1, CREATOR_ID, 1)
    return _with_checksum(header + body, 9)


def rsdp(rsdt_gpa: int, xsdt_gpa: int) -> bytes:
    """The 36-byte ACPI 2.0+ Root System Description Pointer."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_gpa, 36, xsdt_gpa, 0))
    data[8] = checksum8(data[:20])
    data[32] = checksum8(data)
    return bytes(data)


def madt(ncpus: int, ioapic_id: int, *, ioapic_gpa: int = IOAPIC_GPA, lapic_gpa: int = LAPIC_GPA,
         irq0_override: bool = True) -> bytes:
    body = struct.pack("<II", lapic_gpa, MADT_PCAT_COMPAT)
    for cpu in range(ncpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, ioapic_gpa, 0)
    if irq0_override:
        body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)  # ISA IRQ0 -> GSI 2
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)  # all processors, LINT1
    return sdt(b"APIC", 5, body)


def _gas(space: int, bit_width: int, access_size: int, address: int) -> bytes:
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def fadt(dsdt_gpa: int) -> bytes:
    """A hardware-reduced ACPI 6.5 FADT pointing at the DSDT."""
    body = bytearray(FADT_LENGTH - _HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:  # offsets as in the spec's table (from the header)
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    put(40, "<I", dsdt_gpa)  # DSDT
    put(108, "<B", CMOS_CENTURY)  # CENTURY
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT)  # IAPC_BOOT_ARCH
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    body[116 - _HEADER.size : 128 - _HEADER.size] = _gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, RESET_PORT)  # RESET_REG
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR_REVISION)
    put(140, "<Q", dsdt_gpa)  # X_DSDT
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def dsdt() -> bytes:
    """An empty DSDT (revision 2: 64-bit AML integers)."""
    return sdt(b"DSDT", 2, b"")


def _align(value: int, to: int = 16) -> int:
    return (value + to - 1) & -to


@dataclass(frozen=True)
class AcpiTables:
    """Where each table goes: ``blobs`` maps a GPA to the bytes to write there."""

    rsdp: int
    tables: dict[str, int]  # signature ("RSDP", "XSDT", "RSDT", "FACP", "DSDT", "APIC") -> GPA
    blobs: dict[int, bytes] = field(repr=False)

    @property
    def start(self) -> int:
        return min(self.blobs)

    @property
    def end(self) -> int:
        """The first GPA past the tables (reserve [start, end) for them in the memory map)."""
        return max(gpa + len(data) for gpa, data in self.blobs.items())

    def table(self, signature: str) -> bytes:
        return self.blobs[self.tables[signature]]

    def write(self, memory) -> None:
        """Copy every table into guest memory (anything with ``write(gpa, data)``)."""
        for gpa, data in self.blobs.items():
            memory.write(gpa, data)


def build_acpi(
    ncpus: int,
    base_gpa: int = ACPI_BASE,
    *,
    ioapic_id: int | None = None,
    ioapic_gpa: int = IOAPIC_GPA,
    lapic_gpa: int = LAPIC_GPA,
    irq0_override: bool = True,
    limit_gpa: int | None = RSDP_SCAN_END,
) -> AcpiTables:
    """Lay the tables for ``ncpus`` CPUs and one I/O APIC out from ``base_gpa`` (RSDP first).

    Every table lies below ``limit_gpa`` (default: the end of the BIOS area), or ValueError.
    """
    if not 1 <= ncpus <= MAX_XAPIC_CPUS:
        raise ValueError(f"xAPIC tables describe 1-{MAX_XAPIC_CPUS} CPUs, not {ncpus}")
    ioapic_id = ncpus if ioapic_id is None else ioapic_id
    if not 0 <= ioapic_id <= 0xFE or ioapic_id < ncpus:
        raise ValueError(f"I/O APIC ID {ioapic_id} collides with a CPU's APIC ID (0-{ncpus - 1}) or is invalid")
    if base_gpa % 16:
        raise ValueError(f"the RSDP must be 16-byte aligned, not at {base_gpa:#x}")

    madt_blob = madt(ncpus, ioapic_id, ioapic_gpa=ioapic_gpa, lapic_gpa=lapic_gpa, irq0_override=irq0_override)
    dsdt_blob = dsdt()
    at = {"RSDP": base_gpa}
    cursor = _align(base_gpa + 36)
    sizes = {"XSDT": _HEADER.size + 16, "RSDT": _HEADER.size + 8, "FACP": FADT_LENGTH,
             "DSDT": len(dsdt_blob), "APIC": len(madt_blob)}
    for name, size in sizes.items():
        at[name] = cursor
        cursor = _align(cursor + size)
    limit = min(limit_gpa or 1 << 32, 1 << 32)  # the RSDT holds 32-bit addresses
    if at["APIC"] + sizes["APIC"] > limit:
        raise ValueError(f"the ACPI tables from {base_gpa:#x} would pass {limit:#x}")

    blobs = {
        at["RSDP"]: rsdp(at["RSDT"], at["XSDT"]),
        at["XSDT"]: sdt(b"XSDT", 1, struct.pack("<QQ", at["FACP"], at["APIC"])),
        at["RSDT"]: sdt(b"RSDT", 1, struct.pack("<II", at["FACP"], at["APIC"])),
        at["FACP"]: fadt(at["DSDT"]),
        at["DSDT"]: dsdt_blob,
        at["APIC"]: madt_blob,
    }
    return AcpiTables(base_gpa, at, blobs)
