"""What a time-limited ``medgcsam experiment`` left in its MLflow store (GPU check sections (e) and the recipe hook).

    python benchmarks/gpu_experiment_report.py EXPERIMENT.yaml --tracking-uri sqlite:////tmp/e.db --wall 300

Prints cells finished / planned and the wall time, each cell's peak GPU memory (``gpu/peak_memory_mb``, logged by
the trainer per epoch and after the sharpness stage; the maximum over its history), the sizing rule applied to the
largest peak, and per method the mean test accuracy, balanced accuracy and top Hessian eigenvalue of finished cells.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from medgcsam.experiments.runner import Experiment

PEAK = "gpu/peak_memory_mb"
COLUMNS = (("test/accuracy", "test acc"), ("test/balanced_accuracy", "test bal acc"), ("hessian_top_eig", "top eig"))


def cells_per_gpu(free_mb: float, peak_mb: float, context_mb: float = 1024.0, headroom: float = 0.85) -> int:
    """The sizing rule of docs/gpu.md: cells per GPU = headroom x free memory / (measured peak + CUDA context)."""
    return max(1, int(headroom * free_mb // (peak_mb + context_mb)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment")
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--wall", type=float, default=float("nan"), help="seconds the experiment ran")
    ap.add_argument("--free-mb", type=float, default=None, help="free GPU memory before the run (sizing rule)")
    args = ap.parse_args()
    runner = Experiment(args.experiment, tracking_uri=args.tracking_uri)
    name = runner.config.name
    parent = runner.parent_run_id(create=False)
    if parent is None:
        print(f"{name}: no parent run in {args.tracking_uri} (the experiment did not start)")
        return
    finished, planned = runner.finished_runs(), runner.plan()
    print(f"{name}: {len(finished)}/{len(planned)} cells finished in {args.wall:.0f} s")
    runs = runner.client.search_runs([runner.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'",
                                     max_results=1000)
    peaks = {}
    for run in runs:
        history = runner.client.get_metric_history(run.info.run_id, PEAK)
        if history:
            peaks[run.info.run_name or run.info.run_id] = (max(m.value for m in history), run.info.status)
    for label, (peak, status) in sorted(peaks.items()):
        print(f"  peak GPU memory {peak:8.0f} MiB  {status:<8} {label}")
    if peaks and args.free_mb:
        top = max(p for p, _ in peaks.values())
        print(f"  sizing rule: 0.85 x {args.free_mb:.0f} MiB free / ({top:.0f} MiB peak + 1024 MiB context) = "
              f"{cells_per_gpu(args.free_mb, top)} cells per GPU")
    by_method: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell_id, run in finished.items():
        method = next((c.method for c in planned if c.id == cell_id), "?")
        for key, _ in COLUMNS:
            if key in run.data.metrics:
                by_method[method][key].append(run.data.metrics[key])
    if by_method:
        print(f"  {'method':<10} {'n':>2} " + " ".join(f"{title:>13}" for _, title in COLUMNS))
        for method, values in sorted(by_method.items()):
            n = max((len(v) for v in values.values()), default=0)
            cells = [f"{statistics.fmean(values[k]):13.4f}" if values.get(k) else f"{'-':>13}" for k, _ in COLUMNS]
            print(f"  {method:<10} {n:>2} " + " ".join(cells))
        for method, values in sorted(by_method.items()):  # per seed, for paired intervals later
            for key, title in COLUMNS:
                print(f"  {method:<10} {title:<13} per cell: " + ", ".join(f"{v:.4f}" for v in values.get(key, [])))


if __name__ == "__main__":
    main()
