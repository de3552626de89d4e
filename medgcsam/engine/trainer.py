"""``train(cfg)``: a pipeline end to end in one call, as ``medgcsam train`` runs it.

Checks the store and the configuration before any work, builds every object (``engine.build``), holds the run
folder, resumes from its checkpoint when asked, and runs the loop (``engine.loop.Trainer``) with the pipeline's
handlers: early stopping, checkpoints, MLflow tracking, progress, and the stages after training. Under
``torchrun`` every rank calls this; only rank 0 tracks and writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgcsam import checkpoint as ckpt_io
from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.engine.build import Built, build, effective_params
from medgcsam.engine.distributed import DistContext, broadcast, init_distributed, shutdown
from medgcsam.engine.handlers import Checkpointing, EarlyStopping, Progress
from medgcsam.engine.handlers.stages import STAGES_FILE, TRACE, EndStages, FinishError
from medgcsam.engine.handlers.tracking import MlflowTracking, check_registry, check_tracking, new_run_description
from medgcsam.engine.loop import Trainer
from medgcsam.optim import check_hyperparameters
from medgcsam.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

UNSENT = "unsent_metrics.json"

__all__ = ["FinishError", "TrainResult", "run_dir", "train"]


@dataclass
class TrainResult:
    """What a run produced; ``model`` holds the selected (best) weights on every rank."""

    run_id: str | None
    experiment_id: str | None
    checkpoint_dir: Path
    best_checkpoint: Path | None
    model_uri: str | None
    registered_version: str | None
    best_epoch: int
    metrics: dict[str, float]
    epoch_times: list[float]
    wall_time: float
    model: nn.Module | None = field(default=None, repr=False)


def run_dir(cfg: PipelineConfig) -> Path:
    """Checkpoints, evaluation files and unsent metrics of pipeline ``cfg.name``."""
    return Path(cfg.output_dir) / cfg.name


def train(cfg: PipelineConfig, *, resume: bool = False, tracking_uri: str | None = None,
          parent_run_id: str | None = None) -> TrainResult:
    """Train ``cfg`` end to end: data, model, loop, checkpoints, MLflow run, evaluation, logged model.

    ``resume`` continues from ``<output_dir>/<name>/checkpoints/last.pt`` (same config and manifest).
    ``tracking_uri`` overrides ``tracking.uri``; ``parent_run_id`` nests the run (sweeps).
    """
    started = time.perf_counter()
    check_hyperparameters(cfg.optimizer.name, cfg.optimizer.base, cfg.optimizer.hyperparameters)
    ctx = init_distributed(cfg.train.device)
    try:
        with contextlib.ExitStack() as lock:  # rank 0 holds the run folder's lock in it until train() returns
            return _run(cfg, ctx, resolve_tracking_uri(cfg, tracking_uri), resume, parent_run_id, lock, started)
    finally:
        shutdown(ctx)


def _run(cfg: PipelineConfig, ctx: DistContext, uri: str, resume: bool, parent_run_id: str | None,
         lock: contextlib.ExitStack, started: float) -> TrainResult:
    folder = run_dir(cfg)
    ckpt_dir = folder / "checkpoints"
    experiment_id = check_tracking(cfg, uri, ctx)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    built = build(cfg, ctx)
    check_registry(cfg, uri, built.class_names, ctx)
    if ctx.is_main:  # before anything is written: one process per run folder; its killed writes' temps
        lock.enter_context(ckpt_io.lock_run(folder))
        ckpt_io.remove_stale_files(ckpt_dir, *(folder / n for n in (STAGES_FILE, UNSENT, TRACE)))
    checkpoints = Checkpointing(ckpt_dir, every_steps=cfg.train.checkpoint_every_steps)
    stages = EndStages(cfg, folder, ckpt_dir, built.bundle, built.spec, uri)
    handlers = [EarlyStopping(cfg.train.early_stopping_patience)] if cfg.train.early_stopping_patience else []
    handlers += [checkpoints,
                 MlflowTracking(cfg, uri, experiment_id, spill_path=folder / UNSENT, parent_run_id=parent_run_id,
                                describe_run=new_run_description(cfg, built.bundle, built.class_names,
                                                                 ctx.world_size, effective_params(cfg, built)),
                                where=str(checkpoints.last)),
                 Progress(), stages]
    trainer = _trainer(cfg, ctx, built, handlers)
    trainer.state.metadata = {"config": cfg.model_dump_json(), "config_sha256": cfg.sha256(),
                              "manifest_sha256": built.bundle.manifest_sha256,
                              "spec": built.spec.model_dump(mode="json")}
    if resume:
        payload = ckpt_io.load_checkpoint(checkpoints.last)
        _check_resumable(cfg, payload, built, checkpoints.last)
        checkpoints.resume(trainer, payload)
    elif checkpoints.last.is_file() and ctx.is_main:
        log.warning("starting a new run over the checkpoints in %s (pass --resume to continue them)", ckpt_dir)
    st = trainer.fit()
    best = ckpt_dir / ckpt_io.BEST
    metrics = dict(st.history[st.best_epoch]) if 0 <= st.best_epoch < len(st.history) else {}
    return TrainResult(
        run_id=broadcast(st.mlflow_run_id, ctx), experiment_id=broadcast(experiment_id, ctx),
        checkpoint_dir=ckpt_dir, best_checkpoint=best if best.is_file() else None, model_uri=stages.model_uri,
        registered_version=stages.version, best_epoch=st.best_epoch + 1, metrics=metrics,
        epoch_times=list(st.epoch_times), wall_time=time.perf_counter() - started, model=trainer.raw)


def _trainer(cfg: PipelineConfig, ctx: DistContext, built: Built, handlers: list[Any]) -> Trainer:
    t = cfg.train
    return Trainer(built.model, built.optimizer, built.loaders, epochs=t.epochs, criterion=built.criterion,
                   scheduler=built.scheduler, class_names=built.class_names, monitor=t.monitor, handlers=handlers,
                   device=ctx.device, inputs=built.inputs, autocast=built.autocast, scaler=built.scaler,
                   ddp=built.ddp, ctx=ctx, seed=t.seed, steps_per_epoch=built.steps_per_epoch,
                   warm_start_epochs=t.warm_start_epochs, grad_norm_every=t.grad_norm_every,
                   ddp_perturbation=t.ddp_perturbation, cuda_graph=t.cuda_graph, train_batches=built.device_batches)


def _check_resumable(cfg: PipelineConfig, payload: dict[str, Any], built: Built, last: Path) -> None:
    """Only the same configuration and manifest continue a run."""
    if payload["config_sha256"] != cfg.sha256():
        old = PipelineConfig.model_validate_json(payload["config"]).flat()
        new = cfg.flat()
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"{last} was written with another configuration (differs in {diff}); resume with the "
                          f"same pipeline and --set values, or start a new run")
    if payload["manifest_sha256"] != built.bundle.manifest_sha256:
        raise ConfigError(f"{cfg.data.manifest} changed since {last} was written (sha256 differs); resume needs "
                          f"the same manifest, or start a new run")
