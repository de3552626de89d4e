"""Step time and images/s of Adam, SAM and GCSAM on the same model and batch, measured in one run.

The step is the engine's own ``train_step`` (all passes, BN restore, GC, base step). Ratios are
relative to Adam; absolute numbers depend on the machine, ratios carry over.

    python benchmarks/train_step.py                                   # CPU: resnet18, batch 32, 128 px
    python benchmarks/train_step.py --device cuda --amp bf16 --model resnet50 --size 224 --batch 64
    python benchmarks/train_step.py --device cuda --amp bf16 --model resnet50 --size 224 --batch 16 \
        --channels-last --optimizers adam,gcsam,graph:gcsam,hand:gcsam        # graphed step vs hand-written

``graph:NAME`` times the product's graphed step (``engine.graphed.make_step``, cuda_graph=on); ``hand:gcsam``
a GCSAM step written here independently (one CUDA graph over both passes, GC, perturbation, BN-buffer restore
and a fused capturable Adam), the reference the product's graphed step is held to (>= 0.95 of it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from medgcsam.engine.graphed import make_step
from medgcsam.engine.metrics import TrainMeter
from medgcsam.engine.step import autocast_factory
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
    criterion = nn.CrossEntropyLoss()
    autocast = autocast_factory(device, args.amp)
    meter = TrainMeter(device, args.warmup + args.steps)
    graphed = name.startswith("graph:")
    if name.startswith("hand:"):
        step = hand_graphed_gcsam(model, criterion, images, labels, autocast, meter)
    else:
        opt = create_optimizer(name.removeprefix("graph:"), model.parameters(), base="adam", model=model,
                               grad_scaler=scaler, lr=1e-4)
        step = make_step(model, opt, criterion, autocast=autocast, scaler=scaler, meter=meter,
                         mode=("on" if device.type == "cuda" else "auto") if graphed else "off", device=device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    assert torch.isfinite(meter.loss_sum), f"{name}: non-finite loss"
    return times


def hand_graphed_gcsam(model: nn.Module, criterion: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       autocast, meter: TrainMeter):  # noqa: ANN001, ANN201 - a benchmark's local closure
    """GCSAM (rho 0.05, GC on ndim > 1 for the ascent, ||GC(g)|| normaliser) written independently of
    medgcsam.optim: plain foreach code, fused capturable Adam, one CUDA graph per step. CPU: runs eagerly."""
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=torch.tensor(1e-4, device=images.device), fused=True,
                            capturable=images.is_cuda)
    bn = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    bn_copy = [torch.empty_like(b) for b in bn]
    backup = [torch.empty_like(p) for p in params]
    gc = [p.ndim > 1 for p in params]
    static_x, static_y = images.clone(), labels.clone()

    def body() -> None:
        with autocast():
            logits = model(static_x)
        loss = criterion(logits.float(), static_y)
        meter.update(loss, logits, static_y)
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_(bn_copy, bn)
            grads = [p.grad for p in params]
            for g, c in zip(grads, gc, strict=True):
                if c:
                    g.sub_(g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))
            norm = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()
            scale = 0.05 / (norm + 1e-12)
            torch._foreach_copy_(backup, params)
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))
        for p in params:
            p.grad = None
        with autocast():
            logits = model(static_x)
        criterion(logits.float(), static_y).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
            torch._foreach_copy_(bn, bn_copy)
        adam.step()
        for p in params:
            p.grad = None

    if not images.is_cuda:
        return lambda x, y: (static_x.copy_(x), static_y.copy_(y), body())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    def replay(x: torch.Tensor, y: torch.Tensor) -> None:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return replay


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
    if "graph:gcsam" in results:
        ips = {k: args.batch / v for k, v in results.items()}
        for ref_name in ("adam", "gcsam", "hand:gcsam"):
            if ref_name in ips:
                print(f"RATIO graph:gcsam / {ref_name} images/s (batch {args.batch}): "
                      f"{ips['graph:gcsam'] / ips[ref_name]:.3f}")


if __name__ == "__main__":
    main()
