"""``Machine``: a ready VM (memory, one vCPU, the host-protocol devices, a loader) and its run loop.

The run loop is the policy layer: exits the bus handles are answered, the guest's DONE / FAIL on
the call port end the run with an :class:`Outcome`, and anything unexpected (an exit nobody
handles, a triple fault, an unhandled exception vector, a timeout) raises a :class:`GuestError`
that carries the vCPU's registers and the code at RIP.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from typing import BinaryIO, Callable

from . import exits
from .devices.bus import Bus
from .outcome import GuestFailure, Outcome
from .ioctl import KvmUnsupportedError
from .report import CpuState, read_virtual, read_virtual_cstring
from .system import Kvm
from .x86 import layout
from .x86.cpuid import guest_cpuid, has_la57
from .x86.modes import Mode, code_bits, setup_mode
from .x86.tables import vector_name


class GuestError(Exception):
    """The guest stopped in a way nobody handles; ``state`` holds its registers and code at RIP."""

    def __init__(self, message: str, state: CpuState | None = None, exit: exits.Exit | None = None):
        super().__init__(message)
        self.state = state
        self.exit = exit

    def report(self) -> str:
        text = str(self)
        return text + ("\n" + self.state.format() if self.state else "")


class UnexpectedExit(GuestError):
    """An exit no handler answers (an unclaimed port or MMIO address, an internal error...)."""


class TripleFault(UnexpectedExit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted."""


class GuestException(GuestError):
    """The guest took an exception vector it has no handler for (reported by pykvm's stubs)."""

    def __init__(self, message, state=None, exit=None, *, vector: int, error_code: int, rip: int):
        super().__init__(message, state, exit)
        self.vector, self.error_code, self.rip = vector, error_code, rip


class GuestTimeout(GuestError):
    """The run outlived its timeout and was stopped (immediate_exit + a signal)."""


class GuestInterrupted(GuestError):
    """The user interrupted the run (Ctrl-C); the guest was stopped where it was."""


def describe_exit(exit: exits.Exit) -> str:
    """One line naming an exit and its key fields."""
    if isinstance(exit, (exits.IoOut, exits.IoIn)):
        data = f" data={bytes(exit.data).hex()}" if isinstance(exit, exits.IoOut) else ""
        return f"{type(exit).__name__}(port={exit.port:#x}, size={exit.size}, count={exit.count}{data})"
    if isinstance(exit, exits.MmioWrite):
        return f"MmioWrite(gpa={exit.gpa:#x}, data={exit.data.hex()})"
    if isinstance(exit, exits.MmioRead):
        return f"MmioRead(gpa={exit.gpa:#x}, size={exit.size})"
    if isinstance(exit, exits.InternalError):
        insn = f", insn={exit.insn_bytes.hex(' ')}" if exit.insn_bytes else ""
        return f"InternalError({exit.suberror_name}, data={[hex(d) for d in exit.data]}{insn})"
    return repr(exit)


