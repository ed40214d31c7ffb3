"""Exit statuses: what pykvm gives of its own never meets what a guest can give through a device."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st_

from pykvm import status
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.harness import PortHarness
from pykvm.ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError
from pykvm.machine import GuestError, GuestInterrupted, GuestTimeout, TripleFault, UnexpectedExit
from pykvm.outcome import GuestFailure, Outcome

OWN = (status.USAGE, status.UNAVAILABLE, status.HOST_FAILURE, status.GUEST_FAILED, status.GUEST_STOPPED,
       status.TIMEOUT, status.MIGRATED, status.INTERRUPTED)


def test_pykvm_s_own_statuses_are_even_distinct_and_above_what_done_gives():
    assert len(set(OWN)) == len(OWN)
    assert all(code % 2 == 0 and status.DONE_MAX < code <= 255 for code in OWN)
    assert set(status.MEANINGS) == {status.OK, *OWN}


@given(st_.integers(min_value=0, max_value=0xFFFFFFFF), st_.sampled_from([1, 2, 4]))
def test_no_isa_debug_exit_write_gives_one_of_pykvm_s_statuses(value, size):
    value &= (1 << (8 * size)) - 1
    outcome = PortHarness(DebugExit()).out(0xF4, value, size=size)
    code = outcome.exit_status
    assert code == ((value << 1) | 1) & 0xFF and code % 2 == 1 and code not in OWN


@given(st_.integers(min_value=0, max_value=0xFFFFFFFF))
def test_done_gives_its_status_up_to_63_and_guest_failed_above(n):
    code = Outcome(n).exit_status
    assert code == (n if n <= status.DONE_MAX else status.GUEST_FAILED)


def test_fail_and_the_errors_map_to_their_statuses():
    assert Outcome(1, GuestFailure(12, 0x2A, "x")).exit_status == status.GUEST_FAILED
    assert status.of_error(GuestTimeout("t")) == status.TIMEOUT
    assert status.of_error(GuestInterrupted("i")) == status.INTERRUPTED
    assert status.of_error(KeyboardInterrupt()) == status.INTERRUPTED
    for error in (GuestError("g"), UnexpectedExit("u"), TripleFault("t")):
        assert status.of_error(error) == status.GUEST_STOPPED
    assert status.of_error(KvmUnavailableError(2, "no /dev/kvm")) == status.UNAVAILABLE
    assert status.of_error(KvmUnsupportedError("no LA57")) == status.UNAVAILABLE
    assert status.of_error(KvmError(5, "KVM_RUN")) == status.HOST_FAILURE
    assert status.of_error(ValueError("bad")) == status.USAGE
    with pytest.raises(TypeError):
        status.of_error(RuntimeError("what?"))


def test_describe_names_every_kind_of_status():
    assert status.describe(1) == "the guest wrote 0 (or more, in the high bits) to isa-debug-exit, or said DONE(1)"
    assert status.describe(status.TIMEOUT) == "the guest ran past its timeout"
    assert status.describe(10) == "the guest said DONE(10)"
    assert status.describe(200) == "not a status pykvm gives"


def test_the_readme_table_lists_every_status():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code in OWN:
        assert f"\n| {code} |" in readme, code
