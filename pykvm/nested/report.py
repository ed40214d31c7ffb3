"""What an L1 hypervisor of ``guests/nested/`` said: its serial lines parsed into data.

Every line of the L1's report starts with ``nested: `` and a word saying what it is:

=================  ===============================================================================
``start``          the L1 booted (its banner: seen twice means the machine was reset)
``blob``           the scenario it received (name, vendor, size, flags)
``exit N``         an L2 exit: ``reason`` (VMX basic exit reason / SVM exit code), the L1's
                   ``name`` for it, ``qual`` (exit qualification / EXITINFO1), ``gpa``, ``rip``
``l2 report``      three values the L2 passed in a hypercall (``a``, ``b``, ``c``)
``entry-failed``   VM entry / VMRUN refused the image: ``kind`` and its numbers
``error CODE:``    the L1 stopped: why, in words
``msr``/``cpuid``  capability values (the ``probe`` command line)
``end``            the last line: ``status`` (also the isa-debug-exit value)
=================  ===============================================================================

Anything else (``vmptrst``, ``flush``, ``vmxoff``...) is kept as a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..model import paging
from ..model.hvm import neutral_exit_svm, neutral_exit_vmx
from ..model.vmcb import svm_exit
from ..model.vmcs import VMX_EXIT_REASONS
from . import layout as L

__all__ = ["L2Exit", "NestedReport", "parse_report"]

PREFIX = "nested: "
BANNER = "nested: start"
END_MARKER = "nested: end status="
_KV = re.compile(r"(\w+)=(\S+)")


def _number(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def _flags(value: int, names: dict[int, str]) -> list[str]:
    return [name for mask, name in names.items() if value & mask]


_EPT_QUAL = {paging.EQ_READ: "read", paging.EQ_WRITE: "write", paging.EQ_FETCH: "fetch",
             paging.EQ_READABLE: "readable", paging.EQ_WRITABLE: "writable",
             paging.EQ_EXECUTABLE: "executable", paging.EQ_USER_EXECUTABLE: "user-executable",
             paging.EQ_GLA_VALID: "linear-address-valid", paging.EQ_FINAL: "final-translation"}  # fmt: skip
_NPF_INFO = {paging.PF_P: "present", paging.PF_W: "write", paging.PF_U: "user",
             paging.PF_RSVD: "reserved-bit", paging.PF_ID: "fetch", paging.NPF_FINAL: "final-gPA",
             paging.NPF_GUEST_PAGE: "guest-page-table"}  # fmt: skip


def describe_qualification(vendor: str, neutral: str | None, q: int) -> str:
    """Words for an exit qualification (VMX) / EXITINFO1 (SVM) of an I/O or nested-paging exit."""
    if neutral == "io":
        if vendor == "vmx":
            size, inp, string, rep = (q & 7) + 1, q >> 3 & 1, q >> 4 & 1, q >> 5 & 1
        else:
            size = 1 if q >> 4 & 1 else 2 if q >> 5 & 1 else 4 if q >> 6 & 1 else 0
            inp, string, rep = q & 1, q >> 2 & 1, q >> 3 & 1
        kind = ("rep " if rep else "") + ("ins" if string and inp else "outs" if string
                                          else "in" if inp else "out")  # fmt: skip
        return f"{kind} port {q >> 16 & 0xFFFF:#x}, {size} byte{'s' if size != 1 else ''}"
    if neutral == "npf":
        return ", ".join(_flags(q, _EPT_QUAL if vendor == "vmx" else _NPF_INFO))
    return ""


@dataclass(frozen=True)
class L2Exit:
    """One L2 exit as the L1 reported it, with pykvm's names for it."""

    index: int
    vendor: str  # "vmx" or "svm"
    code: int  # VMX: the exit-reason field; SVM: EXITCODE (unsigned)
    l1_name: str  # the neutral name the L1 gave
    qualification: int  # VMX exit qualification / SVM EXITINFO1
    gpa: int
    rip: int

    @property
    def neutral(self) -> str | None:
        """pykvm's neutral name (:mod:`pykvm.model.hvm`): the same as the L1's when both agree."""
        if self.vendor == "vmx":
            return neutral_exit_vmx(self.code)
        return neutral_exit_svm(self.code, self.qualification)

    @property
    def vendor_name(self) -> str:
        """``EXIT_REASON_*`` / ``SVM_EXIT_*`` name of the code."""
        if self.vendor == "vmx":
            reason = VMX_EXIT_REASONS.get(self.code & 0xFFFF)
            return reason.name if reason else f"reason {self.code:#x}"
        code = svm_exit(self.code)
        return code.name if code else f"code {self.code:#x}"

    @property
    def meaning(self) -> str:
        """The qualification decoded for the exits the scenario has (I/O, EPT violation / #NPF)."""
        return describe_qualification(self.vendor, self.neutral, self.qualification)

    def to_json(self) -> dict[str, Any]:
        return {"meaning": self.meaning, "index": self.index, "vendor": self.vendor, "code": self.code,
                "vendor_name": self.vendor_name, "neutral": self.neutral, "l1_name": self.l1_name,
                "qualification": self.qualification, "gpa": self.gpa, "rip": self.rip}  # fmt: skip


