"""The registered model as an MLflow pyfunc that answers per image, as a hospital integration asks.

Input: a DataFrame (or JSON ``dataframe_records``/``dataframe_split``) with an ``image`` column of encoded
bytes (PNG, JPEG, DICOM; base64 in JSON, which MLflow decodes for the binary column) or a ``path`` column
of files the serving host can read. Each image goes through ``medgcsam predict``'s own reader and
preprocessing (:class:`~medgcsam.inference.predict.ImageLoader`, ``BatchInputs``, ``forward_logits``), so
the model sees bit-identical inputs. Output: one row per input row, in order (:func:`output_schema`); an
image that cannot be read gets its reason in ``error`` and empty figures, the others are answered.

``params={"input": "tensor"}`` keeps the earlier interface: a ``tensor`` column of normalized float
``(C, S, S)`` arrays in, raw logits ``(N, classes)`` out.

The model is logged as models-from-code (:data:`ENTRY_FILE`), so loading it unpickles nothing.
"""

from __future__ import annotations

import base64
import binascii
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from medgcsam.data.datasets import BatchInputs
from medgcsam.evaluation.calibration import softmax
from medgcsam.inference.predict import ImageLoader, forward_logits
from medgcsam.models.factory import build_classifier, load_state_dict_file
from medgcsam.models.ood import OODStats, load_ood
from medgcsam.models.spec import ModelSpec, decide

ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
IMAGE, PATH, TENSOR, ERROR = "image", "path", "tensor", "error"
BATCH_SIZE = 32  # images per forward pass; a request of any size is answered in chunks of this

def input_schema() -> Schema:
    """Either column may be given per row; ``tensor`` only with ``params={"input": "tensor"}``."""
    return Schema([ColSpec(DataType.binary, IMAGE, required=False), ColSpec(DataType.string, PATH, required=False),
                   ColSpec(Array(Array(Array(DataType.float))), TENSOR, required=False)])


def params_schema() -> ParamSchema:
    return ParamSchema([ParamSpec("input", DataType.string, "image")])


