"""GPU check sections (b) and (c): eager-vs-graphed weights after N steps, graphed evaluation forward speedup.

    python benchmarks/gpu_graph_check.py --device cuda            # the GPU machine (gpu_check.sh)
    python benchmarks/gpu_graph_check.py --device cpu --tiny      # dry run: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from medgcsam.engine.graphed import GraphedForward, make_step
from medgcsam.engine.step import autocast_factory
from medgcsam.models import create_model
from medgcsam.optim import create_optimizer, make_graph_safe_


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    steps, size = (3, 32) if args.tiny else (50, 64)
    print(f"(b) eager vs graphed GCSAM weights after {steps} steps, batch 8, {size} px (relative L2 difference)")
    for model_name in ("resnet18", "vit_tiny_patch16_224"):
        for amp in ("none", "bf16"):
            eager = weights_after(model_name, size, steps, amp, False, device)
            graph = weights_after(model_name, size, steps, amp, True, device)
            print(f"  {model_name:<22} {'fp32' if amp == 'none' else amp:<5} rel diff {rel_diff(eager, graph):.3e}")
    bs, px, reps = (4, 32, 2) if args.tiny else (64, 224, 30)
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
    print("(c) HVP graph capture: not implemented in this build (sharpness/operator.py runs eagerly)")


if __name__ == "__main__":
    main()
