"""``pykvm nested``: run the nested scenario (an L1 hypervisor and its L2) and show the L2's exits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import argtypes
from ..cli import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, _fail
from .blob import BREAKAGES
from .platforms import PlatformError, PlatformUnavailable
from .run import PLATFORMS, ImageRejected, NestedRun, run_scenario

EXAMPLES = f"""\
examples:
  pykvm nested                                the scenario under pykvm (needs nested VMX/SVM in KVM)
  pykvm nested --platform bochs               the Intel L1 under Bochs (corei7_skylake_x)
  pykvm nested --platform qemu                the AMD L1 under QEMU's TCG
  pykvm nested --platform reference           both, side by side (Bochs VMX, QEMU SVM)
  pykvm nested --platform bochs --break rflags-reserved             refused before launch
  pykvm nested --platform bochs --break rflags-reserved --no-check  VM entry fails as predicted
  pykvm nested --vendor vmx --append fc-lock   as if the firmware had locked VT-x off (exit 66)
  pykvm nested --platform qemu --triple-fault --json

breakages: {", ".join(f"{n} ({b.description})" for n, b in BREAKAGES.items())}
exit status: 0 as expected, 1 the run differed from the expectation, 64 the image breaks a rule
(not launched), 66 the platform has no usable VMX/SVM or is not installed.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "nested", help="run an L1 hypervisor (VMX or SVM) and its L2; show the L2's exits",
        description="Boot pykvm's L1 hypervisor (guests/nested/), hand it a VMCS or VMCB and "
        "EPT/NPT tables built by pykvm.model, and report every exit of its L2 guest.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--platform", choices=(*PLATFORMS, "reference"), default="pykvm",
                   help="where the L1 runs (default: pykvm on /dev/kvm); 'reference' runs "
                   "the VMX L1 on Bochs and the SVM L1 on QEMU")  # fmt: skip
    p.add_argument("--vendor", choices=("auto", "vmx", "svm"), default="auto",
                   help="which L1 (default: the host CPU's under pykvm, SVM under QEMU, VMX "
                   "under Bochs)")  # fmt: skip
    p.add_argument("--cpu-model", help="the emulated CPU (QEMU -cpu, Bochs cpu model)")
    p.add_argument("--break", dest="breakage", choices=tuple(BREAKAGES),
                   help="put a deliberate fault into the image")
    p.add_argument("--triple-fault", action="store_true", help="start the L2 where it triple-faults")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="the L1's command line: 'fc-lock' locks IA32_FEATURE_CONTROL with VMX off "
                   "first, as a firmware that disabled VT-x would")  # fmt: skip
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="launch an image pykvm's checker rejects (to see the processor refuse it)")
    p.add_argument("--timeout", type=argtypes.number(float, minimum=1.0, what="a number of seconds"),
                   help="seconds per boot (default: 60, Bochs 180)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the platform's files (ISO, logs) in DIR")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_nested)


def _host_vendor() -> str:
    """The host CPU's extension by its CPUID vendor: 'svm' for AMD and Hygon, else 'vmx'."""
    from ..probe.cpuid import vendor
    from ..probe.hostcpu import host_cpuid

    table, _source, _error = host_cpuid()
    name = vendor(table) if table is not None else None
    return "svm" if name in ("AuthenticAMD", "HygonGenuine") else "vmx"


