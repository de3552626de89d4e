"""Leakage-free splits: stratified by label, grouped by patient and by duplicate cluster.

A split group is the connected component of "same patient" and "same duplicate cluster", so neither
a patient nor an image (or its near copy) can sit on both sides. Frozen rows (an official ``test`` or
``val`` split, e.g. COVIDx) keep their split; everything else gets 80/20 train/test by default and a
stratified group k-fold inside train.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medgcsam.data.duplicates import (
    DEFAULT_PHASH_DISTANCE,
    UnionFind,
    compute_phashes,
    duplicate_clusters,
)


def split_groups(df: pd.DataFrame) -> list[str]:
    """Group id per row joining rows that share a patient_id or a dup_cluster."""
    uf = UnionFind(len(df))
    for column in ("patient_id", "dup_cluster"):
        first: dict[str, int] = {}
        for i, key in enumerate(df[column]):
            if key:
                uf.union(first.setdefault(key, i), i)
    roots = uf.labels()
    return [f"g{r:06d}" for r in roots]


def _stratified_group_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row from sklearn's StratifiedGroupKFold (shuffled, seeded).

    sklearn's warning about a small class is muted: it names no class and counts images, not the groups
    dealt out; ``_warn_missing_classes`` names what actually ended up missing."""
    if len(np.unique(groups)) < k:
        raise ValueError(f"only {len(np.unique(groups))} patient/duplicate groups for {k} folds; lower k")
    folds = np.full(len(labels), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held] = f
    return folds


def split_manifest(df: pd.DataFrame, root: Path, *, test_size: float = 0.2, k: int = 5, seed: int = 0,
                   near_duplicates: bool = True, max_distance: int = DEFAULT_PHASH_DISTANCE,
                   frozen: tuple[str, ...] = ("test", "val")) -> pd.DataFrame:
    """Assign ``split`` and ``fold`` to included rows; adds ``phash``, ``dup_cluster`` and ``group`` columns.

    ``test_size`` is realised as one fold of a ``round(1/test_size)``-fold stratified group split, which
    keeps class proportions close to the whole even with many small groups.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    df = df.copy()
    active = (df["exclude_reason"] == "").to_numpy()
    if near_duplicates:
        df["phash"] = compute_phashes(df, root)
    elif "phash" not in df.columns:
        df["phash"] = ""
    phashes = [h if a else "" for h, a in zip(df["phash"], active, strict=True)] if near_duplicates else None
    df["dup_cluster"] = duplicate_clusters(df.assign(sha256=df["sha256"].where(active, "")), phashes, max_distance)
    df["group"] = split_groups(df)
    is_frozen = active & df["split"].isin(frozen).to_numpy()
    _check_frozen_groups(df[is_frozen])
    free = active & ~is_frozen
    # a group touching a frozen split follows it, or it would straddle the boundary
    frozen_split = dict(zip(df.loc[is_frozen, "group"], df.loc[is_frozen, "split"], strict=True))
    follows = free & df["group"].isin(frozen_split).to_numpy()
    df.loc[follows, "split"] = df.loc[follows, "group"].map(frozen_split)
    free &= ~follows
    df.loc[~active, ["split"]] = ""
    df["fold"] = -1
    labels, groups = df["label"].to_numpy(), df["group"].to_numpy()
    carve_test = not (df.loc[is_frozen, "split"] == "test").any()
    if carve_test:
        n_outer = max(2, round(1.0 / test_size))
        outer = np.full(len(df), -1)
        outer[free] = _stratified_group_folds(labels[free], groups[free], n_outer, seed)
        df.loc[free & (outer == 0), "split"] = "test"
        df.loc[free & (outer != 0), "split"] = "train"
    else:
        df.loc[free, "split"] = "train"
    train = active & (df["split"] == "train").to_numpy()
    df.loc[train, "fold"] = _stratified_group_folds(labels[train], groups[train], k, seed + 1)
    _warn_missing_classes(df[active], carve_test)
    return df


def _warn_missing_classes(df: pd.DataFrame, carve_test: bool) -> None:
    """Name each class the train split, a carved test split or a train fold ended up without. Warnings, not
    errors: a tiny class may be unavoidable, and a task may drop the class at training time anyway."""
    classes = set(df["label"])
    train = df[df["split"] == "train"]
    lacking = [("the train split", train, "a model trained on it never sees them: add images of them to train "
                                          "(from a frozen split, if need be) or drop them with a task")]
    if carve_test:
        lacking.append(("the test split", df[df["split"] == "test"], "raise test_size or add images of them"))
    for where, part, fix in lacking:
        if missing := sorted(classes - set(part["label"])):
            warnings.warn(f"class(es) {missing} have no image in {where}: {fix}", stacklevel=3)
    folds = sorted(set(train["fold"]) - {-1})
    for label in sorted(set(train["label"])):
        if empty := [f for f in folds if not ((train["fold"] == f) & (train["label"] == label)).any()]:
            warnings.warn(f"class {label!r} has no image in train fold(s) {empty} (too few patient/duplicate groups "
                          f"for {len(folds)} folds): lower k or add images of it", stacklevel=3)


def _check_frozen_groups(frozen: pd.DataFrame) -> None:
    """A patient or duplicate cluster in two frozen splits (say official val and test) is leakage that no
    re-split may fix by moving frozen rows: the fix is the user's."""
    spans = frozen.groupby("group")["split"].nunique()
    bad = frozen[frozen["group"].isin(spans.index[spans > 1])]
    if bad.empty:
        return
    rows = bad[bad["group"] == bad["group"].iloc[0]]
    listed = "; ".join(f"line {r.Index + 2} {r.path!r} split={r.split} patient_id={r.patient_id!r} "
                       f"dup_cluster={r.dup_cluster!r}" for r in rows.itertuples())
    raise ValueError(f"{bad['group'].nunique()} patient/duplicate group(s) span frozen splits, e.g. {listed}; put "
                     f"each patient (and copies of an image) in one split, or set exclude_reason on the extra rows")


