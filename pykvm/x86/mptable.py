"""Intel MultiProcessor Specification 1.4 tables: how a pre-ACPI kernel finds CPUs and the I/O APIC.

Layouts from the MP Specification, version 1.4 (May 1997), chapter 4: 4.1 MP Floating Pointer
Structure, 4.2 MP Configuration Table Header, 4.3.1 Processor Entries, 4.3.2 Bus Entries, 4.3.3
I/O APIC Entries, 4.3.4 I/O Interrupt Assignment Entries, 4.3.5 Local Interrupt Assignment
Entries. The entries are those SeaBIOS writes for QEMU (``src/fw/mptable.c``):

* one processor entry per CPU: local APIC ID = index, version 0x14, enabled, the BSP flag on
  CPU 0, signature family 6, features FPU | APIC;
* bus 0, "ISA   ";
* the I/O APIC: ID ``ncpus`` unless given, version 0x11, enabled, at 0xFEC00000;
* ISA IRQs 0-15 to I/O APIC pins 0-15, flags 0 (conforming to ISA: edge, active high), except
  that with the irq0 override IRQ 0 goes to pin 2 and ISA IRQ 2 (the 8259 cascade, never a
  device's) gets no entry, since pin 2 is taken;
* ExtINT on LINT0 of the BSP (virtual wire through the local APIC) and NMI on LINT1 of all.

The floating pointer goes at ``base_gpa`` (default 0xF0000: kernels scan the BIOS ROM area
0xF0000-0xFFFFF, besides the first KiB of the EBDA and the last KiB of base memory); the
configuration table follows it. Feature byte 1 = 0 (a configuration table is present) and
feature byte 2 bit 7 (IMCRP) = 0: virtual wire mode, no IMCR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .acpi import IOAPIC_GPA, LAPIC_GPA, MAX_XAPIC_CPUS, checksum8

MPTABLE_BASE = 0xF0000
MP_SPEC_REV = 4  # version 1.4
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = 0x201  # CPUID.1:EDX FPU (bit 0) | APIC (bit 9)
OEM_ID = b"PYKVM   "
PRODUCT_ID = b"PYKVM       "

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
ENTRY_SIZES = {ENTRY_PROCESSOR: 20, ENTRY_BUS: 8, ENTRY_IOAPIC: 8, ENTRY_IO_INTERRUPT: 8, ENTRY_LOCAL_INTERRUPT: 8}

CPU_ENABLED = 0x01
CPU_BSP = 0x02
IOAPIC_ENABLED = 0x01
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_SMI = 2
INT_TYPE_EXTINT = 3
ISA_BUS_ID = 0
ALL_LOCAL_APICS = 0xFF

FLOATING = struct.Struct("<4sIBBB5B")  # "_MP_", table address, length/16, spec rev, checksum, features
HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")  # "PCMP" ... (44 bytes)


def _processor(apic_id: int, bsp: bool) -> bytes:
    flags = CPU_ENABLED | (CPU_BSP if bsp else 0)
    return struct.pack("<BBBBII8x", ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)


def _interrupt(kind: int, int_type: int, bus_irq: int, dest: int, pin: int, src_bus: int = ISA_BUS_ID) -> bytes:
    return struct.pack("<BBHBBBB", kind, int_type, 0, src_bus, bus_irq, dest, pin)


def isa_irq_pins(irq0_override: bool = True) -> dict[int, int]:
    """ISA IRQ -> I/O APIC pin, as the MP table (and a matching GSI routing) wires them."""
    if not irq0_override:
        return {irq: irq for irq in range(16)}
    return {irq: (2 if irq == 0 else irq) for irq in range(16) if irq != 2}


@dataclass(frozen=True)
class MpTable:
    """The floating pointer at ``floating`` and the configuration table at ``config``."""

    floating: int
    config: int
    blobs: dict[int, bytes] = field(repr=False)

    @property
    def end(self) -> int:
        return max(gpa + len(data) for gpa, data in self.blobs.items())

    def write(self, memory) -> None:
        for gpa, data in self.blobs.items():
            memory.write(gpa, data)


def build_mptable(
    ncpus: int,
    base_gpa: int = MPTABLE_BASE,
    *,
    ioapic_id: int | None = None,
    ioapic_gpa: int = IOAPIC_GPA,
    lapic_gpa: int = LAPIC_GPA,
    irq0_override: bool = True,
) -> MpTable:
    """MP tables for ``ncpus`` CPUs and one I/O APIC, the floating pointer at ``base_gpa``."""
    if not 1 <= ncpus <= MAX_XAPIC_CPUS:
        raise ValueError(f"MP tables describe 1-{MAX_XAPIC_CPUS} CPUs, not {ncpus}")
    ioapic_id = ncpus if ioapic_id is None else ioapic_id
    if not 0 <= ioapic_id <= 0xFE or ioapic_id < ncpus:
        raise ValueError(f"I/O APIC ID {ioapic_id} collides with a CPU's APIC ID (0-{ncpus - 1}) or is invalid")
    if base_gpa % 16:
        raise ValueError(f"the MP floating pointer must be 16-byte aligned, not at {base_gpa:#x}")

    entries = [_processor(cpu, cpu == 0) for cpu in range(ncpus)]
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, ioapic_gpa))
    for irq, pin in isa_irq_pins(irq0_override).items():
        entries.append(_interrupt(ENTRY_IO_INTERRUPT, INT_TYPE_INT, irq, ioapic_id, pin))
    entries.append(_interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0))  # BSP LINT0
    entries.append(_interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ALL_LOCAL_APICS, 1))  # LINT1
    body = b"".join(entries)

    config_gpa = base_gpa + FLOATING.size
    length = HEADER.size + len(body)
    header = HEADER.pack(b"PCMP", length, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0, len(entries), lapic_gpa, 0, 0)
    config = bytearray(header + body)
    config[7] = checksum8(config)  # base table checksum; no extended entries (length 0, checksum 0)

    floating = bytearray(FLOATING.pack(b"_MP_", config_gpa, 1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0))
    floating[10] = checksum8(floating)
    if config_gpa + length > 1 << 32:
        raise ValueError("the MP configuration table must lie below 4 GiB")
    return MpTable(base_gpa, config_gpa, {base_gpa: bytes(floating), config_gpa: bytes(config)})
