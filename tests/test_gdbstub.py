"""The gdb stub (pykvm.gdbstub): packet framing and target descriptions without KVM, then real gdb
(Debian's, in batch mode) and a raw protocol client against guests running in this process."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pykvm import exits
from pykvm._ffi import ffi
from pykvm.gdbstub import (
    PACKET_SIZE,
    GdbServer,
    PacketParser,
    checksum,
    escape_binary,
    frame,
    parse_address,
    target_description,
    unescape_binary,
    x87_full_tag,
)
from pykvm.machine import GuestTimeout, Machine
from pykvm.outcome import Outcome

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="needs gdb (apt-get install gdb)")
ELF = Path(__file__).resolve().parents[1] / "guests" / "build"

# hello_long.S at 0x100000: mov $hello,%esi; cld; 1: lodsb; test; je 2f; out %al,$0xe9 (0x10000b); jmp 1b;
# 2: (0x10000f) DONE(0). hello_real.S is the same at 0x1000 (out at 0x100c, the string at 0x1024).
LONG_OUT, LONG_DONE, LONG_HELLO = 0x10000B, 0x10000F, 0x100021
LONG_START_RIP = (0x100000).to_bytes(8, "little").hex().encode()
REAL_OUT, REAL_HELLO = 0x100C, 0x1024


# ---- no KVM: framing, parsing, descriptions ---------------------------------------------------------
def test_frame_and_checksum():
    assert checksum(b"OK") == 0x9A
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"


def test_binary_escaping_round_trips():
    data = bytes(range(256)) + b"$#}*"
    escaped = escape_binary(data)
    assert not any(c in escaped for c in b"$#*")
    assert unescape_binary(escaped) == data


def test_parser_packets_acks_and_ctrl_c():
    p = PacketParser()
    events = p.feed(b"+" + frame(b"qSupported:xmlRegisters=i386") + b"\x03-$g#6")
    assert events == [("ack", None), ("packet", b"qSupported:xmlRegisters=i386"), ("interrupt", None), ("nack", None)]
    assert p.feed(b"7") == [("packet", b"g")]  # a packet split across reads


def test_parser_bad_checksum_and_garbage():
    p = PacketParser()
    assert p.feed(b"$g#00") == [("bad", None)]
    assert p.feed(b"$g#zz") == [("bad", None)]
    assert p.feed(b"noise\xff\x00 between packets" + frame(b"?")) == [("packet", b"?")]


def test_parser_refuses_an_oversized_packet_without_buffering_it():
    p = PacketParser(max_size=64)
    big = b"M0,1:" + b"41" * 100_000
    assert p.feed(frame(big)) == [("oversized", None)]
    assert len(p._buf) <= 64
    assert p.feed(b"$" + big + b"#00") == [("bad", None)]  # still checksummed
    assert p.feed(frame(b"?")) == [("packet", b"?")]


def test_parse_address():
    assert parse_address(":1234") == ("127.0.0.1", 1234)
    assert parse_address("1234") == ("127.0.0.1", 1234)
    assert parse_address("0.0.0.0:9") == ("0.0.0.0", 9)
    assert parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("localhost:gdb")


@pytest.mark.parametrize("name, arch, count, pc, first_xmm", [
    ("amd64", "i386:x86-64", 65, ("rip", 16), 40),
    ("i386", "i386", 49, ("eip", 8), 32),
    ("i8086", "i8086", 49, ("eip", 8), 32),
])
def test_target_descriptions_follow_gdbs_register_numbering(name, arch, count, pc, first_xmm):
    tdesc = target_description(name)
    assert tdesc.architecture == arch
    assert b"xi:include" not in tdesc.xml and b"<osabi>none</osabi>" in tdesc.xml
    names = [r.name for r in tdesc.registers]
    assert len(names) == count
    assert names.index(pc[0]) == pc[1]
    assert names.index("xmm0") == first_xmm and names[first_xmm - 8 : first_xmm] == [
        "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert names[-8:] == ["fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
    assert tdesc.register("st0").bits == 80 and tdesc.register("efer").bits == 64


def test_x87_tag_word_from_the_abridged_one():
    fpu = ffi.new("struct kvm_fpu *")
    assert x87_full_tag(fpu) == 0xFFFF  # all empty
    fpu.fsw = 7 << 11  # TOP = 7: ST(0) is physical register 7
    fpu.ftwx = 0x80
    fpu.fpr[0][0:10] = (1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little")  # 1.0: valid
    assert x87_full_tag(fpu) == 0x3FFF
    fpu.fpr[0][0:10] = bytes(10)  # +0.0: zero
    assert x87_full_tag(fpu) == 0x7FFF


# ---- helpers for the KVM tests ----------------------------------------------------------------------
class Served:
    """A machine whose run (start() then run()) happens in a thread, with a gdb stub on a free port."""

    def __init__(self, image: bytes, mode: str, *, cpus: int = 1, wait: bool = True):
        self.machine = Machine(cpus=cpus, irqchip=cpus > 1)
        self.machine.load_flat(image, mode)
        self.server = GdbServer(self.machine, "127.0.0.1:0", wait=wait)
        self.port = self.server.listen()[1]
        self.result: Outcome | BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.start(timeout=20)
            self.result = self.server.run(timeout=60)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.result = e

    def outcome(self, timeout: float = 20) -> Outcome | BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the guest did not finish after gdb let it go"
        return self.result

    def close(self) -> None:
        if self.thread.is_alive():
            self.machine.stop("test over")
            self.server.close()
            self.thread.join(10)
        self.server.close()
        self.machine.close()


@contextmanager
def served(image: bytes, mode: str, **kw):
    s = Served(image, mode, **kw)
    try:
        yield s
    finally:
        s.close()


def gdb_batch(port: int, *commands: str, timeout: float = 60) -> str:
    """Run gdb in batch mode against the stub; its stdout and stderr together."""
    args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return done.stdout


def value(output: str, n: int) -> str:
    """The text of gdb's ``$n = ...`` line."""
    for line in output.splitlines():
        if line.startswith(f"${n} = "):
            return line.split(" = ", 1)[1]
    raise AssertionError(f"no ${n} in gdb's output:\n{output}")


