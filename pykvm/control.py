"""The control socket of a running pykvm (``pykvm run --control PATH``), and its client.

A UNIX stream socket; each connection carries one request and one answer, each a line of JSON:

- ``{"command": "status"}``: whether the guest runs, its exits so far, memory and vCPUs;
- ``{"command": "snapshot", "path": FILE}``: save the whole VM between exits; the guest runs on;
- ``{"command": "migrate", "to": ADDR, "downtime": SECONDS, "max_rounds": N}``: live migration to
  a ``pykvm run --incoming ADDR`` (:mod:`pykvm.migration`); on success the run ends here;
- ``{"command": "stop"}``: stop the guest (the run ends as a timeout does, status 74).

An answer is ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "status": N}``, N the exit
status the client gives (:mod:`pykvm.status`). The socket is made with mode 0600: whoever may use
it controls the VM.
"""

from __future__ import annotations

import json
import os
import socket
import threading

from . import status as st

MAX_REQUEST = 1 << 16


class ControlError(RuntimeError):
    """A request the running pykvm refused or could not carry out; ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ControlServer:
    """Serve ``machine``'s control socket at ``path`` in a daemon thread until :meth:`close`."""

    def __init__(self, machine, path: str) -> None:
        self.machine, self.path = machine, os.path.abspath(path)
        self.snapshots: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                _refuse_live_socket(self.path)
                os.unlink(self.path)  # left by a pykvm that is gone
            old = os.umask(0o177)
            try:
                self.sock.bind(self.path)
            finally:
                os.umask(old)
            self.sock.listen(4)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"--control {path}: {e.strerror}") from None
        self._closed = False
        self._requests: set[threading.Thread] = set()  # the connections being answered
        self.thread = threading.Thread(target=self._serve, name="pykvm-control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving; wait for the requests in progress (a migration whose guest ended while
        it copied finishes its round and fails), so that the machine is not closed under them."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        for thread in list(self._requests):
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._connection, args=(conn,), name="pykvm-control-request", daemon=True)
            self._requests.add(thread)
            thread.start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._answer_connection(conn)
        finally:
            self._requests.discard(threading.current_thread())

    def _answer_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                line = _read_line(conn)
                conn.settimeout(None)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                answer = {"ok": True, **self.answer(request)}
            except ControlError as e:
                answer = {"ok": False, "error": str(e), "status": e.status}
            except (ValueError, KeyError, TypeError) as e:
                answer = {"ok": False, "error": f"bad request: {e}", "status": st.USAGE}
            except Exception as e:  # the answer says it; the VM goes on
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "status": st.HOST_FAILURE}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass

    def answer(self, request: dict) -> dict:
        from .migration import MigrationError, migrate
        from .snapshot import SnapshotError

        machine, command = self.machine, request.get("command")
        if command == "status":
            return {"running": machine.running, "exits": machine.exit_count, "mem": machine.ram.size,
                    "vcpus": len(machine.vcpus), "migrated_to": getattr(machine, "migrated_to", None)}
        if command == "stop":
            machine.stop("stopped through the control socket")
            return {}
        if command == "snapshot":
            path = request["path"]
            if not isinstance(path, str) or not path:
                raise ValueError("snapshot needs a path")
            try:
                sizes = machine.request(lambda: machine.snapshot(path)).result()
            except (SnapshotError, RuntimeError) as e:
                raise ControlError(f"snapshot {path}: {e}", st.USAGE) from None
            except OSError as e:
                raise ControlError(f"snapshot {path}: {e.strerror or e}", st.USAGE) from None
            self.snapshots.append({"path": path, **sizes})
            return {"path": path, **sizes}
        if command == "migrate":
            to = request["to"]
            kwargs = {k: request[k] for k in ("downtime", "max_rounds", "timeout") if request.get(k) is not None}
            try:
                report = migrate(machine, to, **kwargs)
            except MigrationError as e:
                where = "the guest runs on here" if machine.running else "its run here has ended"
                raise ControlError(f"migration to {to}: {e}; {where}", st.HOST_FAILURE) from None
            except (SnapshotError, ValueError) as e:
                raise ControlError(f"migration to {to}: {e}", st.USAGE) from None
            return {"report": report.to_json(), "summary": report.summary()}
        raise ValueError(f"unknown command {command!r} (status, snapshot, migrate, stop)")


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


def _refuse_live_socket(path: str) -> None:
    """An existing socket some pykvm still answers on is not taken over."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # nobody there: stale
    finally:
        probe.close()
    raise OSError(98, "in use by another pykvm")  # EADDRINUSE


def call(path: str, request: dict, *, timeout: float | None = None) -> dict:
    """Send one request to the pykvm controlled at ``path`` and return its answer (``ok`` true);
    ControlError for a refusal (its status) or when nothing answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        raw = _read_line(sock)
    except FileNotFoundError:
        raise ControlError(f"{path}: no such control socket (start the guest with pykvm run --control {path})",
                           st.USAGE) from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e} (is a pykvm run --control {path} running?)", st.USAGE) from None
    finally:
        sock.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"{path}: the answer is not JSON (the guest may have stopped meanwhile)",
                           st.HOST_FAILURE) from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "refused"), int(answer.get("status", st.HOST_FAILURE)))
    return answer
