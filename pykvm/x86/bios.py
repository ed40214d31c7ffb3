"""What a PC's firmware leaves behind for a ``-kernel`` guest, without running one.

On QEMU, SeaBIOS runs before the kernel that ``-kernel`` names and leaves the machine in a state
that test kernels take for granted; pykvm has no firmware, so :func:`leave_firmware_state` puts
the same state in place directly (as SeaBIOS 1.16 does it: ``src/fw/pic.c``, ``src/hw/timer.c``,
``src/post.c``, ``src/fw/pciinit.c``):

* the real-mode interrupt vector table (0-0x3FF): every vector points at a handler in the BIOS
  area, vectors 0x08-0x0F (master PIC) send the master an EOI, 0x70-0x77 (slave) both PICs, the
  others just IRET, so a real-mode kernel that enables interrupts takes them and returns;
* the BIOS data area: the EBDA's segment at 0x40E (0x9FC0: the last KiB below 640 KiB, as the
  multiboot memory map says) and the base memory size at 0x413 (639 KiB);
* the 8259s initialised with SeaBIOS's vector bases, master 0x08 and slave 0x70, edge-triggered
  but for the PCI interrupt lines 10 and 11 (level, through the ELCR), with the timer (IRQ 0), the
  keyboard (1) and the cascade (2) unmasked;
* the PIT's channel 0 counting in mode 2 with the count 65536, the BIOS's 18.2 Hz tick.
"""

from __future__ import annotations

import struct

from ..constants import IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE

IVT_VECTORS = 256
STUB_SEGMENT = 0xF000
STUB_BASE = 0xFFE00  # the top of the BIOS area, above the MP table SeaBIOS-style tables use
EBDA_SEGMENT = 0x9FC0
BASE_MEMORY_KIB = 639
MASTER_BASE, SLAVE_BASE = 0x08, 0x70
MASTER_IMR, SLAVE_IMR = 0xF8, 0xFF  # IRQ 0, 1, 2 unmasked
SLAVE_ELCR = 0x0C  # IRQ 10 and 11 level-triggered (SeaBIOS's PCI interrupt lines)
PIT_MODE_RATE_GENERATOR = 2
PIT_RW_LSB_MSB = 3

_IRET = b"\xcf"
_EOI_MASTER = b"\x50\xb0\x20\xe6\x20\x58\xcf"  # push ax; mov al, 0x20; out 0x20, al; pop ax; iret
_EOI_BOTH = b"\x50\xb0\x20\xe6\xa0\xe6\x20\x58\xcf"  # ... out 0xa0, al; out 0x20, al ...


def ivt_and_stubs() -> tuple[bytes, bytes]:
    """(the 1 KiB interrupt vector table, the handler code at STUB_BASE)."""
    code = _IRET + _EOI_MASTER + _EOI_BOTH
    offsets = {"iret": 0, "master": len(_IRET), "both": len(_IRET) + len(_EOI_MASTER)}
    base = STUB_BASE - (STUB_SEGMENT << 4)
    ivt = b""
    for vector in range(IVT_VECTORS):
        kind = ("master" if MASTER_BASE <= vector < MASTER_BASE + 8 else
                "both" if SLAVE_BASE <= vector < SLAVE_BASE + 8 else "iret")
        ivt += struct.pack("<HH", base + offsets[kind], STUB_SEGMENT)
    return ivt, code


def leave_firmware_state(vm, memory, *, pit: bool = True) -> None:
    """Put in place what SeaBIOS leaves for a ``-kernel`` guest (see the module's docstring).
    Call it before the kernel is loaded: the kernel's own image and tables may then overwrite
    low memory as they would SeaBIOS's."""
    ivt, code = ivt_and_stubs()
    memory.write(0, ivt)
    memory.write(STUB_BASE, code)
    memory.write(0x40E, struct.pack("<H", EBDA_SEGMENT))
    memory.write(0x413, struct.pack("<H", BASE_MEMORY_KIB))
    for chip_id, base, imr, elcr in ((IRQCHIP_PIC_MASTER, MASTER_BASE, MASTER_IMR, 0),
                                     (IRQCHIP_PIC_SLAVE, SLAVE_BASE, SLAVE_IMR, SLAVE_ELCR)):
        chip = vm.get_irqchip(chip_id)
        pic = chip.chip.pic
        pic.irq_base, pic.imr, pic.init4, pic.init_state = base, imr, 1, 0
        pic.elcr = elcr & pic.elcr_mask
        pic.irr = pic.isr = 0
        vm.set_irqchip(chip)
    if pit:
        state = vm.get_pit2()
        ch = state.channels[0]
        ch.count, ch.mode, ch.rw_mode, ch.bcd, ch.gate = 0x10000, PIT_MODE_RATE_GENERATOR, PIT_RW_LSB_MSB, 0, 1
        ch.read_state = ch.write_state = PIT_RW_LSB_MSB
        vm.set_pit2(state)
