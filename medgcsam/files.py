"""Writing output files so that a crash or a concurrent reader never sees half of one.

Every temporary file is named ``.<target name>.<random>.tmp`` beside its target, so that a process
which owns the target (under :func:`exclusive_lock`, or as the only writer of a run folder) can find and
remove the ones a killed predecessor left (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

PAUSE_ENV = "MEDGCSAM_TEST_PAUSE_AT"  # "<point>" or "<point>#<n>" (its n-th visit)
PAUSE_MARKER_ENV = "MEDGCSAM_TEST_PAUSE_MARKER"  # file written when the pause begins
_pause_counts: dict[str, int] = {}


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it."""


def temp_path(path: Path) -> Path:
    """Where a new version of ``path`` is written before it is renamed over it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(*paths: Path) -> list[Path]:
    """Delete the temporary files of ``paths`` that killed writers left; only for the owner of ``paths``."""
    removed = []
    for path in paths:
        pattern = re.compile(rf"\.{re.escape(path.name)}\.\w+\.tmp")  # also mkstemp's names of earlier versions
        if not path.parent.is_dir():
            continue
        for candidate in path.parent.iterdir():
            if pattern.fullmatch(candidate.name) and candidate.is_file():
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def replace_atomically(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write beside the target and rename over it, so a reader never sees half a file. Created with ``open``
    (not ``mkstemp``, which makes 0600 files), so the result has the user's usual umask permissions."""
    tmp = temp_path(path)
    try:
        with tmp.open("x", newline="", encoding="utf-8") as fh:
            write(fh)
        pause_point(f"replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pause_point(name: str) -> None:
    """Test hook for crash tests: when ``MEDGCSAM_TEST_PAUSE_AT`` names this point (``name`` or ``name#n`` for
    its n-th visit), write the marker file and sleep, so that a test can SIGKILL the process exactly here.
    The marker is also a latch: while it exists no other process pauses (a retried Ray task inherits the
    environment of the one killed; the test deletes the marker to arm the hook again).
    Costs one environment lookup otherwise."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _pause_counts[name] = _pause_counts.get(name, 0) + 1
    if nth and _pause_counts[name] != int(nth):
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(f"{os.getpid()}\n", encoding="utf-8")
    while True:
        time.sleep(60)


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str, fix: str, error: type[Exception] = LockedError) -> Iterator[None]:
    """Hold ``path`` (a lock file holding our pid) while writing ``what``; a second process is refused with
    ``error`` naming the holder and the ``fix``. ``flock`` dies with its process, so a lock left by a killed job
    is stale by construction and simply taken over; the file is removed on release."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise error(f"{what} is being written by another process ({holder}, lock file {path}); {fix}") from None
        try:  # the holder may have released (and removed) the file between our open and our flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
