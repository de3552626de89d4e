"""Images/s of one epoch over BUSI with and without the deterministic-part cache.

    python benchmarks/data_throughput.py [--root ../shared/data/busi] [--size 224] [--workers 2]

The loaders are built as ``build_loaders`` builds the training loader: persistent workers,
uint8 batches from the workers, normalized to float in the main process by
``BatchInputs`` (on CPU here; on a GPU server on the device), and that normalization is inside the timing.
Uncached: every item is read, decoded, channel-matched, resized and padded in DataLoader workers.
Cached: the same epoch served from the uint8 cache (memory, or .npy files on disk) filled beforehand;
the random part (per batch for ``batched``, per item for ``monai``/``albumentations``) and the
normalization still run every epoch. Each setting is one timed epoch after the workers have started;
each rate is the median of ``--epochs`` epochs, the first of which includes starting the workers;
the ratio is cached / uncached from this run. Target: the cached epoch at least 5x faster.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medgcsam.data.builders import build_manifest
from medgcsam.data.datasets import BatchInputs, ManifestDataset, collate_items, seed_worker
from medgcsam.data.manifest import included
from medgcsam.models.factory import InputSpec

REPO = Path(__file__).resolve().parents[1]


def epoch_rate(ds: ManifestDataset, workers: int, batch: int, epochs: int) -> float:
    loader = DataLoader(ds.with_transport("uint8"), batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=seed_worker if workers else None,
                        collate_fn=collate_items, generator=torch.Generator().manual_seed(0))
    inputs = BatchInputs(ds.spec, "cpu")
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = sum(inputs(b["image"]).shape[0] for b in loader)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "busi")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per setting (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    frame = included(build_manifest("busi", args.root, hash_files=False).frame)
    spec = InputSpec(args.size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    classes = sorted(frame["label"].unique())
    print(f"BUSI {len(frame)} images from {args.root}, {args.size} px, {args.workers} workers, batch {args.batch}, "
          f"torch threads 1, median of {args.epochs} epochs")
    print(f"{'augmentation':<16}{'uncached img/s':>16}{'memory img/s':>14}{'ratio':>8}{'disk img/s':>12}{'ratio':>8}"
          f"{'warm s':>8}")
    cache_root = Path(tempfile.mkdtemp(prefix="medgcsam-bench-"))
    ratios: dict[str, float] = {}
    try:
        for label, augment, backend in (("none", False, "batched"), ("batched", True, "batched"),
                                        ("albumentations", True, "albumentations"), ("monai", True, "monai")):
            common = {"root": args.root, "class_names": classes, "spec": spec, "modality": "ultrasound",
                      "augment": augment, "backend": backend}
            uncached = epoch_rate(ManifestDataset(frame, cache="none", **common), args.workers, args.batch, args.epochs)
            memory = ManifestDataset(frame, cache="memory", **common)
            start = time.perf_counter()
            memory.warm_cache(args.workers)
            warm = time.perf_counter() - start
            mem_rate = epoch_rate(memory, args.workers, args.batch, args.epochs)
            disk = ManifestDataset(frame, cache="disk", cache_dir=cache_root / label, **common)
            disk.warm_cache(args.workers)
            disk_rate = epoch_rate(disk, args.workers, args.batch, args.epochs)
            print(f"{label:<16}{uncached:>16.0f}{mem_rate:>14.0f}{mem_rate / uncached:>7.1f}x{disk_rate:>12.0f}"
                  f"{disk_rate / uncached:>7.1f}x{warm:>8.1f}")
            ratios[label] = min(mem_rate, disk_rate) / uncached
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    for label, ratio in ratios.items():
        print(f"target cached >= 5x uncached ({label}, worse of memory/disk): {ratio:.1f}x "
              f"{'met' if ratio >= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
