"""Instruction tracing: single-step a guest and print every instruction it executes.

``pykvm run IMAGE --trace`` attaches a :class:`Tracer` to the :class:`~pykvm.machine.Machine`
before it runs. The tracer turns on ``KVM_GUESTDBG_SINGLESTEP`` on every vCPU, so each instruction
ends with a ``KVM_EXIT_DEBUG`` (exception 1, ``pc`` = the next RIP), and prints one line per
instruction: its step number, the code width it ran in, its linear address, its bytes, capstone's
disassembly (Intel syntax), the registers it changed and the exit it caused, if any::

       8 16 00001007  ac                    lodsb al, byte ptr [si]          rax=0x65 rsi=0x1026
      10 16 0000100a  74 04                 je 0x1010
      11 16 0000100c  e6 e9                 out 0xe9, al                     -> IoOut(port=0xe9, ...)
      12 16 0000100e  eb f7                 jmp 0x1007                       rip=0x1007

How each part is found:

- Registers come from ``kvm_run.s.regs`` (``KVM_CAP_SYNC_REGS``): KVM copies the general and the
  segment/control registers into the shared ``kvm_run`` page at every exit, so a step costs one
  ioctl (``KVM_RUN``) instead of three (with ``KVM_GET_REGS`` and ``KVM_GET_SREGS``). Without the
  capability (or with ``sync_regs=False``) the tracer makes the two ioctls.
- The width (16/32/64) is :func:`pykvm.x86.modes.code_bits` of the state *before* the
  instruction, so the far jump after ``mov cr0`` is still decoded as 16-bit code.
- The address is CS.base + RIP (RIP alone in 64-bit code). With paging on it is translated with
  ``KVM_TRANSLATE``, once per code page (cached until CR0/CR3/CR4/EFER change or the guest runs
  ``invlpg``/``invpcid``), and the bytes are read from guest memory.
- "Changed registers" is the difference of the states before and after the step: general
  registers, RFLAGS, RIP where the step did not fall through (a jump, an exception), the segment
  registers (selector, base, limit, access rights as VMX encodes them), GDTR/IDTR, CR0/2/3/4/8,
  EFER and the APIC base.

Exits other than the single-step ones still go to the machine (console output, DONE, devices),
and the instruction that caused one is printed in its place with ``-> Exit(...)``. KVM differs
by path here: an instruction KVM *emulates* (all CPL0 code on kvm_pvm) exits with RIP already
past it and gets no single-step exit of its own; a port write on the fast path exits with RIP
still on it and single-steps once completed; a read (``in``, an MMIO load, ``rdmsr``) completes
when the guest is resumed. The tracer prints a write at its exit (so a DONE, which ends the run
there, is printed) and a read once it completes (so that its result shows). Registers an exit
handler changes (a hypercall's result) get a line of their own, ``(exit handler)``.

Where the guest runs without single-step exits, the tracer cannot see single instructions and
says so with an ``(untraced)`` line from the last known state to the next exit. On kvm_pvm this
is all CPL3 code: it runs natively, KVM does not set RFLAGS.TF there, and a TF the guest sets
raises #DB in the guest, not a KVM exit. An exit that the pending instruction cannot have caused
(a port exit after a ``jmp``) is how the tracer notices.

A step that ends where its instruction cannot lead (an ``add`` that ends in an interrupt
handler) is marked ``-> not at <the RIP it leads to>: interrupt/exception or more steps``. On
kvm_pvm such a step is the delivery plus the handler's first instruction, and the instruction
shown had not run (the handler's return address is its own). The step of an ``iretq`` takes in
the instruction it returns to as well (kvm_pvm): the tracer reads the return address before the
step, and where exactly one more instruction explains where the step ended, prints it on a line
of its own ("ran in the step above").

A single-stepped ``hlt`` does not halt at once on kvm_pvm: KVM reports the step and goes on, and
the vCPU halts later instead (at the next ``iretq``), where nothing may wake it. So the tracer
never lets KVM step a CPL0 ``hlt``: it moves RIP past it and does what KVM would have done, a
:class:`~pykvm.exits.Hlt` for the machine without the in-kernel irqchip, and with it
``KVM_MP_STATE_HALTED`` (with any ``sti`` interrupt shadow cleared), so that KVM_RUN waits for
an interrupt.

On VMX and SVM, KVM single-steps with an RFLAGS.TF of its own, which it keeps across a write
of RFLAGS only while RIP is where KVM_SET_GUEST_DEBUG found it (x86.c, ``__kvm_set_rflags``): a
KVM_SET_REGS elsewhere (the tracer's own past a ``hlt``, a hypercall handler's result) and every
instruction KVM's emulator completes (an MMIO access, and on CPUs without decode assists such as
QEMU's TCG a ``mov cr0``) end the stepping without a word. So there the tracer issues
KVM_SET_GUEST_DEBUG again before each entry (``scripts/guest_debug_repro.c``, case ``stepemu``,
shows the lost steps without pykvm). kvm_pvm keeps TF, and arming it again at CPL3, which it
runs natively, would hand the trap to the guest: there the tracer arms once.

Filters: ``start`` (tracing begins at the first instruction at that linear address), ``end``
(tracing stops before the instruction at that address), ``only_range=(lo, hi)`` (print only
instructions at lo <= address < hi; every instruction is still single-stepped) and ``count``
(stop after that many printed instructions). When tracing stops, single-step is turned off and
the guest runs on at full speed.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from typing import NamedTuple, TextIO

from . import exits
from ._ffi import ffi
from .constants import (
    GUESTDBG_ENABLE,
    GUESTDBG_SINGLESTEP,
    SYNC_X86_REGS,
    SYNC_X86_SREGS,
    Cap,
    MpState,
)
from .ioctl import KvmError
from .probe.host import kvm_backend
from .x86.modes import CR0_PE, CR0_PG, EFER_LMA

MAX_INSN = 15  # the longest x86 instruction
GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")  # struct kvm_sregs, in order
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_RIP, _RFLAGS = 16, 17  # indexes in struct kvm_regs

_REGS = struct.Struct("<18Q")  # struct kvm_regs
# struct kvm_sregs: 8 x kvm_segment (base limit selector type present dpl db s l g avl unusable pad),
# gdt and idt (base limit pad[3]), cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]
_SREGS = struct.Struct("<" + "QIHBBBBBBBBBx" * 8 + "QH6x" * 2 + "7Q" + "32x")
REGS_SIZE = _REGS.size  # 144
SREGS_SIZE = _SREGS.size  # 312

#: Mnemonic prefixes of instructions that may send RIP elsewhere than the next instruction.
_FLOW = ("j", "call", "lcall", "ljmp", "ret", "lret", "iret", "int", "loop", "sys", "ud", "bound", "vm", "rsm")
_IO = frozenset(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"))
_STACK = ("push", "pop", "call", "ret", "iret", "int", "enter", "leave", "lcall", "lret")
_READS = (exits.IoIn, exits.MmioRead, exits.X86Rdmsr)  # the instruction completes after the reply


def parse_range(text: str) -> tuple[int, int]:
    """``"LO-HI"`` (0x-hex or decimal) -> ``(lo, hi)``, the half-open range lo <= address < hi.

    For ``--trace-range``; raises ValueError with the reason."""
    lo_text, sep, hi_text = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r}: an address range is LO-HI, e.g. 0x1000-0x1100")
    try:
        lo, hi = int(lo_text.strip(), 0), int(hi_text.strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r}: LO and HI must be integers (0x1000 or 4096)") from None
    if not 0 <= lo < hi:
        raise ValueError(f"{text!r}: need 0 <= LO < HI (the range is LO <= address < HI)")
    return lo, hi


class TraceRecord(NamedTuple):
    """One line of a trace: an instruction (``kind`` "insn"), a stretch the guest ran without
    single-step exits ("untraced"), or registers an exit handler changed ("host")."""

    step: int  # instructions single-stepped so far, this one included (printed or filtered out)
    cpu: int  # the vCPU id
    bits: int  # 16, 32 or 64: the code width the instruction ran in
    address: int  # linear address (CS.base + RIP; RIP in 64-bit code)
    rip: int
    code: bytes  # the instruction's bytes (empty where the address was not readable)
    mnemonic: str  # capstone's; "(bad)" where it cannot decode, "(unreadable)" without bytes
    op_str: str
    changes: tuple[tuple[str, int], ...]  # (register, new value) for each register that changed
    exit: str | None = None  # the exit the instruction caused (describe_exit), if any
    expected: int | None = None  # set where RIP is not where this instruction leads (that RIP):
    #                              an interrupt or exception came in, or the step ran on
    kind: str = "insn"

    @property
    def instruction(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    def format(self, cpu_column: bool = False) -> str:
        """The trace line: step, [cpu,] bits, address, bytes, disassembly, changes, exit."""
        width = 16 if self.bits == 64 else 8
        step = self.step if self.kind == "insn" else "-"
        cpu = f"cpu{self.cpu} " if cpu_column else ""
        text = (f"{step:>8} {cpu}{self.bits:>2} {self.address:0{width}x}  "
                f"{self.code.hex(' '):<21} {self.instruction:<32}")
        tail = [f"{name}={value:#x}" for name, value in self.changes]
        if self.expected is not None:
            tail.append(f"-> not at {self.expected:#x}: interrupt/exception or more steps")
        if self.exit:
            tail.append(f"-> {self.exit}")
        return f"{text} {' '.join(tail)}".rstrip()


class _Sregs:
    """One copy of ``struct kvm_sregs``, decoded: the fields a diff compares, and the code mode."""

    __slots__ = ("bits", "cpl", "cr3", "cs_base", "fields", "paging", "raw")

    def __init__(self, raw: bytes):
        self.raw = raw
        v = _SREGS.unpack(raw)
        fields: dict[str, int] = {}
        for i, name in enumerate(SEGMENT_NAMES):
            base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable = v[12 * i: 12 * i + 12]
            fields[name] = selector
            fields[name + ".base"] = base
            fields[name + ".limit"] = limit
            fields[name + ".attr"] = (type_ | s << 4 | dpl << 5 | present << 7 | avl << 12 | l << 13 | db << 14
                                      | g << 15 | unusable << 16)
            if i == 0:
                cs_base, cs_db, cs_l = base, db, l
        at = 12 * len(SEGMENT_NAMES)
        fields["gdt.base"], fields["gdt.limit"], fields["idt.base"], fields["idt.limit"] = v[at: at + 4]
        fields.update(zip(CONTROL_NAMES, v[at + 4: at + 11]))
        self.fields = fields
        cr0, efer = fields["cr0"], fields["efer"]
        if not cr0 & CR0_PE:  # as pykvm.x86.modes.code_bits
            self.bits = 16
        elif efer & EFER_LMA and cs_l:
            self.bits = 64
        else:
            self.bits = 32 if cs_db else 16
        self.cs_base = cs_base
        self.cpl = fields["cs"] & 3 if cr0 & CR0_PE else 0
        self.paging = bool(cr0 & CR0_PG)
        self.cr3 = fields["cr3"]

    def linear(self, rip: int) -> int:
        """The linear address of the code at ``rip``."""
        return rip if self.bits == 64 else (self.cs_base + rip) & 0xFFFFFFFF


class _State:
    """A vCPU's registers at one point: the ``kvm_regs`` tuple and the decoded ``kvm_sregs``."""

    __slots__ = ("regs", "rip", "sregs")

    def __init__(self, regs: tuple, sregs: _Sregs):
        self.regs = regs
        self.sregs = sregs
        self.rip = regs[_RIP]


