"""Progress on stderr for the long commands (evaluate, validate-external, sharpness, landscape).

On a terminal: a tqdm bar. When stderr is a file or a pipe (nohup, CI, a notebook's captured output) the
same bar becomes a log line at most every 30 s, so a 9-minute command is never silent and a log file gets
one readable line per half minute instead of a carriage-return smear.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines(io.TextIOBase):
    """tqdm's ``\\r``-refreshed status as whole lines on the current ``sys.stderr``."""

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        return len(s)


def progress(iterable: Iterable[Any] | None = None, *, desc: str, unit: str, total: int | None = None) -> tqdm:
    """A bar on a terminal, else periodic log lines; both on stderr so stdout stays the command's answer."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr if tty else _Lines(),
                mininterval=0.5 if tty else LOG_INTERVAL_S, dynamic_ncols=tty, ascii=not tty)
