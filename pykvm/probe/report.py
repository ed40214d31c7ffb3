"""``pykvm probe``: gather what the host (or a dumped machine) can do, and judge it.

:func:`probe` never raises for an environment problem: every step that fails is recorded as an
error in the report and the rest is still collected. :class:`Verdict` turns the facts into the
answer people want ("can I run KVM guests here, how fast, can my guests nest?") with a fix for
each "no".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .cpuid import CpuidSummary, CpuidTable, summarize
from .dump import read_dump
from .hostcpu import host_cpuid, read_host_msrs
from .kvm import KvmInfo, collect_kvm
from .svm import SvmInfo, decode_svm
from .vmx import VmxCapabilities, decode_vmx

SECTIONS = ("cpu", "vmx", "svm", "kvm")
VMX_MSRS = tuple(range(0x480, 0x493))

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"

_NESTED_FIX = (
    "reload the module with nested=1: modprobe -r {m} && modprobe {m} nested=1 "
    "(to keep it: echo 'options {m} nested=1' > /etc/modprobe.d/{m}.conf)"
)


@dataclass(frozen=True)
class Finding:
    """One line of the verdict: how it stands on a topic, and what to do where it is not good."""

    level: str  # ok, info, warn, fail
    topic: str
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "topic": self.topic, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Verdict:
    """Can this machine run KVM guests, how, and can its guests run hypervisors of their own?"""

    usable: bool | None  # None for a dumped machine: its KVM is unknown
    acceleration: str | None  # "VT-x", "AMD-V", or "software (kvm_pvm)"
    nested: bool | None
    second_level_paging: str | None  # "EPT", "NPT", or None (shadow paging)
    tlb_tagging: str | None  # "VPID", "ASID", or None
    findings: tuple[Finding, ...]
    features_known: bool = True  # False: a dump without the VMX MSRs / SVM leaf says nothing of EPT/NPT, VPID/ASID

    @property
    def exit_code(self) -> int:
        """0 usable (for a dump: the CPU has VT-x or AMD-V), 66 not usable here (pykvm/status.py)."""
        from .. import status

        usable = self.usable if self.usable is not None else self.acceleration in ("VT-x", "AMD-V")
        return status.OK if usable else status.UNAVAILABLE

    def to_json(self) -> dict[str, Any]:
        return {
            "usable": self.usable,
            "acceleration": self.acceleration,
            "nested": self.nested,
            "second_level_paging": self.second_level_paging,
            "tlb_tagging": self.tlb_tagging,
            "features_known": self.features_known,
            "exit_code": self.exit_code,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True)
class VmxSource:
    """VMX capability MSRs from one source: "kvm" (what nested KVM gives an L1), "hardware"
    (/dev/cpu/N/msr) or "dump"."""

    source: str
    caps: VmxCapabilities | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "error": self.error, "caps": self.caps.to_json() if self.caps else None}


@dataclass(frozen=True)
class ProbeReport:
    origin: str  # "host", or the dump file's path
    cpu_source: str
    cpuid: CpuidTable | None
    cpu: CpuidSummary | None
    vmx: tuple[VmxSource, ...]
    svm: SvmInfo | None
    kvm: KvmInfo | None
    verdict: Verdict
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def best_vmx(self) -> VmxCapabilities | None:
        """The hardware's VMX capabilities where readable, else what KVM or the dump gave."""
        order = {"hardware": 0, "dump": 1, "kvm": 2}
        found = sorted((s for s in self.vmx if s.caps), key=lambda s: order.get(s.source, 9))
        return found[0].caps if found else None

    def to_json(self, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
        doc: dict[str, Any] = {"origin": self.origin}
        if "cpu" in sections:
            doc["cpu"] = {"source": self.cpu_source, "summary": _summary_json(self.cpu)}
        if "vmx" in sections:
            doc["vmx"] = [s.to_json() for s in self.vmx]
        if "svm" in sections:
            doc["svm"] = self.svm.to_json() if self.svm else None
        if "kvm" in sections:
            doc["kvm"] = self.kvm.to_json() if self.kvm else None
        doc["verdict"] = self.verdict.to_json()
        doc["errors"] = dict(self.errors)
        return doc


def _summary_json(summary: CpuidSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    doc = {name: getattr(summary, name) for name in summary.__dataclass_fields__ if name != "signature"}
    sig = summary.signature
    doc["signature"] = None if sig is None else {
        "raw": sig.raw, "family": sig.family, "model": sig.model, "stepping": sig.stepping}
    return doc


# ---- gathering ----------------------------------------------------------------------------------


def probe(from_dump: str | os.PathLike[str] | None = None, kvm_path: str | None = None) -> ProbeReport:
    """Probe this host (or decode a dump of another machine). Raises only for a bad dump file."""
    errors: dict[str, str] = {}
    if from_dump is not None:
        dump = read_dump(from_dump)  # NotADumpError / DumpFormatError / OSError: the caller reports
        table, cpu_source, kvm = dump.cpuid, f"dump {os.fspath(from_dump)}", None
        vmx = (VmxSource("dump", decode_vmx(dump.msrs)),) if 0x480 in dump.msrs else ()
        origin = os.fspath(from_dump)
    else:
        table, cpu_source, error = host_cpuid()
        if error:
            errors["cpu"] = error
        kvm = collect_kvm(kvm_path)
        errors.update({f"kvm.{step}": message for step, message in kvm.errors.items()})
        vmx = _host_vmx(table, kvm, errors)
        origin = "host"
    summary = summarize(table) if table is not None else None
    svm = decode_svm(table) if table is not None and summary and summary.svm else None
    verdict = judge(summary, vmx, svm, kvm)
    return ProbeReport(origin, cpu_source, table, summary, vmx, svm, kvm, verdict, errors)


def _host_vmx(table: CpuidTable | None, kvm: KvmInfo, errors: dict[str, str]) -> tuple[VmxSource, ...]:
    sources = []
    if kvm.vmx_msrs:
        sources.append(VmxSource("kvm", decode_vmx(kvm.vmx_msrs)))
    if table is not None and summarize(table).vmx:
        values, error = read_host_msrs(VMX_MSRS)
        if error:
            errors["vmx.hardware"] = error
        sources.append(VmxSource("hardware", decode_vmx(values) if 0x480 in values else None, error))
    return tuple(sources)


# ---- the verdict ----------------------------------------------------------------------------------


def judge(cpu: CpuidSummary | None, vmx: tuple[VmxSource, ...], svm: SvmInfo | None, kvm: KvmInfo | None) -> Verdict:
    """The verdict for a host (``kvm`` given) or for a dumped CPU (``kvm`` None)."""
    caps = next((s.caps for s in sorted(vmx, key=lambda s: s.source != "hardware") if s.caps), None)
    if kvm is None:
        return _judge_cpu(cpu, caps, svm)
    return _judge_host(cpu, caps, svm, kvm)


def _cpu_extension(cpu: CpuidSummary | None) -> str | None:
    if cpu is None:
        return None
    return "VT-x" if cpu.vmx else "AMD-V" if cpu.svm else None


def _paging_and_tagging(caps: VmxCapabilities | None, svm: SvmInfo | None) -> tuple[str | None, str | None]:
    if caps is not None:
        return ("EPT" if caps.ept else None), ("VPID" if caps.vpid else None)
    if svm is not None:
        return ("NPT" if svm.has("npt") else None), ("ASID" if svm.nasid > 1 else None)
    return None, None


def _judge_cpu(cpu: CpuidSummary | None, caps: VmxCapabilities | None, svm: SvmInfo | None) -> Verdict:
    ext = _cpu_extension(cpu)
    paging, tagging = _paging_and_tagging(caps, svm)
    findings = []
    if ext is None:
        findings.append(Finding(FAIL, "cpu", "the dumped CPU has neither VT-x (VMX) nor AMD-V (SVM)"))
        return Verdict(None, ext, None, paging, tagging, tuple(findings))
    findings.append(Finding(OK, "cpu", f"the dumped CPU has {ext}"))
    if (ext == "VT-x" and caps is None) or (ext == "AMD-V" and svm is None):
        what = "VMX capability MSRs" if ext == "VT-x" else "SVM leaf 0x8000000A"
        findings.append(Finding(INFO, "features", f"the dump has no {what}: second-level paging and TLB "
                                                  "tagging cannot be told from it"))
        return Verdict(None, ext, None, None, None, tuple(findings), features_known=False)
    findings.append(_paging_finding(ext, paging, "the dumped CPU"))
    findings.append(_tagging_finding(ext, tagging, svm, "the dumped CPU"))
    return Verdict(None, ext, None, paging, tagging, tuple(findings))


def _paging_finding(ext: str, paging: str | None, who: str) -> Finding:
    want = "EPT" if ext == "VT-x" else "NPT"
    if paging:
        return Finding(OK, "second-level paging", f"{who} has {paging}: guest page tables need no shadowing")
    return Finding(WARN, "second-level paging", f"{who} has no {want}: KVM shadows the guest's page tables (slower)")


def _tagging_finding(ext: str, tagging: str | None, svm: SvmInfo | None, who: str) -> Finding:
    if tagging == "ASID" and svm is not None:
        return Finding(OK, "tlb tagging", f"{who} tags TLB entries with ASIDs ({svm.nasid} of them)")
    if tagging:
        return Finding(OK, "tlb tagging", f"{who} tags TLB entries with {tagging}s: no flush on VM entry and exit")
    want = "VPID" if ext == "VT-x" else "ASID"
    return Finding(WARN, "tlb tagging", f"{who} has no {want}: the TLB is flushed on every VM entry and exit")


def _judge_host(cpu: CpuidSummary | None, caps: VmxCapabilities | None, svm: SvmInfo | None, kvm: KvmInfo) -> Verdict:
    ext = _cpu_extension(cpu)
    module = kvm.backend.module
    findings: list[Finding] = []
    if cpu is not None and cpu.hypervisor:
        name = cpu.hypervisor_signature or "an unnamed hypervisor"
        findings.append(Finding(INFO, "host", f"this host is itself a virtual machine (hypervisor: {name})"))
    if ext is not None:
        findings.append(Finding(OK, "cpu", f"the CPU has {ext}"))
    elif cpu is not None:
        findings.append(Finding(INFO, "cpu", "the CPU shows neither VT-x (VMX) nor AMD-V (SVM)"))
    usable = kvm.device.open_error is None and kvm.api_version is not None
    if not usable:
        findings.append(Finding(FAIL, "kvm", f"KVM cannot be used: {kvm.device.open_error or 'no answer'}",
                                _device_fix(kvm, ext)))
    else:
        findings.append(Finding(OK, "kvm", f"{kvm.device.path} works (API version {kvm.api_version}, served by "
                                           f"{module or 'an unknown module'})"))
    if module in ("kvm_intel", "kvm_amd"):
        acceleration = "VT-x" if module == "kvm_intel" else "AMD-V"
        findings.append(Finding(OK, "acceleration", f"hardware virtualization: {acceleration} through {module}"))
        paging, tagging = _module_paging_and_tagging(kvm, caps, svm)
        findings.append(_paging_finding(acceleration, paging, module))
        findings.append(_tagging_finding(acceleration, tagging, svm, module))
    elif module is not None:
        acceleration = f"software ({module})"
        paging = tagging = None
        findings.append(Finding(
            WARN, "acceleration",
            f"{module} serves /dev/kvm without VT-x or AMD-V: guest code at CPL3 runs natively, CPL0 code goes "
            "through KVM's instruction emulator, and paging works only in long mode",
            None if ext is None else f"this CPU has {ext}: load {'kvm_intel' if ext == 'VT-x' else 'kvm_amd'} "
                                     "for hardware acceleration"))
    else:
        acceleration = paging = tagging = None
        if ext is None:
            findings.append(Finding(FAIL, "acceleration", "this CPU shows neither VT-x (VMX) nor AMD-V (SVM)",
                                    "enable virtualization (VT-x / AMD-V / SVM mode) in the firmware setup; "
                                    "inside a VM, enable nested virtualization on the outer host"))
    nested = _nested(kvm, module, findings) if usable else None
    return Verdict(usable, acceleration, nested, paging, tagging, tuple(findings))


def _device_fix(kvm: KvmInfo, ext: str | None) -> str:
    device = kvm.device
    if device.exists and not device.accessible:
        if device.listed_in_group and not device.in_group:
            return f"you are in group {device.group!r} but this session is not: log out and in again"
        return f"add your user to group {device.group!r} (sudo usermod -aG {device.group} $USER) and log in again"
    if ext is None:
        return ("enable VT-x / AMD-V in the firmware setup (inside a VM: enable nested virtualization on the "
                "outer host), then load kvm_intel or kvm_amd")
    return f"load the module: modprobe {'kvm_intel' if ext == 'VT-x' else 'kvm_amd'} (dmesg says why if it refuses)"


def _module_paging_and_tagging(kvm: KvmInfo, caps, svm) -> tuple[str | None, str | None]:
    cpu_paging, cpu_tagging = _paging_and_tagging(caps, svm)
    b = kvm.backend
    if b.module == "kvm_intel":
        paging = "EPT" if b.ept else None if b.ept is False else cpu_paging
        tagging = "VPID" if b.vpid else None if b.vpid is False else cpu_tagging
    else:
        paging = "NPT" if b.npt else None if b.npt is False else cpu_paging
        tagging = "ASID"  # AMD-V always tags guest TLB entries with an ASID
    return paging, tagging


def _nested(kvm: KvmInfo, module: str | None, findings: list[Finding]) -> bool | None:
    guest_ext = "VT-x" if kvm.guest_vmx else "AMD-V" if kvm.guest_svm else None
    if guest_ext:
        findings.append(Finding(OK, "nested", f"guests can run hypervisors of their own ({guest_ext} is offered to them)"))
        return True
    if module in ("kvm_intel", "kvm_amd"):
        findings.append(Finding(WARN, "nested", f"guests cannot use VMX/SVM: {module} has nested virtualization off",
                                _NESTED_FIX.format(m=module)))
    elif module is not None:
        findings.append(Finding(WARN, "nested",
                                f"guests cannot use VMX/SVM: {module} offers neither to guests, so no nested "
                                "virtualization here (it needs kvm_intel or kvm_amd on a host with VT-x/AMD-V)"))
    return False
