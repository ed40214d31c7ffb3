"""A stand-in for pykvm.devices.base.DeadlineTimer without a thread: the test fires it."""

from __future__ import annotations


class FakeTimer:
    """What DeadlineTimer offers (arm, cancel, close); ``fire()`` runs the callback as the deadline
    would and re-arms it for the deadline the callback returns."""

    def __init__(self, callback):
        self.callback = callback
        self.deadline = None
        self.closed = False

    def arm(self, deadline):
        self.deadline = deadline

    def cancel(self):
        self.deadline = None

    def close(self):
        self.closed = True
        self.deadline = None

    def fire(self):
        self.deadline = None
        following = self.callback()
        if following is not None:
            self.deadline = following
