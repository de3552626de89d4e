"""GPU check sections (b) and (c): eager-vs-graphed weights after N steps; graphed evaluation forward and HVP speedups.

    python benchmarks/gpu_graph_check.py --device cuda --sections c  # the GPU machine (gpu_check.sh runs b, c apart)
    python benchmarks/gpu_graph_check.py --device cpu --tiny      # dry run: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS possible
import torch  # noqa: E402
from torch import nn

from medgcsam.engine.graphed import GraphedForward, make_step
from medgcsam.engine.step import autocast_factory
from medgcsam.models import create_model
from medgcsam.optim import create_optimizer, make_graph_safe_
from medgcsam.sharpness import HessianOperator, lanczos_top_eigs


def weights_after(model_name: str, size: int, steps: int, amp: str, graphed: bool, device: torch.device) -> list:
    torch.manual_seed(0)
    model = create_model(model_name, 3, in_chans=3, image_size=size).to(device)
    opt = create_optimizer("gcsam", model.parameters(), model=model, lr=1e-4)
    if not graphed:
        make_graph_safe_(opt)  # the same optimizer arithmetic, never captured
    mode = ("on" if device.type == "cuda" else "auto") if graphed else "off"
    step = make_step(model, opt, nn.CrossEntropyLoss(), autocast=autocast_factory(device, amp), mode=mode,
                     device=device)
    g = torch.Generator(device=device).manual_seed(1)
    for _ in range(steps):
        step(torch.randn(8, 3, size, size, device=device, generator=g),
             torch.randint(0, 3, (8,), device=device, generator=g))
    return [p.detach().float().clone() for p in model.parameters()]


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """cuDNN deterministic kernels, no autotuning, torch's deterministic algorithms (warn where none exists)."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, False if on else saved[1]
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def rel_diff(a: list, b: list) -> float:
    num = sum(float((x - y).square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(x.square().sum()) for x in a)
    return (num / den) ** 0.5


def timed(fn, x: torch.Tensor, reps: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    tick = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - tick) / reps


def hvp_check(model_name: str, bs: int, px: int, reps: int, device: torch.device) -> None:
    """Hessian-vector product (fp32, eval mode, one fixed batch): eager vs captured once and replayed; time per
    product and the top eigenvalue by Lanczos (tol 1e-3) with each."""
    torch.manual_seed(0)
    model = create_model(model_name, 3, in_chans=3, image_size=px).to(device).eval()
    g = torch.Generator(device=device).manual_seed(2)
    batch = (torch.randn(bs, 3, px, px, device=device, generator=g),
             torch.randint(0, 3, (bs,), device=device, generator=g))
    seconds, top = {}, {}
    for mode in ("off", "auto"):
        op = HessianOperator(model, [batch], cuda_graph=mode)
        v = torch.randn(op.dim, device=device, generator=g)
        seconds[mode] = timed(op, v, reps)
        eig = lanczos_top_eigs(op, op.dim, 1, max_steps=20, tol=1e-3, device=device, start=op.gradient())
        top[mode] = (eig.values[0], eig.hvps, op.replays, op.graph_fallback)
        del op
    (e_val, e_n, _, _), (g_val, g_n, replays, fallback) = top["off"], top["auto"]
    print(f"(c) HVP {model_name} bs {bs} {px} px fp32 eval: eager {seconds['off'] * 1e3:.1f} ms, graphed "
          f"{seconds['auto'] * 1e3:.1f} ms per product, speedup {seconds['off'] / seconds['auto']:.2f}x "
          f"(replays {replays}{', FELL BACK: ' + fallback if fallback else ''}); top eigenvalue eager {e_val:.6g} "
          f"({e_n} HVPs), graphed {g_val:.6g} ({g_n} HVPs), relative difference "
          f"{abs(g_val - e_val) / max(abs(e_val), 1e-30):.1e}")


def weights_section(tiny: bool, device: torch.device) -> None:
    """(b): graphed vs eager, the eager noise floor beside it, with default and with deterministic kernels."""
    steps, size = (3, 32) if tiny else (50, 64)
    print(f"(b) GCSAM weights after {steps} steps, batch 8, {size} px, relative L2 difference; noise = eager vs "
          "eager, same seed, run twice. Tolerance: fp32 graphed-vs-eager <= 1e-6 (deterministic kernels), or at the "
          "noise floor when kernels are not deterministic; bf16 <= 1e-3")
    for det in (False, True):
        with deterministic(det):
            for model_name in ("resnet18", "vit_tiny_patch16_224"):
                for amp in ("none", "bf16") if not det else ("none",):
                    eager = weights_after(model_name, size, steps, amp, False, device)
                    again = weights_after(model_name, size, steps, amp, False, device)
                    graph = weights_after(model_name, size, steps, amp, True, device)
                    graphed, noise = rel_diff(eager, graph), rel_diff(eager, again)
                    limit = 1e-6 if amp == "none" else 1e-3
                    verdict = "ok" if graphed <= max(limit, noise) else "ABOVE"
                    print(f"  {'deterministic' if det else 'default':<13} {model_name:<22} "
                          f"{'fp32' if amp == 'none' else amp:<5} graphed-vs-eager {graphed:.3e}  noise {noise:.3e}  "
                          f"tolerance {limit:.0e} -> {verdict}")


def forward_section(tiny: bool, device: torch.device) -> None:
    """(c): graphed evaluation forward against eager, ResNet-50 bf16."""
    bs, px, reps = (4, 32, 2) if tiny else (64, 224, 30)
    model = create_model("resnet50", 3, in_chans=3, image_size=px).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(bs, 3, px, px, device=device).contiguous(memory_format=torch.channels_last)
    autocast = autocast_factory(device, "bf16")
    forward = GraphedForward(model, autocast=autocast)
    eager_s, graph_s = timed(forward.eager, x, reps), timed(forward, x, reps)
    same = torch.allclose(forward(x).float(), forward.eager(x).float(), atol=1e-2, rtol=1e-2)
    print(f"(c) evaluation forward resnet50 bs {bs} {px} px bf16: eager {bs / eager_s:.0f} img/s, graphed "
          f"{bs / graph_s:.0f} img/s, speedup {eager_s / graph_s:.2f}x (graphs captured: {len(forward.graphs)}, "
          f"outputs agree: {same})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="bc", help="b: weights, c: evaluation forward and HVP timings")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if "b" in args.sections:
        weights_section(args.tiny, device)
    if "c" in args.sections:
        forward_section(args.tiny, device)
        hvp_sizes = [("resnet18", 2, 32, 2)] if args.tiny else [("resnet18", 32, 64, 20), ("resnet50", 16, 224, 10)]
        for model_name, hbs, hpx, hreps in hvp_sizes:
            hvp_check(model_name, hbs, hpx, hreps, device)


if __name__ == "__main__":
    main()
