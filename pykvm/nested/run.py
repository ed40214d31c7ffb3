"""Run the nested scenario: an L1 hypervisor of ``guests/nested/`` and its L2, on a platform.

Platforms:

* ``pykvm``: pykvm's own :class:`~pykvm.machine.Machine` on ``/dev/kvm``. The L1 needs a KVM
  that offers VMX or SVM to its guests (kvm_intel/kvm_amd with ``nested=1``); elsewhere the L1
  boots, finds no extension and says so.
* ``qemu``: QEMU's TCG, which emulates SVM with nested paging (no VMX).
* ``bochs``: Bochs, which emulates VMX (``corei7_skylake_x``...) and SVM (``ryzen``).

Each run is two boots of the same L1: ``probe`` (it prints its VMX capability MSRs and
address width), then the scenario with the blob pykvm built for those capabilities and checked
before launch (:class:`ImageRejected` names each broken rule; ``check=False`` launches anyway
to see the processor refuse it the way the checker predicted).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.vmcs import Violation
from ..probe.vmx import VmxCapabilities, decode_vmx
from . import layout as L
from . import platforms
from .blob import Blob, GuestImages, build_blob
from .report import BANNER, END_MARKER, NestedReport, parse_report

__all__ = [
    "PLATFORMS",
    "ImageRejected",
    "NestedRun",
    "default_build_dir",
    "platform_unavailable",
    "probe",
    "run_l1",
    "run_scenario",
]

PLATFORMS = ("pykvm", "qemu", "bochs")
#: The CPU each platform emulates for a vendor (pykvm: the host's).
CPU_MODELS = {("qemu", "svm"): platforms.QEMU_DEFAULT_CPU,
              ("bochs", "vmx"): platforms.BOCHS_VMX_MODELS[0],
              ("bochs", "svm"): platforms.BOCHS_SVM_MODELS[0]}  # fmt: skip
MEMORY_MIB = 128
DEFAULT_TIMEOUT = {"pykvm": 60.0, "qemu": 60.0, "bochs": 180.0}
#: The L1's error codes that mean "this platform has no usable extension".
NO_EXTENSION = ("no-vmx", "no-svm", "no-extension", "vmx-disabled", "svm-disabled", "no-npt")


def model_tagging(vendor: str, tag: int) -> str:
    """What :mod:`pykvm.model.tlb` says the L2 reads of L2_TAG_VA across the remap exit: ``kept``
    (a TLB tagged by VPID/ASID ``tag`` keeps the old translation over the VM exit and entry) or
    ``flushed`` (VMX without a VPID flushes at each transition). Hardware may always drop entries
    early, so ``flushed`` conforms either way; after the L1's INVVPID / INVLPGA the model, like
    every processor, has no entry left."""
    from ..model.tlb import TLB

    tlb = TLB()
    ept = 1 if vendor == "vmx" else None  # the model names EPTPs by a small id: the L2 has one
    tlb.fill(L.L2_TAG_VA, tag=tag, eptp=ept)
    for _ in ("exit", "entry"):
        if vendor == "vmx":
            tlb.vmx_transition(vpid_enabled=tag != 0)
    kept = tlb.lookup(L.L2_TAG_VA, tag=tag, eptp=ept) is not None
    if vendor == "vmx" and tag:
        tlb.invvpid(1, tag)
    elif vendor == "svm":
        tlb.invlpga(L.L2_TAG_VA, tag)
    if tlb.lookup(L.L2_TAG_VA, tag=tag, eptp=ept) is not None:
        raise AssertionError("the model kept a translation the L1 invalidated")
    return "kept" if kept else "flushed"


@dataclass(frozen=True)
class Deviation:
    """A reference platform known to differ from the manuals in one case, and how to see it."""

    text: str
    seen: Any  # Callable[[NestedRun], bool]: the run shows exactly this deviation


#: (platform, vendor, blob name) -> the platform's known departure from the manual there.
KNOWN_DEVIATIONS: dict[tuple[str, str, str], Deviation] = {
    ("bochs", "vmx", "noncanonical-rip"): Deviation(
        "Bochs 2.7 does not make the SDM 27.3.1.4 check that a 64-bit guest's RIP is canonical: "
        "VM entry succeeds, the L2's first fetch takes #GP and, without an IDT, triple-faults",
        lambda run: run.report.entry_failure is None
        and run.report.neutral_exits == ("shutdown",)
        and run.report.exits[0].rip == 0x0000_8000_0000_0000),
    ("bochs", "svm", "triple-fault"): Deviation(
        "Bochs 2.7 resets the whole machine when an SVM guest triple-faults instead of "
        "delivering #VMEXIT(SHUTDOWN) to the L1 (its VMX side does exit)",
        lambda run: run.report.resets >= 1 and not run.report.exits),
}  # fmt: skip


class ImageRejected(ValueError):
    """pykvm's checker found broken rules in the image: it is not launched."""

    def __init__(self, vendor: str, violations: list[Violation], predicted: str | None):
        self.vendor, self.violations, self.predicted = vendor, violations, predicted
        rules = "; ".join(str(v) for v in violations)
        super().__init__(f"the {vendor.upper()} image breaks {len(violations)} rule(s) and was not "
                         f"launched: {rules} (the processor would answer: {predicted})")


