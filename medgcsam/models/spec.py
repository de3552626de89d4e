"""The model card that travels with every checkpoint and registered model.

Inference must work on a machine that has none of the training files, so everything needed to
turn an image file into a decision lives here: backbone, classes, preprocessing, threshold.
"""

from __future__ import annotations

from typing import Literal

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
    # fitted on validation with the threshold; the served model reports probabilities scaled by it as well
    temperature: float | None = Field(None, gt=0.0)
    manifest_sha256: str | None = None
    config_sha256: str | None = None
    medgcsam_version: str = medgcsam.__version__
