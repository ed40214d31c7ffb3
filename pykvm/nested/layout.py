"""The numbers pykvm's L1 hypervisors share with Python: ``guests/nested/nested.h`` mirrored.

``tests/test_nested_abi.py`` compiles a program against the header and checks every constant and
the offset of every field of ``struct nested_blob`` against this module.
"""

from __future__ import annotations

import struct

NESTED_MAGIC = 0x54534E4D564B5950  # b"PYKVMNST" as a little-endian u64
NESTED_VERSION = 1
NESTED_BASE = 0x0100_0000  # the L1-physical address the L1 copies the blob to
NESTED_MAX_SIZE = 0x0040_0000
L2_MEM_OFFSET = 0x0010_0000  # the L2's memory starts this far into the blob

VENDOR_VMX = 1
VENDOR_SVM = 2

NESTED_EXPECT_ENTRY_FAILURE = 1 << 0
NESTED_TRIPLE_FAULT = 1 << 1

# The L2's guest-physical layout (identity-mapped linear addresses)
L2_MEM_SIZE = 0x0008_0000
L2_GDT = 0x0000_1000
L2_TSS = 0x0000_2000
L2_CR3_A = 0x0001_0000
L2_CR3_B = 0x0002_0000
L2_CODE = 0x0003_0000
L2_RO_PAGE = 0x0004_0000
L2_PAGE_A = 0x0005_0000
L2_PAGE_B = 0x0005_1000
L2_STACK_TOP = 0x0007_0000
L2_SWITCH_VA = 0x0040_0000
L2_TAG_VA = 0x0040_1000
L2_VALUE_A = 0xAAAA_0001
L2_VALUE_B = 0xBBBB_0002

HC_REPORT = 1
HC_REMAP = 2
HC_FLUSH = 3
HC_ECHO = 0x10

L2_OUT_PORT = 0x80
L2_OUT_VALUE = 0x42
L2_IN_PORT = 0x81
L2_IN_VALUE = 0x5A

L1_CPUID_LEAF = 0x4000_0000
L1_CPUID_SIGNATURE = "pykvm L1 hv"  # EBX, ECX, EDX of L1_CPUID_LEAF

#: The L1's exit statuses (l1.h): the isa-debug-exit value.
STATUS_DONE = 0x10
STATUS_ENTRY_FAILED = 0x11
STATUS_L2_SHUTDOWN = 0x12
STATUS_PROBED = 0x13
STATUS_ERROR = 0x7E
STATUS_NO_EXTENSION = 0x7F

#: ``struct nested_blob``: (field, struct format) in order.
HEADER_FIELDS = (
    ("magic", "Q"), ("version", "I"), ("vendor", "I"), ("size", "Q"), ("base", "Q"),
    ("flags", "Q"), ("vmcs_table", "Q"), ("vmcs_count", "Q"), ("vmxon_region", "Q"),
    ("vmcs_region", "Q"), ("vmcb", "Q"), ("hsave", "Q"), ("tag_pte", "Q"),
    ("tag_pte_value", "Q"), ("l2_rax", "Q"), ("expected_exits", "Q"), ("name", "32s"),
)  # fmt: skip
HEADER = struct.Struct("<" + "".join(f for _, f in HEADER_FIELDS))


def header_offsets() -> dict[str, int]:
    """Each header field's byte offset (for the ABI test)."""
    out, offset = {}, 0
    for name, fmt in HEADER_FIELDS:
        out[name] = offset
        offset += struct.calcsize("<" + fmt)
    return out
