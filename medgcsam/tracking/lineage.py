"""What a registered model says about itself in the registry: where it came from and how good it is.

A reviewer opening ``models:/NAME/3`` should not need the run to know the backbone, optimizer, data,
test figures with their intervals and the operating point (the version description), nor to filter
versions by task, classes, modality, input size, manifest hash or commit (the version tags). The data
splits are logged as MLflow dataset inputs of the run, each with a digest of its rows, so "Datasets"
in the UI names exactly what was trained and evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from medgcsam.config import PipelineConfig
from medgcsam.models.spec import ModelSpec
from medgcsam.tracking.provenance import git_commit

DIGEST_CHARS = 32  # MLflow stores at most 36 characters of a dataset digest; the full hash is a tag
SPLIT_CONTEXT = {"train": "training", "val": "evaluation", "test": "evaluation"}
HEADLINE = ("balanced_accuracy", "auroc_macro", "op/sensitivity", "op/specificity", "ece")  # op/: operating point


def split_sha256(frame: pd.DataFrame) -> str:
    """SHA-256 over a split's (path, label) rows in order: changes when any image joins, leaves or is relabelled."""
    rows = frame[["path", "label"]].astype(str).to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(rows.encode("utf-8")).hexdigest()


def log_datasets(manifest: str | Path, manifest_sha256: str, frames: dict[str, pd.DataFrame]) -> None:
    """One MLflow dataset input per split (context ``training`` or ``evaluation``) into the active run."""
    stem, source = Path(manifest).stem, Path(manifest).resolve().as_uri()
    for split, frame in frames.items():
        digest = split_sha256(frame)
        columns = [c for c in ("path", "label", "split", "patient_id") if c in frame.columns]
        dataset = mlflow.data.from_pandas(frame[columns].reset_index(drop=True), source=source,
                                          name=f"{stem}:{split}", digest=digest[:DIGEST_CHARS], targets="label")
        mlflow.log_input(dataset, context=SPLIT_CONTEXT.get(split, split),
                         tags={"split": split, "rows_sha256": digest, "manifest_sha256": manifest_sha256})


def version_tags(cfg: PipelineConfig, spec: ModelSpec) -> dict[str, str]:
    """Registry tags to filter versions by; values are strings, as MLflow stores them."""
    pre = spec.preprocessing
    tags = {"task": cfg.data.task or "manifest labels", "classes": ",".join(spec.class_names), "modality": pre.modality,
            "input_size": f"{pre.channels}x{pre.image_size}x{pre.image_size}", "backbone": spec.backbone,
            "optimizer": cfg.optimizer.name, "manifest_sha256": spec.manifest_sha256 or "", "git_commit": git_commit()}
    if spec.threshold is not None:
        tags["operating_point"] = f"p({spec.threshold.positive_class}) >= {spec.threshold.value:.6g}"
    return tags


def version_description(cfg: PipelineConfig, spec: ModelSpec, counts: dict[str, int],
                        evaluation: dict[str, Any] | None) -> str:
    """Markdown: backbone, optimizer, data, headline figures of the test split (validation if none) with their
    95% bootstrap intervals, temperature and operating point."""
    opt = cfg.optimizer
    extra = "".join(f", {k} {v}" for k, v in opt.hyperparameters.items())
    pre = spec.preprocessing
    lines = [f"**{spec.backbone}** ({pre.channels}x{pre.image_size}x{pre.image_size}, {pre.modality}) trained with "
             f"**{opt.name}** over {opt.base} (lr {opt.lr:g}, weight decay {opt.weight_decay:g}{extra}) for "
             f"{cfg.train.epochs} epochs.",
             f"Data: `{Path(cfg.data.manifest).name}` (sha256 {(spec.manifest_sha256 or '?')[:12]}), task "
             f"{cfg.data.task or 'manifest labels'}, classes {', '.join(spec.class_names)}; images per split: "
             + ", ".join(f"{k} {n}" for k, n in counts.items()) + "."]
    splits = (evaluation or {}).get("splits", {})
    split = "test" if "test" in splits else "val" if "val" in splits else None
    if split is not None:
        fig = splits[split]
        shown = [f"{k} {_interval(fig['headline'][k], fig['ci95'].get(k))}" for k in HEADLINE
                 if _finite(fig["headline"].get(k))]
        lines.append(f"{'Test' if split == 'test' else 'Validation (no test split)'} ({fig['n_images']} images, "
                     f"95% bootstrap CI over {fig['bootstrap']['unit']}s): " + "; ".join(shown) + ".")
    else:
        lines.append("Not evaluated: the run had no validation split.")
    if spec.temperature is not None:
        lines.append(f"Calibration temperature (fitted on validation): {spec.temperature:.4g}.")
    if spec.threshold is not None:
        t = spec.threshold
        lines.append(f"Operating point (frozen on validation, {t.rule}): {t.positive_class} when "
                     f"p({t.positive_class}) >= {t.value:.6g}.")
    return "\n\n".join(lines)


def describe_version(name: str, version: str | int, description: str, tags: dict[str, str]) -> None:
    """Write the description and tags onto a registered model version."""
    client = mlflow.MlflowClient()
    client.update_model_version(name, str(version), description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def record_lineage(cfg: PipelineConfig, spec: ModelSpec, manifest_sha256: str, frames: dict[str, pd.DataFrame],
                   evaluation_json: Path, registered: tuple[str, str | int] | None) -> None:
    """The trainer's one call: dataset inputs on the active run; description and tags on the version, if any."""
    log_datasets(cfg.data.manifest, manifest_sha256, frames)
    if registered is None:
        return
    evaluation = json.loads(evaluation_json.read_text(encoding="utf-8")) if evaluation_json.is_file() else None
    counts = {split: len(frame) for split, frame in frames.items()}
    describe_version(*registered, version_description(cfg, spec, counts, evaluation), version_tags(cfg, spec))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _interval(value: float, ci: dict[str, float] | None) -> str:
    if ci is None or not (_finite(ci.get("low")) and _finite(ci.get("high"))):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
