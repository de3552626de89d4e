"""The model card that travels with every checkpoint and registered model.

Inference must work on a machine that has none of the training files, so everything needed to
turn an image file into a decision lives here: backbone, classes, preprocessing, threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import medgcsam


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    modality: Literal["ultrasound", "xray", "generic"] = "generic"
    dicom_multiframe: Literal["first", "middle", "error"] = "middle"


class Threshold(BaseModel):
    """Operating point chosen on validation and frozen: ``p(positive_class) >= value`` means positive."""

    model_config = ConfigDict(extra="forbid")

    positive_class: str
    value: float = Field(ge=0.0, le=1.0)
    rule: str


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str
    num_classes: int
    in_chans: Literal[1, 3]
    class_names: list[str]
    preprocessing: Preprocessing
    threshold: Threshold | None = None
    temperature: float | None = Field(None, gt=0.0, description="Fitted on validation with the threshold; frozen")
    manifest_sha256: str | None = None
    config_sha256: str | None = None
    medgcsam_version: str = medgcsam.__version__

    def operating_point(self) -> tuple[int, float] | None:
        """``(positive class index, threshold)`` of the frozen operating point, for :func:`decide`."""
        if self.threshold is None:
            return None
        if self.threshold.positive_class not in self.class_names:
            raise ValueError(f"the model's threshold names class {self.threshold.positive_class!r}, not one of "
                             f"{self.class_names}; re-export the model with a valid threshold")
        return self.class_names.index(self.threshold.positive_class), self.threshold.value


def decide(probs: np.ndarray, operating_point: tuple[int, float] | None) -> np.ndarray:
    """One decision per image (class indices): the operating point's answer, so every output agrees with it.

    Without an operating point: the argmax. With one, ``(positive index, threshold)``: the positive class when
    ``p(positive) >= threshold``; otherwise, binary, the other class, and multi-class, the most probable of the
    other classes (the operating point decides "positive or not"; the argmax alone never makes an image positive).
    """
    probs = np.asarray(probs)
    if operating_point is None:
        return probs.argmax(axis=1)
    pos, value = operating_point
    others = probs.astype(np.float64, copy=True)
    others[:, pos] = -np.inf
    return np.where(probs[:, pos] >= value, pos, others.argmax(axis=1))
