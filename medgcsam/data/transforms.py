"""MONAI pipelines built from a backbone's input spec and the imaging modality.

Three parts, kept apart because they are used apart:
- deterministic: read, channel handling, aspect-preserving resize + zero pad, optional normalization.
  Without normalization it yields a [0, 1] image that datasets cache as uint8; with it, it is exactly
  what batch inference applies to a single file or ``read_image`` array.
- random: modality-aware augmentation on the [0, 1] image: MONAI per item, albumentations per item, or
  ``batched`` (one resampling call per batch in the worker; what keeps a cached epoch cheap).
- normalize: the backbone's mean/std, always last.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    Randomizable,
    Resize,
    SpatialPad,
)

from medgcsam.data.io import Multiframe, read_image

AUG_BACKENDS = ("monai", "albumentations", "batched")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, what Pillow's "L" uses


class InputSpecLike(Protocol):
    image_size: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]


@dataclass(frozen=True)
class AugmentRecipe:
    """One modality's augmentation, expressed once and built by either backend."""

    hflip: float = 0.0
    rotate_deg: float = 0.0
    rotate_p: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    zoom_p: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    gamma_p: float = 0.0
    translate: float = 0.0  # largest shift per axis, as a fraction of the side
    translate_p: float = 0.0

    @property
    def affine_p(self) -> float:
        """Probability of the one resampling that applies rotation, zoom and shift together."""
        return max(self.rotate_p, self.zoom_p, self.translate_p)


# Ultrasound: the skin line is at the top, so never flip vertically; left/right is arbitrary. Every image is
# scaled down by up to 20% and shifted by up to 10% (the plain recipe of docs/results/recipe/README.md); no
# rotation (its black corners and tilted skin line are not what a probe produces), no zoom-in (it cut lesion
# margins off the field) and no gamma (the scanner's gain curve is part of the appearance).
# X-ray: no flips at all (the heart's side is anatomy, not noise); small rotations and zoom only.
AUGMENT_RECIPES: dict[str, AugmentRecipe] = {
    "ultrasound": AugmentRecipe(hflip=0.5, zoom=(0.8, 1.0), zoom_p=1.0, translate=0.1, translate_p=1.0),
    "xray": AugmentRecipe(rotate_deg=7, rotate_p=0.5, zoom=(0.92, 1.08), zoom_p=0.5, gamma=(0.8, 1.25), gamma_p=0.3),
    "generic": AugmentRecipe(hflip=0.5, rotate_deg=15, rotate_p=0.5, zoom=(0.9, 1.1), zoom_p=0.5,
                             gamma=(0.8, 1.25), gamma_p=0.3),
}


class ReadImaged(MapTransform):
    """A path becomes pixels via ``read_image``; an array or tensor passes through as float32."""

    def __init__(self, keys: Sequence[Hashable] = ("image",), multiframe: Multiframe = "middle") -> None:
        super().__init__(keys)
        self.multiframe = multiframe

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, Path)):
                value = read_image(value, multiframe=self.multiframe)
            d[key] = torch.as_tensor(np.asarray(value, dtype=np.float32) if isinstance(value, np.ndarray) else value,
                                     dtype=torch.float32)
            if d[key].ndim != 3:
                raise ValueError(f"image for key {key!r} must be (C, H, W), got shape {tuple(d[key].shape)}")
        return d


class MatchChannelsd(MapTransform):
    """Grey backbones get BT.601 luminance of RGB input; RGB backbones get grey repeated 3 times."""

    def __init__(self, keys: Sequence[Hashable], channels: int) -> None:
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] == self.channels:
                continue
            if self.channels == 1:
                d[key] = (img * torch.as_tensor(_LUMA, dtype=img.dtype)[:, None, None]).sum(0, keepdim=True)
            else:
                d[key] = img.expand(3, -1, -1).contiguous()
        return d


