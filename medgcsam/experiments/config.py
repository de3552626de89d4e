"""The experiment file: a base pipeline plus the grid, the presets, the selection protocol and the report.

An experiment YAML names a base pipeline (a path relative to the experiment file, or an inline
mapping), the methods to compare, extra grid axes as dotted keys, and the seeds. Everything is
validated here, and every cell's pipeline is built and validated, before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medgcsam.config import ConfigError, PipelineConfig, apply_overrides, load_yaml, read_mapping, validated
from medgcsam.metrics import defined

from .presets import PRESETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Axis(_Strict):
    """One grid axis; ``methods`` restricts it to some methods (a rho axis means nothing to Adam)."""

    values: list[Any] = Field(min_length=1)
    methods: list[str] | None = Field(None, min_length=1)  # [] would silently drop the axis from every method


class Method(_Strict):
    """A compared method: the optimizer preset it starts from plus its own overrides."""

    preset: str | None = Field(None, description="Key of PRESETS; default: optimizer.name or the method label")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides on top of the preset")


class SelectionConfig(_Strict):
    """Stratified k-fold CV inside the training partition, then one final fit per chosen candidate.

    Candidates per method are lists of dotted overrides. A CV cell's score is ``metric`` at the
    epoch the engine kept (its best epoch on the validation fold). The final fit is evaluated once
    on test. ``final_val_fold``: the engine's evaluation fits the temperature and operating point
    on a validation split, so by default the final fit keeps fold 0 as validation (trains on
    (k-1)/k of the training partition); null trains on all of it (the paper's wording), which
    gives test metrics only if the engine can evaluate without a validation split.
    """

    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    metric: str = "val_epoch/balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    candidates: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    final_epochs: int | None = Field(None, ge=1)
    final_val_fold: int | None = Field(0, ge=0)

    @model_validator(mode="after")
    def _final_fold_is_a_fold(self) -> SelectionConfig:
        if self.final_val_fold is not None and self.final_val_fold >= self.folds:  # else it fails after the whole CV
            raise ValueError(f"final_val_fold {self.final_val_fold} is not one of the {self.folds} folds "
                             f"0..{self.folds - 1}")
        return self

    @field_validator("metric")
    @classmethod
    def _per_epoch(cls, v: str) -> str:
        if v.startswith(("val/", "test/")):
            raise ValueError(f"{v!r} is logged by the end-of-training evaluation, which CV cells skip; select on a "
                             f"per-epoch curve such as {'val_epoch/' + v.split('/', 1)[1]!r}")
        return _defined(v)


class ReportConfig(_Strict):
    """Which MLflow metrics of a cell the report aggregates, and which methods are the paired baselines."""

    metrics: dict[str, str] = Field(
        default_factory=lambda: {
            "test accuracy": "test/accuracy",
            "test balanced accuracy": "test/balanced_accuracy",
            "test AUROC": "test/auroc_macro",
            "test ECE": "test/ece",
            "top Hessian eigenvalue": "hessian_top_eig",
        },
        description="Label -> MLflow metric key (last value of the cell's run)",
    )
    primary: str = Field("test accuracy", description="Label used for paired comparisons and the rho curve")
    baselines: list[str] = Field(default_factory=lambda: ["sam", "adam"])
    time_reference: str = Field("adam", description="Method whose time per epoch is 1.0")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    grad_norm_key: str = Field("train/grad_norm", description="Per-step gradient-norm metric of a cell")
    predictions_artifact: str | None = Field(
        "evaluation/predictions_test.csv", description="Per-image test predictions (path|row, label, argmax_label)")
    landscape_points: int = Field(0, ge=0, description="1-D loss-landscape points per final cell (0: none)")
    landscape_artifact: str = "landscape/landscape_1d.npz"

    @field_validator("metrics")
    @classmethod
    def _metrics_defined(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v.values():
            _defined(key)
        return v

    @model_validator(mode="after")
    def _primary_known(self) -> ReportConfig:
        if self.primary not in self.metrics:
            raise ValueError(f"report.primary {self.primary!r} is not a label of report.metrics {list(self.metrics)}")
        return self


class SchedulingConfig(_Strict):
    """What one cell asks of the Ray cluster it runs on, and how its runner holds it (see ``scheduler``/``lease``).

    ``num_gpus`` is a fraction of one GPU (0.2: five cells share a GPU), ``memory_gb`` a reservation Ray
    schedules by (it does not cap the process). ``max_retries``: how often a cell whose worker or node was lost
    starts again (from its checkpoint where the cells folder is shared). ``lease_ttl_s``: how long a runner
    that stopped renewing its leases (killed, cut off from the tracking store) keeps its cells from others.
    """

    num_cpus: float | None = Field(None, gt=0, description="CPUs (and torch threads) per cell; default: the "
                                   "machine's cores shared by --workers on a local Ray instance, else 1")
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    max_retries: int = Field(2, ge=0)
    lease_ttl_s: float = Field(120.0, ge=10)

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _ray_quantity(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):  # Ray's rule: a fraction of one unit, or whole units
            raise ValueError(f"{v} is neither a fraction of one unit (<= 1) nor a whole number; Ray refuses it")
        return v


class ExperimentConfig(_Strict):
    """A whole experiment; ``cells()`` in :mod:`medgcsam.experiments.grid` expands it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: Path | None = Field(None, description="Base pipeline YAML, relative to the experiment file")
    pipeline: dict[str, Any] | None = Field(None, description="Inline base pipeline (instead of base)")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides applied to every cell")
    methods: dict[str, Method]
    grid: dict[str, Axis] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    selection: SelectionConfig | None = None
    report: ReportConfig = Field(default_factory=ReportConfig)
    output_dir: Path | None = Field(None, description="Default: <base output_dir>/experiments/<name>")
    tracking_uri: str | None = Field(None, description="Default: the base pipeline's tracking.uri")
    keep_checkpoints: bool = Field(False, description="Keep each finished cell's checkpoints (resnet18: ~90 MB)")
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_from_list(cls, v: Any) -> Any:
        """``methods: [adam, sam]`` is shorthand for presets of the same names."""
        if isinstance(v, list):
            return {str(name): {} for name in v}
        if isinstance(v, dict):
            return {k: ({} if spec is None else spec) for k, spec in v.items()}
        return v

    @field_validator("grid", mode="before")
    @classmethod
    def _axes_from_lists(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"values": a} if isinstance(a, list) else a) for k, a in v.items()}
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a value; each seed must appear once")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if (self.base is None) == (self.pipeline is None):
            raise ValueError("give exactly one of 'base' (a pipeline YAML path) or 'pipeline' (inline mapping)")
        if not self.methods:
            raise ValueError("methods is empty; list at least one method, e.g. methods: [adam, sam, gcsam]")
        for label in self.methods:
            preset = self.preset_of(label)
            if preset not in PRESETS:
                raise ValueError(f"method {label!r}: no preset {preset!r}; known presets: {sorted(PRESETS)}")
        for key, axis in self.grid.items():
            if key in ("train.seed", "data.val_fold"):
                raise ValueError(f"grid axis {key!r} is managed by the experiment; use 'seeds' / 'selection.folds'")
            unknown = [m for m in axis.methods or [] if m not in self.methods]
            if unknown:
                raise ValueError(f"grid axis {key!r}: methods {unknown} are not in methods {list(self.methods)}")
            if len({_canon(v) for v in axis.values}) != len(axis.values):
                raise ValueError(f"grid axis {key!r} repeats a value: {axis.values}")
        if self.selection is not None:
            unknown = [m for m in self.selection.candidates if m not in self.methods]
            if unknown:
                raise ValueError(f"selection.candidates names methods {unknown} not in methods {list(self.methods)}")
            for label, cands in self.selection.candidates.items():
                if not cands:  # no CV cells, then nothing to choose from once "every" CV cell finished
                    raise ValueError(f"selection.candidates of {label!r} is empty; list at least one (an empty "
                                     f"mapping {{}} is the preset), or leave {label!r} out to use its preset")
                clash = {k for c in cands for k in c} & {
                    k for k, a in self.grid.items() if a.methods is None or label in a.methods}
                if clash:
                    raise ValueError(f"selection.candidates of {label!r} set grid axes {sorted(clash)}; a key is "
                                     f"either swept (grid) or selected (candidates), not both")
        return self

    def preset_of(self, label: str) -> str:
        m = self.methods[label]
        return m.preset or str(m.set.get("optimizer.name", label))


