"""Building pykvm's own guests: make runs when a source changed since it last ran for a target,
and not otherwise (pykvm run would pay it each time)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from pykvm import images

MAKEFILE = """\
BUILD ?= build
$(BUILD)/%.bin: %.S
\techo $* >> $(BUILD)/make.log
\tcp $< $@
"""


@pytest.fixture
def source(tmp_path, monkeypatch):
    if shutil.which("make") is None:
        pytest.skip("no make")
    (tmp_path / "Makefile").write_text(MAKEFILE)
    (tmp_path / "a.S").write_text("one\n")
    (tmp_path / "b.S").write_text("two\n")
    monkeypatch.setattr(images, "guests_dir", lambda: tmp_path)
    monkeypatch.setattr(images, "BUILD_TOOLS", ("make",))
    return tmp_path


def _made(source) -> list[str]:
    log = source / "build" / "make.log"
    return log.read_text().split() if log.exists() else []


def _later(path) -> None:
    t = time.time() + 2
    os.utime(path, (t, t))


def test_make_runs_once_then_again_only_after_a_source_changes(source):
    assert images.guest_image("a").read_text() == "one\n"
    assert images.guest_image("a").read_text() == "one\n"
    assert _made(source) == ["a"]  # the second call did not run make
    (source / "a.S").write_text("changed\n")
    _later(source / "a.S")
    assert images.guest_image("a").read_text() == "changed\n"
    assert _made(source) == ["a", "a"]


def test_another_source_changing_brings_make_back_but_it_rebuilds_nothing_more(source):
    images.guest_image("a")
    now = time.time()
    os.utime(images._stamp(source / "build" / "a.bin"), (now - 100, now - 100))
    os.utime(source / "b.S", (now - 50, now - 50))  # changed after make last looked at a.bin
    assert not images._up_to_date([source / "build" / "a.bin"], source)
    images.guest_image("a")  # make is asked again (it knows what depends on what): a.bin stays
    assert _made(source) == ["a"]
    assert images._up_to_date([source / "build" / "a.bin"], source)


def test_a_deleted_target_is_built_again(source):
    images.guest_image("b")
    (source / "build" / "b.bin").unlink()
    assert images.guest_image("b").read_text() == "two\n"
    assert _made(source) == ["b", "b"]
