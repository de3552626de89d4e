"""Batch prediction over a folder of PNG/JPEG/DICOM files, unattended, one CSV row per readable image.

Files are read and preprocessed in DataLoader workers while the model runs; a file that cannot be
read becomes a row in ``<output stem>.errors.csv`` instead of an exception, so one corrupt study
never stops a job of thousands. Rows are streamed to ``<output>.partial`` after every batch, which
is what ``resume`` picks up after a crash; the final CSV is written once, atomically, sorted by path.
Only relative paths, labels and probabilities are written: no DICOM header field reaches an output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medgcsam.data.datasets import BatchInputs, to_uint8
from medgcsam.data.io import IMAGE_SUFFIXES, ImageReadError, find_images, read_image
from medgcsam.data.transforms import deterministic_transforms
from medgcsam.files import replace_atomically
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
    ignored: tuple[str, ...] = ()  # files under the input that are not PNG/JPEG/BMP/TIFF/DICOM

    @property
    def exit_code(self) -> int:
        return EXIT_FILES_FAILED if self.failed else EXIT_OK


def errors_path(output: str | Path) -> Path:
    """``predictions.csv`` -> ``predictions.errors.csv`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.errors.csv")


def partial_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.partial")


def model_path(output: str | Path) -> Path:
    """``predictions.csv`` -> ``predictions.model.json``: which model wrote the rows (checked by ``resume``)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.model.json")


def model_card(model: nn.Module, spec: ModelSpec) -> dict[str, object]:
    """Identity of the model behind a predictions file: a SHA-256 over its weights and its spec.

    ``resume`` compares it, so rows from a checkpoint replaced under the same registry alias are never
    mixed with new ones."""
    digest = hashlib.sha256(spec.model_dump_json().encode())
    for tensor in model.state_dict().values():  # values only: a wrapper module renames, it does not change
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"fingerprint": digest.hexdigest(), "backbone": spec.backbone, "classes": spec.class_names,
            "threshold": spec.threshold.model_dump() if spec.threshold is not None else None,
            "medgcsam_version": spec.medgcsam_version}


def display_path(rel: str) -> str:
    """A path as written to the CSVs: UTF-8 always, with undecodable bytes of a file name shown as \\xNN."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def output_columns(spec: ModelSpec) -> list[str]:
    """path, label, prob_<class>..., and threshold_<pos>/decision_<pos> when the model has an operating point."""
    cols = ["path", "label", *(f"prob_{c}" for c in spec.class_names)]
    if spec.threshold is not None:
        cols += [f"threshold_{spec.threshold.positive_class}", f"decision_{spec.threshold.positive_class}"]
    return cols


def positive_decision(spec: ModelSpec, probs: Sequence[float]) -> str:
    """'positive' when p(positive class) reaches the frozen threshold; the model must have one."""
    return "positive" if probs[positive_index(spec)] >= spec.threshold.value else "negative"


class ImageLoader:
    """One file -> the uint8 ``(C, S, S)`` tensor the model's preprocessing makes of it, or the reason it failed.

    The single read path of ``predict`` and of the served model (which writes request bytes to a file first),
    so both hand the network bit-identical inputs.
    """

    def __init__(self, spec: ModelSpec):
        pre = spec.preprocessing
        self.multiframe = pre.dicom_multiframe
        self.transform = deterministic_transforms(pre, pre.modality, normalize=False, multiframe=pre.dicom_multiframe)

    def __call__(self, path: Path) -> tuple[torch.Tensor | None, str | None]:
        try:
            image = read_image(path, multiframe=self.multiframe)
            return to_uint8(self.transform({"image": image})["image"]), None
        except ImageReadError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any per-file failure must become an error row, not stop the job
            while exc.__cause__ is not None:  # MONAI wraps the real error in "applying transform ..."
                exc = exc.__cause__
            return None, f"preprocessing failed ({type(exc).__name__}: {exc})"


class ImageFolder(Dataset):
    """Reads and preprocesses one file in a worker; a failure is returned as a reason, never raised.

    Preprocessing is the training pipeline's deterministic part, built from the spec the model carries,
    ending in uint8 as the training cache does; ``BatchInputs`` normalizes the batch as training does.
    """

    def __init__(self, root: Path, paths: Sequence[str], spec: ModelSpec):
        # absolute, so that removing it from a message cannot hit a word that happens to equal a relative root
        self.root, self.paths = Path(root).absolute(), list(paths)
        self.load = ImageLoader(spec)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        rel = self.paths[index]
        tensor, reason = self.load(self.root / rel)
        return rel, tensor, None if reason is None else self._relative(reason, rel)

    def _relative(self, reason: str, rel: str) -> str:
        """Folders above the input (often named after a patient or study) stay out of the errors file."""
        return reason.replace(str(self.root / rel), display_path(rel)).replace(str(self.root), ".")


def collate_with_failures(items: Iterable[tuple[str, torch.Tensor | None, str | None]]):
    """Stack the images that were read; hand back the failures separately as (path, reason)."""
    good = [(p, x) for p, x, _ in items if x is not None]
    failures = [(display_path(p), reason) for p, x, reason in items if x is None]
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
    positive_index(spec)  # a threshold naming no class of the model stops the job before any file is read
    paths, ignored = find_images(input_dir)
    if not paths:
        raise PredictionError(f"no PNG, JPEG or DICOM files under {input_dir}; "
                              f"suffixes searched: {', '.join(sorted(IMAGE_SUFFIXES))}")
    card = model_card(model, spec)
    # rows of files that are gone since the earlier run are dropped with them
    done = _previous_rows(output, columns, card, {display_path(p) for p in paths}) if resume else {}
    todo = [p for p in paths if display_path(p) not in done]
    partial = partial_path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _write_text(model_path(output), json.dumps(card, indent=2))
        _write_csv(partial, columns, done.values())  # a crash from here on still keeps every earlier row
    except OSError as exc:
        raise PredictionError(f"cannot write beside --output {output} ({exc.strerror or exc}); give a path in a "
                              f"folder this user can write to") from None

    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageFolder(input_dir, todo, spec), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_with_failures, pin_memory=device.type == "cuda")
    classes, thr, inputs = spec.class_names, spec.threshold, BatchInputs(spec.preprocessing, device)

    failures: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), unit="img", disable=not progress or not todo, desc="predict")
    predicted = 0
    with partial.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for batch_paths, images, batch_failures in loader:
            failures += batch_failures
            if images is not None:
                probs = forward_probabilities(model, inputs(images), device, amp)
                for rel, label, p in zip(batch_paths, probs.argmax(dim=1).tolist(), probs.tolist(), strict=True):
                    rel = display_path(rel)
                    row = [rel, classes[label], *(f"{v:.6f}" for v in p)]
                    if thr is not None:
                        row += [f"{thr.value:.6f}", positive_decision(spec, p)]
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
                             seconds=time.perf_counter() - start, ignored=tuple(map(display_path, ignored)))


def forward_probabilities(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    """Class probabilities on the host; the one forward path of ``predict`` and of its benchmark's limit."""
    return forward_logits(model, images, device, amp).softmax(dim=1).cpu()


def forward_logits(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    """float32 logits on ``device``; the served model needs them for temperature-scaled probabilities."""
    if device.type == "cuda":
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(images)
    return logits.float()


def positive_index(spec: ModelSpec) -> int:
    """Column of the threshold's class (-1 without a threshold); a class the model lacks is a usage error."""
    if spec.threshold is None:
        return -1
    if spec.threshold.positive_class not in spec.class_names:
        raise PredictionError(f"model threshold names class {spec.threshold.positive_class!r}, "
                              f"not one of {spec.class_names}; re-export the model with a valid threshold")
    return spec.class_names.index(spec.threshold.positive_class)


def _previous_rows(output: Path, columns: list[str], card: dict[str, object],
                   present: set[str]) -> dict[str, list[str]]:
    """Rows of an earlier (complete or interrupted) run of the same model, keyed by path."""
    sources = [source for source in (output, partial_path(output)) if source.is_file()]
    if not sources:
        return {}
    try:
        earlier = json.loads(model_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("fingerprint") != card["fingerprint"]:
        what = "another model" if isinstance(earlier, dict) else f"an unknown model ({model_path(output)} is missing)"
        raise PredictionError(f"{sources[0]} was written by {what}; --resume only continues the same model's run, "
                              f"so write to a new --output")
    rows: dict[str, list[str]] = {}
    for source in sources:
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
            rows.update((row[0], row) for row in reader if len(row) == len(columns) and row[0] in present)
    return rows


def _write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda fh: fh.write(text + "\n"))


def _write_csv(path: Path, columns: list[str], rows: Iterable[Sequence[str]]) -> None:
    def write(fh: TextIO) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)

    replace_atomically(path, write)
