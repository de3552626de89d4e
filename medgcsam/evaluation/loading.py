"""A trained model with its pipeline, tracking store and MLflow origin, for the commands that work on one
(`evaluate`, `sharpness`, `landscape`): loading it, building its data, the run to log into, storing a threshold.

Library functions: failures are ordinary exceptions (``ConfigError``, ``TrackingError``, ``ModelLoadError``,
``ValueError``, ``OSError``); the CLI modules turn them into one-line usage errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from torch import nn

from medgcsam.checkpoint import update_checkpoint
from medgcsam.config import PipelineConfig, load_config
from medgcsam.data.datasets import DataBundle, build_datasets
from medgcsam.devices import resolve_device
from medgcsam.evaluation.runs import Origin, model_origin
from medgcsam.inference.package import ModelLoadError, load_classifier_with_ood, log_classifier
from medgcsam.models.ood import OODStats
from medgcsam.models.spec import ModelSpec
from medgcsam.tracking import TrackingError, activate, ensure_experiment, ensure_reachable, resolve_tracking_uri

# What loading a model and its data raises for a bad reference, pipeline, store or manifest.
LOAD_ERRORS = (TrackingError, ModelLoadError, RuntimeError, ValueError, OSError)


@dataclass
class LoadedModel:
    """A model, its card, the pipeline and where in MLflow it came from."""

    ref: str
    model: nn.Module
    spec: ModelSpec
    cfg: PipelineConfig
    run_id: str | None
    registered: tuple[str, str | None] | None  # (registered name, alias or None)
    device: str
    ood: OODStats | None = None
    origin: Origin = Origin()


def load_model(model_ref: str, pipeline: Path, overrides: list[str], tracking_uri: str | None) -> LoadedModel:
    """Config, tracking store (checked and activated), model and its MLflow origin."""
    cfg = load_config(pipeline, overrides)
    uri = resolve_tracking_uri(cfg, tracking_uri)
    ensure_reachable(uri, cfg.tracking.connect_timeout_s)
    activate(uri)
    device = str(resolve_device(cfg.train.device))
    model, spec, ood = load_classifier_with_ood(model_ref, device=device)
    origin = model_origin(model_ref)
    registered = (origin.name, origin.alias) if origin.name else None
    return LoadedModel(model_ref, model, spec, cfg, origin.run_id, registered, device, ood, origin)


def bundle_for(loaded: LoadedModel) -> DataBundle:
    """The manifest's datasets, preprocessed as the model card says; classes must match the model's."""
    bundle = build_datasets(loaded.cfg.data, loaded.spec.preprocessing)
    if list(bundle.class_names) != list(loaded.spec.class_names):
        raise ValueError(f"the pipeline's classes {bundle.class_names} differ from the model's "
                         f"{loaded.spec.class_names}; set data.classes / data.task to the model's classes")
    return bundle


@contextlib.contextmanager
def model_run(loaded: LoadedModel, run_name: str) -> Iterator[str]:
    """The model's own run (resumed) or a new run in the pipeline's experiment."""
    if loaded.run_id is not None:
        with mlflow.start_run(run_id=loaded.run_id) as run:
            yield run.info.run_id
        return
    experiment_id = ensure_experiment(loaded.cfg, mlflow.get_tracking_uri())
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={"medgcsam.model_ref": loaded.ref}) as run:
        yield run.info.run_id


def store_threshold(loaded: LoadedModel, spec: ModelSpec) -> str:
    """Write the frozen threshold into the model card where the model lives; returns where."""
    path = Path(loaded.ref)
    if path.is_file():
        update_checkpoint(path, spec=spec.model_dump(mode="json"))
        return str(path)
    name, alias = loaded.registered if loaded.registered else (None, None)
    info = log_classifier(loaded.model, spec, registered_model_name=name, alias=alias, ood=loaded.ood)
    return info.model_uri + (f" (registered {name} v{info.registered_model_version})" if name else "")
