"""MLflow tracking of a run (rank 0): the run and its parameters at the start, the curves of every epoch through
an outage-tolerant logger, what an earlier process checkpointed but never sent on resume, and the run's end
status (FINISHED, FAILED or KILLED). Without this handler nothing is tracked.

Also the checks made before any data or model work: the store is reachable and writable, and a registered name
keeps one label space.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.engine.distributed import DistContext, broadcast
from medgcsam.engine.loop import EpochEnd, Handler, Trainer
from medgcsam.tracking import (
    ResilientMetricLogger,
    TrackingError,
    activate,
    ensure_experiment,
    ensure_reachable,
    ensure_writable,
    fail_fast_http,
    run_params,
)

_METRIC_KEY = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric keys


def check_tracking(cfg: PipelineConfig, uri: str, ctx: DistContext) -> str | None:
    """Rank 0 probes the store and output_dir and activates the store; every rank fails with its message.
    Returns the experiment id (on rank 0)."""
    error, experiment_id = None, None
    if ctx.is_main:
        try:
            ensure_reachable(uri, cfg.tracking.connect_timeout_s)
            ensure_writable(Path(cfg.output_dir), "output_dir")
            activate(uri)
            with fail_fast_http(cfg.tracking.connect_timeout_s):
                experiment_id = ensure_experiment(cfg, uri)
        except TrackingError as exc:
            error = str(exc)
        except Exception as exc:  # MLflow raises many types for a store it cannot use
            error = f"MLflow tracking store {uri} cannot be used: {exc}"
    error = broadcast(error, ctx)
    if error is not None:
        raise TrackingError(error)
    return experiment_id


def check_registry(cfg: PipelineConfig, uri: str, class_names: list[str], ctx: DistContext) -> None:
    """A registered name serves one label space: refuse, before training, a run whose classes differ from the
    version that ``register_as`` (at its alias, else its latest version) holds now. Rank 0 asks the registry;
    every rank fails with its answer."""
    name = cfg.tracking.register_as
    conflict = None
    if ctx.is_main and cfg.tracking.log_model and name:
        with fail_fast_http(cfg.tracking.connect_timeout_s):
            conflict = _registry_conflict(cfg, uri, name, class_names)
    conflict = broadcast(conflict, ctx)
    if conflict is not None:
        raise ConfigError(conflict)


def _registry_conflict(cfg: PipelineConfig, uri: str, name: str, class_names: list[str]) -> str | None:
    from medgcsam.inference.package import METADATA_KEY

    client = mlflow.MlflowClient(uri)
    quote = '"' if "'" in name else "'"  # MLflow's filter grammar has no escapes; "St Mary's" needs "..."
    versions = client.search_model_versions(f"name = {quote}{name}{quote}")
    if not versions:
        return None
    current = max(versions, key=lambda v: int(v.version))
    if cfg.tracking.alias:
        with contextlib.suppress(Exception):  # no such alias yet: compare with the latest version
            current = client.get_model_version_by_alias(name, cfg.tracking.alias)
    info = mlflow.models.get_model_info(f"models:/{name}/{current.version}")
    classes = ((info.metadata or {}).get(METADATA_KEY) or {}).get("class_names")
    if classes is None or list(classes) == class_names:
        return None
    return (f"tracking.register_as {name!r}: version {current.version} holds classes {classes}, but this run's "
            f"data has {class_names}; a registered name must keep one label space, so register under "
            f"another name")


class MlflowTracking(Handler):
    """The run of ``cfg`` in ``experiment_id`` (nested under ``parent_run_id``); a resumed state reopens its own.
    ``describe_run`` logs what only the caller knows (parameters, dicts) into a new run."""

    def __init__(self, cfg: PipelineConfig, uri: str, experiment_id: str | None, *, spill_path: Path,
                 parent_run_id: str | None = None, describe_run: Callable[[], None] = lambda: None,
                 where: str = "the checkpoint") -> None:
        self.cfg, self.uri, self.experiment_id = cfg, uri, experiment_id
        self.spill_path, self.parent_run_id, self.describe_run, self.where = spill_path, parent_run_id, \
            describe_run, where
        self.metrics_log: ResilientMetricLogger | None = None

    def on_start(self, trainer: Trainer) -> None:
        if not trainer.ctx.is_main:
            return
        cfg, st = self.cfg, trainer.state
        resumed = trainer.resumed_from is not None
        if resumed and st.mlflow_run_id:
            try:
                mlflow.start_run(run_id=st.mlflow_run_id)
            except MlflowException as exc:  # not in this store, or deleted there
                raise TrackingError(f"{self.where} continues MLflow run {st.mlflow_run_id}, which {self.uri} cannot "
                                    f"reopen ({exc.message}); resume with the tracking URI the run was started "
                                    f"with, or start a new run without --resume") from None
        else:
            tags = {"medgcsam.pipeline": cfg.name, "medgcsam.optimizer": cfg.optimizer.name,
                    "medgcsam.backbone": cfg.model.name}
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=cfg.tracking.run_name or cfg.name,
                                   parent_run_id=self.parent_run_id, tags=tags)
            st.mlflow_run_id = run.info.run_id
            self.describe_run()
        self.metrics_log = ResilientMetricLogger(mlflow.MlflowClient(), st.mlflow_run_id, spill_path=self.spill_path,
                                                 timeout_s=cfg.tracking.connect_timeout_s)
        if resumed:
            self._backfill(trainer)

    def _backfill(self, trainer: Trainer) -> None:
        """On resume, send what an earlier process checkpointed but never got into the store: its spilled
        buffer (an outage at the end), and epochs killed between their checkpoint and their flush."""
        self.metrics_log.take_spilled()
        client, run_id = self.metrics_log.client, trainer.state.mlflow_run_id
        with fail_fast_http(self.cfg.tracking.connect_timeout_s):
            epochs = {m.step for m in client.get_metric_history(run_id, "epoch_time_s")}
            steps = {m.step for m in client.get_metric_history(run_id, "train/grad_norm")}
        epochs |= {m.step for m in self.metrics_log.buffered("epoch_time_s")}
        steps |= {m.step for m in self.metrics_log.buffered("train/grad_norm")}
        rows = [(int(s), a, b) for s, a, b in trainer.state.grad_trace if int(s) not in steps]
        for record in trainer.state.history:
            if int(record["epoch"]) not in epochs:
                self.log_epoch(record, [])
        self.log_epoch(None, rows)

    def log_epoch(self, record: dict[str, float] | None, trace_rows: list[tuple[int, float, float]]) -> None:
        if self.metrics_log is None:
            return
        if record is not None:
            self.metrics_log.log({_METRIC_KEY.sub("_", k): v for k, v in record.items()
                                  if k != "epoch" and np.isfinite(v)}, step=int(record["epoch"]))
        for step, norm, norm_gc in trace_rows:
            self.metrics_log.log({k: v for k, v in (("train/grad_norm", norm), ("train/grad_norm_gc", norm_gc))
                                  if np.isfinite(v)}, step=step)
        self.metrics_log.flush()

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        self.log_epoch(end.record, end.grad_rows)

    def on_end(self, trainer: Trainer) -> None:
        if self.metrics_log is not None:
            self.metrics_log.close()

    def on_close(self, trainer: Trainer, status: str) -> None:
        if self.metrics_log is not None and self.metrics_log.pending:  # a failed run keeps its curves too
            self.metrics_log.close(retry_for_s=self.cfg.tracking.connect_timeout_s)
        if trainer.ctx.is_main and mlflow.active_run() is not None:
            with fail_fast_http(self.cfg.tracking.connect_timeout_s), contextlib.suppress(Exception):
                mlflow.end_run(status)


def new_run_description(cfg: PipelineConfig, bundle: Any, class_names: list[str], world_size: int,
                        effective: dict[str, str]) -> Callable[[], None]:
    """What a new run of ``cfg`` records besides its curves: parameters, the resolved pipeline, split counts."""

    def describe() -> None:
        counts = {split: {c: int((frame["label"] == c).sum()) for c in class_names}
                  for split, frame in bundle.frames.items()}
        mlflow.log_params(run_params(cfg, manifest_sha256=bundle.manifest_sha256, split_counts=counts,
                                     world_size=world_size))
        mlflow.log_params(effective)
        mlflow.log_dict(json.loads(cfg.model_dump_json()), "config/pipeline.yaml")
        mlflow.log_dict({"manifest": str(cfg.data.manifest), "manifest_sha256": bundle.manifest_sha256,
                         "classes": class_names, "counts": counts}, "config/split_summary.json")

    return describe
