"""Batch prediction over a folder of PNG/JPEG/DICOM files, unattended, one CSV row per readable image.

Files are read and preprocessed in DataLoader workers while the model runs; a file that cannot be
read becomes a row in ``<output stem>.errors.csv`` instead of an exception, so one corrupt study
never stops a job of thousands. Rows are streamed to ``<output>.partial`` after every batch, which
is what ``resume`` picks up after a crash; the final CSV is written once, atomically, sorted by path.
Only relative paths, labels and probabilities are written: no DICOM header field reaches an output.
One job at a time writes an output (``<output>.lock``); ``resume`` keeps only rows exactly as this model
writes them, so a row cut short by a kill is predicted again.

One answer per image: ``decision`` follows the model's frozen operating point (see
:func:`medgcsam.models.spec.decide`; the argmax when it has none) and ``argmax_label`` is kept only as an
auxiliary column. With OOD statistics stored with the model, ``ood_score`` (Mahalanobis distance of the
image's features to the training data) and ``ood_flag`` (above the threshold set on validation at a 5%
false-alarm rate) say when an image is unlike anything the model was trained on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
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
from medgcsam.data.io import IMAGE_SUFFIXES, failure_reason, find_images, read_image
from medgcsam.data.transforms import deterministic_transforms
from medgcsam.files import exclusive_lock, pause_point, remove_stale_temps, replace_atomically
from medgcsam.models.ood import OODStats, logits_and_features
from medgcsam.models.spec import ModelSpec, decide

EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_CRASHED = 0, 1, 2, 3
ERROR_COLUMNS = ["path", "reason"]
_MANIFEST_ADVICE = re.compile(r"set its exclude_reason( in the manifest)?")
_PROBABILITY = re.compile(r"[01]\.\d{6}")  # exactly as written below: a value cut short does not match
_OOD_SCORE = re.compile(r"\d+\.\d{4}")

log = logging.getLogger(__name__)


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
    damaged: int = 0  # rows of an earlier run that were cut short or unreadable, so predicted again

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


def lock_path(output: str | Path) -> Path:
    """``predictions.csv`` -> ``predictions.csv.lock``: held by the one job writing that output."""
    output = Path(output)
    return output.with_name(f"{output.name}.lock")


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


def output_columns(spec: ModelSpec, ood: OODStats | None = None) -> list[str]:
    """path, decision, argmax_label, prob_<class>..., threshold_<pos> with an operating point, ood_score/ood_flag
    with OOD statistics."""
    cols = ["path", "decision", "argmax_label", *(f"prob_{c}" for c in spec.class_names)]
    if spec.threshold is not None:
        cols.append(f"threshold_{spec.threshold.positive_class}")
    if ood is not None:
        cols += ["ood_score", "ood_flag"]
    return cols


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
        except Exception as exc:  # noqa: BLE001 - any per-file failure must become an error row, not stop the job
            return None, failure_reason(exc)


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
        """Folders above the input (often named after a patient or study) stay out of the errors file; the
        readers' advice for a manifest row becomes advice for a folder, which is what predict reads."""
        reason = _MANIFEST_ADVICE.sub("move it out of the input folder", reason)
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
    ood: OODStats | None = None,
) -> PredictionSummary:
    """Predict every image under ``input_dir`` into ``output`` (CSV) and ``<stem>.errors.csv``.

    ``model`` is moved to ``device`` in eval mode. With ``resume`` the paths already in ``output`` or in
    its ``.partial`` file (left by an interrupted run) are kept and not predicted again; files that
    failed before are retried. ``ood`` (stored with the model) adds the OOD columns.
    """
    start = time.perf_counter()
    input_dir, output = Path(input_dir), Path(output)
    if not input_dir.is_dir():
        raise PredictionError(f"input folder {input_dir} does not exist or is not a folder")
    if output.is_dir():
        raise PredictionError(f"--output {output} is a folder; give a CSV file name such as {output}/predictions.csv")
    if amp not in ("none", "bf16"):
        raise PredictionError(f"amp {amp!r} not supported for prediction; use 'none' or 'bf16'")
    columns = output_columns(spec, ood)
    try:
        spec.operating_point()  # a broken threshold is refused before any file is touched
    except ValueError as exc:
        raise PredictionError(str(exc)) from None
    paths, ignored = find_images(input_dir)
    if not paths:
        raise PredictionError(f"no PNG, JPEG or DICOM files under {input_dir}; "
                              f"suffixes searched: {', '.join(sorted(IMAGE_SUFFIXES))}")
    card = model_card(model, spec)
    partial = partial_path(output)
    with contextlib.ExitStack() as held:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            # a second job on this output would truncate the first one's .partial under it
            held.enter_context(exclusive_lock(lock_path(output), f"--output {output}",
                                            "wait for it to finish, or write to another --output",
                                            error=PredictionError))
        except OSError as exc:
            raise PredictionError(f"cannot write beside --output {output} ({exc.strerror or exc}); give a path in a "
                                  f"folder this user can write to") from None
        remove_stale_temps(output, partial, errors_path(output), model_path(output))  # ours: we hold the lock
        # rows of files that are gone since the earlier run are dropped with them
        done, damaged = (_previous_rows(output, spec, ood, card, {display_path(p) for p in paths}) if resume
                         else ({}, 0))
        todo = [p for p in paths if display_path(p) not in done]
        _write_text(model_path(output), json.dumps(card, indent=2))
        _write_csv(partial, columns, done.values())  # a crash from here on still keeps every earlier row
        predicted, failures = _predict_files(model, spec, ood, input_dir, todo, partial, done,
                                             batch_size=batch_size, num_workers=num_workers, device=device, amp=amp,
                                             progress=progress)
        _write_csv(output, columns, (done[p] for p in sorted(done)))
        _write_csv(errors_path(output), ERROR_COLUMNS, sorted(failures))
        partial.unlink()
    return PredictionSummary(output=output, errors=errors_path(output), found=len(paths),
                             skipped=len(paths) - len(todo), predicted=predicted, failed=len(failures),
                             seconds=time.perf_counter() - start, ignored=tuple(map(display_path, ignored)),
                             damaged=damaged)


