"""Two PC chipset ports: the PIIX3 reset control register (0xCF9) and system control port B (0x61).

Reset control, after QEMU's ``hw/isa/piix.c`` (``rcr_write`` / ``rcr_read``) and the Intel
82371SB (PIIX3) datasheet, "Reset Control Register":

* A write with bit 2 (RST_CPU) set resets the machine, whatever bit 1 says (QEMU does not look
  at it: a "hard" and a "soft" reset are the same reset there). The run ends with
  :class:`pykvm.devices.i8042.Reset` (status 0), the value the 8042's reset line already gives,
  with ``source`` naming 0xCF9.
* A write without bit 2 keeps only bit 1 (SYS_RST, the reset type); a read returns it.
* The FADT's RESET_REG that :func:`pykvm.x86.acpi.build_acpi` writes for ``platform="pc"`` is
  this port with value 0x06 (RST_CPU | SYS_RST, the hard reset Linux's ``reboot=pci`` also
  writes). QEMU's own FADTs differ: ``pc`` has a revision 1 FADT without RESET_REG, ``q35``
  points RESET_REG at 0xCF9 with 0x0F (ICH9's RST_CNT, whose bit 3 is a full reset).

0xCF9 lies inside the PCI host's 0xCF8-0xCFB CONFIG_ADDRESS window: QEMU overlays the one byte.
pykvm's bus has no overlays, so :class:`pykvm.devices.pci.PciHost` decodes 0xCF9 itself and calls
its ``reset`` callable; pass it :func:`reset_control_reset`. :class:`ResetControl` is the same
register for a machine without the PCI host (one port, 0xCF9).

System control port B (0x61), after QEMU's ``hw/audio/pcspk.c`` (``pcspk_io_read`` /
``pcspk_io_write``) and ``hw/i386/kvm/i8254.c`` (the PIT state behind it when KVM runs the PIT):

* Read: bit 0 the PIT channel 2 gate, bit 1 the speaker data enable (as last written), bit 4 a
  refresh indicator that flips on every read (QEMU's ``dummy_refresh_clock``; a guest that
  waits for it to change sees it change at once), bit 5 the PIT channel 2 output. Bits 2-3 and
  6-7 (parity / NMI status) read 0.
* Write: bit 0 sets the channel 2 gate, bit 1 the speaker data enable; other bits are ignored.

Whether KVM decodes 0x61: KVM's in-kernel PIT (``arch/x86/kvm/i8254.c``, ``kvm_create_pit``)
registers its dummy speaker at 0x61 only when ``KVM_CREATE_PIT2`` gets the
``KVM_PIT_SPEAKER_DUMMY`` flag. pykvm's machine creates the PIT with flags 0 (as QEMU does), so
0x61 exits to user space either way and this device is for machines with and without the
in-kernel PIT:

* With ``pit`` (anything with ``get_pit2()`` / ``set_pit2(state)``: :class:`pykvm.vm.Vm`), the
  gate and output are KVM's channel 2, read with ``KVM_GET_PIT2``; the output is computed from
  the channel's mode, count and load time the way QEMU's ``pit_get_out`` does, at
  ``clock_ns()`` (default ``time.monotonic_ns``: CLOCK_MONOTONIC, the clock KVM's
  ``count_load_time`` is in). A gate write goes back with ``KVM_SET_PIT2``; a rising gate in
  modes 1, 2, 3 and 5 restarts the count as in QEMU's ``kvm_pit_set_gate``. (KVM_SET_PIT2
  reloads every channel's count, restarting the counts of channels 0 and 1 too; QEMU accepts
  the same.)
* Without ``pit`` the gate is a latch of bit 0 and bit 5 reads 0: there is no timer behind it.
  A guest that calibrates its TSC with PIT channel 2 (Linux's ``pit_calibrate_tsc``) then
  falls back to other methods.
"""

from __future__ import annotations

import time
from typing import Callable

from ..outcome import Outcome
from .base import Device, field
from .i8042 import Reset

RESET_CONTROL_PORT = 0xCF9
RCR_SYS_RST = 0x02  # reset type (kept)
RCR_RST_CPU = 0x04  # writing 1 resets
RESET_VALUE = RCR_RST_CPU | RCR_SYS_RST  # what the FADT's RESET_VALUE says

