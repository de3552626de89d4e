"""Manifest rows -> torch Datasets and DataLoaders with a cached deterministic part.

The deterministic output (read, channels, resize/pad; values in [0, 1]) is cached as uint8:
- ``memory``: one contiguous (N, C, S, S) uint8 tensor filled once by ``warm_cache`` (parallel, in
  DataLoader workers) before training; a single tensor is shared copy-on-write with forked workers
  instead of being duplicated object by object.
- ``disk``: one ``.npy`` per image under ``cache_dir/<hash of transform config>/``, keyed by the
  file's sha256 (or path, size and mtime, taken when the dataset is built), so a changed config or a
  changed file never reuses a stale entry, and concurrent jobs (DDP ranks, experiment cells) share
  entries safely; read back with ``allow_pickle=False``.
Random augmentation and normalization run after the cache, every epoch. DataLoaders fetch whole
batches (``__getitems__``): the cached uint8 rows are gathered into a reused buffer and augmented
there (``batched`` backend). Items of ``ds[i]`` are normalized float, as a model takes them. The
training loaders of ``build_loaders`` instead carry uint8 batches (``transport="uint8"``), written
straight into shared memory in the worker, and ``BatchInputs`` normalizes them on the device, the
way timm's prefetch loader does: a float32 batch is 4x the bytes, and moving it between processes
cost more than everything else in a cached epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    default_collate,
    get_worker_info,
)

from medgcsam.data.io import ImageReadError, failure_reason
from medgcsam.data.manifest import included, manifest_sha256, read_manifest, resolve_root, root_mismatch
from medgcsam.data.tasks import apply_task, case_variants, get_task
from medgcsam.data.transforms import (
    InputSpecLike,
    deterministic_transforms,
    normalize_transform,
    random_transforms,
    transform_config,
)
from medgcsam.data.validate import leakage_report

CACHE_MODES = ("none", "memory", "disk")
TEMP_SUFFIX = ".npy.tmp"  # a disk-cache entry being written
log = logging.getLogger(__name__)


class LeakageError(ValueError):
    """Splits that share an image or a patient, or an image with two labels; the message lists each finding."""


class UnreadableRowsError(ValueError):
    """Manifest rows whose files cannot become model inputs, all of them, each by manifest line and file."""


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8: what the cache keeps, so what every model is trained and evaluated on;
    ``predict`` quantizes the same way, or its probabilities drift from the validated ones (by up to 0.008
    on a 28 px chest X-ray shown at 64 px)."""
    return img.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor for one batch; in a DataLoader worker it is allocated in shared memory, as
    ``default_collate`` does, so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(int(np.prod(shape)))).view(shape)


def _checked_transport(transport: str) -> str:
    if transport not in ("float", "uint8"):
        raise ValueError(f"transport must be 'float' (normalized) or 'uint8' (normalize with BatchInputs), "
                         f"got {transport!r}")
    return transport