def output_schema(spec: ModelSpec, ood: bool = False) -> Schema:
    """decision, argmax_label, prob_<class>..., calibrated_prob_<class>... (with a temperature), the threshold
    (with an operating point), ood_score/ood_flag (with OOD statistics) and error: the columns of
    ``medgcsam predict`` plus what only a service can say."""
    cols = [ColSpec(DataType.string, name, required=False) for name in ("decision", "argmax_label")]
    cols += [ColSpec(DataType.double, f"prob_{c}", required=False) for c in spec.class_names]
    if spec.temperature is not None:
        cols += [ColSpec(DataType.double, f"calibrated_prob_{c}", required=False) for c in spec.class_names]
    if spec.threshold is not None:
        cols.append(ColSpec(DataType.double, f"threshold_{spec.threshold.positive_class}", required=False))
    if ood:
        cols += [ColSpec(DataType.double, "ood_score", required=False),
                 ColSpec(DataType.boolean, "ood_flag", required=False)]
    return Schema([*cols, ColSpec(DataType.string, ERROR, required=False)])


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rebuilds the classifier from the logged state dict and spec (weights-only) and answers per image."""

    def load_context(self, context) -> None:
        self.spec = ModelSpec.model_validate_json(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state = load_state_dict_file(Path(context.artifacts["state_dict"]))
        self.model = build_classifier(self.spec, state, source="served model").to(self.device)
        if self.device.type == "cuda":  # as `medgcsam predict` runs it, so GPU answers match its kernels too
            self.model = self.model.to(memory_format=torch.channels_last)
        self.operating_point = self.spec.operating_point()  # a damaged threshold is refused at load
        ood_file = context.artifacts.get("ood")
        self.ood: OODStats | None = load_ood(ood_file) if ood_file else None
        self.load = ImageLoader(self.spec)
        self.inputs = BatchInputs(self.spec.preprocessing, self.device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        mode = (params or {}).get("input", "image")
        if mode == TENSOR:
            return self.logits(model_input)
        if mode != "image":
            raise ValueError(f"params input={mode!r}: use 'image' (encoded bytes or paths, the default) or 'tensor'")
        return self.answer(model_input)

    def logits(self, frame: pd.DataFrame) -> np.ndarray:
        """The earlier interface: normalized float tensors in, raw logits out."""
        if TENSOR not in frame.columns:
            raise ValueError("params input='tensor' needs a 'tensor' column of normalized (C, S, S) float arrays")
        batch = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in frame[TENSOR]]))
        return forward_logits(self.model, batch.to(self.device), self.device, "none")[0].cpu().numpy()

    def answer(self, frame: pd.DataFrame) -> pd.DataFrame:
        if IMAGE not in frame.columns and PATH not in frame.columns:
            raise ValueError(f"input needs an '{IMAGE}' column (encoded PNG/JPEG/DICOM bytes, base64 in JSON) or a "
                             f"'{PATH}' column (files on the serving host); got columns {list(frame.columns)}")
        rows: list[dict[str, Any]] = [{} for _ in range(len(frame))]
        tensors: list[tuple[int, torch.Tensor]] = []
        with tempfile.TemporaryDirectory(prefix="medgcsam-serve-") as tmp:
            for i in range(len(frame)):
                try:
                    path, name = _row_file(frame, i, Path(tmp))
                except ValueError as exc:
                    rows[i][ERROR] = str(exc)
                    continue
                tensor, reason = self.load(path)
                if tensor is None:  # the reason names the row, not the temporary file
                    rows[i][ERROR] = reason.replace(str(path), name)
                else:
                    tensors.append((i, tensor))
        for start in range(0, len(tensors), BATCH_SIZE):
            chunk = tensors[start:start + BATCH_SIZE]
            images = self.inputs(torch.stack([t for _, t in chunk]))
            logits, scores = forward_logits(self.model, images, self.device, "none", self.ood)
            columns = self.columns(logits, scores)
            for j, (i, _) in enumerate(chunk):
                rows[i] = {k: v[j] for k, v in columns.items()}
        names = output_schema(self.spec, self.ood is not None).input_names()
        out = pd.DataFrame(rows, columns=names, dtype=object)
        return out.where(out.notna(), None)  # JSON null, not NaN, for what a row does not have

    def columns(self, logits: torch.Tensor, scores: torch.Tensor | None) -> dict[str, list[Any]]:
        """Per-image figures of one batch, computed as ``medgcsam predict`` computes them: one ``decision`` at
        the frozen operating point, the argmax only as ``argmax_label``."""
        spec, probs = self.spec, logits.softmax(dim=1).cpu()
        names = spec.class_names
        out: dict[str, list[Any]] = {"decision": [names[k] for k in decide(probs.numpy(), self.operating_point)],
                                     "argmax_label": [names[k] for k in probs.argmax(dim=1).tolist()]}
        plist = probs.tolist()
        for k, c in enumerate(names):
            out[f"prob_{c}"] = [p[k] for p in plist]
        if spec.temperature is not None:
            calibrated = softmax(logits.cpu().numpy(), spec.temperature)
            for k, c in enumerate(names):
                out[f"calibrated_prob_{c}"] = calibrated[:, k].tolist()
        if spec.threshold is not None:
            out[f"threshold_{spec.threshold.positive_class}"] = [spec.threshold.value] * len(plist)
        if scores is not None:
            out["ood_score"] = scores.cpu().tolist()
            out["ood_flag"] = [bool(v > self.ood.threshold) for v in out["ood_score"]]
        return out


def _row_file(frame: pd.DataFrame, i: int, tmp: Path) -> tuple[Path, str]:
    """The file to read for row ``i`` and how a reason names it. Request bytes are written to ``tmp`` unchanged
    and without a suffix, so the reader tells DICOM from PNG/JPEG by content exactly as for a file on disk."""
    data = frame[IMAGE].iloc[i] if IMAGE in frame.columns else None
    if _given(data):
        file = tmp / str(i)
        file.write_bytes(_bytes(data, i))
        return file, f"row {i} ({IMAGE})"
    path = frame[PATH].iloc[i] if PATH in frame.columns else None
    if _given(path) and str(path):
        return Path(str(path)), str(path)
    raise ValueError(f"row {i}: neither '{IMAGE}' nor '{PATH}' given; send one of them")


def _given(value: Any) -> bool:
    """A cell that holds something (empty bytes do: they are an empty file, and get that reason)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _bytes(value: Any, i: int) -> bytes:
    """Bytes as sent; a string is base64 (the Python API passes strings through without MLflow's JSON decoding)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"row {i}: '{IMAGE}' is text but not base64 ({exc}); send the file's bytes "
                         f"base64-encoded") from None
