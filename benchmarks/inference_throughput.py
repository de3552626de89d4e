"""End-to-end `predict` throughput over real BUSI PNGs, as a fraction of the model's pure forward throughput.

The limit is the forward pass alone on uint8 batches preloaded in memory (same batch size, same
normalization and ``forward_outputs`` path, same precision); end to end adds file listing, decoding and
preprocessing in DataLoader workers, host-to-device copies and the CSV. Both are measured in this
run, on this machine, so the printed fraction is what the target (>= 0.7) is about.

    python benchmarks/inference_throughput.py                              # CPU, resnet18, 224 px
    python benchmarks/inference_throughput.py --device cuda --amp bf16 --backbone resnet50 --num-workers 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from medgcsam.data.datasets import BatchInputs
from medgcsam.inference.predict import ImageFolder, find_images, forward_outputs, predict
from medgcsam.models.factory import create_model, input_spec
from medgcsam.models.spec import ModelSpec, Preprocessing, Threshold

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "busi"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MEDGCSAM_BUSI", DEFAULT_DATA)))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--limit", type=int, default=None, help="Use the first N images (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved timed runs of each; best kept")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"BUSI folder {args.data} not found; pass --data or set MEDGCSAM_BUSI")
    device = torch.device(args.device)
    torch.manual_seed(0)
    classes = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    model = create_model(args.backbone, len(classes), image_size=args.image_size).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ispec = input_spec(model, args.image_size, 3)
    spec = ModelSpec(backbone=args.backbone, num_classes=len(classes), in_chans=3, class_names=classes,
                     preprocessing=Preprocessing(image_size=ispec.image_size, channels=3, mean=list(ispec.mean),
                                                 std=list(ispec.std), modality="ultrasound"),
                     threshold=Threshold(positive_class=classes[-1], value=0.5, rule="benchmark"))
    paths = find_images(args.data)[0][: args.limit]
    with tempfile.TemporaryDirectory(prefix="medgcsam-bench-") as tmp:
        data = Path(tmp) / "in"
        for rel in paths:  # links, so --limit selects files without copying them
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).symlink_to(args.data.resolve() / rel)
        forward_pass = forward_benchmark(model, spec, data, paths, args, device)
        forward, e2e = [], []
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            forward.append(forward_pass())
            summary = predict(model, spec, data, Path(tmp) / "out.csv", batch_size=args.batch_size,
                              num_workers=args.num_workers, device=device, amp=args.amp, progress=False)
            assert summary.predicted == len(paths) and summary.failed == 0, summary
            e2e.append(summary.predicted / summary.seconds)
    forward_ips, end_to_end = max(forward), max(e2e)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cpus"
    print(f"device={device} ({hardware})"
          f" backbone={args.backbone} size={args.image_size} batch={args.batch_size} workers={args.num_workers}"
          f" amp={args.amp} torch_threads={torch.get_num_threads()} images={len(paths)}"
          f" load_avg_1m={os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(f"forward only (preloaded tensors): {forward_ips:8.1f} img/s   runs: {_fmt(forward)}")
    print(f"end to end (medgcsam predict):    {end_to_end:8.1f} img/s   runs: {_fmt(e2e)}")
    print(f"fraction of forward throughput:   {end_to_end / forward_ips:8.2f}   (target >= 0.70)")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def forward_benchmark(model, spec: ModelSpec, data: Path, paths: list[str], args, device: torch.device):
    """A timer of the forward pass over the same images, decoded and preprocessed beforehand (the limit)."""
    folder = ImageFolder(data, paths, spec)  # predict's own reading and uint8 preprocessing, done beforehand
    images = torch.stack([folder[i][1] for i in range(len(paths))])
    batches = list(images.split(args.batch_size))
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]  # as the DataLoader delivers them
    inputs = BatchInputs(spec.preprocessing, device)  # normalization on the device, as in predict
    forward_outputs(model, inputs(batches[0]), device, args.amp)  # warm-up (cuDNN autotune, allocator)

    def images_per_second() -> float:
        start = time.perf_counter()
        for batch in batches:
            forward_outputs(model, inputs(batch), device, args.amp)  # ends with .cpu(): synchronizes
        return len(paths) / (time.perf_counter() - start)

    return images_per_second


if __name__ == "__main__":
    main()
