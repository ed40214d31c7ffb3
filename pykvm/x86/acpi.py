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

``build_acpi(..., platform="pc")`` describes a machine with ACPI fixed hardware as QEMU's ``pc``
has it (:class:`pykvm.devices.acpi_pm.AcpiPm`), in place of the hardware-reduced FADT:

* FADT (revision 6.5, not hardware-reduced), fields as QEMU's ``init_common_fadt_data``
  (``hw/i386/acpi-build.c``): INT_MODEL 1, SCI_INT 9, SMI_CMD 0 (no SMM, hence no ACPI
  enable handshake: the system is always in ACPI mode), PM1a_EVT_BLK = ``pm_base``,
  PM1a_CNT_BLK = ``pm_base`` + 4, PM_TMR_BLK = ``pm_base`` + 8, GPE0_BLK = ``gpe0_base``,
  lengths 4 / 2 / 4 / 4, P_LVL2_LAT = P_LVL3_LAT = 0xFFF (no C2 / C3), CENTURY 0x32, flags
  WBINVD, PROC_C1, SLP_BUTTON (no fixed sleep button), RTC_S4, USE_PLATFORM_CLOCK, and
  FORCE_APIC_CLUSTER_MODEL with more than 8 CPUs, as QEMU; plus RESET_REG_SUP with RESET_REG =
  system I/O 0xCF9, value 0x06 (QEMU's ``pc`` FADT is revision 1 and has no reset register;
  its ``q35`` one says 0xCF9 / 0x0F: see :mod:`pykvm.devices.reset`). Every block is also given
  as an X_ generic address (system I/O, bit width = length * 8). FIRMWARE_CTRL points at the
  FACS (the 32-bit field only, as QEMU; kvm-unit-tests' ``find_acpi_table_addr`` reads it).
* FACS: 64 bytes, 64-byte aligned, version 2, waking vector 0 -- ``x86/s3.c`` writes its
  resume code's address into FIRMWARE_WAKING_VECTOR (offset 12) before entering S3.
* DSDT: ``\\_S3`` = Package {1, 1, 0, 0} and ``\\_S5`` = Package {0, 0, 0, 0}, the SLP_TYP values
  QEMU's piix4 DSDT gives (``build_dsdt``); AcpiPm takes the same values.
* MADT: as above, plus QEMU's level-triggered, active-high interrupt source overrides
  (flags 0x000D) for ISA IRQs 5, 9, 10 and 11 (the SCI and the PCI INTx lines), so an OS does
  not take the SCI as ACPI's default active-low.

``ecam_base`` (either platform) adds an MCFG (PCI Firmware Specification 3.2, 4.1.2) with one
allocation: that base, segment 0, buses ``ecam_buses`` (default 0-255), listed in the XSDT and
RSDT after the MADT.

kvm-unit-tests (``lib/acpi.c``) finds the tables by scanning 0xE0000-0xFFFFF in 16-byte steps for
"RSD PTR ", then the XSDT (RSDP revision >= 2) for FACP / APIC, and FACS through
FADT.FIRMWARE_CTRL: the default layout (RSDP at 0xE0000) is found that way.
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
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_RTC_S4 = 1 << 7
FADT_RESET_REG_SUP = 1 << 10
FADT_USE_PLATFORM_CLOCK = 1 << 15
FADT_FORCE_APIC_CLUSTER_MODEL = 1 << 18
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3
RESET_PORT = 0x64  # the 8042 command port...
RESET_VALUE = 0xFE  # ...and its "pulse reset" command

# platform="pc": ACPI fixed hardware (pykvm.devices.acpi_pm, pykvm.devices.reset)
PLATFORMS = ("reduced", "pc")
PM_BASE = 0x600  # as QEMU 7.2 with its SeaBIOS (pykvm/devices/acpi_pm.py)
GPE0_BASE = 0xAFE0
GPE0_LEN = 4
SCI_IRQ = 9
PC_RESET_PORT = 0xCF9  # PIIX3 reset control...
PC_RESET_VALUE = 0x06  # ...RST_CPU | SYS_RST
PCI_LEVEL_IRQS = (5, 9, 10, 11)  # QEMU's ACPI_BUILD_PCI_IRQS: overrides 0x000D (level, active high)
ISO_LEVEL_HIGH = 0x000D
SLP_TYP_S3 = 1
SLP_TYP_S5 = 0
FACS_LENGTH = 64
FACS_VERSION = 2
MCFG_REVISION = 1

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
         irq0_override: bool = True, level_irqs: tuple[int, ...] = ()) -> bytes:
    body = struct.pack("<II", lapic_gpa, MADT_PCAT_COMPAT)
    for cpu in range(ncpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, ioapic_gpa, 0)
    if irq0_override:
        body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)  # ISA IRQ0 -> GSI 2
    for irq in level_irqs:  # ISA IRQ n -> GSI n, level-triggered, active high
        body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, irq, irq, ISO_LEVEL_HIGH)
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