class Client:
    """A raw remote-protocol client, for what gdb itself would never send."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_some(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the stub closed the connection")
        return data

    def read_byte(self) -> bytes:
        while not self.buf:
            self.buf += self.recv_some()
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_packet(self) -> bytes:
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                payload, cs = self.buf[start + 1 : end], self.buf[end + 1 : end + 3]
                self.buf = self.buf[end + 3 :]
                assert int(cs, 16) == checksum(payload)
                self.send(b"+")
                return payload
            self.buf += self.recv_some()

    def ask(self, payload: bytes) -> bytes:
        self.send(frame(payload))
        assert self.read_byte() == b"+"
        return self.read_packet()

    def close(self) -> None:
        self.sock.close()



# ---- real gdb ---------------------------------------------------------------------------------------
@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("sw", "step")
def test_gdb_long_mode_break_registers_memory_step_detach(guest):
    with served(guest("hello_long"), "long") as s:
        out = gdb_batch(
            s.port,
            "show architecture",
            f"break *{LONG_OUT:#x}",
            "continue",
            "p/x $pc", "p/x $rax", "p/x $rsi", "p/x $cs", "p/x $cr0", "p/x $efer", "p/x $cr3",
            f"x/s {LONG_HELLO:#x}",
            f"x/2xb {LONG_OUT:#x}",  # the original bytes, not the planted breakpoint
            "stepi", "p/x $pc",       # over `out`: exactly one instruction
            "stepi", "p/x $pc",
            "p $fctrl", "p/x $mxcsr", "p $xmm0.uint128",
            "info threads",
            "detach",
        )
        assert '(currently "i386:x86-64")' in out
        assert f"Breakpoint 1, {LONG_OUT:#018x}" in out
        assert value(out, 1) == hex(LONG_OUT)
        assert value(out, 2) == "0x48"  # 'H', just loaded by lodsb
        assert value(out, 3) == hex(LONG_HELLO + 1)
        assert value(out, 4) == "0x8"
        assert int(value(out, 5), 16) & 0x80000001 == 0x80000001  # PG, PE
        assert int(value(out, 6), 16) & 0x500 == 0x500  # LME, LMA
        assert value(out, 7) == "0x21000"
        assert '"Hello from long mode\\n"' in out
        assert "0xe6\t0xe9" in out
        assert value(out, 8) == hex(LONG_OUT + 2)  # the jmp after the out
        assert value(out, 9) == "0x100006"  # back at lodsb
        assert value(out, 10) == "895" and value(out, 11).startswith("0x") and value(out, 12) == "0"
        assert "Thread 1 (vCPU 0 (long mode))" in out
        assert "detached" in out
        result = s.outcome()
    assert isinstance(result, Outcome) and result.status == 0
    assert s.machine.console_output == b"Hello from long mode\n"


@pytest.mark.kvm
@needs_gdb
def test_gdb_with_the_architecture_set_first(guest):
    """The command line of the issue: `set architecture i386:x86-64` before `target remote`."""
    with served(guest("hello_long"), "long") as s:
        args = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
                "-ex", f"target remote 127.0.0.1:{s.port}", "-ex", "x/i $pc", "-ex", "detach"]
        out = subprocess.run(args, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60).stdout
        assert "=> 0x100000:\tmov    $0x100021,%esi" in out
        assert isinstance(s.outcome(), Outcome)


@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("sw", "step")
def test_gdb_real_mode_is_i8086(guest):
    with served(guest("hello_real"), "real") as s:
        out = gdb_batch(
            s.port,
            "show architecture",
            "x/i $pc",
            f"break *{REAL_OUT:#x}",
            "continue",
            "p/x $pc", "p/x $eax & 0xff", "p/x $cs", "p/x $ss", "p/x $esp", "p/x $cr0",
            f"x/s {REAL_HELLO:#x}",
            "x/2i $pc",
            "stepi", "p/x $pc",
            "detach",
        )
        assert '(currently "i8086")' in out
        assert "=> 0x1000:\tmov    $0x1024,%esi" in out  # decoded as 16-bit code (66 be ...)
        assert f"Breakpoint 1, {REAL_OUT:#010x}" in out
        assert value(out, 1) == hex(REAL_OUT) and value(out, 2) == "0x48"
        assert value(out, 3) == "0x0" and value(out, 4) == "0x9000" and value(out, 5) == "0xf000"
        assert int(value(out, 6), 16) & 1 == 0  # CR0.PE clear
        assert '"Hello from real mode\\n"' in out
        assert f"=> {REAL_OUT:#x}:\tout    %al,$0xe9" in out
        assert value(out, 7) == hex(REAL_OUT + 2)
        result = s.outcome()
    assert isinstance(result, Outcome) and result.status == 0
    assert s.machine.console_output == b"Hello from real mode\n"


@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("sw", "step")
def test_gdb_protected_mode_and_stepping_into_the_guests_exit(guest):
    """32-bit code gets the i386 description; a step over the guest's DONE ends the run under gdb."""
    done_out = 0x10001D  # hello_protected.S: out %eax,(%dx) with EAX = DONE
    with served(guest("hello_protected"), "protected") as s:
        out = gdb_batch(s.port, "show architecture", f"break *{LONG_OUT:#x}", "continue", "p/x $eip", "p/x $eax",
                        "delete", f"break *{done_out:#x}", "continue", "p/x $ebx", "stepi", "p $pc")
        assert '(currently "i386")' in out
        assert f"Breakpoint 1, {LONG_OUT:#010x}" in out and value(out, 1) == hex(LONG_OUT) and value(out, 2) == "0x48"
        assert f"Breakpoint 2, {done_out:#010x}" in out and value(out, 3) == "0x0"
        assert "[Inferior 1 (Remote target) exited normally]" in out  # W00: DONE(0)
        result = s.outcome()
    assert isinstance(result, Outcome) and result.status == 0
    assert s.machine.console_output == b"Hello from protected mode\n"


