"""Shared fixtures: the `kvm` marker's skip, pykvm's built guests, and the backend in use."""

from __future__ import annotations

import functools

import pytest

from pykvm.images import ImageError, guest_image
from pykvm.ioctl import KvmUnavailableError
from pykvm.probe.host import kvm_backend
from pykvm.system import Kvm


@functools.lru_cache(maxsize=None)
def kvm_unavailable_reason() -> str | None:
    try:
        Kvm().close()
    except KvmUnavailableError as e:
        return e.strerror
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs /dev/kvm: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest():
    """``guest(name)`` -> the bytes of pykvm's guest ``guests/NAME.S``, built with make if needed."""

    @functools.lru_cache(maxsize=None)
    def load(name: str) -> bytes:
        try:
            return guest_image(name).read_bytes()
        except ImageError as e:
            pytest.fail(f"guest {name} is not built and cannot be built here ({e}); run `make guests`")

    return load


@pytest.fixture(scope="session")
def backend() -> str | None:
    """The module serving /dev/kvm: kvm_intel, kvm_amd, kvm_pvm (or None)."""
    return kvm_backend()


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k
