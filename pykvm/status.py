"""Exit statuses: how a guest run (``pykvm run``, ``pykvm-qemu``, the pytest plugin) ends, as a number.

A guest reports through a device, and pykvm reports its own outcomes, with numbers that never
meet, so that a runner that only reads the status cannot take a crashed guest for a pass:

====================  ==========================================================================
status                meaning
====================  ==========================================================================
0                     the guest said DONE(0) on pykvm's call port, or powered off (ACPI S5), as
                      on QEMU
1-63                  the guest said DONE(status) (pykvm's call port takes 0-63)
odd, 1-255            QEMU's ``isa-debug-exit``: the guest wrote ``value``; ``(value << 1) | 1``,
                      low 8 bits. kvm-unit-tests' runners read 1 (value 0) as a pass
64                    bad input, refused before any guest ran: usage, a missing or malformed
                      image, an address outside guest memory (``pykvm-qemu``: 1, as QEMU)
66                    this host cannot run it: no /dev/kvm, no permission, KVM (or its backend)
                      lacks what the guest needs
68                    a KVM call failed while the guest was being built or run (a host failure)
70                    the guest said FAIL(line, value, message) on pykvm's call port, or DONE with a
                      status outside 0-63
72                    the guest stopped unexpectedly: a triple fault, an exception vector it has no
                      handler for, an exit nobody handles (``--strict``), a device handler that raised
74                    the guest ran past ``--timeout`` and was stopped
76                    the guest moved away (live migration): it runs on at the destination, whose
                      status is the guest's
130                   interrupted (Ctrl-C), as shells count SIGINT
====================  ==========================================================================

Every status pykvm gives of its own is even and at least 64, so no guest reaches one: the debug
exit device gives only odd numbers and the call port's DONE only 0-63. Each non-zero one comes
with one line on stderr that says what happened (with the registers, for a guest that stopped).
"""

from __future__ import annotations

OK = 0
DONE_MAX = 63  # the largest status DONE(status) gives as it is
USAGE = 64
UNAVAILABLE = 66
HOST_FAILURE = 68
GUEST_FAILED = 70
GUEST_STOPPED = 72
TIMEOUT = 74
MIGRATED = 76
INTERRUPTED = 130

#: status -> what it means, for ``--help`` texts, the README table and the tests
MEANINGS = {
    OK: "the guest said DONE(0) or powered off",
    USAGE: "bad input, refused before any guest ran",
    UNAVAILABLE: "this host cannot run it (no /dev/kvm, no permission, KVM lacks what it needs)",
    HOST_FAILURE: "a KVM call failed (host failure)",
    GUEST_FAILED: "the guest said FAIL (or DONE with a status outside 0-63)",
    GUEST_STOPPED: "the guest stopped unexpectedly (triple fault, unhandled exception or exit)",
    TIMEOUT: "the guest ran past its timeout",
    MIGRATED: "the guest moved to another pykvm (live migration); its outcome is the destination's",
    INTERRUPTED: "interrupted (Ctrl-C)",
}


def of_outcome(outcome) -> int:
    """The exit status of a run the guest ended (an :class:`~pykvm.outcome.Outcome`)."""
    if outcome.failure is not None:
        return GUEST_FAILED
    if outcome.via == "migrated":  # not the guest's word: the destination's status is
        return MIGRATED
    if outcome.via == "isa-debug-exit":
        return outcome.status & 0xFF  # (value << 1) | 1: always odd
    if 0 <= outcome.status <= DONE_MAX:
        return outcome.status
    return GUEST_FAILED


def of_error(error: BaseException) -> int:
    """The exit status of a run that ended in a :class:`~pykvm.machine.GuestError` or a host failure."""
    from .ioctl import KvmError, KvmUnavailableError, KvmUnsupportedError
    from .machine import GuestError, GuestInterrupted, GuestTimeout

    if isinstance(error, (GuestInterrupted, KeyboardInterrupt)):
        return INTERRUPTED
    if isinstance(error, GuestTimeout):
        return TIMEOUT
    if isinstance(error, GuestError):
        return GUEST_STOPPED
    if isinstance(error, (KvmUnavailableError, KvmUnsupportedError)):
        return UNAVAILABLE
    if isinstance(error, KvmError):
        return HOST_FAILURE
    if isinstance(error, (ValueError, OSError)):
        return USAGE
    raise TypeError(f"no exit status for {type(error).__name__}")


def describe(status: int) -> str:
    """What an exit status of a guest run says, in a few words."""
    if status in MEANINGS:
        return MEANINGS[status]
    if status & 1:
        return f"the guest wrote {status >> 1} (or more, in the high bits) to isa-debug-exit, or said DONE({status})"
    if status <= DONE_MAX:
        return f"the guest said DONE({status})"
    return "not a status pykvm gives"
