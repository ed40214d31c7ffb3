"""Host capability discovery and decoding (CPUID, VMX capability MSRs, the SVM leaf).

The decoding layer (:mod:`.dump`, :mod:`.cpuid`, :mod:`.svm`, :mod:`.vmx`) is pure Python: it
turns raw register values into frozen dataclasses and touches no device. It is tested on real
CPUID/MSR dumps of Intel, AMD and Zhaoxin processors, kept in the repository under
``tests/data/cpuid/``.
Like every module under ``pykvm/probe/``, it depends on nothing above ``pykvm/ioctl.py``.
"""

from __future__ import annotations

from .cpuid import CpuidRegs, CpuidSummary, CpuidTable, Signature, summarize
from .dump import Dump, DumpFormatError, LogicalCpu, NotADumpError, parse_dump, read_dump
from .svm import SvmInfo, decode_svm
from .vmx import Setting, VmxCapabilities, decode_vmx

__all__ = [
    "CpuidRegs",
    "CpuidSummary",
    "CpuidTable",
    "Dump",
    "DumpFormatError",
    "LogicalCpu",
    "NotADumpError",
    "Setting",
    "Signature",
    "SvmInfo",
    "VmxCapabilities",
    "decode_svm",
    "decode_vmx",
    "parse_dump",
    "read_dump",
    "summarize",
]