class Machine:
    """A VM with ``mem_size`` bytes of RAM at GPA 0, one vCPU, and the host-protocol devices."""

    def __init__(
        self,
        mem_size: int = layout.DEFAULT_MEM_SIZE,
        *,
        kvm: Kvm | None = None,
        console: BinaryIO | None = None,
        trace: Callable[[exits.Exit], None] | None = None,
    ):
        if mem_size < layout.MIN_MEM_SIZE or mem_size % layout.PAGE_SIZE:
            raise ValueError(
                f"guest memory must be a multiple of 4 KiB and at least {layout.MIN_MEM_SIZE >> 20} MiB, "
                f"not {mem_size:#x}"
            )
        if mem_size > layout.MMIO_WINDOW:
            raise ValueError(f"guest memory above {layout.MMIO_WINDOW:#x} would cover the MMIO window")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        try:
            self.vm = self.kvm.create_vm()
            self.ram = self.vm.add_memory(0, mem_size)
            self.vcpu = self.vm.create_vcpu()
            self.supported_cpuid = self.kvm.get_supported_cpuid()
            self.vcpu.set_cpuid2(guest_cpuid(self.supported_cpuid, self.vcpu.id))
        except BaseException:
            self.close()
            raise
        self.memory = self.vm.memory
        self.console = console
        self.console_output = bytearray()
        self.syncs: list[int] = []
        self.on_sync: Callable[[int], None] | None = None
        self.trace = trace
        self.exit_count = 0
        self.bus = Bus()
        self.bus.add_port(layout.CONSOLE_PORT, self._console_port)
        self.bus.add_port(layout.CALL_PORT, self._call_port)
        self.bus.add_port(layout.EXCEPTION_PORT, self._exception_port)
        self._stop_reason: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- loading and set-up -------------------------------------------------------------------
    def load(self, image: bytes, gpa: int) -> None:
        """Copy a flat image into guest RAM at ``gpa``."""
        if not image:
            raise ValueError("the guest image is empty")
        end = gpa + len(image)
        if gpa < 0 or not self.ram.contains(gpa, len(image)):
            raise ValueError(
                f"an image of {len(image)} bytes at {gpa:#x} (ends {end:#x}) does not fit in guest memory "
                f"({self.ram.gpa:#x}-{self.ram.end:#x}); use a larger --mem or another --load"
            )
        self.memory.write(gpa, image)

    def setup(self, mode: Mode | str, entry: int, *, la57: bool = False) -> None:
        """Put the vCPU in ``mode`` at ``entry`` (tables written into guest memory)."""
        mode = Mode(mode)
        if la57 and mode is not Mode.LONG:
            raise ValueError("5-level paging (la57) needs long mode")
        if la57 and not has_la57(self.supported_cpuid):
            raise KvmUnsupportedError("this host's KVM offers no LA57 (5-level paging) to guests")
        if not self.ram.contains(entry):
            raise ValueError(f"entry point {entry:#x} is outside guest memory ({self.ram.gpa:#x}-{self.ram.end:#x})")
        setup_mode(self.vcpu, self.memory, mode, entry, la57)

    def load_flat(self, image: bytes, mode: Mode | str = Mode.LONG, *, load: int | None = None,
                  entry: int | None = None, la57: bool = False) -> None:
        """Load a flat image and set the vCPU up to enter it (defaults: the mode's load address)."""
        mode = Mode(mode)
        load = mode.default_load if load is None else load
        self.load(image, load)
        self.setup(mode, load if entry is None else entry, la57=la57)

    # ---- the host protocol --------------------------------------------------------------------
    def _emit(self, data: bytes) -> None:
        self.console_output += data
        if self.console is not None:
            self.console.write(data)
            if b"\n" in data:
                self.console.flush()

    def _console_port(self, exit, vcpu):
        if isinstance(exit, exits.IoOut):
            self._emit(bytes(exit.data))
        else:
            exit.reply(0xFF)  # nothing to read: an idle bus

    def _read_string(self, vcpu, gva: int) -> str:
        return read_virtual_cstring(vcpu, self.memory, gva).decode("utf-8", "replace") if gva else ""

    def _call_port(self, exit, vcpu):
        if isinstance(exit, exits.IoIn):
            exit.reply(0)
            return None
        call = exit.value
        regs = vcpu.get_regs()
        if call == layout.CALL_DONE:
            return Outcome(regs.rbx & 0xFFFFFFFF)
        if call == layout.CALL_FAIL:
            return Outcome(1, GuestFailure(regs.rbx & 0xFFFFFFFF, regs.rcx, self._read_string(vcpu, regs.rsi)))
        if call == layout.CALL_SYNC:
            value = regs.rbx & 0xFFFFFFFF
            self.syncs.append(value)
            if self.on_sync is not None:
                self.on_sync(value)
            return None
        if call == layout.CALL_PRINT:
            self._emit(self._read_string(vcpu, regs.rsi).encode())
            return None
        raise UnexpectedExit(f"unknown call {call:#x} on the call port", CpuState.capture(vcpu, self.memory), exit)

    def _exception_port(self, exit, vcpu):
        state = CpuState.capture(vcpu, self.memory)
        sregs = vcpu.get_sregs()
        width = code_bits(sregs) // 8
        fmt = {2: "<4H", 4: "<4I", 8: "<4Q"}[width]
        frame = read_virtual(vcpu, self.memory, sregs.ss.base + state.regs["rsp"], 4 * width)
        if len(frame) < 4 * width:
            raise GuestException("the guest took an exception but its stack is unreadable", state, exit,
                                 vector=-1, error_code=0, rip=state.regs["rip"])
        vector, error_code, rip, cs = struct.unpack(fmt, frame)
        vector &= 0xFF
        cr2 = f", cr2={state.control['cr2']:#x}" if vector == 14 else ""
        raise GuestException(
            f"guest exception {vector_name(vector)} (vector {vector}) at rip={rip:#x} cs={cs:#x}, "
            f"error code {error_code:#x}{cr2}; no handler in the guest",
            state, exit, vector=vector, error_code=error_code, rip=rip,
        )

    # ---- running ------------------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Stop a running :meth:`run` from any thread (it raises GuestTimeout with ``reason``)."""
        self._stop_reason = reason
        self.vcpu.kick()

    def _dispatch(self, exit, vcpu):
        if isinstance(exit, (exits.IoOut, exits.IoIn)):
            handler = self.bus.port_handler(exit.port)
        elif isinstance(exit, (exits.MmioWrite, exits.MmioRead)):
            handler = self.bus.mmio_handler(exit.gpa)
        else:
            handler = None
        if handler is None:
            self._unexpected(exit, vcpu)
        return handler(exit, vcpu)

    def _unexpected(self, exit, vcpu):
        state = CpuState.capture(vcpu, self.memory)
        if isinstance(exit, exits.Shutdown):
            raise TripleFault("the guest triple-faulted (KVM_EXIT_SHUTDOWN)", state, exit)
        if isinstance(exit, exits.Intr) and self._stop_reason:
            raise GuestTimeout(self._stop_reason, state, exit)
        if isinstance(exit, exits.Intr):
            return None  # a signal meant for someone else: go on
        if isinstance(exit, exits.Hlt):
            raise UnexpectedExit("the guest halted with nothing to wake it (HLT, no interrupts)", state, exit)
        raise UnexpectedExit(f"unexpected exit: {describe_exit(exit)}", state, exit)

    def run(self, timeout: float | None = None) -> Outcome:
        """Run the guest until it says DONE or FAIL. Raises :class:`GuestError` for anything else."""
        self._stop_reason = None
        timer = None
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, not {timeout}")
            timer = threading.Timer(timeout, self.stop, (f"the guest ran past the {timeout:g} s timeout",))
            timer.daemon = True
            timer.start()
        start = time.monotonic()
        vcpu, trace = self.vcpu, self.trace
        try:
            while True:
                exit = vcpu.run()
                self.exit_count += 1
                if trace is not None:
                    trace(exit)
                if self._stop_reason:
                    self._unexpected(exits.Intr(), vcpu)
                result = self._dispatch(exit, vcpu) if not isinstance(exit, exits.Intr) else self._unexpected(exit, vcpu)
                if isinstance(result, Outcome):
                    return Outcome(result.status, result.failure, self.exit_count, time.monotonic() - start)
        except KeyboardInterrupt:
            raise GuestInterrupted("interrupted (Ctrl-C)", CpuState.capture(vcpu, self.memory)) from None
        finally:
            if timer is not None:
                timer.cancel()
            if self.console is not None:
                self.console.flush()


def default_console() -> BinaryIO:
    return sys.stdout.buffer
