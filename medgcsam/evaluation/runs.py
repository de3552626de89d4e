"""Where the figures of a command run on an existing model go in MLflow.

A model's training run holds the figures it was trained and judged with; re-running `evaluate` or
`validate-external` later (other data, other settings) must not overwrite them. Such commands log to a
NEW run in the same experiment, linked to the model by tags (its reference, registered name, version,
alias and source run), so the MLflow UI lists them side by side and a search on
``tags.`medgcsam.model_run_id``` finds every later evaluation of one training run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class Origin:
    """Where in MLflow a model reference points: its source run and, for registry URIs, name/version/alias."""

    run_id: str | None = None
    name: str | None = None
    version: str | None = None
    alias: str | None = None


def model_origin(ref: str) -> Origin:
    """The source run of a model URI and, for registry URIs, its registered name, version and alias."""
    client = MlflowClient()
    if ref.startswith("runs:/"):
        return Origin(run_id=ref.removeprefix("runs:/").split("/", 1)[0])
    if not ref.startswith("models:/"):
        return Origin()
    body = ref.removeprefix("models:/")
    if body.startswith("m-"):
        return Origin(run_id=mlflow.get_logged_model(body.split("/", 1)[0]).source_run_id)
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
        return Origin(mv.run_id, name, str(mv.version), alias)
    name, version = body.rsplit("/", 1)
    return Origin(client.get_model_version(name, version).run_id, name, version)


def training_experiment(origin: Origin) -> str | None:
    """The experiment of the model's source run, or None when MLflow does not know the run."""
    return MlflowClient().get_run(origin.run_id).info.experiment_id if origin.run_id is not None else None


@contextlib.contextmanager
def linked_run(ref: str, origin: Origin, experiment_id: str, run_name: str, kind: str,
               tags: dict[str, str] | None = None) -> Iterator[str]:
    """A new run tagged ``medgcsam.kind=<kind>`` and with the model's reference and origin; yields its id."""
    all_tags = {"medgcsam.kind": kind, "medgcsam.model_ref": ref, **(tags or {})}
    all_tags.update({f"medgcsam.model_{k}": v for k, v in (("name", origin.name), ("version", origin.version),
                                                              ("alias", origin.alias), ("run_id", origin.run_id))
                     if v})
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        yield run.info.run_id
