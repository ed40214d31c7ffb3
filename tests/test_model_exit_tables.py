"""The VMX exit reasons and SVM exit codes against the kernel's uapi headers installed here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pykvm.model.vmcb import SVM_EXIT_CODES
from pykvm.model.vmcs import VMX_EXIT_REASONS

ASM = Path("/usr/include/x86_64-linux-gnu/asm")


def header_numbers(name: str, prefix: str) -> dict[str, int]:
    path = ASM / name
    if not path.is_file():
        pytest.skip(f"{path} is missing (apt-get install linux-libc-dev)")
    found = re.findall(rf"^#define {prefix}(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", path.read_text(), re.MULTILINE)
    return {n: int(v, 0) for n, v in found}


def test_every_vmx_exit_reason_of_the_header_has_its_number():
    header = header_numbers("vmx.h", "EXIT_REASON_")
    ours = {r.name: n for n, r in VMX_EXIT_REASONS.items()}
    assert len(header) > 50
    assert {n: v for n, v in header.items() if ours.get(n) != v} == {}


def test_every_svm_exit_code_of_the_header_has_its_number():
    header = header_numbers("svm.h", "SVM_EXIT_")
    header.pop("SW", None)  # SVM_EXIT_SW (0xf0000000) is the kernel's own, not an APM exit code
    first, last = header.pop("EXCP_BASE"), header.pop("LAST_EXCP")  # bounds of the 32 exception exits
    ours = {c.name: n for n, c in SVM_EXIT_CODES.items()}
    assert len(header) > 90
    assert {n: v for n, v in header.items() if ours.get(n) != v} == {}
    assert all(code in SVM_EXIT_CODES for code in range(first, last + 1))
