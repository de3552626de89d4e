"""Small real image files and manifests for tests (PNG 8/16-bit, JPEG, RGBA, broken files, DICOM).

Other test modules may import these; every file is written with Pillow or pydicom, nothing is mocked.
Images carry a class-dependent pattern plus per-image noise so they are distinct (no accidental
duplicates) and learnable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medgcsam.data.manifest import normalize_manifest, write_manifest
from medgcsam.data.split import split_manifest


def synthetic_pixels(seed: int, size: tuple[int, int] = (40, 48), class_index: int = 0) -> np.ndarray:
    """uint8 (H, W) grey image: a bright disc whose radius depends on the class, over noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    radius = (0.15 + 0.12 * class_index) * min(h, w)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.float32)
    img = 0.25 + 0.5 * disc + rng.normal(0, 0.12, size)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray, fmt: str = "png") -> Path:
    """Write (H, W) uint8 pixels as ``fmt``: png (L), png16 (I;16), rgb (PNG RGB), rgba, jpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        Image.fromarray(pixels).save(path)
    elif fmt == "png16":
        Image.fromarray(pixels.astype(np.uint16) * 16).save(path)  # 12-bit data in 16-bit PNG
    elif fmt == "rgb":
        Image.fromarray(np.stack([pixels] * 3, -1)).save(path)
    elif fmt == "rgba":
        alpha = np.full_like(pixels, 128)
        Image.fromarray(np.stack([pixels] * 3 + [alpha], -1)).save(path)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown fmt {fmt!r}")
    return path


_SUFFIX = {"png": ".png", "png16": ".png", "rgb": ".png", "rgba": ".png", "jpeg": ".jpg"}


def make_image_folder(root: Path, classes: list[str] | tuple[str, ...] = ("benign", "malignant"),
                      n_per_class: int = 6, size: tuple[int, int] = (40, 48), fmt: str = "png",
                      name: str = "{cls} ({i})", seed: int = 0) -> list[Path]:
    """``root/<class>/<name><suffix>`` images, one sub-folder per class (the BUSI / generic layout)."""
    paths = []
    for c, cls in enumerate(classes):
        for i in range(1, n_per_class + 1):
            pixels = synthetic_pixels(seed * 100_003 + c * 1000 + i, size, c)
            paths.append(write_image(root / cls / f"{name.format(cls=cls, i=i)}{_SUFFIX[fmt]}", pixels, fmt))
    return paths


def make_manifest(root: Path, out: Path, *, classes: tuple[str, ...] = ("benign", "malignant"),
                  n_per_class: int = 20, size: tuple[int, int] = (40, 48), fmt: str = "png",
                  patients_per_class: int | None = None, source: str = "synthetic", seed: int = 0,
                  split: bool = True, k: int = 5) -> pd.DataFrame:
    """Images under ``root/images`` and a manifest at ``out`` with paths relative to ``out``'s folder.

    With ``split`` (default) rows get an 80/20 train/test split and ``k`` folds via
    ``medgcsam.data.split.split_manifest``, so ``build_datasets`` can use it directly (val = fold 0).
    ``patients_per_class`` assigns several images per patient so grouped splitting can be checked.
    """
    paths = make_image_folder(root / "images", classes, n_per_class, size, fmt, seed=seed)
    rows = []
    for p in paths:
        cls = p.parent.name
        i = int(p.stem.split("(")[-1].rstrip(")"))
        pid = f"{source}:{cls}-{i % patients_per_class}" if patients_per_class else ""
        rel = Path(os.path.relpath(p.resolve(), out.parent.resolve())).as_posix()
        rows.append({"path": rel, "label": cls, "source": source, "patient_id": pid,
                     "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    df = normalize_manifest(pd.DataFrame(rows))
    if split:
        df = split_manifest(df, out.parent, k=k, seed=seed, near_duplicates=False)
    write_manifest(df, out)
    return df


def write_truncated_png(path: Path, size: tuple[int, int] = (40, 48)) -> Path:
    """A PNG cut in half: the header parses, the pixel data does not."""
    full = write_image(path, synthetic_pixels(7, size))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return path


def write_empty_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def dicom_test_file(name: str) -> Path:
    """One of pydicom's bundled test files (no network), e.g. CT_small.dcm, MR_truncated.dcm."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(f"pydicom has no bundled test file {name!r}")
    return Path(found)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, slope: float = 1.0, intercept: float = 0.0,
                patient_name: str = "Doe^Jane", patient_id: str = "PID-12345", **attributes) -> Path:
    """Uncompressed 16-bit grey DICOM from (H, W) or (F, H, W) integer pixels, with patient identifiers set
    (so tests can check that none of them leave the reader). ``attributes`` are set on the dataset last."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, "19700101"
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    arr = np.asarray(pixels, dtype=np.uint16)
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
