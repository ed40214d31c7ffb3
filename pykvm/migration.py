"""Live migration: a running machine moved to another pykvm process over a socket.

The source (:func:`migrate`) copies guest memory while the guest runs on, in rounds driven by
dirty-page tracking (:mod:`pykvm.dirty`: the bitmap or the ring, whichever the machine has):
round 0 sends every page that is not zero, each later round the pages written during the one
before. When what is left would go within the downtime budget (at the rate the last round went),
or after ``max_rounds``, it stops the vCPUs between exits (:meth:`Machine.request`), sends the last
pages and the whole state (as a snapshot has it: :func:`pykvm.snapshot.state_sections`), and waits
for the destination to say it runs. Then the source's run ends with :class:`Migrated`. If anything
fails before that answer (the connection drops, the destination refuses), the source runs on, as
if nothing had been asked, and :class:`MigrationError` says why.

The destination (:class:`Incoming`) listens, checks the source's header as a restore checks a
snapshot's (KVM API version, CPUID, MSRs, how the machine is built, and its memory against
``max_mem``), builds the machine, takes the pages into its RAM, puts the state back and answers.

The stream: messages of a 16-byte head (tag, CRC-32 of the payload, payload length) and the
payload. ``HELO`` (JSON: format version, the header), answered ``OKAY`` or ``FAIL`` (JSON:
the reason); ``PAGE`` (a u32 count of runs, each run's first page and page count as u32, then
the pages' bytes, at most BATCH pages a message); ``STAT`` (JSON: the
state sections); ``DONE``; answered ``RUN!`` (JSON: the destination's seconds to put the state
back) or ``FAIL``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field

from .machine import Outcome
from .snapshot import PAGE, SnapshotError, apply_state, build_machine, check_compatible, check_header, check_movable
from .snapshot import header_of, nonzero_pages, state_sections

FORMAT = 1
HEAD = struct.Struct("<4sIQ")
BATCH = 256  # pages a PAGE message: 1 MiB
DEFAULT_DOWNTIME = 0.05
DEFAULT_MAX_ROUNDS = 30


class MigrationError(RuntimeError):
    """A migration that did not happen; the source runs on. The message says why."""


@dataclass(frozen=True)
class Migrated(Outcome):
    """The run ended because the machine now runs elsewhere (status 0, ``via`` "migrated")."""

    to: str = ""


@dataclass
class Round:
    """One pass over the pages to send: how many, their bytes, and the seconds it took."""

    pages: int
    bytes: int
    seconds: float


@dataclass
class MigrationReport:
    """What a migration did: its pre-copy rounds, the stop-and-copy, the totals, the downtime
    (from the request to stop the vCPUs until the destination said it runs) and whether the
    last set fit the budget (``converged``) or ``max_rounds`` forced the stop."""

    to: str
    dirty: str
    downtime_budget: float
    rounds: list[Round] = field(default_factory=list)
    final: Round | None = None
    state_bytes: int = 0
    seconds: float = 0.0
    downtime: float = 0.0
    converged: bool = False
    destination_apply_seconds: float = 0.0

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.rounds) + (self.final.pages if self.final else 0)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rounds) + (self.final.bytes if self.final else 0) + self.state_bytes

    def to_json(self) -> dict:
        doc = asdict(self)
        doc.update(pages=self.pages, bytes=self.bytes)
        return doc

    def summary(self) -> str:
        return (f"migrated to {self.to}: {len(self.rounds)} pre-copy round(s) and the stop-and-copy, "
                f"{self.pages} pages, {self.bytes / 2**20:.1f} MiB in {self.seconds * 1e3:.0f} ms; downtime "
                f"{self.downtime * 1e3:.1f} ms (budget {self.downtime_budget * 1e3:.0f} ms"
                f"{'' if self.converged else ', not met: the guest dirtied memory faster than it was sent'}); "
                f"dirty {self.dirty}")


# ---- addresses and the stream -----------------------------------------------------------------

def parse_address(text: str) -> tuple[int, object]:
    """(family, address) of ``unix:PATH``, ``tcp:HOST:PORT`` or ``HOST:PORT`` (port 0: any free one
    when listening); ValueError otherwise."""
    if text.startswith("unix:") and len(text) > 5:
        return socket.AF_UNIX, text[5:]
    rest = text[4:] if text.startswith("tcp:") else text
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: a migration address is unix:PATH, tcp:HOST:PORT or HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def format_address(family: int, address) -> str:
    if family == socket.AF_UNIX:
        return f"unix:{address}"
    host, port = address[:2]
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


class _Stream:
    """Framed messages over a connected socket; a dropped or damaged stream is a MigrationError."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.sent = 0

    def send(self, tag: bytes, payload=b"") -> None:
        try:
            self.sock.sendall(HEAD.pack(tag, zlib.crc32(payload), len(payload)))
            if payload:
                self.sock.sendall(payload)
        except OSError as e:
            raise MigrationError(f"the connection to {self.peer} failed while sending {tag.decode()}: "
                                 f"{e.strerror or e}") from None
        self.sent += HEAD.size + len(payload)

    def send_json(self, tag: bytes, doc) -> int:
        payload = json.dumps(doc, separators=(",", ":")).encode()
        self.send(tag, payload)
        return len(payload)

    def _exactly(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise MigrationError(f"{self.peer} said nothing for {self.sock.gettimeout():g} s (waiting for "
                                     f"{what})") from None
            except OSError as e:
                raise MigrationError(f"the connection to {self.peer} failed waiting for {what}: "
                                     f"{e.strerror or e}") from None
            if not k:
                raise MigrationError(f"{self.peer} closed the connection (waiting for {what}, "
                                     f"{got} of {n} bytes come)")
            got += k
        return buf

    def receive(self, what: str = "a message") -> tuple[bytes, bytearray]:
        tag, crc, length = HEAD.unpack(self._exactly(HEAD.size, what))
        if length > 64 << 20:
            raise MigrationError(f"{self.peer} sent a {tag!r} message of {length} bytes: not a pykvm migration")
        payload = self._exactly(length, f"the rest of {tag.decode('ascii', 'replace')}") if length else bytearray()
        if zlib.crc32(payload) != crc:
            raise MigrationError(f"{self.peer}: message {tag.decode('ascii', 'replace')}: CRC "
                                 f"{zlib.crc32(payload):#010x}, the stream says {crc:#010x}")
        return tag, payload

    def receive_json(self, what: str) -> tuple[bytes, dict]:
        tag, payload = self.receive(what)
        try:
            return tag, json.loads(payload) if payload else {}
        except ValueError:
            raise MigrationError(f"{self.peer}: message {tag.decode('ascii', 'replace')} is not JSON") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _send_pages(stream: _Stream, ram, pages) -> Round:
    """Send ``pages`` (in order) of ``ram`` in PAGE messages of at most BATCH pages, each a list of
    runs of consecutive pages and their bytes. Returns the round's figures."""
    start = time.monotonic()
    view = memoryview(ram)
    sent = 0
    runs: list[tuple[int, int]] = []  # (first page, count) of this message
    in_batch = 0

    def flush() -> None:
        nonlocal sent, in_batch
        if runs:
            head = struct.pack(f"<I{2 * len(runs)}I", len(runs), *(x for run in runs for x in run))
            stream.send(b"PAGE", b"".join([head, *(view[a * PAGE : (a + n) * PAGE] for a, n in runs)]))
            sent += in_batch
            runs.clear()
            in_batch = 0

    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
        in_batch += 1
        if in_batch == BATCH:
            flush()
    flush()
    return Round(sent, sent * PAGE, time.monotonic() - start)


# ---- the source ---------------------------------------------------------------------------------

def migrate(machine, to: str, *, downtime: float = DEFAULT_DOWNTIME, max_rounds: int = DEFAULT_MAX_ROUNDS,
            timeout: float = 30.0) -> MigrationReport:
    """Move ``machine`` to the pykvm destination listening at ``to`` (see :func:`parse_address`),
    from any thread, while its :meth:`~Machine.run` goes on in another (or between runs). On
    success the run ends with :class:`Migrated` and the report is returned; on failure
    MigrationError is raised and the machine runs on, unharmed. ``timeout``: the most seconds the
    destination may stay silent."""
    if downtime <= 0 or max_rounds < 1:
        raise ValueError(f"downtime must be positive and max_rounds at least 1, not {downtime} and {max_rounds}")
    if machine.migrated_to:
        raise MigrationError(f"this machine has moved to {machine.migrated_to} already")
    check_movable(machine, "migrated")
    from .probe.host import kvm_backend  # noqa: F401 - imported here, not in the stop that needs it

    family, address = parse_address(to)
    was_running = machine.running
    start = time.monotonic()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot reach the destination {to}: {e.strerror or e}") from None
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = _Stream(sock, f"the destination {to}")
    watch = None
    try:
        # a short stop to read the MSRs the header lists and to start the dirty tracking in step
        watch, header = machine.request(lambda: _begin(machine)).result()
        report = MigrationReport(to, machine.dirty.kind, downtime)
        stream.send_json(b"HELO", {"format": FORMAT, "header": header})
        tag, doc = stream.receive_json("the destination's answer to HELO")
        if tag == b"FAIL":
            raise MigrationError(f"the destination {to} refused the machine: {doc.get('error')}")
        if tag != b"OKAY":
            raise MigrationError(f"the destination {to} answered {tag!r} to HELO")
        ram = machine.ram._map
        report.rounds.append(_send_pages(stream, ram, nonzero_pages(ram)))  # the destination's RAM starts zero
        pending = watch.collect()
        while True:
            last = report.rounds[-1]
            rate = last.bytes / last.seconds if last.seconds > 0 and last.bytes else None
            if rate is not None and len(pending) * PAGE / rate <= downtime:
                report.converged = True
                break
            if not pending:
                report.converged = True
                break
            if len(report.rounds) >= max_rounds:
                break
            report.rounds.append(_send_pages(stream, ram, sorted(pending)))
            pending = watch.collect()
        stop_asked = time.monotonic()

        def stop_and_copy():
            if was_running and not machine.running:  # served after the run ended, not in one of its stops
                raise MigrationError("the guest's run ended before the stop-and-copy: nothing was moved")
            return _stop_and_copy(machine, stream, watch, pending, report, start, stop_asked)

        ended = machine.request(stop_and_copy)
        ended.result()
        return report
    finally:
        if watch is not None:
            watch.close()
        stream.close()


def _begin(machine):
    """In a stop between exits: the dirty tracking (the bitmap unless the machine has one) and a
    watch on it, and the header with the MSRs a vCPU reads now."""
    from .snapshot import readable_msrs

    if machine.dirty is None:
        machine._track_dirty(ring=False)
    watch = machine.dirty.watch()
    indices = machine.kvm.get_msr_index_list()
    return watch, header_of(machine, set(readable_msrs(machine.vcpu, indices)))


def _stop_and_copy(machine, stream: _Stream, watch, pending: set[int], report: MigrationReport, start: float,
                   stop_asked: float) -> Migrated:
    """In the stop between exits: the last pages, the state, and the destination's word. The
    report is complete before the run ends (``machine.migration`` has it then)."""
    to = report.to
    header, sections = state_sections(machine, "migrated")  # completes the last exit's I/O first
    final = _send_pages(stream, machine.ram._map, sorted(pending | watch.collect()))
    report.final = final
    report.state_bytes = stream.send_json(b"STAT", {"header": header, "sections": dict(sections)})
    stream.send(b"DONE")
    tag, doc = stream.receive_json("the destination's word that it runs")
    if tag == b"FAIL":
        raise MigrationError(f"the destination {to} could not take the state: {doc.get('error')}")
    if tag != b"RUN!":
        raise MigrationError(f"the destination {to} answered {tag!r} to DONE")
    end = time.monotonic()
    report.downtime, report.seconds = end - stop_asked, end - start
    report.destination_apply_seconds = float(doc.get("apply_seconds", 0.0))
    machine.migrated_to, machine.migration = to, report
    return Migrated(0, via="migrated", to=to)


# ---- the destination ----------------------------------------------------------------------------

class Incoming:
    """A destination listening at ``address`` (see :func:`parse_address`; port 0 picks one:
    :attr:`address` says which) for one migration: :meth:`accept` builds the machine."""

    def __init__(self, address: str) -> None:
        family, addr = parse_address(address)
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_UNIX:
                if os.path.exists(addr) and not os.path.isdir(addr):
                    os.unlink(addr)  # a stale socket from an earlier run
            else:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
        self.address = format_address(family, self.sock.getsockname())

    def close(self) -> None:
        self.sock.close()
        if self.family == socket.AF_UNIX:
            try:
                os.unlink(self.address[5:])
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def accept(self, *, cls=None, kvm=None, max_mem: int | None = None, console=None, serial=None, trace=None,
               timeout: float | None = None, wait: float | None = None):
        """Wait (at most ``wait`` seconds, None: for ever) for a source, take its machine and
        return ``(machine, info)`` ready to :meth:`~Machine.run` on. A source whose machine this
        host cannot take (its KVM, or more memory than ``max_mem``) is answered FAIL with the
        reason, and MigrationError raised here with the same reason. ``timeout``: the most
        seconds the source may stay silent."""
        from .machine import Machine
        from .system import Kvm

        self.sock.settimeout(wait)
        try:
            conn, peer = self.sock.accept()
        except socket.timeout:
            raise MigrationError(f"no source came to {self.address} within {wait:g} s") from None
        conn.settimeout(timeout)
        stream = _Stream(conn, "the source")
        start = time.monotonic()
        machine = None
        own_kvm = kvm is None
        try:
            tag, hello = stream.receive_json("HELO")
            if tag != b"HELO" or hello.get("format") != FORMAT:
                raise MigrationError(f"the source sent {tag!r} (format {hello.get('format')}), not a pykvm migration "
                                     f"of format {FORMAT}")
            header = hello.get("header") or {}
            kvm = kvm or Kvm()
            try:
                check_header(header, "the source")
                check_compatible(header, kvm, "the source")
                if max_mem is not None and header["mem_size"] > max_mem:
                    raise SnapshotError(f"the source's guest has {header['mem_size'] >> 20} MiB of memory; this "
                                        f"destination takes at most {max_mem >> 20} MiB")
                _check_host_memory(header["mem_size"])
                machine = build_machine(cls or Machine, header, kvm=kvm, console=console, serial=serial,
                                        trace=trace)
            except (SnapshotError, OSError, ValueError) as e:
                stream.send_json(b"FAIL", {"error": str(e)})
                raise MigrationError(f"refused the source's machine: {e}") from None
            machine._own_kvm = own_kvm
            stream.send(b"OKAY")
            pages = rounds = 0
            ram = machine.ram._map
            state = None
            while True:
                tag, payload = stream.receive("pages or the state")
                if tag == b"PAGE":
                    pages += _take_pages(payload, ram)
                    rounds += 1
                elif tag == b"STAT":
                    state = json.loads(payload)
                elif tag == b"DONE":
                    break
                else:
                    raise MigrationError(f"the source sent {tag!r} mid-migration")
            if state is None:
                raise MigrationError("the source said DONE without sending the state")
            applied = time.monotonic()
            try:
                check_compatible(state["header"], kvm, "the source")  # now with every MSR its vCPUs had
                apply_state(machine, state["sections"], "the source")
            except (SnapshotError, KeyError, TypeError) as e:
                stream.send_json(b"FAIL", {"error": str(e)})
                raise MigrationError(f"could not take the source's state: {e}") from None
            apply_seconds = time.monotonic() - applied
            stream.send_json(b"RUN!", {"apply_seconds": apply_seconds})
        except BaseException:
            if machine is not None:
                machine.close()
            elif own_kvm and kvm is not None:
                kvm.close()
            raise
        finally:
            stream.close()
        return machine, {"from": format_address(self.family, peer) if peer else "a local process", "pages": pages,
                         "messages": rounds, "seconds": time.monotonic() - start, "apply_seconds": apply_seconds}


def _take_pages(payload: bytearray, ram) -> int:
    """Copy a PAGE message's runs into ``ram``; returns how many pages it had."""
    (nruns,) = struct.unpack_from("<I", payload)
    flat = struct.unpack_from(f"<{2 * nruns}I", payload, 4)
    data = memoryview(payload)[4 + 8 * nruns :]
    count = sum(flat[1::2])
    if len(data) != count * PAGE:
        raise MigrationError(f"a PAGE message of {count} pages carries {len(data)} bytes")
    limit, at = len(ram) // PAGE, 0
    for first, n in zip(flat[::2], flat[1::2]):
        if first + n > limit:
            raise MigrationError(f"the source sent pages {first}-{first + n - 1}, beyond this guest's {limit} pages")
        ram[first * PAGE : (first + n) * PAGE] = data[at : at + n * PAGE]
        at += n * PAGE
    return count


def _check_host_memory(size: int) -> None:
    """Refuse a guest larger than the memory this host has free (psutil's ``available``)."""
    import psutil

    available = psutil.virtual_memory().available
    if size > available:
        raise SnapshotError(f"the source's guest has {size >> 20} MiB of memory; this host has "
                            f"{available >> 20} MiB available")