def default_build_dir(vendor: str) -> Path:
    """The guests' build directory with ``vendor``'s L1 and L2 built (on demand, like the CLI's
    default guest)."""
    from ..images import built

    names = [f"nested_{vendor}.elf", f"nested_{vendor}.elf64", f"nested_l2_{vendor}.bin",
             f"nested_l2_{vendor}.elf"]  # fmt: skip
    return built(*names, what=f"the {vendor.upper()} L1 hypervisor").parent


def platform_unavailable(platform: str, vendor: str) -> str | None:
    """Why ``platform`` cannot run ``vendor``'s L1 at all here (None: it can try)."""
    if platform not in PLATFORMS:
        return f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}"
    if vendor not in ("vmx", "svm"):
        return f"vendor must be 'vmx' or 'svm', not {vendor!r}"
    if platform == "qemu":
        if vendor == "vmx":
            return "QEMU's TCG does not emulate VMX: use --platform bochs for the Intel L1"
        return platforms.qemu_available()
    if platform == "bochs":
        return platforms.bochs_available()
    return None


@dataclass
class NestedRun:
    """One boot of an L1 on a platform, and what it reported."""

    platform: str
    vendor: str
    cmdline: str
    serial: str
    report: NestedReport
    seconds: float
    timed_out: bool = False
    exit_status: int | None = None
    cpu_model: str | None = None
    blob: Blob | None = None
    caps: VmxCapabilities | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def deviation(self) -> str | None:
        """The known platform deviation this run shows (None: none, or not this one)."""
        if self.blob is None:
            return None
        known = KNOWN_DEVIATIONS.get((self.platform, self.vendor, self.blob.name))
        return known.text if known is not None and known.seen(self) else None

    @property
    def no_extension(self) -> bool:
        """The L1 found no usable VMX/SVM here."""
        return self.report.error is not None and self.report.error[0] in NO_EXTENSION

    def problems(self) -> list[str]:
        """How the run differs from what pykvm expected of it (empty: as expected)."""
        out: list[str] = []
        r = self.report
        if self.timed_out:
            out.append(f"{self.platform} did not finish within its timeout")
        if r.resets:
            out.append(f"the machine was reset {r.resets} time(s) (the L1 started again)")
        if not r.finished and not self.timed_out:
            out.append("the L1 stopped without its end line")
        if r.error is not None:
            out.append(f"the L1 reported error {r.error[0]}: {r.error[1]}")
        if self.blob is None:
            return out
        predicted = self.blob.predicted_failure
        got = r.failure_text()
        if predicted != got:
            out.append(f"entry failure: pykvm predicted {predicted or 'none'}, the L1 saw {got or 'none'}")
        expected = self.blob.expected_exits
        seen = r.neutral_exits
        if tuple(seen) != tuple(expected):
            out.append(f"L2 exits: expected {', '.join(expected) or 'none'}; "
                       f"saw {', '.join(str(s) for s in seen) or 'none'}")
        out.extend(self._report_problems())
        mismatched = [e for e in r.exits if e.neutral != e.l1_name]
        for e in mismatched:
            out.append(f"exit {e.index}: the L1 called {e.vendor_name} '{e.l1_name}', pykvm '{e.neutral}'")
        return out

    @property
    def tlb_tagging(self) -> str | None:
        """What the L2 saw of its TLB across the remap exit: ``kept`` (the tagged entry survived
        the VM exit and entry, still pointing at page A), ``flushed`` (the platform dropped it),
        None if the scenario did not get that far."""
        reports = self.report.l2_reports
        if len(reports) < 3:
            return None
        before, after = reports[2][0], reports[2][1]
        if before != L.L2_VALUE_A:
            return None
        return {L.L2_VALUE_A: "kept", L.L2_VALUE_B: "flushed"}.get(after)

    @property
    def tlb_model(self) -> str | None:
        """:func:`model_tagging` for this run's image (None without one)."""
        if self.blob is None:
            return None
        return model_tagging(self.vendor, self.blob.state.tlb_tag)

    def _report_problems(self) -> list[str]:
        """The values the L2 reported against what its scenario makes them (l2.S)."""
        if self.blob is None or self.blob.violations or self.blob.triple_fault:
            return []
        signature = int.from_bytes(L.L1_CPUID_SIGNATURE.encode()[:4], "little")
        expected = [
            ("the CPUID leaf, IN value and echo", (signature, L.L2_IN_VALUE, 0x1235)),
            ("the page-table switch (A, B, A)", (L.L2_VALUE_A, L.L2_VALUE_B, L.L2_VALUE_A)),
            ("the remapped page before the flush", None),
            ("the remapped page after the flush", (L.L2_VALUE_B, 0, 0)),
        ]  # fmt: skip
        got = self.report.l2_reports
        if len(got) != len(expected):
            return [f"the L2 made {len(got)} reports, not {len(expected)}"]
        out = []
        for (what, want), values in zip(expected, got):
            if want is not None and tuple(values) != want:
                out.append(f"{what}: the L2 saw {', '.join(hex(v) for v in values)}, "
                           f"not {', '.join(hex(v) for v in want)}")
        if self.tlb_tagging is None:
            out.append(f"the remapped page read {got[2][0]:#x} then {got[2][1]:#x}: neither a kept "
                       "nor a flushed translation")
        return out

    def to_json(self) -> dict[str, Any]:
        blob = self.blob
        return {
            "platform": self.platform, "vendor": self.vendor, "cpu_model": self.cpu_model,
            "cmdline": self.cmdline, "seconds": round(self.seconds, 3),
            "timed_out": self.timed_out, "exit_status": self.exit_status,
            "scenario": None if blob is None else blob.name,
            "expected_exits": None if blob is None else list(blob.expected_exits),
            "predicted_failure": None if blob is None else blob.predicted_failure,
            "violations": [] if blob is None else [str(v) for v in blob.violations],
            "tlb_tagging": self.tlb_tagging, "tlb_model": self.tlb_model,
            "deviation": self.deviation,
            "l1_exits": self.extra.get("l1_exits"),
            "report": self.report.to_json(), "problems": self.problems(),
        }  # fmt: skip


