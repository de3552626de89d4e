"""Training batches from a uint8 cache on the GPU (or in pinned host memory), augmented there, batch-wise.

A graphed ResNet-50 GCSAM step consumes ~1 200 images/s at 224 px; CPU decode and per-item augmentation in
DataLoader workers do not keep up (``../shared/reference/gpu.md`` section 3). So the deterministic part (read,
channels, resize, pad) is cached once as uint8 at training resolution, and each batch is gathered, augmented
with the current recipe of ``BatchAugmentd`` (gamma, horizontal flip, rotation + zoom + shift, in that order,
rounded to uint8 levels after each like the CPU path) and normalised on the device, with no worker in the hot path.

Randomness is counter-based: every draw is a hash of (seed, epoch, sample index, draw number), so a batch is
the same whatever came before it (reruns and mid-epoch resumes reproduce it exactly) and the code is the same
integer arithmetic on CPU and CUDA. The draws follow the same distributions as ``BatchAugmentd`` but not the
same numbers (that one draws from NumPy per batch): switching ``data.device_cache`` changes which augmented
images a run sees, not their distribution. The epoch's order is a permutation seeded by (seed, epoch); the
last partial batch is dropped, as the training loader does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medgcsam.data.datasets import ManifestDataset
from medgcsam.data.transforms import AUGMENT_RECIPES, AugmentRecipe, normalize_transform

log = logging.getLogger(__name__)

DeviceCacheMode = Literal["auto", "on", "off"]
DEVICE_CACHE_MODES = ("auto", "on", "off")
GPU_SHARE = 0.25  # auto: the cache may take this share of the free GPU memory; the rest is for training
_M32 = 0xFFFFFFFF
_DRAWS = 8  # per sample: flip, affine on, angle, zoom, gamma on, gamma, shift x, shift y


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32 without overflowing int64 (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * (c & 0xFFFF)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons): a well-mixed 32-bit integer hash, exact on any device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: int, epoch: int, indices: torch.Tensor, draws: int = _DRAWS) -> torch.Tensor:
    """(len(indices), draws) float32 uniforms in [0, 1), a pure function of (seed, epoch, index, draw)."""
    key = int(_hash32(torch.tensor((seed & _M32) ^ int(_hash32(torch.tensor(epoch & _M32))))))  # host ints
    k = torch.arange(draws, device=indices.device, dtype=torch.int64)
    x = _hash32(indices.to(torch.int64)[:, None] * draws + k + key)
    x = _hash32(x ^ key)
    return (x >> 8).to(torch.float32) * (1.0 / 2**24)


def draw_params(recipe: AugmentRecipe, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """The recipe's per-sample parameters from uniforms (same distributions as ``BatchAugmentd._draw``)."""
    return {
        "flip": u[:, 0] < recipe.hflip,
        "affine": u[:, 1] < recipe.affine_p,
        "angle": torch.deg2rad(-recipe.rotate_deg + u[:, 2] * (2 * recipe.rotate_deg)),
        "zoom": recipe.zoom[0] + u[:, 3] * (recipe.zoom[1] - recipe.zoom[0]),
        "gamma_on": u[:, 4] < recipe.gamma_p,
        "gamma": torch.exp(math.log(recipe.gamma[0]) + u[:, 5] * math.log(recipe.gamma[1] / recipe.gamma[0])),
        "shift": -recipe.translate + u[:, 6:8] * (2 * recipe.translate),  # (x, y), fractions of the side
    }


def augment_batch(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) holding uint8 levels: gamma, flip, rotation + zoom + shift.

    Static shapes and no host sync: every op runs on the whole batch and ``torch.where`` picks per sample,
    so it can sit in front of a captured step."""
    b = x.shape[0]
    f = x.to(torch.float32)
    g = p["gamma"].to(f.dtype).view(b, 1, 1, 1)
    gamma = torch.round(torch.pow(f / 255.0, g) * 255.0)  # = the CPU path's 256-entry lookup table
    f = torch.where(p["gamma_on"].view(b, 1, 1, 1), gamma, f)
    f = torch.where(p["flip"].view(b, 1, 1, 1), f.flip(-1), f)
    c, s = torch.cos(p["angle"]) / p["zoom"], torch.sin(p["angle"]) / p["zoom"]
    dx, dy = 2.0 * p["shift"][:, 0], 2.0 * p["shift"][:, 1]  # grid units span [-1, 1]: a side is 2
    tx, ty = -(c * dx - s * dy), -(s * dx + c * dy)  # as transforms._rotate_zoom: move the content by the shift
    theta = torch.stack([torch.stack([c, -s, tx], 1), torch.stack([s, c, ty], 1)], 1).to(f.dtype)
    grid = F.affine_grid(theta, list(f.shape), align_corners=False)
    warped = F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.round_().clamp_(0, 255)
    return torch.where(p["affine"].view(b, 1, 1, 1), warped, f)


def fits_on_device(nbytes: int, device: torch.device, share: float = GPU_SHARE) -> bool:
    """Does a cache of ``nbytes`` fit in ``share`` of the device's free memory?"""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


