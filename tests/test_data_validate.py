"""Each validator finding on real files, the report wording, the exit code, and read-only behaviour."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medgcsam.data.cli import manifest_app
from medgcsam.data.manifest import file_sha256, write_manifest
from medgcsam.data.validate import validate_manifest
from tests.helpers_images import make_manifest, synthetic_pixels, write_empty_file, write_image, write_truncated_png


@pytest.fixture()
def clean(tmp_path):
    make_manifest(tmp_path, tmp_path / "m.csv", n_per_class=10, patients_per_class=4)
    return tmp_path / "m.csv"


def _edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    write_manifest(df, path)
    return df


def _codes(report):
    return {(i.severity, i.code) for i in report.issues}


def test_clean_manifest_passes(clean):
    report = validate_manifest(clean, task="bus_binary")
    assert report.ok and not report.errors, report.render()
    assert report.n_rows == 20


def test_missing_undecodable_and_empty_files(clean):
    root = clean.parent
    write_truncated_png(root / "images" / "benign" / "benign (1).png")
    write_empty_file(root / "images" / "benign" / "benign (2).png")
    (root / "images" / "malignant" / "malignant (1).png").unlink()

    def fix_sha(df):  # keep sha256 in step so only the decode error is reported for the broken files
        for p in ("images/benign/benign (1).png", "images/benign/benign (2).png"):
            df.loc[df["path"] == p, "sha256"] = file_sha256(root / p)
        return df

    _edit(clean, fix_sha)
    report = validate_manifest(clean, near_duplicates=False)
    text = report.render()
    assert not report.ok
    assert sum(i.code == "decode" for i in report.errors) == 2 and "truncated" in text and "empty (0 bytes)" in text
    missing = [i for i in report.errors if i.code == "missing-file"]
    assert len(missing) == 1 and "malignant (1).png" in missing[0].message and "line " in missing[0].message


def test_unknown_labels_duplicate_rows_and_sha_mismatch(clean):
    root = clean.parent

    def edit(df):
        df.loc[0, "label"] = "cyst"
        return pd.concat([df, df.iloc[[3]]], ignore_index=True)

    _edit(clean, edit)
    write_image(root / "images" / "benign" / "benign (5).png", synthetic_pixels(999))  # content changed
    report = validate_manifest(clean, task="bus_binary", near_duplicates=False)
    codes = _codes(report)
    assert {("error", "unknown-label"), ("error", "duplicate-row"), ("error", "sha256-mismatch")} <= codes
    unknown = next(i for i in report.errors if i.code == "unknown-label")
    assert "'cyst'" in unknown.message and "line 2" in unknown.message and unknown.rows == [0]
    without_task = validate_manifest(clean, near_duplicates=False)
    assert ("warning", "unknown-label") in _codes(without_task)


def test_labels_differing_in_case_are_errors_unless_a_task_maps_them(clean):
    """'Benign' next to 'benign' passed validation, although training without a task makes them two classes
    and data.classes matches labels exactly."""
    _edit(clean, lambda df: df.assign(label=df["label"].where(df.index != 0, df["label"].iloc[0].capitalize())))
    assert ("error", "label-case") in _codes(validate_manifest(clean, near_duplicates=False))
    with_classes = validate_manifest(clean, classes=["benign", "malignant"], near_duplicates=False)
    assert ("error", "unknown-label") in _codes(with_classes)
    assert validate_manifest(clean, task="bus_binary", near_duplicates=False).ok


def test_exact_duplicates_across_splits_or_labels(clean):
    root = clean.parent
    df = pd.read_csv(clean, dtype=str, keep_default_na=False)
    train_row = df[df["split"] == "train"].iloc[0]
    test_row = df[(df["split"] == "test") & (df["label"] != train_row["label"])].iloc[0]
    shutil.copy(root / train_row["path"], root / test_row["path"])

    def edit(d):
        d.loc[d["path"] == test_row["path"], "sha256"] = train_row["sha256"]
        return d

    _edit(clean, edit)
    report = validate_manifest(clean, near_duplicates=False)
    codes = _codes(report)
    assert ("error", "duplicate-conflicting-labels") in codes and ("error", "duplicate-across-splits") in codes
    issue = next(i for i in report.errors if i.code == "duplicate-across-splits")
    assert train_row["path"] in issue.message and test_row["path"] in issue.message


def test_near_duplicate_across_splits(clean):
    root = clean.parent
    df = pd.read_csv(clean, dtype=str, keep_default_na=False)
    a = df[df["split"] == "train"].iloc[0]
    b = df[(df["split"] == "test") & (df["label"] == a["label"])].iloc[0]
    src = np.asarray(Image.open(root / a["path"]))
    noisy = np.clip(src.astype(int) + np.random.default_rng(0).integers(-2, 3, src.shape), 0, 255).astype(np.uint8)
    write_image(root / b["path"], noisy, "png")

    def edit(d):
        d.loc[d["path"] == b["path"], "sha256"] = file_sha256(root / b["path"])
        return d

    _edit(clean, edit)
    report = validate_manifest(clean)
    near = [i for i in report.errors if i.code == "near-duplicate"]
    assert near and "different splits" in near[0].message and b["path"] in near[0].message


def test_patient_across_splits(clean):
    def edit(df):
        pid = df.loc[df["split"] == "train", "patient_id"].iloc[0]
        df.loc[df["patient_id"] == pid, "split"] = ["train"] * ((df["patient_id"] == pid).sum() - 1) + ["test"]
        return df

    _edit(clean, edit)
    report = validate_manifest(clean, near_duplicates=False)
    issue = next(i for i in report.errors if i.code == "patient-across-splits")
    assert "['test', 'train']" in issue.message


def test_non_utf8_manifest_is_reported_with_encoding(clean):
    text = clean.read_text(encoding="utf-8").replace("synthetic", "síntético")
    clean.write_bytes(text.encode("cp1252"))
    report = validate_manifest(clean, near_duplicates=False)
    assert [i.code for i in report.errors] == ["manifest"] and "--encoding cp1252" in report.errors[0].message
    assert validate_manifest(clean, encoding="cp1252", near_duplicates=False).ok


def test_cli_exit_codes_and_inputs_untouched(clean):
    root = clean.parent
    runner = CliRunner()
    res = runner.invoke(manifest_app, ["validate", str(clean), "--task", "bus_binary"])
    assert res.exit_code == 0, res.output
    write_truncated_png(root / "images" / "benign" / "benign (3).png")
    before = {p: (file_sha256(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    res = runner.invoke(manifest_app, ["validate", str(clean)])
    assert res.exit_code == 1 and "ERROR [decode]" in res.output and "benign (3).png" in res.output
    after = {p: (file_sha256(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    assert before == after


def test_cli_unknown_task_and_spaced_classes(clean):
    """--task typo ended in a KeyError traceback; --classes "benign, malignant" made ' malignant' a class that
    no (stripped) label matched."""
    runner = CliRunner()
    res = runner.invoke(manifest_app, ["validate", str(clean), "--task", "bus_binry", "--no-near-duplicates"])
    assert res.exit_code == 2 and "unknown task 'bus_binry'" in res.output and res.exception.__class__ is SystemExit
    res = runner.invoke(manifest_app, ["validate", str(clean), "--classes", "benign, malignant",
                                       "--no-near-duplicates"])
    assert res.exit_code == 0, res.output


def test_uppercase_sha256_is_the_same_digest(clean):
    """PowerShell's Get-FileHash writes uppercase hex: every such row was reported as a changed file, and a copy
    hashed by another tool (lowercase) was not seen as a duplicate."""
    df = pd.read_csv(clean, dtype=str, keep_default_na=False)
    df["sha256"] = df["sha256"].str.upper()
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "path": "copy.png", "sha256": df["sha256"].iloc[0].lower()}
    shutil.copy(clean.parent / df["path"].iloc[0], clean.parent / "copy.png")
    df.to_csv(clean, index=False)
    report = validate_manifest(clean, near_duplicates=False)
    assert "sha256-mismatch" not in _codes(report) and ("warning", "duplicate") in _codes(report)


def test_root_given_for_paths_relative_to_the_manifest_is_one_clear_error(tmp_path):
    """`manifest build` writes paths relative to the manifest's folder; passing the image folder as --root then
    made every row "missing". Now: one error naming both folders and the fix; without --root it validates, and
    training with that data.root stops before reading any image, with the same message."""
    from medgcsam.config import DataConfig
    from medgcsam.data.datasets import build_datasets
    from medgcsam.data.manifest import read_manifest
    from tests.helpers_images import make_image_folder

    images = tmp_path / "data" / "busi"
    make_image_folder(images, ("benign", "malignant"), 3)
    manifest = tmp_path / "manifests" / "site" / "v1" / "busi.csv"
    runner = CliRunner()
    assert runner.invoke(manifest_app, ["build", "-f", "folder", str(images), "-o", str(manifest)]).exit_code == 0
    assert read_manifest(manifest)["path"].str.startswith("../../../data/busi/").all()

    res = runner.invoke(manifest_app, ["validate", str(manifest), "--root", str(images), "--no-near-duplicates"])
    assert res.exit_code == 1 and "missing-file" not in res.output
    assert "[wrong-root]" in res.output and str(manifest.parent) in res.output and "--relative-to-root" in res.output
    assert validate_manifest(manifest, near_duplicates=False).ok
    with pytest.raises(ValueError, match="relative to the manifest's own folder"):
        build_datasets(DataConfig(manifest=manifest, root=images), {"image_size": 32, "channels": 1})
    # paths made relative to the image folder are read under --root as before
    rooted = tmp_path / "rooted.csv"
    assert runner.invoke(manifest_app, ["build", "-f", "folder", str(images), "-o", str(rooted),
                                        "--relative-to-root"]).exit_code == 0
    assert validate_manifest(rooted, root=images, near_duplicates=False).ok