def pc_fadt(dsdt_gpa: int, facs_gpa: int, *, ncpus: int = 1, pm_base: int = PM_BASE,
            gpe0_base: int = GPE0_BASE, sci_irq: int = SCI_IRQ) -> bytes:
    """A full (not hardware-reduced) ACPI 6.5 FADT for the PIIX4-style PM block at ``pm_base``."""
    body = bytearray(FADT_LENGTH - _HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:  # offsets as in the spec's table (from the header)
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    def gas(offset: int, length: int, access: int, address: int) -> None:
        body[offset - _HEADER.size : offset - _HEADER.size + 12] = _gas(GAS_SYSTEM_IO, 8 * length, access, address)

    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RTC_S4 | FADT_RESET_REG_SUP | FADT_USE_PLATFORM_CLOCK
    if ncpus > 8:
        flags |= FADT_FORCE_APIC_CLUSTER_MODEL
    put(36, "<I", facs_gpa)  # FIRMWARE_CTRL
    put(40, "<I", dsdt_gpa)  # DSDT
    put(44, "<B", 1)  # INT_MODEL (ACPI 1.0): multiple APIC
    put(46, "<H", sci_irq)  # SCI_INT; SMI_CMD, ACPI_ENABLE, ACPI_DISABLE stay 0
    put(56, "<I", pm_base)  # PM1a_EVT_BLK
    put(64, "<I", pm_base + 4)  # PM1a_CNT_BLK
    put(76, "<I", pm_base + 8)  # PM_TMR_BLK
    put(80, "<I", gpe0_base)  # GPE0_BLK
    put(88, "<BBBBB", 4, 2, 0, 4, GPE0_LEN)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN
    put(96, "<HH", 0xFFF, 0xFFF)  # P_LVL2_LAT, P_LVL3_LAT: no C2, no C3
    put(108, "<B", CMOS_CENTURY)
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT)
    put(112, "<I", flags)
    gas(116, 1, GAS_ACCESS_BYTE, PC_RESET_PORT)  # RESET_REG
    put(128, "<B", PC_RESET_VALUE)
    put(131, "<B", FADT_MINOR_REVISION)
    put(140, "<Q", dsdt_gpa)  # X_DSDT (X_FIRMWARE_CTRL stays 0: the FACS is below 4 GiB)
    gas(148, 4, GAS_ACCESS_WORD, pm_base)  # X_PM1a_EVT_BLK
    gas(172, 2, GAS_ACCESS_WORD, pm_base + 4)  # X_PM1a_CNT_BLK
    gas(208, 4, GAS_ACCESS_DWORD, pm_base + 8)  # X_PM_TMR_BLK
    gas(220, GPE0_LEN, GAS_ACCESS_BYTE, gpe0_base)  # X_GPE0_BLK
    return sdt(b"FACP", FADT_REVISION, bytes(body))


FACS_WAKING_VECTOR = 12  # FIRMWARE_WAKING_VECTOR's offset in the FACS (ACPI 6.5, 5.2.10)


