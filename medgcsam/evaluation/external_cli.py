"""`medgcsam validate-external`: a frozen model on another site's labelled images, logged to a new run.

The new run sits in the training run's experiment (when MLflow knows the model's run) and is tagged with
the model's registered name, version and source run; the training run, its metrics and its artifacts are
never written to. The internal test figures come from the model's own evaluation
(``evaluation/evaluation.json`` of its run, or ``<run dir>/evaluation/evaluation.json`` beside a
checkpoint, or ``--internal``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import typer
from mlflow.tracking import MlflowClient

from medgcsam.config import EvaluationConfig, PipelineConfig
from medgcsam.data.manifest import ManifestError
from medgcsam.evaluation.cli import EXIT_USAGE
from medgcsam.evaluation.external import SPLIT, ExternalResult, validate_external
from medgcsam.evaluation.runs import Origin, linked_run, model_origin, training_experiment
from medgcsam.inference.package import MODEL_REFERENCE_HELP, ModelLoadError, load_classifier_with_ood
from medgcsam.tracking import TrackingError, activate, ensure_reachable
from medgcsam.tracking.uri import choose_tracking_uri

EXPERIMENT = "medgcsam-external"  # used when the model's own run (and so its experiment) is unknown
INTERNAL_ARTIFACT = "evaluation/evaluation.json"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def internal_figures(ref: str, origin: Origin, explicit: Path | None) -> tuple[dict[str, Any] | None, str]:
    """The model's own evaluation (for its temperature and test figures) and where it was read from."""
    if explicit is not None:
        return json.loads(explicit.read_text(encoding="utf-8")), str(explicit)
    if origin.run_id is not None:
        with tempfile.TemporaryDirectory(prefix="medgcsam-internal-") as tmp:
            try:
                local = MlflowClient().download_artifacts(origin.run_id, INTERNAL_ARTIFACT, tmp)
            except Exception:  # the run has no evaluation (evaluation disabled): no side-by-side table
                return None, "none"
            return json.loads(Path(local).read_text(encoding="utf-8")), f"run {origin.run_id}/{INTERNAL_ARTIFACT}"
    beside = Path(ref).resolve().parent.parent / INTERNAL_ARTIFACT  # <run dir>/checkpoints/best.pt
    if Path(ref).is_file() and beside.is_file():
        return json.loads(beside.read_text(encoding="utf-8")), str(beside)
    return None, "none"


def _experiment_id(origin: Origin, uri: str) -> str:
    """The training run's experiment, else ``medgcsam-external`` (artifacts beside a sqlite store)."""
    if (known := training_experiment(origin)) is not None:
        return known
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db or sqlite:////abs.db: the file path follows the 3 slashes
        location = (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def log_external(result: ExternalResult, ref: str, origin: Origin, uri: str, run_name: str) -> str:
    """A new run linked to the model by tags; returns its id."""
    ext = result.figures["external_manifest"]
    with linked_run(ref, origin, _experiment_id(origin, uri), run_name, "external_validation",
                    {"medgcsam.external_manifest_sha256": ext["sha256"]}) as run_id:
        mlflow.log_params({"external_manifest": Path(ext["path"]).name, "external_rows": ext["rows"],
                           "external_manifest_sha256": ext["sha256"]})
        mlflow.log_metrics(result.metrics())
        mlflow.log_artifacts(str(result.out_dir), artifact_path="external_validation")
    return run_id


def validate_external_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_REFERENCE_HELP),
    manifest: Path = typer.Option(..., "--manifest", help="Labelled manifest of the external images (path, label; "
                                  "split/fold not needed, every included row is scored)"),
    root: Path | None = typer.Option(None, "--root", help="Folder the manifest's paths are relative to "
                                     "(default: the manifest's folder)"),
    task: str | None = typer.Option(None, "--task", help="Map the manifest's labels to the model's classes"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for the report, JSON, predictions "
                                       "and PNGs (default: external/<manifest name>)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store holding the model and "
                                            "taking the new run (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///outputs/mlflow.db as `train` uses)"),
    internal: Path | None = typer.Option(None, "--internal", help="The model's own evaluation.json, when not in "
                                         "its MLflow run or beside its checkpoint"),
    refit: bool = typer.Option(False, "--refit", help="Also re-fit temperature and operating point on these "
                               "images, reported apart as an optimistic figure (the frozen ones stay the result)"),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples (patients when the manifest has ids)"),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, help="Seed of the bootstrap"),
) -> None:
    """Validate a frozen model on another site's labelled images: full clinical report with 95% CIs, per
    source, internal test vs external with the difference, OOD flag rate; logged to a NEW MLflow run."""
    uri = choose_tracking_uri(tracking_uri, output_dir=PipelineConfig.model_fields["output_dir"].default)
    try:
        if model.startswith(("models:/", "runs:/")) or tracking_uri:
            ensure_reachable(uri)
            activate(uri)
        net, spec, ood = load_classifier_with_ood(model, device=device)
        origin = model_origin(model) if model.startswith(("models:/", "runs:/")) else Origin()
        figures, source = internal_figures(model, origin, internal)
    except (TrackingError, ModelLoadError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    out_dir = output or Path("external") / manifest.stem
    try:
        result = validate_external(net, spec, manifest, out_dir, EvaluationConfig(bootstrap=bootstrap), device,
                                   root=root, task=task, internal=figures, refit=refit, ood=ood,
                                   batch_size=batch_size, seed=seed)
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    fig = result.figures["splits"][SPLIT]
    h = fig["headline"]
    typer.echo(f"external: n={fig['n_images']} accuracy={h['accuracy']:.4f} balanced_accuracy="
               f"{h['balanced_accuracy']:.4f} auroc_macro={h['auroc_macro']:.4f}"
               + (f" sensitivity={h['op/sensitivity']:.4f} specificity={h['op/specificity']:.4f} (frozen operating "
                  f"point)" if "op/sensitivity" in h else ""))
    for row in result.figures["comparison"]:
        typer.echo(f"  {row['figure']}: internal {row['internal']:.4f} -> external {row['external']:.4f} "
                   f"(difference {row['difference']:+.4f}, 95% CI {row['low']:+.4f} to {row['high']:+.4f})")
    if (o := result.figures.get("ood")) is not None:
        typer.echo(f"OOD: {o['flagged']}/{fig['n_images']} flagged ({100 * o['flag_rate']:.1f}%; "
                   f"{100 * o['false_alarm_target']:.0f}% expected on the training site's images)")
    typer.echo(f"internal figures from: {source}")
    if model.startswith(("models:/", "runs:/")) or tracking_uri:
        run_id = log_external(result, model, origin, uri, f"external-{manifest.stem}")
        typer.echo(f"report: {out_dir / 'report.md'}; new MLflow run {run_id} (the training run is unchanged)")
    else:
        typer.echo(f"report: {out_dir / 'report.md'}; not logged to MLflow (give --tracking-uri to log it)")
