"""Writing output files so that a crash or a concurrent reader never sees half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def replace_atomically(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write beside the target and rename over it, so a reader never sees half a file. Created with ``open``
    (not ``mkstemp``, which makes 0600 files), so the result has the user's usual umask permissions."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("x", newline="", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
