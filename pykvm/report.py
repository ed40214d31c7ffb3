"""A readable snapshot of a stopped vCPU: registers, mode, and the bytes (and instruction) at RIP."""

from __future__ import annotations

from dataclasses import dataclass

from .ioctl import KvmError
from .memory import GuestMemoryError
from .x86.modes import code_bits, cpu_mode

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "efer")


def read_virtual(vcpu, memory, gva: int, size: int) -> bytes:
    """Read ``size`` bytes at guest-linear ``gva``, page by page through KVM_TRANSLATE.

    Stops early (returns fewer bytes) at the first unmapped page or non-RAM address."""
    out = bytearray()
    while len(out) < size:
        addr = gva + len(out)
        tr = vcpu.translate(addr)
        if not tr.valid:
            break
        chunk = min(size - len(out), 0x1000 - (addr & 0xFFF))
        try:
            out += memory.read(tr.physical_address, chunk)
        except GuestMemoryError:
            break
    return bytes(out)


def read_virtual_cstring(vcpu, memory, gva: int, limit: int = 4096) -> bytes:
    """A NUL-terminated string at guest-linear ``gva`` (at most ``limit`` bytes)."""
    data = read_virtual(vcpu, memory, gva, limit)
    return data.split(b"\0", 1)[0]


def decode(code: bytes, address: int, bits: int):
    """The first instruction of ``code`` (a capstone instruction: mnemonic, op_str, size), or None
    where capstone cannot decode it or is not installed."""
    try:
        import capstone
    except ImportError:  # capstone is a dependency; an install without it still reports bytes
        return None
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return next(capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, address), None)


def disassemble(code: bytes, address: int, bits: int) -> str:
    """The first instruction of ``code`` as text, or '' where capstone cannot decode it."""
    insn = decode(code, address, bits)
    return f"{insn.mnemonic} {insn.op_str}".strip() if insn else ""


RESET_RIP, RESET_CS = 0xFFF0, (0xF000, 0xFFFF0000)  # where an x86 CPU starts after RESET or INIT


@dataclass(frozen=True)
class CpuState:
    """Registers and the code at RIP of a vCPU, captured when a run stops."""

    regs: dict[str, int]
    segments: dict[str, tuple[int, int, int]]  # name -> (selector, base, limit)
    control: dict[str, int]
    mode: str
    bits: int
    rip_linear: int
    code: bytes

    @classmethod
    def capture(cls, vcpu, memory) -> CpuState:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        bits = code_bits(sregs)
        rip_linear = (sregs.cs.base + regs.rip) & (0xFFFFFFFFFFFFFFFF if bits == 64 else 0xFFFFFFFF)
        try:
            code = read_virtual(vcpu, memory, rip_linear, 16)
        except KvmError:
            code = b""
        return cls(
            regs={name: getattr(regs, name) for name in GPRS + ("rip", "rflags")},
            segments={name: (s.selector, s.base, s.limit) for name in SEGMENTS for s in [getattr(sregs, name)]},
            control={name: getattr(sregs, name) for name in CONTROL},
            mode=cpu_mode(sregs).value,
            bits=bits,
            rip_linear=rip_linear,
            code=code,
        )

    @property
    def is_reset_state(self) -> bool:
        """Whether these are the registers of a vCPU just reset (INIT/power-on: CS F000h based at
        FFFF0000h, IP FFF0h, CR0.PE clear), not of one that ran."""
        return (self.regs["rip"] == RESET_RIP and self.segments["cs"][:2] == RESET_CS
                and not self.control["cr0"] & 1)  # fmt: skip

    @property
    def instruction(self) -> str:
        return disassemble(self.code, self.rip_linear, self.bits)

    def format(self) -> str:
        """Several lines: mode, general registers, segments, control registers, code at RIP."""
        width = 16 if self.bits == 64 or self.mode == "long" else 8
        lines = [f"mode: {self.mode} ({self.bits}-bit code)"]
        names = GPRS + ("rip", "rflags")
        for i in range(0, len(names), 4):
            lines.append("  ".join(f"{n:>6}={self.regs[n]:0{width}x}" for n in names[i : i + 4]))
        lines.append("  ".join(f"{n}={sel:04x}/{base:x}" for n, (sel, base, _) in self.segments.items()))
        lines.append("  ".join(f"{n}={v:x}" for n, v in self.control.items()))
        code = self.code.hex(" ") if self.code else "(not readable)"
        insn = self.instruction
        lines.append(f"code at {self.rip_linear:#x}: {code}" + (f"   [{insn}]" if insn else ""))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "bits": self.bits,
            "regs": self.regs,
            "segments": {n: {"selector": s, "base": b, "limit": lim} for n, (s, b, lim) in self.segments.items()},
            "control": self.control,
            "rip_linear": self.rip_linear,
            "code": self.code.hex(),
            "instruction": self.instruction,
        }