def _predict_files(model: nn.Module, spec: ModelSpec, ood: OODStats | None, input_dir: Path, todo: list[str],
                   partial: Path, done: dict[str, list[str]], *, batch_size: int, num_workers: int,
                   device: str | torch.device, amp: str, progress: bool) -> tuple[int, list[tuple[str, str]]]:
    """Predict ``todo``, appending each batch's rows to ``partial`` (and to ``done``); (predicted, failures)."""
    operating_point = spec.operating_point()
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageFolder(input_dir, todo, spec), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_with_failures, pin_memory=device.type == "cuda")
    classes, thr, inputs = spec.class_names, spec.threshold, BatchInputs(spec.preprocessing, device)
    if ood is not None:
        ood = OODStats(ood.means.to(device), ood.precision.to(device), ood.threshold, ood.false_alarm,
                       ood.n_train, ood.shrinkage)

    failures: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), unit="img", disable=not progress or not todo, desc="predict")
    predicted = 0
    with partial.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for batch_paths, images, batch_failures in loader:
            failures += batch_failures
            if images is not None:
                probs, scores = forward_outputs(model, inputs(images), device, amp, ood)
                decisions = decide(probs.numpy(), operating_point).tolist()
                argmax = probs.argmax(dim=1).tolist()
                for i, (rel, p) in enumerate(zip(batch_paths, probs.tolist(), strict=True)):
                    rel = display_path(rel)
                    row = [rel, classes[decisions[i]], classes[argmax[i]], *(f"{v:.6f}" for v in p)]
                    if thr is not None:
                        row.append(f"{thr.value:.6f}")
                    if scores is not None:
                        row += [f"{scores[i]:.4f}", str(bool(scores[i] > ood.threshold))]
                    writer.writerow(row)
                    done[rel] = row
                fh.flush()
                predicted += len(batch_paths)
                pause_point("predict batch written")
            bar.update(len(batch_paths) + len(batch_failures))
    bar.close()
    return predicted, failures


def forward_outputs(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str,
                    ood: OODStats | None = None) -> tuple[torch.Tensor, list[float] | None]:
    """Class probabilities on the host and, with ``ood``, each image's OOD distance (from the same forward pass);
    the one forward path of ``predict`` and of its benchmark's limit."""
    logits, scores = forward_logits(model, images, device, amp, ood)
    return logits.softmax(dim=1).cpu(), None if scores is None else scores.cpu().tolist()


