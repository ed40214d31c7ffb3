"""The ``pykvm`` command line: ``pykvm run``, ``probe``, ``compare``, ``tlb`` and ``nested``.

Start-up matters here (``pykvm run`` of a small guest is over in milliseconds), so this module imports
only what every command needs; each command imports what it uses when it runs, and :func:`main`
builds the parser of the one subcommand it was given (``tests/test_startup.py`` checks which modules a
``pykvm run`` of the default guest imports).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from . import argtypes
from . import status as st
from .ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError

if TYPE_CHECKING:
    from . import exits
    from .machine import GuestError, Machine, Outcome
    from .x86.modes import Mode

# The statuses of pykvm/status.py (one table for every command); EXIT_FAILURE is a command's own
# "it ran, and the answer is no" (pykvm nested: the run differed from the prediction).
EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = st.OK, st.USAGE, st.UNAVAILABLE, st.INTERRUPTED
EXIT_FAILURE = 1
EXIT_SIGPIPE = 128 + 13  # as a shell counts a command that SIGPIPE ended


class Parser(argparse.ArgumentParser):
    """argparse with pykvm's usage status (64, which no guest can give) instead of argparse's 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


STATUS_EPILOG = "exit statuses of a guest run (pykvm run):\n" + "\n".join(
    f"  {code:<4} {meaning}" for code, meaning in st.MEANINGS.items()
) + "\n  odd  the guest wrote (status >> 1) to isa-debug-exit (1: it wrote 0)\n  1-63 the guest said DONE(status)\n"

RUN_EXAMPLES = """\
examples:
  pykvm run                                   run the built-in hello guest (long mode)
  pykvm run guests/build/hello_real.bin --mode real
  pykvm run kernel.elf --smp 4 --append "console=ttyS0" --module "initrd.img" --stats
  pykvm run kernel.bin --mode protected --mem 16M --timeout 5
  pykvm run guest.bin --mode long --load 0x200000 --entry 0x200010 --trace-exits
  pykvm run guest.bin --json | jq .status
  pykvm run guests/build/counter.bin --control /tmp/vm.sock    then: pykvm snapshot / pykvm migrate
  pykvm run --incoming 127.0.0.1:4444         wait for a live migration, then run the guest on
"""

PROBE_EXAMPLES = """\
examples:
  pykvm probe                                 everything about this host, and the verdict
  pykvm probe --section vmx                   the VMX capability MSRs only
  pykvm probe --json | jq .verdict
  pykvm probe --from-dump GenuineIntel00306F2_HaswellEP_00_CPUID.txt
  cpuid -r > mine.txt; pykvm probe --from-dump mine.txt
"""

COMPARE_EXAMPLES = """\
examples:
  pykvm compare                               the comparison, marked for this host
  pykvm compare --from-dump AuthenticAMD0800F11_K17_Zen3_CPUID.txt
  pykvm compare --json | jq '.rows[] | select(.topic == "TLB tagging")'
"""

def _trace_range(text: str) -> tuple[int, int]:
    from .trace import parse_range

    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


