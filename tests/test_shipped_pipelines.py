"""Every pipeline and experiment file that ships validates, cell by cell (issue 19 edited all of them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medgcsam.config import load_config
from medgcsam.experiments.config import build_pipeline, load_experiment
from medgcsam.experiments.grid import grid_cells

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
EXPERIMENTS = [p for p in sorted((PIPELINES / "paper").glob("*.yaml"))
               if re.search(r"^base:", p.read_text(encoding="utf-8"), re.MULTILINE)]  # an experiment names its base


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_pipeline_validates(path):
    cfg = load_config(path)
    assert cfg.data.manifest.is_absolute()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_cell_of_an_experiment_validates(path):
    exp, base = load_experiment(path)
    cells = grid_cells(exp)
    assert cells
    for cell in cells:
        build_pipeline(base, [*exp.overrides, *cell.overrides()], str(path))


def test_recipe_gpu_experiment_trains_the_recipe_for_adamw_sam_and_gcsam():
    exp, base = load_experiment(PIPELINES / "paper" / "bus_resnet50_recipe_gpu.yaml")
    cfgs = [build_pipeline(base, [*exp.overrides, *c.overrides()], "recipe") for c in grid_cells(exp)]
    assert sorted({c.optimizer.name for c in cfgs}) == ["adamw", "gcsam", "sam"] and len(cfgs) == 9
    for c in cfgs:
        assert (c.model.name, c.data.image_size, c.optimizer.base, c.optimizer.lr, c.data.batch_size) == (
            "resnet50", 224, "adamw", 1e-3, 32)
        assert c.train.class_weights == "none" and c.train.label_smoothing == 0.0 and c.train.monitor == "val_accuracy"
        assert c.sharpness.enabled and c.sharpness.n_samples <= 64
