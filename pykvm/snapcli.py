"""The command line of snapshots and migration: ``pykvm run --snapshot-on SIGNAL|exit FILE``,
``pykvm run --control PATH`` with ``pykvm snapshot`` and ``pykvm migrate`` over it, ``pykvm run
--incoming ADDR`` (a migration's destination) and ``pykvm restore``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass

from . import status as st

RESTORE_EXAMPLES = """\
examples:
  pykvm run guests/build/counter.bin --snapshot-on USR1 vm.snap &   # then: kill -USR1 $!
  pykvm run guests/build/counter.bin --snapshot-on exit vm.snap --timeout 0.2
  pykvm restore vm.snap                      # goes on where the snapshot was taken
  pykvm restore vm.snap --snapshot-on exit again.snap --json
"""

CONTROL_EXAMPLES = """\
examples:
  pykvm run guests/build/counter.bin --control /tmp/vm.sock &
  pykvm snapshot --control /tmp/vm.sock vm.snap        # the guest runs on
  pykvm run --incoming 127.0.0.1:4444 &                 # the destination, here or on another host
  pykvm migrate --control /tmp/vm.sock 127.0.0.1:4444 --downtime 30
"""


@dataclass(frozen=True)
class SnapshotOn:
    """When to save and where: on a signal (the guest runs on after each) or when the run ends."""

    path: str
    signum: int | None  # None: when the guest stops


def parse_snapshot_on(when: str, path: str) -> SnapshotOn:
    if when.lower() == "exit":
        return SnapshotOn(path, None)
    name = when.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    signum = getattr(signal, name, None)
    if not isinstance(signum, signal.Signals) or signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"--snapshot-on {when}: not a signal pykvm can catch (USR1, USR2, HUP, ...) or 'exit'")
    return SnapshotOn(path, int(signum))


def _say_saved(path: str, sizes: dict, quiet: bool) -> None:
    if not quiet:
        print(f"pykvm: snapshot {path}: {sizes['ram'] >> 10} KiB of guest memory, {sizes['pages_saved']} pages "
              f"written, {sizes['on_disk'] >> 10} KiB on disk, in {sizes['seconds'] * 1e3:.1f} ms",
              file=sys.stderr)


def run_with_snapshots(machine, timeout: float | None, snapshot_on: SnapshotOn | None, *, quiet: bool = False):
    """``machine.run(timeout)``, saving a snapshot as ``snapshot_on`` says: at each of its signals
    (the run goes on after it, within what is left of ``timeout``) or when the run ends, also by
    an error (a timeout, a fault: the state it stopped in is what is saved). Returns the Outcome."""
    from .machine import CpuState, GuestError, GuestTimeout, Paused

    if snapshot_on is None:
        return machine.run(timeout=timeout)
    saved = []

    def save() -> None:
        saved.append(machine.snapshot(snapshot_on.path))
        _say_saved(snapshot_on.path, saved[-1], quiet)

    if snapshot_on.signum is not None:
        def asked(signum, frame) -> None:
            # saved between exits by the thread in run(); the run goes on
            machine.request(save).add_done_callback(_say_failed(snapshot_on.path))

        old = signal.signal(snapshot_on.signum, asked)
        try:
            return machine.run(timeout=timeout)
        finally:
            machine.snapshots_saved = saved
            signal.signal(snapshot_on.signum, old)
    timer = None
    if timeout is not None:
        # the time limit pauses the machine instead of stopping it: the exit it was handling is
        # answered first, so the snapshot loses no I/O
        timer = threading.Timer(timeout, machine.pause)
        timer.daemon = True
        timer.start()
    try:
        try:
            outcome = machine.run()
        except GuestError:
            save()
            raise
        save()
        if isinstance(outcome, Paused):
            raise GuestTimeout(f"the guest ran past the {timeout:g} s timeout",
                               CpuState.capture(machine.vcpu, machine.memory))
        return outcome
    finally:
        machine.snapshots_saved = saved
        if timer is not None:
            timer.cancel()


def _say_failed(path: str):
    def done(future) -> None:
        error = future.exception()
        if error is not None:
            print(f"pykvm: error: snapshot {path}: {error}; the guest runs on", file=sys.stderr)

    return done


def add_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="go on running a VM saved by --snapshot-on or pykvm snapshot",
        description="Build the VM a snapshot file describes again (vCPUs, interrupt controllers, devices, guest "
                    "memory mapped copy-on-write from the file) and run it on from where it was saved; the guest "
                    "console and COM1 go to stdout. The file is checked first: a damaged section, another format "
                    "version, or a CPUID bit or MSR this host's KVM does not offer is refused in one line.",
        epilog=RESTORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("snapshot", help="a file written by pykvm run --snapshot-on or pykvm snapshot")
    add_run_options(p)
    p.set_defaults(func=cmd_restore)


def add_run_options(p) -> None:
    """The options of a run that goes on from saved state: pykvm restore's and pykvm run --incoming's."""
    from .cli import parse_timeout

    p.add_argument("--timeout", type=parse_timeout, metavar="SECONDS", help="stop a guest that runs longer")
    p.add_argument("--serial", default="stdio", metavar="stdio|none|file:PATH", help="where the COM1 UART goes")
    p.add_argument("--snapshot-on", nargs=2, metavar=("SIGNAL|exit", "FILE"), help="as pykvm run's")
    p.add_argument("--control", metavar="PATH", help="as pykvm run's")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the console")


def add_snapshot_parser(sub) -> None:
    snap = sub.add_parser(
        "snapshot", help="save a running VM (pykvm run --control) to a file; it runs on",
        description="Ask the pykvm that serves the control socket to save its whole VM between two exits; the "
                    "guest runs on. `pykvm restore FILE` goes on from there.",
        epilog=CONTROL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    snap.add_argument("--control", required=True, metavar="PATH", help="the socket of pykvm run --control PATH")
    snap.add_argument("file", help="where to write the snapshot (on the host of that pykvm)")
    snap.add_argument("--json", action="store_true", help="print the answer as one JSON document")
    snap.set_defaults(func=cmd_snapshot)


def add_migrate_parser(sub) -> None:
    from . import migration
    from .argtypes import number

    mig = sub.add_parser(
        "migrate", help="move a running VM (pykvm run --control) to a pykvm run --incoming",
        description="Live migration: the pykvm that serves the control socket copies its guest's memory to the "
                    "destination while the guest runs, round by round (dirty-page tracking), until what is left "
                    "fits the downtime budget; then it stops the guest, sends the rest and the whole state, and "
                    "the guest runs on at the destination. If the destination refuses or the connection drops, "
                    "the guest runs on where it was.",
        epilog=CONTROL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    mig.add_argument("--control", required=True, metavar="PATH", help="the socket of pykvm run --control PATH")
    mig.add_argument("to", metavar="ADDR", help="the destination: HOST:PORT, tcp:HOST:PORT or unix:PATH")
    mig.add_argument("--downtime", type=number(float, minimum=0.1, what="milliseconds"), metavar="MS",
                     default=migration.DEFAULT_DOWNTIME * 1e3,
                     help=f"the most the guest may stand still (default {migration.DEFAULT_DOWNTIME * 1e3:g} ms)")
    mig.add_argument("--max-rounds", type=number(int, minimum=1, what="a number of rounds"), metavar="N",
                     default=migration.DEFAULT_MAX_ROUNDS,
                     help="stop and copy after this many pre-copy rounds even if the guest dirties memory faster "
                          f"than it is sent (default {migration.DEFAULT_MAX_ROUNDS})")
    mig.add_argument("--json", action="store_true", help="print the migration's report as one JSON document")
    mig.set_defaults(func=cmd_migrate)


def _ask(args, request: dict) -> tuple[int, dict | None]:
    from .cli import _error
    from .control import ControlError, call

    try:
        return 0, call(args.control, request)
    except ControlError as e:
        _error(str(e))
        if args.json:
            print(json.dumps({"result": "error", "status": e.status, "error": {"message": str(e)}}, indent=2))
        return e.status, None


def cmd_snapshot(args) -> int:
    import os

    code, answer = _ask(args, {"command": "snapshot", "path": os.path.abspath(args.file)})
    if answer is not None:
        if args.json:
            print(json.dumps({"result": "saved", **answer}, indent=2))
        else:
            _say_saved(answer["path"], answer, False)
    return code


def cmd_migrate(args) -> int:
    code, answer = _ask(args, {"command": "migrate", "to": args.to, "downtime": args.downtime / 1e3,
                               "max_rounds": args.max_rounds})
    if answer is not None:
        if args.json:
            print(json.dumps({"result": "migrated", **answer["report"]}, indent=2))
        else:
            print(f"pykvm: {answer['summary']}", file=sys.stderr)
    return code


class _Controlled:
    """A control socket for ``machine`` while it runs (--control PATH), or nothing."""

    def __init__(self, machine, path: str | None) -> None:
        from .control import ControlServer

        self.server = ControlServer(machine, path) if path else None

    def __enter__(self):
        return self.server

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.close()


def controlled(machine, path: str | None) -> _Controlled:
    return _Controlled(machine, path)


def describe_control(doc: dict, server, machine) -> None:
    """What the control socket did (snapshots, a migration), into the JSON document."""
    if server is not None:
        doc["snapshots"] = [*doc.get("snapshots", []), *server.snapshots]
    if machine.migration is not None:
        doc["migration"] = machine.migration.to_json()


def say_migrated(machine, quiet: bool) -> None:
    if machine.migration is not None and not quiet:
        print(f"pykvm: {machine.migration.summary()}", file=sys.stderr)


def run_on(args, machine, source: str, extra: dict) -> int:
    """Run a machine built from saved state (a snapshot, a migration) as pykvm run would: the
    console to stdout or one JSON document, --snapshot-on and --control honoured."""
    from .cli import _error, _run_document
    from .machine import GuestError

    snapshot_on = parse_snapshot_on(*args.snapshot_on) if args.snapshot_on else None
    outcome = error = None
    with controlled(machine, args.control) as server:
        try:
            outcome = run_with_snapshots(machine, args.timeout, snapshot_on, quiet=args.json)
        except GuestError as e:
            error = e
    if args.json:
        args.mem = machine.ram.size
        doc = _run_document(args, source, None, outcome, machine, error)
        doc.update(extra)
        doc["snapshots"] = getattr(machine, "snapshots_saved", [])
        describe_control(doc, server, machine)
        print(json.dumps(doc, indent=2))
    elif error is not None:
        _error(error.report())
    elif outcome.failure is not None:
        _error(str(outcome.failure))
    say_migrated(machine, args.json)
    return st.of_error(error) if error is not None else st.of_outcome(outcome)


def _streams(args):
    from .cli import _serial_stream

    serial, close_serial = _serial_stream(args.serial)
    if args.json and serial is sys.stdout.buffer:
        serial = None  # stdout carries the JSON document
    return serial, close_serial, None if args.json else sys.stdout.buffer


def cmd_restore(args) -> int:
    from .machine import Machine

    if args.snapshot_on:
        parse_snapshot_on(*args.snapshot_on)  # refused before anything is built
    serial, close_serial, console = _streams(args)
    start = time.monotonic()
    try:
        with Machine.from_snapshot(args.snapshot, console=console, serial=serial) as machine:
            return run_on(args, machine, args.snapshot, {"restore_seconds": time.monotonic() - start})
    finally:
        if close_serial is not None:
            close_serial()


#: pykvm run's options that build a guest: a migration's destination takes its guest from the source.
_BUILD_OPTIONS = ("image", "mode", "la57", "load", "entry", "trace_exits", "trace", "trace_range", "trace_count",
                  "trace_file", "gdb", "wait_gdb", "irqchip", "module", "dump_pagetables", "strict")


def cmd_incoming(args) -> int:
    """pykvm run --incoming ADDR: wait for a migration, then run the guest on."""
    from .cli import _error
    from .migration import Incoming, MigrationError

    given = [name for name in _BUILD_OPTIONS if getattr(args, name, None) not in (None, False, [], "")]
    if args.smp != 1:
        given.append("smp")
    if args.append:
        given.append("append")
    if given:
        shown = ", ".join("IMAGE" if n == "image" else "--" + n.replace("_", "-") for n in given)
        raise ValueError(f"--incoming takes the guest from the migration's source: {shown} cannot be given with it")
    if args.snapshot_on:
        parse_snapshot_on(*args.snapshot_on)
    serial, close_serial, console = _streams(args)
    try:
        with Incoming(args.incoming) as incoming:
            # also with --json (stdout has the document): a destination on port 0 says which port it took
            print(f"pykvm: waiting for a migration on {incoming.address}", file=sys.stderr, flush=True)
            try:
                machine, info = incoming.accept(max_mem=args.mem, console=console, serial=serial, timeout=30.0,
                                                wait=args.incoming_wait)
            except MigrationError as e:
                _error(f"migration: {e}")
                if args.json:
                    print(json.dumps({"result": "error", "status": st.USAGE, "error": {"message": str(e)}}, indent=2))
                return st.USAGE
        if not args.json:
            print(f"pykvm: migrated in from {info['from']}: {info['pages']} pages in {info['seconds'] * 1e3:.0f} ms; "
                  "running on", file=sys.stderr, flush=True)
        with machine:
            return run_on(args, machine, f"migration from {info['from']}", {"incoming": info})
    finally:
        if close_serial is not None:
            close_serial()
