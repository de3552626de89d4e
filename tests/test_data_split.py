"""Split guarantees: no patient or duplicate cluster in two splits, class proportions kept, seeded."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from medgcsam.data.manifest import file_sha256, normalize_manifest
from medgcsam.data.split import split_manifest, split_summary
from tests.helpers_images import synthetic_pixels, write_image

COUNTS = {"benign": 150, "malignant": 62, "normal": 38}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """250 small PNGs; some patients with several images, exact copies and near copies."""
    root = tmp_path_factory.mktemp("pool")
    rows = []
    for c, (cls, n) in enumerate(COUNTS.items()):
        for i in range(n):
            path = write_image(root / cls / f"{i}.png", synthetic_pixels(c * 1000 + i, (24, 24), c))
            rows.append({"path": f"{cls}/{i}.png", "label": cls, "source": "synthetic",
                         "patient_id": f"p{cls}{i // 2}" if i < 40 else "", "sha256": file_sha256(path)})
    df = normalize_manifest(pd.DataFrame(rows))
    # exact copies of two images with no patient id, and one copy filed under another label
    for src, dst, label in (("benign/100.png", "benign/copy_a.png", "benign"),
                            ("benign/101.png", "benign/copy_b.png", "benign"),
                            ("malignant/50.png", "normal/copy_c.png", "normal")):
        shutil.copy(root / src, root / dst)
        df.loc[len(df)] = {**df[df["path"] == src].iloc[0].to_dict(), "path": dst, "label": label}
    # a near copy: same pixels with mild noise, re-encoded as JPEG
    near = synthetic_pixels(1000 + 61, (24, 24), 1).astype(int) + np.random.default_rng(0).integers(-3, 4, (24, 24))
    write_image(root / "malignant" / "near.jpg", np.clip(near, 0, 255).astype(np.uint8), "jpeg")
    df.loc[len(df)] = {"path": "malignant/near.jpg", "label": "malignant", "source": "synthetic", "patient_id": "",
                       "split": "", "fold": -1, "sha256": file_sha256(root / "malignant" / "near.jpg"),
                       "exclude_reason": ""}
    return root, normalize_manifest(df)


def _assert_no_leak(df: pd.DataFrame, column: str) -> None:
    keyed = df[df[column] != ""]
    assert (keyed.groupby(column)["split"].nunique() == 1).all(), f"a {column} spans two splits"


def test_groups_never_cross_splits_and_proportions_hold(pool):
    root, df = pool
    out = split_manifest(df, root, seed=0)
    assert set(out["split"]) == {"train", "test"}
    _assert_no_leak(out, "patient_id")
    _assert_no_leak(out, "dup_cluster")
    _assert_no_leak(out, "group")
    pair = out[out["path"].isin(["malignant/61.png", "malignant/near.jpg"])]
    assert pair["dup_cluster"].nunique() == 1 and pair["dup_cluster"].iloc[0] != ""
    assert out.loc[out["path"].isin(["benign/100.png", "benign/copy_a.png"]), "dup_cluster"].nunique() == 1
    whole = out["label"].value_counts(normalize=True)
    for split, part in out.groupby("split"):
        share = part["label"].value_counts(normalize=True)
        assert (share - whole).abs().max() < 0.02, f"{split} class shares {share.to_dict()} vs {whole.to_dict()}"
    assert abs((out["split"] == "test").mean() - 0.2) < 0.03


def test_folds_partition_train_without_leaks(pool):
    root, df = pool
    out = split_manifest(df, root, k=5, seed=0, near_duplicates=False)
    train = out[out["split"] == "train"]
    assert sorted(train["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (out.loc[out["split"] == "test", "fold"] == -1).all()
    assert (train.groupby("group")["fold"].nunique() == 1).all()
    whole = train["label"].value_counts(normalize=True)
    for _, part in train.groupby("fold"):
        # within 2 points plus one image of rounding (a fold holds ~40 images)
        assert (part["label"].value_counts(normalize=True) - whole).abs().max() < 0.02 + 1 / len(part)


def test_split_is_seeded(pool):
    root, df = pool
    a = split_manifest(df, root, seed=3, near_duplicates=False)
    b = split_manifest(df, root, seed=3, near_duplicates=False)
    c = split_manifest(df, root, seed=4, near_duplicates=False)
    assert a["split"].tolist() == b["split"].tolist() and a["fold"].tolist() == b["fold"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_frozen_test_stays_and_pulls_its_groups(pool):
    root, df = pool
    df = df.copy()
    official = df["patient_id"] == "pbenign0"
    df.loc[official, "split"] = "test"
    df.loc[official.idxmax(), "split"] = ""  # one image of that patient arrives without a split
    df.loc[df["path"] == "normal/5.png", "exclude_reason"] = "axilla, not breast"
    out = split_manifest(df, root, near_duplicates=False)
    assert (out.loc[df["patient_id"] == "pbenign0", "split"] == "test").all()
    assert (out["split"] == "test").sum() == official.sum()  # no extra test carved when one is frozen
    excluded = out[out["path"] == "normal/5.png"].iloc[0]
    assert excluded["split"] == "" and excluded["fold"] == -1


def test_summary_tables(pool):
    root, df = pool
    text = split_summary(split_manifest(df, root, near_duplicates=False))
    assert "Per split" in text and "Source x class per split" in text and "Folds of the train split" in text
    assert "synthetic" in text and "test" in text


def test_bad_arguments(pool):
    root, df = pool
    with pytest.raises(ValueError, match="test_size"):
        split_manifest(df, root, test_size=1.5)
    with pytest.raises(ValueError, match="groups for 5 folds"):
        split_manifest(df.head(3), root, near_duplicates=False)


def test_group_in_two_frozen_splits_is_an_error_not_kept(pool):
    """Official val and test rows of one patient were kept where they were: leakage the split left in place."""
    root, df = pool
    df = df.copy()
    first, second = df.index[df["patient_id"] == "pbenign0"][:2]
    df.loc[first, "split"], df.loc[second, "split"] = "val", "test"
    with pytest.raises(ValueError, match=r"1 patient/duplicate group\(s\) span frozen splits.*'pbenign0'.*exclude"):
        split_manifest(df, root, near_duplicates=False)


def _tiny(n_normal_patients: int, images_each: int = 5) -> pd.DataFrame:
    rows = [{"path": f"b{i}.png", "label": "benign", "patient_id": f"b{i}"} for i in range(40)]
    rows += [{"path": f"n{i}_{j}.png", "label": "normal", "patient_id": f"n{i}"}
             for i in range(n_normal_patients) for j in range(images_each)]
    return normalize_manifest(pd.DataFrame(rows))


def test_class_with_fewer_patients_than_folds_is_named(tmp_path):
    """10 images of 2 patients: sklearn counts images (10 >= 5) and said nothing, yet 3 of 5 folds got none."""
    df = _tiny(2)
    df.loc[:7, "split"] = "test"  # a frozen test of benign rows: every normal row goes to train
    with pytest.warns(UserWarning, match=r"class 'normal' has no image in train fold\(s\) \[\d, \d, \d\].*lower k"):
        out = split_manifest(df, tmp_path, near_duplicates=False, k=5)
    assert out.loc[out["label"] == "normal", "fold"].nunique() == 2


def test_class_only_in_a_frozen_split_is_warned(tmp_path):
    df = _tiny(3)
    df.loc[df["label"] == "normal", "split"] = "test"
    with pytest.warns(UserWarning, match=r"class\(es\) \['normal'\] have no image in the train split"):
        out = split_manifest(df, tmp_path, near_duplicates=False, k=5)
    assert (out.loc[out["label"] == "normal", "split"] == "test").all()