@dataclass
class NestedReport:
    """Everything one run of the L1 reported, in order."""

    vendor: str | None = None  # "vmx"/"svm" from the blob line, else None
    cpu: str | None = None  # the CPU vendor string the L1 saw
    blob: dict[str, int | str] | None = None
    exits: list[L2Exit] = field(default_factory=list)
    l2_reports: list[tuple[int, int, int]] = field(default_factory=list)
    entry_failure: dict[str, int | str] | None = None
    error: tuple[str, str] | None = None  # (code, text)
    status: int | None = None  # the "end" line's status
    starts: int = 0
    msrs: dict[int, int] = field(default_factory=dict)
    cpuid: dict[int, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)

    @property
    def resets(self) -> int:
        return max(self.starts - 1, 0)

    @property
    def finished(self) -> bool:
        return self.status is not None

    @property
    def completed(self) -> bool:
        """The scenario ran to its end: the L2's HLT (or its shutdown, if that was the plan)."""
        return self.status in (L.STATUS_DONE, L.STATUS_L2_SHUTDOWN) and self.error is None

    @property
    def neutral_exits(self) -> tuple[str | None, ...]:
        return tuple(e.neutral for e in self.exits)

    def failure_text(self) -> str | None:
        """``kind error=7`` style text of the entry failure, to compare with a prediction."""
        if self.entry_failure is None:
            return None
        kind = self.entry_failure.get("kind")
        if kind == "vmfail-valid":
            return f"vmfail-valid error={self.entry_failure.get('error')}"
        if kind == "invalid-state":
            return f"invalid-state reason={self.entry_failure.get('reason', 0):#x}"
        return str(kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor, "cpu": self.cpu, "blob": self.blob,
            "exits": [e.to_json() for e in self.exits],
            "l2_reports": [list(r) for r in self.l2_reports],
            "entry_failure": self.entry_failure, "entry_failure_text": self.failure_text(),
            "error": None if self.error is None else {"code": self.error[0], "text": self.error[1]},
            "status": self.status, "resets": self.resets, "notes": self.notes,
        }  # fmt: skip


def parse_report(serial: str) -> NestedReport:
    """Parse the L1's serial output (other lines, e.g. firmware's, are ignored)."""
    out = NestedReport()
    for raw in serial.splitlines():
        line = raw.strip("\r\n\x00 ")
        at = line.find(PREFIX)
        if at < 0:
            continue
        body = line[at + len(PREFIX):]
        word, _, rest = body.partition(" ")
        kv = {k: _number(v) for k, v in _KV.findall(rest)}
        if word == "start":
            out.starts += 1
            cpu = kv.get("cpu")
            out.cpu = cpu if isinstance(cpu, str) else out.cpu
        elif word == "blob":
            out.blob = kv
            vendor = kv.get("vendor")
            out.vendor = vendor if isinstance(vendor, str) else None
        elif word == "exit":
            index = rest.split(" ", 1)[0]
            try:
                out.exits.append(L2Exit(
                    int(index), out.vendor or "?", int(kv["reason"]), str(kv.get("name", "")),
                    int(kv["qual"]), int(kv["gpa"]), int(kv["rip"])))  # fmt: skip
            except (KeyError, ValueError, TypeError):
                out.unparsed.append(line)
        elif word == "l2" and rest.startswith("report"):
            try:
                out.l2_reports.append((int(kv["a"]), int(kv["b"]), int(kv["c"])))
            except (KeyError, ValueError, TypeError):
                out.unparsed.append(line)
        elif word == "entry-failed":
            out.entry_failure = kv
        elif word == "error":
            code, _, text = rest.partition(":")
            out.error = (code.strip(), text.strip())
        elif word == "msr" and isinstance(kv.get("index"), int) and isinstance(kv.get("value"), int):
            out.msrs[kv["index"]] = kv["value"]  # type: ignore[index,assignment]
        elif word == "cpuid" and isinstance(kv.get("leaf"), int):
            leaf = kv.pop("leaf")
            out.cpuid[leaf] = {k: v for k, v in kv.items() if isinstance(v, int)}  # type: ignore[index]
        elif word == "end" and isinstance(kv.get("status"), int):
            out.status = kv["status"]  # type: ignore[assignment]
        else:
            out.notes.append(body)
    return out
