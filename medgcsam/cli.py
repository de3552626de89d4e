"""The `medgcsam` command: a thin typer layer; every command calls a Python API function.

Each subpackage owns its commands in its own `cli.py` and is registered here.
"""

from __future__ import annotations

import os

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, track, evaluate and serve medical-image classifiers with GCSAM.")

# --- command registration (one line per subpackage) ---
