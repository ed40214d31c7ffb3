"""The host's own CPUID (executed from Python, or read from /dev/cpu/0/cpuid) and MSRs."""

from __future__ import annotations

import errno
import mmap
import platform
import types
from pathlib import Path

import pytest

from pykvm.probe import hostcpu
from pykvm.probe.cpuid import CpuidRegs, summarize, vendor
from pykvm.probe.dump import read_dump

from dumps import (
    ALDER_LAKE_N,
    BARCELONA,
    CONROE,
    FIXTURES,
    GRANITE_RIDGE,
    HASWELL_EP,
    SAPPHIRE_RAPIDS,
    SUMMIT_RIDGE,
    WINDSOR,
    ZHAOXIN,
)

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="executes CPUID: x86-64 only")
CPUID_DEV = Path("/dev/cpu/0/cpuid")
MSR_DEV = Path("/dev/cpu/0/msr")


def proc_cpuinfo() -> tuple[str, set[str]]:
    """vendor_id and the flags of the first processor in /proc/cpuinfo."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields["vendor_id"], set(fields["flags"].split())


def refuse_wx(monkeypatch) -> None:
    """Make the W+X mapping fail as under SELinux deny_execmem."""

    def mmap_denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    fake = types.SimpleNamespace(**{n: getattr(mmap, n) for n in ("PROT_READ", "PROT_WRITE", "PROT_EXEC", "PAGESIZE")})
    fake.mmap = mmap_denied
    monkeypatch.setattr(hostcpu, "mmap", fake)


# ---- CPUID ------------------------------------------------------------------------------------


def test_cpuid_code_is_the_documented_function():
    capstone = pytest.importorskip("capstone")
    decoder = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = [f"{i.mnemonic} {i.op_str}".strip() for i in decoder.disasm(hostcpu.CPUID_CODE, 0)]
    assert text == [
        "push rbx", "mov eax, edi", "mov ecx, esi", "mov r8, rdx", "cpuid",
        "mov dword ptr [r8], eax", "mov dword ptr [r8 + 4], ebx", "mov dword ptr [r8 + 8], ecx",
        "mov dword ptr [r8 + 0xc], edx", "pop rbx", "ret",
    ]


@x86_64_only
def test_host_cpuid_agrees_with_proc_cpuinfo():
    table, source, error = hostcpu.host_cpuid()
    assert (source, error) == (hostcpu.SOURCE_INSTRUCTION, None)
    vendor_id, flags = proc_cpuinfo()
    summary = summarize(table)
    assert summary.vendor == vendor_id
    assert summary.vmx is ("vmx" in flags)  # leaf 1 ECX[5]
    assert summary.svm is ("svm" in flags)  # 0x80000001 ECX[2]
    assert summary.hypervisor is ("hypervisor" in flags)  # leaf 1 ECX[31]
    assert summary.long_mode is ("lm" in flags)
    assert table.max_basic_leaf in table.leaves() and table.max_extended_leaf in table.leaves()
    if summary.hypervisor:
        assert summary.hypervisor_signature  # e.g. "KVMKVMKVM"


@x86_64_only
@pytest.mark.skipif(not CPUID_DEV.exists(), reason=f"{CPUID_DEV} missing (modprobe cpuid)")
def test_instruction_and_cpuid_device_agree():
    with hostcpu._instruction_reader() as read:
        direct = hostcpu.enumerate_cpuid(read)
    with hostcpu._device_reader() as read:
        device = hostcpu.enumerate_cpuid(read)
    assert set(direct) == set(device)
    # Leaf 1 EBX, 0xB/0x1F EDX and 0x8000001E carry the APIC id of whichever CPU ran CPUID.
    for leaf, reg in ((0, "eax"), (0, "ebx"), (1, "eax"), (1, "ecx"), (1, "edx"), (0x8000_0001, "ecx")):
        assert direct[(leaf, 0)].reg(reg) == device[(leaf, 0)].reg(reg)


@x86_64_only
def test_falls_back_to_the_cpuid_device_when_wx_is_refused(monkeypatch, tmp_path):
    refuse_wx(monkeypatch)
    table, source, error = hostcpu.host_cpuid()
    assert "writable+executable" in error
    if CPUID_DEV.exists():
        assert source == hostcpu.SOURCE_DEVICE
        assert vendor(table) == proc_cpuinfo()[0]
    else:
        assert table is None and "modprobe cpuid" in error


@x86_64_only
def test_no_source_left_is_an_error_not_an_exception(monkeypatch, tmp_path):
    refuse_wx(monkeypatch)
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)
    table, source, error = hostcpu.host_cpuid()
    assert (table, source) == (None, hostcpu.SOURCE_NONE)
    assert "writable+executable" in error and "modprobe cpuid" in error


def test_other_architectures_say_so(monkeypatch):
    monkeypatch.setattr(hostcpu.platform, "machine", lambda: "aarch64")
    table, source, error = hostcpu.host_cpuid()
    assert table is None and source == hostcpu.SOURCE_NONE
    assert "x86-64" in error and "aarch64" in error


@pytest.mark.parametrize(
    "name",
    [CONROE, HASWELL_EP, ALDER_LAKE_N, SAPPHIRE_RAPIDS, WINDSOR, BARCELONA, SUMMIT_RIDGE, GRANITE_RIDGE, ZHAOXIN],
)
def test_enumeration_finds_every_leaf_of_a_real_dump(name):
    """Replaying a dump (absent entries read as zeros), the walk finds each non-zero entry it holds."""
    dump = read_dump(FIXTURES / name).cpus[0].cpuid
    zeros = CpuidRegs(0, 0, 0, 0)
    walked = hostcpu.enumerate_cpuid(lambda leaf, sub: dump.get_regs(leaf, sub) or zeros)
    missed = {key for key, regs in dump.items() if regs != zeros and walked.get(key) != regs}
    assert not missed
    assert max(len(walked.subleaves(leaf)) for leaf in walked.leaves()) < hostcpu.MAX_SUBLEAVES


def test_enumeration_is_bounded_whatever_the_cpu_answers():
    """A CPU answering all-ones everywhere still gives a finite table."""
    walked = hostcpu.enumerate_cpuid(lambda leaf, sub: CpuidRegs(*[0xFFFF_FFFF] * 4))
    assert len(walked.leaves()) <= hostcpu.MAX_LEAVES_PER_RANGE
    assert all(len(walked.subleaves(leaf)) <= hostcpu.MAX_SUBLEAVES for leaf in walked.leaves())


# ---- MSRs -------------------------------------------------------------------------------------


def fake_msr_file(root: Path, values: dict[int, int]) -> None:
    """A /dev/cpu/0/msr stand-in: a sparse file with each value at offset = index."""
    (root / "0").mkdir()
    with open(root / "0" / "msr", "wb") as f:
        for index, value in values.items():
            f.seek(index)
            f.write(value.to_bytes(8, "little"))


def test_msrs_from_a_fake_device(monkeypatch, tmp_path):
    fake_msr_file(tmp_path, {0x10: 0x1234, 0x480: 0xDA0400000010})
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)
    values, error = hostcpu.read_host_msrs([0x10, 0x480, 0x4_0000])  # the last is past the end: absent
    assert error is None
    assert values == {0x10: 0x1234, 0x480: 0xDA0400000010}


def test_missing_msr_device_says_load_the_module(monkeypatch, tmp_path):
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)
    values, error = hostcpu.read_host_msrs([0x480])
    assert values == {}
    assert "modprobe msr" in error and str(tmp_path / "0" / "msr") in error


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_msr_device_without_permission_says_needs_root(monkeypatch, tmp_path, code):
    fake_msr_file(tmp_path, {0x10: 1})
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)

    def denied(path):
        raise PermissionError(code, "denied", str(path))

    monkeypatch.setattr(hostcpu, "_open", denied)  # as root, file modes alone would not stop us
    values, error = hostcpu.read_host_msrs([0x10], cpu=0)
    assert values == {}
    assert "needs root (CAP_SYS_RAWIO)" in error and "/0/msr" in error


def test_an_msr_the_cpu_lacks_is_absent(monkeypatch, tmp_path):
    fake_msr_file(tmp_path, {0x10: 7})
    monkeypatch.setattr(hostcpu, "DEV_CPU", tmp_path)
    real_pread = hostcpu.os.pread

    def pread(fd, size, offset):
        if offset == 0x480:
            raise OSError(errno.EIO, "Input/output error")  # what the msr driver says on a #GP
        return real_pread(fd, size, offset)

    monkeypatch.setattr(hostcpu.os, "pread", pread)
    assert hostcpu.read_host_msrs([0x480, 0x10]) == ({0x10: 7}, None)


def test_msr_index_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match="out of range"):
        hostcpu.read_host_msrs([1 << 32])


@pytest.mark.skipif(not MSR_DEV.exists(), reason=f"{MSR_DEV} missing (modprobe msr)")
def test_real_tsc_msr():
    values, error = hostcpu.read_host_msrs([0x10])  # IA32_TIME_STAMP_COUNTER
    if error and "needs root" in error:
        pytest.skip(error)
    assert error is None and values[0x10] > 0
