"""The `medgcsam` command: a thin typer layer; every command calls a Python API function.

Each subpackage owns its commands in its own `cli.py` and is registered here.
"""

from __future__ import annotations

import os

import typer

from medgcsam.data.cli import manifest_app
from medgcsam.engine.cli import train_command
from medgcsam.evaluation.cli import evaluate_command
from medgcsam.evaluation.external_cli import validate_external_command
from medgcsam.experiments.cli import experiment_command
from medgcsam.inference.cli import predict_command
from medgcsam.sharpness.cli import landscape_command, sharpness_command

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, track, evaluate and serve medical-image classifiers with GCSAM.")


@app.callback()
def _root() -> None:
    """Keeps `medgcsam <command>` a command group even while only one command is registered."""

# --- command registration (one line per subpackage) ---
app.command("train")(train_command)
app.command("predict")(predict_command)
app.command("experiment")(experiment_command)
app.command("evaluate")(evaluate_command)
app.command("validate-external")(validate_external_command)
app.command("sharpness")(sharpness_command)
app.command("landscape")(landscape_command)
app.add_typer(manifest_app, name="manifest")