def _run_pykvm(kernel: Path, blob: bytes | None, cmdline: str, timeout: float,
               machine_hook=None) -> tuple[str, int | None, bool, float, dict[str, int]]:  # fmt: skip
    from ..machine import GuestTimeout, Machine

    modules = [("blob", blob, "")] if blob is not None else []
    serial = io.BytesIO()
    start = time.monotonic()
    timed_out, status = False, None
    # The in-kernel irqchip gives the L1 the PC's 8259s to mask (and an IOAPIC, masked at reset).
    with Machine(MEMORY_MIB << 20, irqchip=True) as m:
        m.add_pc_devices(serial=serial, tables=False)
        m.load_kernel(kernel.read_bytes(), path=str(kernel), cmdline=cmdline, modules=modules)
        if machine_hook is not None:
            machine_hook(m)
        try:
            outcome = m.run(timeout=timeout)
            status = outcome.status >> 1 if outcome.status & 1 and outcome.status > 1 else None
        except GuestTimeout:
            timed_out = True
        l1_exits = {key: n for key, n, _ in m.stats.rows()}  # what Python saw of the L1 itself
    return serial.getvalue().decode("latin-1"), status, timed_out, time.monotonic() - start, l1_exits


def run_l1(platform: str, images: GuestImages, *, blob: bytes | None = None, cmdline: str = "",
           cpu_model: str | None = None, timeout: float | None = None,
           workdir: Path | None = None, machine_hook=None) -> NestedRun:  # fmt: skip
    """Boot ``images.l1`` on ``platform`` with ``blob`` as its module; parse what it says."""
    vendor = images.vendor
    reason = platform_unavailable(platform, vendor)
    if reason is not None:
        raise platforms.PlatformUnavailable(reason)
    timeout = DEFAULT_TIMEOUT[platform] if timeout is None else timeout
    model = cpu_model or CPU_MODELS.get((platform, vendor))
    extra: dict[str, Any] = {}
    if platform == "pykvm":
        serial, status, timed_out, seconds, extra["l1_exits"] = _run_pykvm(
            images.l1, blob, cmdline, timeout, machine_hook)  # fmt: skip
    else:
        common: dict[str, Any] = {"memory_mib": MEMORY_MIB, "timeout": timeout, "banner": BANNER,
                                  "end_marker": END_MARKER, "workdir": workdir}  # fmt: skip
        with contextlib.ExitStack() as stack:
            modules: list[Path] = []
            if blob is not None:  # the module file: in workdir (kept) or a temporary directory
                where = workdir or Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="pykvm-nested-")))  # fmt: skip
                where.mkdir(parents=True, exist_ok=True)
                modules = [where / "blob"]
                modules[0].write_bytes(blob)
            if platform == "qemu":
                res = platforms.run_qemu(images.l1, modules, cmdline, cpu=model or platforms.QEMU_DEFAULT_CPU, **common)
            else:
                res = platforms.run_bochs(images.l1, modules, cmdline, cpu_model=model or "", **common)
        serial, status, timed_out, seconds = res.serial, res.exit_status, res.timed_out, res.seconds
    report = parse_report(serial)
    return NestedRun(platform, vendor, cmdline, serial, report, seconds, timed_out, status, model,
                     extra=extra)  # fmt: skip


