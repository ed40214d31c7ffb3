"""QEMU's ``pci-testdev`` (1b36:0005): port-I/O and MMIO exits a test kernel can count and time.

Register-level behaviour after QEMU's ``hw/misc/pci-testdev.c``, as kvm-unit-tests'
``lib/pci-testdev.c`` (``pci_testdev()``, used by ``x86/vmexit.c`` and the PCI tests) drives it.

Configuration: vendor 0x1B36 (Red Hat), device 0x0005, revision 0, class 0xFF0000 ("other"),
no interrupt pin. BAR0: 4 KiB of memory, BAR1: 256 ports; with ``membar`` > 0 also BAR2, a
64-bit prefetchable memory BAR of that size with nothing behind it (reads 0, writes dropped), as
QEMU's ``membar`` property. Both test BARs are byte-wide (QEMU's ``impl.max_access_size`` 1):
a wider access reaches the registers as one access per byte, little-endian.

Each BAR offers three tests, and selects one at a time. Writing ``n`` to offset 0 stops the
current test and, for ``n`` < 3, starts test ``n`` of that BAR (its count set to 0); ``n`` >= 3
leaves none selected. With none selected, every offset reads 0. The selected test reads as its
header, ``struct pci_test_dev_hdr`` of kvm-unit-tests (QEMU's ``PCITestDevHdr``)::

    0x00  u8  test     the test's global number: 0-2 for BAR0, 3-5 for BAR1
    0x01  u8  width    1: the width of the write to make
    0x04  u32 offset   where to write: 2048 + n in BAR0 (0x800-0x802), 128 + test in BAR1 (0x83-0x85)
    0x08  u8  data     the value to write: 0xFA (datamatch), 0xCE for the wildcard test
    0x0C  u32 count    writes seen that match
    0x10  name         NUL-terminated: "mmio-no-eventfd", "mmio-wildcard-eventfd",
                       "mmio-datamatch-eventfd", "portio-no-eventfd", ...

(bytes past the header and name read 0, and so does the name's last byte, as in QEMU). A write
at the test's offset counts: for "no-eventfd" and "datamatch-eventfd" only if it is the width
(one byte) and the value in ``data``; for "wildcard-eventfd" any write there.

Where QEMU registers an ioeventfd for the "wildcard" and "datamatch" tests while they are
selected (so KVM answers those writes in the kernel and the count stays 0 -- the test program
accepts a count of 0 or of every write), pykvm counts them in Python. :meth:`PciTestDev.ioeventfds`
lists the ones QEMU would have now (as :class:`IoEventFd`, absolute addresses), and
``on_ioeventfds`` (if given) is called with that list each time it changes, for a machine that
wires ``Vm.ioeventfd``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from .base import field, int_list
from .pci import PciFunction

TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
TYPES = ("mmio", "portio")  # BAR0, BAR1
IOTEST_DATAMATCH = 0xFA
IOTEST_NOMATCH = 0xCE
IOTEST_IOSIZE = 128
IOTEST_MEMSIZE = 2048
ACCESS_WIDTH = 1
HEADER = struct.Struct("<BBxxIB3xI")  # test, width, pad, offset, data, pad, count
MEM_BAR, IO_BAR, MEMBAR_BAR = 0, 1, 2


class IoEventFd(NamedTuple):
    """An ioeventfd the device would like: ``pio`` space or MMIO, address, size, datamatch (None: any)."""

    pio: bool
    address: int
    size: int
    datamatch: int | None


class _Test:
    __slots__ = ("number", "name", "offset", "match_data", "data", "eventfd", "count")

    def __init__(self, number: int) -> None:
        kind, test = TYPES[number // len(TESTS)], TESTS[number % len(TESTS)]
        self.number = number
        self.name = f"{kind}-{test}".encode()
        size = IOTEST_MEMSIZE if kind == "mmio" else IOTEST_IOSIZE
        self.offset = size + number * ACCESS_WIDTH
        self.match_data = test != "wildcard-eventfd"
        self.data = IOTEST_DATAMATCH if self.match_data else IOTEST_NOMATCH
        self.eventfd = test != "no-eventfd"
        self.count = 0

    def buffer(self) -> bytes:
        header = HEADER.pack(self.number, ACCESS_WIDTH, self.offset, self.data, self.count & 0xFFFFFFFF)
        return header + self.name + b"\0"


class PciTestDev(PciFunction):
    """QEMU's ``-device pci-testdev`` (see the module docstring)."""

    qemu_name = "pci-testdev"
    description = "PCI Test Device"
    vendor_id = 0x1B36  # PCI_VENDOR_ID_REDHAT
    device_id = 0x0005  # PCI_DEVICE_ID_REDHAT_TEST
    revision = 0x00
    class_code = 0x00FF00  # PCI_CLASS_OTHERS (0xff) as QEMU sets it: the 16-bit class word, so base class 0, subclass 0xff
    interrupt_pin = 0
    max_access_size = 1

    def __init__(self, membar: int = 0, on_ioeventfds: Callable[[list[IoEventFd]], None] | None = None) -> None:
        super().__init__()
        self.declare_bar(MEM_BAR, IOTEST_MEMSIZE * 2, "mem32")
        self.declare_bar(IO_BAR, IOTEST_IOSIZE * 2, "io")
        if membar:
            self.declare_bar(MEMBAR_BAR, membar, "mem64", prefetchable=True)
        self.tests = [_Test(i) for i in range(len(TESTS) * len(TYPES))]
        self.current: int | None = None
        self.on_ioeventfds = on_ioeventfds
        self._announced: list[IoEventFd] = []

    def reset(self) -> None:
        """Deselect the current test (QEMU's device reset)."""
        with self.lock:
            self.current = None
            self._announce()

    def save(self) -> dict:
        with self.lock:
            return {**super().save(), "current": self.current, "counts": [t.count for t in self.tests]}

    def restore(self, state: dict) -> None:
        current = field(state, "current", (int, type(None)), limit=len(self.tests))
        counts = int_list(state, "counts", len(self.tests), limit=1 << 63)
        with self.lock:
            super().restore(state)
            self.current = current
            for test, count in zip(self.tests, counts):
                test.count = count
            self._announce()  # the selected test's ioeventfd, where its BAR decodes now

    def count(self, test: int) -> int:
        """Test ``test``'s count (0-5, global numbering)."""
        return self.tests[test].count

    # ---- BARs ------------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MEMBAR_BAR or self.current is None:
            return 0
        buf = self.tests[self.current].buffer()
        if offset + size >= len(buf):
            return 0
        return buf[offset]

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == MEMBAR_BAR:
            return None
        kind = 0 if index == MEM_BAR else 1
        if offset == 0:
            self.current = None
            if value < len(TESTS):
                test = self.tests[kind * len(TESTS) + value]
                test.count = 0
                self.current = test.number
            self._announce()
            return None
        if self.current is None:
            return None
        test = self.tests[self.current]
        if offset != test.offset:
            return None
        if test.match_data and (size != ACCESS_WIDTH or value != test.data):
            return None
        test.count += 1
        return None

    # ---- ioeventfds ------------------------------------------------------------------------------
    def ioeventfds(self) -> list[IoEventFd]:
        """The ioeventfds QEMU would have registered now (the selected test's, if it uses one and
        its BAR decodes)."""
        if self.current is None:
            return []
        test = self.tests[self.current]
        index = MEM_BAR if self.current < len(TESTS) else IO_BAR
        mapping = self.bar_mapping(index)
        if not test.eventfd or mapping is None:
            return []
        return [IoEventFd(index == IO_BAR, mapping.address + test.offset, ACCESS_WIDTH,
                          test.data if test.match_data else None)]

    def _announce(self) -> None:
        wanted = self.ioeventfds()
        if wanted != self._announced:
            self._announced = wanted
            if self.on_ioeventfds is not None:
                self.on_ioeventfds(wanted)

    def bars_moved(self) -> None:
        self._announce()