class BatchInputs:
    """Moves a loader's image batch to ``device`` and finishes it there: uint8 batches (the transport
    of ``build_loaders``) are normalized with the backbone's mean/std; float batches already are."""

    def __init__(self, spec: InputSpecLike, device: torch.device | str) -> None:
        self.device = torch.device(device)
        # the same mean/std as the item pipeline, applied in one kernel per batch
        self.weight, self.bias = normalize_transform(spec).transforms[0].affine(1 / 255, self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images
        return torch.addcmul(self.bias, images, self.weight)


class CollatedItems(list):
    """The items of one batch, plus that batch already collated (items are views into it)."""

    def __init__(self, items: list[dict], batch: dict) -> None:
        super().__init__(items)
        self.batch = batch


def collate_items(items: list) -> Any:
    """``default_collate``, except that a batch ``ManifestDataset`` built already is passed on as is."""
    return items.batch if isinstance(items, CollatedItems) else default_collate(items)


class ManifestDataset(Dataset):
    """Items ``{"image": float (C, S, S) normalized, "label": int64, "index": int}`` for the rows of ``frame``.

    ``index`` is the position in ``frame`` so evaluation can join path/patient_id/source back.
    """

    def __init__(self, frame: pd.DataFrame, root: Path, class_names: list[str], spec: InputSpecLike, *,
                 modality: str = "generic", augment: bool = False, backend: str = "monai",
                 cache: str = "none", cache_dir: Path | None = None, multiframe: str = "middle",
                 transport: str = "float") -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.transport = _checked_transport(transport)
        self.frame = frame.reset_index(drop=True)
        self.root = Path(root)
        self.class_names = list(class_names)
        self.spec, self.modality, self.multiframe = spec, modality, multiframe
        self.cache = cache
        self.paths = [str(self.root / p) for p in self.frame["path"]]
        lookup = {c: i for i, c in enumerate(self.class_names)}
        self.labels = torch.tensor([lookup[c] for c in self.frame["label"]], dtype=torch.int64)
        self.deterministic = deterministic_transforms(spec, modality, normalize=False, multiframe=multiframe)
        self.backend = backend
        self.augment = random_transforms(spec, modality, backend, inplace=True) if augment else None
        self.normalize = normalize_transform(spec)
        self._buffers: dict[torch.dtype, torch.Tensor] = {}  # per-process scratch for batch fetches
        self.aug_seed = 0  # with the batch's indices, seeds its augmentation (see ``_batch_seed``)
        self.config_hash = hashlib.sha256(
            json.dumps(transform_config(spec, modality, multiframe), sort_keys=True).encode()).hexdigest()[:16]
        self.cache_dir: Path | None = None
        self._disk_keys: list[str | None] = []  # None: the file is gone (reported when it is read)
        if cache == "disk":
            base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "medgcsam" / "images"
            self.cache_dir = base / self.config_hash
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            (self.cache_dir / "transform_config.json").write_text(
                json.dumps(transform_config(spec, modality, multiframe), indent=1, sort_keys=True))
            self._disk_keys = [self._disk_key(i) for i in range(len(self.frame))]
            _remove_abandoned_temps(self.cache_dir)
        self._memory: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.frame)

    # -- deterministic part -------------------------------------------------------------------------
    def preprocessed(self, index: int) -> torch.Tensor:
        """uint8 (C, S, S) deterministic output of one row, from the cache when there is one."""
        if self._memory is not None:
            return self._memory[index]
        if self.cache_dir is not None:
            return self._from_disk(index)
        return to_uint8(self.deterministic({"image": self.paths[index]})["image"])

    def _disk_key(self, index: int) -> str | None:
        sha = self.frame.at[index, "sha256"] if "sha256" in self.frame else ""
        if sha:
            return sha
        try:
            st = os.stat(self.paths[index])
        except FileNotFoundError:  # gone since the manifest was written
            return None
        key = f"{os.path.abspath(self.paths[index])}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha256(key.encode()).hexdigest()

    def _from_disk(self, index: int) -> torch.Tensor:
        if self._disk_keys[index] is None:
            raise ImageReadError(f"{self.paths[index]}: file does not exist; fix the path in the manifest or "
                                 f"data.root, or set its exclude_reason")
        target = self.cache_dir / f"{self._disk_keys[index]}.npy"
        shape = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if target.is_file():
            try:
                cached = np.load(target, allow_pickle=False)
                if cached.shape == shape and cached.dtype == np.uint8:
                    return torch.from_numpy(cached)
            except (ValueError, OSError):
                pass
            target.unlink(missing_ok=True)  # torn or foreign file: rebuild it below
        img = to_uint8(self.deterministic({"image": self.paths[index]})["image"])
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, img.numpy(), allow_pickle=False)
            os.replace(tmp, target)  # atomic: concurrent workers never read half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return img

    def warm_cache(self, num_workers: int = 0, batch_size: int = 32) -> None:
        """Run the deterministic part over every row once (in parallel workers) and keep the result (memory
        cache) or its files (disk cache). Without a cache the pass only reads, so that every unreadable row is
        reported here, all together and by manifest line, instead of as a traceback in some epoch.
        Raises ``UnreadableRowsError``."""
        if self._memory is not None or len(self) == 0:
            return
        loader = DataLoader(_Preprocessed(self), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                            collate_fn=_collate_preprocessed)
        shape = (len(self), self.spec.channels, self.spec.image_size, self.spec.image_size)
        memory = torch.empty(shape, dtype=torch.uint8) if self.cache == "memory" else None
        failures = []
        for indices, images, batch_failures in loader:
            failures += batch_failures
            if memory is not None and indices:
                memory[torch.as_tensor(indices)] = images
        if failures:
            raise UnreadableRowsError(self._unreadable_message(failures))
        self._memory = memory

    def _unreadable_message(self, failures: list[tuple[int, str]]) -> str:
        lines = self.frame["manifest_line"] if "manifest_line" in self.frame else self.frame.index + 2
        rows = [f"  manifest line {lines[i]} ({self.frame.at[i, 'path']}): {reason}" for i, reason in failures]
        return (f"{len(failures)} of {len(self)} image(s) cannot be read; fix or replace each file, or set its "
                f"exclude_reason in the manifest:\n" + "\n".join(rows))

    # -- items --------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> CollatedItems:
        """A batch's items; the DataLoader calls this once per batch, then ``collate_items``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.augment is not None:
            self.augment.set_random_state(seed=self._batch_seed(idx))
        if self.augment is not None and self.backend != "batched":  # per-item MONAI / albumentations, [0, 1]
            x = to_uint8(torch.stack([self._augment_one(self.preprocessed(i)) for i in indices]))
        else:
            x = self._gather(idx)
            if self.augment is not None:
                self.augment({"image": x})  # uint8, in place, on this dataset's own buffer
        if self.transport == "uint8":
            images = _batch_tensor(tuple(x.shape), torch.uint8).copy_(x)
        else:
            images = self.normalize.transforms[0].into(x, _batch_tensor(tuple(x.shape), torch.float32), 1 / 255)
        labels = self.labels[idx]
        items = [{"image": images[j], "label": labels[j], "index": i} for j, i in enumerate(indices)]
        return CollatedItems(items, {"image": images, "label": labels, "index": idx})

    def _batch_seed(self, idx: torch.Tensor) -> int:
        """Augmentation seed of one batch: a function of ``aug_seed`` and which rows it holds, in order.

        Shuffled epochs compose different batches, so draws differ per epoch, yet a replayed epoch (resume,
        another worker count) draws exactly the same."""
        return zlib.crc32(idx.numpy().tobytes(), self.aug_seed & 0xFFFFFFFF)

    def _buffer(self, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A reused scratch tensor: fresh multi-megabyte allocations page-fault on every batch."""
        buf = self._buffers.get(dtype)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
            buf = self._buffers[dtype] = torch.empty(shape, dtype=dtype)
        return buf[: shape[0]]

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        shape = (len(idx), self.spec.channels, self.spec.image_size, self.spec.image_size)
        raw = self._buffer(torch.uint8, torch.Size(shape))
        if self._memory is not None:
            return torch.index_select(self._memory, 0, idx, out=raw)
        for j, i in enumerate(idx.tolist()):
            raw[j] = self.preprocessed(i)
        return raw

    def _augment_one(self, image: torch.Tensor) -> torch.Tensor:
        if self.backend == "albumentations":
            return self.augment({"image": image})["image"]  # OpenCV works on the cached uint8 directly
        return self.augment({"image": image.float().div_(255.0)})["image"]

    def without_augmentation(self) -> ManifestDataset:
        """Same rows and cache, no random part (sharpness subsets, train-set evaluation)."""
        return self._clone(augment=None)

    def with_transport(self, transport: str) -> ManifestDataset:
        """Same rows, cache and random part, batches carried as ``transport`` ('float' or 'uint8')."""
        return self._clone(transport=_checked_transport(transport))

    def _clone(self, **changes: Any) -> ManifestDataset:
        clone = object.__new__(ManifestDataset)
        clone.__dict__.update({**self.__dict__, **changes, "_buffers": {}})
        return clone


