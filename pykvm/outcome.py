"""How a guest run ends by the guest's own word: data, not exceptions (see DESIGN.md).

Devices return an :class:`Outcome` from their handler to end a run (the call port's DONE / FAIL,
isa-debug-exit, a reset); the machine's loop returns it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuestFailure:
    """What the guest said with FAIL: source line, a value, and a message (often file: expression)."""

    line: int
    value: int
    message: str

    def __str__(self) -> str:
        return f"guest FAIL at line {self.line}: {self.message or '(no message)'} (value {self.value:#x})"


@dataclass(frozen=True)
class Outcome:
    """How a run ended by the guest's own word: DONE(status) or FAIL (status 1, ``failure`` set),
    or a device's (``via`` names it: "isa-debug-exit", "acpi", ...; "done" for the call port).
    :func:`pykvm.status.of_outcome` turns it into the process exit status."""

    status: int
    failure: GuestFailure | None = None
    exits: int = 0
    seconds: float = 0.0
    via: str = "done"

    @property
    def exit_status(self) -> int:
        """The process exit status ``pykvm run`` gives for this outcome (see :mod:`pykvm.status`)."""
        from .status import of_outcome

        return of_outcome(self)

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.failure is None
