"""End-of-training stage: fit the OOD statistics of the selected weights and store them with the model.

They go to ``<run dir>/ood.pt`` (read when the model is logged), into ``best.pt`` (so a checkpoint
predicts with OOD flags too) and, as figures, to the active MLflow run: the threshold, its false-alarm
rate on validation (set there) and on test (measured, the honest figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn
from torch.utils.data import DataLoader

from medgcsam.checkpoint import update_checkpoint
from medgcsam.data.datasets import DataBundle
from medgcsam.models.ood import FALSE_ALARM, OOD_FILE, collect, fit_ood, load_ood, save_ood


def fit_and_store_ood(model: nn.Module, bundle: DataBundle, device: torch.device | str, batch_size: int,
                      run_dir: Path, best_checkpoint: Path) -> dict[str, Any] | None:
    """Fit on the augmentation-free train split, threshold on validation; None without a validation split."""
    if bundle.val is None:
        return None

    def features(dataset: Any) -> tuple[Any, Any]:
        return collect(model, DataLoader(dataset, batch_size=batch_size, shuffle=False), device)

    train_f, train_y = features(bundle.train.without_augmentation())
    val_f, _ = features(bundle.val)
    stats = fit_ood(train_f, train_y, val_f, FALSE_ALARM)
    path = save_ood(stats, run_dir / OOD_FILE)
    if best_checkpoint.is_file():
        update_checkpoint(best_checkpoint, ood=stats.state())
    def flag_rate(feats: Any) -> float:
        return float(stats.flags(stats.scores(torch.from_numpy(feats))).double().mean())

    summary = {"path": str(path), "threshold": stats.threshold, "false_alarm_target": stats.false_alarm,
               "val_flag_rate": flag_rate(val_f), "shrinkage": stats.shrinkage}
    if bundle.test is not None:
        summary["test_flag_rate"] = flag_rate(features(bundle.test)[0])
    mlflow.log_metrics({f"ood/{k}": v for k, v in summary.items() if k != "path"})
    return summary


def stored_ood(run_dir: Path):
    """The statistics fitted by this run, or None (no validation split, or evaluation disabled)."""
    path = run_dir / OOD_FILE
    return load_ood(path) if path.is_file() else None