def _collate_preprocessed(items: list[tuple[int, torch.Tensor | None, str | None]]
                          ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices, their images stacked, (index, reason) of the rows that failed) for one batch of the cache fill."""
    good = [(i, x) for i, x, _ in items if x is not None]
    images = default_collate([x for _, x in good]) if good else None
    return [i for i, _ in good], images, [(i, reason) for i, x, reason in items if x is None]


def _remove_abandoned_temps(folder: Path, age_s: float = 3600.0) -> None:
    """Entries a killed job was writing: one takes milliseconds, so an hour-old one is abandoned, while another
    job sharing the cache may be writing a fresh one right now."""
    cutoff = time.time() - age_s
    for tmp in folder.glob(f"*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


class _Preprocessed(Dataset):
    """Deterministic-only view used to fill caches in parallel."""

    def __init__(self, parent: ManifestDataset) -> None:
        self.parent = parent

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.parent.preprocessed(index), None
        except Exception as exc:  # noqa: BLE001 - every bad row is collected, and reported together
            return index, None, failure_reason(exc)


@dataclass
class DataBundle:
    """Datasets per split plus what evaluation and the model card need about them."""

    train: ManifestDataset
    val: ManifestDataset | None
    test: ManifestDataset | None
    class_names: list[str]
    manifest_sha256: str
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    root: Path | None = None

    def splits(self) -> dict[str, ManifestDataset]:
        return {name: ds for name, ds in (("train", self.train), ("val", self.val), ("test", self.test))
                if ds is not None}


def select_splits(df: pd.DataFrame, val_fold: int | None, origin: str = "manifest") -> dict[str, pd.DataFrame]:
    """train/val/test frames: an explicit ``val`` split wins, else ``val_fold`` of the train split."""
    if not (df["split"] != "").any():
        raise ValueError(f"{origin}: no row has a split; run `medgcsam manifest split` first")
    train = df[df["split"] == "train"]
    test = df[df["split"] == "test"]
    if (df["split"] == "val").any():
        val = df[df["split"] == "val"]
    elif val_fold is not None:
        folds = sorted(set(train["fold"]) - {-1})
        if val_fold not in folds:
            raise ValueError(f"{origin}: data.val_fold={val_fold} but the train split has folds {folds}; "
                             f"pick one of them, or set data.val_fold to null for no validation split")
        val = train[train["fold"] == val_fold]
        train = train[train["fold"] != val_fold]
    else:
        val = train.iloc[0:0]
    return {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True),
            "test": test.reset_index(drop=True)}


class DataSettings(Protocol):
    """What the data layer reads of a pipeline's ``data`` section (``medgcsam.config.DataConfig`` is one): plain
    values, so this layer needs nothing from the configuration module, which imports it."""

    manifest: Path
    root: Path | None
    task: str | None
    classes: list[str] | None
    modality: str
    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    cache: str
    cache_dir: Path | None
    augment: bool
    aug_backend: str
    val_fold: int | None
    dicom_multiframe: str
    allow_leakage: bool


def build_datasets(cfg: DataSettings, spec: InputSpecLike) -> DataBundle:
    """Read the manifest, apply the task map, drop excluded rows and build one dataset per split."""
    df = read_manifest(cfg.manifest)
    df["manifest_line"] = df.index + 2  # kept through the split, so errors about a row name its line
    root = resolve_root(cfg.manifest, cfg.root)
    if (mismatch := root_mismatch(df, cfg.manifest, cfg.root)) is not None:
        raise ValueError(mismatch)
    if cfg.task:
        df = apply_task(df, cfg.task)
    df = included(df)
    if not (cfg.task or cfg.classes) and (variants := case_variants(df["label"])):
        raise ValueError(f"{cfg.manifest}: labels {variants} differ only in case and would train as separate "
                         f"classes; write each class one way, or set data.task (its map ignores case)")
    classes = cfg.classes or (get_task(cfg.task).classes if cfg.task else sorted(df["label"].unique()))
    unknown = df.index[~df["label"].isin(classes)]
    if len(unknown):
        raise ValueError(f"{cfg.manifest}: labels {sorted(set(df.loc[unknown, 'label']))} (line(s) "
                         f"{', '.join(str(i + 2) for i in unknown[:10])}) are not in data.classes {classes}; "
                         f"add them, set data.task, or set exclude_reason on those rows")
    frames = select_splits(df, cfg.val_fold, origin=str(cfg.manifest))
    if frames["train"].empty:
        raise ValueError(f"{cfg.manifest}: the train split is empty after exclusions; check split/exclude_reason")
    _check_leakage(frames, cfg)
    common = {"root": root, "class_names": classes, "spec": spec, "modality": cfg.modality, "cache": cfg.cache,
              "cache_dir": cfg.cache_dir, "multiframe": cfg.dicom_multiframe}
    datasets = {name: ManifestDataset(frame, augment=(name == "train" and cfg.augment),
                                      backend=cfg.aug_backend, **common) if len(frame) else None
                for name, frame in frames.items()}
    return DataBundle(train=datasets["train"], val=datasets["val"], test=datasets["test"], class_names=classes,
                      manifest_sha256=manifest_sha256(cfg.manifest),
                      frames={k: v for k, v in frames.items() if len(v)}, root=root)


def _check_leakage(frames: dict[str, pd.DataFrame], cfg: DataSettings) -> None:
    """Refuse what ``manifest validate`` rejects: an image (or a patient) in two splits, or one image with two
    labels, unless ``data.allow_leakage`` says so, which the run's parameters then record."""
    report = leakage_report({name: frame for name, frame in frames.items() if len(frame)}, cfg.manifest)
    if report.ok:
        return
    found = report.render()
    if not cfg.allow_leakage:
        raise LeakageError(f"{found}\nfix the manifest (`medgcsam manifest validate` lists the same findings; "
                           f"`manifest split` keeps duplicates and patients together), or set data.allow_leakage: "
                           f"true to train anyway (recorded with the run)")
    log.warning("data.allow_leakage is set, so training goes on despite:\n%s", found)


