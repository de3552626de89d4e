"""Sharpness of a trained model in one call: top eigenvalues, trace, spectral density.

The subset is fixed (seeded indices of an augmentation-free dataset), the model is in eval mode,
the loss is the mean cross-entropy without weight decay, and the model's mode, parameters and
buffers are restored afterwards. Returns plain floats so the engine can ``mlflow.log_metrics`` it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medgcsam.config import SharpnessConfig
from medgcsam.evaluation.predict import split_batch
from medgcsam.progress import progress
from medgcsam.sharpness.landscape import Landscape, loss_landscape_1d, loss_landscape_2d
from medgcsam.sharpness.operator import Batch, HessianOperator, preserved_state
from medgcsam.sharpness.plots import plot_density, plot_landscape
from medgcsam.sharpness.spectrum import (
    Density,
    Eigen,
    hutchinson_trace,
    lanczos_top_eigs,
    power_iteration,
    slq_density,
)


def fixed_batches(data: Dataset | Iterable, n_samples: int, batch_size: int, seed: int = 0) -> list[Batch]:
    """A reproducible list of (x, y) batches.

    A map-style dataset gives ``n_samples`` seeded indices (sorted, so the subset, not its order, is
    what the seed fixes); any other iterable of batches is used as is. The dataset must be
    augmentation-free (``ManifestDataset.without_augmentation()``), or H would be random.
    """
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        return [split_batch(b) for b in data]
    n = len(data)
    if n == 0:
        raise ValueError("the sharpness dataset is empty; check the train split of the manifest")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n_samples, n), replace=False))
    batches = []
    for start in range(0, len(idx), batch_size):
        items = [split_batch(data[int(i)]) for i in idx[start:start + batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.stack([y.reshape(()) for _, y in items])))
    return batches


class _Counted:
    """The operator with each Hessian-vector product ticked off on a progress bar (minutes each on a CPU)."""

    def __init__(self, op: HessianOperator, bar: Any) -> None:
        self.op, self.bar = op, bar

    def stage(self, name: str) -> _Counted:
        self.bar.set_description(f"sharpness: {name}")
        return self

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.op(v)
        self.bar.update(1)
        return out


def compute_sharpness(model: nn.Module, data: Dataset | Iterable, cfg: SharpnessConfig,
                      device: torch.device | str = "cpu", out_dir: str | Path | None = None) -> dict[str, float]:
    """Metrics ``hessian_top_eig`` (and ``_2``.. for top_k), its residual ``||H u - theta u||`` measured with one
    more product per eigenvalue (Lanczos's estimate goes to ``sharpness.json``), ``hessian_min_eig`` (Lanczos),
    ``hessian_trace`` +- ``hessian_trace_se`` (unless ``trace_probes`` is 0), ``hessian_esd_{median,mean,std}``
    (unless ``density_probes`` is 0), ``hessian_hvp_count``, ``hessian_wall_s``. With ``out_dir``:
    ``sharpness.json``, and ``esd.npz`` and ``esd_density.png`` when the density was computed.
    An experiment that reports only the top eigenvalue sets both to 0: on a ResNet-50 they cost
    most of the products."""
    start = time.perf_counter()
    batches = fixed_batches(data, cfg.n_samples, cfg.batch_size, cfg.seed)
    model.to(device)
    with preserved_state(model):
        memory = None if cfg.graph_memory_gb is None else int(cfg.graph_memory_gb * 2**30)
        op = HessianOperator(model, batches, F.cross_entropy, device=device, graph_memory=memory)
        common = {"seed": cfg.seed, "dtype": op.dtype, "device": op.device}
        # at most this many products: Lanczos usually stops early, power iteration may take top_k times more
        budget = cfg.lanczos_steps + cfg.top_k + cfg.trace_probes + cfg.density_probes * cfg.density_steps
        with progress(desc="sharpness", unit="HVP", total=budget) as bar:
            hvp = _Counted(op, bar)
            if cfg.method == "lanczos":
                direction = op.gradient() if cfg.start == "gradient" else None
                eig = lanczos_top_eigs(hvp.stage("top eigenvalues"), op.dim, cfg.top_k, max_steps=cfg.lanczos_steps,
                                       tol=cfg.tol, start=direction, measure=True, **common)
            else:  # power iteration's residuals are measured already
                eig = power_iteration(hvp.stage("top eigenvalues"), op.dim, cfg.top_k, max_iter=cfg.lanczos_steps,
                                      tol=cfg.tol, **common)
            trace = (hutchinson_trace(hvp.stage("trace"), op.dim, cfg.trace_probes, **common)
                     if cfg.trace_probes else None)
            density = (slq_density(hvp.stage("density"), op.dim, cfg.density_steps, cfg.density_probes, **common)
                       if cfg.density_probes else None)
    metrics: dict[str, float] = {"hessian_top_eig": eig.values[0], "hessian_top_eig_residual": eig.residuals[0]}
    for i, value in enumerate(eig.values[1:], start=2):
        metrics[f"hessian_top_eig_{i}"] = value
    if eig.min_value is not None:
        metrics["hessian_min_eig"] = eig.min_value
    metrics["hessian_top_eig_converged"] = float(eig.converged)
    if trace is not None:
        metrics.update({"hessian_trace": trace.mean, "hessian_trace_se": trace.std_err})
    if density is not None:
        metrics.update({"hessian_esd_median": density.median, "hessian_esd_mean": density.mean,
                        "hessian_esd_std": density.std})
    metrics.update({
        "hessian_n_params": float(op.dim), "hessian_n_samples": float(op.total),
        "hessian_hvp_count": float(op.hvp_count), "hessian_wall_s": time.perf_counter() - start,
    })
    if out_dir is not None:
        _write_sharpness(Path(out_dir), metrics, cfg, density, eig, op.graphs_kept, op.dtype)
    return metrics


def _write_sharpness(out: Path, metrics: dict[str, float], cfg: SharpnessConfig, density: Density | None,
                     eig: Eigen, graphs_kept: bool | None, dtype: torch.dtype) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # "enabled" only says whether training runs this stage; a record of a computation that ran must not say false
    record = {"metrics": metrics, "settings": cfg.model_dump(exclude={"enabled"}), "top_eigenvalues": list(eig.values),
              "residuals": list(eig.residuals), "lanczos_residual_estimates": eig.residual_estimates,
              "precision": {"dtype": str(dtype).removeprefix("torch."), "tf32": False, "sdpa": "math"},
              "operator": "mean cross-entropy, eval mode, no weight decay, all trainable parameters",
              "first_order_graphs_kept": graphs_kept}
    (out / "sharpness.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    if density is None:
        return
    grid, curve = density.curve()
    np.savez(out / "esd.npz", nodes=np.concatenate(density.nodes), weights=np.concatenate(density.weights),
             run=np.concatenate([np.full(len(t), i) for i, t in enumerate(density.nodes)]), grid=grid, density=curve)
    plot_density(density, out / "esd_density.png")


def compute_landscape(model: nn.Module, data: Dataset | Iterable, out_dir: str | Path, *, n_samples: int = 256,
                      batch_size: int = 64, points: int = 21, span: float = 1.0, two_d: bool = True, seed: int = 0,
                      device: torch.device | str = "cpu") -> list[Landscape]:
    """1-D (and 2-D) filter-normalized surfaces around the current weights; arrays and PNGs to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batches = fixed_batches(data, n_samples, batch_size, seed)
    model.to(device)
    grid = np.linspace(-span, span, points)
    results = [loss_landscape_1d(model, batches, alphas=grid, seed=seed)]
    if two_d:
        results.append(loss_landscape_2d(model, batches, alphas=grid, seed=seed))
    for ls in results:
        stem = "landscape_1d" if ls.betas is None else "landscape_2d"
        np.savez(out / f"{stem}.npz", **ls.arrays())
        plot_landscape(ls, out)
    return results


def log_sharpness(metrics: dict[str, float], out_dir: str | Path | None = None,
                  artifact_path: str = "sharpness") -> None:
    """Metrics and (when given) the folder of files to the active MLflow run."""
    mlflow.log_metrics(metrics)
    if out_dir is not None:
        mlflow.log_artifacts(str(out_dir), artifact_path=artifact_path)
