"""The training loop: any optimizer of ``medgcsam.optim`` driven through its passes per step.

One code path for one process and ``torchrun``. A step never synchronizes with the host (metrics
and gradient norms stay on the device and are read between steps), the train batch shape is fixed
(the loader drops the last partial batch), so the step can later be captured in a CUDA graph.

Exact resume: every epoch reseeds Python/NumPy/torch and the sampler's shuffle from
``(seed, epoch)`` (augmentation is seeded by each batch's indices); a mid-epoch resume replays the epoch's loader
up to the saved step without training on it, then restores the RNG states saved with the weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medgcsam import checkpoint as ckpt_io
from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.data.datasets import BatchInputs, DataBundle, build_datasets, build_loaders
from medgcsam.data.device_cache import build_device_batches
from medgcsam.engine.distributed import DistContext, broadcast, gather, init_distributed, shutdown
from medgcsam.engine.graphed import EagerStep, make_step
from medgcsam.engine.metrics import EPOCH_PREFIX, MONITOR_KEYS, TrainMeter, classification_metrics, is_improvement
from medgcsam.engine.ood import fit_and_store_ood, stored_ood
from medgcsam.engine.schedule import build_scheduler
from medgcsam.engine.step import autocast_factory
from medgcsam.files import replace_atomically
from medgcsam.models.factory import create_model, input_spec
from medgcsam.models.spec import ModelSpec, Preprocessing
from medgcsam.optim import check_hyperparameters, create_optimizer
from medgcsam.tracking import (
    ResilientMetricLogger,
    TrackingError,
    activate,
    ensure_experiment,
    ensure_reachable,
    ensure_writable,
    fail_fast_http,
    resolve_tracking_uri,
    run_params,
)
from medgcsam.tracking import figures as figs

log = logging.getLogger(__name__)

_METRIC_KEY = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric keys


STAGES_FILE = "finished_stages.json"  # which end-of-training stages this run has done
UNSENT, TRACE = "unsent_metrics.json", "grad_norm_trace.csv"


class FinishError(RuntimeError):
    """Training finished and its checkpoints are on disk, but a stage after it (logging, evaluation,
    sharpness, model registration) failed; ``--resume`` runs the remaining stages."""


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


def train(cfg: PipelineConfig, *, resume: bool = False, tracking_uri: str | None = None,
          parent_run_id: str | None = None) -> TrainResult:
    """Train ``cfg`` end to end: data, model, loop, checkpoints, MLflow run, evaluation, logged model.

    ``resume`` continues from ``<output_dir>/<name>/checkpoints/last.pt`` (same config and manifest).
    ``tracking_uri`` overrides ``tracking.uri``; ``parent_run_id`` nests the run (sweeps).
    Under ``torchrun`` every rank calls this; only rank 0 tracks and writes files.
    """
    started = time.perf_counter()
    check_hyperparameters(cfg.optimizer.name, cfg.optimizer.base, cfg.optimizer.hyperparameters)
    ctx = init_distributed(cfg.train.device)
    try:
        training = _Training(cfg, ctx, tracking_uri=tracking_uri, started=started)
        with training.lock:
            return training.run(resume, parent_run_id)
    finally:
        shutdown(ctx)


def run_dir(cfg: PipelineConfig) -> Path:
    """Checkpoints, evaluation files and unsent metrics of pipeline ``cfg.name``."""
    return Path(cfg.output_dir) / cfg.name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed per (run seed, epoch): epochs differ, reruns agree."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]) & 0x7FFFFFFF


class _Training:
    def __init__(self, cfg: PipelineConfig, ctx: DistContext, *, tracking_uri: str | None, started: float) -> None:
        self.cfg, self.ctx, self.started = cfg, ctx, started
        self.device = ctx.device
        self.dir = run_dir(cfg)
        self.ckpt_dir = self.dir / "checkpoints"
        self.uri = resolve_tracking_uri(cfg, tracking_uri)
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.metrics_log: ResilientMetricLogger | None = None
        # loop state, all of it in checkpoints
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.epoch_times: list[float] = []
        self.grad_trace: list[list[float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_sha256: str | None = None  # of best_state, as last.pt records it
        self.lock = contextlib.ExitStack()  # rank 0 holds the run folder's lock in it until train() returns
        self.stopped = False

    # ------------------------------------------------------------------ setup
    def _check_tracking(self) -> None:
        """Rank 0 probes the store and output_dir before any data or model work; every rank fails with its message."""
        error = None
        if self.ctx.is_main:
            try:
                ensure_reachable(self.uri, self.cfg.tracking.connect_timeout_s)
                ensure_writable(Path(self.cfg.output_dir), "output_dir")
                activate(self.uri)
                with fail_fast_http(self.cfg.tracking.connect_timeout_s):
                    self.experiment_id = ensure_experiment(self.cfg, self.uri)
            except TrackingError as exc:
                error = str(exc)
            except Exception as exc:  # MLflow raises many types for a store it cannot use
                error = f"MLflow tracking store {self.uri} cannot be used: {exc}"
        error = broadcast(error, self.ctx)
        if error is not None:
            raise TrackingError(error)

    def _build(self) -> None:
        cfg, dcfg = self.cfg, self.cfg.data
        with torch.device("meta"):  # only the backbone's data config is needed here, no weights
            probe = create_model(cfg.model.name, 2, in_chans=dcfg.channels, image_size=dcfg.image_size)
        in_spec = input_spec(probe, dcfg.image_size, dcfg.channels)
        self.bundle: DataBundle = build_datasets(dcfg, in_spec)
        self.loaders = build_loaders(self.bundle, dcfg, distributed=self.ctx.enabled, seed=cfg.train.seed)
        self.train_loader: DataLoader = self.loaders["train"]
        self.val_loader: DataLoader | None = self.loaders.get("val")
        if self.val_loader is None and cfg.train.early_stopping_patience is not None:
            raise ConfigError("train.early_stopping_patience needs a validation split to watch; set data.val_fold "
                              "(or give the manifest split=val rows), or remove the patience")
        self.inputs = BatchInputs(in_spec, self.device)
        # issue 23: GPU-resident train batches (None: the DataLoader); DDP shards through its sampler instead
        self.device_batches = None if self.ctx.enabled else build_device_batches(
            self.bundle.train, dcfg.batch_size, self.device, seed=cfg.train.seed, mode=dcfg.device_cache)
        self.class_names = list(self.bundle.class_names)
        self._check_evaluation()
        self.spec = ModelSpec(
            backbone=cfg.model.name, num_classes=len(self.class_names), in_chans=dcfg.channels,
            class_names=self.class_names,
            preprocessing=Preprocessing(image_size=in_spec.image_size, channels=dcfg.channels, mean=list(in_spec.mean),
                                        std=list(in_spec.std), modality=dcfg.modality,
                                        dicom_multiframe=dcfg.dicom_multiframe),
            manifest_sha256=self.bundle.manifest_sha256, config_sha256=cfg.sha256())

        seed_everything(cfg.train.seed)
        self.raw = create_model(cfg.model.name, len(self.class_names), in_chans=dcfg.channels,
                                pretrained_path=cfg.model.pretrained_path, drop_rate=cfg.model.drop_rate,
                                drop_path_rate=cfg.model.drop_path_rate, image_size=in_spec.image_size)
        self.raw.to(self.device)
        self.model: nn.Module = self.raw
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw, device_ids=ids)

        self.autocast = autocast_factory(self.device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and self.device.type == "cuda" else None
        self.criterion = nn.CrossEntropyLoss(weight=self._class_weights(), label_smoothing=cfg.train.label_smoothing)
        ocfg = cfg.optimizer
        self.opt = create_optimizer(
            ocfg.name, _param_groups(self.raw, ocfg.weight_decay), base=ocfg.base, model=self.raw,
            grad_scaler=self.scaler, max_grad_norm=cfg.train.grad_clip,
            accumulation_steps=cfg.train.accumulation_steps, lr=ocfg.lr, weight_decay=ocfg.weight_decay,
            **ocfg.hyperparameters)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch % cfg.train.accumulation_steps:
            # an epoch-end checkpoint (and a warm start's switch of optimizer) would fall inside a cycle
            raise ConfigError(f"train.accumulation_steps {cfg.train.accumulation_steps} does not divide the "
                              f"{self.steps_per_epoch} steps of an epoch; change data.batch_size, "
                              f"train.accumulation_steps or train.max_steps_per_epoch so that it does")
        self.scheduler = build_scheduler(self.opt.base, cfg.train,
                                         max(1, self.steps_per_epoch // cfg.train.accumulation_steps))

    def _check_registry(self) -> None:
        """A registered name serves one label space: refuse, before training, a run whose classes differ from
        the version that ``register_as`` (at its alias, else its latest version) holds now. Rank 0 asks the
        registry; every rank fails with its answer."""
        name = self.cfg.tracking.register_as
        conflict = None
        if self.ctx.is_main and self.cfg.tracking.log_model and name:
            with fail_fast_http(self.cfg.tracking.connect_timeout_s):
                conflict = self._registry_conflict(name)
        conflict = broadcast(conflict, self.ctx)
        if conflict is not None:
            raise ConfigError(conflict)

    def _registry_conflict(self, name: str) -> str | None:
        from medgcsam.inference.package import METADATA_KEY

        client = mlflow.MlflowClient(self.uri)
        quote = '"' if "'" in name else "'"  # MLflow's filter grammar has no escapes; "St Mary's" needs "..."
        versions = client.search_model_versions(f"name = {quote}{name}{quote}")
        if not versions:
            return None
        current = max(versions, key=lambda v: int(v.version))
        if self.cfg.tracking.alias:
            with contextlib.suppress(Exception):  # no such alias yet: compare with the latest version
                current = client.get_model_version_by_alias(name, self.cfg.tracking.alias)
        info = mlflow.models.get_model_info(f"models:/{name}/{current.version}")
        classes = ((info.metadata or {}).get(METADATA_KEY) or {}).get("class_names")
        if classes is None or list(classes) == self.class_names:
            return None
        return (f"tracking.register_as {name!r}: version {current.version} holds classes {classes}, but this run's "
                f"data has {self.class_names}; a registered name must keep one label space, so register under "
                f"another name")

    def _check_evaluation(self) -> None:
        """Evaluation settings that need the class list, refused before training rather than after it."""
        ecfg = self.cfg.evaluation
        if not ecfg.enabled:
            return
        if ecfg.positive_class is not None and ecfg.positive_class not in self.class_names:
            raise ConfigError(f"evaluation.positive_class {ecfg.positive_class!r} is not a class of "
                              f"{self.cfg.data.manifest} ({self.class_names}); set it to one of them or remove it")
        unknown = [s for s in ecfg.splits if s not in self.bundle.frames]
        if unknown:
            raise ConfigError(f"evaluation.splits {unknown} are not splits of this data (it has "
                              f"{sorted(self.bundle.frames)}); list only those, e.g. [val, test]")

    def _class_weights(self) -> torch.Tensor | None:
        spec = self.cfg.train.class_weights
        if spec == "none":
            return None
        if spec == "balanced":
            counts = torch.bincount(self.bundle.train.labels, minlength=len(self.class_names)).double()
            if (counts == 0).any():
                missing = [c for c, n in zip(self.class_names, counts.tolist(), strict=True) if n == 0]
                raise ValueError(f"train.class_weights=balanced but the train split has no {missing} images; "
                                 f"give explicit weights or fix the split")
            weights = counts.sum() / (len(counts) * counts)
        else:
            if len(spec) != len(self.class_names):
                raise ConfigError(f"train.class_weights has {len(spec)} values for {len(self.class_names)} "
                                  f"classes {self.class_names}; give one weight per class in that order")
            weights = torch.tensor(spec, dtype=torch.float64)
        return weights.float().to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, meter: TrainMeter | None) -> dict[str, Any]:
        with self.opt.unperturbed():  # MSAM: weights and optimizer state both at the clean point
            model_state = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}
            optimizer_state = self.opt.state_dict()
        return {
            "model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "rng": ckpt_io.capture_rng(),
            "epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
            "config": self.cfg.model_dump_json(), "config_sha256": self.cfg.sha256(),
            "manifest_sha256": self.bundle.manifest_sha256, "spec": self.spec.model_dump(mode="json"),
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "stopped": self.stopped, "history": self.history, "epoch_times": self.epoch_times,
            "grad_trace": self.grad_trace, "meter": meter.state_dict() if meter is not None else {},
            "mlflow_run_id": self.run_id,
        }

    def _save(self, meter: TrainMeter | None, *, best: bool = False) -> None:
        if not self.ctx.is_main:
            return
        self.best_sha256 = ckpt_io.save_pair(self.ckpt_dir, self._payload(meter), best=best,
                                             best_sha256=self.best_sha256)

    def _resume(self) -> dict[str, Any]:
        state = ckpt_io.load_checkpoint(self.ckpt_dir / ckpt_io.LAST)
        if state["config_sha256"] != self.cfg.sha256():
            old = PipelineConfig.model_validate_json(state["config"]).flat()
            new = self.cfg.flat()
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise ConfigError(f"{self.ckpt_dir / ckpt_io.LAST} was written with another configuration (differs in "
                              f"{diff}); resume with the same pipeline and --set values, or start a new run")
        if state["manifest_sha256"] != self.bundle.manifest_sha256:
            raise ConfigError(f"{self.cfg.data.manifest} changed since {self.ckpt_dir / ckpt_io.LAST} was written "
                              f"(sha256 differs); resume needs the same manifest, or start a new run")
        self.raw.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for name in ("epoch", "global_step", "best_metric", "best_epoch", "bad_epochs", "stopped", "history",
                     "epoch_times", "grad_trace"):
            setattr(self, name, state[name])
        self.step_in_epoch = state["step"]
        self.run_id = state["mlflow_run_id"]
        self.best_state, self.best_sha256 = ckpt_io.load_best(self.ckpt_dir, state)
        return state

    # ------------------------------------------------------------------ tracking
    def _start_run(self, resumed: bool, parent_run_id: str | None) -> None:
        if not self.ctx.is_main:
            return
        cfg = self.cfg
        if resumed and self.run_id:
            try:
                mlflow.start_run(run_id=self.run_id)
            except MlflowException as exc:  # not in this store, or deleted there
                raise TrackingError(f"{self.ckpt_dir / ckpt_io.LAST} continues MLflow run {self.run_id}, which "
                                    f"{self.uri} cannot reopen ({exc.message}); resume with the tracking URI the run "
                                    f"was started with, or start a new run without --resume") from None
        else:
            tags = {"medgcsam.pipeline": cfg.name, "medgcsam.optimizer": cfg.optimizer.name,
                    "medgcsam.backbone": cfg.model.name}
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=cfg.tracking.run_name or cfg.name,
                                   parent_run_id=parent_run_id, tags=tags)
            self.run_id = run.info.run_id
            counts = {split: {c: int((frame["label"] == c).sum()) for c in self.class_names}
                      for split, frame in self.bundle.frames.items()}
            mlflow.log_params(run_params(cfg, manifest_sha256=self.bundle.manifest_sha256, split_counts=counts,
                                         world_size=self.ctx.world_size))
            mlflow.log_params(self._effective_params())
            mlflow.log_dict(json.loads(cfg.model_dump_json()), "config/pipeline.yaml")
            mlflow.log_dict({"manifest": str(cfg.data.manifest), "manifest_sha256": self.bundle.manifest_sha256,
                             "classes": self.class_names, "counts": counts}, "config/split_summary.json")
        self.metrics_log = ResilientMetricLogger(mlflow.MlflowClient(), self.run_id,
                                                 spill_path=self.dir / UNSENT,
                                                 timeout_s=cfg.tracking.connect_timeout_s)
        if resumed:
            self._backfill()

    def _backfill(self) -> None:
        """On resume, send what an earlier process checkpointed but never got into the store: its spilled
        buffer (an outage at the end), and epochs killed between their checkpoint and their flush."""
        self.metrics_log.take_spilled()
        client = self.metrics_log.client
        with fail_fast_http(self.cfg.tracking.connect_timeout_s):
            epochs = {m.step for m in client.get_metric_history(self.run_id, "epoch_time_s")}
            steps = {m.step for m in client.get_metric_history(self.run_id, "train/grad_norm")}
        epochs |= {m.step for m in self.metrics_log.buffered("epoch_time_s")}
        steps |= {m.step for m in self.metrics_log.buffered("train/grad_norm")}
        rows = [(int(s), a, b) for s, a, b in self.grad_trace if int(s) not in steps]
        for record in self.history:
            if int(record["epoch"]) not in epochs:
                self._log_epoch(record, [])
        self._log_epoch(None, rows)

    def _effective_params(self) -> dict[str, str]:
        """What actually runs, defaults included: the YAML holds only what was set (GCSAM's perturbation norm,
        Adam's betas), and an AMP setting the device cannot honour runs in float32."""
        out = {f"effective.optimizer.{k}": str(v) for k, v in self.opt.hp.items()}
        out.update({f"effective.base.{k}": str(v) for k, v in self.opt.base.defaults.items()
                    if isinstance(v, int | float | str | tuple | bool | type(None))})
        out["effective.amp"] = "none" if self.autocast is contextlib.nullcontext else self.cfg.train.amp
        return out

    def _log_epoch(self, record: dict[str, float] | None, trace_rows: list[tuple[int, float, float]]) -> None:
        if self.metrics_log is None:
            return
        if record is not None:
            self.metrics_log.log({_METRIC_KEY.sub("_", k): v for k, v in record.items()
                                  if k != "epoch" and np.isfinite(v)}, step=int(record["epoch"]))
        for step, norm, norm_gc in trace_rows:
            self.metrics_log.log({k: v for k, v in (("train/grad_norm", norm), ("train/grad_norm_gc", norm_gc))
                                  if np.isfinite(v)}, step=step)
        self.metrics_log.flush()

    # ------------------------------------------------------------------ loop
    def _seed_epoch(self, epoch: int) -> None:
        seed = epoch_seed(self.cfg.train.seed, epoch)
        seed_everything(seed)
        sampler = self.train_loader.sampler
        if getattr(sampler, "generator", None) is not None:  # RandomSampler: the shuffle of this epoch
            sampler.generator.manual_seed(seed)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler
            sampler.set_epoch(epoch)

    def _train_epoch(self, pending_rng: dict[str, Any] | None, meter_state: dict[str, Any] | None) -> TrainMeter:
        cfg = self.cfg.train
        self.model.train()
        warm = self.epoch < cfg.warm_start_epochs
        if self.opt.base_only != warm:  # set only on change: accumulation may span an epoch boundary
            self.opt.base_only = warm
        # recomputed per epoch: a warm-start (single-pass) epoch must all-reduce its only pass
        self.no_sync = self.opt.no_sync_passes(cfg.ddp_perturbation) if self.ctx.enabled else frozenset()
        self._seed_epoch(self.epoch)
        meter = TrainMeter(self.device, self.steps_per_epoch)
        if meter_state:
            meter.load_state_dict(meter_state)
        if self.device_batches is not None:  # issue 23: seeded by (seed, epoch, index); a resume skips, no replay
            batches: Iterator = self.device_batches.epoch(self.epoch, start=self.step_in_epoch)
        else:
            batches = iter(self.train_loader)
            for _ in range(self.step_in_epoch):  # replay the loader to where the checkpoint was taken
                next(batches)
        if pending_rng is not None:
            ckpt_io.restore_rng(pending_rng)
        refresh = max(1, self.steps_per_epoch // 10)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.ctx.is_main,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        tick, seen = time.perf_counter(), 0
        while self.step_in_epoch < self.steps_per_epoch:
            batch = next(batches)
            images = self.inputs(batch["image"])
            labels = batch["label"].to(self.device, non_blocking=True)
            self._step(meter)(images, labels)  # issue 23: graphed or eager (engine.graphed.make_step)
            self.global_step += 1
            self.step_in_epoch += 1
            seen += images.shape[0]
            if self.global_step % cfg.grad_norm_every == 0:
                meter.record_grad_norms(self.global_step, self.opt.stats, centralized=not self.opt.base_only)
            if self.global_step % cfg.accumulation_steps == 0:
                self.scheduler.step()
            bar.update(1)
            if self.ctx.is_main and (self.step_in_epoch % refresh == 0 or self.step_in_epoch == self.steps_per_epoch):
                s = meter.summary()  # the only host sync, between steps, a few times per epoch
                rate = seen * self.ctx.world_size / max(time.perf_counter() - tick, 1e-9)
                bar.set_postfix(loss=f"{s['loss']:.4f}", acc=f"{s['accuracy']:.3f}", img_s=f"{rate:.1f}")
            every = cfg.checkpoint_every_steps
            if every and self.step_in_epoch % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self._save(meter)
        bar.close()
        meter.images_per_s = seen * self.ctx.world_size / max(time.perf_counter() - tick, 1e-9)
        return meter

    def _step(self, meter: TrainMeter) -> EagerStep:
        """issue 23: the step object, built once (a graph is captured once per run), given this epoch's meter."""
        step = getattr(self, "step", None)
        if step is None or step.no_sync != self.no_sync:
            step = self.step = make_step(self.model, self.opt, self.criterion, autocast=self.autocast,
                                         scaler=self.scaler, no_sync=self.no_sync, mode=self.cfg.train.cuda_graph,
                                         device=self.device)
        step.meter = meter
        return step

    @torch.no_grad()
    def _predict(self, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of a split in dataset order, gathered from all ranks (each row once)."""
        self.model.eval()
        idx, outs, ys = [], [], []
        with self.opt.unperturbed():
            for batch in loader:
                with self.autocast():
                    outs.append(self.raw(self.inputs(batch["image"])).float())
                ys.append(batch["label"])
                idx.append(torch.as_tensor(batch["index"]))
        self.model.train()
        part = (torch.cat(idx).numpy(), torch.cat(outs).cpu().numpy(), torch.cat(ys).numpy())
        parts = gather(part, self.ctx)
        index = np.concatenate([p[0] for p in parts])
        _, first = np.unique(index, return_index=True)  # DistributedSampler pads with repeats
        logits = np.concatenate([p[1] for p in parts])[first]
        labels = np.concatenate([p[2] for p in parts])[first]
        return logits, labels

    def _reduced_summary(self, meter: TrainMeter) -> dict[str, float]:
        if self.ctx.enabled:
            for t in (meter.loss_sum, meter.correct, meter.count):
                torch.distributed.all_reduce(t)
        return meter.summary()

    def _end_epoch(self, meter: TrainMeter, seconds: float) -> None:
        cfg = self.cfg.train
        train = self._reduced_summary(meter)
        record = {"epoch": float(self.epoch + 1), "train/loss": train["loss"], "train/accuracy": train["accuracy"],
                  "train/images_per_s": meter.images_per_s, "lr": self.scheduler.get_last_lr()[0],
                  "epoch_time_s": seconds}
        rho = self.opt.param_groups[0].get("rho")
        if rho is not None:
            record["rho"] = float(rho)
        if self.device.type == "cuda":  # issue 23: sizes how many cells share one GPU (docs/gpu.md)
            record["gpu/peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.val_loader is not None:
            record.update(classification_metrics(*self._predict(self.val_loader), self.class_names))
            value = record[MONITOR_KEYS[cfg.monitor]]
        else:
            value = float(self.epoch)  # no validation split: the last epoch is the one kept
        improved = bool(broadcast(is_improvement(value, self.best_metric, cfg.monitor)
                                  if self.val_loader is not None else True, self.ctx))
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            with self.opt.unperturbed():
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}
        else:
            self.bad_epochs += 1
        rows = meter.grad_norm_rows()
        self.grad_trace.extend([float(s), a, b] for s, a, b in rows)
        self.history.append(record)
        self.epoch_times.append(seconds)
        self.epoch += 1
        self.step_in_epoch = 0
        patience = cfg.early_stopping_patience
        self.stopped = patience is not None and self.val_loader is not None and self.bad_epochs >= patience
        self._save(None, best=improved)
        self._log_epoch(record, rows)
        if self.ctx.is_main:
            val = f", val {cfg.monitor} {value:.4f}" if self.val_loader is not None else ""
            log.info("epoch %d/%d: train loss %.4f acc %.3f%s (%.1f s, train %.1f images/s)", self.epoch, cfg.epochs,
                     train["loss"], train["accuracy"], val, seconds, meter.images_per_s)

    # ------------------------------------------------------------------ finish
    def _finish(self) -> tuple[str | None, str | None]:
        """Best weights back in the model; curves, trace, evaluation and the model logged (rank 0)."""
        if self.val_loader is not None and self.best_epoch < 0:
            raise FinishError(f"no epoch gave a finite validation {self.cfg.train.monitor} (it was NaN every time, "
                              f"e.g. AUROC on a validation split with one class), so no model was selected and "
                              f"nothing was evaluated or registered. Monitor val_loss or val_balanced_accuracy, or "
                              f"give the validation split every class; the last weights are in "
                              f"{self.ckpt_dir / ckpt_io.LAST}")
        if self.best_state is not None:
            self.raw.load_state_dict(self.best_state)
        if not self.ctx.is_main:
            return None, None
        cfg = self.cfg
        trace_csv = self.dir / TRACE
        replace_atomically(trace_csv, lambda fh: fh.write("step,grad_norm,grad_norm_gc\n" + "".join(
            f"{int(s)},{a:.8g},{b:.8g}\n" for s, a, b in self.grad_trace)))
        self.metrics_log.close()
        self._stage("curves", f"logging the training curves to {self.uri}", lambda: self._log_training(trace_csv))
        if cfg.evaluation.enabled:
            spec = self._stage("evaluation", "the end-of-training evaluation", self._evaluate)
            if spec is not None:  # the frozen operating point travels with the model
                self.spec = ModelSpec.model_validate(spec)
            self._stage("ood", "fitting the OOD statistics", lambda: fit_and_store_ood(  # issue 20: OOD flags
                self.raw, self.bundle, self.device, self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                self.dir, self.ckpt_dir / ckpt_io.BEST))
        if cfg.sharpness.enabled:
            self._stage("sharpness", "the end-of-training sharpness", self._sharpness)
        if not cfg.tracking.log_model:
            return None, None
        logged = self._stage("model", f"logging the model to {self.uri}", self._log_model)
        return logged["model_uri"], logged["version"]

    def _stage(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        """One step after training, done once per run: ``--resume`` after a failure runs only the stages left, and
        on a finished run none (no second registry version). A failure names the stage; the weights are on disk."""
        path = self.dir / STAGES_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        done = saved.get("done", {}) if saved.get("run_id") == self.run_id else {}
        if key in done:
            return done[key]
        try:
            result = fn()
        except Exception as exc:
            raise FinishError(f"training finished but {what} failed ({type(exc).__name__}: {exc}); the weights "
                              f"are in {self.ckpt_dir / ckpt_io.BEST}; rerun with --resume to finish") from exc
        done[key] = result
        replace_atomically(path, lambda fh: json.dump({"run_id": self.run_id, "done": done}, fh))
        return result

    def _log_training(self, trace_csv: Path) -> None:
        mlflow.log_artifact(str(trace_csv), "training")
        mlflow.log_dict({"history": self.history, "epoch_times": self.epoch_times}, "training/history.json")
        for fig, name in ((figs.curves_figure(self.history, EPOCH_PREFIX), "training/curves.png"),
                          (figs.grad_norm_figure(*zip(*self.grad_trace, strict=True)) if self.grad_trace
                           else None, "training/grad_norm.png")):
            if fig is not None:
                mlflow.log_figure(fig, name)
                figs.close(fig)

    def _log_model(self) -> dict[str, str | None]:
        from medgcsam.inference.package import log_classifier, registered_by_run
        from medgcsam.tracking.lineage import record_lineage

        cfg = self.cfg
        alias = cfg.tracking.alias if cfg.tracking.register_as else None
        if cfg.tracking.register_as and (done := registered_by_run(cfg.tracking.register_as, self.run_id, alias)):
            return done  # registered before a kill stopped this stage being recorded: no second version
        info = log_classifier(self.raw, self.spec, name="model", registered_model_name=cfg.tracking.register_as,
                              alias=alias, ood=stored_ood(self.dir), example_image=self.bundle.train.paths[0])
        version = info.registered_model_version
        record_lineage(cfg, self.spec, self.bundle.manifest_sha256, self.bundle.frames,
                       self.dir / "evaluation" / "evaluation.json",
                       (cfg.tracking.register_as, version) if version is not None else None)
        return {"model_uri": info.model_uri, "version": str(version) if version is not None else None}

    def _evaluate(self) -> dict[str, Any] | None:
        """Operating point and calibration chosen on validation, then reported on every split; returns the
        model spec carrying the frozen threshold (None when there is no validation split to choose it on)."""
        from medgcsam.evaluation.evaluate import evaluate, log_evaluation

        if self.bundle.val is None:
            log.warning("evaluation skipped: it needs a validation split (data.val_fold or split=val rows)")
            return None
        result = evaluate(self.raw, self.bundle, self.spec, self.cfg.evaluation, self.device, self.dir / "evaluation",
                          batch_size=self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                          seed=self.cfg.train.seed)
        log_evaluation(result)
        spec = result.spec.model_dump(mode="json")
        best = self.ckpt_dir / ckpt_io.BEST
        if best.is_file():  # the checkpoint serves `predict` too, so it carries the frozen threshold as well
            ckpt_io.update_checkpoint(best, spec=spec)
        return spec

    def _sharpness(self) -> None:
        """Hessian sharpness of the selected weights on a fixed, augmentation-free subset of the train split."""
        from medgcsam.sharpness.compute import compute_sharpness, log_sharpness

        out = self.dir / "sharpness"
        metrics = compute_sharpness(self.raw, self.bundle.train.without_augmentation(), self.cfg.sharpness,
                                    self.device, out)
        if self.device.type == "cuda":  # issue 23: the Hessian products may set the run's memory peak
            metrics["gpu/peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        log_sharpness(metrics, out)

    def run(self, resume: bool, parent_run_id: str | None) -> TrainResult:
        cfg = self.cfg
        self._check_tracking()
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self._build()
        self._check_registry()
        if self.ctx.is_main:  # before anything is written: one process per run folder; its killed writes' temps
            self.lock.enter_context(ckpt_io.lock_run(self.dir))
            ckpt_io.remove_stale_files(self.ckpt_dir, *(self.dir / n for n in (STAGES_FILE, UNSENT, TRACE)))
        state = self._resume() if resume else None
        if state is None and (self.ckpt_dir / ckpt_io.LAST).is_file() and self.ctx.is_main:
            log.warning("starting a new run over the checkpoints in %s (pass --resume to continue them)",
                        self.ckpt_dir)
        status = "FAILED"
        try:
            # inside the try: a run whose setup fails is ended FAILED, not left to MLflow's exit hook (FINISHED)
            self._start_run(resumed=state is not None, parent_run_id=parent_run_id)
            pending_rng = state["rng"] if state is not None and state["step"] > 0 else None
            meter_state = state["meter"] if pending_rng is not None else None
            while self.epoch < cfg.train.epochs and not self.stopped:
                tick = time.perf_counter()
                meter = self._train_epoch(pending_rng, meter_state)
                pending_rng = meter_state = None
                self._end_epoch(meter, time.perf_counter() - tick)
            model_uri, version = self._finish()
            status = "FINISHED"
        except BaseException as exc:
            if interrupted(exc):
                status = "KILLED"
            raise
        finally:
            if self.metrics_log is not None and self.metrics_log.pending:  # a failed run keeps its curves too
                self.metrics_log.close(retry_for_s=cfg.tracking.connect_timeout_s)
            if self.ctx.is_main and mlflow.active_run() is not None:
                with fail_fast_http(cfg.tracking.connect_timeout_s), contextlib.suppress(Exception):
                    mlflow.end_run(status)
        best = self.ckpt_dir / ckpt_io.BEST
        metrics = dict(self.history[self.best_epoch]) if 0 <= self.best_epoch < len(self.history) else {}
        return TrainResult(
            run_id=broadcast(self.run_id, self.ctx), experiment_id=broadcast(self.experiment_id, self.ctx),
            checkpoint_dir=self.ckpt_dir, best_checkpoint=best if best.is_file() else None, model_uri=model_uri,
            registered_version=version, best_epoch=self.best_epoch + 1, metrics=metrics,
            epoch_times=list(self.epoch_times), wall_time=time.perf_counter() - self.started, model=self.raw)


def interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C or SIGTERM, also when a library turned it into its own error on the way out: an interrupt inside
    ``torch.save`` surfaces as the zip writer's RuntimeError, which would otherwise end the run FAILED."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and norm parameters get no weight decay (standard for both CNNs and ViTs)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    if weight_decay == 0 or not no_decay:
        return [{"params": decay + no_decay}]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