def _canon(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Read and validate an experiment YAML; returns it with the raw base pipeline mapping (before overrides).

    ``overrides`` (``a.b=v``) apply to the experiment file itself, e.g. ``seeds=[0]`` for a smoke run.
    """
    path = Path(path)
    raw = read_mapping(path, "experiment", "name, base, methods, grid, seeds, ...", overrides)
    exp = validated(ExperimentConfig, raw, f"{path}: invalid experiment")
    here = path.resolve().parent
    if exp.base is not None:
        base_path = exp.base if exp.base.is_absolute() else here / exp.base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base pipeline {base_path} does not exist; fix 'base:' (relative to {here})")
        base_raw = load_yaml(base_path.read_text(encoding="utf-8")) or {}
        base_dir = base_path.parent
    else:
        base_raw, base_dir = dict(exp.pipeline or {}), here
    _resolve_paths(base_raw, base_dir)
    if exp.output_dir is not None and not exp.output_dir.is_absolute():
        exp.output_dir = here / exp.output_dir
    return exp, base_raw


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make the base pipeline's relative data paths absolute, as load_config does for pipeline files."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("manifest", "root"):
            if data.get(key) is not None and not Path(data[key]).is_absolute():
                data[key] = str((base_dir / data[key]).resolve())


def build_pipeline(base_raw: dict[str, Any], overrides: list[str], where: str) -> PipelineConfig:
    """Validate one cell's pipeline; ``where`` names the cell in the error."""
    import copy

    raw = apply_overrides(copy.deepcopy(base_raw), overrides)
    return validated(PipelineConfig, raw, f"{where}: invalid pipeline after overrides {overrides}")


def _defined(key: str) -> str:
    """A classification metric key must be one ``medgcsam.metrics`` defines (a typo would report nothing)."""
    if not defined(key):
        raise ValueError(f"{key!r} is not a metric medgcsam logs; see medgcsam/metrics.py (e.g. "
                         f"val_epoch/balanced_accuracy, test/auroc_macro, test/sensitivity/<class>, test/op/ppv)")
    return key
