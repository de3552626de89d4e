"""What GCSAM costs beyond its two forward/backward passes.

1. Optimizer work per step (everything but forward/backward: GC, norms, perturb, restore, base Adam step) of
   medgcsam's multi-tensor GCSAM against a plain per-tensor-loop implementation of the same math
   (the davda54 / GCSAM-script style: Python loop, clones per step, per-tensor Adam), on the ResNet-50
   parameter set with random gradients. Target: ratio <= 0.5.
2. End-to-end train-step time GCSAM / Adam on timm resnet18, batch 32, 128 px (two passes cost 2.0).
   Target: <= 2.05.
3. ``--device cuda``: also ResNet-50 step times for Adam / SAM / GCSAM (bf16 autocast, channels_last, 224 px).

Run: ``python benchmarks/optim_overhead.py [--device cuda] [--threads N]``. Prints raw medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from medgcsam.optim import create_optimizer  # noqa: E402


class LoopGCSAM:
    """The same update written the common way: per-tensor Python loops, a clone per tensor per step."""

    def __init__(self, params: list[torch.Tensor], rho: float = 0.05, lr: float = 1e-4, **adam: bool) -> None:
        self.params = params
        self.rho = rho
        self.base = torch.optim.Adam(params, lr=lr, **adam)
        self.old: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def ascent(self) -> None:
        for p in self.params:
            if p.grad is not None and p.grad.ndim > 1:
                p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.ndim)), keepdim=True))
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in self.params if p.grad is not None]), 2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.clone()
            p.add_(p.grad * scale)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def descent(self) -> None:
        for p in self.params:
            if p in self.old:
                p.copy_(self.old[p])
        self.old.clear()
        self.base.step()
        self.base.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def optimizer_overhead(device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median ms of the optimizer work of one GCSAM step: medgcsam (fused Adam base), the per-tensor loop
    with a per-tensor Adam, and the per-tensor loop with the same fused Adam (isolates the wrapper)."""
    model = timm.create_model("resnet50", pretrained=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    g0 = [torch.randn(p.shape, generator=gen, device=device) * 1e-3 + 1e-4 for p in params]
    gp = [torch.randn(p.shape, generator=gen, device=device) * 1e-3 for p in params]
    ours = create_optimizer("gcsam", params, lr=1e-4, fused=True)
    loop = LoopGCSAM(params, foreach=False)
    loop_fused = LoopGCSAM(params, fused=True)

    def timed(opt) -> Callable[[], float]:
        def one() -> float:
            for p, g in zip(params, g0, strict=True):  # gradients of the two passes are set outside the clock
                p.grad = g.clone()
            sync(device)
            t0 = time.perf_counter()
            opt.ascent()
            sync(device)
            t1 = time.perf_counter()
            for p, g in zip(params, gp, strict=True):
                p.grad = g.clone()
            sync(device)
            t2 = time.perf_counter()
            opt.descent()
            sync(device)
            return (t1 - t0) + (time.perf_counter() - t2)
        return one

    opts = (ours, loop, loop_fused)
    for opt in opts:  # warm-up: buffers, Adam state
        for _ in range(2):
            timed(opt)()
    results: dict[int, list[float]] = {id(opt): [] for opt in opts}
    for _ in range(repeats):  # interleaved, so background load hits all alike
        for opt in opts:
            results[id(opt)].append(timed(opt)())
    return tuple(statistics.median(results[id(opt)]) * 1e3 for opt in opts)


def step_times(arch: str, names: list[str], device: torch.device, batch: int, size: int, repeats: int,
               amp: bool) -> dict[str, float]:
    """Median ms of a full train step (all passes + optimizer) per optimizer name, interleaved."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=10).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        kwargs = {"fused": True}
        opt = create_optimizer(name, model.parameters(), model=model, lr=1e-4, **kwargs)
        runs[name] = (model, opt)

    def step(name: str) -> float:
        model, opt = runs[name]
        sync(device)
        t0 = time.perf_counter()
        for i in range(opt.passes_per_step):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.after_backward(i)
        sync(device)
        return time.perf_counter() - t0

    for name in names:
        for _ in range(2):
            step(name)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:
            samples[name].append(step(name))
    return {n: statistics.median(v) * 1e3 for n, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")

    ours, loop, loop_fused = optimizer_overhead(device, args.repeats)
    print(f"[1] GCSAM optimizer work per step, ResNet-50 params (25.6M): medgcsam {ours:.1f} ms, "
          f"per-tensor loop {loop:.1f} ms -> overhead ratio {ours / loop:.3f} (target <= 0.5)")
    print(f"    same fused Adam base in both: loop {loop_fused:.1f} ms -> wrapper-only ratio {ours / loop_fused:.3f}")

    t = step_times("resnet18", ["adam", "gcsam"], device, batch=32, size=128, repeats=args.repeats, amp=False)
    print(f"[2] train step resnet18 bs32 128px: adam {t['adam']:.1f} ms, gcsam {t['gcsam']:.1f} ms -> "
          f"step ratio {t['gcsam'] / t['adam']:.3f} (target <= 2.05; two passes = 2.0)")

    if device.type == "cuda":
        t = step_times("resnet50", ["adam", "sam", "gcsam"], device, batch=64, size=224, repeats=20, amp=True)
        print(f"[3] train step resnet50 bs64 224px bf16 channels_last: adam {t['adam']:.1f} ms, "
              f"sam {t['sam']:.1f} ms ({t['sam'] / t['adam']:.3f}x), gcsam {t['gcsam']:.1f} ms "
              f"({t['gcsam'] / t['adam']:.3f}x)")


if __name__ == "__main__":
    main()
