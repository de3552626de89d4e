"""The shipped BUSI sample and manifest stay consistent; BUSI and PneumoniaMNIST checks run opt-in on real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medgcsam.data.arrays import export_arrays
from medgcsam.data.builders import build_manifest
from medgcsam.data.manifest import read_manifest
from medgcsam.data.split import split_manifest
from medgcsam.data.validate import validate_manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_manifests" / "samples"
BUSI = Path(os.environ.get("MEDGCSAM_BUSI", REPO.parent / "shared" / "data" / "busi"))
PNEUMONIAMNIST = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
OPTED_IN = os.environ.get("MEDGCSAM_REAL_DATA") == "1"


def test_busi_mini_is_small_valid_and_rebuildable():
    manifest = SAMPLES / "busi_mini.csv"
    size = sum(p.stat().st_size for p in (SAMPLES / "busi_mini").rglob("*") if p.is_file())
    assert size + manifest.stat().st_size < 1_000_000
    report = validate_manifest(manifest, task="bus_3class")
    assert report.ok, report.render()
    shipped = read_manifest(manifest)
    rebuilt = build_manifest("busi", SAMPLES / "busi_mini").frame
    assert sorted(zip(rebuilt["path"], rebuilt["label"], rebuilt["sha256"], strict=True)) == sorted(
        zip(shipped["path"].str.removeprefix("busi_mini/"), shipped["label"], shipped["sha256"], strict=True))
    assert set(shipped["split"]) == {"train", "test"} and sorted(set(shipped["fold"])) == [-1, 0, 1, 2, 3, 4]
    assert not {"benign (433).png", "malignant (145).png"} & {Path(p).name for p in shipped["path"]}


@pytest.mark.realdata
@pytest.mark.skipif(not OPTED_IN or not BUSI.is_dir(),
                    reason="opt-in: MEDGCSAM_REAL_DATA=1 with BUSI at ../shared/data/busi")
def test_real_busi_build_split_validate():
    df = build_manifest("busi", BUSI).frame
    assert len(df) == 780 and df["label"].value_counts().to_dict() == {"benign": 437, "malignant": 210, "normal": 133}
    df = split_manifest(df, BUSI, seed=0)
    assert (df.groupby("group")["split"].nunique() == 1).all()
    pair = df[df["path"].isin(["benign/benign (433).png", "malignant/malignant (145).png"])]
    assert pair["sha256"].nunique() == 1 and pair["split"].nunique() == 1
    committed = read_manifest(REPO / "data_manifests" / "busi.csv")
    report = validate_manifest(REPO / "data_manifests" / "busi.csv", root=BUSI, task="bus_3class")
    assert report.ok, report.render()  # the conflicting-label pairs are excluded, so training accepts it
    excluded = committed[committed["exclude_reason"] != ""]
    assert len(committed) == 780 and len(excluded) == 18
    assert set(excluded["exclude_reason"]) == {"duplicate with a conflicting label"}
    assert {"benign/benign (433).png", "malignant/malignant (145).png"} <= set(excluded["path"])


@pytest.mark.realdata
@pytest.mark.skipif(not OPTED_IN or not PNEUMONIAMNIST.is_file(),
                    reason="opt-in: MEDGCSAM_REAL_DATA=1 with ../shared/data/pneumoniamnist.npz")
def test_real_pneumoniamnist_export_finds_the_published_leak_and_matches_the_committed_manifest(tmp_path):
    df = export_arrays(PNEUMONIAMNIST, tmp_path, ["normal", "pneumonia"], source="pneumoniamnist")
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "normal"): 1214, ("train", "pneumonia"): 1214, ("val", "normal"): 135,
                      ("val", "pneumonia"): 135, ("test", "normal"): 234, ("test", "pneumonia"): 234}
    published = validate_manifest(tmp_path / "manifest.csv", task="pneumonia_binary", max_distance=0)
    assert [i.code for i in published.errors].count("duplicate-across-splits") == 3  # byte-identical train/val
    # the committed manifest is this export after `manifest split --max-distance 2` and one exclusion;
    # the export is deterministic, so every sha256 still matches
    committed = validate_manifest(REPO / "data_manifests" / "pneumoniamnist.csv", root=tmp_path,
                                  task="pneumonia_binary", max_distance=2)
    assert committed.ok, committed.render()