def facs() -> bytes:
    """The 64-byte Firmware ACPI Control Structure (no header checksum: it has none)."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def _aml_sleep_package(name: bytes, slp_typ: int) -> bytes:
    """``Name (_Sx_, Package (4) {typ, typ, 0, 0})`` in AML (NameOp, PackageOp, 6-byte package)."""
    value = b"\x00" if slp_typ == 0 else b"\x01" if slp_typ == 1 else b"\x0a" + bytes([slp_typ])
    elements = value + value + b"\x00\x00"
    return b"\x08" + name + b"\x12" + bytes([2 + len(elements), 4]) + elements


def _pkg_length(body_length: int) -> bytes:
    """AML PkgLength of a package whose body (after the PkgLength) is ``body_length`` bytes; the
    encoded length counts the PkgLength bytes themselves (ACPI 6.5, 20.2.4)."""
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"an AML package of {body_length} bytes is too large")


def _aml_integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])  # ZeroOp, OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"{value:#x} does not fit an AML integer")


def _aml_name(name: bytes, value: bytes) -> bytes:
    return b"\x08" + name + value  # NameOp NameSeg DataRefObject


def virtio_mmio_device(index: int, gpa: int, size: int, irq: int) -> bytes:
    """``Device (VRnn)`` for a virtio-mmio transport, as Linux's virtio_mmio driver matches it by
    ACPI (_HID "LNRO0005"): its registers (Memory32Fixed) and its interrupt (edge, active high:
    pykvm raises it through an irqfd, one edge per notification)."""
    if not 0 <= index <= 0xFF:
        raise ValueError(f"virtio-mmio device index {index} is out of range (0-255)")
    resources = (b"\x86\x09\x00\x01" + struct.pack("<II", gpa, size)  # Memory32Fixed (ReadWrite, ...)
                 + b"\x89\x06\x00\x03\x01" + struct.pack("<I", irq)  # Interrupt (Consumer, Edge, ActiveHigh, Exclusive)
                 + b"\x79\x00")  # EndTag
    buffer = _aml_integer(len(resources)) + resources
    crs = b"\x11" + _pkg_length(len(buffer)) + buffer  # BufferOp
    body = (b"VR%02X" % index + _aml_name(b"_HID", b"\x0dLNRO0005\x00") + _aml_name(b"_UID", _aml_integer(index))
            + _aml_name(b"_CCA", b"\x01") + _aml_name(b"_CRS", crs))
    return b"\x5b\x82" + _pkg_length(len(body)) + body  # DeviceOp


def dsdt(*, sleep_states: bool = False, virtio_mmio: tuple[tuple[int, int, int], ...] = ()) -> bytes:
    """A DSDT (revision 2: 64-bit AML integers): empty, or with the \\_S3 and \\_S5 packages, and
    a ``\\_SB.VRnn`` device for each virtio-mmio transport (gpa, size, irq)."""
    aml = b""
    if sleep_states:
        aml = _aml_sleep_package(b"_S3_", SLP_TYP_S3) + _aml_sleep_package(b"_S5_", SLP_TYP_S5)
    if virtio_mmio:
        devices = b"".join(virtio_mmio_device(i, *t) for i, t in enumerate(virtio_mmio))
        body = b"\\_SB_" + devices
        aml += b"\x10" + _pkg_length(len(body)) + body  # ScopeOp
    return sdt(b"DSDT", 2, aml)


def mcfg(ecam_base: int, bus_start: int = 0, bus_end: int = 255, segment: int = 0) -> bytes:
    """An MCFG with one ECAM allocation."""
    if not 0 <= bus_start <= bus_end <= 255 or ecam_base % (1 << 20):
        raise ValueError(f"ECAM at {ecam_base:#x} for buses {bus_start}-{bus_end} is invalid")
    return sdt(b"MCFG", MCFG_REVISION, bytes(8) + struct.pack("<QHBB4x", ecam_base, segment, bus_start, bus_end))


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
    platform: str = "reduced",
    pm_base: int = PM_BASE,
    gpe0_base: int = GPE0_BASE,
    sci_irq: int = SCI_IRQ,
    ecam_base: int | None = None,
    ecam_buses: tuple[int, int] = (0, 255),
    virtio_mmio: tuple[tuple[int, int, int], ...] = (),
) -> AcpiTables:
    """Lay the tables for ``ncpus`` CPUs and one I/O APIC out from ``base_gpa`` (RSDP first).

    ``platform``: "reduced" (the default: hardware-reduced FADT, empty DSDT) or "pc" (FADT with
    the PM1a / PM timer / GPE0 blocks at ``pm_base`` / ``gpe0_base`` and SCI ``sci_irq``, a FACS,
    a DSDT with \\_S3 / \\_S5, level overrides in the MADT). ``ecam_base`` adds an MCFG,
    ``virtio_mmio`` ((gpa, size, irq) each) virtio-mmio devices to the DSDT; their IRQs are edge-
    triggered (an irqfd's pulse), so the MADT has no level override for them.
    Every table lies below ``limit_gpa`` (default: the end of the BIOS area), or ValueError.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform is one of {PLATFORMS}, not {platform!r}")
    if not 1 <= ncpus <= MAX_XAPIC_CPUS:
        raise ValueError(f"xAPIC tables describe 1-{MAX_XAPIC_CPUS} CPUs, not {ncpus}")
    ioapic_id = ncpus if ioapic_id is None else ioapic_id
    if not 0 <= ioapic_id <= 0xFE or ioapic_id < ncpus:
        raise ValueError(f"I/O APIC ID {ioapic_id} collides with a CPU's APIC ID (0-{ncpus - 1}) or is invalid")
    if base_gpa % 16:
        raise ValueError(f"the RSDP must be 16-byte aligned, not at {base_gpa:#x}")
    pc = platform == "pc"

    madt_blob = madt(ncpus, ioapic_id, ioapic_gpa=ioapic_gpa, lapic_gpa=lapic_gpa, irq0_override=irq0_override,
                     level_irqs=tuple(i for i in PCI_LEVEL_IRQS if i not in {v[2] for v in virtio_mmio}) if pc else ())
    dsdt_blob = dsdt(sleep_states=pc, virtio_mmio=tuple(virtio_mmio))
    mcfg_blob = mcfg(ecam_base, *ecam_buses) if ecam_base is not None else None
    listed = ["FACP", "APIC"] + (["MCFG"] if mcfg_blob else [])
    at = {"RSDP": base_gpa}
    cursor = _align(base_gpa + 36)
    sizes = {"XSDT": _HEADER.size + 8 * len(listed), "RSDT": _HEADER.size + 4 * len(listed), "FACP": FADT_LENGTH,
             "DSDT": len(dsdt_blob), "APIC": len(madt_blob)}
    if mcfg_blob:
        sizes["MCFG"] = len(mcfg_blob)
    if pc:
        sizes["FACS"] = FACS_LENGTH
    for name, size in sizes.items():
        cursor = _align(cursor, 64 if name == "FACS" else 16)
        at[name] = cursor
        cursor += size
    end = max(at[name] + size for name, size in sizes.items())
    limit = min(limit_gpa or 1 << 32, 1 << 32)  # the RSDT holds 32-bit addresses
    if end > limit:
        raise ValueError(f"the ACPI tables from {base_gpa:#x} would pass {limit:#x}")

    blobs = {
        at["RSDP"]: rsdp(at["RSDT"], at["XSDT"]),
        at["XSDT"]: sdt(b"XSDT", 1, struct.pack(f"<{len(listed)}Q", *(at[n] for n in listed))),
        at["RSDT"]: sdt(b"RSDT", 1, struct.pack(f"<{len(listed)}I", *(at[n] for n in listed))),
        at["FACP"]: (pc_fadt(at["DSDT"], at["FACS"], ncpus=ncpus, pm_base=pm_base, gpe0_base=gpe0_base,
                             sci_irq=sci_irq) if pc else fadt(at["DSDT"])),
        at["DSDT"]: dsdt_blob,
        at["APIC"]: madt_blob,
    }
    if mcfg_blob:
        blobs[at["MCFG"]] = mcfg_blob
    if pc:
        blobs[at["FACS"]] = facs()
    return AcpiTables(base_gpa, at, blobs)
