"""External validation: a trained model, frozen as it is, on a labelled manifest from another site.

Nothing is fitted on the external images: the temperature and the operating point are the ones chosen
on the training site's validation split and stored with the model. Only when asked (``refit``) are
both re-fitted on the external images themselves, and that figure is reported apart and called
optimistic: it is chosen and scored on the same images. The manifest needs no split or folds; every
included row is scored. The internal test figures (the model's own evaluation) sit beside the external
ones with the difference and its 95% interval (MOVER: each side's own bootstrap interval, combined as
for two independent estimates; Zou & Donner 2008), so a drop in sensitivity is a number, not a hunch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from medgcsam.config import EvaluationConfig
from medgcsam.data.datasets import ManifestDataset
from medgcsam.data.manifest import included, manifest_sha256, read_manifest, resolve_root
from medgcsam.data.tasks import apply_task
from medgcsam.evaluation.calibration import fit_temperature, softmax
from medgcsam.evaluation.evaluate import check_finite, jsonable, score_split, write_split_files
from medgcsam.evaluation.operating_point import choose_threshold
from medgcsam.evaluation.report import write_external_report
from medgcsam.metrics import binary_counts, expected_calibration_error
from medgcsam.models.ood import OODStats, logits_and_features
from medgcsam.models.spec import ModelSpec
from medgcsam.progress import progress

SPLIT = "external"
# the figures compared with the internal test split, in the order of the side-by-side table
COMPARED = ("accuracy", "balanced_accuracy", "auroc_macro", "pr_auc_macro", "op/sensitivity", "op/specificity",
            "op/ppv", "op/npv", "ece", "brier")


@dataclass
class ExternalResult:
    """Figures of one external validation; ``files`` are what goes to the new MLflow run."""

    figures: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``external/<figure>`` with CI bounds, ``vs_internal/<figure>_diff`` and OOD/refit figures; NaNs dropped."""
        fig = self.figures["splits"][SPLIT]
        out: dict[str, float] = {}
        for key, value in fig["headline"].items():
            out[f"{SPLIT}/{key}"] = value
            if (ci := fig["ci95"].get(key)) is not None:
                out[f"{SPLIT}/{key}_ci_low"], out[f"{SPLIT}/{key}_ci_high"] = ci["low"], ci["high"]
        for row in self.figures["comparison"]:
            out[f"vs_internal/{row['figure']}_diff"] = row["difference"]
        if (ood := self.figures.get("ood")) is not None:
            out[f"{SPLIT}/ood_flag_rate"] = ood["flag_rate"]
        if (refit := self.figures.get("refit")) is not None:
            out["refit_optimistic/temperature"] = refit["temperature"]
            out.update({f"refit_optimistic/op_{k}": v for k, v in refit.get("operating_point", {}).items()})
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def external_dataset(manifest: str | Path, spec: ModelSpec, *, root: str | Path | None = None,
                     task: str | None = None) -> tuple[ManifestDataset, pd.DataFrame]:
    """Every included row of ``manifest`` (split and fold ignored), preprocessed as the model card says."""
    df = read_manifest(manifest)
    if task:
        df = apply_task(df, task)
    df = included(df).reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{manifest}: no row left after exclusions (exclude_reason); nothing to validate")
    unknown = sorted(set(df["label"]) - set(spec.class_names))
    if unknown:
        lines = ", ".join(str(i + 2) for i in df.index[df["label"].isin(unknown)][:10])
        raise ValueError(f"{manifest}: labels {unknown} (line(s) {lines}) are not classes of the model "
                         f"{spec.class_names}; map them with --task, relabel them, or set their exclude_reason")
    pre = spec.preprocessing
    dataset = ManifestDataset(df, resolve_root(manifest, root), spec.class_names, pre, modality=pre.modality,
                              multiframe=pre.dicom_multiframe)
    return dataset, df


