"""The command line of snapshots: ``pykvm run --snapshot-on SIGNAL|exit FILE`` and ``pykvm restore``."""

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

    old = timer = None
    if snapshot_on.signum is not None:
        old = signal.signal(snapshot_on.signum, lambda signum, frame: machine.pause())
    elif timeout is not None:
        # the time limit pauses the machine instead of stopping it: the exit it was handling is
        # answered first, so the snapshot loses no I/O
        timer = threading.Timer(timeout, machine.pause)
        timer.daemon = True
        timer.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            left = None if deadline is None or timer is not None else max(deadline - time.monotonic(), 1e-3)
            try:
                outcome = machine.run(timeout=left)
            except GuestError:
                if snapshot_on.signum is None:
                    save()
                raise
            if isinstance(outcome, Paused):
                save()
                if timer is not None:
                    raise GuestTimeout(f"the guest ran past the {timeout:g} s timeout",
                                       CpuState.capture(machine.vcpu, machine.memory))
                continue
            if snapshot_on.signum is None:
                save()
            return outcome
    finally:
        machine.snapshots_saved = saved
        if old is not None:
            signal.signal(snapshot_on.signum, old)
        if timer is not None:
            timer.cancel()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="go on running a VM saved by --snapshot-on",
        description="Build the VM a snapshot file describes again (vCPUs, interrupt controllers, devices, guest "
                    "memory mapped copy-on-write from the file) and run it on from where it was saved; the guest "
                    "console and COM1 go to stdout. The file is checked first: a damaged section, another format "
                    "version, or a CPUID bit or MSR this host's KVM does not offer is refused in one line.",
        epilog=RESTORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .cli import parse_timeout

    p.add_argument("snapshot", help="a file written by pykvm run --snapshot-on")
    p.add_argument("--timeout", type=parse_timeout, metavar="SECONDS", help="stop a guest that runs longer")
    p.add_argument("--serial", default="stdio", metavar="stdio|none|file:PATH", help="where the COM1 UART goes")
    p.add_argument("--snapshot-on", nargs=2, metavar=("SIGNAL|exit", "FILE"), help="as pykvm run's")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the console")
    p.set_defaults(func=cmd_restore)


def cmd_restore(args) -> int:
    from .cli import _error, _run_document, _serial_stream
    from .machine import GuestError, Machine

    snapshot_on = parse_snapshot_on(*args.snapshot_on) if args.snapshot_on else None
    serial, close_serial = _serial_stream(args.serial)
    if args.json and serial is sys.stdout.buffer:
        serial = None
    console = None if args.json else sys.stdout.buffer
    outcome = error = None
    start = time.monotonic()
    try:
        with Machine.from_snapshot(args.snapshot, console=console, serial=serial) as machine:
            restored = time.monotonic() - start
            try:
                outcome = run_with_snapshots(machine, args.timeout, snapshot_on, quiet=args.json)
            except GuestError as e:
                error = e
            if args.json:
                args.mem = machine.ram.size
                doc = _run_document(args, args.snapshot, None, outcome, machine, error)
                doc["restore_seconds"] = restored
                doc["snapshots"] = getattr(machine, "snapshots_saved", [])
                print(json.dumps(doc, indent=2))
            elif error is not None:
                _error(error.report())
            elif outcome.failure is not None:
                _error(str(outcome.failure))
    finally:
        if close_serial is not None:
            close_serial()
    return st.of_error(error) if error is not None else st.of_outcome(outcome)
