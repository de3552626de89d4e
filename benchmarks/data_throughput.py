"""Images/s of one epoch over BUSI with and without the deterministic-part cache.

    python benchmarks/data_throughput.py [--root ../shared/data/busi] [--size 224] [--workers 2]

Uncached: every item is read, decoded, channel-matched, resized and padded in DataLoader workers.
Cached: the same epoch served from the uint8 cache (memory, or .npy files on disk) filled beforehand;
the random part and normalization still run per item. Each setting is one timed epoch after the
workers have started; the ratio is cached / uncached from this run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medgcsam.data.builders import build_manifest
from medgcsam.data.datasets import ManifestDataset
from medgcsam.data.manifest import included
from medgcsam.models.factory import InputSpec

REPO = Path(__file__).resolve().parents[1]


def epoch_rate(ds: ManifestDataset, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    next(iter(loader))  # start workers outside the timed epoch
    start = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "busi")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    frame = included(build_manifest("busi", args.root, hash_files=False).frame)
    spec = InputSpec(args.size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    classes = sorted(frame["label"].unique())
    print(f"BUSI {len(frame)} images from {args.root}, {args.size} px, {args.workers} workers, batch {args.batch}, "
          f"torch threads 1")
    print(f"{'augmentation':<16}{'uncached img/s':>16}{'memory img/s':>14}{'ratio':>8}{'disk img/s':>12}{'ratio':>8}"
          f"{'warm s':>8}")
    cache_root = Path(tempfile.mkdtemp(prefix="medgcsam-bench-"))
    try:
        for label, augment, backend in (("none", False, "monai"), ("albumentations", True, "albumentations"),
                                        ("monai", True, "monai")):
            common = {"root": args.root, "class_names": classes, "spec": spec, "modality": "ultrasound",
                      "augment": augment, "backend": backend}
            uncached = epoch_rate(ManifestDataset(frame, cache="none", **common), args.workers, args.batch)
            memory = ManifestDataset(frame, cache="memory", **common)
            start = time.perf_counter()
            memory.warm_cache(args.workers)
            warm = time.perf_counter() - start
            mem_rate = epoch_rate(memory, args.workers, args.batch)
            disk = ManifestDataset(frame, cache="disk", cache_dir=cache_root / label, **common)
            disk.warm_cache(args.workers)
            disk_rate = epoch_rate(disk, args.workers, args.batch)
            print(f"{label:<16}{uncached:>16.0f}{mem_rate:>14.0f}{mem_rate / uncached:>7.1f}x{disk_rate:>12.0f}"
                  f"{disk_rate / uncached:>7.1f}x{warm:>8.1f}")
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