@torch.no_grad()
def _predict(model: nn.Module, dataset: ManifestDataset, device: torch.device | str, batch_size: int,
             ood: OODStats | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits, labels and (with ``ood``) OOD distances in manifest order, with a progress bar."""
    model.eval()
    logits, labels, scores = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress(loader, desc="predict external", unit="batch"):
        x = batch["image"].to(device)
        if ood is None:
            out = model(x)
        else:
            out, feats = logits_and_features(model, x)
            scores.append(ood.scores(feats).cpu())
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(batch["label"]).reshape(-1))
    return (torch.cat(logits).double().numpy(), torch.cat(labels).long().numpy(),
            torch.cat(scores).double().numpy() if scores else None)


def difference(ext: tuple[float, dict | None], internal: tuple[float, dict | None]) -> dict[str, float]:
    """External minus internal, with the MOVER 95% interval from the two independent intervals."""
    (e, e_ci), (i, i_ci) = ext, internal
    d = e - i
    out = {"difference": d, "low": float("nan"), "high": float("nan")}
    if e_ci and i_ci and e_ci.get("n_valid") and i_ci.get("n_valid"):
        out["low"] = d - math.sqrt((e - e_ci["low"]) ** 2 + (i_ci["high"] - i) ** 2)
        out["high"] = d + math.sqrt((e_ci["high"] - e) ** 2 + (i - i_ci["low"]) ** 2)
    return out


def _comparison(ext: dict[str, Any], internal: dict[str, Any] | None) -> list[dict[str, Any]]:
    if internal is None:
        return []
    rows = []
    for key in COMPARED:
        if key not in ext["headline"] or key not in internal["headline"]:
            continue
        e, i = ext["headline"][key], internal["headline"][key]
        rows.append({"figure": key, "internal": i, "internal_ci": internal["ci95"].get(key), "external": e,
                     "external_ci": ext["ci95"].get(key),
                     **difference((e, ext["ci95"].get(key)), (i, internal["ci95"].get(key)))})
    return rows


def _refit(logits: np.ndarray, y: np.ndarray, spec: ModelSpec, cfg: EvaluationConfig) -> dict[str, Any]:
    """Temperature and operating point fitted on the external images and scored on the same: optimistic."""
    temperature = fit_temperature(logits, y)
    out: dict[str, Any] = {"temperature": temperature,
                           "ece": expected_calibration_error(softmax(logits, temperature), y, cfg.ece_bins)}
    op = spec.operating_point()
    if op is not None:
        probs = softmax(logits)[:, op[0]]
        rule = spec.threshold.rule  # 'youden' or 'sensitivity>=0.95': the refit follows the model's own rule
        target = float(rule.split(">=", 1)[1]) if rule.startswith("sensitivity>=") else None
        thr = choose_threshold(probs, y == op[0], "youden" if target is None else "sensitivity", target,
                               spec.threshold.positive_class)
        out["threshold"] = thr.model_dump()
        out["operating_point"] = binary_counts(probs >= thr.value, y == op[0])
    return out


def validate_external(model: nn.Module, spec: ModelSpec, manifest: str | Path, out_dir: str | Path,
                      cfg: EvaluationConfig, device: torch.device | str = "cpu", *, root: str | Path | None = None,
                      task: str | None = None, internal: dict[str, Any] | None = None, refit: bool = False,
                      ood: OODStats | None = None, batch_size: int = 32, seed: int = 0) -> ExternalResult:
    """Score ``model`` on every included row of ``manifest`` with its frozen temperature and operating point.

    ``internal`` is the model's own evaluation (its ``evaluation.json``); its test split is set beside the
    external figures. Files (JSON, Markdown, predictions, PNGs) go to ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset, frame = external_dataset(manifest, spec, root=root, task=task)
    model = model.to(device)
    logits, y, ood_scores = _predict(model, dataset, device, batch_size, ood)
    check_finite(SPLIT, logits, frame)
    temperature, t_source = spec.temperature, "the model card"
    if temperature is None and internal is not None and internal.get("temperature"):
        temperature, t_source = float(internal["temperature"]), "the model's own evaluation"
    if temperature is None:
        temperature, t_source = 1.0, "none stored with the model (T = 1, uncalibrated)"
    op = spec.operating_point()
    fig = score_split(SPLIT, logits, y, frame, spec, cfg, temperature, op, seed)
    internal_test = (internal or {}).get("splits", {}).get("test")
    figures: dict[str, Any] = {
        "model": {"backbone": spec.backbone, "classes": spec.class_names, "manifest_sha256": spec.manifest_sha256,
                  "config_sha256": spec.config_sha256},
        "external_manifest": {"path": str(manifest), "sha256": manifest_sha256(manifest), "rows": len(frame)},
        "temperature": temperature, "temperature_source": t_source,
        "threshold": spec.threshold.model_dump() if spec.threshold is not None else None,
        "internal_threshold": (internal or {}).get("threshold"),
        "splits": {SPLIT: fig},
        "internal_test": internal_test,
        "comparison": _comparison(fig, internal_test),
    }
    if ood is not None and ood_scores is not None:
        flags = ood_scores > ood.threshold
        figures["ood"] = {"threshold": ood.threshold, "false_alarm_target": ood.false_alarm,
                          "flag_rate": float(flags.mean()), "flagged": int(flags.sum()),
                          "median_score": float(np.median(ood_scores))}
    if refit:
        figures["refit"] = _refit(logits, y, spec, cfg)
    files = write_split_files(SPLIT, logits, y, frame, spec, temperature, op, fig, out_dir, cfg.ece_bins)
    if ood_scores is not None:  # the OOD columns join the per-image predictions
        table = pd.read_csv(files[0])
        table["ood_score"], table["ood_flag"] = ood_scores, ood_scores > ood.threshold
        table.to_csv(files[0], index=False)
    json_path = out_dir / "external.json"
    json_path.write_text(json.dumps(figures, indent=2, default=jsonable, allow_nan=True), encoding="utf-8")
    files += [json_path, write_external_report(figures, out_dir / "report.md")]
    return ExternalResult(figures, out_dir, files)