def split_summary(df: pd.DataFrame) -> str:
    """Per split: images, patients (ids or groups), class counts; then source x class per split."""
    df = df[df["exclude_reason"] == ""]
    classes = sorted(df["label"].unique())
    rows = []
    for split in ["train", "val", "test", ""]:
        part = df[df["split"] == split]
        if part.empty:
            continue
        counts = part["label"].value_counts()
        rows.append({"split": split or "(none)", "images": len(part),
                     "patients": part["patient_id"].replace("", np.nan).nunique(),
                     "groups": part["group"].nunique() if "group" in part else np.nan,
                     **{c: f"{counts.get(c, 0)} ({100 * counts.get(c, 0) / len(part):.1f}%)" for c in classes}})
    counts = df["label"].value_counts()
    rows.append({"split": "all", "images": len(df), "patients": df["patient_id"].replace("", np.nan).nunique(),
                 "groups": df["group"].nunique() if "group" in df else np.nan,
                 **{c: f"{counts.get(c, 0)} ({100 * counts.get(c, 0) / len(df):.1f}%)" for c in classes}})
    out = ["Per split (patients = distinct patient ids; groups = patient/duplicate groups used for splitting)",
           pd.DataFrame(rows).to_string(index=False)]
    if "fold" in df and (df["fold"] >= 0).any():
        folds = pd.crosstab(df.loc[df["fold"] >= 0, "fold"], df.loc[df["fold"] >= 0, "label"])
        out += ["", "Folds of the train split (images per class)", folds.to_string()]
    table = pd.crosstab([df["split"].replace("", "(none)"), df["source"]], df["label"], margins=True,
                        margins_name="total")
    out += ["", "Source x class per split", table.to_string()]
    return "\n".join(out)