class _Insn(NamedTuple):
    address: int
    code: bytes  # 15 bytes (fewer where unreadable); the instruction is code[:size]
    size: int  # 0: not decoded
    mnemonic: str
    op_str: str


class _Cpu:
    """The tracer's view of one vCPU."""

    def __init__(self, vcpu, sync: bool):
        self.vcpu = vcpu
        self.sync = sync
        self.active = False  # single-step is on
        self.state: _State | None = None  # the registers before the pending instruction
        self.insn: _Insn | None = None  # the pending instruction, once decoded
        self.emitted = False  # it was printed at an exit, before it completed
        self.note: str | None = None  # the (read) exit it caused, printed when it completes
        self.refresh = False  # an exit handler ran: re-read the registers before the next entry
        self.gap = False  # the guest has been running without single-step exits since the last exit
        self.waiting = False  # an AP not started yet (INIT/SIPI)
        self.iret_target: int | None = None  # where the pending iret returns to
        self.sregs: _Sregs | None = None  # the last decoded sregs (reused while the bytes match)
        self.pages: dict[tuple[int, int], int | None] = {}  # (cr3, linear page) -> physical page
        self.buffer = ffi.buffer(ffi.addressof(vcpu.kvm_run.s.regs)) if sync else None
        self.saved_valid_regs = 0
        self.had_run_attr = False
        self.saved_run = None


