"""Manifest builders, one per public layout, registered by format name.

Each builder reads a source exactly as it is published and returns manifest rows with paths relative
to the source root. Structural problems (a missing label file, an unparseable row) raise
``BuildError`` naming the file and line; a listed image that is absent becomes a row with an
``exclude_reason`` so the manifest still says what the source claimed to contain.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medgcsam.data.io import IMAGE_SUFFIXES, find_images
from medgcsam.data.manifest import MANIFEST_COLUMNS, decode_utf8, file_sha256, normalize_manifest, read_csv_text

MISSING_FILE = "file not found"
NOT_UTF8 = "file name is not UTF-8"


class BuildError(ValueError):
    """A source layout that cannot be read; the message names the file/line and the fix."""


@dataclass
class BuildResult:
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)


Builder = Callable[..., BuildResult]
_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn
    return deco


def list_formats() -> list[str]:
    return sorted(_BUILDERS)


def build_manifest(fmt: str, root: str | Path, *, hash_files: bool = True, **options) -> BuildResult:
    """Run the ``fmt`` builder on ``root``; paths in the result are relative to ``root``."""
    if fmt not in _BUILDERS:
        raise BuildError(f"unknown format {fmt!r}; available: {list_formats()}")
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"{root}: not a folder; pass the folder that holds the {fmt} data")
    result = _BUILDERS[fmt](root, **options)
    df = result.frame
    foreign = df.loc[df["exclude_reason"] == NOT_UTF8, "path"].tolist()
    if foreign:
        result.notes.append(f"{len(foreign)} file(s) whose name is not valid UTF-8 kept with exclude_reason "
                            f"'{NOT_UTF8}', the undecodable bytes shown as \\xNN (e.g. {', '.join(foreign[:3])}); "
                            f"rename them (e.g. `convmv -f latin1 -t utf-8 -r --notest {root}`) and rebuild to train "
                            f"on them")
    missing = [not (root / p).is_file() and p not in foreign for p in df["path"]]
    df.loc[missing, "exclude_reason"] = df.loc[missing, "exclude_reason"].where(
        df.loc[missing, "exclude_reason"] != "", MISSING_FILE)
    if any(missing):
        first = df.loc[missing, "path"].head(3).tolist()
        result.notes.append(f"{sum(missing)} listed image(s) not found under {root} (e.g. {first}); "
                            f"kept with exclude_reason '{MISSING_FILE}'")
    if hash_files:
        df["sha256"] = [file_sha256(root / p) if not (m or p in foreign) else ""
                        for p, m in zip(df["path"], missing, strict=True)]
    result.frame = normalize_manifest(df, origin=f"{fmt} build of {root}")
    return result


def _escape_undecodable(record: dict) -> dict:
    """A row whose path (or class folder) holds bytes that are not UTF-8 (Python carries them as surrogates, which
    neither pandas nor a CSV can hold) keeps those bytes as ``\\xNN`` and is excluded, so the manifest still says
    the file is there and the rest builds. The escaped path names the file but does not open it."""
    if all(_utf8(v) for v in record.values() if isinstance(v, str)):
        return record
    escaped = {k: os.fsencode(v).decode("utf-8", "backslashreplace") if isinstance(v, str) else v
               for k, v in record.items()}
    return {**escaped, "exclude_reason": NOT_UTF8}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rows(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records([_escape_undecodable(r) for r in records])
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = -1 if col == "fold" else ""
    return df


def _read_text(path: Path) -> str:
    return decode_utf8(path.read_bytes(), path, BuildError)


def _read_table(path: Path) -> pd.DataFrame:
    """A label CSV as strings (builders read only its named columns)."""
    return read_csv_text(_read_text(path), path, BuildError)


def _walk_class_folders(root: Path, skip: Callable[[Path], bool] = lambda p: False
                        ) -> tuple[list[dict], int, list[str]]:
    """Images under ``root/<class>/**`` as batch inference finds them (DICOM also by its magic, linked
    folders followed); returns records, how many files ``skip`` dropped, and the other files, so none
    vanishes unreported."""
    records, skipped, other = [], 0, []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images, rest = find_images(class_dir)
        other += [f"{class_dir.name}/{rel}" for rel in rest]
        for rel in images:
            if skip(class_dir / rel):
                skipped += 1
            else:
                records.append({"path": f"{class_dir.name}/{rel}", "label": class_dir.name})
    return records, skipped, other


def _other_files_note(other: list[str]) -> list[str]:
    if not other:
        return []
    return [f"{len(other)} file(s) left out as neither {'/'.join(IMAGE_SUFFIXES)} nor DICOM (e.g. {other[:3]}); "
            f"convert any that are images"]


@register_builder("folder")
def build_folder(root: Path, *, source: str | None = None) -> BuildResult:
    """Generic layout: one sub-folder per class, images anywhere below it.

    Images lying directly in ``root`` are refused, not skipped: their label is unknown, and a flat folder
    with one sub-folder (``images/``) would otherwise become a one-class manifest named after it."""
    loose = [rel for rel in find_images(root)[0] if "/" not in rel]
    if loose:
        raise BuildError(f"{root}: {len(loose)} image(s) lie directly in the folder (e.g. {loose[:3]}), where "
                         f"their class is unknown; --format folder expects one sub-folder per class, "
                         f"{root}/<class>/<image> (e.g. {root}/benign/1.png). Move each image into its class's "
                         f"folder; for unlabelled images use `medgcsam predict` on the folder instead")
    records, _, other = _walk_class_folders(root)
    if not records:
        raise BuildError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders; expected "
                         f"{root}/<class>/<image>")
    df = _rows(records)
    df["source"] = source or root.name
    notes = [f"{len(df)} images in {df['label'].nunique()} class folders", *_other_files_note(other)]
    if df["label"].nunique() == 1:
        notes.append(f"warning: every image is labelled {df['label'].iloc[0]!r} (the only sub-folder of {root}); "
                     f"if that folder is not a class, lay the images out as {root}/<class>/<image>")
    return BuildResult(df, notes)


BUSI_CLASSES = ("benign", "malignant", "normal")


@register_builder("busi")
def build_busi(root: Path) -> BuildResult:
    """BUSI: ``benign/ malignant/ normal/`` (optionally inside ``Dataset_BUSI_with_GT``); every file whose
    stem contains ``_mask`` (``_mask``, ``_mask_1``, ...) is a segmentation mask, not an image."""
    if (root / "Dataset_BUSI_with_GT").is_dir():
        root_in = root / "Dataset_BUSI_with_GT"
        prefix = "Dataset_BUSI_with_GT/"
    else:
        root_in, prefix = root, ""
    extra = sorted(p.name for p in root_in.iterdir() if p.is_dir() and p.name.lower() not in BUSI_CLASSES
                   and not p.name.startswith("."))
    if extra:
        raise BuildError(f"{root_in}: unexpected folder(s) {extra}; BUSI has only {list(BUSI_CLASSES)} "
                         f"(use --format folder for other layouts)")
    records, masks, other = _walk_class_folders(root_in, skip=lambda p: "_mask" in p.stem.lower())
    if not records:
        raise BuildError(f"{root_in}: no BUSI images; expected benign/ malignant/ normal/ with 'benign (1).png' ...")
    df = _rows(records)
    df["path"] = prefix + df["path"]
    df["label"] = df["label"].str.lower()
    df["source"] = "busi"
    counts = df["label"].value_counts().to_dict()
    return BuildResult(df, [f"{len(df)} images {counts}; {masks} mask file(s) dropped",
                            "BUSI has no patient ids: `manifest split` groups by duplicate cluster",
                            *_other_files_note(other)])


@register_builder("gdph_sysucc")
def build_gdph_sysucc(root: Path) -> BuildResult:
    """GDPH&SYSUCC (HoVer-Trans): ``label.csv`` (name,label with 0 benign / 1 malignant) and ``img/``."""
    label_file = root / "label.csv"
    if not label_file.is_file():
        raise BuildError(f"{root}: no label.csv; pass the GDPH&SYSUCC folder that holds label.csv and img/")
    table = _read_table(label_file)
    table.columns = [c.strip().lower() for c in table.columns]
    if not {"name", "label"} <= set(table.columns):
        raise BuildError(f"{label_file}: columns {list(table.columns)}; expected 'name' and 'label'")
    names = {"0": "benign", "1": "malignant", "benign": "benign", "malignant": "malignant"}
    records = []
    for i, (name, label) in enumerate(zip(table["name"].str.strip(), table["label"].str.strip(), strict=True)):
        if label.lower() not in names:
            raise BuildError(f"{label_file} line {i + 2}: label {label!r}; expected 0 (benign) or 1 (malignant)")
        if not name:  # would become the img/ folder itself, excluded as 'file not found'
            raise BuildError(f"{label_file} line {i + 2}: empty name; give the image file name or delete the row")
        records.append({"path": _find_image(root / "img", name, root), "label": names[label.lower()]})
    df = _rows(records)
    df["source"] = "gdph_sysucc"
    return BuildResult(df, [f"{len(df)} images {df['label'].value_counts().to_dict()} from {label_file.name}",
                            "GDPH&SYSUCC has no patient ids: `manifest split` groups by duplicate cluster"])


def _find_image(folder: Path, name: str, root: Path) -> str:
    """``name`` as listed, or with the first image suffix that exists (label files often omit it)."""
    candidates = [folder / name] + [folder / f"{name}{s}" for s in IMAGE_SUFFIXES if not name.lower().endswith(s)]
    hit = next((c for c in candidates if c.is_file()), candidates[0])
    return hit.relative_to(root).as_posix()


@register_builder("busbra")
def build_busbra(root: Path, *, folds: int = 5) -> BuildResult:
    """BUS-BRA: ``bus_data.csv`` (ID, Pathology, ...), ``Images/<ID>.png``, official ``<k>-fold-cv.csv``.

    The case number in the ID (``bus_0001-l`` -> ``0001``) is the patient group, since left/right and
    repeated views of one case must stay together. Official folds go to ``fold`` with every row in
    ``train``; run ``manifest split`` to carve a test split instead.
    """
    data_file = root / "bus_data.csv"
    if not data_file.is_file():
        raise BuildError(f"{root}: no bus_data.csv; pass the BUS-BRA folder that holds bus_data.csv and Images/")
    table = _read_table(data_file)
    cols = {c.strip().lower(): c for c in table.columns}
    if "id" not in cols or "pathology" not in cols:
        raise BuildError(f"{data_file}: columns {list(table.columns)}; expected at least 'ID' and 'Pathology'")
    case_col = cols.get("case")
    records = []
    for i, row in table.iterrows():
        image_id = row[cols["id"]].strip()
        label = row[cols["pathology"]].strip().lower()
        if label not in ("benign", "malignant"):
            raise BuildError(f"{data_file} line {i + 2}: Pathology {label!r}; expected benign or malignant")
        match = re.search(r"(\d+)", image_id)
        if case_col is None and match is None:
            raise BuildError(f"{data_file} line {i + 2}: ID {image_id!r} has no case number (e.g. bus_0001-l)")
        case = row[case_col].strip() if case_col else match.group(1)
        records.append({"path": _find_image(root / "Images", image_id, root), "label": label,
                        "patient_id": f"busbra:{case}", "split": "train", "bus_id": image_id})
    df = _rows(records)
    df["source"] = "busbra"
    notes = [f"{len(df)} images {df['label'].value_counts().to_dict()}, {df['patient_id'].nunique()} cases"]
    fold_file = root / f"{folds}-fold-cv.csv"
    if fold_file.is_file():
        df["fold"] = _official_folds(fold_file, df["bus_id"])
        notes.append(f"official folds from {fold_file.name}: {df['fold'].value_counts().sort_index().to_dict()}")
    else:
        notes.append(f"no {fold_file.name}: folds left empty (run `manifest split`)")
    return BuildResult(df, notes)


def _official_folds(fold_file: Path, ids: pd.Series) -> list[int]:
    table = _read_table(fold_file)
    cols = {c.strip().lower(): c for c in table.columns}
    if "id" not in cols or "kfold" not in cols:
        raise BuildError(f"{fold_file}: columns {list(table.columns)}; expected 'ID' and 'kFold'")
    values = pd.to_numeric(table[cols["kfold"]], errors="coerce")
    if values.isna().any():
        bad = int(values.isna().to_numpy().argmax())
        raise BuildError(f"{fold_file} line {bad + 2}: kFold {table[cols['kfold']].iloc[bad]!r} is not an integer")
    offset = int(values.min())  # the published files count folds from 1
    lookup = dict(zip(table[cols["id"]].str.strip(), (values - offset).astype(int), strict=True))
    missing = [i for i in ids if i not in lookup]
    if missing:
        raise BuildError(f"{fold_file}: no fold for ID(s) {missing[:5]}; use the fold file shipped with this "
                         f"bus_data.csv")
    return [lookup[i] for i in ids]


COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19", "positive", "negative")
COVIDX_SOURCE_ALIASES = {"rnsa": "rsna"}  # a typo in the published v9 label files


@dataclass(frozen=True)
class CovidxRow:
    patient_id: str
    filename: str
    label: str
    source: str


def parse_covidx_line(line: str, where: str) -> CovidxRow:
    """One label-file row, parsed from the right because patient ids may contain spaces.

    4-field rows end with the data source; legacy 3-field rows end with the class.
    """
    text = line.rstrip("\r\n").strip()
    tokens = text.split(" ")
    if len(tokens) < 3:
        raise BuildError(f"{where}: {text!r} has {len(tokens)} field(s); expected 'patient_id filename class "
                         f"[source]' separated by single spaces")
    if tokens[-1] in COVIDX_CLASSES:
        pid, filename, label = text.rsplit(" ", 2)
        source = "unknown"
    else:
        if len(tokens) < 4:
            raise BuildError(f"{where}: {text!r}: last field {tokens[-1]!r} is neither a class {list(COVIDX_CLASSES)} "
                             f"nor preceded by one")
        pid, filename, label, source = text.rsplit(" ", 3)
        if label not in COVIDX_CLASSES:
            raise BuildError(f"{where}: class {label!r} is not one of {list(COVIDX_CLASSES)}")
    source = source.lower()
    return CovidxRow(pid.strip(), filename, label, COVIDX_SOURCE_ALIASES.get(source, source))


def _covidx_split(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in ("train", "val", "test") if s in lower), None)


@register_builder("covidx")
def build_covidx(root: Path) -> BuildResult:
    """COVIDx label files (``train.txt``/``val.txt``/``test.txt`` or ``*_COVIDx*.txt``) in ``root`` or
    ``root/labels``; images in ``root/<split>/`` (CXR-2..4 layout) or ``root/``.

    The official split of every row is kept (``manifest split`` never moves frozen test rows) and the
    patient group is ``source:patient_id``, since ids are only unique within a source.
    """
    label_files = sorted(p for d in (root, root / "labels") if d.is_dir() for p in d.glob("*.txt")
                         if _covidx_split(p.name))
    if not label_files:
        raise BuildError(f"{root}: no COVIDx label files (train.txt, val.txt, test.txt or *_COVIDx*.txt) "
                         f"in it or in labels/")
    records, aliased, sources = [], 0, Counter()
    for lf in label_files:
        split = _covidx_split(lf.name)
        image_dir = root / split if (root / split).is_dir() else root
        for n, line in enumerate(_read_text(lf).splitlines(), start=1):
            if not line.strip():
                continue
            row = parse_covidx_line(line, f"{lf} line {n}")
            aliased += line.rstrip().lower().endswith(tuple(f" {a}" for a in COVIDX_SOURCE_ALIASES))
            sources[row.source] += 1
            records.append({"path": (image_dir / row.filename).relative_to(root).as_posix(), "label": row.label,
                            "source": row.source, "patient_id": f"{row.source}:{row.patient_id}",
                            "split": split})
    df = _rows(records)
    notes = [f"{len(df)} rows from {[p.name for p in label_files]}; per split "
             f"{df['split'].value_counts().to_dict()}", f"sources: {dict(sources)}"]
    if aliased:
        notes.append(f"{aliased} row(s) with source 'rnsa' normalised to 'rsna'")
    return BuildResult(df, notes)