@pytest.mark.kvm
@needs_gdb
def test_gdb_cpl3_on_kvm_pvm_refuses_to_step(guest, backend):
    """kvm_pvm runs CPL3 natively: the stub refuses a step there rather than let the trap reach the guest."""
    if backend != "kvm_pvm":
        pytest.skip(f"kvm_pvm only; {backend} single-steps CPL3 code like any other")
    iretq = 0x10003D  # cpuid_cpl.S: iretq to CPL3
    with served(guest("cpuid_cpl"), "long") as s:
        out = gdb_batch(s.port, f"break *{iretq:#x}", "continue", "delete", "stepi", "p/x $cs", "stepi", "continue")
        assert value(out, 1) == "0x3b"  # the step from CPL0 went on to the next exit, at CPL3
        assert "Remote failure reply: E01" in out
        assert "exited normally" in out
        result = s.outcome()
    assert isinstance(result, Outcome) and result.status == 0
    assert s.machine.console_output.endswith(b"cpl: 0\ncpl: 3\n")


def _smp_addresses() -> tuple[int, int]:
    """(the BSP's instruction after it copied the AP trampoline, the trampoline's copy at 0x8000)."""
    from elftools.elf.elffile import ELFFile

    with open(ELF / "smp.elf", "rb") as f:
        elf = ELFFile(f)
        symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
        text = elf.get_section_by_name(".image")
        code = text.data()
        start = symbols["_start"] - text["sh_addr"]
    rep_movsb = code.index(b"\xf3\xa4", start)
    return text["sh_addr"] + rep_movsb + 2, 0x8000


