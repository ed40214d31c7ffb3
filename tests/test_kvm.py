"""The KVM object layer on the real /dev/kvm: system, VM and vCPU ioctls and their errors."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from pykvm import exits
from pykvm.constants import Cap
from pykvm.ioctl import KvmError, KvmUnavailableError
from pykvm.machine import Machine
from pykvm.system import Kvm

pytestmark = pytest.mark.kvm


def host_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        return next(line.split(":")[1].strip() for line in f if line.startswith("vendor_id"))


def test_api_version_and_caps(kvm):
    assert kvm.get_api_version() == 12
    assert kvm.has_cap(Cap.USER_MEMORY)
    assert kvm.check_extension(Cap.NR_VCPUS) >= 1
    assert kvm.get_vcpu_mmap_size() >= 4096


def test_supported_cpuid_names_the_host_vendor(kvm):
    leaf0 = next(e for e in kvm.get_supported_cpuid() if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx)).decode()
    assert vendor == host_vendor()


def test_msr_lists(kvm):
    indices = kvm.get_msr_index_list()
    assert 0x10 in indices  # IA32_TIME_STAMP_COUNTER can always be saved and restored
    features = kvm.get_msr_feature_index_list()
    values = kvm.get_msrs(features)
    assert set(values) <= set(features)


def test_closed_fd_gives_ebadf(kvm):
    kvm.close()
    kvm.close()  # idempotent
    with pytest.raises(KvmError) as info:
        kvm.get_api_version()
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == "KVM_GET_API_VERSION"
    assert str(info.value) == "KVM_GET_API_VERSION: [Errno 9] Bad file descriptor"


def test_duplicate_vcpu_id_gives_eexist(kvm):
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0)
        assert info.value.errno == errno.EEXIST
        assert str(info.value).startswith("KVM_CREATE_VCPU: [Errno 17]")


def test_unaligned_region_gives_einval(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0, 0x1001, 0x1000, 0)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(ValueError, match="multiples of 0x1000"):
            vm.add_memory(0x1001, 0x1000)


def test_overlapping_and_duplicate_slots_are_refused_before_the_syscall(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000, slot=0)
        with pytest.raises(ValueError, match="overlaps slot 0"):
            vm.add_memory(0x8000, 0x10000)
        with pytest.raises(ValueError, match="slot 0 is already in use"):
            vm.add_memory(0x100000, 0x1000, slot=0)
        assert vm.add_memory(0x100000, 0x1000).slot == 1


def test_missing_device_says_how_to_fix():
    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/nonexistent/kvm")
    assert "modprobe kvm_intel" in info.value.strerror


def test_kick_interrupts_a_running_vcpu(guest):
    with Machine() as m:
        m.load_flat(guest("spin"), "real")
        assert isinstance(m.vcpu.run(), exits.IoOut)  # "spinning\n" starts
        result = []
        runner = threading.Thread(target=lambda: result.append(_run_until_intr(m.vcpu)))
        runner.start()
        time.sleep(0.2)
        m.vcpu.kick()
        runner.join(10)
        assert not runner.is_alive()
        assert isinstance(result[0], exits.Intr)


def _run_until_intr(vcpu):
    while True:
        exit = vcpu.run()
        if isinstance(exit, exits.Intr):
            return exit


def test_registers_round_trip(kvm):
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        regs = vcpu.get_regs()
        regs.rax, regs.r15, regs.rip = 0x1122334455667788, 0xFFFFFFFFFFFFFFFF, 0x1000
        vcpu.set_regs(regs)
        again = vcpu.get_regs()
        assert (again.rax, again.r15, again.rip) == (0x1122334455667788, 0xFFFFFFFFFFFFFFFF, 0x1000)
        sregs = vcpu.get_sregs()
        assert sregs.cs.base == 0xFFFF0000  # the reset vector's segment
        assert set(vcpu.get_msrs([0x10])) == {0x10}  # IA32_TIME_STAMP_COUNTER
