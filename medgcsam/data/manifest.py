"""The manifest: one plain CSV row per image, the single source of truth for what is trained on.

Columns are documented in ``data_manifests/README.md``. Paths are relative to a root given at load
time so a manifest moves with its data; ``fold`` is ``-1`` for rows outside cross-validation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import warnings
from pathlib import Path

import pandas as pd

from medgcsam.files import replace_atomically

MANIFEST_COLUMNS = ["path", "label", "source", "patient_id", "split", "fold", "sha256", "exclude_reason"]
REQUIRED_COLUMNS = ["path", "label"]
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, row or column and the fix."""


def _decode(raw: bytes, path: Path, encoding: str | None) -> str:
    if encoding is not None:
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ManifestError(f"{path}: cannot be read as {encoding}: {exc}") from None
    return decode_utf8(raw, path, encoding_option=True)


def decode_utf8(raw: bytes, path: Path, error: type[ValueError] = ManifestError, *,
                encoding_option: bool = False) -> str:
    """UTF-8 text with any BOM dropped (else it sticks to the first value); other encodings are an ``error``
    naming the file, line and likely encoding instead of a bare UnicodeDecodeError."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        guess = _guess_encoding(raw)
        fix = f"re-save it as UTF-8 or pass --encoding {guess}" if encoding_option else "re-save it as UTF-8"
        raise error(f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); it decodes as {guess}: "
                    f"{fix}") from None


def _guess_encoding(raw: bytes) -> str:
    """UTF-16 only with its BOM (Excel's "Unicode text"); else Windows-1252, which Excel writes on Windows."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def read_manifest(path: str | Path, *, encoding: str | None = None) -> pd.DataFrame:
    """Read and check a manifest; missing optional columns get their empty defaults.

    String columns come back as ``str`` (never NaN) and ``fold`` as ``int`` so callers can compare
    without NA handling. Errors name the CSV line (header is line 1) and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; build one with `medgcsam manifest build`")
    text = _decode(path.read_bytes(), path, encoding)
    header = [c.strip() for c in next(csv.reader(io.StringIO(text)), [])]
    _check_rows(text, len(header), path)
    df = read_csv_text(text, path)  # the dropped trailing fields are empty: checked above
    dup_cols = sorted({c for c in header if header.count(c) > 1})
    if dup_cols:
        raise ManifestError(f"{path}: column(s) {dup_cols} appear more than once in the header; keep one")
    df.columns = header
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; the header must contain at least "
                            f"{REQUIRED_COLUMNS} (found {list(df.columns)})")
    return normalize_manifest(df, origin=str(path))


def read_csv_text(text: str, path: Path, error: type[ValueError] = ManifestError) -> pd.DataFrame:
    """A CSV as strings only (never NaN); ``error`` names ``path`` when it does not parse. index_col=False: else
    rows one field longer than the header make the first column the index and shift every value one column
    left. Fields beyond the header are dropped (callers that must refuse them check first)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise error(f"{path}: not a readable CSV ({exc}); it must be comma separated with a header row") from None


def _check_rows(text: str, n_columns: int, path: Path) -> None:
    """Rows with values beyond the header's columns (an unquoted comma in a path; empty trailing fields, as
    some exporters write, are harmless and dropped), and blank lines between rows: the CSV reader skips them,
    so every message after one would name the wrong line."""
    reader = csv.reader(io.StringIO(text))
    long, blank, last = [], [], 0
    for row in reader:
        if not row:
            blank.append(reader.line_num)
            continue
        last = reader.line_num
        if any(c.strip() for c in row[n_columns:]):
            long.append(reader.line_num)
    problems = [(long, f"have more fields than the {n_columns} header columns; quote values that contain "
                       f"commas, or name the extra column in the header"),
                ([n for n in blank if n < last], "are blank; delete them (rows are named by their line in the "
                                                 "file, and a blank line shifts every number after it)")]
    for lines, what in problems:
        if lines:
            more = f" and {len(lines) - 10} more" if len(lines) > 10 else ""
            raise ManifestError(f"{path}: line(s) {', '.join(map(str, lines[:10]))}{more} {what}")


def normalize_manifest(df: pd.DataFrame, *, origin: str = "manifest") -> pd.DataFrame:
    """Fill defaults, coerce types and check cell values of an in-memory manifest."""
    df = df.copy()
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = -1 if col == "fold" else ""
    for col in df.columns:
        if col != "fold":
            df[col] = df[col].fillna("").astype(str).str.strip()
    # digests are compared as text: uppercase hex (PowerShell's Get-FileHash) read as changed files and hid duplicates
    df["sha256"] = df["sha256"].str.lower()
    for col in REQUIRED_COLUMNS:
        empty = df.index[df[col] == ""]
        if len(empty):
            raise ManifestError(f"{origin}: empty {col!r} on line(s) {_lines(empty)}; every row needs a {col}")
    bad_split = df.index[~df["split"].isin(("",) + SPLITS)]
    if len(bad_split):
        values = sorted(set(df.loc[bad_split, "split"]))
        raise ManifestError(f"{origin}: unknown split value(s) {values} on line(s) {_lines(bad_split)}; "
                            f"use one of {list(SPLITS)} or leave it empty")
    fold = pd.to_numeric(df["fold"].replace("", -1), errors="coerce")
    bad_fold = df.index[fold.isna() | (fold != fold.round())]
    if len(bad_fold):
        raise ManifestError(f"{origin}: non-integer fold on line(s) {_lines(bad_fold)}; use 0..k-1, or -1/empty "
                            f"for rows outside cross-validation")
    df["fold"] = fold.astype(int)
    order = MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[order].reset_index(drop=True)


def _lines(index: pd.Index, limit: int = 10) -> str:
    lines = [str(i + 2) for i in index[:limit]]
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    return ", ".join(lines) + more


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a manifest behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = normalize_manifest(df, origin=str(path))
    replace_atomically(path, lambda fh: df.to_csv(fh, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n"))
    return path


def manifest_sha256(path: str | Path) -> str:
    """Hash of the manifest file's bytes; stored with every model to tie it to its data."""
    return file_sha256(path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_root(manifest_path: str | Path, root: str | Path | None) -> Path:
    """Image paths are relative to ``root``; by default the manifest's own folder."""
    return Path(root) if root is not None else Path(manifest_path).resolve().parent


def root_mismatch(df: pd.DataFrame, manifest_path: str | Path, root: str | Path | None,
                  sample: int = 20) -> str | None:
    """Why every file is missing, when the reason is ``root``: the paths exist relative to the manifest's own
    folder (what `manifest build` writes by default) but not under the ``root`` given. None when ``root`` is
    unset or any sampled file exists under it. One clear message instead of one "missing" per row."""
    if root is None:
        return None
    paths = df.loc[df["exclude_reason"] == "", "path"].head(sample).tolist()
    given, own = Path(root), Path(manifest_path).resolve().parent
    if not paths or any((given / p).is_file() for p in paths) or not all((own / p).is_file() for p in paths):
        return None
    return (f"{manifest_path}: its paths are relative to the manifest's own folder {own} (as `manifest build` "
            f"writes them), not to the root {given} given (e.g. {paths[0]!r} is missing as {given / paths[0]}); "
            f"leave the root unset (--root, data.root), or rebuild with --relative-to-root to make the paths "
            f"relative to the image folder")


def included(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without an exclusion reason."""
    return df[df["exclude_reason"] == ""]
