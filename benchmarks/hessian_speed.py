"""Top Hessian eigenvalue: medgcsam (Lanczos, residual-certified) against PyHessian 0.1 (power iteration).

Same timm resnet18 (random init, eval mode), same batch, same mean cross-entropy. Both use a single
retained first-order graph (PyHessian's single-batch mode; medgcsam's "rev" HVP with one batch), so
the per-product cost is comparable and the difference is the number of products. A tight Lanczos
run (tol 1e-6) gives the reference value both are compared with.

Target: agreement within 1% at no more than a third of PyHessian's wall time.

Run from the repository root: ``PYTHONPATH=. python benchmarks/hessian_speed.py [--batch 16] [--size 64]
[--device cpu|cuda] [--threads 1] [--repeats 2]``.
pyhessian==0.1 (MIT) is pip-installed into the current environment on first run; nothing else uses it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from medgcsam.sharpness import HessianOperator, exact_numerics, lanczos_top_eigs  # noqa: E402


def ensure_pyhessian() -> str:
    """Install pyhessian 0.1 when missing; return its declared license."""
    try:
        importlib.metadata.version("pyhessian")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "pyhessian==0.1"], check=True)
    meta = importlib.metadata.metadata("pyhessian")
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return meta.get("License") or "; ".join(classifiers) or "not declared in metadata"


def run_pyhessian(model, x, y, device: str) -> tuple[float, int, float]:
    # the package re-exports the class under the module's name, so take the module from importlib
    ph = importlib.import_module("pyhessian.hessian")
    calls = 0
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        _sync(device)
        start = time.perf_counter()
        with exact_numerics():
            h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=device == "cuda")
            values, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad behind
    return float(values[0]), calls, seconds


def run_medgcsam(model, x, y, device: str, tol: float, steps: int) -> tuple[float, int, float, float]:
    _sync(device)
    start = time.perf_counter()
    op = HessianOperator(model, [(x, y)], F.cross_entropy)
    eig = lanczos_top_eigs(op, op.dim, 1, max_steps=steps, tol=tol, seed=0, dtype=op.dtype, device=op.device)
    _sync(device)
    return eig.values[0], eig.hvps, time.perf_counter() - start, eig.residuals[0]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machines: keep small)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    license_text = ensure_pyhessian()

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=args.classes).to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"resnet18 ({n_params:,} parameters), batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"device {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"pyhessian {importlib.metadata.version('pyhessian')} (license: {license_text})")

    reference, ref_hvps, _, ref_res = run_medgcsam(model, x, y, args.device, tol=1e-6, steps=80)
    print(f"reference (Lanczos, tol 1e-6): {reference:.6f}, residual {ref_res:.2e}, {ref_hvps} HVPs")

    ph_runs, mg_runs = [], []
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        ph_runs.append(run_pyhessian(model, x, y, args.device))
        mg_runs.append(run_medgcsam(model, x, y, args.device, tol=1e-3, steps=40))
    ph_value, ph_hvps, ph_s = min(ph_runs, key=lambda r: r[2])
    mg_value, mg_hvps, mg_s, mg_res = min(mg_runs, key=lambda r: r[2])

    print(f"{'method':<34}{'top eigenvalue':>16}{'rel. err':>11}{'HVPs':>7}{'wall s':>9}{'s/HVP':>8}")
    for name, value, hvps, secs in (("PyHessian 0.1 power (tol 1e-3)", ph_value, ph_hvps, ph_s),
                                    ("medgcsam Lanczos (residual 1e-3)", mg_value, mg_hvps, mg_s)):
        err = abs(value - reference) / abs(reference)
        print(f"{name:<34}{value:>16.6f}{err:>11.2e}{hvps:>7d}{secs:>9.2f}{secs / hvps:>8.3f}")
    agreement = abs(mg_value - ph_value) / abs(ph_value)
    ratio = mg_s / ph_s
    verdict = "met" if agreement <= 1e-2 else "MISSED"
    print(f"agreement medgcsam vs PyHessian: {agreement:.2e} (target <= 1e-2: {verdict})")
    print(f"time ratio medgcsam / PyHessian: {ratio:.3f} (target <= 0.333: {'met' if ratio <= 1 / 3 else 'MISSED'})")
    print(f"all wall times (s): PyHessian {[round(r[2], 2) for r in ph_runs]}, "
          f"medgcsam {[round(r[2], 2) for r in mg_runs]}")


if __name__ == "__main__":
    main()
