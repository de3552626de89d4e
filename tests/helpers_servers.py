"""Real server processes for tests: started in their own process group on 127.0.0.1, stopped with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: Sequence[str], ready_url: str, log_path: Path, *, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout_s: float = 120) -> Iterator[subprocess.Popen]:
    """``cmd`` running until the block ends; ready once ``ready_url`` answers 200. Its output goes to ``log_path``,
    which the error shows when it dies or never answers. Every process it started (uvicorn workers) is stopped."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd[:4])} did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group, SIGKILL after 15 s; a group already gone (the server died at start) is fine."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False
