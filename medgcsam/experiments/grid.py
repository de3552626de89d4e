"""Grid expansion: an experiment becomes a list of cells, each one `engine.train` call.

A cell id is a hash of what defines the cell (stage, method, settings, seed, fold), never of its
position in the list, so adding a seed or a method leaves every existing id, and therefore every
finished MLflow run, valid: that is what makes an experiment resumable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import ExperimentConfig
from .presets import PRESETS

Stage = Literal["grid", "cv", "final"]
SEED_KEY = "train.seed"
FOLD_KEY = "data.val_fold"


@dataclass(frozen=True)
class Cell:
    """One training run of the experiment."""

    stage: Stage
    method: str
    settings: dict[str, Any]  # dotted overrides that define the method's configuration (preset + method + axes)
    seed: int
    axes: dict[str, Any] = field(default_factory=dict)  # grid-axis values, for grouping in the report
    fold: int | None = None
    candidate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific overrides (validation fold, splits)

    @property
    def id(self) -> str:
        key = {"stage": self.stage, "method": self.method, "settings": self.settings, "seed": self.seed,
               "fold": self.fold, "extra": self.extra}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Human-readable run name: method, axis values, candidate, fold, seed."""
        parts = [self.stage, self.method]
        parts += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.axes.items()]
        if self.candidate is not None:
            parts.append(f"cand{self.candidate}")
        if self.fold is not None:
            parts.append(f"fold{self.fold}")
        parts.append(f"seed{self.seed}")
        return "/".join(parts)

    def overrides(self) -> list[str]:
        """Every dotted override of this cell, in the form `apply_overrides` takes."""
        merged = {**self.settings, **self.extra, SEED_KEY: self.seed}
        return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


def method_settings(exp: ExperimentConfig, label: str) -> dict[str, Any]:
    """Preset, then the method's own overrides."""
    return {**PRESETS[exp.preset_of(label)], **exp.methods[label].set}


def groups(exp: ExperimentConfig) -> list[tuple[str, dict[str, Any]]]:
    """(method, axis values) for every method and every combination of the axes that apply to it."""
    out = []
    for label in exp.methods:
        keys = [k for k, a in exp.grid.items() if a.methods is None or label in a.methods]
        for values in itertools.product(*(exp.grid[k].values for k in keys)):
            out.append((label, dict(zip(keys, values, strict=True))))
    return out


def group_key(label: str, axes: dict[str, Any]) -> str:
    """Key of a (method, axes) group: selection results and choices are per group (e.g. per backbone)."""
    return label if not axes else f"{label} {json.dumps(axes, sort_keys=True)}"


def grid_cells(exp: ExperimentConfig) -> list[Cell]:
    """The comparison grid: methods x (axes that apply to each method) x seeds."""
    return [Cell("grid", label, {**method_settings(exp, label), **axes}, seed, axes=axes)
            for label, axes in groups(exp) for seed in exp.seeds]


def candidates(exp: ExperimentConfig, label: str, axes: dict[str, Any]) -> list[dict[str, Any]]:
    """Selection candidates of a group (full settings); a method without candidates has only its preset."""
    assert exp.selection is not None
    base = {**method_settings(exp, label), **axes}
    return [{**base, **c} for c in exp.selection.candidates.get(label, [{}])]


def cv_cells(exp: ExperimentConfig) -> list[Cell]:
    """Selection stage: groups x candidates x selection seeds x folds; validation only, test never touched.

    The clinical evaluation (which would score the test split) and sharpness are off in CV cells.
    """
    sel = exp.selection
    if sel is None:
        return []
    extra = {FOLD_KEY: None, "evaluation.enabled": False, "sharpness.enabled": False}
    return [Cell("cv", label, settings, seed, axes=axes, fold=fold, candidate=ci, extra={**extra, FOLD_KEY: fold})
            for label, axes in groups(exp)
            for ci, settings in enumerate(candidates(exp, label, axes))
            for seed, fold in itertools.product(sel.seeds, range(sel.folds))]


def final_cells(exp: ExperimentConfig, chosen: dict[str, int]) -> list[Cell]:
    """Final fit of each group's chosen candidate (``chosen`` by group_key) on the training partition, tested once."""
    sel = exp.selection
    assert sel is not None
    extra: dict[str, Any] = {FOLD_KEY: sel.final_val_fold, "evaluation.splits": ["test"]}
    if sel.final_epochs is not None:
        extra["train.epochs"] = sel.final_epochs
    cells = []
    for label, axes in groups(exp):
        ci = chosen[group_key(label, axes)]
        settings = candidates(exp, label, axes)[ci]
        cells += [Cell("final", label, settings, seed, axes=axes, candidate=ci, extra=extra) for seed in exp.seeds]
    return cells
