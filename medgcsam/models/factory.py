"""One factory for classifiers: a timm backbone by name, sized for the task, weights from disk only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from medgcsam.models.spec import ModelSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Short names used in pipelines; any other timm name passes through unchanged.
ALIASES = {
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
}


@dataclass(frozen=True)
class InputSpec:
    """What preprocessing a backbone expects; it travels with every logged model."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}


def timm_name(name: str) -> str:
    """The timm model ``name`` (or its short alias) stands for; ValueError naming some valid ones if none."""
    resolved = ALIASES.get(name, name)
    if not timm.is_model(resolved):
        raise ValueError(f"unknown backbone {name!r}; use a timm model name such as resnet18, resnet50, "
                         f"vgg16_bn, vit_small_patch16_224, swin_tiny_patch4_window7_224, densenet121")
    return resolved


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    pretrained_path: str | Path | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build ``name`` from timm with ``pretrained=False``; load ``pretrained_path`` (safetensors or
    a weights-only torch file) when given, adapting the stem to ``in_chans`` and resetting the head."""
    resolved = timm_name(name)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if image_size is not None and _takes_img_size(resolved):
        kwargs["img_size"] = image_size
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {path} does not exist (model.pretrained_path)")
        check_weights_file(path)
        # timm adapts the first conv to in_chans and drops a mismatched classifier for us.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve()), "num_classes": 0}
        try:
            return timm.create_model(resolved, pretrained=True, **kwargs)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PretrainedWeightsError(f"{path} (model.pretrained_path): its weights do not fit backbone "
                                         f"{resolved} ({first[:300]}); give weights of that architecture") from None
    return timm.create_model(resolved, pretrained=False, **kwargs)


class PretrainedWeightsError(ValueError):
    """A ``model.pretrained_path`` that is not a tensor file of weights for the backbone; names the file and why."""


def check_weights_file(path: Path) -> None:
    """Refuse, before timm reads it, a file that is not a plain tensor file: a pickle that would run code (refused
    by ``weights_only``), a damaged safetensors file, or a file holding no state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = load_state_dict_file(path)
    except Exception as exc:  # unpickling and safetensors raise many types; all mean "not a tensor file"
        raise PretrainedWeightsError(
            f"{path} (model.pretrained_path): not a weights-only tensor file ({type(exc).__name__} when read with "
            f"torch.load(weights_only=True) or safetensors): it may hold pickled code, which is never run here, or "
            f"be damaged. Give a .safetensors file or a state dict saved with torch.save(model.state_dict())"
        ) from None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in _tensors(state)):
        raise PretrainedWeightsError(f"{path} (model.pretrained_path): holds no state dict of tensors; give a "
                                     f".safetensors file or a state dict saved with torch.save(model.state_dict())")


def _tensors(state: dict) -> list:
    """Values of a state dict, or of the one it wraps (timm reads ``state_dict``/``model`` keys too)."""
    inner = next((state[k] for k in ("state_dict", "model", "state_dict_ema", "model_ema")
                  if isinstance(state.get(k), dict)), state)
    return list(inner.values())


def _takes_img_size(name: str) -> bool:
    """Transformers fix their patch grid at build time, so they need the input size up front."""
    return name.startswith(("vit_", "swin_", "deit_", "test_vit"))


def input_spec(model: nn.Module, image_size: int | None = None, channels: int | None = None) -> InputSpec:
    """Size and normalization from the backbone's data config; grey inputs get the channel mean."""
    cfg = timm.data.resolve_data_config({}, model=model)
    chans = channels if channels is not None else cfg["input_size"][0]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if chans == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    size = image_size if image_size is not None else int(cfg["input_size"][-1])
    return InputSpec(image_size=size, channels=chans, mean=mean, std=std)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights-only load: a checkpoint from elsewhere can never run code here."""
    return torch.load(path, map_location="cpu", weights_only=True)


class ModelLoadError(RuntimeError):
    """A model reference that cannot be turned into a classifier; the message says which and why."""


def build_classifier(spec: ModelSpec, state_dict: dict[str, torch.Tensor], *, source: str = "") -> nn.Module:
    """The timm model the spec describes, with ``state_dict`` loaded strictly, in eval mode."""
    try:
        model = create_model(spec.backbone, spec.num_classes, in_chans=spec.in_chans,
                             image_size=spec.preprocessing.image_size)
    except ValueError as exc:  # e.g. a backbone this timm version does not have
        raise ModelLoadError(f"{source}: {exc}") from exc
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: weights do not fit backbone {spec.backbone!r} with "
                             f"{spec.num_classes} classes: {exc}") from exc
    return model.eval()
