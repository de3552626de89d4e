"""`medgcsam manifest ...`: build, merge, split and validate manifests."""

from __future__ import annotations

from pathlib import Path

import typer

from medgcsam.data.arrays import ArrayExportError, export_arrays
from medgcsam.data.builders import BuildError, build_manifest, list_formats
from medgcsam.data.duplicates import DEFAULT_PHASH_DISTANCE
from medgcsam.data.manifest import ManifestError, read_manifest, resolve_root, write_manifest
from medgcsam.data.merge import merge_manifests, rebase_paths
from medgcsam.data.split import split_manifest, split_summary
from medgcsam.data.tasks import apply_task
from medgcsam.data.validate import validate_manifest

manifest_app = typer.Typer(no_args_is_help=True, help="Build, merge, split and validate image manifests.",
                           rich_markup_mode=None, context_settings={"max_content_width": 120})


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@manifest_app.command("build")
def build_command(
    root: Path = typer.Argument(..., help="Folder holding the source as published"),
    fmt: str = typer.Option(..., "--format", "-f", help=f"Source layout: {', '.join(list_formats())}"),
    out: Path = typer.Option(..., "-o", "--out", help="Manifest CSV to write"),
    relative_to_root: bool = typer.Option(False, help="Keep paths relative to ROOT (then load with data.root=ROOT) "
                                                      "instead of relative to the output file's folder"),
    task: str = typer.Option(None, help="Apply a label map right away (bus_binary, covid_binary, ...)"),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip sha256 of every file (duplicate checks need it)"),
) -> None:
    """Build a manifest from a public layout."""
    try:
        result = build_manifest(fmt, root, hash_files=not no_hash)
        df = result.frame if relative_to_root else rebase_paths(result.frame, root, out.resolve().parent)
        if task:
            df = apply_task(df, task)
    except (BuildError, ValueError, KeyError) as exc:
        _fail(exc)
    for note in result.notes:
        typer.echo(note)
    write_manifest(df, out)
    typer.echo(f"wrote {len(df)} rows to {out}")


@manifest_app.command("export-npz")
def export_npz_command(
    npz: Path = typer.Argument(..., help="Arrays <split>_images / <split>_labels (MedMNIST layout)"),
    out: Path = typer.Option(..., "-o", "--out", help="New folder for the PNGs and manifest.csv"),
    classes: str = typer.Option(..., help="Comma-separated class names, in label-index order (0 first)"),
    source: str = typer.Option(None, help="Value of the source column (default: the file's stem)"),
) -> None:
    """Write image arrays (.npz) as PNG files plus a manifest that keeps the published split."""
    try:
        df = export_arrays(npz, out, [c.strip() for c in classes.split(",")], source=source or npz.stem)
    except ArrayExportError as exc:
        _fail(exc)
    typer.echo(df.groupby(["split", "label"]).size().unstack(fill_value=0).to_string())
    typer.echo(f"wrote {len(df)} PNGs and {out / 'manifest.csv'}")


@manifest_app.command("merge")
def merge_command(
    manifests: list[Path] = typer.Argument(..., help="Manifests to pool"),
    out: Path = typer.Option(..., "-o", "--out"),
    task: str = typer.Option(None, help="Label map applied to the pooled rows (bus_binary, bus_3class, ...)"),
    root: list[Path] = typer.Option(None, help="Image root per manifest, in order (default: each manifest's folder)"),
) -> None:
    """Pool several sources into one manifest, mapping labels through a task."""
    try:
        df = merge_manifests(manifests, out.resolve().parent, task=task, roots=root or None)
    except (ManifestError, ValueError, KeyError) as exc:
        _fail(exc)
    write_manifest(df, out)
    counts = df[df["exclude_reason"] == ""].groupby(["source", "label"]).size().unstack(fill_value=0)
    typer.echo(counts.to_string())
    typer.echo(f"wrote {len(df)} rows to {out}")


@manifest_app.command("split")
def split_command(
    manifest: Path = typer.Argument(...),
    out: Path = typer.Option(None, "-o", "--out", help="Output manifest (default: overwrite MANIFEST); paths are "
                             "copied as they are, so keep it beside MANIFEST or load it with the same root"),
    root: Path = typer.Option(None, help="Image root (default: the manifest's folder)"),
    test_size: float = typer.Option(0.2, help="Fraction for the test split (ignored when a frozen test exists)"),
    k: int = typer.Option(5, help="Stratified group folds inside train"),
    seed: int = typer.Option(0),
    near_duplicates: bool = typer.Option(True, help="Group near duplicates (perceptual hash) as well as exact ones"),
    max_distance: int = typer.Option(DEFAULT_PHASH_DISTANCE, help="phash Hamming distance that counts as near"),
) -> None:
    """Stratified, patient- and duplicate-grouped train/test split plus k folds inside train."""
    try:
        df = read_manifest(manifest)
        df = split_manifest(df, resolve_root(manifest, root), test_size=test_size, k=k, seed=seed,
                            near_duplicates=near_duplicates, max_distance=max_distance)
    except (ManifestError, ValueError) as exc:
        _fail(exc)
    target = out or manifest
    write_manifest(df, target)
    typer.echo(split_summary(df))
    typer.echo(f"wrote {target}")


@manifest_app.command("validate")
def validate_command(
    manifest: Path = typer.Argument(...),
    root: Path = typer.Option(None, help="Image root (default: the manifest's folder)"),
    task: str = typer.Option(None, help="Labels must be in this task's map"),
    classes: str = typer.Option(None, help="Comma-separated allowed labels"),
    encoding: str = typer.Option(None, help="CSV encoding when it is not UTF-8 (e.g. cp1252)"),
    decode: bool = typer.Option(True, help="Decode every image (slow on large sets)"),
    near_duplicates: bool = typer.Option(True),
    max_distance: int = typer.Option(DEFAULT_PHASH_DISTANCE),
) -> None:
    """Report missing/broken files, unknown labels, duplicates and leakage; exit 1 on errors."""
    try:
        report = validate_manifest(manifest, root=root, task=task, encoding=encoding, decode=decode,
                                   classes=[c.strip() for c in classes.split(",")] if classes else None,
                                   near_duplicates=near_duplicates, max_distance=max_distance)
    except KeyError as exc:  # an unknown --task
        _fail(exc)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)
