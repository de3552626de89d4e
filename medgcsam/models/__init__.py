"""timm backbones by name, with local-only pretrained weights."""

from medgcsam.models.factory import create_model, input_spec
from medgcsam.models.spec import ModelSpec, Preprocessing, Threshold

__all__ = ["ModelSpec", "Preprocessing", "Threshold", "create_model", "input_spec"]
