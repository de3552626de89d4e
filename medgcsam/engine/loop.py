"""The training loop: built objects in (model, optimizer, loaders, a step, a schedule), events out to handlers.

One code path for one process and ``torchrun``. A step never synchronizes with the host (metrics and gradient
norms stay on the device and are read between steps), and the train batch shape is fixed (loaders drop the last
partial batch), so the step can be captured in a CUDA graph: the step object is the seam where
``engine.graphed.make_step`` plugs the graphed step in.

Exact resume: every epoch reseeds Python/NumPy/torch and the sampler's shuffle from ``(seed, epoch)``
(augmentation is seeded by each batch's indices); a mid-epoch resume replays the epoch's loader up to the saved
step without training on it, then restores the RNG states saved with the weights.

Handlers see ``on_start``, ``on_epoch_start``, ``on_step_end`` (between steps), ``on_improvement`` and
``on_epoch_end`` (in that order, after the loop updated ``state``), ``on_end`` (best weights back in the model)
and ``on_close`` (always, with FINISHED, FAILED or KILLED), in the order they are given.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medgcsam.checkpoint import restore_rng
from medgcsam.engine.distributed import DistContext, broadcast, gather
from medgcsam.engine.graphed import Autocast, EagerStep, GraphMode, make_step
from medgcsam.engine.metrics import MONITOR_KEYS, TrainMeter, classification_metrics, is_improvement
from medgcsam.engine.state import TrainState, pending


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed per (run seed, epoch): epochs differ, reruns agree."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]) & 0x7FFFFFFF


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


@dataclass
class EpochEnd:
    """What an epoch gave: its record (the logged curves), gradient-norm rows, the monitored value, and
    whether it improved on the best so far (its weights are then ``trainer.best_state``)."""

    record: dict[str, float]
    grad_rows: list[tuple[int, float, float]]
    value: float
    improved: bool
    meter: TrainMeter


class Handler:
    """Reacts to the loop's events; every method is optional."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, meter: TrainMeter) -> None: ...
    def on_improvement(self, trainer: Trainer, end: EpochEnd) -> None: ...
    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...
    def on_close(self, trainer: Trainer, status: str) -> None: ...


