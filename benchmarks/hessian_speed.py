"""Top Hessian eigenvalue: medgcsam (Lanczos, residual-certified) against PyHessian 0.1 (power iteration).

Same timm resnet18 (eval mode), same batch, same mean cross-entropy, in two states: random init and
trained (Adam on BUSI at the benchmark's size when ``../shared/data/busi`` exists, else on synthetic
images). Both use a single retained first-order graph (PyHessian's single-batch mode; medgcsam's
"rev" HVP with one batch), so a product costs the same and the difference is how many are needed.
medgcsam starts Lanczos from the loss gradient (the product's default) and stops on a certified
relative residual: 1e-3 (the default) and 1e-2 (matched to the 1% target). The reference all are
compared with is a tight Lanczos run (residual 1e-9, random start) on a float64 copy of the model and
batch, so it does not share float32 rounding with any of the timed runs.

Target: agreement within 1% at no more than a third of PyHessian's wall time.

Run from the repository root: ``PYTHONPATH=. python benchmarks/hessian_speed.py [--batch 32] [--size 64]
[--device cpu|cuda] [--threads 1] [--repeats 2] [--train-epochs 4]``.
pyhessian==0.1 (MIT) is pip-installed into the current environment on first run; nothing else uses it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

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


def run_medgcsam(model, x, y, device: str, tol: float, steps: int,
                 gradient_start: bool = True) -> tuple[float, int, float, float]:
    _sync(device)
    start = time.perf_counter()
    op = HessianOperator(model, [(x, y)], F.cross_entropy)
    direction = op.gradient() if gradient_start else None
    eig = lanczos_top_eigs(op, op.dim, 1, max_steps=steps, tol=tol, seed=0, dtype=op.dtype, device=op.device,
                           start=direction)
    _sync(device)
    return eig.values[0], eig.hvps, time.perf_counter() - start, eig.residuals[0]


def training_batches(size: int, classes: int, n_batches: int, batch: int) -> tuple[str, list]:
    """BUSI at ``size`` px when the shared copy exists (normalized, no augmentation), else synthetic images
    whose class shifts the mean, so the benchmark runs anywhere."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"
    g = torch.Generator().manual_seed(2)
    if root.is_dir():
        from medgcsam.data.builders import build_manifest
        from medgcsam.data.datasets import ManifestDataset
        from medgcsam.data.manifest import included
        from medgcsam.models.factory import InputSpec

        frame = included(build_manifest("busi", root, hash_files=False).frame)
        ds = ManifestDataset(frame, root, sorted(frame["label"].unique()),
                             InputSpec(size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), cache="memory")
        ds.warm_cache(2)
        order = torch.randperm(len(ds), generator=g)
        chunks = [order[i:i + batch].tolist() for i in range(0, len(ds) - batch + 1, batch)]
        items = [ds.__getitems__(c).batch for c in chunks[:n_batches]]
        return f"BUSI ({len(ds)} images)", [(b["image"], b["label"]) for b in items]
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append((torch.randn(batch, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float() * 0.5, y))
    return "synthetic images", out


def train(model, batches, epochs: int, device: str) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compare(label: str, model, x, y, args) -> None:
    model64 = copy.deepcopy(model).double()
    reference, ref_hvps, ref_s, ref_res = run_medgcsam(model64, x.double(), y, args.device, tol=1e-9, steps=80,
                                                       gradient_start=False)
    del model64
    print(f"\n[{label}] reference (float64 copy, Lanczos, random start, residual 1e-9): {reference:.6f}, residual "
          f"{ref_res:.2e}, {ref_hvps} HVPs, {ref_s:.0f} s")
    runs: dict[str, list] = {"PyHessian 0.1 power (tol 1e-3)": [], "medgcsam Lanczos (residual 1e-3)": [],
                             "medgcsam Lanczos (residual 1e-2)": []}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        runs["PyHessian 0.1 power (tol 1e-3)"].append(run_pyhessian(model, x, y, args.device))
        runs["medgcsam Lanczos (residual 1e-3)"].append(run_medgcsam(model, x, y, args.device, 1e-3, 40)[:3])
        runs["medgcsam Lanczos (residual 1e-2)"].append(run_medgcsam(model, x, y, args.device, 1e-2, 40)[:3])
    best = {name: min(r, key=lambda t: t[2]) for name, r in runs.items()}
    ph_value, _, ph_s = best["PyHessian 0.1 power (tol 1e-3)"]
    print(f"{'method':<36}{'top eigenvalue':>16}{'rel. err':>11}{'HVPs':>7}{'wall s':>9}{'vs PyH':>8}")
    for name, (value, hvps, secs) in best.items():
        err = abs(value - reference) / abs(reference)
        print(f"{name:<36}{value:>16.6f}{err:>11.2e}{hvps:>7d}{secs:>9.2f}{secs / ph_s:>8.3f}")
    value, _, secs = best["medgcsam Lanczos (residual 1e-2)"]
    agreement, ratio = abs(value - ph_value) / abs(ph_value), secs / ph_s
    print(f"[{label}] residual 1e-2 vs PyHessian: agreement {agreement:.2e} (target <= 1e-2: "
          f"{'met' if agreement <= 1e-2 else 'MISSED'}), time ratio {ratio:.3f} (target <= 0.333: "
          f"{'met' if ratio <= 1 / 3 else 'MISSED'})")
    print(f"[{label}] all wall times (s): " + "; ".join(f"{n}: {[round(r[2], 2) for r in v]}" for n, v in runs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machines: keep small)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method; the fastest counts")
    parser.add_argument("--train-epochs", type=int, default=4, help="Adam epochs for the trained case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    license_text = ensure_pyhessian()

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=args.classes).to(args.device).eval()
    source, batches = training_batches(args.size, args.classes, 24, args.batch)
    x, y = (t.to(args.device) for t in batches[0])  # the Hessian batch, also seen in training
    n_params = sum(p.numel() for p in model.parameters())
    print(f"resnet18 ({n_params:,} parameters), batch {args.batch} x 3 x {args.size} x {args.size} from {source}, "
          f"device {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"pyhessian {importlib.metadata.version('pyhessian')} (license: {license_text})")
    compare("random init", model, x, y, args)
    start = time.perf_counter()
    loss = train(model, batches, args.train_epochs, args.device)
    print(f"\ntrained: {args.train_epochs} Adam epochs over {len(batches)} batches, last loss {loss:.3f}, "
          f"{time.perf_counter() - start:.0f} s")
    compare("trained", model, x, y, args)


if __name__ == "__main__":
    main()
