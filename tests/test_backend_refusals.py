"""What a backend refuses although KVM's supported CPUID offers it, on Intel and AMD hosts alike.

KVM_GET_SUPPORTED_CPUID says what a guest may be told; KVM_SET_SREGS may still refuse the state
(kvm_pvm on Intel hosts offers LA57 and refuses CR4.LA57 with EINVAL; it drops CR0.PG outside
long mode on every host). pykvm names the backend and the refused part in one line, exit 4.

The offline tests use a stand-in vCPU that refuses as a backend would; the KVM tests ask this
host's KVM. ``data/kvm/supported_cpuid_xeon_kvm_pvm.txt`` is KVM_GET_SUPPORTED_CPUID of an Intel
host and ``data/cpuid_r_epyc.txt`` the CPUID of a guest on an AMD host (see data/kvm/README.md),
so the CPUID edits are checked against both vendors' shapes whatever this host is.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm import status
from pykvm._ffi import ffi
from pykvm.ioctl import KvmError, KvmUnsupportedError
from pykvm.probe.dump import read_dump
from pykvm.system import CpuidEntry
from pykvm.x86 import cpuid, modes
from pykvm.x86.modes import CR0_PG, CR4_LA57, Mode, setup_mode

DATA = Path(__file__).resolve().parent / "data"
INTEL_KVM = DATA / "kvm" / "supported_cpuid_xeon_kvm_pvm.txt"
AMD_GUEST = DATA / "cpuid_r_epyc.txt"


class RefusingVcpu:
    """Registers in cffi structures, as a vCPU has them; ``refuse(sregs)`` says whether
    KVM_SET_SREGS fails with EINVAL."""

    def __init__(self, refuse):
        self.sregs = ffi.new("struct kvm_sregs *")
        self.regs = ffi.new("struct kvm_regs *")
        self.refuse = refuse
        self.refusals = 0

    def get_sregs(self):
        copy = ffi.new("struct kvm_sregs *")
        ffi.memmove(copy, self.sregs, ffi.sizeof("struct kvm_sregs"))
        return copy

    def set_sregs(self, sregs) -> None:
        if self.refuse(sregs):
            self.refusals += 1
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS")
        ffi.memmove(self.sregs, sregs, ffi.sizeof("struct kvm_sregs"))

    def get_regs(self):
        return self.regs

    def set_regs(self, regs) -> None:
        self.regs = regs


class Memory:
    def write(self, gpa: int, data: bytes) -> None:
        pass


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr("pykvm.probe.host.kvm_backend", lambda: "kvm_test")


def test_a_refused_la57_is_named_with_the_backend(backend):
    vcpu = RefusingVcpu(lambda s: s.cr4 & CR4_LA57)
    with pytest.raises(KvmUnsupportedError) as e:
        setup_mode(vcpu, Memory(), Mode.LONG, 0x100000, la57=True)
    assert str(e.value).startswith("kvm_test cannot run long mode with 5-level paging (CR4.LA57): "
                                   "KVM_SET_SREGS refused it (EINVAL)")
    assert isinstance(e.value.__cause__, KvmError)
    assert vcpu.refusals == 1  # the retry without LA57 was accepted: that is how the part is named


def test_refused_paging_outside_long_mode_is_named(backend):
    vcpu = RefusingVcpu(lambda s: s.cr0 & CR0_PG and not s.efer & modes.EFER_LMA)
    for mode in (Mode.PAGED, Mode.PAE):
        with pytest.raises(KvmUnsupportedError, match=rf"kvm_test cannot run {mode.value} mode with "
                                                      r"paging outside long mode \(CR0.PG\)"):  # fmt: skip
            setup_mode(vcpu, Memory(), mode, 0x100000)


def test_a_state_refused_whole_is_a_host_failure_not_a_backend_limit(backend):
    vcpu = RefusingVcpu(lambda s: True)
    with pytest.raises(KvmError, match="KVM_SET_SREGS"):
        setup_mode(vcpu, Memory(), Mode.LONG, 0x100000, la57=True)
    with pytest.raises(KvmError):
        setup_mode(vcpu, Memory(), Mode.LONG, 0x100000)  # nothing optional to leave out: no retry
    assert vcpu.refusals == 3


def test_an_accepted_state_is_loaded():
    vcpu = RefusingVcpu(lambda s: False)
    setup_mode(vcpu, Memory(), Mode.LONG, 0x123000, la57=True)
    assert vcpu.sregs.cr4 & CR4_LA57 and vcpu.regs.rip == 0x123000


def _entries(path: Path) -> list[CpuidEntry]:
    table = read_dump(path).cpuid
    return [CpuidEntry(leaf, sub, 0, *regs) for (leaf, sub), regs in table.items()]


def _reg(entries, leaf: int, name: str) -> int:
    return next(getattr(e, name) for e in entries if e.function == leaf and e.index == 0)


def _l1_finds_svm(entries) -> bool:
    """The SVM L1's check (guests/nested/svm.c): the extended range reaches 8000_000Ah and
    CPUID 8000_0001h:ECX[2] is set."""
    return _reg(entries, 0x8000_0000, "eax") >= 0x8000_000A and bool(_reg(entries, 0x8000_0001, "ecx") & 4)


@pytest.mark.parametrize("source", [INTEL_KVM, AMD_GUEST], ids=["intel", "amd"])
def test_advertised_svm_is_whole_on_either_vendors_cpuid(source):
    entries = _entries(source)
    assert not _l1_finds_svm(entries)  # neither offers SVM to its guests
    svm = cpuid.advertise(entries, "svm")
    assert _l1_finds_svm(svm)
    assert [(e.eax, e.ebx, e.ecx, e.edx) for e in svm if e.function == 0x8000_000A] == [cpuid.DEFAULT_SVM_LEAF]
    # nothing else changed, and the input list is untouched
    others = {(e.function, e.index): e for e in svm if e.function not in (0x8000_0000, 0x8000_0001, 0x8000_000A)}
    assert others == {(e.function, e.index): e for e in entries
                      if e.function not in (0x8000_0000, 0x8000_0001, 0x8000_000A)}  # fmt: skip
    assert not _l1_finds_svm(entries)


def test_the_intel_hosts_kvm_stops_below_the_svm_leaf():
    # Why advertising SVM needs more than one bit there: the shape the Intel host's KVM had
    entries = _entries(INTEL_KVM)
    assert _reg(entries, 0x8000_0000, "eax") == 0x8000_0008
    assert not any(e.function == 0x8000_000A for e in entries)
    assert cpuid.has_la57(entries)  # and it offers LA57, which its backend refuses


@pytest.mark.parametrize("source", [INTEL_KVM, AMD_GUEST], ids=["intel", "amd"])
def test_both_vendors_kvm_offer_x2apic_which_the_smp_guest_turns_on(source):
    assert _reg(_entries(source), 1, "ecx") & cpuid.X2APIC_ECX_BIT


def test_a_given_svm_leaf_and_vmx():
    entries = _entries(AMD_GUEST)
    svm = cpuid.advertise(entries, "svm", svm_leaf=(1, 8, 0, 1))
    assert [(e.eax, e.ebx, e.edx) for e in svm if e.function == 0x8000_000A] == [(1, 8, 1)]
    kvm_amd = cpuid.advertise(svm, "svm")  # a leaf with a revision is KVM's own: kept
    assert [(e.eax, e.ebx, e.edx) for e in kvm_amd if e.function == 0x8000_000A] == [(1, 8, 1)]
    for source in (INTEL_KVM, AMD_GUEST):
        vmx = cpuid.advertise(_entries(source), "vmx")
        assert _reg(vmx, 1, "ecx") & cpuid.VMX_ECX_BIT
    with pytest.raises(ValueError, match="'vmx' or 'svm'"):
        cpuid.advertise(entries, "tdx")


@pytest.mark.kvm
def test_pykvm_run_la57_answers_in_one_line_on_every_host(kvm_backend):
    from pykvm.system import Kvm

    with Kvm() as kvm:
        offered = cpuid.has_la57(kvm.get_supported_cpuid())
    proc = subprocess.run([sys.executable, "-m", "pykvm", "run", "--la57"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    if proc.returncode == 0:
        assert offered and proc.stdout == "Hello from long mode\n"
        return
    assert proc.returncode == status.UNAVAILABLE, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: ")
    if offered:
        assert f"{kvm_backend} cannot run long mode with 5-level paging (CR4.LA57)" in lines[0]
    else:
        assert "offers no LA57" in lines[0]
