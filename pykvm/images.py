"""Guest images: reading a flat image file with clear errors, and building pykvm's own guests.

pykvm's guests are sources (``guests/``, installed as the package ``pykvm.guests``) built by their
Makefile with the system toolchain: into ``guests/build/`` in a source checkout (``make guests``),
or into a per-user cache when the package directory is not writable.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from importlib import resources
from pathlib import Path

DEFAULT_GUEST = "hello_long"
BUILD_TOOLS = ("make", "gcc", "ld", "objcopy")


class ImageError(ValueError):
    """A guest image that cannot be used; the message names the file and what is wrong."""


def read_image(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular image file of at most ``limit`` bytes; raises ImageError with a
    one-line reason (a FIFO or device is refused without blocking on it)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{p}: is a directory, not a guest image")
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{p}: is not a regular file (a device, FIFO or socket), not a guest image")
            if st.st_size > limit:
                raise ImageError(f"{p}: the image ({st.st_size} bytes) is larger than the {max(limit, 0)} bytes "
                                 "of guest memory it must fit in")
            data = f.read(st.st_size)
    except FileNotFoundError:
        raise ImageError(f"{p}: no such guest image") from None
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not a guest image") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read: {e.strerror}") from None
    if not data:
        raise ImageError(f"{p}: the image is empty")
    return data


def _newest_source(source: Path) -> float:
    """The newest modification time among the guests' sources (``build/`` and caches left out)."""
    newest = 0.0
    for top, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in ("build", "__pycache__")]
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(top, name)).st_mtime)
            except OSError:
                pass
    return newest


def _stamp(target: Path) -> Path:
    return target.parent / ".made" / target.name


def _up_to_date(targets: list[Path], source: Path) -> bool:
    """Whether make found every target up to date (its stamp, touched after make succeeded for it)
    after the newest change to any source: then running make again (about 10 ms, most of a
    `pykvm run`) would do nothing."""
    try:
        checked = min(_stamp(t).stat().st_mtime for t in targets)
    except (OSError, ValueError):
        return False
    if not all(t.is_file() for t in targets):
        return False
    return checked >= _newest_source(source)


def _mark_made(targets: list[Path], when: float) -> None:
    """Stamp the targets as checked at ``when`` (make's start: a source changed while it ran is
    newer than the stamp and brings make back)."""
    for target in targets:
        try:
            _stamp(target).parent.mkdir(exist_ok=True)
            _stamp(target).touch()
            os.utime(_stamp(target), (when, when))
        except OSError:
            pass  # only a cache: make runs again next time


def guests_dir() -> Path:
    """Where pykvm's guest sources and their Makefile are."""
    return Path(str(resources.files("pykvm.guests")))


def _build_dir(source: Path) -> Path:
    build = source / "build"
    if os.access(source, os.W_OK):
        return build
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pykvm" / "guests"
    return cache


def guest_image(name: str = DEFAULT_GUEST) -> Path:
    """Path of pykvm's built guest ``name`` (``guests/NAME.S``), building it first if needed."""
    source = guests_dir()
    if not (source / f"{name}.S").is_file():
        known = sorted(p.stem for p in source.glob("*.S"))
        raise ImageError(f"no built-in guest {name!r} (known: {', '.join(known)})")
    return built(f"{name}.bin", what=f"guest {name}")


def built(*names: str, what: str | None = None) -> Path:
    """Path of the first of ``names`` (files make builds in the guests' build directory), building
    them first if needed (an :class:`ImageError` if that is impossible or fails)."""
    source = guests_dir()
    build = _build_dir(source)
    targets = [build / n for n in names]
    what = what or ", ".join(names)
    if _up_to_date(targets, source):
        return targets[0]
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        if all(t.is_file() for t in targets):
            return targets[0]
        raise ImageError(
            f"building {what} needs {', '.join(missing)}: install make, gcc and binutils "
            "(apt-get install build-essential), or run `make guests` where they are"
        )
    build.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = subprocess.run(
        ["make", "-s", "-C", str(source), f"BUILD={build}", *map(str, targets)], capture_output=True, text=True
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ImageError(f"building {what} failed: {detail[-1] if detail else 'make failed'}")
    _mark_made(targets, started)
    return targets[0]
