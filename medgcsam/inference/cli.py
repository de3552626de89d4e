"""`medgcsam predict`: batch inference from the registry, a run, or a checkpoint file.

Exit codes: 0 every image predicted; 1 some files could not be read (listed in the errors file);
2 usage or model error (nothing predicted); 3 the job crashed part-way (rows so far are kept in
``<output>.partial``; rerun with --resume); 130 interrupted (likewise).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import typer

from medgcsam.devices import DeviceError, resolve_device
from medgcsam.inference.package import MODEL_REFERENCE_HELP, ModelLoadError, load_classifier_with_ood
from medgcsam.inference.predict import EXIT_CRASHED, EXIT_USAGE, PredictionError, partial_path, predict


def _resolve_device(device: str) -> str:
    try:
        return str(resolve_device(device, what="--device"))
    except DeviceError as exc:
        raise PredictionError(str(exc)) from None


def predict_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_REFERENCE_HELP),
    input_dir: Path = typer.Option(..., "--input", "-i", help="Folder searched recursively for PNG/JPEG/DICOM"),
    output: Path = typer.Option(..., "--output", "-o", help="Predictions CSV; errors go to <stem>.errors.csv"),
    batch_size: int = typer.Option(32, min=1),
    num_workers: int = typer.Option(2, min=0, help="DataLoader processes reading and preprocessing files"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    amp: str = typer.Option("none", help="none or bf16 (autocast on the forward pass)"),
    resume: bool = typer.Option(False, "--resume", help="Keep rows already in --output (or its .partial)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Predict every image in a folder. Exit 0: all predicted; 1: some files failed (see the errors file);
    2: usage/model error; 3: crashed part-way (rerun with --resume)."""
    try:
        target = _resolve_device(device)
        net, spec, ood = load_classifier_with_ood(model, device=target)
        summary = predict(net, spec, input_dir, output, batch_size=batch_size, num_workers=num_workers,
                          device=target, amp=amp, resume=resume, progress=progress, ood=ood)
    except (ModelLoadError, PredictionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted; rows so far are in {partial_path(output)}: rerun with --resume", err=True)
        raise typer.Exit(130) from None
    except Exception:  # a crash part-way must not read as exit 1 ("some files failed")
        traceback.print_exc()
        typer.echo(f"prediction crashed; rows so far are in {partial_path(output)}: rerun with --resume", err=True)
        raise typer.Exit(EXIT_CRASHED) from None
    typer.echo(f"{summary.predicted} predicted, {summary.skipped} already done, {summary.failed} failed "
               f"of {summary.found} files in {summary.seconds:.1f}s -> {summary.output}")
    if summary.damaged:
        typer.echo(f"{summary.damaged} row(s) of the earlier run were cut short or damaged and were predicted again",
                   err=True)
    if summary.ignored:
        shown = ", ".join(summary.ignored[:10]) + (", ..." if len(summary.ignored) > 10 else "")
        typer.echo(f"{len(summary.ignored)} other files were not looked at (not PNG/JPEG/BMP/TIFF or DICOM, or "
                   f"broken links): {shown}", err=True)
    if summary.failed:
        typer.echo(f"{summary.failed} files could not be read; reasons in {summary.errors}", err=True)
    raise typer.Exit(summary.exit_code)
