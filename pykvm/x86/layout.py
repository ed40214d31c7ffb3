"""Named guest-physical addresses, ports and selectors: the one place they are defined.

``guests/include/pykvm.h`` mirrors these numbers for guest code; ``tests/test_guest_abi.py`` checks
that the two agree. Every address is a guest-physical address (GPA); the set-up identity-maps, so
in paged modes it is also the guest-virtual address.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# ---- guest memory map (low memory) -------------------------------------------------------------
REAL_IVT = 0x0000  # real-mode interrupt vector table (256 x seg:off), filled with exception stubs
REAL_LOAD = 0x1000  # where a real-mode flat image is loaded and entered (CS:IP = 0000:1000)
GDT = 0x10000  # global descriptor table (one page)
IDT = 0x11000  # interrupt descriptor table (one page: 256 long-mode gates)
TSS = 0x12000  # the task-state segment TR points at (RSP0/ESP0 = STACK_TOP), with an I/O bitmap
#                that lets CPL3 use every port (to 0x14068)
EXCEPTION_STUBS = 0x15000  # 256 x 16-byte stubs that report an unhandled vector on EXCEPTION_PORT
PAGE_TABLES = 0x20000  # 0x20000-0x2ffff: identity page tables built by the set-up
PML5 = PAGE_TABLES + 0x0000  # 5-level root (LA57)
PML4 = PAGE_TABLES + 0x1000  # 4-level root
PDPT = PAGE_TABLES + 0x2000  # long-mode PDPT, or the PAE PDPT (4 entries, 32-byte aligned)
PD = PAGE_TABLES + 0x3000  # page directories: 4 pages (4 GiB of 2 MiB pages); 32-bit PD uses the first
PD_COUNT = 4
STACK_TOP = 0x9F000  # initial stack pointer in every mode (real mode: SS=0x9000, SP=0xF000)
PROTECTED_LOAD = 0x100000  # where a protected/paged/PAE/long-mode flat image is loaded and entered

IDENTITY_MAP_SIZE = 4 * GiB  # paged modes identity-map the first 4 GiB (RAM and the MMIO window)
TEST_ROM = 0x400000  # guests/memory.S reads a read-only slot the host maps here (one page)
TEST_RAM2 = 0x800000  # guests/memory.S writes a second RAM slot the host maps here (one page)
MMIO_WINDOW = 0xD0000000  # a window no memory slot covers: guest accesses there exit as MMIO
VIRTIO_MMIO_BASE = 0xD0000000  # virtio-mmio transport i (Machine.add_virtio) at BASE + i * SIZE, in the MMIO window
VIRTIO_MMIO_SIZE = 0x1000  # one register window (registers, then the device's config space at +0x100)
VIRTIO_IRQS = (5, 6, 7, 10, 11, 12, 14, 15)  # the GSI (ISA IRQ, edge, active high) of transport i, given out in order
DEFAULT_MEM_SIZE = 4 * MiB
MIN_MEM_SIZE = 1 * MiB  # the system area and STACK_TOP live in the first MiB

# ---- ports of the host protocol (guests/include/pykvm.h) ----------------------------------------
CONSOLE_PORT = 0xE9  # byte out: guest console (QEMU's debugcon port)
CALL_PORT = 0xEA  # 32-bit out of a call number (CALL_*); arguments in registers
EXCEPTION_PORT = 0xEB  # written by the exception stubs; the vector is on the guest's stack
HYPERCALL_PORT = 0xEC  # 32-bit out of a hypercall number: KVM's hypercall ABI (args RBX, RCX, RDX,
#                        RSI; the result in RAX) over port I/O, for backends that cannot exit on VMCALL
TEST_PORT = 0x600  # guests/io.S exercises port I/O on TEST_PORT and TEST_PORT + 1 (free of PC devices)
EVENTFD_PORT = 0x610  # guests/eventfd.S writes here: an ioeventfd, answered in the kernel, not Python
TEST_MSR = 0x40001000  # guests/msr.S reads and writes this MSR; a test emulates it in Python
TEST_HYPERCALL = 0x50  # guests/hypercall.S makes this hypercall through the hypercall port
BENCH_PORT = 0x700  # guests/bench_io.S (scripts/bench_exits.py): the port of its port-I/O loops (free of PC devices)
BENCH_MMIO = 0x10F000  # guests/bench_io.S: its MMIO byte, FFFF:F010 in real mode; MMIO with the bench's 1 MiB of RAM
BENCH_MSR = 0x40001010  # guests/bench_io.S: the MSR its loops read or write (emulated in Python via the MSR filter)
BENCH_HYPERCALL = 0x51  # guests/bench_io.S: the hypercall its loop makes through HYPERCALL_PORT
# guests/bench_io.S's loops: the host sets EAX to one of these and ECX to N at entry
BENCH_LOOP_OUT = 1  # N x outb to BENCH_PORT
BENCH_LOOP_IN = 2  # N x inb from BENCH_PORT
BENCH_LOOP_MMIO_WRITE = 3  # N x byte write to BENCH_MMIO
BENCH_LOOP_MMIO_READ = 4  # N x byte read from BENCH_MMIO
BENCH_LOOP_RDMSR = 5  # N x rdmsr of BENCH_MSR
BENCH_LOOP_WRMSR = 6  # N x wrmsr of BENCH_MSR
BENCH_LOOP_HYPERCALL = 7  # N x hypercall BENCH_HYPERCALL on HYPERCALL_PORT
BENCH_LOOP_HLT = 8  # N x hlt (KVM_EXIT_HLT without the in-kernel irqchip)

CALL_DONE = 1  # EBX = exit status (0: success)
CALL_FAIL = 2  # EBX = line, RCX = value, RSI = linear address of a NUL-terminated message (or 0)
CALL_SYNC = 3  # EBX = value; the host sees Sync(value) and resumes the guest
CALL_PRINT = 4  # RSI = linear address of a NUL-terminated string

# ---- GDT selectors --------------------------------------------------------------------------------
SEL_CODE64 = 0x08  # 64-bit ring-0 code
SEL_DATA = 0x10  # flat 4 GiB ring-0 data
SEL_CODE32 = 0x18  # flat 4 GiB 32-bit ring-0 code
SEL_CODE16 = 0x20  # 16-bit ring-0 code, base 0, limit 64 KiB (for switching back to real mode)
SEL_USER_CODE32 = 0x28  # flat 32-bit ring-3 code (selector | 3 when loaded)
SEL_USER_DATA = 0x30  # flat ring-3 data
SEL_USER_CODE64 = 0x38  # 64-bit ring-3 code
SEL_TSS = 0x40  # the TSS (16 bytes in long mode)
GDT_ENTRIES = 10