@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("sw", "step")
def test_gdb_two_vcpus_are_two_threads(guest):
    after_copy, trampoline = _smp_addresses()
    with served(guest("smp"), "long", cpus=2) as s:
        out = gdb_batch(
            s.port,
            "info threads",
            f"break *{after_copy:#x}",
            "continue",                 # the BSP, before it sends INIT/SIPI
            f"break *{trampoline:#x}",  # the AP's first instruction (linear: CS=0x800, IP=0)
            "continue",
            "info threads",
            "p/x $pc", "p/x $cs",
            "stepi", "p/x $pc",
            "thread 1", "p/x $cr0",
            "delete",
            "detach",
        )
        assert "Thread 1 (vCPU 0 (long mode))" in out and "Thread 2 (vCPU 1 (real mode))" in out
        assert f"Thread 1 hit Breakpoint 1, {after_copy:#018x}" in out
        assert f"Thread 2 hit Breakpoint 2, {trampoline:#018x}" in out
        assert "* 2    Thread 2 (vCPU 1 (real mode))" in out
        assert value(out, 1) == hex(trampoline) and value(out, 2) == "0x800"
        assert value(out, 3) == hex(trampoline + 1)  # cli
        assert "Switching to thread 1" in out and int(value(out, 4), 16) & 0x80000001 == 0x80000001
        result = s.outcome()
    assert isinstance(result, Outcome) and result.status == 0
    assert s.machine.console_output == b"ap: apic 1\nbsp: ipi 0x31 0\n"


@pytest.mark.kvm
@needs_gdb
def test_gdb_writes_registers_and_memory(guest):
    with served(guest("hello_long"), "long") as s:
        out = gdb_batch(
            s.port,
            f"set {{char}}{LONG_HELLO:#x} = 'J'",
            "set $rbx = 0x1234", "set $r15 = -1", "set $xmm3.v4_int32[1] = 77", "set $st0 = 1.5",
            "set $cr2 = 0xdead000", "set $fs_base = 0x5000", "set $ds = 0x30",
            "p/x $rbx", "p/x $r15", "p $xmm3.v4_int32", "p $st0", "p/x $cr2", "p/x $fs_base", "p/x $ds",
            f"x/s {LONG_HELLO:#x}",
            "detach",
        )
        assert [value(out, n) for n in range(1, 8)] == [
            "0x1234", "0xffffffffffffffff", "{0, 77, 0, 0}", "1.5", "0xdead000", "0x5000", "0x30"]
        assert '"Jello from long mode\\n"' in out
        assert isinstance(s.outcome(), Outcome)
        regs, sregs = s.machine.vcpu.get_regs(), s.machine.vcpu.get_sregs()
        assert regs.r15 == 2**64 - 1 and sregs.cr2 == 0xDEAD000 and sregs.fs.base == 0x5000
        assert sregs.ds.selector == 0x30 and sregs.ds.present and sregs.ds.s  # loaded from the GDT
    assert s.machine.console_output == b"Jello from long mode\n"


