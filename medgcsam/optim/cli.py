"""`medgcsam optimizers`: every registered optimizer with its passes, preset and source, read off the registry."""

from __future__ import annotations

import typer


def optimizers_command(
    markdown: bool = typer.Option(False, "--markdown", help="Print the docs table (docs/optimizers.md)"),
) -> None:
    """List the optimizers that optimizer.name (and an experiment's methods) accept."""
    from medgcsam.optim import OPTIMIZERS
    from medgcsam.optim.registry import markdown_table

    if markdown:
        typer.echo(markdown_table())
        return
    for record in OPTIMIZERS.values():
        preset = ", ".join(f"{k}={v!r}" for k, v in record.preset.items()) or "class defaults"
        graph = "" if record.capturable else "; not capturable in a CUDA graph"
        typer.echo(f"{record.name:8} {record.passes} pass(es)/step; preset {preset}{graph}\n"
                   f"         {record.description}")
