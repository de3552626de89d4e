"""The one configuration model of medgcsam, read from YAML in `pipelines/`.

Every command takes a pipeline file and optional ``--set a.b=value`` overrides; a bad
field fails here, before any data is read or any model is built, with the field and reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images are and how they become tensors."""

    manifest: Path
    root: Path | None = Field(None, description="Image paths are relative to this; default: manifest folder")
    task: str | None = Field(None, description="Label map applied to the manifest (bus_binary, bus_3class, ...)")
    classes: list[str] | None = Field(None, description="Class order; default: sorted labels after mapping")
    modality: Literal["ultrasound", "xray", "generic"] = "generic"
    image_size: int | None = Field(None, ge=8, description="Square input size; default: backbone's")
    channels: Literal[1, 3] = 3
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: Path | None = None
    augment: bool = True
    aug_backend: Literal["monai", "albumentations", "batched"] = "batched"
    device_cache: Literal["auto", "on", "off"] = Field("auto", description="Keep the uint8 train split on the GPU "
                                                       "and augment there (auto: on CUDA when it fits)")
    val_fold: int | None = Field(0, ge=0, description="Fold of the train split used for validation")
    dicom_multiframe: Literal["first", "middle", "error"] = "middle"  # also the page of a multi-page TIFF
    allow_leakage: bool = Field(False, description="Train although splits share images/patients or an image has "
                                                   "two labels (what `manifest validate` rejects); logged as a param")

    @field_validator("task")
    @classmethod
    def _task_known(cls, v: str | None) -> str | None:
        # a misspelt task would otherwise surface as a KeyError traceback once the manifest is being read
        from medgcsam.data.tasks import list_tasks  # medgcsam.data imports this module

        if v is not None and v not in list_tasks():
            raise ValueError(f"unknown task {v!r}; use one of {list_tasks()}")
        return v


class ModelConfig(_Strict):
    """A timm backbone; weights only from a local file, never from a hub."""

    name: str = "resnet18"
    pretrained_path: Path | None = None
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _backbone_known(cls, v: str) -> str:
        # else a misspelt backbone fails only when a model is built: in an experiment, after other cells trained
        from medgcsam.models.factory import timm_name  # medgcsam.models imports this module

        timm_name(v)
        return v


class OptimizerConfig(BaseModel):
    """Optimizer name, base and hyperparameters; extra keys (rho, alpha, gamma, ...) go to the method."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "gcsam"
    base: str = "adam"
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Method-specific keyword arguments (everything but name/base/lr/weight_decay)."""
        return dict(self.model_extra or {})


class TrainConfig(_Strict):
    """Loop settings; every option here is recorded in MLflow as a parameter."""

    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(1.0, ge=0.0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    monitor: Literal["val_loss", "val_accuracy", "val_balanced_accuracy", "val_auroc"] = "val_balanced_accuracy"
    early_stopping_patience: int | None = Field(None, ge=1)
    warm_start_epochs: int = Field(0, ge=0, description="Epochs of the base optimizer before the SAM method")
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    grad_clip: float | None = Field(None, gt=0.0)
    accumulation_steps: int = Field(1, ge=1)
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    ddp_perturbation: Literal["local", "synced"] = "local"
    max_steps_per_epoch: int | None = Field(None, ge=1)
    grad_norm_every: int = Field(1, ge=1, description="Record gradient norms every N steps")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also write last.pt every N steps "
                                               "(mid-epoch resume); default: once per epoch")
    cuda_graph: Literal["auto", "on", "off"] = Field("auto", description="Capture the whole step in a CUDA graph: "
                                                     "auto = on CUDA when possible, else eager with a logged reason")

    @model_validator(mode="after")
    def _checkpoints_between_optimizer_steps(self) -> TrainConfig:
        # a checkpoint holds no half-summed gradient, so it may only fall where an accumulation cycle ends
        every = self.checkpoint_every_steps
        if every is not None and every % self.accumulation_steps:
            raise ValueError(f"checkpoint_every_steps {every} is not a multiple of accumulation_steps "
                             f"{self.accumulation_steps}: a resume would lose the gradients summed so far")
        return self


class TrackingConfig(_Strict):
    """MLflow: embedded sqlite under output_dir unless a URI is given."""

    uri: str | None = None
    experiment: str = "medgcsam"
    run_name: str | None = None
    register_as: str | None = None
    alias: str | None = "champion"
    log_model: bool = True
    connect_timeout_s: float = Field(10.0, gt=0.0)

    # MLflow checks a name and an alias only when the model is registered, after the whole training run
    @field_validator("register_as")
    @classmethod
    def _name_allowed(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or ":" in v or v == "." or v.startswith("..")):
            raise ValueError(f"model name {v!r} is refused by MLflow (empty, '/', ':' or a leading '..'); "
                             f"pick e.g. 'bus-classifier'")
        return v

    @field_validator("alias")
    @classmethod
    def _alias_allowed(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w-]+", v):
            raise ValueError(f"alias {v!r}: MLflow aliases hold only letters, digits, '_' and '-'; pick e.g. "
                             f"'champion'")
        if v is not None and (v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v)):
            raise ValueError(f"alias {v!r} is reserved by MLflow (latest, v<digits>); pick e.g. 'champion'")
        return v


