"""Rich tables for ``pykvm probe`` and ``pykvm compare`` on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .report import FAIL, INFO, OK, WARN, ProbeReport
from .vmx import Setting

STYLE = {OK: "green", INFO: "cyan", WARN: "yellow", FAIL: "bold red"}
SETTING_STYLE = {Setting.YES: "green", Setting.FORCED: "cyan", Setting.DEFAULT1: "cyan", Setting.NO: "dim"}


def yes_no(value: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[dim]no[/]", None: "[dim]unknown[/]"}[value]


def _kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def render_cpu(report: ProbeReport) -> list[Table]:
    s = report.cpu
    if s is None:
        return [_kv_table("CPU", [("source", report.cpu_source), ("error", report.errors.get("cpu", "no CPUID"))])]
    sig = s.signature
    rows = [
        ("source", report.cpu_source),
        ("vendor", s.vendor or "?"),
        ("brand", s.brand or "?"),
        ("family/model/stepping", f"{sig.family:#x}/{sig.model:#x}/{sig.stepping}" if sig else "?"),
        ("VMX (VT-x)", yes_no(s.vmx)),
        ("SVM (AMD-V)", yes_no(s.svm)),
        ("hypervisor", yes_no(s.hypervisor) + (f" ({s.hypervisor_signature})" if s.hypervisor_signature else "")),
        ("PCID / INVPCID", f"{yes_no(s.pcid)} / {yes_no(s.invpcid)}"),
        ("LA57 (5-level paging)", yes_no(s.la57)),
        ("1 GiB pages", yes_no(s.pdpe1gb)),
        ("NX", yes_no(s.nx)),
        ("address bits (phys / linear)", " / ".join("?" if b is None else str(b) for b in (s.phys_addr_bits, s.linear_addr_bits))),
    ]
    return [_kv_table("CPU", rows)]


def render_vmx(report: ProbeReport) -> list[Table]:
    if not report.vmx:
        return [_kv_table("VMX", [("", "no VMX capability MSRs (the CPU has no VT-x, or none were readable)")])]
    tables = []
    for src in report.vmx:
        caps = src.caps
        if caps is None:
            tables.append(_kv_table(f"VMX ({src.source})", [("error", src.error or "not available")]))
            continue
        b = caps.basic
        rows = [
            ("VMCS revision / size", f"{b.revision_id:#x} / {b.vmcs_size} bytes"),
            ("VMCS memory type", b.memory_type_name),
            ("TRUE controls", yes_no(b.true_controls)),
            ("INS/OUTS exit info", yes_no(b.ins_outs_info)),
        ]
        if caps.ept_vpid is not None:
            e = caps.ept_vpid
            rows += [
                ("EPT walk length", " ".join(w for w, ok in (("4", e.walk_length_4), ("5", e.walk_length_5)) if ok) or "-"),
                ("EPT 2 MiB / 1 GiB pages", f"{yes_no(e.pages_2mb)} / {yes_no(e.pages_1gb)}"),
                ("EPT A/D bits", yes_no(e.accessed_dirty)),
                ("INVEPT single / all", f"{yes_no(e.invept_single_context)} / {yes_no(e.invept_all_context)}"),
                ("INVVPID addr / single / all / single-globals",
                 " / ".join(yes_no(x) for x in (e.invvpid_individual_address, e.invvpid_single_context,
                                                e.invvpid_all_context, e.invvpid_single_context_retaining_globals))),
            ]
        if caps.misc is not None:
            m = caps.misc
            rows += [("preemption timer rate", f"TSC >> {m.preemption_timer_rate}"), ("CR3 targets", str(m.cr3_targets))]
        tables.append(_kv_table(f"VMX capabilities ({src.source})", rows))
        controls = Table(title=f"VMX controls ({src.source})", title_justify="left")
        for col in ("group", "control", "bit", "setting"):
            controls.add_column(col)
        for part in caps.control_msrs:
            for c in part.controls:
                style = SETTING_STYLE.get(c.setting, "red")
                controls.add_row(str(part.group), c.name, str(c.bit), f"[{style}]{c.setting}[/]")
        tables.append(controls)
    return tables


def render_svm(report: ProbeReport) -> list[Table]:
    s = report.svm
    if s is None:
        return [_kv_table("SVM", [("", "the CPU has no AMD-V (SVM)")])]
    return [_kv_table("SVM (CPUID 0x8000000A)", [
        ("revision", str(s.revision)),
        ("ASIDs", str(s.nasid)),
        ("features", ", ".join(s.features) or "-"),
    ])]


def render_kvm(report: ProbeReport) -> list[Table]:
    k = report.kvm
    if k is None:
        return []
    d, b = k.device, k.backend
    rows = [
        ("device", f"{d.path} mode {d.mode} {d.owner}:{d.group}, "
                   f"{'accessible' if d.accessible else '[red]not accessible[/]'} to you"),
        ("module", b.module or "[red]none loaded[/]"),
        ("module parameters", " ".join(f"{n}={v}" for n, v in b.params.items()) or "-"),
        ("API version", str(k.api_version)),
    ]
    if k.caps is not None:
        present = sum(1 for v in k.caps.values() if v > 0)
        rows.append(("capabilities", f"{present} of {len(k.caps)} present (--json lists each)"))
    rows += [
        ("VMX / SVM offered to guests", f"{yes_no(k.guest_vmx)} / {yes_no(k.guest_svm)}"),
        ("MSRs saved/restored", str(len(k.msr_index_list)) if k.msr_index_list is not None else "?"),
        ("feature MSRs", " ".join(f"{i:#x}" for i in k.msr_feature_index_list or ()) or "-"),
        ("binary stats", f"{len(k.vm_stats.descriptors) if k.vm_stats else '?'} per VM, "
                         f"{len(k.vcpu_stats.descriptors) if k.vcpu_stats else '?'} per vCPU"),
    ]
    rows += [(f"[red]error[/] ({step})", message) for step, message in k.errors.items()]
    return [_kv_table("KVM", rows)]


def render_caps(report: ProbeReport, columns: int = 3) -> list[Table]:
    """Every KVM_CAP_* this KVM has (value > 0), several to a row."""
    caps = report.kvm.caps if report.kvm else None
    if not caps:
        return []
    present = [f"{name}={value}" for name, value in caps.items() if value > 0]
    table = Table(title=f"KVM capabilities ({len(present)} of {len(caps)})", title_justify="left", show_header=False)
    for _ in range(columns):
        table.add_column()
    for i in range(0, len(present), columns):
        table.add_row(*present[i : i + columns])
    return [table]


RENDERERS = {"cpu": render_cpu, "vmx": render_vmx, "svm": render_svm, "kvm": render_kvm}


def render_verdict(report: ProbeReport) -> Table:
    v = report.verdict
    table = Table(title="Verdict", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    usable = "unknown (a dump)" if v.usable is None else ("[green]yes[/]" if v.usable else "[bold red]no[/]")
    table.add_row("can run KVM guests", usable)
    table.add_row("acceleration", v.acceleration or "[red]none[/]")
    table.add_row("nested virtualization", yes_no(v.nested))
    unknown = "[dim]unknown (not in the dump)[/]"
    table.add_row("second-level paging", v.second_level_paging or ("none (shadow paging)" if v.features_known else unknown))
    table.add_row("TLB tagging", v.tlb_tagging or ("none (flush on every world switch)" if v.features_known else unknown))
    for f in v.findings:
        text = f"[{STYLE[f.level]}]{f.level}[/] {f.message}" + (f"\n   [bold]fix:[/] {f.fix}" if f.fix else "")
        table.add_row(f.topic, text)
    return table


def print_report(report: ProbeReport, sections: tuple[str, ...], console: Console | None = None) -> None:
    console = console or Console()
    for name in sections:
        for table in RENDERERS[name](report):
            console.print(table)
    if sections == ("kvm",):  # asked for KVM alone: list its capabilities too
        for table in render_caps(report):
            console.print(table)
    for key, message in report.errors.items():
        if not key.startswith("kvm."):  # the KVM table lists its own
            console.print(f"[red]error[/] ({key}): {message}")
    console.print(render_verdict(report))


def mark(support: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[dim]no[/]", None: "[dim]?[/]"}[support]


def print_comparison(comparison, machine: str, console: Console | None = None) -> None:
    """VT-x and AMD-V side by side, one table per topic, with this machine's support marked."""
    console = console or Console()
    for topic in comparison.topics:
        table = Table(title=topic, title_justify="left", show_lines=True)
        table.add_column("aspect", style="bold", max_width=22)
        table.add_column("Intel VT-x")
        table.add_column("", justify="center", width=3)
        table.add_column("AMD-V")
        table.add_column("", justify="center", width=3)
        table.add_column("note", style="dim")
        for row in comparison.rows:
            if row.topic == topic:
                table.add_row(row.aspect, row.intel, mark(row.intel_support), row.amd, mark(row.amd_support), row.note)
        console.print(table)
    console.print(f"yes / no / ? = what {machine} supports ({comparison.vendor or 'unknown vendor'}"
                  + (f", {comparison.asids} ASIDs" if comparison.asids is not None else "")
                  + (f", IOMMU: {comparison.iommu}" if comparison.iommu else "") + ")")
