"""Image arrays (.npz, MedMNIST layout) exported as PNG files plus a manifest, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medgcsam.data.arrays import ArrayExportError, export_arrays
from medgcsam.data.cli import manifest_app
from medgcsam.data.manifest import file_sha256, read_manifest
from medgcsam.data.validate import validate_manifest


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (5, 12, 10), dtype=np.uint8),
        "train_labels": np.array([[0], [1], [1], [0], [1]]),  # MedMNIST's (N, 1)
        "test_images": rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8),
        "test_labels": np.array([1, 0, 1]),
    }


def test_export_writes_each_image_losslessly_with_its_split_and_label(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "set.npz", **arrays)
    df = export_arrays(tmp_path / "set.npz", tmp_path / "out", ["normal", "pneumonia"], source="toy")
    on_disk = read_manifest(tmp_path / "out" / "manifest.csv")
    assert on_disk["path"].tolist() == df["path"].tolist()
    assert on_disk["split"].tolist() == ["train"] * 5 + ["test"] * 3
    assert on_disk["label"].tolist() == ["normal", "pneumonia", "pneumonia", "normal", "pneumonia",
                                         "pneumonia", "normal", "pneumonia"]
    assert (on_disk["source"] == "toy").all() and (on_disk["exclude_reason"] == "").all()
    for i, row in on_disk.iterrows():
        split, index = ("train", i) if i < 5 else ("test", i - 5)
        png = tmp_path / "out" / row["path"]
        assert row["path"].startswith(f"{split}/{row['label']}/")
        assert np.array_equal(np.asarray(Image.open(png)), arrays[f"{split}_images"][index])
        assert row["sha256"] == file_sha256(png)
    assert validate_manifest(tmp_path / "out" / "manifest.csv", classes=["normal", "pneumonia"]).ok


def test_export_writes_only_into_a_new_or_empty_folder(tmp_path):
    np.savez(tmp_path / "set.npz", **_arrays())
    export_arrays(tmp_path / "set.npz", tmp_path / "out", ["a", "b"], source="toy")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    manifest = (tmp_path / "out" / "manifest.csv").read_bytes()
    with pytest.raises(ArrayExportError, match="exists and is not an empty folder"):
        export_arrays(tmp_path / "set.npz", tmp_path / "out", ["b", "a"], source="toy")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
    assert (tmp_path / "out" / "manifest.csv").read_bytes() == manifest
    (tmp_path / "out" / "manifest.csv").unlink()  # what an interrupted export leaves: PNGs, no manifest
    with pytest.raises(ArrayExportError, match="interrupted export leaves one without manifest.csv: delete it"):
        export_arrays(tmp_path / "set.npz", tmp_path / "out", ["b", "a"], source="toy")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ArrayExportError, match="a_file exists and is not an empty folder"):
        export_arrays(tmp_path / "set.npz", tmp_path / "a_file", ["a", "b"], source="toy")
    (tmp_path / "empty").mkdir()
    assert len(export_arrays(tmp_path / "set.npz", tmp_path / "empty", ["a", "b"], source="toy")) == 8


@pytest.mark.parametrize(("classes", "message"), [
    (["../../escaped", "ok"], "cannot be a folder name"),
    (["/tmp/absolute", "ok"], "cannot be a folder name"),
    (["..", "ok"], "cannot be a folder name"),
    (["a\\b", "ok"], "cannot be a folder name"),
    (["a\nb", "ok"], "cannot be a folder name"),
    (["nul\0", "ok"], "cannot be a folder name"),
    (["x" * 101, "ok"], "cannot be a folder name"),
    ([" a", "a"], "must be distinct"),
    (["Normal", "normal"], "differ only in case"),
])
def test_class_names_that_are_not_one_safe_folder_name_are_refused_before_writing(tmp_path, classes, message):
    np.savez(tmp_path / "set.npz", **_arrays())
    with pytest.raises(ArrayExportError, match=message):
        export_arrays(tmp_path / "set.npz", tmp_path / "trav" / "out", classes, source="toy")
    assert not (tmp_path / "trav").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"train_labels": np.array([0, 1, 2, 0, 1])}, r"train_labels\[2\] = 2 \(1 such rows\) is not an index"),
    ({"train_labels": np.array([0, 1, -1, 0, 1])}, r"train_labels\[2\] = -1"),
    ({"train_labels": np.array([0, 1, 1])}, "5 train_images but 3 train_labels"),
    ({"train_labels": np.zeros((5, 2), dtype=int)}, r"shape \(5, 2\).*multi-label"),
    ({"train_labels": np.array([0.0, 1, 1, 0, 1])}, "float64; expected integer class indices"),
    ({"train_images": np.zeros((5, 12, 10), dtype=np.float32)}, "float32; store 8-bit images"),
    ({"train_images": np.zeros((5, 12), dtype=np.uint8)}, r"shape \(5, 12\); expected \(N, H, W\)"),
    ({"test_labels": None}, "has 'test_images' but not 'test_labels'"),
    ({"train_images": np.zeros((5, 12, 0), dtype=np.uint8)}, "with H and W at least 1"),
    ({"valid_images": np.zeros((2, 4, 4), dtype=np.uint8), "valid_labels": np.zeros(2, dtype=int)},
     r"holds \['valid_images', 'valid_labels'\], which would not be exported"),
    ({"train_masks": np.zeros((5, 12, 10), dtype=np.uint8)}, r"holds \['train_masks'\]"),
    ({"train_images": np.zeros((0, 12, 10), dtype=np.uint8), "train_labels": np.zeros(0, dtype=int),
      "test_images": np.zeros((0, 12, 10), dtype=np.uint8), "test_labels": np.zeros(0, dtype=int)},
     "every split is empty"),
])
def test_each_bad_array_names_the_file_the_array_and_the_fix(tmp_path, change, message):
    arrays = {**_arrays(), **change}
    np.savez(tmp_path / "set.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ArrayExportError, match=message) as err:
        export_arrays(tmp_path / "set.npz", tmp_path / "out", ["normal", "pneumonia"], source="toy")
    assert "set.npz" in str(err.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_pickled_objects_unknown_keys_and_non_npz_files_are_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", train_images=np.array([np.zeros((2, 2), np.uint8), None], dtype=object),
             train_labels=np.array([0, 1]))
    with pytest.raises(ArrayExportError, match="hold Python objects"):
        export_arrays(tmp_path / "objects.npz", tmp_path / "o1", ["a", "b"], source="toy")
    np.savez(tmp_path / "other.npz", x=np.zeros(3), y=np.zeros(3))
    with pytest.raises(ArrayExportError, match=r"holds \['x', 'y'\], which would not be exported"):
        export_arrays(tmp_path / "other.npz", tmp_path / "o2", ["a", "b"], source="toy")
    np.savez(tmp_path / "nothing.npz")
    with pytest.raises(ArrayExportError, match=r"no '<split>_images'.*it holds \[\]"):
        export_arrays(tmp_path / "nothing.npz", tmp_path / "o2", ["a", "b"], source="toy")
    np.save(tmp_path / "single.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ArrayExportError, match=r"a single array \(.npy\)"):
        export_arrays(tmp_path / "single.npy", tmp_path / "o0", ["a", "b"], source="toy")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArrayExportError, match="not a readable .npz file"):
        export_arrays(tmp_path / "broken.npz", tmp_path / "o3", ["a", "b"], source="toy")
    np.savez(tmp_path / "whole.npz", **_arrays())
    raw = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    with pytest.raises(ArrayExportError, match="not a readable .npz file.*re-copy"):
        export_arrays(tmp_path / "cut.npz", tmp_path / "o4", ["a", "b"], source="toy")
    damaged = bytearray(raw)
    start = raw.index(b"train_images.npy") + 200  # inside the first member's data
    damaged[start:start + 8] = b"\xff" * 8
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    with pytest.raises(ArrayExportError, match="cannot be read.*re-copy"):
        export_arrays(tmp_path / "crc.npz", tmp_path / "o5", ["a", "b"], source="toy")
    assert not any((tmp_path / f"o{i}").exists() for i in range(6))


def test_cli_prints_counts_per_split_and_exits_2_with_the_reason(tmp_path):
    np.savez(tmp_path / "pneumo.npz", **_arrays())
    runner = CliRunner()
    res = runner.invoke(manifest_app, ["export-npz", str(tmp_path / "pneumo.npz"), "-o", str(tmp_path / "out"),
                                       "--classes", "normal, pneumonia"])
    assert res.exit_code == 0, res.output
    assert "wrote 8 PNGs" in res.output
    assert (read_manifest(tmp_path / "out" / "manifest.csv")["source"] == "pneumo").all()
    res = runner.invoke(manifest_app, ["export-npz", str(tmp_path / "pneumo.npz"), "-o", str(tmp_path / "x"),
                                       "--classes", "normal"])
    assert res.exit_code == 2 and "pass every class name" in res.output
