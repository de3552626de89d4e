"""Check a manifest against its files without changing either; every finding names rows and files.

Errors make training unsafe or impossible (missing or undecodable files, labels outside the task,
leakage of a patient or an image across splits, one image with two labels); warnings are worth a
look but do not block (duplicates inside one split, excluded rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medgcsam.data.duplicates import DEFAULT_PHASH_DISTANCE, compute_phashes, near_duplicate_pairs
from medgcsam.data.io import ImageReadError, read_image
from medgcsam.data.manifest import ManifestError, file_sha256, read_manifest, resolve_root, root_mismatch
from medgcsam.data.tasks import case_variants, get_task, list_tasks


@dataclass
class Issue:
    severity: str  # "error" | "warning"
    code: str
    message: str
    rows: list[int] = field(default_factory=list)  # 0-based row positions; CSV line = row + 2


@dataclass
class ValidationReport:
    manifest: Path
    n_rows: int = 0
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: str, code: str, message: str, rows: list[int] | None = None) -> None:
        self.issues.append(Issue(severity, code, message, list(rows or [])))

    def render(self, limit: int = 50) -> str:
        lines = [f"validate {self.manifest}: {self.n_rows} rows, {len(self.errors)} error(s), "
                 f"{len(self.warnings)} warning(s)"]
        for issue in self.errors + self.warnings:
            lines.append(f"{issue.severity.upper()} [{issue.code}] {issue.message}")
        if len(lines) > limit + 1:
            lines = lines[: limit + 1] + [f"... {len(lines) - limit - 1} more finding(s) not shown"]
        return "\n".join(lines)


def _line(df: pd.DataFrame, i: int) -> int:
    """CSV line of row position ``i``: the header is line 1; frames cut from a manifest carry ``manifest_line``."""
    return int(df["manifest_line"].iloc[i]) if "manifest_line" in df.columns else i + 2


def _row(df: pd.DataFrame, i: int) -> str:
    return (f"line {_line(df, i)} ({df['path'].iloc[i]!r}, label={df['label'].iloc[i]}, "
            f"split={df['split'].iloc[i] or '-'})")


def leakage_report(frames: dict[str, pd.DataFrame], origin: str | Path) -> ValidationReport:
    """The validator's leakage and conflicting-label errors, on the splits a training will use (``val`` may be a
    fold of the train split), from what the manifest already holds: its sha256 and phash columns, no file reads.
    ``train`` runs it before any work, so it never trains on a manifest ``manifest validate`` rejects."""
    df = pd.concat([frame.assign(split=name) for name, frame in frames.items()], ignore_index=True)
    report = ValidationReport(Path(origin), len(df))
    active = np.ones(len(df), dtype=bool)
    _check_duplicate_paths(df, report)
    _check_exact_duplicates(df, active, report)
    if "phash" in df.columns and (df["phash"] != "").any():
        _check_near_duplicates(df, df["phash"].tolist(), DEFAULT_PHASH_DISTANCE, report)
    _check_patients(df, active, report)
    report.issues = report.errors
    return report


def validate_manifest(path: str | Path, *, root: str | Path | None = None, task: str | None = None,
                      classes: list[str] | None = None, encoding: str | None = None, decode: bool = True,
                      near_duplicates: bool = True, max_distance: int = DEFAULT_PHASH_DISTANCE,
                      check_sha256: bool = True) -> ValidationReport:
    """Run every check and collect the findings; reads files, writes nothing."""
    path = Path(path)
    report = ValidationReport(path)
    try:
        df = read_manifest(path, encoding=encoding)
    except ManifestError as exc:
        report.add("error", "manifest", str(exc))
        return report
    report.n_rows = len(df)
    base = resolve_root(path, root)
    if (mismatch := root_mismatch(df, path, root)) is not None:
        report.add("error", "wrong-root", mismatch)
        return report
    active = (df["exclude_reason"] == "").to_numpy()
    if (~active).any():
        reasons = df.loc[~active, "exclude_reason"].value_counts().to_dict()
        report.add("warning", "excluded", f"{int((~active).sum())} row(s) excluded and not checked further: {reasons}")

    _check_rows(df, report)
    _check_labels(df, active, report, task, classes)
    readable = _check_files(df, active, base, report, decode, check_sha256)
    _check_exact_duplicates(df, active, report)
    if near_duplicates:
        hashes = compute_phashes(df, base)
        hashes = [h if a and ok else "" for h, a, ok in zip(hashes, active, readable, strict=True)]
        _check_near_duplicates(df, hashes, max_distance, report)
    _check_patients(df, active, report)
    return report


def _check_duplicate_paths(df: pd.DataFrame, report: ValidationReport) -> None:
    dup = df["path"].duplicated(keep=False)
    for p, rows in df[dup].groupby("path").groups.items():
        report.add("error", "duplicate-row", f"{p!r} is listed on lines {[_line(df, r) for r in rows]}; keep one "
                   f"row", list(rows))


def _check_rows(df: pd.DataFrame, report: ValidationReport) -> None:
    _check_duplicate_paths(df, report)
    bad_fold = df.index[(df["split"] == "test") & (df["fold"] >= 0)]
    if len(bad_fold):
        report.add("warning", "test-fold", f"{len(bad_fold)} test row(s) carry a fold (e.g. {_row(df, bad_fold[0])}); "
                   f"folds belong to the train split", list(bad_fold))
    if not (df["split"] != "").any():
        report.add("warning", "no-split", "no row has a split yet; run `medgcsam manifest split`")


def _check_labels(df: pd.DataFrame, active, report: ValidationReport, task: str | None,
                  classes: list[str] | None) -> None:
    labels = df.loc[active, "label"]
    keys = labels.str.lower()  # task maps ignore case
    if task is not None:
        t = get_task(task)
        known = {k.lower() for k in t.mapping} | {c.lower() for c in t.classes}
        what, severity = f"task {task!r}", "error"
    elif classes is not None:  # training matches data.classes exactly
        known, keys, what, severity = set(classes), labels, f"classes {classes}", "error"
    else:
        known = {k.lower() for name in list_tasks() for k in [*get_task(name).mapping, *get_task(name).classes]}
        what, severity = "any registered task", "warning"
    if task is None and classes is None and (variants := case_variants(labels)):
        report.add("error", "label-case", f"labels {variants} differ only in case: without a task they train as "
                   f"separate classes; write each class one way, or pass the task that maps them")
    unknown = labels[~keys.isin(known)]
    for label, rows in unknown.groupby(unknown).groups.items():
        report.add(severity, "unknown-label", f"label {label!r} is not known to {what}: "
                   f"{len(rows)} row(s), first {_row(df, rows[0])}; fix the label or map it in a task", list(rows))


def _check_files(df: pd.DataFrame, active, base: Path, report: ValidationReport, decode: bool,
                 check_sha256: bool) -> list[bool]:
    readable = []
    for i, rel in enumerate(df["path"]):
        if not active[i]:
            readable.append(False)
            continue
        file = base / rel
        if not file.is_file():
            report.add("error", "missing-file", f"{_row(df, i)}: {file} does not exist; fix the path or --root, "
                       f"or set exclude_reason", [i])
            readable.append(False)
            continue
        if decode:
            try:
                read_image(file)
            except ImageReadError as exc:
                report.add("error", "decode", f"{_row(df, i)}: {exc}", [i])
                readable.append(False)
                continue
        sha = df["sha256"].iloc[i]
        if check_sha256 and sha and file_sha256(file) != sha:
            report.add("error", "sha256-mismatch", f"{_row(df, i)}: file content changed since the manifest was "
                       f"built (sha256 differs); rebuild the manifest or restore the file", [i])
        readable.append(True)
    return readable


def _check_exact_duplicates(df: pd.DataFrame, active, report: ValidationReport) -> None:
    part = df[active & (df["sha256"] != "").to_numpy()]
    for sha, rows in part.groupby("sha256").groups.items():
        if len(rows) < 2:
            continue
        rows = list(rows)
        desc = "; ".join(_row(df, r) for r in rows)
        labels, splits = set(df.loc[rows, "label"]), set(df.loc[rows, "split"])
        if len(labels) > 1:
            report.add("error", "duplicate-conflicting-labels", f"byte-identical images carry different labels "
                       f"{sorted(labels)}: {desc}; keep the right one and set exclude_reason on the others", rows)
        if len(splits) > 1:
            report.add("error", "duplicate-across-splits", f"byte-identical images sit in splits {sorted(splits)}: "
                       f"{desc}; re-run `manifest split` (it groups duplicates) or exclude copies", rows)
        if len(labels) == 1 and len(splits) == 1:
            report.add("warning", "duplicate", f"byte-identical images (sha256 {sha[:12]}): {desc}", rows)


def _check_near_duplicates(df: pd.DataFrame, hashes: list[str], max_distance: int,
                           report: ValidationReport) -> None:
    n_same = 0
    for i, j, dist in near_duplicate_pairs(hashes, max_distance):
        if df["sha256"].iloc[i] and df["sha256"].iloc[i] == df["sha256"].iloc[j]:
            continue  # already reported as an exact duplicate
        label_conflict = df["label"].iloc[i] != df["label"].iloc[j]
        split_conflict = df["split"].iloc[i] != df["split"].iloc[j]
        if not (label_conflict or split_conflict):
            n_same += 1
            continue
        what = " and ".join(w for w, c in (("different labels", label_conflict),
                                             ("different splits", split_conflict)) if c)
        report.add("error", "near-duplicate", f"near-duplicate images (phash distance {dist}) with {what}: "
                   f"{_row(df, i)}; {_row(df, j)}; check them, exclude one or re-run `manifest split`", [i, j])
    if n_same:
        report.add("warning", "near-duplicate", f"{n_same} near-duplicate pair(s) within one split and label "
                   f"(harmless for leakage, but they inflate the effective sample size)")


def _check_patients(df: pd.DataFrame, active, report: ValidationReport) -> None:
    part = df[active & (df["patient_id"] != "").to_numpy() & (df["split"] != "").to_numpy()]
    for pid, rows in part.groupby("patient_id").groups.items():
        splits = sorted(set(df.loc[rows, "split"]))
        if len(splits) > 1:
            report.add("error", "patient-across-splits", f"patient {pid!r} has images in splits {splits} "
                       f"(lines {[_line(df, r) for r in list(rows)[:10]]}); re-run `manifest split`", list(rows))
