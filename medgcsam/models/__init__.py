"""timm backbones by name, with local-only pretrained weights."""

from medgcsam.models.factory import create_model, input_spec

__all__ = ["create_model", "input_spec"]
