"""pykvm.ioctl's own _IOC encoding gives what ioctl_opt (the reference it replaced at import) gives."""

from __future__ import annotations

import pytest
from ioctl_opt import IOC as reference_ioc

from pykvm import ioctl


@pytest.mark.parametrize(("direction", "nr", "size"), [(0, 0x00, 0), (1, 0x46, 32), (2, 0x81, 144), (3, 0xFF, 0x3FFF)])
def test_ioc_is_the_asm_generic_encoding(direction, nr, size):
    assert ioctl.IOC(direction, ioctl.KVMIO, nr, size) == reference_ioc(direction, ioctl.KVMIO, nr, size)


def test_every_request_matches_ioctl_opt():
    directions = {0: ioctl.IOC_NONE, 1: ioctl.IOC_WRITE, 2: ioctl.IOC_READ, 3: ioctl.IOC_READ | ioctl.IOC_WRITE}
    for name, number in ioctl.REQUESTS.items():
        direction, size, type_, nr = number >> 30, number >> 16 & 0x3FFF, number >> 8 & 0xFF, number & 0xFF
        assert type_ == ioctl.KVMIO, name
        assert number == reference_ioc(directions[direction], type_, nr, size), name


def test_out_of_range_fields_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        ioctl.IOC(ioctl.IOC_READ, ioctl.KVMIO, 0x100, 8)
    with pytest.raises(ValueError, match="out of range"):
        ioctl.IOC(ioctl.IOC_READ, ioctl.KVMIO, 1, 1 << 14)


def test_ioctl_does_not_import_ctypes():
    import subprocess
    import sys

    code = "import sys, pykvm.ioctl; print('ctypes' in sys.modules, 'ioctl_opt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
