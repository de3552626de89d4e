"""What a run records so that every number can be traced to its data, code and environment."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import medgcsam
from medgcsam.config import PipelineConfig

PACKAGES = ("torchvision", "timm", "monai", "mlflow", "numpy", "scikit-learn", "albumentations", "pydicom")
MAX_PARAM_CHARS = 6000  # MLflow's limit for a parameter value


def package_versions() -> dict[str, str]:
    out = {"medgcsam": medgcsam.__version__, "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit() -> str:
    """Commit of the checkout the package runs from, ``+dirty`` if it has local changes; in an image (no checkout)
    the ``MEDGCSAM_GIT_COMMIT`` its build recorded; else ``unknown``."""
    repo = Path(medgcsam.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return os.environ.get("MEDGCSAM_GIT_COMMIT") or "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def run_params(cfg: PipelineConfig, *, manifest_sha256: str, split_counts: dict[str, dict[str, int]],
               world_size: int = 1) -> dict[str, str]:
    """Flattened config + data hash + split sizes + world size (the effective batch is batch_size x world size)
    + versions + commit, as MLflow parameter strings."""
    params: dict[str, Any] = dict(cfg.flat())
    params["ddp.world_size"] = world_size
    params["data.manifest_sha256"] = manifest_sha256
    params["config_sha256"] = cfg.sha256()
    for split, counts in split_counts.items():
        params[f"split.{split}.n"] = sum(counts.values())
        for cls, n in counts.items():
            params[f"split.{split}.{cls}"] = n
    params.update({f"version.{k}": v for k, v in package_versions().items()})
    params["git_commit"] = git_commit()
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}
