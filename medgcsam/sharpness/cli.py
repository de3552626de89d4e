"""`medgcsam sharpness` and `medgcsam landscape` on a trained model and its training split.

Both use a fixed, seeded, augmentation-free subset of the train split (``sharpness.n_samples``),
and log to the model's MLflow run when known, else to a new run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import typer

from medgcsam.evaluation.cli import usage_errors
from medgcsam.evaluation.loading import bundle_for, load_model, model_run
from medgcsam.inference.package import MODEL_REFERENCE_HELP
from medgcsam.sharpness.compute import compute_landscape, compute_sharpness, log_sharpness


def sharpness_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_REFERENCE_HELP),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="Pipeline YAML (data, sharpness, tracking)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for sharpness.json, esd.npz, "
                                       "esd_density.png (default: <output_dir>/sharpness)"),
    overrides: list[str] = typer.Option(None, "--set", help="Override a config field, e.g. sharpness.top_k=3"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri"),
) -> None:
    """Top Hessian eigenvalues (Lanczos, residual-certified), Hutchinson trace +- s.e., SLQ density."""
    with usage_errors():
        loaded = load_model(model, pipeline, overrides or [], tracking_uri)
        bundle = bundle_for(loaded)
    out_dir = output or Path(loaded.cfg.output_dir) / "sharpness"
    metrics = compute_sharpness(loaded.model, bundle.train.without_augmentation(), loaded.cfg.sharpness,
                                loaded.device, out_dir)
    with model_run(loaded, "sharpness") as run_id:
        log_sharpness(metrics, out_dir)
    parts = [f"top eigenvalue {metrics['hessian_top_eig']:.6g} (residual {metrics['hessian_top_eig_residual']:.2g})"]
    if "hessian_trace" in metrics:
        parts.append(f"trace {metrics['hessian_trace']:.6g} +- {metrics['hessian_trace_se']:.2g}")
    if "hessian_esd_median" in metrics:
        parts.append(f"ESD median/mean/std {metrics['hessian_esd_median']:.4g}/{metrics['hessian_esd_mean']:.4g}/"
                     f"{metrics['hessian_esd_std']:.4g}")
    typer.echo(", ".join(parts) + f"; {int(metrics['hessian_hvp_count'])} HVPs in {metrics['hessian_wall_s']:.1f}s; "
               f"MLflow run {run_id}")


def landscape_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_REFERENCE_HELP),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="Pipeline YAML (data, sharpness, tracking)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for arrays and PNGs "
                                       "(default: <output_dir>/landscape)"),
    points: int = typer.Option(21, min=3, help="Grid points per axis"),
    span: float = typer.Option(1.0, min=0.0, help="Grid covers [-span, span] along each direction"),
    two_d: bool = typer.Option(True, "--2d/--1d-only", help="Also compute the 2-D surface (points^2 evaluations)"),
    overrides: list[str] = typer.Option(None, "--set", help="Override a config field, e.g. sharpness.n_samples=128"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri"),
) -> None:
    """1-D and 2-D loss surfaces along filter-normalized random directions; weights restored exactly."""
    with usage_errors():
        loaded = load_model(model, pipeline, overrides or [], tracking_uri)
        bundle = bundle_for(loaded)
    out_dir = output or Path(loaded.cfg.output_dir) / "landscape"
    sc = loaded.cfg.sharpness
    results = compute_landscape(loaded.model, bundle.train.without_augmentation(), out_dir, n_samples=sc.n_samples,
                                batch_size=sc.batch_size, points=points, span=span, two_d=two_d, seed=sc.seed,
                                device=loaded.device)
    centre = float(results[0].loss[len(results[0].alphas) // 2])
    with model_run(loaded, "landscape") as run_id:
        mlflow.log_metrics({"landscape_loss_centre": centre, "landscape_1d_loss_max": float(results[0].loss.max())})
        mlflow.log_artifacts(str(out_dir), artifact_path="landscape")
    typer.echo(f"landscape: loss at the weights {centre:.4f}, max on the 1-D line {results[0].loss.max():.4f}; "
               f"files in {out_dir}; MLflow run {run_id}")