def forward_logits(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str,
                   ood: OODStats | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits on ``device`` (the served model needs them for temperature-scaled probabilities) and, with
    ``ood``, the images' OOD distances computed in float32 outside bf16 autocast."""
    if device.type == "cuda":
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    scores = None
    with torch.inference_mode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits, features = (model(images), None) if ood is None else logits_and_features(model, images)
        if ood is not None:
            scores = ood.scores(features)
    return logits.float(), scores


def _previous_rows(output: Path, spec: ModelSpec, ood: OODStats | None, card: dict[str, object],
                   present: set[str]) -> tuple[dict[str, list[str]], int]:
    """Rows of an earlier (complete or interrupted) run of the same model, keyed by path, and how many rows were
    dropped as damaged (cut short by a kill, or not what this model writes), so that those files are predicted
    again instead of carrying a cut value into the final CSV."""
    columns = output_columns(spec, ood)
    sources = [source for source in (output, partial_path(output)) if source.is_file()]
    if not sources:
        return {}, 0
    try:
        earlier = json.loads(model_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("fingerprint") != card["fingerprint"]:
        what = "another model" if isinstance(earlier, dict) else f"an unknown model ({model_path(output)} is missing)"
        raise PredictionError(f"{sources[0]} was written by {what}; --resume only continues the same model's run, "
                              f"so write to a new --output")
    rows: dict[str, list[str]] = {}
    damaged = 0
    for source in sources:
        text = source.read_bytes().decode("utf-8", "replace")
        if not text.endswith("\n"):  # the last row was being written when the job was killed
            text, damaged = text[: text.rfind("\n") + 1], damaged + 1
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            continue
        if header != columns:
            raise PredictionError(f"{source}: columns {header} do not match this model's {columns}; "
                                  f"it was written by another model, so write to a new --output instead of "
                                  f"--resume")
        try:
            for row in reader:
                if _valid_row(row, spec, ood, present):
                    rows[row[0]] = row
                elif not row or row[0] in present or len(row) != len(columns):  # else: the file is gone since
                    damaged += 1
        except csv.Error:  # an unterminated quoted path: the rest of this file is damaged
            damaged += 1
    if damaged:
        log.warning("%d damaged row(s) in %s or its .partial (cut short by an interrupted run) are predicted again",
                    damaged, output)
    return rows, damaged


def _valid_row(row: list[str], spec: ModelSpec, ood: OODStats | None, present: set[str]) -> bool:
    """A row exactly as :func:`predict` writes it for this model, for a file that is still there: every value
    complete, the probabilities a distribution, the decision and argmax the ones they imply (a tie at the threshold
    or the OOD threshold, within the written rounding, may go either way)."""
    classes, thr = spec.class_names, spec.threshold
    if len(row) != len(output_columns(spec, ood)) or row[0] not in present:
        return False
    if row[1] not in classes or row[2] not in classes:
        return False
    texts = row[3:3 + len(classes)]
    if not all(_PROBABILITY.fullmatch(t) for t in texts):
        return False
    probs = [float(t) for t in texts]
    if abs(sum(probs) - 1.0) > 1e-6 * (len(probs) + 1) or probs[classes.index(row[2])] < max(probs):
        return False
    rest = row[3 + len(classes):]
    if thr is not None:
        pos, value = spec.operating_point()
        near = abs(probs[pos] - value) <= 1e-6
        if rest.pop(0) != f"{value:.6f}" or not (near or classes[int(decide([probs], (pos, value))[0])] == row[1]):
            return False
    elif row[1] != row[2]:
        return False
    if ood is not None:
        score, flag = rest
        if not _OOD_SCORE.fullmatch(score) or flag not in ("True", "False"):
            return False
        if abs(float(score) - ood.threshold) > 1e-4 and (flag == "True") != (float(score) > ood.threshold):
            return False
    return True


def _write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda fh: fh.write(text + "\n"))


def _write_csv(path: Path, columns: list[str], rows: Iterable[Sequence[str]]) -> None:
    def write(fh: TextIO) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)

    replace_atomically(path, write)
