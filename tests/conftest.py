"""Shared fixtures: pykvm's built guests and the backend in use.

The `kvm` marker (skip with the reason where /dev/kvm is missing; --kvm-required makes that a
failure) comes from pykvm's own pytest plugin, pykvm/testing.py.
"""

from __future__ import annotations

import functools

import pytest

from pykvm.images import ImageError, guest_image
from pykvm.probe.host import kvm_backend
from pykvm.system import Kvm

# Loaded by its pytest11 entry point where pykvm is installed (then this line does nothing: the
# entry point has the module's name); this covers PYTEST_DISABLE_PLUGIN_AUTOLOAD and checkouts.
pytest_plugins = ["pykvm.testing"]


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
