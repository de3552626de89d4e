"""Per-cell sharpness and 1-D loss landscape of the trained model, logged to the cell's run.

The paper reports the top Hessian eigenvalue of every final model and loss landscapes per method.
When the engine has not already logged ``hessian_top_eig`` (``sharpness.enabled``), the
experiment computes both here on the model ``train`` returned, on the same fixed,
augmentation-free training subset the sharpness module uses everywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from torch import nn

from medgcsam.config import PipelineConfig
from medgcsam.data.datasets import build_datasets
from medgcsam.models.factory import input_spec
from medgcsam.sharpness.compute import compute_landscape, compute_sharpness

TOP_EIG = "hessian_top_eig"


def analyse_cell(client: MlflowClient, run_id: str, model: nn.Module, cfg: PipelineConfig, *,
                 landscape_points: int) -> None:
    """Sharpness (if the run lacks it) and a 1-D landscape (``landscape_points`` > 0) for one finished cell."""
    run = client.get_run(run_id)
    need_sharpness = cfg.sharpness.enabled and TOP_EIG not in run.data.metrics
    if not need_sharpness and landscape_points <= 0:
        return
    device = next(model.parameters()).device
    spec = input_spec(model, cfg.data.image_size, cfg.data.channels)
    data = build_datasets(cfg.data, spec).train.without_augmentation()
    sc = cfg.sharpness
    with tempfile.TemporaryDirectory() as tmp:
        if need_sharpness:
            metrics = compute_sharpness(model, data, sc, device, Path(tmp) / "sharpness")
            for key, value in metrics.items():
                client.log_metric(run_id, key, float(value))
            client.log_artifacts(run_id, str(Path(tmp) / "sharpness"), "sharpness")
        if landscape_points > 0:
            compute_landscape(model, data, Path(tmp) / "landscape", n_samples=sc.n_samples, batch_size=sc.batch_size,
                              points=landscape_points, two_d=False, seed=sc.seed, device=device)
            client.log_artifacts(run_id, str(Path(tmp) / "landscape"), "landscape")
