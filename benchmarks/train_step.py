"""Step time and images/s of Adam, SAM and GCSAM on the same model and batch, measured in one run.

The step is the engine's own ``train_step`` (all passes, BN restore, GC, base step). Ratios are
relative to Adam; absolute numbers depend on the machine, ratios carry over.

    python benchmarks/train_step.py                                   # CPU: resnet18, batch 32, 128 px
    python benchmarks/train_step.py --device cuda --amp bf16 --model resnet50 --size 224 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from medgcsam.engine.metrics import TrainMeter
from medgcsam.engine.step import autocast_factory, train_step
from medgcsam.models import create_model
from medgcsam.optim import create_optimizer


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    ap.add_argument("--optimizers", default="adam,sam,gcsam")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (CNNs on GPU)")
    return ap.parse_args()


def time_optimizer(name: str, args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Seconds per step for ``args.steps`` steps after ``args.warmup``, same init for every optimizer."""
    device = images.device
    torch.manual_seed(0)
    model = create_model(args.model, args.classes, in_chans=args.channels, image_size=args.size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    opt = create_optimizer(name, model.parameters(), base="adam", model=model, grad_scaler=scaler, lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    autocast = autocast_factory(device, args.amp)
    meter = TrainMeter(device, args.warmup + args.steps)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        train_step(model, opt, criterion, images, labels, autocast=autocast, scaler=scaler, meter=meter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    assert torch.isfinite(meter.loss_sum), f"{name}: non-finite loss"
    return times


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, args.channels, args.size, args.size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    print(f"model {args.model}, batch {args.batch}, {args.size} px, {args.channels} ch, device {device}, "
          f"amp {args.amp}, torch threads {torch.get_num_threads()}, {args.steps} timed steps after {args.warmup}")
    results = {}
    for name in args.optimizers.split(","):
        times = time_optimizer(name, args, images, labels)
        results[name] = statistics.median(times)
    ref = results.get("adam", next(iter(results.values())))
    print(f"{'optimizer':<10} {'step ms (median)':>17} {'images/s':>10} {'time vs adam':>13}")
    for name, sec in results.items():
        print(f"{name:<10} {sec * 1e3:>17.1f} {args.batch / sec:>10.1f} {sec / ref:>12.2f}x")
    if "sam" in results and "gcsam" in results:
        print(f"gcsam / sam step time: {results['gcsam'] / results['sam']:.3f}")


if __name__ == "__main__":
    main()
