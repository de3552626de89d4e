"""Image arrays (a ``.npz`` file) written out as PNG files plus a manifest.

Some sources ship as arrays rather than files, MedMNIST (PneumoniaMNIST and others) among them:
``{split}_images`` (N, H, W) or (N, H, W, 3) uint8 and ``{split}_labels`` (N,) or (N, 1) class
indices, for the splits ``train``, ``val`` and ``test``. Everything else in the project reads image
files through a manifest, so the arrays become PNGs and rows, keeping the published split.
The file is read with ``allow_pickle=False``: an array of Python objects is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medgcsam.data.manifest import SPLITS, normalize_manifest, write_manifest
from medgcsam.data.tasks import case_variants

KEYS = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]


class ArrayExportError(ValueError):
    """An array file that cannot be exported; the message names the file, the array and the fix."""


def _class_names(classes: list[str]) -> list[str]:
    """Stripped names, each safe as one folder name: they become ``<split>/<class>/`` under the output."""
    names = [c.strip() for c in classes]
    for name in names:
        if (not name or name in (".", "..") or any(ch in name for ch in "/\\\0\n\r")
                or len(name.encode()) > 100):
            raise ArrayExportError(f"class name {name!r} cannot be a folder name; use 1-100 bytes without "
                                   f"'/', '\\', line breaks or NUL, and not '.' or '..'")
    if len(set(names)) != len(names):
        raise ArrayExportError(f"class names must be distinct, got {names}")
    if variants := case_variants(names):
        raise ArrayExportError(f"class names {variants} differ only in case, which training refuses; pick one spelling")
    return names


def _split_arrays(data: np.lib.npyio.NpzFile, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if unknown := sorted(set(data.files) - set(KEYS)):
        raise ArrayExportError(f"{path}: holds {unknown}, which would not be exported; keep only {KEYS} "
                               f"(rename other split names, e.g. valid_* to val_*)")
    found = {}
    for split in SPLITS:
        keys = (f"{split}_images", f"{split}_labels")
        present = [k in data.files for k in keys]
        if present == [True, True]:
            try:
                found[split] = (data[keys[0]], data[keys[1]])
            except ValueError as exc:  # object arrays need pickle, which is refused
                raise ArrayExportError(f"{path}: {keys} hold Python objects ({exc}); save plain numeric "
                                       f"arrays (numpy.savez with uint8 images and integer labels)") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a damaged member (bad CRC, cut short)
                raise ArrayExportError(f"{path}: {keys} cannot be read ({exc}); re-copy or re-save the file") from exc
        elif any(present):
            have, missing = (keys[0], keys[1]) if present[0] else (keys[1], keys[0])
            raise ArrayExportError(f"{path}: has {have!r} but not {missing!r}; each split needs both")
    if not found:
        raise ArrayExportError(f"{path}: no '<split>_images'/'<split>_labels' arrays (splits {list(SPLITS)}); "
                               f"it holds {sorted(data.files)}")
    return found


def _check(split: str, images: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> np.ndarray:
    """Validated class indices of one split, shape (N,)."""
    where = f"{path}: {split}_images"
    if images.dtype != np.uint8:
        raise ArrayExportError(f"{where} is {images.dtype}; store 8-bit images (uint8, 0-255)")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))) or 0 in images.shape[1:3]:
        raise ArrayExportError(f"{where} has shape {images.shape}; expected (N, H, W), (N, H, W, 1) or (N, H, W, 3) "
                               f"with H and W at least 1")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ArrayExportError(f"{path}: {split}_labels has shape {labels.shape}; expected one class index per "
                               f"image, (N,) or (N, 1) (multi-label arrays are not supported)")
    if len(labels) != len(images):
        raise ArrayExportError(f"{path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ArrayExportError(f"{path}: {split}_labels is {labels.dtype}; expected integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise ArrayExportError(f"{path}: {split}_labels[{bad[0]}] = {labels[bad[0]]} ({len(bad)} such rows) is not "
                               f"an index into the {len(classes)} class names {classes}; pass every class name")
    return labels


def export_arrays(npz: str | Path, out_dir: str | Path, classes: list[str], *, source: str) -> pd.DataFrame:
    """Write ``out_dir/<split>/<class>/<split>_<index>.png`` and ``out_dir/manifest.csv``; return the manifest.

    ``classes[i]`` names label index ``i``. Paths are relative to ``out_dir`` (the manifest's folder), the
    published split goes in ``split`` and every file's sha256 is recorded. ``out_dir`` must be new or
    empty, so no earlier file can mix with this export's. The manifest is written last: an interrupted
    export leaves no manifest, and its folder is to be deleted before trying again.
    """
    npz, out_dir = Path(npz), Path(out_dir)
    classes = _class_names(classes)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArrayExportError(f"{out_dir} exists and is not an empty folder; export into a new folder (an "
                               f"interrupted export leaves one without manifest.csv: delete it and run again)")
    try:
        data = np.load(npz, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated or not a zip at all
        raise ArrayExportError(f"{npz}: not a readable .npz file ({exc}); re-copy or re-save it") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ArrayExportError(f"{npz}: a single array (.npy), not an .npz of <split>_images/<split>_labels; "
                               f"save it with numpy.savez(train_images=..., train_labels=..., ...)")
    with data:
        splits = _split_arrays(data, npz)
        checked = {s: (images, _check(s, images, labels, classes, npz)) for s, (images, labels) in splits.items()}
    if not any(len(images) for images, _ in checked.values()):
        raise ArrayExportError(f"{npz}: every split is empty; there is nothing to export")
    rows = []
    for split, (images, labels) in checked.items():
        for label in np.unique(labels):
            (out_dir / split / classes[label]).mkdir(parents=True, exist_ok=True)
        width = len(str(len(images) - 1))
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = Path(split, classes[label], f"{split}_{i:0{width}d}.png")
            png = io.BytesIO()  # hashed as written, not read back
            Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(
                png, format="PNG")
            (out_dir / rel).write_bytes(png.getvalue())
            rows.append({"path": rel.as_posix(), "label": classes[label], "source": source, "split": split,
                         "sha256": hashlib.sha256(png.getvalue()).hexdigest()})
    df = normalize_manifest(pd.DataFrame.from_records(rows), origin=str(npz))
    write_manifest(df, out_dir / "manifest.csv")
    return df
