"""Which torch device a setting names: one resolution for training, evaluation and prediction."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The named device does not exist or is not visible here; the message names the setting and the fix."""


def resolve_device(name: str, local_rank: int = 0, *, what: str = "train.device") -> torch.device:
    """``auto`` is the local GPU when there is one, else CPU; ``cuda`` under torchrun means ``cuda:LOCAL_RANK``.
    ``what`` names the setting in the error (``train.device``, ``--device``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{what} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} is {name!r} but no CUDA device is visible; set {what} to cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