def seed_worker(worker_id: int) -> None:
    """Distinct, reproducible numpy/random streams per worker (augmentation is seeded per batch instead)."""
    seed = torch.utils.data.get_worker_info().seed % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(bundle: DataBundle, cfg: DataSettings, *, distributed: bool = False,
                  seed: int = 0) -> dict[str, DataLoader]:
    """DataLoaders per split; train drops the last partial batch so every step has the same shape.

    Batches carry uint8 images: pass ``batch["image"]`` through ``BatchInputs`` to get model input.

    Workers are persistent (restarting them every epoch cost more than a cached epoch itself): the
    augmentation of a batch is seeded from ``seed`` and the batch's own indices, not from worker state,
    so it is the same whichever worker draws it, and the engine's per-epoch reseed of the sampler (which
    fixes the shuffle) fixes the augmentation too, also across a mid-run resume."""
    unreadable = []
    for name, ds in bundle.splits().items():
        try:
            ds.warm_cache(cfg.num_workers)
        except UnreadableRowsError as exc:  # every split is read before one error lists all of them
            unreadable.append(f"{name} split: {exc}")
    if unreadable:
        raise UnreadableRowsError(f"{cfg.manifest}: " + "\n".join(unreadable))
    loaders: dict[str, DataLoader] = {}
    for name, ds in bundle.splits().items():
        train = name == "train"
        batch = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        if train and len(ds) < batch:
            raise ValueError(f"train split has {len(ds)} images, fewer than data.batch_size={batch}; with "
                             f"drop_last there would be no step: lower data.batch_size")
        ds = ds.with_transport("uint8")
        ds.aug_seed = seed
        # The shuffle has a generator of its own: the loader's generator also feeds worker seeds, drawn when a
        # fresh iterator starts but not when persistent workers are reused, which would shift the permutation.
        if distributed:
            sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=train)
        else:
            sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if train else None
        loaders[name] = DataLoader(
            ds, batch_size=batch, sampler=sampler, drop_last=train,
            num_workers=cfg.num_workers, worker_init_fn=seed_worker if cfg.num_workers else None,
            generator=torch.Generator().manual_seed(seed), persistent_workers=cfg.num_workers > 0,
            collate_fn=collate_items,
            pin_memory=torch.cuda.is_available())
    return loaders