def probe(platform: str, images: GuestImages, *, extra_args: str = "", **kw: Any) -> NestedRun:
    """Boot the L1 with ``probe`` (and ``extra_args``): its VMX capability MSRs (VMX) or SVM
    leaf, decoded into ``run.caps`` (VMX) and ``run.extra['maxphyaddr']``."""
    run = run_l1(platform, images, cmdline=f"probe {extra_args}".strip(), **kw)
    if run.report.msrs and images.vendor == "vmx":
        run.caps = decode_vmx(run.report.msrs)
    widths = run.report.cpuid.get(0x8000_0008)
    if widths:
        run.extra["maxphyaddr"] = widths["eax"] & 0xFF
    return run


_PROBES: dict[tuple[str, str, str | None, str], NestedRun] = {}


def run_scenario(
    vendor: str, platform: str, *, breakage: str | None = None, triple_fault: bool = False,
    check: bool = True, build_dir: Path | None = None, cpu_model: str | None = None,
    timeout: float | None = None, workdir: Path | None = None, cmdline: str = "",
    machine_hook=None,
) -> NestedRun:  # fmt: skip
    """Probe, build the blob for what the probe found, check it, run it; see the module doc.

    Returns the probe's run when the L1 found no usable extension there (``run.no_extension``).
    """
    images = GuestImages(build_dir or default_build_dir(vendor), vendor)
    kw: dict[str, Any] = {"cpu_model": cpu_model, "timeout": timeout, "machine_hook": machine_hook}
    # An emulator's CPU model answers the same every time: probe it once per process.
    key = (platform, str(images.l1), cpu_model or CPU_MODELS.get((platform, vendor)), cmdline)
    first = _PROBES.get(key) if platform != "pykvm" else None
    if first is None:
        first = probe(platform, images, extra_args=cmdline, **kw)
        if platform != "pykvm" and first.report.status == L.STATUS_PROBED:
            _PROBES[key] = first
    if first.report.status != L.STATUS_PROBED:
        return first
    blob = build_blob(vendor, images, caps=first.caps, breakage=breakage,
                      triple_fault=triple_fault, maxphyaddr=first.extra.get("maxphyaddr"))  # fmt: skip
    if check and blob.violations:
        raise ImageRejected(vendor, blob.violations, blob.predicted_failure)
    run = run_l1(platform, images, blob=blob.data, cmdline=cmdline, workdir=workdir, **kw)
    run.blob, run.caps = blob, first.caps
    run.extra.update(maxphyaddr=first.extra.get("maxphyaddr"), probe_seconds=round(first.seconds, 3))
    return run