PORT_B = 0x61
PORTB_GATE2 = 0x01
PORTB_SPEAKER = 0x02
PORTB_REFRESH = 0x10
PORTB_OUT2 = 0x20

PIT_FREQ = 1193182  # Hz, QEMU's PIT_FREQ


def reset_control_reset() -> Reset:
    """The Outcome of a PIIX3 reset-control reset (for ``PciHost(reset=...)``)."""
    return Reset(source="PIIX3 reset control 0xcf9 (bit 2)")


class ResetControl(Device):
    """The PIIX3 reset control register at 0xCF9 (for a machine without the PCI host)."""

    def __init__(self, port: int = RESET_CONTROL_PORT) -> None:
        super().__init__()
        self.ports = ((port, 1),)
        self.value = 0

    def save(self) -> dict:
        with self._lock:
            return {"value": self.value}

    def restore(self, state: dict) -> None:
        value = field(state, "value", int, limit=0x100)
        with self._lock:
            self.value = value & RCR_SYS_RST

    def read(self, port: int, size: int) -> int:
        return self.value

    def write(self, port: int, size: int, value: int) -> Outcome | None:
        if value & RCR_RST_CPU:
            return reset_control_reset()
        self.value = value & RCR_SYS_RST
        return None


def pit_output(mode: int, count: int, elapsed_ns: int) -> int:
    """A PIT channel's OUT pin ``elapsed_ns`` after its count was loaded, as QEMU's
    ``pit_get_out`` (``count`` 0 means 65536; modes 6 and 7 are 2 and 3)."""
    count = count or 0x10000
    d = max(elapsed_ns, 0) * PIT_FREQ // 1_000_000_000
    mode &= 7
    if mode in (6, 7):
        mode -= 4
    if mode == 0:
        return int(d >= count)
    if mode == 1:
        return int(d < count)
    if mode == 2:
        return int(d % count == 0 and d != 0)
    if mode == 3:
        return int(d % count < (count + 1) >> 1)
    return int(d == count)  # modes 4 and 5


class SystemControlB(Device):
    """System control port B (0x61): PIT channel 2 gate and output, speaker enable, refresh."""

    def __init__(self, *, pit=None, clock_ns: Callable[[], int] = time.monotonic_ns, port: int = PORT_B) -> None:
        super().__init__()
        self.ports = ((port, 1),)
        self.pit = pit
        self.clock_ns = clock_ns
        self.speaker = 0
        self.gate = 0  # used only without a PIT
        self.refresh = 0

    def save(self) -> dict:
        # With a PIT the gate is KVM's channel 2, saved with the VM (KVM_GET_PIT2).
        with self._lock:
            return {"speaker": self.speaker, "gate": self.gate, "refresh": self.refresh}

    def restore(self, state: dict) -> None:
        speaker = field(state, "speaker", int, limit=2)
        gate = field(state, "gate", int, limit=2)
        refresh = field(state, "refresh", int, limit=0x100)
        with self._lock:
            self.speaker, self.gate, self.refresh = speaker, gate, refresh & PORTB_REFRESH

    def read(self, port: int, size: int) -> int:
        self.refresh ^= PORTB_REFRESH
        gate, out = self.gate, 0
        if self.pit is not None:
            state = self.pit.get_pit2()  # kept: a cffi field view does not keep its struct alive
            channel = state.channels[2]
            gate = channel.gate & 1
            out = pit_output(channel.mode, channel.count, self.clock_ns() - channel.count_load_time)
        return gate | (self.speaker << 1) | self.refresh | (out << 5)

    def write(self, port: int, size: int, value: int) -> None:
        gate = value & PORTB_GATE2
        self.speaker = (value & PORTB_SPEAKER) >> 1
        if self.pit is None:
            self.gate = gate
            return
        state = self.pit.get_pit2()
        channel = state.channels[2]
        if channel.mode in (1, 2, 3, 5) and channel.gate < gate:
            channel.count_load_time = self.clock_ns()  # a rising gate restarts the count
        channel.gate = gate
        self.pit.set_pit2(state)
