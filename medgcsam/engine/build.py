"""Every object a pipeline's training needs, built from its ``PipelineConfig``: data, model, optimizer, schedule.

``train(cfg)`` hands these to the loop (``engine.loop.Trainer``); a notebook can build its own instead. The
order of construction is fixed (the model is created right after ``seed_everything``), so a seed gives the same
initial weights whichever caller builds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.data.datasets import BatchInputs, DataBundle, build_datasets, build_loaders
from medgcsam.data.device_cache import DeviceBatches, build_device_batches
from medgcsam.engine.distributed import DistContext
from medgcsam.engine.loop import seed_everything
from medgcsam.engine.schedule import build_scheduler
from medgcsam.engine.step import autocast_factory
from medgcsam.models.factory import create_model, input_spec
from medgcsam.models.spec import ModelSpec, Preprocessing
from medgcsam.optim import WrappedOptimizer, create_optimizer


@dataclass
class Built:
    """What ``build`` made; ``model`` is the bare module, ``ddp`` its DistributedDataParallel wrapper (or None)."""

    bundle: DataBundle
    loaders: dict[str, DataLoader]
    device_batches: DeviceBatches | None
    inputs: BatchInputs
    class_names: list[str]
    spec: ModelSpec
    model: nn.Module
    ddp: nn.Module | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    optimizer: WrappedOptimizer
    scheduler: LRScheduler
    steps_per_epoch: int


def build(cfg: PipelineConfig, ctx: DistContext) -> Built:
    """Datasets and loaders, the model card, the model (seeded), loss, optimizer and LR schedule of ``cfg``."""
    dcfg, device = cfg.data, ctx.device
    with torch.device("meta"):  # only the backbone's data config is needed here, no weights
        probe = create_model(cfg.model.name, 2, in_chans=dcfg.channels, image_size=dcfg.image_size)
    in_spec = input_spec(probe, dcfg.image_size, dcfg.channels)
    bundle = build_datasets(dcfg, in_spec)
    loaders = build_loaders(bundle, dcfg, distributed=ctx.enabled, seed=cfg.train.seed)
    if loaders.get("val") is None and cfg.train.early_stopping_patience is not None:
        raise ConfigError("train.early_stopping_patience needs a validation split to watch; set data.val_fold "
                          "(or give the manifest split=val rows), or remove the patience")
    inputs = BatchInputs(in_spec, device)
    # issue 23: GPU-resident train batches (None: the DataLoader); DDP shards through its sampler instead
    device_batches = None if ctx.enabled else build_device_batches(
        bundle.train, dcfg.batch_size, device, seed=cfg.train.seed, mode=dcfg.device_cache)
    class_names = list(bundle.class_names)
    check_evaluation(cfg, class_names, bundle)
    spec = ModelSpec(
        backbone=cfg.model.name, num_classes=len(class_names), in_chans=dcfg.channels, class_names=class_names,
        preprocessing=Preprocessing(image_size=in_spec.image_size, channels=dcfg.channels, mean=list(in_spec.mean),
                                    std=list(in_spec.std), modality=dcfg.modality,
                                    dicom_multiframe=dcfg.dicom_multiframe),
        manifest_sha256=bundle.manifest_sha256, config_sha256=cfg.sha256())

    seed_everything(cfg.train.seed)
    model = create_model(cfg.model.name, len(class_names), in_chans=dcfg.channels,
                         pretrained_path=cfg.model.pretrained_path, drop_rate=cfg.model.drop_rate,
                         drop_path_rate=cfg.model.drop_path_rate, image_size=in_spec.image_size)
    model.to(device)
    ddp = None
    if ctx.enabled:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    autocast = autocast_factory(device, cfg.train.amp)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and device.type == "cuda" else None
    criterion = nn.CrossEntropyLoss(weight=class_weights(cfg, bundle, class_names, device),
                                    label_smoothing=cfg.train.label_smoothing)
    ocfg = cfg.optimizer
    optimizer = create_optimizer(
        ocfg.name, param_groups(model, ocfg.weight_decay), base=ocfg.base, model=model, grad_scaler=scaler,
        max_grad_norm=cfg.train.grad_clip, accumulation_steps=cfg.train.accumulation_steps, lr=ocfg.lr,
        weight_decay=ocfg.weight_decay, **ocfg.hyperparameters)
    steps = len(loaders["train"])
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps % cfg.train.accumulation_steps:
        # an epoch-end checkpoint (and a warm start's switch of optimizer) would fall inside a cycle
        raise ConfigError(f"train.accumulation_steps {cfg.train.accumulation_steps} does not divide the "
                          f"{steps} steps of an epoch; change data.batch_size, "
                          f"train.accumulation_steps or train.max_steps_per_epoch so that it does")
    scheduler = build_scheduler(optimizer.base, cfg.train, max(1, steps // cfg.train.accumulation_steps))
    return Built(bundle, loaders, device_batches, inputs, class_names, spec, model, ddp, autocast, scaler,
                 criterion, optimizer, scheduler, steps)


def check_evaluation(cfg: PipelineConfig, class_names: list[str], bundle: DataBundle) -> None:
    """Evaluation settings that need the class list, refused before training rather than after it."""
    ecfg = cfg.evaluation
    if not ecfg.enabled:
        return
    if ecfg.positive_class is not None and ecfg.positive_class not in class_names:
        raise ConfigError(f"evaluation.positive_class {ecfg.positive_class!r} is not a class of "
                          f"{cfg.data.manifest} ({class_names}); set it to one of them or remove it")
    unknown = [s for s in ecfg.splits if s not in bundle.frames]
    if unknown:
        raise ConfigError(f"evaluation.splits {unknown} are not splits of this data (it has "
                          f"{sorted(bundle.frames)}); list only those, e.g. [val, test]")


def class_weights(cfg: PipelineConfig, bundle: DataBundle, class_names: list[str],
                  device: torch.device) -> torch.Tensor | None:
    spec = cfg.train.class_weights
    if spec == "none":
        return None
    if spec == "balanced":
        counts = torch.bincount(bundle.train.labels, minlength=len(class_names)).double()
        if (counts == 0).any():
            missing = [c for c, n in zip(class_names, counts.tolist(), strict=True) if n == 0]
            raise ValueError(f"train.class_weights=balanced but the train split has no {missing} images; "
                             f"give explicit weights or fix the split")
        weights = counts.sum() / (len(counts) * counts)
    else:
        if len(spec) != len(class_names):
            raise ConfigError(f"train.class_weights has {len(spec)} values for {len(class_names)} "
                              f"classes {class_names}; give one weight per class in that order")
        weights = torch.tensor(spec, dtype=torch.float64)
    return weights.float().to(device)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and norm parameters get no weight decay (standard for both CNNs and ViTs)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    if weight_decay == 0 or not no_decay:
        return [{"params": decay + no_decay}]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_params(cfg: PipelineConfig, built: Built) -> dict[str, str]:
    """What actually runs, defaults included: the YAML holds only what was set (GCSAM's perturbation norm,
    Adam's betas), and an AMP setting the device cannot honour runs in float32."""
    out = {f"effective.optimizer.{k}": str(v) for k, v in built.optimizer.hp.items()}
    out.update({f"effective.base.{k}": str(v) for k, v in built.optimizer.base.defaults.items()
                if isinstance(v, int | float | str | tuple | bool | type(None))})
    out["effective.amp"] = "none" if built.autocast is contextlib.nullcontext else cfg.train.amp
    return out
