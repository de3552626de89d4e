"""`medgcsam train PIPELINE.yaml [--set k=v ...] [--resume]`, also under ``torchrun -m medgcsam train``."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import typer

from medgcsam.config import ConfigError, load_config


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (`docker stop`, a scheduler, torchrun) takes Ctrl-C's path: the run ends KILLED, not left RUNNING."""
    raise KeyboardInterrupt


def train_command(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see pipelines/)"),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override a field: section.field=value"),
    resume: bool = typer.Option(False, "--resume", help="Continue from <output_dir>/<name>/checkpoints/last.pt"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: tracking.uri or "
                                            "sqlite under output_dir)"),
) -> None:
    """Train a classifier with the pipeline's optimizer, track it in MLflow and register the model."""
    from medgcsam.engine import FinishError, train
    from medgcsam.tracking import TrackingError

    signal.signal(signal.SIGTERM, _interrupt)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(pipeline, overrides)
        result = train(cfg, resume=resume, tracking_uri=tracking_uri)
    except (ConfigError, TrackingError, FinishError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if rank != 0:
        return
    typer.echo(f"run {result.run_id} (experiment {result.experiment_id}) finished in {result.wall_time:.1f} s; "
               f"best epoch {result.best_epoch}")
    for key in sorted(k for k in result.metrics if k.count("/") == 1):
        typer.echo(f"  {key} = {result.metrics[key]:.4f}")
    typer.echo(f"checkpoints: {result.checkpoint_dir}")
    if result.model_uri:
        typer.echo(f"model: {result.model_uri}")
    if result.registered_version and cfg.tracking.register_as:
        alias = f"@{cfg.tracking.alias}" if cfg.tracking.alias else f"/{result.registered_version}"
        typer.echo(f"registered: models:/{cfg.tracking.register_as}{alias} (version {result.registered_version})")
    from medgcsam.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg, tracking_uri)
    if uri.startswith("sqlite:"):
        typer.echo(f"look at it: mlflow ui --backend-store-uri {uri}")
