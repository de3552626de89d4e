"""GPU-resident batches, run on CPU: the device augmentation against the CPU recipe, seeding, resume, order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from medgcsam.config import DataConfig
from medgcsam.data.datasets import BatchInputs, build_datasets
from medgcsam.data.device_cache import (
    DeviceBatches,
    augment_batch,
    build_device_batches,
    draw_params,
    uniforms,
)
from medgcsam.data.transforms import AUGMENT_RECIPES, BatchAugmentd, _gamma_, _rotate_zoom
from medgcsam.models.factory import InputSpec
from tests.helpers_images import make_manifest

RGB = InputSpec(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RECIPE = dataclasses.replace(AUGMENT_RECIPES["generic"], translate=0.1)  # every op of every recipe


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    make_manifest(root, root / "m.csv", classes=("benign", "malignant", "normal"), n_per_class=12,
                  size=(36, 52), patients_per_class=6)
    cfg = DataConfig(manifest=root / "m.csv", task="bus_3class", modality="ultrasound", batch_size=4,
                     num_workers=0, cache="memory")
    out = build_datasets(cfg, RGB)
    out.train.warm_cache()
    return out


def test_uniforms_are_a_pure_function_of_seed_epoch_index_and_uniform() -> None:
    idx = torch.arange(20000)
    u = uniforms(3, 1, idx)
    assert torch.equal(u, uniforms(3, 1, idx))
    assert torch.equal(u[[7, 19999, 5]], uniforms(3, 1, torch.tensor([7, 19999, 5])))  # batch-independent
    assert not torch.equal(u, uniforms(3, 2, idx)) and not torch.equal(u, uniforms(4, 1, idx))
    assert u.min() >= 0 and u.max() < 1
    for k in range(u.shape[1]):
        assert stats.kstest(u[:, k].numpy(), "uniform").pvalue > 1e-3
    assert abs(float(np.corrcoef(u[:, 0].numpy(), u[:, 1].numpy())[0, 1])) < 0.03


def test_device_draws_follow_the_cpu_recipe_distribution() -> None:
    n = 6000
    dev = draw_params(RECIPE, uniforms(0, 0, torch.arange(n)))
    cpu_aug = BatchAugmentd(["image"], RECIPE)
    cpu_aug.set_random_state(seed=0)
    cpu = cpu_aug._draw(n)
    for key in ("flip", "affine", "gamma_on"):  # Bernoulli rates agree within 4 binomial SE
        p = cpu[key].mean()
        assert abs(float(dev[key].float().mean()) - p) < 4 * np.sqrt(p * (1 - p) / n) * np.sqrt(2)
    for key in ("angle", "zoom", "gamma"):
        assert stats.ks_2samp(dev[key].numpy(), cpu[key]).pvalue > 1e-3, key
    for axis in (0, 1):  # the shift of each axis
        assert stats.ks_2samp(dev["shift"][:, axis].numpy(), cpu["shift"][:, axis]).pvalue > 1e-3, axis


def test_batched_device_augmentation_equals_the_cpu_ops_image_by_image() -> None:
    """Given the same parameters, gamma (lookup table), flip and rotation+zoom agree with the CPU path's ops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 20, 20), generator=g, dtype=torch.uint8)
    p = draw_params(RECIPE, uniforms(1, 0, torch.arange(24)))
    p["gamma_on"][:12] = True  # make sure every op is exercised
    p["affine"][::2] = True
    out = augment_batch(x, p)
    for i in range(24):
        ref = x[i].clone()
        if p["gamma_on"][i]:
            _gamma_(ref, float(p["gamma"][i]))
        if p["flip"][i]:
            ref = ref.flip(-1)
        if p["affine"][i]:
            ref = _rotate_zoom(ref, float(p["angle"][i]), float(p["zoom"][i]), p["shift"][i].tolist())
        diff = (out[i] - ref.float()).abs()
        assert float(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, i


def test_epochs_reproduce_resume_and_cover_the_split(bundle) -> None:
    batches = DeviceBatches(bundle.train, 4, "cpu", seed=7)
    first = list(batches.epoch(2))
    assert len(first) == len(bundle.train) // 4 == len(batches)
    again = list(DeviceBatches(bundle.train, 4, "cpu", seed=7).epoch(2))
    resumed = list(batches.epoch(2, start=3))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"])
    seen = torch.cat([b["index"] for b in first])
    assert len(set(seen.tolist())) == len(seen)  # no repeats; the remainder is dropped
    other = list(batches.epoch(3))
    assert not torch.equal(torch.cat([b["index"] for b in other]), seen)
    assert torch.equal(first[0]["label"], bundle.train.labels[first[0]["index"]])


def test_without_augmentation_batches_equal_the_loader_path(bundle) -> None:
    plain = bundle.train.without_augmentation()
    batches = DeviceBatches(plain, 4, "cpu", seed=0, augment=False)
    batch = next(batches.epoch(0))
    uint8 = torch.stack([plain.preprocessed(int(i)) for i in batch["index"]])
    assert torch.equal(batch["image"], BatchInputs(RGB, "cpu")(uint8))


def test_modes(bundle) -> None:
    assert build_device_batches(bundle.train, 4, "cpu", seed=0, mode="auto") is None  # CPU keeps the loader
    assert build_device_batches(bundle.train, 4, "cpu", seed=0, mode="off") is None
    on = build_device_batches(bundle.train, 4, "cpu", seed=0, mode="on")
    assert on is not None and on.recipe == AUGMENT_RECIPES["ultrasound"] and on.nbytes == len(bundle.train) * 3 * 32**2
    with pytest.raises(ValueError, match="device_cache must be one of"):
        build_device_batches(bundle.train, 4, "cpu", seed=0, mode="yes")
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        DeviceBatches(bundle.train, 1000, "cpu", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")
@pytest.mark.parametrize("where", ["device", "host"])
def test_cuda_batches_equal_cpu_batches(bundle, where: str) -> None:
    cpu = list(DeviceBatches(bundle.train, 4, "cpu", seed=1).epoch(0))
    gpu = list(DeviceBatches(bundle.train, 4, "cuda", seed=1, where=where).epoch(0))
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a["index"], b["index"])
        torch.testing.assert_close(b["image"].cpu(), a["image"], atol=0.05, rtol=0)  # <= 1 uint8 level
