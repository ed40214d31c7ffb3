"""The base every KVM file-descriptor class shares: ownership of one fd."""

from __future__ import annotations

import os

from .ioctl import ioctl


class FdObject:
    """Owns one file descriptor: ``fileno()``, an idempotent ``close()``, a context manager."""

    _fd: int = -1

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ioctl(self, name: str, arg=0) -> int:
        # A closed object passes -1: the kernel answers EBADF, as for any closed fd.
        return ioctl(self._fd, name, arg)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