def _batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images, labels and dataset indices of a batch: a dict (``image``, ``label``, ``index``) or a tuple."""
    if isinstance(batch, Mapping):
        return batch["image"], batch["label"], batch.get("index")
    images, labels = batch[0], batch[1]
    return images, labels, None


class Trainer:
    """Train ``model`` with ``optimizer`` (any ``medgcsam.optim`` method) on ``loaders["train"]``, selecting the
    epoch by ``monitor`` on ``loaders["val"]`` when given (else the last epoch is kept).

    ``loaders`` yield dicts ``{"image", "label", "index"}`` or ``(images, labels)`` tuples; ``inputs`` finishes
    an image batch on the device (default: move it). ``train_batches`` replaces the train loader's iteration
    (``DeviceBatches``). ``scheduler`` steps once per optimizer step. ``step_builder`` makes the step object
    (``make_step``: eager, or a captured CUDA graph per ``cuda_graph``). ``ddp`` is the DistributedDataParallel
    wrapper of ``model`` under torchrun. Nothing here tracks or writes files: handlers do.
    """

    def __init__(self, model: nn.Module, optimizer: Any, loaders: Mapping[str, Iterable], *, epochs: int,
                 criterion: nn.Module | None = None, scheduler: Any = None, class_names: Sequence[str] | None = None,
                 monitor: str = "val_balanced_accuracy", handlers: Sequence[Handler] = (),
                 device: torch.device | str | None = None, inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 autocast: Autocast | None = None, scaler: torch.amp.GradScaler | None = None,
                 ddp: nn.Module | None = None, ctx: DistContext | None = None, seed: int = 0,
                 steps_per_epoch: int | None = None, warm_start_epochs: int = 0, grad_norm_every: int = 1,
                 ddp_perturbation: str = "local", cuda_graph: GraphMode = "auto", train_batches: Any = None,
                 step_builder: Callable[..., EagerStep] = make_step) -> None:
        if monitor not in MONITOR_KEYS:
            raise ValueError(f"monitor must be one of {sorted(MONITOR_KEYS)}, got {monitor!r}")
        self.device = torch.device(device) if device is not None else optimizer.device
        self.ctx = ctx or DistContext(0, 1, 0, self.device, False)
        self.raw = model
        self.model = ddp if ddp is not None else model
        self.optimizer = optimizer
        self.train_loader, self.val_loader = loaders["train"], loaders.get("val")
        self.train_batches = train_batches
        self.epochs, self.monitor, self.seed = epochs, monitor, seed
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.class_names = list(class_names) if class_names is not None else None
        self.handlers = list(handlers)
        self.inputs = inputs or (lambda images: images.to(self.device, non_blocking=True))
        self.autocast: Autocast = autocast or contextlib.nullcontext
        self.scaler = scaler
        self.steps_per_epoch = steps_per_epoch or len(self.train_loader)
        self.warm_start_epochs, self.grad_norm_every = warm_start_epochs, grad_norm_every
        self.ddp_perturbation, self.cuda_graph, self.step_builder = ddp_perturbation, cuda_graph, step_builder
        self.state = TrainState(model, optimizer, scheduler, scaler)
        self.resumed_from: dict[str, Any] | None = None  # the checkpoint ``resume`` loaded
        self.best_state: dict[str, torch.Tensor] | None = None  # the selected epoch's weights, on the CPU
        self.no_sync: frozenset[int] = frozenset()
        self.step: EagerStep | None = None

    # ------------------------------------------------------------------ public
    def resume(self, payload: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint (``TrainState.state_dict``) and the best weights it names."""
        self.state.load_state_dict(payload)
        self.resumed_from, self.best_state = payload, best_state

    def fit(self) -> TrainState:
        """Train until ``epochs`` or a handler stops it; the selected weights end up in the model."""
        status = "FAILED"
        try:
            self._emit("on_start")
            pending_rng, meter_state = pending(self.resumed_from)
            while self.state.epoch < self.epochs and not self.state.stopped:
                tick = time.perf_counter()
                meter = self._train_epoch(pending_rng, meter_state)
                pending_rng = meter_state = None
                self._end_epoch(meter, time.perf_counter() - tick)
            if self.best_state is not None:
                self.raw.load_state_dict(self.best_state)
            self._emit("on_end")
            status = "FINISHED"
        except BaseException as exc:
            if interrupted(exc):
                status = "KILLED"
            raise
        finally:
            self._emit("on_close", status)
        return self.state

    def _emit(self, event: str, *args: Any) -> None:
        for handler in self.handlers:
            getattr(handler, event)(self, *args)

    # ------------------------------------------------------------------ one epoch
    def _seed_epoch(self, epoch: int) -> None:
        seed = epoch_seed(self.seed, epoch)
        seed_everything(seed)
        sampler = getattr(self.train_loader, "sampler", None)
        if getattr(sampler, "generator", None) is not None:  # RandomSampler: the shuffle of this epoch
            sampler.generator.manual_seed(seed)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler
            sampler.set_epoch(epoch)

    def _train_epoch(self, pending_rng: dict[str, Any] | None, meter_state: dict[str, Any] | None) -> TrainMeter:
        st, opt = self.state, self.optimizer
        self.model.train()
        warm = st.epoch < self.warm_start_epochs
        if opt.base_only != warm:  # set only on change: accumulation may span an epoch boundary
            opt.base_only = warm
        # recomputed per epoch: a warm-start (single-pass) epoch must all-reduce its only pass
        self.no_sync = opt.no_sync_passes(self.ddp_perturbation) if self.ctx.enabled else frozenset()
        self._seed_epoch(st.epoch)
        meter = TrainMeter(self.device, self.steps_per_epoch)
        if meter_state:
            meter.load_state_dict(meter_state)
        if self.train_batches is not None:  # issue 23: seeded by (seed, epoch, index); a resume skips, no replay
            batches: Iterator = self.train_batches.epoch(st.epoch, start=st.step)
        else:
            batches = iter(self.train_loader)
            for _ in range(st.step):  # replay the loader to where the checkpoint was taken
                next(batches)
        if pending_rng is not None:
            restore_rng(pending_rng)
        self._emit("on_epoch_start")
        tick, seen = time.perf_counter(), 0
        accumulation = opt.accumulation_steps
        while st.step < self.steps_per_epoch:
            images, labels, _ = _batch(next(batches))
            images = self.inputs(images)
            labels = labels.to(self.device, non_blocking=True)
            self._step(meter)(images, labels)  # issue 23: graphed or eager (engine.graphed.make_step)
            st.global_step += 1
            st.step += 1
            seen += images.shape[0]
            if st.global_step % self.grad_norm_every == 0:
                meter.record_grad_norms(st.global_step, opt.stats, centralized=not opt.base_only)
            if st.global_step % accumulation == 0 and st.scheduler is not None:
                st.scheduler.step()
            meter.images_per_s = seen * self.ctx.world_size / max(time.perf_counter() - tick, 1e-9)
            self._emit("on_step_end", meter)
        meter.images_per_s = seen * self.ctx.world_size / max(time.perf_counter() - tick, 1e-9)
        return meter

    def _step(self, meter: TrainMeter) -> EagerStep:
        """issue 23: the step object, built once (a graph is captured once per run), given this epoch's meter."""
        if self.step is None or self.step.no_sync != self.no_sync:
            self.step = self.step_builder(self.model, self.optimizer, self.criterion, autocast=self.autocast,
                                          scaler=self.scaler, no_sync=self.no_sync, mode=self.cuda_graph,
                                          device=self.device)
        self.step.meter = meter
        return self.step

    @torch.no_grad()
    def predict(self, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of a split in dataset order, gathered from all ranks (each row once)."""
        self.model.eval()
        idx, outs, ys, seen = [], [], [], 0
        with self.optimizer.unperturbed():
            for batch in loader:
                images, labels, index = _batch(batch)
                with self.autocast():
                    outs.append(self.raw(self.inputs(images)).float())
                ys.append(labels)
                idx.append(torch.as_tensor(index) if index is not None else torch.arange(seen, seen + len(labels)))
                seen += len(labels)
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

    def _lr(self) -> float:
        if self.state.scheduler is not None:
            return self.state.scheduler.get_last_lr()[0]
        return float(self.optimizer.param_groups[0]["lr"])

    def _end_epoch(self, meter: TrainMeter, seconds: float) -> None:
        st = self.state
        train = self._reduced_summary(meter)
        record = {"epoch": float(st.epoch + 1), "train/loss": train["loss"], "train/accuracy": train["accuracy"],
                  "train/images_per_s": meter.images_per_s, "lr": self._lr(), "epoch_time_s": seconds}
        rho = self.optimizer.param_groups[0].get("rho")
        if rho is not None:
            record["rho"] = float(rho)
        if self.device.type == "cuda":  # issue 23: sizes how many cells share one GPU (docs/gpu.md)
            record["gpu/peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.val_loader is not None:
            logits, labels = self.predict(self.val_loader)
            names = self.class_names or [str(i) for i in range(logits.shape[1])]
            record.update(classification_metrics(logits, labels, names))
            value = record[MONITOR_KEYS[self.monitor]]
        else:
            value = float(st.epoch)  # no validation split: the last epoch is the one kept
        improved = bool(broadcast(is_improvement(value, st.best_metric, self.monitor)
                                  if self.val_loader is not None else True, self.ctx))
        if improved:
            st.best_metric, st.best_epoch, st.bad_epochs = value, st.epoch, 0
            with self.optimizer.unperturbed():
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}
        else:
            st.bad_epochs += 1
        rows = meter.grad_norm_rows()
        st.grad_trace.extend([float(s), a, b] for s, a, b in rows)
        st.history.append(record)
        st.epoch_times.append(seconds)
        st.epoch += 1
        st.step = 0
        end = EpochEnd(record, rows, value, improved, meter)
        if improved:
            self._emit("on_improvement", end)
        self._emit("on_epoch_end", end)