class DeviceBatches:
    """Per epoch, ``{"image": normalised float on device, "label": int64 on device, "index"}`` batches.

    ``where="device"``: the uint8 split lives on ``device``; ``"host"``: in (pinned) host memory, and the next
    batch's copy is issued on a side stream while the current one trains."""

    def __init__(self, dataset: ManifestDataset, batch_size: int, device: torch.device | str, *, seed: int,
                 where: Literal["device", "host"] = "device", augment: bool = True) -> None:
        if len(dataset) < batch_size:
            raise ValueError(f"train split has {len(dataset)} images, fewer than data.batch_size={batch_size}; "
                             f"with the last partial batch dropped there would be no step: lower data.batch_size")
        self.device = torch.device(device)
        self.batch_size, self.seed, self.where = batch_size, seed, where
        self.recipe = AUGMENT_RECIPES[dataset.modality] if augment else None
        images = _uint8_split(dataset)
        if where == "device":
            self.images = images.to(self.device)
        else:
            self.images = images.pin_memory() if self.device.type == "cuda" else images
        self.labels = dataset.labels.to(self.device)
        self.weight, self.bias = normalize_transform(dataset.spec).transforms[0].affine(1 / 255, self.device)
        self.copy_stream = torch.cuda.Stream(self.device) if where == "host" and self.device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order (host int64), a function of (seed, epoch) only."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(len(self.labels), generator=g)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start..len(self)-1`` of ``epoch`` (a resume skips the first ``start`` without work)."""
        order = self.order(epoch)
        steps = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(start, len(self))]
        if not steps:
            return
        pending = self._fetch(steps[0])
        for k, idx in enumerate(steps):
            raw, ready = pending
            if k + 1 < len(steps):
                pending = self._fetch(steps[k + 1])  # the next copy overlaps this step
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            yield self._finish(raw, idx, epoch)

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.where == "device":
            return self.images.index_select(0, idx.to(self.device)), None
        host = self.images.index_select(0, idx)
        if self.copy_stream is None:
            return host.to(self.device), None
        host = host.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            raw = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        raw.record_stream(torch.cuda.current_stream(self.device))
        return raw, ready

    def _finish(self, raw: torch.Tensor, idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        dev_idx = idx.to(self.device)
        if self.recipe is not None:
            params = draw_params(self.recipe, uniforms(self.seed, epoch, dev_idx))
            levels = augment_batch(raw, params)
        else:
            levels = raw
        images = torch.addcmul(self.bias, levels, self.weight)  # = BatchInputs on a uint8 batch
        return {"image": images, "label": self.labels.index_select(0, dev_idx), "index": idx}


def _uint8_split(dataset: ManifestDataset) -> torch.Tensor:
    """The whole split's deterministic part as one uint8 (N, C, S, S) tensor (the memory cache when filled)."""
    if dataset._memory is not None:
        return dataset._memory
    return torch.stack([dataset.preprocessed(i) for i in range(len(dataset))])


def build_device_batches(dataset: ManifestDataset, batch_size: int, device: torch.device | str, *, seed: int,
                         mode: DeviceCacheMode) -> DeviceBatches | None:
    """``data.device_cache``: None (use the DataLoader) for off, and for auto off CUDA; the device cache when
    the split fits (auto: in ``GPU_SHARE`` of free memory), else pinned host memory with a prefetching stream."""
    if mode not in DEVICE_CACHE_MODES:
        raise ValueError(f"data.device_cache must be one of {list(DEVICE_CACHE_MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    spec = dataset.spec
    nbytes = len(dataset) * spec.channels * spec.image_size ** 2
    where = "device" if fits_on_device(nbytes, device) else "host"
    if where == "host":
        log.info("data.device_cache=%s: the %.1f GB uint8 train split does not fit in %d%% of free GPU memory; it "
                 "stays in pinned host memory with a prefetching copy stream", mode, nbytes / 1e9, GPU_SHARE * 100)
    return DeviceBatches(dataset, batch_size, device, seed=seed, where=where, augment=dataset.augment is not None)
