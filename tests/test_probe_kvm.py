"""What KVM offers: device, backend parameters, capabilities, CPUID, MSRs and binary stats."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.constants import Cap
from pykvm.ioctl import KvmError
from pykvm.probe import host
from pykvm.probe import kvm as probe
from pykvm.system import Kvm

NOWHERE = "/nonexistent/kvm"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def info() -> probe.KvmInfo:
    return probe.collect_kvm()


# ---- on this host's /dev/kvm ------------------------------------------------------------------


@pytest.mark.kvm
def test_everything_is_collected_without_errors(info, backend):
    assert dict(info.errors) == {}
    assert info.backend.module == backend
    assert info.api_version == 12
    assert info.device.exists and info.device.accessible and info.device.open_error is None
    assert info.device.mode == f"{os.stat('/dev/kvm').st_mode & 0o7777:04o}"


@pytest.mark.kvm
def test_caps_cover_every_cap_on_the_system_fd(info):
    assert set(info.caps) == {cap.name for cap in Cap}
    assert info.caps["USER_MEMORY"] >= 1
    assert info.caps["NR_VCPUS"] >= 1
    for name, value in info.vm_caps.items():  # only caps a VM answers differently are recorded
        assert info.caps[name] != value
    with Kvm() as kvm, kvm.create_vm() as vm:
        assert vm.check_extension(Cap.USER_MEMORY) == info.vm_caps.get("USER_MEMORY", info.caps["USER_MEMORY"])


@pytest.mark.kvm
def test_nested_virtualization_offered_to_guests(info):
    """A guest sees VMX/SVM (and the VMX MSRs) only where the backend runs nested."""
    assert info.supported_cpuid.max_basic_leaf is not None
    assert bool(info.vmx_msrs) == bool(info.guest_vmx)
    assert all(0x480 <= index <= 0x492 for index in info.vmx_msrs)
    assert set(info.vmx_msrs) <= set(info.feature_msrs) <= set(info.msr_feature_index_list)
    if not info.backend.nested:
        assert info.guest_vmx is False and info.guest_svm is False
        assert 0x480 not in info.feature_msrs


@pytest.mark.kvm
def test_this_machine_pvm_backend(info):
    if info.backend.module != "kvm_pvm":
        pytest.skip(f"backend is {info.backend.module}, not kvm_pvm")
    assert info.backend.params["pvm_native"] in ("Y", "N")
    assert info.backend.nested is None and info.backend.ept is None and info.backend.npt is None
    assert (info.guest_vmx, info.guest_svm) == (False, False)
    assert dict(info.vmx_msrs) == {}
    assert "halt_poll_ns" in info.backend.kvm_params


@pytest.mark.kvm
def test_the_verdict_on_this_host(backend):
    """pykvm probe's verdict against what the module itself says in /sys: on kvm_intel/kvm_amd
    VT-x/AMD-V, EPT/NPT and VPID/ASID as its parameters have them, nested as its `nested`
    parameter says, and with nested off the fix; on kvm_pvm software acceleration, no nesting.
    (make test-amd boots the kvm_amd reference host with nested=1 and again with nested=0.)"""
    from pykvm.probe.report import probe as run_probe

    verdict = run_probe().verdict
    assert verdict.usable is True
    nested = {f.topic: f for f in verdict.findings}.get("nested")
    if backend == "kvm_pvm":
        assert verdict.acceleration == "software (kvm_pvm)" and verdict.nested is False
        return
    params = Path("/sys/module", backend, "parameters")
    on = (params / "nested").read_text().strip() in ("1", "Y", "y")
    assert verdict.acceleration == {"kvm_amd": "AMD-V", "kvm_intel": "VT-x"}[backend]
    paging = (params / ("npt" if backend == "kvm_amd" else "ept")).read_text().strip() in ("1", "Y", "y")
    assert verdict.second_level_paging == ((("NPT" if backend == "kvm_amd" else "EPT")) if paging else None)
    if backend == "kvm_amd":
        assert verdict.tlb_tagging == "ASID"
    assert verdict.nested is on and nested is not None
    if on:
        assert nested.level == "ok" and "offered to them" in nested.message
    else:
        assert nested.level == "warn" and f"{backend} has nested virtualization off" in nested.message
        assert nested.fix.startswith(f"reload the module with nested=1: modprobe -r {backend} && modprobe {backend} nested=1")


@pytest.mark.kvm
def test_msr_lists(info):
    assert 0x10 in info.msr_index_list  # IA32_TIME_STAMP_COUNTER is saved and restored
    assert set(info.feature_msrs) <= set(info.msr_feature_index_list)


@pytest.mark.kvm
def test_stats_schema_of_a_vm_and_a_vcpu(info):
    vm, vcpu = info.vm_stats, info.vcpu_stats
    assert vm.id.startswith("kvm-") and vcpu.id.endswith("/vcpu-0")
    assert {"remote_tlb_flush", "remote_tlb_flush_requests", "pages_4k"} <= set(vm.names())
    assert {"exits", "halt_exits", "io_exits", "mmio_exits", "halt_wait_ns"} <= set(vcpu.names())
    assert len(set(vcpu.names())) == len(vcpu.descriptors)
    exits = vcpu.get("exits")
    assert (exits.type, exits.unit, exits.base, exits.exponent, exits.size) == ("cumulative", "none", "pow10", 0, 1)
    assert exits.value == 0  # a vCPU that never ran
    wait = vcpu.get("halt_wait_ns")
    assert (wait.unit, wait.base, wait.exponent) == ("seconds", "pow10", -9)
    hist = vcpu.get("halt_wait_hist")
    assert hist.type == "log_hist" and hist.size > 1 and len(hist.values) == hist.size
    assert vcpu.get("no_such_stat") is None
    for desc in vm.descriptors + vcpu.descriptors:
        assert not desc.type.startswith("unknown") and not desc.unit.startswith("unknown")


@pytest.mark.kvm
def test_to_json_is_plain_data_with_integer_numbers(info):
    data = json.loads(json.dumps(info.to_json()))
    assert data["api_version"] == 12 and data["caps"]["USER_MEMORY"] >= 1
    assert data["backend"]["module"] == info.backend.module
    assert all(isinstance(m["index"], int) and isinstance(m["value"], int) for m in data["feature_msrs"])
    assert {"leaf": 0, "subleaf": 0, **info.supported_cpuid[(0, 0)]._asdict()} in data["supported_cpuid"]
    assert data["vcpu_stats"]["descriptors"][0]["values"] == list(info.vcpu_stats.descriptors[0].values)


@pytest.mark.kvm
def test_collect_closes_every_fd():
    before = open_fds()
    probe.collect_kvm()
    assert open_fds() == before


@pytest.mark.kvm
def test_a_failing_step_is_recorded_and_the_rest_collected(monkeypatch):
    def refuse(self):
        raise KvmError(errno.EINVAL, "KVM_GET_SUPPORTED_CPUID")

    monkeypatch.setattr(Kvm, "get_supported_cpuid", refuse)
    info = probe.collect_kvm()
    assert info.errors == {"supported_cpuid": "KVM_GET_SUPPORTED_CPUID: [Errno 22] Invalid argument"}
    assert info.supported_cpuid is None and info.guest_vmx is None
    assert info.caps is not None and info.vcpu_stats is not None


# ---- without a usable /dev/kvm ----------------------------------------------------------------


def test_missing_device_is_reported_with_the_fix():
    info = probe.collect_kvm(path=NOWHERE)
    assert info.device.exists is False and info.device.accessible is False
    assert "does not exist" in info.device.open_error and "modprobe kvm_intel" in info.device.open_error
    assert dict(info.errors) == {"open": info.device.open_error}
    assert info.api_version is None and info.caps is None and info.vm_stats is None
    assert json.loads(json.dumps(info.to_json()))["device"]["exists"] is False


@pytest.mark.kvm
def test_device_without_permission(tmp_path):
    """A mode-000 node of the real device, probed by a process without capabilities (as a user
    outside the kvm group would be): the device is there but not accessible, and the fix is said."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (apt-get install util-linux)")
    node = tmp_path / "kvm"
    os.mknod(node, stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    code = f"import json, pykvm.probe.kvm as p; print(json.dumps(p.collect_kvm({str(node)!r}).to_json()))"
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    device = data["device"]
    assert (device["exists"], device["mode"], device["accessible"]) == (True, "0000", False)
    assert "permission denied" in device["open_error"] and "'kvm' group" in device["open_error"]
    assert data["errors"] == {"open": device["open_error"]} and data["caps"] is None


def fake_module(root, name: str, params: dict[str, str]) -> None:
    directory = root / name / "parameters"
    directory.mkdir(parents=True)
    for key, value in params.items():
        (directory / key).write_text(value + "\n")


def test_kvm_amd_parameters_print_1_and_0(monkeypatch, tmp_path):
    fake_module(tmp_path, "kvm_amd", {"nested": "1", "npt": "1", "avic": "0", "sev": "N"})
    fake_module(tmp_path, "kvm", {"halt_poll_ns": "200000"})
    (tmp_path / "kvm_amd" / "parameters" / "unreadable").mkdir()  # reading it fails: recorded as None
    monkeypatch.setattr(host, "SYS_MODULE", tmp_path)
    backend = probe.collect_kvm(path=NOWHERE).backend
    assert backend.module == "kvm_amd"
    assert dict(backend.params) == {"avic": "0", "nested": "1", "npt": "1", "sev": "N", "unreadable": None}
    assert dict(backend.kvm_params) == {"halt_poll_ns": "200000"}
    assert (backend.nested, backend.npt, backend.avic) == (True, True, False)
    assert (backend.ept, backend.vpid, backend.unrestricted_guest, backend.enable_apicv) == (None,) * 4


def test_kvm_intel_parameters_print_y_and_n(monkeypatch, tmp_path):
    params = {"nested": "Y", "ept": "Y", "vpid": "N", "unrestricted_guest": "Y", "enable_apicv": "N"}
    fake_module(tmp_path, "kvm_intel", params)
    monkeypatch.setattr(host, "SYS_MODULE", tmp_path)
    backend = probe.collect_backend()
    assert backend.module == "kvm_intel" and dict(backend.kvm_params) == {}
    assert (backend.nested, backend.ept, backend.vpid) == (True, True, False)
    assert (backend.unrestricted_guest, backend.enable_apicv, backend.npt, backend.avic) == (True, False, None, None)


def test_no_backend_module(tmp_path):
    backend = probe.collect_backend(tmp_path)
    assert backend.module is None and dict(backend.params) == {} and backend.nested is None


@pytest.mark.parametrize(
    "text, expected",
    [("Y", True), ("N", False), ("1", True), ("0", False), ("2", True), ("-1", True), ("auto", None), (None, None)],
)
def test_parse_bool(text, expected):
    assert probe.parse_bool(text) is expected


# ---- pure parts -------------------------------------------------------------------------------


def stats_blob() -> bytes:
    """A stats file as api.rst lays it out: header, id, descriptors (+ names), then u64 data."""
    name_size = 16
    descs = [
        # flags = type | unit << 4 | base << 8, exponent, size, offset, bucket_size, name
        (0x0 | 0x0 << 4, 0, 1, 0, 0, b"exits"),
        (0x1 | 0x1 << 4 | 0x1 << 8, 10, 1, 8, 0, b"pages_bytes"),  # instant, bytes, 2**10
        (0x3 | 0x2 << 4, -9, 3, 16, 100, b"wait_hist"),  # linear histogram of nanoseconds
    ]
    id_offset = 24
    desc_offset = id_offset + name_size
    data_offset = desc_offset + len(descs) * (16 + name_size)
    out = struct.pack("<6I", 0, name_size, len(descs), id_offset, desc_offset, data_offset)
    out += b"kvm-42".ljust(name_size, b"\0")
    for flags, exponent, size, offset, bucket, name in descs:
        out += struct.pack("<IhHII", flags, exponent, size, offset, bucket) + name.ljust(name_size, b"\0")
    return out + struct.pack("<5Q", 7, 3, 1, 2, 1 << 63)


def test_read_stats_parses_the_documented_layout(tmp_path):
    path = tmp_path / "stats"
    path.write_bytes(stats_blob())
    with open(path, "rb") as f:
        stats = probe.read_stats(f.fileno())
    assert stats.id == "kvm-42" and stats.names() == ("exits", "pages_bytes", "wait_hist")
    exits, pages, hist = stats.descriptors
    assert (exits.type, exits.unit, exits.base, exits.value) == ("cumulative", "none", "pow10", 7)
    assert (pages.type, pages.unit, pages.base, pages.exponent, pages.value) == ("instant", "bytes", "pow2", 10, 3)
    assert (hist.type, hist.unit, hist.exponent, hist.bucket_size) == ("linear_hist", "seconds", -9, 100)
    assert hist.values == (1, 2, 1 << 63)


def test_read_stats_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "stats"
    path.write_bytes(stats_blob()[:-8])
    with open(path, "rb") as f, pytest.raises(ValueError, match="read 32 of 40 bytes"):
        probe.read_stats(f.fileno())


class FakeKvm:
    """KVM_GET_MSRS on /dev/kvm: stops at the first MSR it cannot read, as msr_io() does."""

    def __init__(self, values: dict[int, int]):
        self.values = values
        self.calls = 0

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        self.calls += 1
        out = {}
        for index in indices:
            if index not in self.values:
                break
            out[index] = self.values[index]
        return out


def test_feature_msrs_skip_one_that_fails_and_read_the_rest():
    kvm = FakeKvm({0x10A: 1, 0x480: 2, 0x481: 3})
    assert probe._read_feature_msrs(kvm, [0x10A, 0x345, 0x480, 0x999, 0x481]) == {0x10A: 1, 0x480: 2, 0x481: 3}
    assert kvm.calls == 3
