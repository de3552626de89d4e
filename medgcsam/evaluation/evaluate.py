"""Clinical evaluation of one model on the validation and test splits.

The order matters and is fixed: predict every split; fit the temperature and choose the
operating point on validation only; freeze both; then score every split with bootstrap intervals
(patients resampled when the manifest has patient ids) and per-source breakdowns. Figures go to a
JSON file, a Markdown report and PNGs in ``out_dir``; :func:`log_evaluation` puts them in MLflow.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from medgcsam.config import EvaluationConfig
from medgcsam.data.manifest import manifest_sha256
from medgcsam.evaluation import plots
from medgcsam.evaluation.calibration import fit_temperature, softmax
from medgcsam.evaluation.operating_point import choose_threshold
from medgcsam.evaluation.predict import predict_split
from medgcsam.evaluation.report import write_report
from medgcsam.metrics import (
    BY_SOURCE,
    binary_counts,
    bootstrap_ci,
    confusion,
    headline,
    per_class,
    row_normalise,
)
from medgcsam.models.spec import ModelSpec, Threshold, decide

_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # characters MLflow accepts in metric keys


@dataclass
class EvaluationResult:
    """Everything measured; ``spec`` carries the frozen threshold for the model card."""

    figures: dict[str, Any]
    spec: ModelSpec
    temperature: float
    threshold: Threshold | None
    out_dir: Path
    files: list[Path] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat ``split/figure`` metrics (point estimates and CI bounds) for MLflow; NaNs dropped."""
        out = {"temperature": self.temperature}
        if self.threshold is not None:
            out["threshold"] = self.threshold.value
        for split, fig in self.figures["splits"].items():
            for key, value in fig["headline"].items():
                out[f"{split}/{key}"] = value
                ci = fig["ci95"].get(key)
                if ci is not None:
                    out[f"{split}/{key}_ci_low"], out[f"{split}/{key}_ci_high"] = ci["low"], ci["high"]
            out[f"{split}/ece_calibrated"] = fig["calibration"]["ece_calibrated"]
        return {_METRIC_NAME.sub("_", k): float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _positive_index(spec: ModelSpec, cfg: EvaluationConfig) -> int | None:
    if cfg.positive_class is not None:
        if cfg.positive_class not in spec.class_names:
            raise ValueError(f"evaluation.positive_class {cfg.positive_class!r} is not a class of this model "
                             f"({spec.class_names}); set it to one of them")
        return spec.class_names.index(cfg.positive_class)
    return 1 if spec.num_classes == 2 else None


def _groups(frame: pd.DataFrame | None) -> np.ndarray | None:
    if frame is None or "patient_id" not in frame.columns:
        return None
    ids = frame["patient_id"].fillna("").astype(str).str.strip()
    missing = (ids == "").to_numpy()
    if missing.all():
        return None
    # images without a patient id are their own group
    return np.where(missing, [f"__row{i}" for i in range(len(ids))], ids.to_numpy())


def check_finite(name: str, logits: np.ndarray, frame: pd.DataFrame | None) -> None:
    """NaN or infinite outputs would be scored as class 0 and only fail later in a plot: name the images now."""
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        where = (frame["path"].iloc[bad[:3]].tolist() if frame is not None and "path" in frame.columns
                 else [f"row {i}" for i in bad[:3]])
        raise ValueError(f"split {name!r}: the model gave non-finite outputs for {len(bad)} of {len(logits)} images "
                         f"(first: {', '.join(map(str, where))}); the weights have diverged or the input is broken, "
                         f"so check the checkpoint and these files before evaluating")


def score_split(name: str, logits: np.ndarray, y: np.ndarray, frame: pd.DataFrame | None, spec: ModelSpec,
                 cfg: EvaluationConfig, temperature: float, op: tuple[int, float] | None, seed: int) -> dict[str, Any]:
    classes = spec.class_names
    probs = softmax(logits)
    calibrated = softmax(logits, temperature)
    cm = confusion(y, probs.argmax(axis=1), len(classes))
    groups = _groups(frame)
    point = headline(probs, y, classes, cfg.ece_bins, op)
    after = headline(calibrated, y, classes, cfg.ece_bins)
    present = np.unique(y)  # the classes the macro figures average over, fixed for every resample
    ci = bootstrap_ci(lambda idx: headline(probs[idx], y[idx], classes, cfg.ece_bins, op, present), len(y),
                      groups=groups, n_resamples=cfg.bootstrap, seed=seed) if cfg.bootstrap > 0 else {}
    out: dict[str, Any] = {
        "n_images": int(len(y)),
        "n_patients": int(len(np.unique(groups))) if groups is not None else None,
        "bootstrap": {"resamples": cfg.bootstrap, "unit": "patient" if groups is not None else "image"},
        "class_counts": {c: int(np.sum(y == k)) for k, c in enumerate(classes)},
        "macro_classes": [classes[k] for k in present],
        "headline": point,
        "ci95": {k: {"low": v.low, "high": v.high, "n_valid": v.n_valid} for k, v in ci.items()},
        "per_class": per_class(cm, classes),
        "confusion": _confusion_entry(cm),
        "confusion_decision": _confusion_entry(confusion(y, decide(probs, op), len(classes))) if op else None,
        "calibration": {"temperature": temperature, "ece": point["ece"], "ece_calibrated": after["ece"],
                        "brier_calibrated": after["brier"], "nll_calibrated": after["nll"]},
    }
    if op is not None:
        out["operating_point"] = binary_counts(probs[:, op[0]] >= op[1], y == op[0])
    if frame is not None and "source" in frame.columns:
        out["by_source"] = {}
        for source, idx in frame.groupby(frame["source"].astype(str)).indices.items():
            sub = headline(probs[idx], y[idx], classes, cfg.ece_bins, op)
            entry = {"n_images": int(len(idx)), "macro_classes": [classes[k] for k in np.unique(y[idx])],
                     **{k: sub[k] for k in BY_SOURCE}}
            if op is not None:
                entry["operating_point"] = binary_counts(probs[idx, op[0]] >= op[1], y[idx] == op[0])
            out["by_source"][source] = entry
    return out


def _confusion_entry(cm: np.ndarray) -> dict[str, list]:
    return {"counts": cm.tolist(), "row_normalised": row_normalise(cm).tolist()}


def write_split_files(name: str, logits: np.ndarray, y: np.ndarray, frame: pd.DataFrame | None,
                       spec: ModelSpec, temperature: float, op: tuple[int, float] | None, fig: dict[str, Any],
                       out_dir: Path, n_bins: int) -> list[Path]:
    classes = spec.class_names
    probs = softmax(logits)
    table = pd.DataFrame({"row": np.arange(len(y))})
    if frame is not None:
        for col in ("path", "source"):  # never patient ids: predictions files travel
            if col in frame.columns:
                table[col] = frame[col].to_numpy()
    table["label"] = [classes[i] for i in y]
    # one answer per image: `decision` follows the operating point (the argmax without one); argmax is auxiliary
    table["decision"] = [classes[i] for i in decide(probs, op)]
    table["argmax_label"] = [classes[i] for i in probs.argmax(axis=1)]
    for k, c in enumerate(classes):
        table[f"p_{c}"] = probs[:, k]
    files = [out_dir / f"predictions_{name}.csv"]
    table.to_csv(files[0], index=False)
    op_mark = None
    if op is not None:
        o = fig["operating_point"]
        op_mark = (op[0], o["sensitivity"], o["specificity"])
    figures = {
        "confusion": plots.confusion_figure(np.asarray(fig["confusion"]["counts"]), classes, f"{name}, argmax"),
        "roc": plots.roc_figure(probs, y, classes, f"ROC ({name})", op_mark),
        "pr": plots.pr_figure(probs, y, classes, f"Precision-recall ({name})"),
        "reliability": plots.reliability_figure(
            {"raw": (probs, y), f"T={temperature:.2f}": (softmax(logits, temperature), y)}, n_bins,
            f"Reliability ({name})"),
    }
    if fig.get("confusion_decision"):
        figures["confusion_decision"] = plots.confusion_figure(np.asarray(fig["confusion_decision"]["counts"]),
                                                               classes, f"{name}, operating point")
    for kind, figure in figures.items():
        files.append(out_dir / f"{kind}_{name}.png")
        figure.savefig(files[-1], dpi=110)
        plots.plt.close(figure)
    return files


def evaluate(model: nn.Module, bundle: Any, spec: ModelSpec, cfg: EvaluationConfig, device: torch.device | str,
             out_dir: str | Path, *, batch_size: int = 32, seed: int = 0,
             manifest: str | Path | None = None) -> EvaluationResult:
    """Evaluate ``model`` on ``cfg.splits`` of ``bundle`` (``.val``/``.test`` datasets, ``.frames``).

    ``manifest`` (the file the bundle was read from) is named with its sha256 in the report: it need not
    be the manifest the model was trained on.

    The validation split is always predicted: it fits the temperature and the operating point,
    which are then frozen for every split reported.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = getattr(bundle, "frames", {}) or {}
    names = ["val", *[s for s in cfg.splits if s != "val"]]
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        dataset = getattr(bundle, name, None)
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"split {name!r} is missing or empty in the data bundle; evaluation needs a validation "
                             f"split (data.val_fold) and every split in evaluation.splits ({cfg.splits})")
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        preds[name] = predict_split(model, loader, device, desc=f"predict {name}")
        frame = frames.get(name)
        if frame is not None and len(frame) != len(preds[name][1]):
            raise ValueError(f"split {name!r}: {len(frame)} manifest rows but {len(preds[name][1])} predictions; "
                             f"bundle.frames must list the dataset's images in order")
        check_finite(name, preds[name][0], frame)
    val_logits, val_y = preds["val"]
    temperature = fit_temperature(val_logits, val_y)
    pos = _positive_index(spec, cfg)
    threshold = None
    if pos is not None:
        threshold = choose_threshold(softmax(val_logits)[:, pos], val_y == pos, cfg.operating_point,
                                     cfg.target_sensitivity, positive_class=spec.class_names[pos])
    op = (pos, threshold.value) if threshold is not None else None
    figures: dict[str, Any] = {
        "model": {"backbone": spec.backbone, "classes": spec.class_names, "manifest_sha256": spec.manifest_sha256,
                  "config_sha256": spec.config_sha256},
        "temperature": temperature,
        "threshold": threshold.model_dump() if threshold is not None else None,
        "threshold_note": None if threshold is not None else
        "no operating point: multiclass model and evaluation.positive_class unset (decisions are argmax)",
        "splits": {},
    }
    if manifest is not None:
        figures["evaluated_manifest"] = {"path": str(manifest), "sha256": manifest_sha256(manifest)}
    files: list[Path] = []
    for name in names:
        logits, y = preds[name]
        frame = frames.get(name)
        fig = score_split(name, logits, y, frame, spec, cfg, temperature, op, seed)
        figures["splits"][name] = fig
        files += write_split_files(name, logits, y, frame, spec, temperature, op, fig, out_dir, cfg.ece_bins)
    new_spec = spec.model_copy(update={"threshold": threshold or spec.threshold, "temperature": temperature})
    json_path = out_dir / "evaluation.json"
    json_path.write_text(json.dumps(figures, indent=2, default=jsonable, allow_nan=True), encoding="utf-8")
    (out_dir / "spec.json").write_text(new_spec.model_dump_json(indent=2), encoding="utf-8")
    files += [json_path, out_dir / "spec.json", write_report(figures, out_dir / "report.md")]
    return EvaluationResult(figures, new_spec, temperature, threshold, out_dir, files)


def jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def log_evaluation(result: EvaluationResult, artifact_path: str = "evaluation") -> None:
    """Log metrics, the threshold as tags (re-evaluation may change it), and every file to the active run."""
    mlflow.log_metrics(result.metrics())
    if result.threshold is not None:
        mlflow.set_tags({"operating_point.positive_class": result.threshold.positive_class,
                           "operating_point.rule": result.threshold.rule,
                           "operating_point.threshold": f"{result.threshold.value:.6g}"})
    mlflow.log_artifacts(str(result.out_dir), artifact_path=artifact_path)
