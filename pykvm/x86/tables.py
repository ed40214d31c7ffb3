"""Descriptor tables built in Python: segments (GDT and the KVM segment registers from one
definition), IDT gates, the TSS, and the exception stubs every IDT vector points at."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import layout

# Vectors for which the CPU pushes an error code (#DF #TS #NP #SS #GP #PF #AC #CP #VC #SX).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
VECTOR_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV", 29: "#VC", 30: "#SX",
}  # fmt: skip
STUB_SIZE = 16

TYPE_CODE = 0xB  # execute/read, accessed
TYPE_DATA = 0x3  # read/write, accessed
TYPE_TSS_BUSY = 0xB  # 32/64-bit busy TSS (system segment)
GATE_INTERRUPT = 0xE  # 32/64-bit interrupt gate


@dataclass(frozen=True)
class Segment:
    """A segment as both a GDT descriptor and a ``struct kvm_segment`` describe it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF  # in bytes (the descriptor stores pages when g=1)
    type: int = TYPE_DATA
    s: int = 1  # 1: code/data, 0: system
    dpl: int = 0
    db: int = 1
    l: int = 0  # noqa: E741 - the kernel's name for the 64-bit code flag
    g: int = 1
    present: int = 1

    def descriptor(self) -> bytes:
        """The 8-byte GDT descriptor (16 bytes for a system segment in long mode: see tss_descriptor)."""
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF:
            raise ValueError(f"segment {self.selector:#x}: limit {self.limit:#x} does not fit")
        access = self.present << 7 | self.dpl << 5 | self.s << 4 | self.type
        flags = self.g << 3 | self.db << 2 | self.l << 1
        return struct.pack(
            "<HHBBBB",
            limit & 0xFFFF,
            self.base & 0xFFFF,
            (self.base >> 16) & 0xFF,
            access,
            flags << 4 | (limit >> 16),
            (self.base >> 24) & 0xFF,
        )

    def load(self, kseg) -> None:
        """Fill a ``struct kvm_segment`` (a field of ``kvm_sregs``) with this segment."""
        kseg.base = self.base
        kseg.limit = self.limit
        kseg.selector = self.selector | self.dpl if self.s else self.selector
        kseg.type = self.type
        kseg.present = self.present
        kseg.dpl = self.dpl
        kseg.db = self.db
        kseg.s = self.s
        kseg.l = self.l
        kseg.g = self.g
        kseg.avl = 0
        kseg.unusable = 0


def real_segment(selector: int, code: bool = False) -> Segment:
    """A real-mode segment: base = selector * 16, 64 KiB limit."""
    return Segment(selector, base=selector << 4, limit=0xFFFF, type=TYPE_CODE if code else TYPE_DATA, db=0, g=0)


CODE64 = Segment(layout.SEL_CODE64, type=TYPE_CODE, db=0, l=1)
DATA = Segment(layout.SEL_DATA)
CODE32 = Segment(layout.SEL_CODE32, type=TYPE_CODE)
CODE16 = Segment(layout.SEL_CODE16, limit=0xFFFF, type=TYPE_CODE, db=0, g=0)
USER_CODE32 = Segment(layout.SEL_USER_CODE32, type=TYPE_CODE, dpl=3)
USER_DATA = Segment(layout.SEL_USER_DATA, dpl=3)
USER_CODE64 = Segment(layout.SEL_USER_CODE64, type=TYPE_CODE, dpl=3, db=0, l=1)
TSS_SIZE = 0x68  # the 32- and 64-bit TSS proper; the I/O permission bitmap follows it
IO_BITMAP_SIZE = 0x10000 // 8 + 1  # one bit a port (0: allowed), then the 0xFF byte that ends it
TSS = Segment(layout.SEL_TSS, base=layout.TSS, limit=TSS_SIZE + IO_BITMAP_SIZE - 1, type=TYPE_TSS_BUSY, s=0,
              db=0, g=0)
GDT_SEGMENTS = (CODE64, DATA, CODE32, CODE16, USER_CODE32, USER_DATA, USER_CODE64)


def gdt_bytes() -> bytes:
    """The whole GDT: null, the code/data segments, then the TSS (a 16-byte long-mode descriptor)."""
    table = bytearray(8 * layout.GDT_ENTRIES)
    for seg in GDT_SEGMENTS:
        table[seg.selector : seg.selector + 8] = seg.descriptor()
    table[TSS.selector : TSS.selector + 8] = TSS.descriptor()
    table[TSS.selector + 8 : TSS.selector + 16] = struct.pack("<Q", TSS.base >> 32)
    return bytes(table)


def tss_bytes(long_mode: bool) -> bytes:
    """A TSS whose ring-0 stack is STACK_TOP and whose I/O bitmap allows every port at CPL3.

    The bitmap, not IOPL, is what lets ring-3 guest code reach the console and call ports: some
    backends (kvm_pvm) keep RFLAGS.IOPL at 0 while the guest runs at CPL3."""
    tss = bytearray(TSS_SIZE + IO_BITMAP_SIZE)
    if long_mode:
        struct.pack_into("<Q", tss, 4, layout.STACK_TOP)  # RSP0
    else:
        struct.pack_into("<IH", tss, 4, layout.STACK_TOP, layout.SEL_DATA)  # ESP0, SS0
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)  # I/O map base: the bitmap right after the TSS
    tss[-1] = 0xFF
    return bytes(tss)


def stub_bytes(vector: int) -> bytes:
    """The 16-byte stub for ``vector``: push a dummy error code where the CPU pushes none, push
    the vector, report on EXCEPTION_PORT, then halt forever. The same bytes decode identically
    in 16-, 32- and 64-bit code."""
    code = b"" if vector in ERROR_CODE_VECTORS else b"\x6a\x00"  # push $0
    code += bytes((0x6A, vector)) + bytes((0xE6, layout.EXCEPTION_PORT)) + b"\xf4\xeb\xfd"  # push; out; hlt; jmp .-1
    return code.ljust(STUB_SIZE, b"\x90")


def stubs_bytes() -> bytes:
    return b"".join(stub_bytes(v) for v in range(256))


def idt_bytes(long_mode: bool) -> bytes:
    """256 interrupt gates to the exception stubs (16-byte gates in long mode, 8-byte otherwise)."""
    out = bytearray()
    for v in range(256):
        handler = layout.EXCEPTION_STUBS + v * STUB_SIZE
        attr = 0x80 | GATE_INTERRUPT  # present, DPL 0
        if long_mode:
            out += struct.pack(
                "<HHBBHII", handler & 0xFFFF, layout.SEL_CODE64, 0, attr, (handler >> 16) & 0xFFFF, handler >> 32, 0
            )
        else:
            out += struct.pack("<HHBBH", handler & 0xFFFF, layout.SEL_CODE32, 0, attr, handler >> 16)
    return bytes(out)


def ivt_bytes() -> bytes:
    """The real-mode IVT: 256 far pointers (offset, segment) to the exception stubs."""
    segment = layout.EXCEPTION_STUBS >> 4
    return b"".join(struct.pack("<HH", v * STUB_SIZE, segment) for v in range(256))


def vector_name(vector: int) -> str:
    return VECTOR_NAMES.get(vector, f"vector {vector}")