parse_size = argtypes.size
parse_addr = argtypes.number(int, minimum=0, what="an address (examples: 0x1000, 1048576)")
parse_timeout = argtypes.number(float, minimum=1e-3, what="a number of seconds")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``pykvm`` parser; with ``command`` (a subcommand's name), only that subcommand's parser is
    added, so that the modules the others are defined in are not imported."""
    parser = Parser(prog="pykvm", description="A thin hypervisor driver over /dev/kvm.",
                    epilog=STATUS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add in SUBCOMMANDS.items():
        if command is None or name == command:
            add(sub)
    return parser


def _add_run(sub) -> None:
    from .images import DEFAULT_GUEST
    from .x86 import layout
    from .x86.modes import Mode

    run = sub.add_parser(
        "run",
        help="run a guest image (flat, ELF or multiboot)",
        description="Run a guest image under /dev/kvm (flat binary, ELF or multiboot kernel, told apart by "
                    "content); the guest console and COM1 go to stdout.",
        epilog=RUN_EXAMPLES + "\n" + STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("image", nargs="?", help=f"a flat binary, ELF or multiboot image (default: the built-in "
                                                f"{DEFAULT_GUEST} guest)")
    run.add_argument("--mode", choices=[m.value for m in Mode], default=None,
                     help="CPU mode the guest starts in (default: long; real for an image ending in _real.bin)")
    run.add_argument("--la57", action="store_true", help="5-level paging in long mode (where the host has LA57)")
    run.add_argument("--mem", type=parse_size, default=None, metavar="SIZE",
                     help=f"guest RAM at GPA 0 (default: {layout.DEFAULT_MEM_SIZE >> 20}M); with --incoming, the most "
                          "a migrated guest may have")
    run.add_argument("--load", type=parse_addr, metavar="ADDR",
                     help="GPA to load the image at (default: 0x1000 in real mode, 0x100000 otherwise)")
    run.add_argument("--entry", type=parse_addr, metavar="ADDR", help="entry point (default: the load address)")
    run.add_argument("--timeout", type=parse_timeout, metavar="SECONDS", help="stop a guest that runs longer")
    run.add_argument("--trace-exits", action="store_true", help="print every exit on stderr (cheap)")
    run.add_argument("--trace", action="store_true",
                     help="single-step the guest and print each instruction (bytes, disassembly, changed registers)")
    run.add_argument("--trace-range", type=_trace_range, metavar="LO-HI",
                     help="print only instructions at LO <= address < HI (implies --trace)")
    run.add_argument("--trace-count", type=argtypes.number(int, minimum=1, what="a count"), metavar="N",
                     help="stop tracing after N printed instructions (implies --trace)")
    run.add_argument("--trace-file", metavar="FILE", help="write the trace to FILE, not stderr (implies --trace)")
    run.add_argument("--gdb", metavar="[HOST]:PORT",
                     help="serve gdb's remote protocol (gdb: target remote HOST:PORT); each vCPU is a thread")
    run.add_argument("--wait-gdb", action="store_true", help="with --gdb: hold the guest until gdb attaches")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of the console")
    run.add_argument("--smp", type=argtypes.number(int, minimum=1, maximum=15, what="a CPU count (1-15)"), default=1,
                     metavar="N", help="vCPUs (each a thread; needs the irqchip)")
    run.add_argument("--irqchip", nargs="?", const="kernel", choices=("kernel", "split"),
                     help="interrupt controllers: kernel = KVM's PIC, IOAPIC, LAPICs and PIT (the default for "
                          "kernels and --smp > 1); split = LAPICs in KVM, the IOAPIC in Python, no PIC or PIT")
    run.add_argument("--append", default="", metavar="CMDLINE", help="a multiboot kernel's command line")
    run.add_argument("--module", action="append", default=[], metavar="'FILE [ARGS]'",
                     help="a multiboot boot module (repeatable)")
    run.add_argument("--serial", default="stdio", metavar="stdio|none|file:PATH",
                     help="where the COM1 UART goes (stdio: stdout, and your terminal's input feeds it)")
    run.add_argument("--dump-pagetables", action="store_true",
                     help="when the guest stops, print the mappings of its live page tables")
    run.add_argument("--strict", action="store_true",
                     help="stop the guest at a port or MMIO access no device claims (default: as QEMU, port reads "
                          "give all ones, MMIO reads 0, writes are dropped)")
    run.add_argument("--stats", action="store_true",
                     help="exit counts and times per exit kind and device, and KVM's own counters")
    run.add_argument("--snapshot-on", nargs=2, metavar=("SIGNAL|exit", "FILE"),
                     help="save the whole VM to FILE each time the signal comes (USR1, HUP, ...; the guest "
                          "then runs on), or when the guest stops (exit); `pykvm restore FILE` goes on from there")
    run.add_argument("--control", metavar="PATH",
                     help="serve a control socket at PATH (mode 0600) while the guest runs: pykvm snapshot and "
                          "pykvm migrate talk to it")
    run.add_argument("--incoming", metavar="ADDR",
                     help="take the guest from a live migration (pykvm migrate) instead of an image: listen on "
                          "HOST:PORT, tcp:HOST:PORT (port 0: any free one, said on stderr) or unix:PATH")
    run.add_argument("--incoming-wait", type=parse_timeout, metavar="SECONDS",
                     help="with --incoming: give up when no source came within SECONDS (default: wait)")
    run.set_defaults(func=cmd_run)


def _add_probe(sub) -> None:
    probe = sub.add_parser(
        "probe",
        help="what this host's VT-x / AMD-V and KVM can do",
        description="Report the CPU's virtualization extensions, the VMX capability MSRs, the SVM leaf, "
                    "what KVM offers, and a verdict: can this host run KVM guests, how, and can they nest. "
                    "Exit status 0: usable; 66: not usable here.",
        epilog=PROBE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument("--json", action="store_true", help="print one JSON document")
    probe.add_argument("--section", choices=("cpu", "vmx", "svm", "kvm", "all"), default="all",
                       help="show one part of the report (the verdict is always there)")
    probe.add_argument("--from-dump", metavar="FILE",
                       help="decode a raw CPUID/MSR dump of another machine (AIDA64 text or `cpuid -r`)")
    probe.set_defaults(func=cmd_probe)


def _add_compare(sub) -> None:
    compare = sub.add_parser(
        "compare",
        help="Intel VT-x and AMD-V side by side, marked with what this host supports",
        description="Intel VT-x and AMD-V point by point: CPU modes, control structures, instructions, "
                    "TLB tagging, nested paging, interrupt and I/O virtualization. Each row is marked with "
                    "what this host (or a --from-dump machine) supports.",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--json", action="store_true", help="print one JSON document")
    compare.add_argument("--from-dump", metavar="FILE", help="mark the rows for a dumped machine instead")
    compare.set_defaults(func=cmd_compare)


def _add_tlb(sub) -> None:
    from .model import tlbcmd

    tlbcmd.add_parser(sub)


def _add_nested(sub) -> None:
    from .nested import cli as nested_cli

    nested_cli.add_parser(sub)


def _add_restore(sub) -> None:
    from . import snapcli

    snapcli.add_parser(sub)


def _add_snapshot(sub) -> None:
    from . import snapcli

    snapcli.add_snapshot_parser(sub)


def _add_migrate(sub) -> None:
    from . import snapcli

    snapcli.add_migrate_parser(sub)


def _add_boot(sub) -> None:
    from . import boot

    boot.add_parser(sub)


#: Each subcommand and what adds its parser, in the order ``pykvm --help`` lists them.
SUBCOMMANDS = {"run": _add_run, "probe": _add_probe, "compare": _add_compare, "tlb": _add_tlb,
               "nested": _add_nested, "boot": _add_boot, "restore": _add_restore, "snapshot": _add_snapshot,
               "migrate": _add_migrate}


def _error(message: str) -> None:
    print(f"pykvm: error: {message}", file=sys.stderr)


def _run_document(args, image: str, mode: Mode | None, outcome: Outcome | None, machine: Machine | None,
                  error: GuestError | None) -> dict:
    from .machine import describe_exit

    doc: dict = {"image": image, "mode": mode.value if mode else None, "mem": args.mem}
    if machine is not None:
        doc["console"] = machine.console_output.decode("utf-8", "replace")
        doc["exits"] = machine.exit_count
        doc["syncs"] = machine.syncs
    if outcome is not None:
        doc["result"] = "fail" if outcome.failure else "migrated" if outcome.via == "migrated" else "done"
        doc["status"] = st.of_outcome(outcome)
        doc["guest_status"] = outcome.status
        doc["via"] = outcome.via
        doc["seconds"] = outcome.seconds
        if outcome.failure:
            f = outcome.failure
            doc["failure"] = {"line": f.line, "value": f.value, "message": f.message}
    if error is not None:
        doc["result"] = "error"
        doc["status"] = st.of_error(error)
        doc["error"] = {"kind": type(error).__name__, "message": str(error),
                        "exit": describe_exit(error.exit) if error.exit is not None else None,
                        "state": error.state.to_json() if error.state else None}
    return doc


def _trace(exit: exits.Exit, counter=[0]) -> None:  # noqa: B006 - a per-process exit counter
    from .machine import describe_exit

    counter[0] += 1
    print(f"exit {counter[0]}: {describe_exit(exit)}", file=sys.stderr)


def _serial_stream(spec: str):
    """(stream, close) for --serial: stdio, none, or file:PATH."""
    if spec == "stdio":
        return sys.stdout.buffer, None
    if spec == "none":
        return None, None
    if spec.startswith("file:") and len(spec) > 5:
        f = open(spec[5:], "wb")  # noqa: SIM115 - closed by the caller
        return f, f.close
    raise ValueError(f"--serial takes stdio, none or file:PATH, not {spec!r}")


def _feed_stdin(uart) -> None:
    """Copy the user's terminal (stdin) into the UART's receiver, waiting for room (a daemon thread)."""
    import threading
    import time

    def pump():
        while True:
            try:
                data = os.read(sys.stdin.fileno(), 256)
            except (OSError, ValueError):
                return
            if not data:
                return
            while data:
                taken = uart.feed(data[: uart.wait_for_space(None)])
                if not taken:
                    time.sleep(0.05)  # the receiver takes nothing (loopback mode): do not spin
                data = data[taken:]

    threading.Thread(target=pump, name="uart-stdin", daemon=True).start()


def _read_modules(specs: list[str]) -> list[tuple[str, bytes, str]]:
    """--module 'FILE [ARGS]' -> (path, bytes, args)."""
    from .images import read_image

    modules = []
    for spec in specs:
        path, _, margs = spec.partition(" ")
        modules.append((path, read_image(path, 1 << 32), margs))
    return modules


def _stats_document(machine: Machine) -> dict:
    return {
        "exits": [{"exit": key, "count": n, "seconds": t} for key, n, t in machine.stats.rows()],
        "kvm": machine.kvm_stats,
    }


def _print_stats(machine: Machine) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Exits handled in Python", title_justify="left")
    for col, justify in (("exit / device", "left"), ("count", "right"), ("total ms", "right"), ("us each", "right")):
        table.add_column(col, justify=justify)
    for key, n, seconds in machine.stats.rows():
        table.add_row(key, str(n), f"{seconds * 1e3:.3f}", f"{seconds * 1e6 / n:.1f}")
    kvm = Table(title="KVM's counters during the run (handled in the kernel unless also above)", title_justify="left")
    kvm.add_column("statistic")
    kvm.add_column("delta", justify="right")
    for name, delta in sorted(machine.kvm_stats.items()):
        kvm.add_row(name, str(delta))
    console = Console(stderr=True)
    console.print(table)
    console.print(kvm)


def page_table_dump(machine: Machine) -> dict:
    """The boot vCPU's live page tables as merged mappings: {"mode", "cr3", "mappings" | "error"}."""
    from .model.paging import (
        GuestMemoryAdapter,
        TableError,
        coalesce,
        context_from_sregs,
        guest_cpu_features,
        mappings,
    )

    sregs = machine.vcpu.get_sregs()
    maxphyaddr, gbpages = guest_cpu_features(machine.vcpu)
    context = context_from_sregs(sregs, maxphyaddr=maxphyaddr, gbpages=gbpages)
    doc: dict = {"paging": context.fmt.name if context.fmt else None, "cr3": sregs.cr3}
    if context.fmt is None:
        doc["mappings"] = []
        return doc
    try:
        merged = coalesce(mappings(GuestMemoryAdapter(machine.memory), context))
    except (TableError, ValueError) as e:
        doc["error"] = str(e)
        return doc
    doc["mappings"] = [
        {"va": va, "pa": pa, "size": size, "write": p.write, "user": p.user, "execute": p.execute}
        for va, pa, size, p in merged
    ]
    return doc


def _print_page_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if doc["paging"] is None:
        console.print("page tables: paging is off (CR0.PG = 0)")
        return
    table = Table(title=f"Page tables ({doc['paging']}, CR3 {doc['cr3']:#x})", title_justify="left")
    for col in ("virtual", "physical", "size", "rights"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for m in doc.get("mappings", []):
        rights = "r" + ("w" if m["write"] else "-") + ("x" if m["execute"] else "-") + (" user" if m["user"] else "")
        table.add_row(f"{m['va']:#018x}", f"{m['pa']:#x}", f"{m['size']:#x}", rights)
    console.print(table)
    if "error" in doc:
        console.print(f"[red]bad table entry[/]: {doc['error']}")


def _tracer(args, machine: Machine):
    """The instruction tracer --trace and its filters ask for (attached), or None."""
    if not (args.trace or args.trace_range or args.trace_count or args.trace_file):
        return None
    from .trace import Tracer

    output = open(args.trace_file, "w") if args.trace_file else sys.stderr  # noqa: SIM115 - closed after the run
    return Tracer(machine, output=output, count=args.trace_count, only_range=args.trace_range).attach()


def _gdb_server(args, machine: Machine):
    """The gdb stub --gdb asks for, listening (and, with --wait-gdb, attached), or None."""
    if args.wait_gdb and not args.gdb:
        raise ValueError("--wait-gdb needs --gdb [HOST]:PORT")
    if not args.gdb:
        return None
    from .gdbstub import GdbServer

    server = GdbServer(machine, args.gdb, wait=args.wait_gdb)
    host, port = server.listen()
    wait = ", waiting for gdb to attach" if args.wait_gdb else ""
    print(f"pykvm: gdb server on {host}:{port}{wait} (gdb -ex 'target remote {host}:{port}')", file=sys.stderr)
    server.start()
    return server


def cmd_run(args) -> int:
    import json

    from .images import DEFAULT_GUEST, ImageError, guest_image, read_image
    from .loaders import detect_image
    from .machine import GuestError, Machine
    from .x86 import layout
    from .x86.modes import Mode

    if args.incoming:
        from .snapcli import cmd_incoming

        return cmd_incoming(args)
    if args.incoming_wait is not None:
        raise ValueError("--incoming-wait goes with --incoming")
    if args.mem is None:
        args.mem = layout.DEFAULT_MEM_SIZE
    path = str(guest_image(DEFAULT_GUEST)) if args.image is None else args.image
    mode = args.mode or ("real" if path.endswith("_real.bin") else None)
    if args.gdb and (args.trace or args.trace_range or args.trace_count or args.trace_file):
        raise ValueError("--gdb and --trace both drive single-stepping: use one at a time")
    if args.gdb and args.timeout is not None:
        raise ValueError("--timeout would count the time gdb holds the guest stopped: drop it with --gdb")
    if args.load is not None and args.load >= args.mem:
        raise ImageError(f"load address {args.load:#x} is outside guest memory (0-{args.mem:#x})")
    default_load = Mode(mode).default_load if mode else layout.PROTECTED_LOAD
    if args.mem < layout.MIN_MEM_SIZE or args.mem % layout.PAGE_SIZE:
        raise ValueError(f"--mem must be a multiple of 4 KiB and at least {layout.MIN_MEM_SIZE >> 20} MiB, "
                         f"not {args.mem:#x}")
    image = read_image(path, args.mem)  # ELF and multiboot loaders check their segments themselves
    if detect_image(image, name=path) == "flat":
        room = args.mem - (default_load if args.load is None else args.load)
        if len(image) > room:
            raise ImageError(f"{path}: the image ({len(image)} bytes) is larger than the {room} bytes of guest "
                             "memory it must fit in")
    modules = _read_modules(args.module)
    if args.smp < 1:
        raise ValueError(f"--smp must be at least 1, not {args.smp}")
    kind = detect_image(image, name=path)
    chip = args.irqchip or ("kernel" if args.smp > 1 or kind != "flat" else None)
    irqchip = {"kernel": True, "split": "split", None: False}[chip]
    snapshot_on = None
    if args.snapshot_on:
        from .snapcli import parse_snapshot_on

        snapshot_on = parse_snapshot_on(*args.snapshot_on)
    if (args.snapshot_on or args.control) and (args.gdb or args.trace or args.trace_range or args.trace_count
                                               or args.trace_file):
        raise ValueError(f"--{'snapshot-on' if args.snapshot_on else 'control'} cannot be combined with --gdb or "
                         "--trace (they hold the vCPU)")
    serial, close_serial = _serial_stream(args.serial)
    if args.json and serial is sys.stdout.buffer:
        serial = None  # stdout carries the JSON document
    console = None if args.json else sys.stdout.buffer
    outcome = error = None
    try:
        with Machine(args.mem, cpus=args.smp, irqchip=irqchip, console=console, strict=args.strict,
                     trace=_trace if args.trace_exits else None) as machine:
            machine.time_exits = args.stats  # the seconds column of --stats; two clock reads an exit
            uart = machine.add_pc_devices(serial, cmdline=args.append, tables=kind != "flat")
            machine.load_kernel(image, path=path, cmdline=args.append, modules=modules, mode=mode,
                                load=args.load, entry=args.entry, la57=args.la57)
            if args.serial == "stdio" and not args.json:
                _feed_stdin(uart)
            tracer = _tracer(args, machine)
            gdb = _gdb_server(args, machine)
            control = None
            try:
                if gdb is not None:
                    outcome = gdb.run()
                else:
                    from .snapcli import controlled, run_with_snapshots

                    with controlled(machine, args.control) as control:
                        outcome = run_with_snapshots(machine, args.timeout, snapshot_on, quiet=args.json)
            except GuestError as e:
                error = e
            finally:
                if tracer is not None:
                    tracer.finish()
                    if tracer.output is not sys.stderr:
                        tracer.output.close()
                    if not args.json:
                        print(tracer.summary(), file=sys.stderr)
            if args.json:
                doc = _run_document(args, path, Mode(mode) if mode else None, outcome, machine, error)
                doc["format"] = kind
                doc["serial"] = uart.captured.decode("utf-8", "replace")
                if args.stats:
                    doc["stats"] = _stats_document(machine)
                if args.dump_pagetables:
                    doc["page_tables"] = page_table_dump(machine)
                if tracer is not None:
                    doc["trace"] = {"steps": tracer.steps, "printed": tracer.printed, "seconds": tracer.seconds,
                                    "stopped": tracer.stopped}
                if snapshot_on is not None or control is not None:
                    from .snapcli import describe_control

                    doc["snapshots"] = getattr(machine, "snapshots_saved", [])
                    describe_control(doc, control, machine)
                print(json.dumps(doc, indent=2))
            else:
                if error is not None:
                    _error(error.report())
                elif outcome.failure is not None:
                    _error(str(outcome.failure))
                if args.stats:
                    _print_stats(machine)
                if args.dump_pagetables:
                    _print_page_tables(page_table_dump(machine))
                if control is not None:
                    from .snapcli import say_migrated

                    say_migrated(machine, False)
    finally:
        if close_serial is not None:
            close_serial()
    if error is not None:
        return st.of_error(error)
    code = st.of_outcome(outcome)
    if code == st.GUEST_FAILED and outcome.failure is None and not args.json:
        _error(f"the guest said DONE({outcome.status}): DONE takes 0-{st.DONE_MAX} (exit status {code})")
    return code


def _probe(from_dump: str | None):
    """The probe report, or None after a one-line error about a bad dump file."""
    from .probe.dump import DumpFormatError, NotADumpError
    from .probe.report import probe

    try:
        return probe(from_dump=from_dump)
    except (NotADumpError, DumpFormatError) as e:
        _error(str(e))
    except OSError as e:
        _error(f"{from_dump}: {e.strerror}")
    return None


def cmd_probe(args) -> int:
    from .probe.report import SECTIONS

    sections = SECTIONS if args.section == "all" else (args.section,)
    report = _probe(args.from_dump)
    if report is None:
        return EXIT_USAGE
    if args.json:
        import json

        print(json.dumps(report.to_json(sections), indent=2))
    else:
        from .probe.render import print_report  # rich: only for the tables

        print_report(report, sections)
    return report.verdict.exit_code


def cmd_compare(args) -> int:
    from .probe.compare import compare, detect_iommu

    report = _probe(args.from_dump)
    if report is None:
        return EXIT_USAGE
    iommu = detect_iommu() if args.from_dump is None else None
    comparison = compare(report.cpu, report.best_vmx, report.svm, iommu)
    if args.json:
        import json

        print(json.dumps({"origin": report.origin, **comparison.to_json()}, indent=2))
    else:
        from .probe.render import print_comparison  # rich: only for the tables

        print_comparison(comparison, "this host" if args.from_dump is None else args.from_dump)
    return EXIT_OK


def _fail(args, error: BaseException, message: str, code: int, *, details: dict | None = None,
          extra: dict | None = None) -> int:  # fmt: skip
    """Say why the command could not run: one line on stderr, and with --json the one document
    (``details`` go into its "error" object, ``extra`` beside it)."""
    _error(message)
    if getattr(args, "json", False):
        import json

        doc = {"result": "error", "status": code,
               "error": {"kind": type(error).__name__, "message": message, **(details or {})},
               **(extra or {})}  # fmt: skip
        print(json.dumps(doc, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the named subcommand's parser (anything else, --help included, gets the whole parser).
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except BrokenPipeError:  # stdout closed early (| head): say nothing more, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE


def _main(args) -> int:
    try:
        return args.func(args)
    except KvmUnavailableError as e:
        return _fail(args, e, e.strerror, EXIT_UNAVAILABLE)
    except KvmUnsupportedError as e:
        return _fail(args, e, str(e), EXIT_UNAVAILABLE)
    except ValueError as e:  # a bad image or argument (ImageError is one), refused before any guest ran
        return _fail(args, e, str(e), EXIT_USAGE)
    except KvmError as e:
        return _fail(args, e, str(e), st.HOST_FAILURE)
    except OSError as e:  # a file or address named on the command line that cannot be used
        return _fail(args, e, str(e), EXIT_USAGE)
    except KeyboardInterrupt as e:
        return _fail(args, e, "interrupted", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