@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("hw")
def test_gdb_hardware_breakpoint_and_watchpoints(guest, backend):
    with served(guest("hello_long"), "long") as s:
        out = gdb_batch(
            s.port,
            f"hbreak *{LONG_DONE:#x}",
            "continue", "p/x $pc", "delete",
            "watch *(char *)0x200000",
            "continue", "p/x $pc",
            "delete",
            "detach",
        )
        assert f"Breakpoint 1, {LONG_DONE:#018x}" in out and value(out, 1) == hex(LONG_DONE)
        if backend == "kvm_pvm":  # its emulator checks DR7 execution breakpoints, never data ones
            assert "Could not insert hardware watchpoint 2" in out
            assert value(out, 2) == hex(LONG_DONE)  # gdb refused to resume; nothing hung
        assert isinstance(s.outcome(), Outcome)
    assert s.machine.console_output == b"Hello from long mode\n"


@pytest.mark.kvm
@needs_gdb
@pytest.mark.guest_debug("step")
def test_gdb_software_watchpoint_single_steps(guest):
    """gdb's own watchpoints (no debug registers) step the guest one instruction at a time, across
    port I/O exits too."""
    with served(guest("hello_long"), "long") as s:
        out = gdb_batch(s.port, "set can-use-hw-watchpoints 0", "watch $rax", "continue", "p/x $pc",
                        "continue", "p/x $pc", "p/x $rax", "delete", "detach")
        assert "Old value = 0\nNew value = 72" in out and "Old value = 72\nNew value = 101" in out
        assert value(out, 1) == value(out, 2) == "0x100007" and value(out, 3) == "0x65"
        assert isinstance(s.outcome(), Outcome)


