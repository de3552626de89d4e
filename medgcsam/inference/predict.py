"""Batch prediction over a folder of PNG/JPEG/DICOM files, unattended, one CSV row per readable image.

Files are read and preprocessed in DataLoader workers while the model runs; a file that cannot be
read becomes a row in ``<output stem>.errors.csv`` instead of an exception, so one corrupt study
never stops a job of thousands. Rows are streamed to ``<output>.partial`` after every batch, which
is what ``resume`` picks up after a crash; the final CSV is written once, atomically, sorted by path.
Only relative paths, labels and probabilities are written: no DICOM header field reaches an output.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medgcsam.data.io import IMAGE_SUFFIXES, ImageReadError, is_dicom, read_image
from medgcsam.data.transforms import deterministic_transforms
from medgcsam.models.spec import ModelSpec

EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_CRASHED = 0, 1, 2, 3
ERROR_COLUMNS = ["path", "reason"]


class PredictionError(ValueError):
    """A prediction job that cannot start (bad folder, output from another model); exit code 2."""


@dataclass(frozen=True)
class PredictionSummary:
    """What a job did; ``exit_code`` is 0 when every file was predicted, 1 when some failed."""

    output: Path
    errors: Path
    found: int
    skipped: int
    predicted: int
    failed: int
    seconds: float

    @property
    def exit_code(self) -> int:
        return EXIT_FILES_FAILED if self.failed else EXIT_OK

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def errors_path(output: str | Path) -> Path:
    """``predictions.csv`` -> ``predictions.errors.csv`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.errors.csv")


def partial_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.partial")


def output_columns(spec: ModelSpec) -> list[str]:
    """path, label, prob_<class>..., and threshold_<pos>/decision_<pos> when the model has an operating point."""
    cols = ["path", "label", *(f"prob_{c}" for c in spec.class_names)]
    if spec.threshold is not None:
        cols += [f"threshold_{spec.threshold.positive_class}", f"decision_{spec.threshold.positive_class}"]
    return cols


def find_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of image files under ``root``, recursively, sorted.

    A file counts by image suffix or, whatever its name, by the DICOM ``DICM`` marker: PACS exports
    are often named ``IM000123`` or by UID with a numeric "suffix". Hidden files and folders are skipped.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(path):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom(path)
    except OSError:  # unreadable here; an image suffix would have listed it, so it is not ours to report
        return False


class ImageFolder(Dataset):
    """Reads and preprocesses one file in a worker; a failure is returned as a reason, never raised.

    Preprocessing is the training pipeline's deterministic part, built from the spec the model carries.
    """

    def __init__(self, root: Path, paths: Sequence[str], spec: ModelSpec):
        pre = spec.preprocessing
        self.root, self.paths, self.multiframe = root, list(paths), pre.dicom_multiframe
        self.transform = deterministic_transforms(pre, pre.modality, multiframe=pre.dicom_multiframe)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        rel = self.paths[index]
        try:
            image = read_image(self.root / rel, multiframe=self.multiframe)
            tensor = self.transform({"image": image})["image"]
        except ImageReadError as exc:
            return rel, None, self._relative(str(exc), rel)
        except Exception as exc:  # noqa: BLE001 - any per-file failure must become an error row, not stop the job
            while exc.__cause__ is not None:  # MONAI wraps the real error in "applying transform ..."
                exc = exc.__cause__
            return rel, None, self._relative(f"preprocessing failed ({type(exc).__name__}: {exc})", rel)
        return rel, tensor, None

    def _relative(self, reason: str, rel: str) -> str:
        """Folders above the input (often named after a patient or study) stay out of the errors file."""
        return reason.replace(str(self.root / rel), rel).replace(str(self.root), ".")


def collate_with_failures(items: Iterable[tuple[str, torch.Tensor | None, str | None]]):
    """Stack the images that were read; hand back the failures separately as (path, reason)."""
    good = [(p, x) for p, x, _ in items if x is not None]
    failures = [(p, reason) for p, x, reason in items if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [p for p, _ in good], batch, failures


def predict(
    model: nn.Module,
    spec: ModelSpec,
    input_dir: str | Path,
    output: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    amp: str = "none",
    resume: bool = False,
    progress: bool = True,
) -> PredictionSummary:
    """Predict every image under ``input_dir`` into ``output`` (CSV) and ``<stem>.errors.csv``.

    ``model`` is moved to ``device`` in eval mode. With ``resume`` the paths already in ``output`` or in
    its ``.partial`` file (left by an interrupted run) are kept and not predicted again; files that
    failed before are retried.
    """
    start = time.perf_counter()
    input_dir, output = Path(input_dir), Path(output)
    if not input_dir.is_dir():
        raise PredictionError(f"input folder {input_dir} does not exist or is not a folder")
    if output.is_dir():
        raise PredictionError(f"--output {output} is a folder; give a CSV file name such as {output}/predictions.csv")
    if amp not in ("none", "bf16"):
        raise PredictionError(f"amp {amp!r} not supported for prediction; use 'none' or 'bf16'")
    columns = output_columns(spec)
    pos_index = _positive_index(spec)
    paths = find_images(input_dir)
    if not paths:
        raise PredictionError(f"no PNG, JPEG or DICOM files under {input_dir}; "
                              f"suffixes searched: {', '.join(sorted(IMAGE_SUFFIXES))}")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _previous_rows(output, columns) if resume else {}
    todo = [p for p in paths if p not in done]

    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageFolder(input_dir, todo, spec), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_with_failures, pin_memory=device.type == "cuda")
    classes, thr = spec.class_names, spec.threshold

    failures: list[tuple[str, str]] = []
    partial = partial_path(output)
    _write_csv(partial, columns, done.values())  # a crash from here on still keeps every earlier row
    bar = tqdm(total=len(todo), unit="img", disable=not progress or not todo, desc="predict")
    predicted = 0
    with partial.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for batch_paths, images, batch_failures in loader:
            failures += batch_failures
            if images is not None:
                probs = forward_probabilities(model, images, device, amp)
                for rel, label, p in zip(batch_paths, probs.argmax(dim=1).tolist(), probs.tolist(), strict=True):
                    row = [rel, classes[label], *(f"{v:.6f}" for v in p)]
                    if thr is not None:
                        row += [f"{thr.value:.6f}", "positive" if p[pos_index] >= thr.value else "negative"]
                    writer.writerow(row)
                    done[rel] = row
                fh.flush()
                predicted += len(batch_paths)
            bar.update(len(batch_paths) + len(batch_failures))
    bar.close()

    _write_csv(output, columns, (done[p] for p in sorted(done)))
    _write_csv(errors_path(output), ERROR_COLUMNS, sorted(failures))
    partial.unlink()
    return PredictionSummary(output=output, errors=errors_path(output), found=len(paths),
                             skipped=len(paths) - len(todo), predicted=predicted, failed=len(failures),
                             seconds=time.perf_counter() - start)


def forward_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    """Class probabilities on the host; the one forward path of ``predict`` and of its benchmark's limit."""
    if device.type == "cuda":
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(images)
    return logits.float().softmax(dim=1).cpu()


def _positive_index(spec: ModelSpec) -> int:
    if spec.threshold is None:
        return -1
    if spec.threshold.positive_class not in spec.class_names:
        raise PredictionError(f"model threshold names class {spec.threshold.positive_class!r}, "
                              f"not one of {spec.class_names}; re-export the model with a valid threshold")
    return spec.class_names.index(spec.threshold.positive_class)


def _previous_rows(output: Path, columns: list[str]) -> dict[str, list[str]]:
    """Rows of an earlier (complete or interrupted) run of the same model, keyed by path."""
    rows: dict[str, list[str]] = {}
    for source in (output, partial_path(output)):
        if not source.is_file():
            continue
        with source.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                continue
            if header != columns:
                raise PredictionError(f"{source}: columns {header} do not match this model's {columns}; "
                                      f"it was written by another model, so write to a new --output instead of "
                                      f"--resume")
            # A row cut short by a crash mid-write is dropped, so that image is predicted again.
            rows.update((row[0], row) for row in reader if len(row) == len(columns))
    return rows


def _write_csv(path: Path, columns: list[str], rows: Iterable[Sequence[str]]) -> None:
    """Write beside the target and rename over it, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
