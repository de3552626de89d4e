"""Merge manifests of several sources into one task, the way the paper pooled BUS sources."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from medgcsam.data.manifest import normalize_manifest, read_manifest, resolve_root
from medgcsam.data.tasks import apply_task


def rebase_paths(df: pd.DataFrame, root: Path, base: Path) -> pd.DataFrame:
    """Rewrite paths relative to ``root`` as paths relative to ``base`` (the output manifest's folder)."""
    df = df.copy()
    root, base = Path(root).resolve(), Path(base).resolve()
    df["path"] = [Path(os.path.relpath(root / p, base)).as_posix() for p in df["path"]]
    return df


def merge_manifests(manifests: list[str | Path], out_dir: str | Path, *, task: str | None = None,
                    roots: list[str | Path | None] | None = None) -> pd.DataFrame:
    """Concatenate manifests (paths rebased onto ``out_dir``), each through ``task``'s label map.

    Keeps each row's split and fold so official splits survive; run ``manifest split`` afterwards to
    re-split the pooled rows (frozen test rows stay put). A row without a ``source`` gets its manifest's
    file stem, so every pooled row still says where it came from.
    """
    roots = roots or [None] * len(manifests)
    if len(roots) != len(manifests):
        raise ValueError(f"{len(roots)} roots for {len(manifests)} manifests; give one --root per manifest or none")
    frames = []
    for path, root in zip(manifests, roots, strict=True):
        df = read_manifest(path)
        if task is not None:
            try:  # per input, so an unknown label is reported with its own file's line number
                df = apply_task(df, task)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        df["source"] = df["source"].where(df["source"] != "", Path(path).stem)
        frames.append(rebase_paths(df, resolve_root(path, root), Path(out_dir)))
    merged = pd.concat(frames, ignore_index=True).fillna("")
    dup = merged["path"].duplicated(keep=False)
    if dup.any():
        raise ValueError(f"the same image appears in more than one input: {merged.loc[dup, 'path'].head(5).tolist()}; "
                         f"remove it from all but one manifest")
    return normalize_manifest(merged, origin="merged manifest")