class EvaluationConfig(_Strict):
    """Clinical evaluation run at the end of training (and by `medgcsam evaluate`)."""

    enabled: bool = True
    positive_class: str | None = Field(None, description="Class whose probability is thresholded")
    operating_point: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float | None = Field(None, gt=0.0, le=1.0)
    bootstrap: int = Field(1000, ge=0)
    ece_bins: int = Field(15, ge=2)
    splits: list[str] = ["val", "test"]

    @model_validator(mode="after")
    def _target_needs_value(self) -> EvaluationConfig:
        if self.operating_point == "sensitivity" and self.target_sensitivity is None:
            raise ValueError("operating_point 'sensitivity' needs target_sensitivity (e.g. 0.95)")
        return self


class SharpnessConfig(_Strict):
    """Hessian sharpness on a fixed augmentation-free subset of the training split."""

    enabled: bool = False
    n_samples: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    top_k: int = Field(1, ge=1)
    method: Literal["lanczos", "power"] = Field("lanczos", description="power = PyHessian-compatible iteration")
    tol: float = Field(1e-3, gt=0.0, description="Relative residual (lanczos) or change (power) to stop at")
    start: Literal["gradient", "random"] = Field(
        "gradient", description="Lanczos start: the loss gradient (plus 10% noise; few products) or a Gaussian")
    lanczos_steps: int = Field(30, ge=2)
    trace_probes: int = Field(50, ge=0, description="Hutchinson probes; 0 skips the trace")
    density_probes: int = Field(1, ge=0, description="SLQ runs; 0 skips the density (each costs density_steps HVPs)")
    density_steps: int = Field(80, ge=2)
    graph_memory_gb: float | None = Field(
        None, ge=0.0, description="Memory for keeping every batch's first-order graph between products (about "
        "1.45x faster when there are several batches); None: half of what is free on the device; 0: rebuild "
        "them per product (a single batch's graph is always kept: rebuilding it would save no memory)")
    seed: int = 0

    @model_validator(mode="after")
    def _enough_lanczos_steps(self) -> SharpnessConfig:
        if self.method == "lanczos" and self.top_k > self.lanczos_steps:
            raise ValueError(f"top_k={self.top_k} needs lanczos_steps >= {self.top_k} (got {self.lanczos_steps}): "
                             f"Lanczos finds at most one eigenvalue per step")
        return self


class PipelineConfig(_Strict):
    """A whole pipeline: data, model, optimizer, loop, tracking, evaluation, sharpness."""

    name: str = "medgcsam"
    output_dir: Path = Path("outputs")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    sharpness: SharpnessConfig = SharpnessConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``optimizer.rho``), the form MLflow parameters take."""
        return _flatten(json.loads(self.model_dump_json()))

    def sha256(self) -> str:
        """Hash of the full resolved config, stored in checkpoints to refuse a mismatched resume."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A pipeline file or override that cannot be used; the message names the field and the fix."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (``0.1`` is a float, ``[1,2]`` a list)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        try:
            node[keys[-1]] = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc}); quote text that holds "
                              f"': ', brackets or braces") from None
    return raw


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: PyYAML (YAML 1.1) reads ``1e-1`` or ``5e-2`` as strings, and in a free-form section
    (optimizer hyperparameters) a string would reach the optimizer instead of the number that was meant.
    A key given twice in one mapping is an error: PyYAML keeps the last value and drops the first unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # refused by the base class with its own message
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}; keep one of them",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Safe YAML with 1.2 floats (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: str | Path, kind: str, hint: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, with ``a.b=v`` overrides applied (pipelines, experiments)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} does not exist")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping ({hint})")
    return apply_overrides(raw, overrides or [])


def validated(model: type[M], raw: dict[str, Any], heading: str) -> M:
    """``model.model_validate(raw)``, with every error listed as ``field.path: reason`` under ``heading``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [heading]
        lines += [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply overrides, validate; relative data paths resolve against the YAML."""
    path = Path(path)
    raw = read_mapping(path, "pipeline", "sections data, model, optimizer, ...", overrides)
    cfg = validated(PipelineConfig, raw, f"{path}: invalid configuration")
    base = path.resolve().parent
    data = cfg.data
    if not data.manifest.is_absolute():
        data.manifest = (base / data.manifest).resolve()
    if data.root is not None and not data.root.is_absolute():
        data.root = (base / data.root).resolve()
    return cfg