@pytest.mark.kvm
@needs_gdb
def test_gdb_ctrl_c_pauses_a_spinning_guest(guest):
    """gdb attaches to a running guest (no --wait-gdb), continues, and Ctrl-C stops it with SIGINT."""
    with served(guest("spin"), "real", wait=False) as s:
        deadline = time.monotonic() + 10
        while b"spinning" not in s.machine.console_output and time.monotonic() < deadline:
            time.sleep(0.01)
        master, slave = pty.openpty()  # gdb's own output goes through a terminal: unbuffered
        gdb = subprocess.Popen([GDB, "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{s.port}", "-ex", "p/x $pc",
                                "-ex", "shell sleep 0.5", "-ex", "continue", "-ex", "p/x $pc", "-ex", "info threads", "-ex", "detach"],
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        try:
            deadline = time.monotonic() + 20
            attached = False
            while time.monotonic() < deadline:  # attached (stopped), then resumed by `continue`
                attached = attached or s.server.stopped
                if attached and not s.server.stopped:
                    break
                time.sleep(0.01)
            assert attached and not s.server.stopped
            time.sleep(0.2)
            gdb.send_signal(signal.SIGINT)
            out = b""
            while True:
                ready, _, _ = select.select([master], [], [], 20)
                try:
                    chunk = os.read(master, 4096) if ready else b""
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                out += chunk
            gdb.wait(20)
        finally:
            if gdb.poll() is None:
                gdb.kill()
            os.close(master)
        text = out.decode().replace("\r\n", "\n")
        assert "Program received signal SIGINT, Interrupt." in text
        assert value(text, 1) == value(text, 2)  # `jmp .`
        assert "detached" in text
        time.sleep(0.2)
        assert s.thread.is_alive()  # detached: the guest spins on
        s.machine.stop("test over")
        assert isinstance(s.outcome(), GuestTimeout)


# ---- a raw client: what gdb would never send ----------------------------------------------------------
@pytest.mark.kvm
def test_bad_checksum_is_nacked_and_not_acted_on(guest):
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        c.send(b"$M%x,1:4a#00" % LONG_HELLO)  # would write 'J'
        assert c.read_byte() == b"-"
        assert c.ask(b"m%x,1" % LONG_HELLO) == b"48"  # still 'H'
        assert c.ask(b"?") == b"T05thread:1;"
        assert c.ask(b"D") == b"OK"
        c.close()
        assert isinstance(s.outcome(), Outcome)
    assert s.machine.console_output == b"Hello from long mode\n"


@pytest.mark.kvm
def test_oversized_unknown_and_malformed_packets(guest):
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        supported = c.ask(b"qSupported:swbreak+")
        assert b"PacketSize=%x" % PACKET_SIZE in supported
        assert c.ask(b"X100021," + b"%x:" % (4 * PACKET_SIZE) + b"A" * (4 * PACKET_SIZE)) == b"E22"
        for unknown in (b"Qbogus", b"vBogus", b"qNothing", b"!", b"\xff\xfe", b"j"):
            assert c.ask(unknown) == b"", unknown
        for bad in (b"Z0", b"Z0,zz,1", b"m", b"m1,", b"mxyz,4", b"M100021,2:4", b"M100021,1:zz", b"X100021,5:ab",
                    b"G12", b"P", b"P9999=00", b"pffff", b"Hg99", b"Hgzz", b"vCont;q", b"vCont;s:99;x",
                    b"qXfer:features:read:nope.xml:0,10", b"qXfer:features:read:target.xml:zz", b"T0"):
            assert c.ask(bad).startswith(b"E"), bad
        assert c.ask(b"vMustReplyEmpty") == b""
        assert c.ask(b"Hg1") == b"OK" and c.ask(b"T1") == b"OK"
        assert c.ask(b"p10") == LONG_START_RIP  # rip
        assert c.ask(b"D") == b"OK"
        c.close()
        assert isinstance(s.outcome(), Outcome)
    assert s.machine.console_output == b"Hello from long mode\n"



@pytest.mark.kvm
def test_memory_reads_of_unmapped_and_non_ram_addresses(guest):
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        assert c.ask(b"m%x,5" % LONG_HELLO) == b"48656c6c6f"
        assert c.ask(b"m100000000,4") == b"E14"  # past pykvm's 4 GiB identity map: no page
        assert c.ask(b"mffff800000000000,4") == b"E14"  # canonical, unmapped
        assert c.ask(b"m40000000,4") == b"E14"  # mapped, but no RAM there (MMIO)
        ram_end = s.machine.ram.end
        assert c.ask(b"m%x,8" % (ram_end - 2)) == b"0000"  # a short read up to the end of RAM
        assert c.ask(b"M100000000,1:00") == b"E14"
        assert c.ask(b"Z0,100000000,1") == b"E14"
        assert c.ask(b"D") == b"OK"
        c.close()
        assert isinstance(s.outcome(), Outcome)


@pytest.mark.kvm
def test_disconnect_in_the_middle_of_a_step_lets_the_guest_run_on(guest):
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        assert c.ask(b"Z0,%x,1" % LONG_OUT) == b"OK"
        c.send(frame(b"vCont;s:1"))
        c.close()  # gone before the step's stop reply
        result = s.outcome()
        assert isinstance(result, Outcome) and result.status == 0
        assert s.machine.memory.read(LONG_OUT, 1) == b"\xe6"  # the breakpoint was taken out
    assert s.machine.console_output == b"Hello from long mode\n"


@pytest.mark.kvm
def test_disconnect_while_running_and_the_guest_exit_reply(guest):
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        assert c.ask(b"vCont;c") == b"W00"  # the guest said DONE(0) while gdb waited
        c.close()
        assert isinstance(s.outcome(), Outcome)


@pytest.mark.kvm
def test_kill_stops_the_run(guest):
    with served(guest("spin"), "real") as s:
        c = Client(s.port)
        c.send(frame(b"k"))
        assert c.read_byte() == b"+"
        result = s.outcome()
        assert isinstance(result, GuestTimeout) and "killed from gdb" in str(result)
        c.close()


@pytest.mark.kvm
def test_kill_before_the_run_starts(guest):
    """Machine.run() clears an earlier stop(): a kill that came first must still end the run."""
    with Machine() as m:
        m.load_flat(guest("spin"), "real")
        server = GdbServer(m, "127.0.0.1:0", wait=True)
        port = server.listen()[1]
        starter = threading.Thread(target=server.start, kwargs={"timeout": 20})
        starter.start()
        c = Client(port)
        starter.join(20)
        c.send(frame(b"k"))
        assert c.read_byte() == b"+"
        deadline = time.monotonic() + 10
        while not m.stopping and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(GuestTimeout, match="killed from gdb"):
            server.run(timeout=20)
        c.close()


@pytest.mark.kvm
def test_a_flood_of_packets_drops_the_connection_not_the_guest(guest):
    with served(guest("spin"), "real") as s:
        c = Client(s.port)
        c.send(frame(b"vCont;c"))
        assert c.read_byte() == b"+"
        try:
            for _ in range(500):
                c.send(frame(b"g"))
        except OSError:
            pass
        with pytest.raises((EOFError, OSError)):
            while True:
                c.recv_some()
        assert s.thread.is_alive() and not s.server.stopped
        s.machine.stop("test over")
        assert isinstance(s.outcome(), GuestTimeout)


@pytest.mark.kvm
def test_ctrl_c_byte_and_thread_packets_with_two_vcpus(guest):
    """vCPU 0 spins; vCPU 1 waits in the kernel for a SIPI that never comes: Ctrl-C pauses both."""
    with served(guest("spin"), "real", cpus=2) as s:
        c = Client(s.port)
        assert c.ask(b"qfThreadInfo") == b"m1,2" and c.ask(b"qsThreadInfo") == b"l"
        assert c.ask(b"Hg2") == b"OK"
        assert c.ask(b"qC") == b"QC2"
        assert bytes.fromhex(c.ask(b"qThreadExtraInfo,2").decode()) == b"vCPU 1 (real mode)"
        assert c.ask(b"T3").startswith(b"E")
        for _ in range(3):
            c.send(frame(b"vCont;c"))
            assert c.read_byte() == b"+"
            time.sleep(0.1)
            assert not s.server.stopped
            c.send(b"\x03")
            assert c.read_packet() == b"T02thread:2;"  # reported on the selected thread
            assert s.server.stopped and s.machine.running
        assert c.ask(b"Hg1") == b"OK" and c.ask(b"p8") == b"10100000"  # eip = 0x1010, little-endian
        assert c.ask(b"vCont;s:1") == b"T05thread:1;"  # `jmp .` steps to itself; vCPU 1 stays put
        assert c.ask(b"D") == b"OK"
        c.close()
        time.sleep(0.1)
        assert s.thread.is_alive() and not s.server.stopped
        c = Client(s.port)  # the next gdb attaches to the running guest
        assert c.ask(b"?") == b"T05thread:1;" and s.server.stopped
        assert c.ask(b"p8") == b"10100000"
        assert c.ask(b"D") == b"OK"
        c.close()
        s.machine.stop("test over")
        assert isinstance(s.outcome(), GuestTimeout)


@pytest.mark.kvm
def test_internal_error_is_shown_to_gdb_then_ends_the_run(guest):
    """A guest instruction KVM cannot run stops with SIGILL (or SIGTRAP for a guest's own
    int3/icebp); resuming ends the run with the UnexpectedExit it would have without gdb. The
    instruction: a jump to 0xd0000000, where no memory is, so that KVM's emulator cannot fetch
    the next one (on every backend: CPL0 code on VMX/SVM runs natively, so an instruction the
    emulator lacks would just run)."""
    with served(guest("hello_long"), "long") as s:
        c = Client(s.port)
        assert c.ask(b"M%x,7:b8000000d0ffe0" % LONG_OUT) == b"OK"  # mov eax, 0xd0000000; jmp rax
        assert c.ask(b"vCont;c") == b"T04thread:1;"
        assert c.ask(b"vCont;c") == b"X04"
        c.close()
        assert type(s.outcome()).__name__ == "UnexpectedExit"


@pytest.mark.kvm
def test_machine_hooks_intr_handler_and_after_exit(guest):
    """The two hooks the stub uses: an Intr handler sees kicks, after_exit sees every handled exit."""
    m = Machine()
    try:
        m.load_flat(guest("hello_long"), "long")
        seen: list = []
        m.after_exit = lambda exit, vcpu: seen.append(type(exit).__name__)
        kicked: list = []
        m.on_exit(exits.Intr, lambda exit, vcpu: kicked.append(vcpu.id))
        m.vcpu.kick()  # before the run: its first KVM_RUN returns at once
        assert not m.running
        outcome = m.run(timeout=10)
        assert outcome.status == 0 and not m.running and m.stopping
        assert kicked == [0]
        assert seen.count("IoOut") == 21 and seen[0] == "Intr"
    finally:
        m.close()
