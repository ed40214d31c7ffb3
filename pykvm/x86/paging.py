"""Identity page tables for the paged set-up modes (the first IDENTITY_MAP_SIZE bytes, large pages)."""

from __future__ import annotations

import struct

from . import layout

P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
# Every entry is user-accessible (US) so that guests can drop to CPL3 on the same identity map;
# CR4.SMEP/SMAP stay clear, so ring 0 keeps full access.
PRW_USER = P | RW | US
LARGE_2M = 1 << 21
LARGE_4M = 1 << 22


def _entries(values) -> bytes:
    return b"".join(struct.pack("<Q", v) for v in values)


def pages_32bit() -> dict[int, bytes]:
    """32-bit paging: one page directory of 4 MiB pages (CR4.PSE). Returns {gpa: table bytes}."""
    return {layout.PD: b"".join(struct.pack("<I", i * LARGE_4M | PS | PRW_USER) for i in range(1024))}


def _page_directories() -> dict[int, bytes]:
    return {
        layout.PD + d * 0x1000: _entries((d * 512 + i) * LARGE_2M | PS | PRW_USER for i in range(512))
        for d in range(layout.PD_COUNT)
    }


def pages_pae() -> dict[int, bytes]:
    """PAE paging: a 4-entry PDPT (only P may be set in a PAE PDPTE) over four directories of 2 MiB pages."""
    tables = _page_directories()
    tables[layout.PDPT] = _entries(layout.PD + d * 0x1000 | P for d in range(layout.PD_COUNT))
    return tables


def pages_long(la57: bool = False) -> dict[int, bytes]:
    """4-level (or 5-level) paging: PML4[0] -> PDPT[0..3] -> 2 MiB pages."""
    tables = _page_directories()
    tables[layout.PDPT] = _entries(layout.PD + d * 0x1000 | PRW_USER for d in range(layout.PD_COUNT))
    tables[layout.PML4] = _entries([layout.PDPT | PRW_USER])
    if la57:
        tables[layout.PML5] = _entries([layout.PML4 | PRW_USER])
    return tables
