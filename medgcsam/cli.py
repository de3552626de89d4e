"""The `medgcsam` command: a thin typer layer; every command calls a Python API function.

Each subpackage owns its commands in its own `cli.py`, registered here by name. A command's module is
imported only when that command runs (or shows its own help): importing them all pulled in torch, MLflow,
timm and MONAI, and `medgcsam --help` took 6 s and 1.1 GB.
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import Any

import click
import typer
from typer.core import TyperGroup

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (module, attribute, one-line help shown by `medgcsam --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("medgcsam.engine.cli", "train_command", "Train a pipeline end to end (MLflow run, evaluation, "
              "registered model)."),
    "predict": ("medgcsam.inference.cli", "predict_command", "Predict every image in a folder (decision, "
                "probabilities, OOD flags)."),
    "experiment": ("medgcsam.experiments.cli", "experiment_command", "Run or report a grid of trainings "
                   "(methods x seeds)."),
    "evaluate": ("medgcsam.evaluation.cli", "evaluate_command", "Clinical evaluation of a model on its "
                 "pipeline's own splits."),
    "validate-external": ("medgcsam.evaluation.external_cli", "validate_external_command", "Validate a frozen "
                          "model on another site's labelled images (new MLflow run)."),
    "sharpness": ("medgcsam.sharpness.cli", "sharpness_command", "Hessian sharpness of a model's weights."),
    "landscape": ("medgcsam.sharpness.cli", "landscape_command", "1-D/2-D loss landscape around a model's "
                  "weights."),
    "manifest": ("medgcsam.data.cli", "manifest_app", "Build, merge, split and validate image manifests."),
    "optimizers": ("medgcsam.optim.cli", "optimizers_command", "List the registered optimizers (passes per step, "
                   "authors' preset, source)."),
}
CONTEXT = {"max_content_width": 120, "help_option_names": ["-h", "--help"]}


class LazyGroup(TyperGroup):
    """Lists commands from :data:`COMMANDS` and imports one only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        target: Any = getattr(import_module(module), attr)
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)
        else:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings=CONTEXT,
                                 rich_markup_mode=None)
            single.command(cmd_name)(target)
            command = typer.main.get_command(single)
        command.name = cmd_name
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


# rich_markup_mode=None: plain click help, which wraps at 120 columns (rich boxed it at 80) and imports no rich
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=LazyGroup,
                  context_settings=CONTEXT, rich_markup_mode=None,
                  help="Train, track, evaluate and serve medical-image classifiers with GCSAM.")


@app.callback()
def _root() -> None:
    """Keeps `medgcsam <command>` a command group; the commands come from :class:`LazyGroup`."""
