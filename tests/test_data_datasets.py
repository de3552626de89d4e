"""MONAI pipelines, datasets, caches and loaders on real image files."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medgcsam.config import DataConfig
from medgcsam.data.datasets import BatchInputs, UnreadableRowsError, build_datasets, build_loaders
from medgcsam.data.io import read_image
from medgcsam.data.transforms import (
    AugmentRecipe,
    BatchAugmentd,
    build_transforms,
    deterministic_transforms,
    random_transforms,
)
from medgcsam.models.factory import InputSpec, create_model, input_spec
from tests.helpers_images import make_manifest, synthetic_pixels, write_image

RGB = InputSpec(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GREY = InputSpec(32, 1, (0.45,), (0.225,))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_manifest(root, root / "m.csv", classes=("benign", "malignant", "normal"), n_per_class=12,
                  size=(36, 52), patients_per_class=6)
    return root / "m.csv"


def _cfg(manifest, **kw):
    base = {"manifest": manifest, "task": "bus_3class", "modality": "ultrasound", "batch_size": 4,
            "num_workers": 0, "cache": "none"}
    return DataConfig(**{**base, **kw})


def test_deterministic_part_keeps_aspect_and_matches_inference_on_arrays(tmp_path):
    pixels = synthetic_pixels(1, (20, 40))
    path = write_image(tmp_path / "wide.png", pixels, "rgb")
    raw = deterministic_transforms(RGB, "ultrasound", normalize=False)({"image": str(path)})["image"]
    assert raw.shape == (3, 32, 32) and raw.dtype == torch.float32
    assert raw[:, :8].abs().max() == 0 and raw[:, -8:].abs().max() == 0  # 40x20 -> 32x16, padded top/bottom
    assert raw[:, 8:24].mean() > 0.2
    from_array = build_transforms(RGB, modality="ultrasound", train=False)({"image": read_image(path)})["image"]
    from_path = build_transforms(RGB, modality="ultrasound", train=False)({"image": path})["image"]
    torch.testing.assert_close(from_array, from_path)
    expected = (raw - torch.tensor(RGB.mean)[:, None, None]) / torch.tensor(RGB.std)[:, None, None]
    torch.testing.assert_close(from_path, expected)


def test_channel_handling(tmp_path):
    grey = write_image(tmp_path / "g.png", synthetic_pixels(2), "png")
    rgb = write_image(tmp_path / "c.png", synthetic_pixels(2), "rgb")
    to_rgb = deterministic_transforms(RGB, normalize=False)({"image": grey})["image"]
    assert to_rgb.shape[0] == 3 and torch.equal(to_rgb[0], to_rgb[2])
    to_grey = deterministic_transforms(GREY, normalize=False)({"image": rgb})["image"]
    direct = deterministic_transforms(GREY, normalize=False)({"image": grey})["image"]
    assert to_grey.shape[0] == 1
    torch.testing.assert_close(to_grey, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["monai", "albumentations", "batched"])
def test_ultrasound_augmentation_never_flips_vertically(backend):
    img = torch.zeros(1, 32, 32)
    img[:, 2:8, 4:28] = 1.0  # skin line band at the top
    t = build_transforms(GREY, modality="ultrasound", train=True, backend=backend)
    t.set_random_state(0)
    top, bottom, changed = [], [], 0
    for _ in range(40):
        out = t({"image": img.numpy()})["image"] * GREY.std[0] + GREY.mean[0]
        top.append(out[:, :12].mean().item())
        bottom.append(out[:, 20:].mean().item())
        changed += not torch.allclose(out, img, atol=1e-3)
    assert min(top) > 0.2 and max(bottom) < 0.02 and changed > 10


def _disk(radius: float, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= radius**2).float()[None]


def test_batched_augmentation_zooms_about_the_centre_and_draws_per_image():
    zoom_only = BatchAugmentd(["image"], AugmentRecipe(zoom=(1.25, 1.25), zoom_p=1.0)).set_random_state(0)
    batch = _disk(12.0).expand(6, 1, 64, 64).contiguous()
    out = zoom_only({"image": batch})["image"]
    assert out.shape == batch.shape and torch.equal(batch, _disk(12.0).expand(6, 1, 64, 64))  # input untouched
    area = out.sum(dim=(1, 2, 3)) / batch[0].sum()
    torch.testing.assert_close(area, torch.full((6,), 1.25**2), atol=0.04, rtol=0)  # magnified, not shrunk
    yy, xx = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    centre = torch.stack([(out[:, 0] * yy).sum((1, 2)), (out[:, 0] * xx).sum((1, 2))], 1) / out.sum((1, 2, 3))[:, None]
    torch.testing.assert_close(centre, torch.full((6, 2), 32.0), atol=0.05, rtol=0)
    mixed = BatchAugmentd(["image"], AugmentRecipe(hflip=0.5, rotate_deg=30, rotate_p=1.0, gamma=(0.5, 2.0),
                                                   gamma_p=1.0)).set_random_state(1)
    ramp = torch.linspace(0.05, 0.95, 64).expand(16, 1, 64, 64).contiguous()
    outs = mixed({"image": ramp})["image"]
    assert outs.min() >= 0.0 and outs.max() <= 1.0
    assert len({round(float(o.sum()), 3) for o in outs}) == 16  # every image got its own draw
    again = mixed.set_random_state(1)({"image": ramp})["image"]
    assert torch.equal(outs, again)
    as_uint8 = mixed.set_random_state(1)({"image": (ramp * 255).round().to(torch.uint8)})["image"]
    assert as_uint8.dtype == torch.uint8  # the cached path: lookup-table gamma, same draws, same pixels
    assert (as_uint8.float() - outs * 255).abs().max() <= 2.0


def test_xray_has_no_flips_and_unknown_names_fail():
    t = build_transforms(GREY, modality="xray", train=True)
    assert not any(type(x).__name__ == "RandFlipd" for x in t.transforms[1].transforms)
    with pytest.raises(ValueError, match="unknown modality"):
        build_transforms(GREY, modality="mri", train=True)
    with pytest.raises(ValueError, match="backend"):
        build_transforms(GREY, train=True, backend="kornia")
    with pytest.raises(ValueError, match="one value per channel"):
        build_transforms(InputSpec(32, 1, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)), train=False)


def test_bundle_splits_frames_and_items(manifest):
    bundle = build_datasets(_cfg(manifest), RGB)
    assert bundle.class_names == ["benign", "malignant", "normal"] and len(bundle.manifest_sha256) == 64
    total = sum(len(ds) for ds in bundle.splits().values())
    assert total == 36 and set(bundle.frames) == {"train", "val", "test"}
    assert (bundle.frames["val"]["fold"] == 0).all() and (bundle.frames["train"]["fold"] != 0).all()
    item = bundle.test[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["index"] == 3
    row = bundle.frames["test"].iloc[3]
    assert bundle.class_names[int(item["label"])] == row["label"]
    explicit = _cfg(manifest, val_fold=None)
    assert build_datasets(explicit, RGB).val is None
    with pytest.raises(ValueError, match="val_fold=7"):
        build_datasets(_cfg(manifest, val_fold=7), RGB)


def test_task_drops_classes_and_unknown_labels_fail(manifest, tmp_path):
    bundle = build_datasets(_cfg(manifest, task="bus_binary"), GREY)
    assert bundle.class_names == ["benign", "malignant"]
    assert all((f["label"] != "normal").all() for f in bundle.frames.values())
    with pytest.raises(ValueError, match=r"labels \['normal'\].*not in data.classes"):
        build_datasets(_cfg(manifest, task=None, classes=["benign", "malignant"]), GREY)


def test_labels_differing_only_in_case_are_not_two_classes(manifest, tmp_path):
    """Without a task, 'Benign' and 'benign' silently became two classes."""
    text = manifest.read_text().replace(",benign,", ",Benign,", 1)
    (tmp_path / "m.csv").write_text(text)
    cfg = _cfg(tmp_path / "m.csv", task=None, root=manifest.parent)
    with pytest.raises(ValueError, match=r"labels \['Benign', 'benign'\] differ only in case"):
        build_datasets(cfg, GREY)
    assert build_datasets(_cfg(tmp_path / "m.csv", root=manifest.parent), GREY).class_names == [
        "benign", "malignant", "normal"]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cache_matches_uncached_pipeline(manifest, tmp_path, cache):
    plain = build_datasets(_cfg(manifest, augment=False), RGB).train
    cached = build_datasets(_cfg(manifest, augment=False, cache=cache, cache_dir=tmp_path), RGB).train
    cached.warm_cache(num_workers=0)
    if cache == "memory":
        assert cached._memory.dtype == torch.uint8 and cached._memory.shape == (len(cached), 3, 32, 32)
    else:
        assert len(list(cached.cache_dir.glob("*.npy"))) == len(cached)
    for i in range(len(plain)):  # uint8 storage costs at most half a grey level
        torch.testing.assert_close(cached[i]["image"], plain[i]["image"], atol=0.51 / 255 / min(RGB.std), rtol=0)


def test_albumentations_backend_augments_cached_uint8(manifest):
    cfg = _cfg(manifest, cache="memory", aug_backend="albumentations")
    ds = build_datasets(cfg, GREY).train
    ds.warm_cache()
    ds.augment.set_random_state(0)
    plain = ds.without_augmentation()
    outs = [ds[i]["image"] for i in range(8)]
    assert all(o.dtype == torch.float32 and o.shape == (1, 32, 32) for o in outs)
    lo, hi = (0 - GREY.mean[0]) / GREY.std[0], (1 - GREY.mean[0]) / GREY.std[0]
    assert all(lo - 1e-5 <= o.min() and o.max() <= hi + 1e-5 for o in outs)
    assert sum(not torch.allclose(o, plain[i]["image"]) for i, o in enumerate(outs)) >= 3


def test_batch_fetch_equals_item_fetch(manifest, tmp_path):
    for cache in ("none", "memory", "disk"):
        ds = build_datasets(_cfg(manifest, augment=False, cache=cache, cache_dir=tmp_path), RGB).train
        ds.warm_cache()
        batch = ds.__getitems__([5, 0, 3])
        for item, i in zip(batch, [5, 0, 3], strict=True):
            assert item["index"] == i and int(item["label"]) == int(ds[i]["label"])
            torch.testing.assert_close(item["image"], ds[i]["image"])


def test_torn_or_foreign_disk_entries_are_rebuilt(manifest, tmp_path):
    ds = build_datasets(_cfg(manifest, augment=False, cache="disk", cache_dir=tmp_path), GREY).train
    ds.warm_cache()
    expected = [ds[i]["image"] for i in range(3)]
    files = [ds.cache_dir / f"{ds._disk_keys[i]}.npy" for i in range(3)]
    files[0].write_bytes(files[0].read_bytes()[:40])  # torn write
    np.save(files[1], np.zeros((3, 8, 8), np.uint8))  # same key, wrong shape
    files[2].write_bytes(b"not a numpy file")
    fresh = build_datasets(_cfg(manifest, augment=False, cache="disk", cache_dir=tmp_path), GREY).train
    for i in range(3):
        torch.testing.assert_close(fresh[i]["image"], expected[i])
        assert np.load(files[i]).shape == (1, 32, 32)


def test_disk_cache_names_a_file_gone_since_the_manifest(tmp_path):
    """Without sha256 the disk key stats the file: a deleted image was a bare FileNotFoundError."""
    df = make_manifest(tmp_path, tmp_path / "m.csv", n_per_class=10).assign(sha256="")
    df.to_csv(tmp_path / "m.csv", index=False)
    gone = df.loc[df["split"] == "train", "path"].iloc[0]
    (tmp_path / gone).unlink()
    bundle = build_datasets(_cfg(tmp_path / "m.csv", task=None, cache="disk", cache_dir=tmp_path / "cache"), GREY)
    with pytest.raises(UnreadableRowsError, match=f"manifest line \\d+ \\({re.escape(gone)}\\): .*"
                                                  f"{re.escape(gone)}: file does not exist.*exclude_reason"):
        bundle.train.warm_cache()


def test_disk_cache_is_keyed_by_transform_config(manifest, tmp_path):
    a = build_datasets(_cfg(manifest, cache="disk", cache_dir=tmp_path), RGB).train
    b = build_datasets(_cfg(manifest, cache="disk", cache_dir=tmp_path), InputSpec(48, 3, RGB.mean, RGB.std)).train
    a.warm_cache()
    b.warm_cache()
    assert a.cache_dir != b.cache_dir
    assert b[0]["image"].shape == (3, 48, 48)


def test_loaders_fixed_train_batches_and_seeded_order(manifest):
    cfg = _cfg(manifest, batch_size=5, cache="memory")
    first = []
    for _ in range(2):
        loaders = build_loaders(build_datasets(cfg, RGB), cfg, seed=1)
        batches = list(loaders["train"])
        assert all(b["image"].shape == (5, 3, 32, 32) for b in batches)  # drop_last: fixed shape
        first.append(torch.cat([b["index"] for b in batches]))
        assert len(loaders["val"].dataset) == len(build_datasets(cfg, RGB).val)
    torch.testing.assert_close(first[0], first[1])
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        build_loaders(build_datasets(_cfg(manifest, batch_size=64), RGB), _cfg(manifest, batch_size=64))


def test_worker_augmentation_is_seeded_and_changes_per_epoch(manifest):
    cfg = _cfg(manifest, batch_size=4, num_workers=2, cache="memory")

    def epochs(seed):
        loader = build_loaders(build_datasets(cfg, GREY), cfg, seed=seed)["train"]
        return [{i: img for b in loader for i, img in zip(b["index"].tolist(), b["image"], strict=True)}
                for _ in range(2)]

    run_a, run_b = epochs(0), epochs(0)
    common = sorted(set(run_a[0]) & set(run_b[0]))
    assert common and all(torch.equal(run_a[0][i], run_b[0][i]) for i in common)  # same seed, same pixels
    again = sorted(set(run_a[0]) & set(run_a[1]))
    assert sum(not torch.equal(run_a[0][i], run_a[1][i]) for i in again) > len(again) // 2  # fresh draws


def test_pipeline_feeds_a_timm_model(manifest):
    model = create_model("test_resnet", 3, in_chans=1)
    spec = input_spec(model, image_size=32, channels=1)
    cfg = _cfg(manifest, channels=1, cache="memory", num_workers=2)
    bundle = build_datasets(cfg, spec)
    loaders = build_loaders(bundle, cfg)
    batch = next(iter(loaders["train"]))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 1, 32, 32)  # 4x fewer bytes
    images = BatchInputs(spec, "cpu")(batch["image"])
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (4, 3) and np.isfinite(logits.numpy()).all()
    val = next(iter(loaders["val"]))  # no augmentation: exactly the dataset's own normalized items
    expected = torch.stack([bundle.val[int(i)]["image"] for i in val["index"]])
    torch.testing.assert_close(BatchInputs(spec, "cpu")(val["image"]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["monai", "albumentations", "batched"])
def test_every_backend_shrinks_and_shifts_as_the_recipe_says(backend):
    """zoom < 1 shrinks the content (the plain recipe's scale 0.8-1.0) and translate moves it by up to that
    fraction of the side, the same in all three backends (MONAI's scale is the inverse of a zoom)."""
    spec = InputSpec(64, 1, (0.5,), (0.25,))
    yy, xx = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    disk = _disk(12.0)
    for recipe, area, max_shift in ((AugmentRecipe(zoom=(0.8, 0.8), zoom_p=1.0), 0.64, 0.0),
                                    (AugmentRecipe(translate=0.1, translate_p=1.0), 1.0, 6.4)):
        t = random_transforms(spec, backend=backend, recipe=recipe)
        t.set_random_state(0)
        shifts = []
        for _ in range(30):
            x = (disk * 255).to(torch.uint8) if backend == "albumentations" else disk.clone()
            out = torch.as_tensor(t({"image": x})["image"]).float()
            out = out / 255 if out.max() > 1.5 else out
            assert abs(float(out.sum() / disk.sum()) - area) < 0.03
            shifts.append(float((out[0] * xx).sum() / out.sum()) - 32.0)
            shifts.append(float((out[0] * yy).sum() / out.sum()) - 32.0)
        assert max(abs(s) for s in shifts) <= max_shift + 0.1
        assert max_shift == 0.0 or max(abs(s) for s in shifts) > max_shift / 2  # it does move


def test_ultrasound_recipe_keeps_the_skin_line_level_and_the_grey_levels():
    """Issue 19: the old ultrasound recipe rotated (tilting the skin line, black corners) and re-mapped grey levels
    with a gamma; a probe does neither. Now a horizontal band stays horizontal and a flat field keeps its value."""
    t = random_transforms(GREY, "ultrasound", "batched")
    t.set_random_state(0)
    band = torch.zeros(16, 1, 64, 64)
    band[:, :, 10:14, :] = 1.0  # a line across the whole width, as the skin line is
    out = t({"image": band})["image"]
    rows = out[:, 0].sum(-1)  # per image: mass per row; a level line keeps every column on the same rows
    for img, r in zip(out[:, 0], rows, strict=True):
        lit = (r > 1.0).nonzero().flatten()
        assert len(lit) and lit.max() - lit.min() <= 5, "the band was tilted"
        cols = img[:, 16:48].sum(0)  # inside the field (scale >= 0.8, shift <= 10%) every column sees the band
        assert cols.max() - cols.min() < 1e-3 * 64 + 0.05
    flat = torch.full((16, 1, 64, 64), 0.5)
    centre = t({"image": flat})["image"][:, :, 28:36, 28:36]
    torch.testing.assert_close(centre, torch.full_like(centre, 0.5), atol=1e-4, rtol=0)
