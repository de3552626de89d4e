"""`medgcsam experiment FILE`: run (or resume) a comparison grid or selection protocol and write its report.

Cells run as Ray tasks: on a local Ray instance started here (``--workers N`` cells at once), or on an existing
cluster (``--address`` / ``RAY_ADDRESS``). Exit codes: 0 all planned cells finished and reported; 1 some cells
failed (the rest are kept; run the same command again to retry); 2 invalid experiment file or tracking store
(nothing ran); 3 some cells are still pending; the report covers the finished ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from medgcsam.config import ConfigError
from medgcsam.tracking.uri import TrackingError

from .runner import Experiment, ExperimentError, describe


def experiment_command(
    path: Path = typer.Argument(..., help="Experiment YAML, e.g. pipelines/paper/busi_cpu_comparison.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="Override a field of the experiment file (a.b=value)"),
    cells: list[str] = typer.Option([], "--cell", help="Run only this cell (id or plan index), on Ray like "
                                     "the others, and write no report; repeatable"),
    workers: int | None = typer.Option(None, min=1, help="Cells trained at once (default: 1 on the local Ray "
                                       "instance, what the cluster fits with --address)"),
    address: str | None = typer.Option(None, help="Ray cluster to submit to: 'auto' or HOST:PORT of its head "
                                       "(default: RAY_ADDRESS, else a local Ray instance started here)"),
    tracking_uri: str | None = typer.Option(None, help="Tracking URI (default: experiment / base pipeline / "
                                            "$MLFLOW_TRACKING_URI / sqlite under the experiment output folder)"),
    plan: bool = typer.Option(False, "--plan", help="Create the parent run, list cells with ids and status; "
                              "train nothing"),
    report_only: bool = typer.Option(False, "--report-only", help="Rebuild the report from finished cells"),
) -> None:
    """Run every unfinished cell of an experiment as a nested MLflow run, then select and report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        exp = Experiment(path, overrides, tracking_uri=tracking_uri)
        if plan or report_only:
            exp.validate()
            exp.parent_run_id()
            finished = exp.finished_runs()
            cells_now = exp.plan(finished)
            if plan:
                for i, cell in enumerate(cells_now):
                    row = describe(cell, finished)
                    typer.echo(f"{i:4d}  {row['id']}  {row['status']:8s}  {row['name']}")
                typer.echo(f"{sum(c.id in finished for c in cells_now)}/{len(cells_now)} cells finished")
                return
            from .report import write_report

            typer.echo(f"report: {write_report(exp, finished)}")
            return
        summary = exp.run(cells=cells or None, workers=workers, address=address)
    except (ConfigError, TrackingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ExperimentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"parent run {summary.parent_run_id}: {len(summary.ran)} cells trained, "
               f"{len(summary.skipped)} already finished, {len(summary.pending)} pending")
    if summary.chosen:
        typer.echo(f"selected candidates: {summary.chosen}")
    if summary.report:
        typer.echo(f"report: {summary.report}")
    if summary.pending and not cells:
        raise typer.Exit(3)