class ResizePadd(MapTransform):
    """Longest side to ``size`` (area when shrinking, bilinear when enlarging), then centre zero-pad to square,
    so lesion shape is never distorted."""

    def __init__(self, keys: Sequence[Hashable], size: int) -> None:
        super().__init__(keys)
        self.size = size
        self._shrink = Resize(size, size_mode="longest", mode="area")
        self._enlarge = Resize(size, size_mode="longest", mode="bilinear", align_corners=False)
        self._pad = SpatialPad((size, size), mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if max(img.shape[1:]) != self.size:
                img = (self._shrink if max(img.shape[1:]) > self.size else self._enlarge)(img)
            d[key] = self._pad(img).clamp_(0.0, 1.0)
        return d


class AlbumentationsAugmentd(MapTransform, Randomizable):
    """Runs an albumentations recipe on a CHW image, uint8 (straight from the cache: OpenCV's fast path)
    or float in [0, 1]; returns float in [0, 1].

    albumentations is ~10x faster than MONAI's torch resampling on CPU; the dataset's per-batch
    seeding reaches it through ``set_random_state``.
    """

    def __init__(self, keys: Sequence[Hashable], recipe: AugmentRecipe) -> None:
        super().__init__(keys)
        import albumentations as A

        ops = []
        if recipe.hflip:
            ops.append(A.HorizontalFlip(p=recipe.hflip))
        if recipe.affine_p:
            t = recipe.translate
            ops.append(A.Affine(rotate=(-recipe.rotate_deg, recipe.rotate_deg), scale=recipe.zoom,
                                translate_percent={"x": (-t, t), "y": (-t, t)}, border_mode=0, fill=0,
                                p=recipe.affine_p))
        if recipe.gamma_p:
            ops.append(A.RandomGamma(gamma_limit=(recipe.gamma[0] * 100, recipe.gamma[1] * 100), p=recipe.gamma_p))
        self.compose = A.Compose(ops)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.compose.set_random_seed(int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data: Any = None) -> None:
        """Randomness lives inside the albumentations Compose."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            chw = torch.as_tensor(d[key])
            hwc = np.ascontiguousarray(chw.permute(1, 2, 0).numpy())
            out = self.compose(image=hwc)["image"]
            out = torch.from_numpy(np.ascontiguousarray((out[..., None] if out.ndim == 2 else out).transpose(2, 0, 1)))
            d[key] = out.float().div_(255.0) if out.dtype == torch.uint8 else out.clamp_(0.0, 1.0)
        return d


class BatchAugmentd(MapTransform, Randomizable):
    """The recipe applied to a (B, C, H, W) batch (or one (C, H, W) image), uint8 in 0..255 or float in
    [0, 1]: parameters drawn for the whole batch at once, then per selected image a gamma, a flip and one
    rotation+zoom resampling.

    Per-item pipelines spend more on transform machinery, float copies and allocation than on pixels,
    which is what bounds a cached epoch. Here a uint8 batch stays uint8: gamma is a 256-entry lookup,
    the flip a copy, and only the images that are rotated go through float and back. ``inplace=True``
    works on the caller's buffer (the dataset's own scratch), otherwise on a copy. Parameters come
    from ``self.R``, which the dataset reseeds per batch (``set_random_state``), so epochs reproduce
    exactly.
    """

    def __init__(self, keys: Sequence[Hashable], recipe: AugmentRecipe, inplace: bool = False) -> None:
        super().__init__(keys)
        self.recipe, self.inplace = recipe, inplace

    def randomize(self, data: Any = None) -> None:
        """Parameters are drawn per batch in ``__call__`` (their number depends on the batch size)."""

    def _draw(self, n: int) -> dict[str, np.ndarray]:
        r, rng = self.recipe, self.R
        return {
            "flip": rng.random_sample(n) < r.hflip,
            "affine": rng.random_sample(n) < r.affine_p,
            "angle": np.deg2rad(rng.uniform(-r.rotate_deg, r.rotate_deg, n)),
            "zoom": rng.uniform(r.zoom[0], r.zoom[1], n),
            "gamma_on": rng.random_sample(n) < r.gamma_p,
            "gamma": np.exp(rng.uniform(np.log(r.gamma[0]), np.log(r.gamma[1]), n)),
            "shift": rng.uniform(-r.translate, r.translate, (n, 2)),  # drawn last: older recipes keep their draws
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if img.dtype != torch.uint8:
                img = img.to(torch.float32)
            x = img if self.inplace else img.clone()
            batch = x[None] if x.ndim == 3 else x
            p = self._draw(batch.shape[0])
            for i in np.flatnonzero(p["gamma_on"]):
                _gamma_(batch[i], float(p["gamma"][i]))
            for i in np.flatnonzero(p["flip"]):
                batch[i] = batch[i].flip(-1)
            for i in np.flatnonzero(p["affine"]):
                batch[i] = _rotate_zoom(batch[i], float(p["angle"][i]), float(p["zoom"][i]), p["shift"][i])
            d[key] = x
        return d


def _gamma_(img: torch.Tensor, gamma: float) -> None:
    """``img ** gamma`` on [0, 1] in place; on uint8 through a lookup table (10x cheaper than ``pow``)."""
    if img.dtype == torch.uint8:
        lut = np.round((np.arange(256) / 255.0) ** gamma * 255.0).astype(np.uint8)
        arr = img.numpy()
        np.take(lut, arr, out=arr)
    else:
        img.clamp_(0.0, 1.0).pow_(gamma)


def _rotate_zoom(img: torch.Tensor, angle: float, zoom: float, shift: Sequence[float] = (0.0, 0.0)) -> torch.Tensor:
    """Rotate by ``angle`` (radians) and magnify by ``zoom`` about the centre, then move the content by ``shift``
    (x, y; fractions of the side), bilinear, zero outside."""
    c, s = np.cos(angle) / zoom, np.sin(angle) / zoom  # output -> input sampling: the inverse transform
    dx, dy = 2.0 * float(shift[0]), 2.0 * float(shift[1])  # grid units span [-1, 1]: a side is 2
    theta = torch.tensor([[[c, -s, -(c * dx - s * dy)], [s, c, -(s * dx + c * dy)]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    out = F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else out


class UntrackedCompose(Compose):
    """Runs its transforms with MONAI metadata tracking off: plain tensors instead of MetaTensors make the
    random part ~1.6x faster, and nothing downstream needs provenance or inversion."""

    def __call__(self, input_, *args, **kwargs):
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(previous)


def _check_spec(spec: InputSpecLike) -> None:
    if spec.channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {spec.channels}")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise ValueError(f"mean/std need one value per channel ({spec.channels}), got mean={list(spec.mean)} "
                         f"std={list(spec.std)}; derive them with medgcsam.models.factory.input_spec")


class NormalizeChannelsd(MapTransform):
    """``(x - mean) / std`` per channel with precomputed tensors: the one step every cached item pays for,
    so it is a single broadcast op rather than MONAI's per-channel loop (8x faster at 224 px)."""

    def __init__(self, keys: Sequence[Hashable], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(keys)
        self.mean = torch.tensor(list(mean), dtype=torch.float32)[:, None, None]
        self.inv_std = 1.0 / torch.tensor(list(std), dtype=torch.float32)[:, None, None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (torch.as_tensor(d[key], dtype=torch.float32) - self.mean) * self.inv_std
        return d

    def affine(self, scale: float = 1.0, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` with ``(x * scale - mean) / std == bias + x * weight``: one ``addcmul``, and
        ``x`` may stay uint8 with ``scale=1/255``."""
        return (self.inv_std * scale).to(device), (-self.mean * self.inv_std).to(device)

    def into(self, x: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``out = (x * scale - mean) / std`` in one pass."""
        weight, bias = self.affine(scale)
        return torch.addcmul(bias, x, weight, out=out)


def normalize_transform(spec: InputSpecLike, keys: Sequence[Hashable] = ("image",)) -> Compose:
    """Backbone mean/std per channel; the last step of every pipeline."""
    _check_spec(spec)
    return Compose([NormalizeChannelsd(keys, spec.mean, spec.std)])


def deterministic_transforms(spec: InputSpecLike, modality: str = "generic", *, normalize: bool = True,
                             multiframe: Multiframe = "middle", keys: Sequence[Hashable] = ("image",)) -> Compose:
    """Path or ``(C, H, W)`` array -> ``(spec.channels, S, S)`` tensor; normalized unless ``normalize=False``.

    ``modality`` is accepted for symmetry with the random part; preprocessing is the same for all
    modalities so that a model sees at inference exactly what it saw in training.
    """
    _check_spec(spec)
    if modality not in AUGMENT_RECIPES:
        raise ValueError(f"unknown modality {modality!r}; use one of {sorted(AUGMENT_RECIPES)}")
    steps: list[Callable] = [
        ReadImaged(keys, multiframe=multiframe),
        MatchChannelsd(keys, spec.channels),
        ResizePadd(keys, spec.image_size),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    if normalize:
        steps.append(normalize_transform(spec, keys))
    return UntrackedCompose(steps)


def random_transforms(spec: InputSpecLike, modality: str = "generic", backend: str = "monai",
                      keys: Sequence[Hashable] = ("image",), inplace: bool = False,
                      recipe: AugmentRecipe | None = None) -> Compose:
    """Augmentation on the [0, 1] image, before normalization: ``recipe``, else the modality's in ``AUGMENT_RECIPES``.

    ``inplace`` (``batched`` only) lets a caller that owns the buffer skip the defensive copy."""
    if modality not in AUGMENT_RECIPES:
        raise ValueError(f"unknown modality {modality!r}; use one of {sorted(AUGMENT_RECIPES)}")
    recipe = recipe or AUGMENT_RECIPES[modality]
    if backend == "albumentations":
        return Compose([AlbumentationsAugmentd(keys, recipe)])
    if backend == "batched":
        return Compose([BatchAugmentd(keys, recipe, inplace=inplace)])
    if backend != "monai":
        raise ValueError(f"unknown augmentation backend {backend!r}; use one of {AUG_BACKENDS}")
    steps: list[Callable] = []
    if recipe.hflip:
        steps.append(RandFlipd(keys, prob=recipe.hflip, spatial_axis=1))  # axis 1 of (H, W) = left/right
    if recipe.affine_p:
        # One resampling for rotation, zoom and shift together (as the albumentations recipe does).
        shift = recipe.translate * spec.image_size
        steps.append(RandAffined(keys, prob=recipe.affine_p,
                                 rotate_range=float(np.deg2rad(recipe.rotate_deg)),
                                 # MONAI scales the sampling grid (1.25 shows the content at 1/1.25): 1/zoom
                                 scale_range=[(1.0 / recipe.zoom[1] - 1.0, 1.0 / recipe.zoom[0] - 1.0)] * 2,
                                 translate_range=(shift, shift),
                                 padding_mode="zeros", mode="bilinear",
                                 spatial_size=(spec.image_size, spec.image_size), cache_grid=True))
    if recipe.gamma_p:
        steps.append(RandAdjustContrastd(keys, prob=recipe.gamma_p, gamma=recipe.gamma))
    steps.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    return UntrackedCompose(steps)


def build_transforms(spec: InputSpecLike, *, modality: str = "generic", train: bool,
                     backend: str = "monai", multiframe: Multiframe = "middle") -> Compose:
    """Whole item pipeline: deterministic, then (training only) random, then normalization."""
    steps = [deterministic_transforms(spec, modality, normalize=False, multiframe=multiframe)]
    if train:
        steps.append(random_transforms(spec, modality, backend))
    steps.append(normalize_transform(spec))
    return Compose(steps)


def transform_config(spec: InputSpecLike, modality: str, multiframe: str) -> dict[str, Any]:
    """What determines the deterministic output; hashed to key the disk cache."""
    return {"image_size": int(spec.image_size), "channels": int(spec.channels), "modality": modality,
            "multiframe": multiframe, "resize": "longest-area/bilinear+zero-pad", "reader": "medgcsam.io.v2"}