class Tracer:
    """Single-step ``machine``'s guest and print each instruction to ``output`` (default stderr).

    ``start`` / ``end``: linear addresses where tracing begins / stops (before that instruction);
    ``count``: stop after that many printed instructions; ``only_range=(lo, hi)``: print only
    instructions at lo <= address < hi. ``keep`` keeps every printed :class:`TraceRecord` in
    :attr:`records`. ``sync_regs=False`` reads the registers with KVM_GET_REGS/KVM_GET_SREGS
    instead of from kvm_run (slower; to compare).

    Call :meth:`attach` before ``machine.run()`` and :meth:`finish` after it (also when it
    raised), or use the tracer as a context manager around the run. :attr:`steps`,
    :attr:`printed`, :attr:`untraced`, :attr:`seconds`, :attr:`rate` and :meth:`summary` describe
    the run; :attr:`stopped` says why tracing ended early ("count" or "end"), or is None.
    """

    def __init__(self, machine, *, output: TextIO | None = None, start: int | None = None, end: int | None = None,
                 count: int | None = None, only_range: tuple[int, int] | None = None, keep: bool = False,
                 sync_regs: bool = True):
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if only_range is not None:
            lo, hi = only_range
            if not 0 <= lo < hi:
                raise ValueError(f"only_range must be (lo, hi) with 0 <= lo < hi, not ({lo:#x}, {hi:#x})")
        for name, value in (("start", start), ("end", end)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be an address >= 0, not {value:#x}")
        self.machine = machine
        self.output = output if output is not None else sys.stderr
        self.start, self.end, self.count, self.only_range = start, end, count, only_range
        self.keep = keep
        self.records: list[TraceRecord] = []
        self.steps = 0  # instructions single-stepped (printed or filtered out)
        self.printed = 0  # instruction lines printed
        self.untraced = 0  # stretches the guest ran without single-step exits
        self.stopped: str | None = None
        self.started = start is None
        self.sync_regs = False  # registers from kvm_run.s.regs (decided by attach)
        self.attached = False
        self._sync_wanted = sync_regs
        self._cpus: list[_Cpu] = []
        self._lock = threading.Lock()  # one line at a time on the output
        self._decode_lock = threading.Lock()
        self._cpu_column = len(machine.vcpus) > 1
        self._t0: float | None = None
        self._t1: float | None = None
        # On VMX/SVM KVM drops its single-step TF (module notes): arm again before each entry.
        # kvm_pvm keeps it, and arming it again at CPL3, which it runs natively, would put the
        # trap in the guest's hands.
        self._rearm = kvm_backend() != "kvm_pvm"
        self._disasm: dict[int, object] = {}
        self._decoded: dict[tuple[int, int, bytes], tuple[int, str, str]] = {}
        self._views: list[tuple[int, int, memoryview]] = []  # (gpa, end, view) of the memory slots read

    # ---- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> Tracer:
        """Turn on single-step on every vCPU, take their exits first, and answer Debug exits on
        the machine. Call before ``machine.run()``."""
        if self.attached:
            raise RuntimeError("this tracer is attached already")
        wanted = SYNC_X86_REGS | SYNC_X86_SREGS
        self.sync_regs = self._sync_wanted and self.machine.kvm.check_extension(Cap.SYNC_REGS) & wanted == wanted
        self.machine.on_exit(exits.Debug, self._debug_exit)
        for vcpu in self.machine.vcpus:
            cpu = _Cpu(vcpu, self.sync_regs)
            self._arm(cpu)
            cpu.active = True
            if cpu.sync:
                cpu.saved_valid_regs = vcpu.kvm_run.kvm_valid_regs
                vcpu.kvm_run.kvm_valid_regs = cpu.saved_valid_regs | wanted
            # The machine's loop binds vcpu.run when it starts: wrapping it lets the tracer see every
            # exit, with its vCPU, before the machine handles it.
            cpu.had_run_attr = "run" in vars(vcpu)
            cpu.saved_run = vcpu.run
            vcpu.run = self._runner(cpu, cpu.saved_run)
            self._cpus.append(cpu)
        self.attached = True
        return self

    def finish(self) -> None:
        """Print a read still waiting for its completion, turn single-step off and let go of the
        vCPUs. Idempotent."""
        if not self.attached:
            return
        self.attached = False
        for cpu in self._cpus:
            if cpu.active and cpu.state is not None and cpu.note is not None and not cpu.vcpu.closed:
                try:
                    now = self._read_ioctl(cpu)
                except KvmError:
                    now = cpu.state
                self._emit(cpu, cpu.state, now, cpu.note + " (the run ended here)")
            self._stop_cpu(cpu)
            if not cpu.vcpu.closed:
                if cpu.had_run_attr:
                    cpu.vcpu.run = cpu.saved_run
                else:
                    vars(cpu.vcpu).pop("run", None)
        self._cpus = []
        for _, _, view in self._views:
            view.release()
        self._views = []

    detach = finish

    def __enter__(self) -> Tracer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.finish()

    # ---- figures ------------------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        """Wall time from the first traced entry to the last traced step."""
        if self._t0 is None or self._t1 is None:
            return 0.0
        return self._t1 - self._t0

    @property
    def rate(self) -> float:
        """Instructions single-stepped per second (0 before any)."""
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for stderr: instructions single-stepped and printed, time, rate, why it stopped."""
        regs = "registers from kvm_run" if self.sync_regs else "registers by ioctl"
        text = (f"trace: {self.steps} instructions single-stepped, {self.printed} printed, in {self.seconds:.3f} s "
                f"({self.rate:,.0f} instructions/s, {regs})")
        if self.untraced:
            text += f"; {self.untraced} stretches ran without single-step exits (on kvm_pvm: CPL3 code)"
        if self.stopped == "count":
            text += f"; stopped after {self.count} instructions"
        elif self.stopped == "end":
            text += f"; stopped at {self.end:#x}"
        return text

    # ---- the exit path ------------------------------------------------------------------------
    def _runner(self, cpu: _Cpu, run):
        irqchip = bool(self.machine.irqchip)

        def traced_run():
            if cpu.active:
                if self.stopped is not None:
                    self._stop_cpu(cpu)
                else:
                    if cpu.state is None:
                        self._first_entry(cpu)
                    elif cpu.refresh:
                        self._refresh(cpu)
                    if not (cpu.waiting or cpu.gap or cpu.emitted or cpu.note is not None or self.stopped):
                        mnemonic = self._pending(cpu).mnemonic
                        if mnemonic == "hlt" and cpu.state.sregs.cpl == 0:
                            halted = self._halt(cpu, irqchip)
                            if halted is not None:
                                return halted
                        elif mnemonic.startswith("iret"):
                            cpu.iret_target = self._iret_target(cpu, mnemonic)
                    if self._rearm and cpu.active:
                        self._arm(cpu)
            exit = run()
            if not cpu.active:
                return exit
            kind = type(exit)
            if kind is exits.Intr:
                return exit
            if cpu.waiting:  # an AP's first exit after INIT/SIPI: where its trace starts
                cpu.waiting = False
                self._set_state(cpu, self._read(cpu))
                return exit
            if kind is exits.Debug:
                self._step(cpu)
                return exit
            self._other_exit(cpu, exit)
            return exit

        return traced_run

    @staticmethod
    def _arm(cpu: _Cpu) -> None:
        """Single-step ``cpu`` from where it is now (KVM_SET_GUEST_DEBUG). On VMX/SVM again
        before each entry: see the module's notes."""
        cpu.vcpu.set_guest_debug(GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP)

    @staticmethod
    def _debug_exit(exit, vcpu) -> None:
        """The machine's handler for Debug exits: the tracer did its work before the machine saw it."""

    def _first_entry(self, cpu: _Cpu) -> None:
        """Before a vCPU's first entry its registers are the state before its first instruction.
        An AP waiting for INIT/SIPI starts where the SIPI sends it: it is traced from its first
        exit on (its first instruction goes unprinted)."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self._set_state(cpu, self._read_ioctl(cpu))
        cpu.waiting = cpu.vcpu.get_mp_state() != MpState.RUNNABLE

    def _set_state(self, cpu: _Cpu, state: _State) -> None:
        cpu.state = state
        cpu.insn = None
        if self.end is not None and self.started and state.sregs.linear(state.rip) == self.end:
            self._stop(cpu, "end")  # before the instruction at `end`

    def _refresh(self, cpu: _Cpu) -> None:
        """After an exit handler ran: take the registers the guest resumes with, and print what the
        handler changed (a hypercall's result in RAX, say)."""
        cpu.refresh = False
        now = self._read_ioctl(cpu)
        self._handler_changes(cpu, cpu.state, now)
        self._set_state(cpu, now)

    def _handler_changes(self, cpu: _Cpu, before: _State, now: _State) -> None:
        """Print, as an ``(exit handler)`` line, what differs between the state the guest was left
        in at an exit (``before``) and the one it resumed with (``now``)."""
        changes = self._diff(before, now, None)
        if changes:
            address = before.sregs.linear(before.rip)
            self._print(TraceRecord(self.steps, cpu.vcpu.id, before.sregs.bits, address, before.rip, b"",
                                    "(exit handler)", "", tuple(changes), kind="host"), address)

    def _fell_through(self, cpu: _Cpu, state: _State) -> _State:
        """``state`` with RIP past the pending instruction (a fast-path port write exits with RIP
        still on it, and is shown as it will complete; a ``hlt`` the tracer does itself)."""
        next_rip = self._next_rip(cpu.state, self._pending(cpu))
        if next_rip is None:
            return state
        return _State(state.regs[:_RIP] + (next_rip,) + state.regs[_RIP + 1:], state.sregs)

    def _step(self, cpu: _Cpu) -> None:
        """A single-step exit: the pending instruction has completed."""
        before = cpu.state
        now = self._read(cpu)
        if cpu.emitted:  # printed at its exit already (a port write on the fast path)
            cpu.emitted = False
            cpu.note = None
            self._handler_changes(cpu, self._fell_through(cpu, before), now)
        elif cpu.gap:  # back from code that does not single-step
            cpu.gap = False
            self._untraced(cpu, before, now, None)
        else:
            note, cpu.note = cpu.note, None
            self._emit(cpu, before, now, note)
        self._set_state(cpu, now)

    def _halt(self, cpu: _Cpu, irqchip: bool):
        """The next instruction is ``hlt`` (at CPL0): do what it does instead of letting KVM
        single-step it. A single-stepped ``hlt`` does not halt on kvm_pvm; the vCPU halts later
        instead, later (at the next ``iretq``), and may never wake. So: RIP past it, then with the
        in-kernel irqchip KVM_MP_STATE_HALTED (KVM_RUN waits for an interrupt), without it a Hlt
        exit for the machine, as KVM would have returned."""
        before = cpu.state
        after = self._fell_through(cpu, before)
        regs = cpu.vcpu.get_regs()
        regs.rip = after.rip
        cpu.vcpu.set_regs(regs)
        self._emit(cpu, before, after, "halted until an interrupt" if irqchip else "Hlt")
        self._set_state(cpu, after)
        if irqchip:
            # An `sti` just before leaves an interrupt shadow that only an executed instruction
            # ends; kept, it would block the interrupt that is to wake the vCPU.
            events = cpu.vcpu.get_vcpu_events()
            if events.interrupt.shadow:
                events.interrupt.shadow = 0
                cpu.vcpu.set_vcpu_events(events)
            cpu.vcpu.set_mp_state(MpState.HALTED)
            return None
        cpu.refresh = True  # the machine's Hlt handler may change registers
        return exits.Hlt()

    def _iret_target(self, cpu: _Cpu, mnemonic: str) -> int | None:
        """The RIP an ``iret`` at ``cpu.state`` returns to, read from the stack before it runs (on
        kvm_pvm the step of an ``iretq`` can take in the next instruction or an interrupt, and
        the stack may be written over by then)."""
        state = cpu.state
        size = {"iretq": 8, "iretd": 4}.get(mnemonic, 2)
        rsp = state.regs[6]
        fields = state.sregs.fields
        if state.sregs.bits != 64:
            rsp = (fields["ss.base"] + (rsp if fields["ss.attr"] >> 14 & 1 else rsp & 0xFFFF)) & 0xFFFFFFFF
        data = self._read_linear(cpu, state.sregs, rsp, size)
        return int.from_bytes(data, "little") if len(data) == size else None

    def _other_exit(self, cpu: _Cpu, exit) -> None:
        before = cpu.state
        now = self._read(cpu)
        completed = now.rip != before.rip or now.sregs.raw != before.sregs.raw
        if cpu.emitted:  # printed at an earlier exit; still in progress (a string instruction)
            if completed:
                cpu.emitted = False
                cpu.refresh = True
                self._set_state(cpu, now)
            return
        from .machine import describe_exit

        note = describe_exit(exit)
        if cpu.gap or not self._plausible(cpu, exit, before, now, completed):
            cpu.gap = True
            cpu.note = None
            cpu.refresh = True
            self._untraced(cpu, before, now, note)
            self._set_state(cpu, now)
            return
        if isinstance(exit, _READS) and not completed:
            cpu.note = note  # printed when the read completes, with its result
            return
        if completed:  # KVM emulated it: no single-step exit will follow for it
            self._emit(cpu, before, now, note)
            cpu.refresh = True
            self._set_state(cpu, now)
        else:  # a write on the fast path: it completes at the next entry, with a single-step exit
            self._emit(cpu, before, self._fell_through(cpu, now), note)
            cpu.emitted = True

    def _plausible(self, cpu: _Cpu, exit, before: _State, now: _State, completed: bool) -> bool:
        """Can the pending instruction alone have caused ``exit`` and led to ``now``?"""
        insn = self._pending(cpu)
        if not insn.size:
            return True  # not decodable: no grounds to doubt it
        mnemonic = insn.mnemonic.split()[-1] if insn.mnemonic.startswith("rep") else insn.mnemonic
        kind = type(exit)
        if kind is exits.IoOut or kind is exits.IoIn:
            ok = mnemonic in _IO
        elif kind is exits.MmioWrite or kind is exits.MmioRead:
            ok = "[" in insn.op_str or mnemonic.startswith(_STACK)
        elif kind is exits.X86Rdmsr or kind is exits.X86Wrmsr:
            ok = mnemonic in ("rdmsr", "wrmsr")
        elif kind is exits.Hypercall:
            ok = mnemonic in ("vmcall", "vmmcall")
        elif kind is exits.Hlt:
            ok = mnemonic == "hlt"
        else:
            return True
        if ok and completed and not insn.mnemonic.startswith(_FLOW):
            ok = now.rip == self._next_rip(before, insn)
        return ok

    def _stop_cpu(self, cpu: _Cpu) -> None:
        if not cpu.active:
            return
        cpu.active = False
        if cpu.vcpu.closed:
            return
        cpu.vcpu.set_guest_debug(0)
        if cpu.sync:
            cpu.vcpu.kvm_run.kvm_valid_regs = cpu.saved_valid_regs

    def _stop(self, cpu: _Cpu, reason: str) -> None:
        """Stop tracing: this vCPU now, the others at their next entry."""
        if self.stopped is None:
            self.stopped = reason
        self._stop_cpu(cpu)

    # ---- registers ----------------------------------------------------------------------------
    def _sregs(self, cpu: _Cpu, raw: bytes) -> _Sregs:
        """Decode ``raw`` sregs, reusing the last decoding while they are unchanged (most steps)."""
        last = cpu.sregs
        if last is not None and last.raw == raw:
            return last
        sregs = _Sregs(raw)
        if last is None or any(last.fields[n] != sregs.fields[n] for n in ("cr0", "cr3", "cr4", "efer")):
            cpu.pages.clear()
        cpu.sregs = sregs
        return sregs

    def _read(self, cpu: _Cpu) -> _State:
        """The registers KVM stored in kvm_run at this exit (without sync regs: by ioctl)."""
        if not cpu.sync:
            return self._read_ioctl(cpu)
        raw = cpu.buffer[0: REGS_SIZE + SREGS_SIZE]
        return _State(_REGS.unpack_from(raw, 0), self._sregs(cpu, raw[REGS_SIZE:]))

    def _read_ioctl(self, cpu: _Cpu) -> _State:
        regs = ffi.buffer(cpu.vcpu.get_regs())[:]
        sregs = ffi.buffer(cpu.vcpu.get_sregs())[:]
        return _State(_REGS.unpack(regs), self._sregs(cpu, sregs))

    @staticmethod
    def _diff(before: _State, after: _State, next_rip: int | None) -> list[tuple[str, int]]:
        """(name, new value) of each register that differs; RIP only where the step did not fall
        through to ``next_rip`` (with ``next_rip`` None: where it changed at all)."""
        out = [(name, new) for name, old, new in zip(GPR_NAMES, before.regs, after.regs) if old != new]
        b, a = before.sregs, after.sregs
        if next_rip is None:
            jumped = after.rip != before.rip
        else:
            jumped = after.rip != next_rip or a.fields["cs"] != b.fields["cs"]
        if jumped:
            out.append(("rip", after.rip))
        if after.regs[_RFLAGS] != before.regs[_RFLAGS]:
            out.append(("rflags", after.regs[_RFLAGS]))
        if a is not b and a.raw != b.raw:
            out.extend((name, value) for name, value in a.fields.items() if b.fields[name] != value)
        return out

    # ---- code ---------------------------------------------------------------------------------
    def _pending(self, cpu: _Cpu) -> _Insn:
        """The instruction at ``cpu.state`` (fetched and decoded once)."""
        insn = cpu.insn
        if insn is None:
            sregs = cpu.state.sregs
            address = sregs.linear(cpu.state.rip)
            code = self._read_linear(cpu, sregs, address)
            insn = cpu.insn = _Insn(address, code, *self._decode(sregs.bits, address, code))
            if insn.mnemonic in ("invlpg", "invpcid", "invlpga"):
                cpu.pages.clear()
        return insn

    @staticmethod
    def _next_rip(state: _State, insn: _Insn) -> int | None:
        if not insn.size:
            return None
        bits = state.sregs.bits
        mask = 0xFFFFFFFFFFFFFFFF if bits == 64 else 0xFFFFFFFF if bits == 32 else 0xFFFF
        return (state.rip + insn.size) & mask

    def _read_linear(self, cpu: _Cpu, sregs: _Sregs, linear: int, size: int = MAX_INSN) -> bytes:
        """Up to ``size`` bytes at ``linear`` (fewer where a page is unmapped or not RAM)."""
        out = b""
        while len(out) < size:
            addr = linear + len(out)
            chunk = min(size - len(out), 0x1000 - (addr & 0xFFF))
            if sregs.paging:
                key = (sregs.cr3, addr >> 12)
                page = cpu.pages.get(key, -1)
                if page == -1:
                    tr = cpu.vcpu.translate(addr & ~0xFFF)
                    page = tr.physical_address >> 12 if tr.valid else None
                    if len(cpu.pages) > 4096:
                        cpu.pages.clear()
                    cpu.pages[key] = page
                if page is None:
                    break
                gpa = page << 12 | (addr & 0xFFF)
            else:
                gpa = addr & 0xFFFFFFFF
            data = self._read_ram(gpa, chunk)
            out += data
            if len(data) < chunk:
                break
        return out

    def _read_ram(self, gpa: int, size: int) -> bytes:
        """Guest-physical bytes, through a view of each memory slot taken once (fewer at its end)."""
        for start, end, view in self._views:
            if start <= gpa < end:
                return view[gpa - start: min(gpa + size, end) - start].tobytes()
        region = self.machine.memory.region_at(gpa)
        if region is None:
            return b""
        view = region.view(region.gpa, region.size)
        self._views.append((region.gpa, region.end, view))
        return view[gpa - region.gpa: min(gpa + size, region.end) - region.gpa].tobytes()

    def _decode(self, bits: int, address: int, code: bytes) -> tuple[int, str, str]:
        """(size, mnemonic, op_str) of the instruction at the start of ``code``."""
        key = (bits, address, code)
        hit = self._decoded.get(key)
        if hit is not None:
            return hit
        result = (0, "(bad)", "") if code else (0, "(unreadable)", "")
        with self._decode_lock:  # one capstone handle per mode, shared by the vCPU threads
            md = self._disasm.get(bits)
            if md is None:
                import capstone

                mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
                md = self._disasm[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode)
            for _, size, mnemonic, op_str in md.disasm_lite(code, address, 1):
                result = (size, mnemonic, op_str)
        if len(self._decoded) > 65536:
            self._decoded.clear()
        self._decoded[key] = result
        return result

    # ---- output -------------------------------------------------------------------------------
    def _printing(self, address: int) -> bool:
        return self.started and (self.only_range is None or self.only_range[0] <= address < self.only_range[1])

    def _print(self, record: TraceRecord, *addresses: int) -> bool:
        if not any(self._printing(a) for a in addresses):
            return False
        line = record.format(self._cpu_column) + "\n"
        with self._lock:
            self.output.write(line)
        if self.keep:
            self.records.append(record)
        return True

    def _emit(self, cpu: _Cpu, before: _State, after: _State, note: str | None) -> None:
        """Count the pending instruction (at ``before``) and print it unless a filter says otherwise."""
        if self.stopped is not None:  # another vCPU stopped the trace; this one stops at its next entry
            return
        self._t1 = time.perf_counter()
        insn = self._pending(cpu)
        address = insn.address
        if not self.started and address == self.start:
            self.started = True
        self.steps += 1
        mnemonic = insn.mnemonic
        next_rip = self._next_rip(before, insn)
        extra = None
        if mnemonic.startswith("iret"):
            expected = cpu.iret_target
            if expected is not None and after.rip != expected:
                extra = self._ran_on(cpu, after, expected)
        else:
            expected = None if mnemonic.startswith(_FLOW) else next_rip
        if expected is not None and (after.rip == expected or extra is not None
                                     or after.rip == before.rip and mnemonic.startswith("rep")):
            expected = None
        if self._printing(address):
            if extra is not None:
                note = "the step ran on: the next line is part of it" + (f"; {note}" if note else "")
            self._print(TraceRecord(self.steps, cpu.vcpu.id, before.sregs.bits, address, before.rip,
                                    insn.code[: insn.size], mnemonic, insn.op_str,
                                    tuple(self._diff(before, after, next_rip)), note, expected), address)
            self._count(cpu)
        if extra is not None:
            self.steps += 1
            if self._printing(extra.address) and self.stopped is None:
                self._print(TraceRecord(self.steps, cpu.vcpu.id, after.sregs.bits, extra.address, expected,
                                        extra.code[: extra.size], extra.mnemonic, extra.op_str, (),
                                        "ran in the step above (its changes are there)"), extra.address)
                self._count(cpu)

    def _count(self, cpu: _Cpu) -> None:
        self.printed += 1
        if self.count is not None and self.printed >= self.count:
            self._stop(cpu, "count")

    def _ran_on(self, cpu: _Cpu, after: _State, rip: int) -> _Insn | None:
        """The instruction at ``rip`` if the step that ended at ``after`` ran it, and only it, after
        the iret that went to ``rip`` (kvm_pvm's iretq step takes in one more instruction)."""
        sregs = after.sregs
        linear = sregs.linear(rip)
        code = self._read_linear(cpu, sregs, linear)
        size, mnemonic, op_str = self._decode(sregs.bits, linear, code)
        if not size or mnemonic.startswith(_FLOW) or mnemonic == "hlt":
            return None
        mask = 0xFFFFFFFFFFFFFFFF if sregs.bits == 64 else 0xFFFFFFFF if sregs.bits == 32 else 0xFFFF
        return _Insn(linear, code, size, mnemonic, op_str) if (rip + size) & mask == after.rip else None

    def _untraced(self, cpu: _Cpu, before: _State, after: _State, note: str | None) -> None:
        """The guest ran from ``before`` to ``after`` without single-step exits."""
        if self.stopped is not None:
            return
        self._t1 = time.perf_counter()
        self.untraced += 1
        address = before.sregs.linear(before.rip)
        record = TraceRecord(self.steps, cpu.vcpu.id, before.sregs.bits, address, before.rip, b"", "(untraced)",
                             f"ran to {after.sregs.linear(after.rip):#x} without single-step exits",
                             tuple(self._diff(before, after, None)), note, kind="untraced")
        self._print(record, address, after.sregs.linear(after.rip))
