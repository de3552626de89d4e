"""Exact (sha256) and near (perceptual hash) duplicate detection, and the clusters they form.

BUSI alone holds ~19 % duplicated or near-duplicated images, some filed under two labels; a split
that ignores this leaks test images into training. Clusters are connected components, so a chain of
near duplicates ends up in one cluster and therefore in one split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medgcsam.data.io import ImageReadError, read_image

DEFAULT_PHASH_DISTANCE = 4  # of 64 bits; resaves/rescales stay within ~2, distinct scans are far above 10


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def phash_hex(path: str | Path) -> str:
    """64-bit DCT perceptual hash of the image's grey version, through our reader so DICOM works too."""
    import imagehash

    arr = read_image(path)
    grey = arr.mean(axis=0) if arr.shape[0] == 3 else arr[0]
    return str(imagehash.phash(Image.fromarray(np.round(grey * 255).astype(np.uint8))))


def compute_phashes(df: pd.DataFrame, root: Path) -> list[str]:
    """phash per row ('' where the file is unreadable); reuses a filled ``phash`` column."""
    existing = df["phash"].tolist() if "phash" in df.columns else [""] * len(df)
    out = []
    for rel, known in zip(df["path"], existing, strict=True):
        if known:
            out.append(known)
            continue
        try:
            out.append(phash_hex(root / rel))
        except ImageReadError:
            out.append("")
    return out


def near_duplicate_pairs(hashes: list[str], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j with Hamming distance <= max_distance; blockwise numpy, O(n^2/2)."""
    valid = [i for i, h in enumerate(hashes) if h]
    if len(valid) < 2:
        return []
    codes = np.array([int(hashes[i], 16) for i in valid], dtype=np.uint64)
    pairs: list[tuple[int, int, int]] = []
    block = max(1, 4_000_000 // len(codes))  # keeps the distance block near 32 MB
    for start in range(0, len(codes), block):
        chunk = codes[start:start + block]
        dist = np.bitwise_count(chunk[:, None] ^ codes[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if start + r < c:
                pairs.append((valid[start + r], valid[c], int(dist[r, c])))
    return pairs


def duplicate_clusters(df: pd.DataFrame, phashes: list[str] | None = None,
                       max_distance: int = DEFAULT_PHASH_DISTANCE) -> list[str]:
    """Cluster id per row (``dup<N>``) for rows sharing a sha256 or a near-identical phash; '' for singletons."""
    uf = UnionFind(len(df))
    first: dict[str, int] = {}
    for i, sha in enumerate(df["sha256"]):
        if sha:
            uf.union(first.setdefault(sha, i), i)
    if phashes is not None:
        for i, j, _ in near_duplicate_pairs(phashes, max_distance):
            uf.union(i, j)
    roots = uf.labels()
    sizes = pd.Series(roots).value_counts()
    names: dict[int, str] = {}
    return ["" if sizes[r] == 1 else names.setdefault(r, f"dup{len(names):04d}") for r in roots]
