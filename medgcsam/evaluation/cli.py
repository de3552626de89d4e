"""`medgcsam evaluate` and `medgcsam validate-external`: clinical evaluation of a registered, logged or
checkpointed model.

`evaluate` scores the pipeline's own splits and logs to a new run, in the experiment of the run that produced
the model when MLflow knows it (``runs:/``, ``models:/name@alias``, ``models:/name/N``, ``models:/m-<id>``) and
linked to it by tags (:mod:`medgcsam.evaluation.runs`), so the training run keeps its figures; with
``--into-training-run`` it writes into that run instead. `sharpness` and `landscape` (``model_run``) still log
to the training run: a later `sharpness` replaces its ``sharpness/`` files. Only with
``--store-threshold`` does it write the operating point it chose back into the model: a checkpoint's model
card is rewritten in place; an MLflow model is logged again with the updated card (a new registered version
when it came from the registry, with the alias moved to it).

`validate-external` scores a frozen model on any labelled manifest (another site's images) and logs to a
new run tagged with the model's name, version and run, never to the training run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import typer

from medgcsam.evaluation import loading
from medgcsam.evaluation.evaluate import evaluate, log_evaluation
from medgcsam.evaluation.loading import LOAD_ERRORS, LoadedModel, bundle_for, load_model, model_run
from medgcsam.evaluation.runs import linked_run, training_experiment
from medgcsam.inference.package import MODEL_REFERENCE_HELP
from medgcsam.tracking import ensure_experiment

EXIT_USAGE = 2


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """What the library raises for a bad model, pipeline, store or manifest, as a one-line usage error."""
    try:
        yield
    except LOAD_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def evaluation_run(loaded: LoadedModel, manifest_sha: str) -> contextlib.AbstractContextManager[str]:
    """A new run beside the model's training run (its experiment, else the pipeline's), linked by tags."""
    experiment_id = training_experiment(loaded.origin) or ensure_experiment(loaded.cfg, mlflow.get_tracking_uri())
    return linked_run(loaded.ref, loaded.origin, experiment_id, "evaluate", "evaluation",
                      {"medgcsam.evaluated_manifest_sha256": manifest_sha})


def evaluate_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_REFERENCE_HELP),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="Pipeline YAML (data, evaluation, tracking)"),
    split: list[str] = typer.Option(None, "--split", help="Split(s) to report besides val (default: "
                                    "evaluation.splits)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for JSON/Markdown/PNGs "
                                       "(default: <output_dir>/evaluation)"),
    overrides: list[str] = typer.Option(None, "--set", help="Override a config field, e.g. evaluation.bootstrap=2000"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri"),
    store_threshold: bool = typer.Option(False, "--store-threshold",
                                         help="Also write the chosen threshold and temperature into the model: "
                                         "rewrites a checkpoint's card, or logs a NEW registered version and "
                                         "moves the alias to it. Off by default: nothing else changes."),
    into_training_run: bool = typer.Option(False, "--into-training-run",
                                           help="Log into the model's training run, replacing its evaluation "
                                           "metrics and evaluation/ artifacts (default: a NEW run linked to it "
                                           "by tags)"),
) -> None:
    """Per-class sensitivity/specificity/PPV/NPV with 95% CIs, AUROC, calibration, frozen operating point.

    Scores the pipeline's own splits; for another site's images use `validate-external`. Logs to a new
    MLflow run tagged with the model (the training run keeps its figures) unless --into-training-run."""
    with usage_errors():
        loaded = load_model(model, pipeline, overrides or [], tracking_uri)
        bundle = bundle_for(loaded)
    cfg_eval = loaded.cfg.evaluation
    if split:
        cfg_eval = cfg_eval.model_copy(update={"splits": list(split)})
    out_dir = output or Path(loaded.cfg.output_dir) / "evaluation"
    with usage_errors():
        result = evaluate(loaded.model, bundle, loaded.spec, cfg_eval, loaded.device, out_dir,
                          batch_size=loaded.cfg.data.eval_batch_size or loaded.cfg.data.batch_size,
                          seed=loaded.cfg.train.seed, manifest=loaded.cfg.data.manifest)
    if into_training_run and loaded.run_id is None:
        typer.echo(f"note: MLflow knows no training run of {model}; logging to a new run", err=True)
    into = into_training_run and loaded.run_id is not None
    sha = result.figures["evaluated_manifest"]["sha256"]
    with model_run(loaded, "evaluate") if into else evaluation_run(loaded, sha) as run_id:
        log_evaluation(result)
        where = loading.store_threshold(loaded, result.spec) if store_threshold and result.threshold else None
    for name, fig in result.figures["splits"].items():
        h = fig["headline"]
        typer.echo(f"{name}: n={fig['n_images']} accuracy={h['accuracy']:.4f} balanced_accuracy="
                   f"{h['balanced_accuracy']:.4f} auroc_macro={h['auroc_macro']:.4f} ece={h['ece']:.4f}")
    if result.threshold is not None:
        typer.echo(f"operating point: p({result.threshold.positive_class}) >= {result.threshold.value:.4f} "
                   f"({result.threshold.rule})" + (f"; stored in {where}" if where else ""))
    typer.echo(f"report: {out_dir / 'report.md'}; MLflow run {run_id}"
               + (" (the training run)" if into else " (new; the training run is unchanged)"))