def _vendor_for(platform: str, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    return {"qemu": "svm", "bochs": "vmx"}.get(platform) or _host_vendor()


def _hex(n: int) -> str:
    return f"{n:#x}"


def _print_runs(runs: list[NestedRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for run in runs:
        blob = run.blob
        title = (f"{run.vendor.upper()} L1 on {run.platform} ({run.cpu_model or 'host CPU'}), "
                 f"blob '{blob.name if blob else '-'}': {len(run.report.exits)} L2 exits in "
                 f"{run.seconds:.1f} s")  # fmt: skip
        table = Table(title=title, title_justify="left")
        for col in ("#", "neutral", "vendor code", "qualification" if run.vendor == "vmx"
                    else "EXITINFO1", "meaning", "RIP"):  # fmt: skip
            table.add_column(col)
        for e in run.report.exits:
            meaning = e.meaning + (f" at GPA {_hex(e.gpa)}" if e.gpa else "")
            table.add_row(str(e.index), e.neutral or "?", f"{_hex(e.code)} {e.vendor_name}",
                          _hex(e.qualification), meaning, _hex(e.rip))  # fmt: skip
        console.print(table)
        for a, b, c in run.report.l2_reports:
            console.print(f"  l2 report: {a:#x} {b:#x} {c:#x}")
        tagging = {"kept": "the tagged entry survived the exit (read the old page until the flush)",
                   "flushed": "the platform flushed it at the exit (no stale read)"}  # fmt: skip
        if run.tlb_tagging:
            console.print(f"  TLB across the remap exit: {tagging[run.tlb_tagging]}; pykvm's TLB "
                          f"model of this image: {run.tlb_model} (either conforms: entries may "
                          "always be dropped early)")  # fmt: skip
        for note in run.report.notes:
            console.print(f"  l1: {note}")
        if run.report.entry_failure is not None:
            console.print(f"  entry failed: {run.report.failure_text()} (pykvm predicted "
                          f"{blob.predicted_failure if blob else '-'})")  # fmt: skip
    if len(runs) == 2:
        _print_side_by_side(console, runs)
    for run in runs:
        problems = run.problems()
        verdict = "as expected" if not problems else "; ".join(problems)
        console.print(f"{run.vendor.upper()} on {run.platform}: {verdict}")
        if run.deviation:
            console.print(f"  a known deviation of {run.platform}: {run.deviation}")


def _print_side_by_side(console, runs: list[NestedRun]) -> None:
    from rich.table import Table

    table = Table(title="The same L2 under both vendors", title_justify="left")
    table.add_column("#")
    table.add_column("neutral")
    for run in runs:
        table.add_column(f"{run.vendor.upper()} ({run.platform})")
    rows = max(len(r.report.exits) for r in runs)
    for i in range(rows):
        cells = []
        names = set()
        for run in runs:
            exits = run.report.exits
            if i < len(exits):
                e = exits[i]
                names.add(e.neutral or "?")
                cells.append(f"{_hex(e.code)} {e.vendor_name} [{_hex(e.qualification)}]")
            else:
                cells.append("-")
        table.add_row(str(i), " / ".join(sorted(names)), *cells)
    console.print(table)


def _unavailable_message(run: NestedRun) -> str:
    _code, text = run.report.error or ("", "")
    msg = f"the {run.vendor.upper()} L1 on {run.platform}: {text}"
    if run.platform == "pykvm":
        from ..probe.kvm import collect_backend

        backend = collect_backend()
        module = backend.module or "unknown"
        if module == "kvm_pvm":
            msg += ("; /dev/kvm is served by kvm_pvm, which offers neither VMX nor SVM to its guests: "
                    "use --platform bochs (VMX) or --platform qemu (SVM)")  # fmt: skip
        elif backend.nested is False:
            msg += (f"; {module} has nested virtualization off: "
                    f"modprobe -r {module} && modprobe {module} nested=1")  # fmt: skip
    return msg


def cmd_nested(args) -> int:
    if args.platform == "reference":
        plan = [("bochs", "vmx"), ("qemu", "svm")]
        if args.vendor != "auto":
            plan = [p for p in plan if p[1] == args.vendor]
    else:
        plan = [(args.platform, _vendor_for(args.platform, args.vendor))]
    runs: list[NestedRun] = []
    try:
        for platform, vendor in plan:
            runs.append(run_scenario(
                vendor, platform, breakage=args.breakage, triple_fault=args.triple_fault,
                check=args.check, cpu_model=args.cpu_model, timeout=args.timeout,
                cmdline=args.append,
                workdir=None if args.keep is None else args.keep / f"{platform}-{vendor}"))  # fmt: skip
    except ImageRejected as e:
        violations = [{"rule": v.rule_id, "field": v.field, "message": v.message}
                      for v in e.violations]  # fmt: skip
        return _fail(args, e, str(e), EXIT_USAGE,
                     details={"violations": violations, "predicted": e.predicted})
    except PlatformUnavailable as e:
        return _fail(args, e, str(e), EXIT_UNAVAILABLE)
    except PlatformError as e:
        return _fail(args, e, str(e), EXIT_FAILURE)
    missing = [r for r in runs if r.no_extension]
    if missing:
        message = _unavailable_message(missing[0])
        return _fail(args, PlatformUnavailable(message), message, EXIT_UNAVAILABLE,
                     extra={"runs": [r.to_json() for r in runs]})
    if args.json:
        print(json.dumps({"result": "ok" if not any(r.problems() for r in runs) else "differs",
                          "runs": [r.to_json() for r in runs]}, indent=2))  # fmt: skip
    else:
        _print_runs(runs)
    return EXIT_FAILURE if any(r.problems() for r in runs) else EXIT_OK
