"""Suite-wide isolation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

# Before any test module imports medgcsam (which reads the variable once): the suite never talks to a
# tracking server the developer's shell happens to point at.
for _name in _MLFLOW_URI_VARIABLES:
    os.environ.pop(_name, None)
os.environ.pop("RAY_ADDRESS", None)  # likewise: the experiment runner would submit the suite's cells to that cluster


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri_variables():
    """mlflow.set_tracking_uri()/set_registry_uri() write these into os.environ, so a store one test chose
    would otherwise reach every later test and every process a later test spawns (DDP workers, the CLI)."""
    saved = {name: os.environ.pop(name, None) for name in _MLFLOW_URI_VARIABLES}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray instance for a module's in-process runners (they join it instead of starting their own,
    which costs seconds each); its workers inherit this process's environment (PYTHONPATH, HF_HUB_OFFLINE)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The experiment tests' tiny data set: 24 grey PNGs, two classes told apart by brightness; 6 test images,
    the train split in 2 folds."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = ["path,label,split,fold"]
    for label, level in (("benign", 70), ("malignant", 170)):
        (root / label).mkdir()
        for i in range(12):
            Image.fromarray(np.clip(rng.normal(level, 40, (32, 32)), 0, 255).astype(np.uint8)).save(
                root / label / f"{i}.png")
            split = "test" if i < 3 else "train"
            rows.append(f"{label}/{i}.png,{label},{split},{i % 2 if split == 'train' else -1}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root
