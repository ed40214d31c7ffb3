"""pykvm.x86.bios: the state SeaBIOS leaves for a -kernel guest, put in place without a firmware."""

from __future__ import annotations

import struct

import pytest

from pykvm.constants import IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE
from pykvm.x86 import bios


def _handler(ivt: bytes, code: bytes, vector: int) -> bytes:
    offset, segment = struct.unpack_from("<HH", ivt, 4 * vector)
    start = (segment << 4) + offset - bios.STUB_BASE
    return code[start : code.index(b"\xcf", start) + 1]


def test_every_vector_has_a_handler_and_the_pic_vectors_send_an_eoi():
    ivt, code = bios.ivt_and_stubs()
    assert len(ivt) == 1024 and bios.STUB_BASE + len(code) <= 0x100000
    assert _handler(ivt, code, 0x10) == b"\xcf"  # iret
    for vector in range(0x08, 0x10):  # out 0x20, al with al = 0x20 (non-specific EOI), registers kept
        assert _handler(ivt, code, vector) == b"\x50\xb0\x20\xe6\x20\x58\xcf"
    for vector in range(0x70, 0x78):
        assert _handler(ivt, code, vector) == b"\x50\xb0\x20\xe6\xa0\xe6\x20\x58\xcf"


@pytest.mark.kvm
def test_the_pics_and_the_pit_are_left_as_seabios_leaves_them(kvm_machine):
    m = kvm_machine("real", irqchip=True)
    bios.leave_firmware_state(m.vm, m.memory)
    chips = [m.vm.get_irqchip(IRQCHIP_PIC_MASTER), m.vm.get_irqchip(IRQCHIP_PIC_SLAVE)]  # cffi: keep the owners
    master, slave = chips[0].chip.pic, chips[1].chip.pic
    assert (master.irq_base, master.imr, slave.irq_base, slave.imr) == (0x08, 0xF8, 0x70, 0xFF)
    assert slave.elcr == 0x0C and master.elcr == 0
    pit = m.vm.get_pit2()
    ch0 = pit.channels[0]
    assert (ch0.count, ch0.mode, ch0.gate) == (0x10000, 2, 1)
    assert m.memory.read(0x40E, 2) == struct.pack("<H", 0x9FC0) and m.memory.read(0x413, 2) == struct.pack("<H", 639)
    assert m.memory.read(0, 1024) == bios.ivt_and_stubs()[0]


@pytest.mark.kvm
def test_a_real_mode_guest_that_halts_with_interrupts_on_is_woken_by_the_bios_tick(guest_asm, kvm_machine, run_guest):
    """kvm-unit-tests' realmode test does `sti; hlt` and relies on the BIOS's timer tick to go on."""
    image = guest_asm("""
        .code16
        xor %ax, %ax
        mov %ax, %ds
        movw $0, (0x500)
        sti
        hlt
        hlt
        cli
    """, "real")
    m = kvm_machine("real", image=image, irqchip=True)
    bios.leave_firmware_state(m.vm, m.memory)
    result = run_guest(m, timeout=10)
    assert result.ok
    master = m.vm.get_irqchip(IRQCHIP_PIC_MASTER)
    assert master.chip.pic.isr == 0  # the stub's EOI reached the PIC
