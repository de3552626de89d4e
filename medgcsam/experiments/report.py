"""The experiment report: per-cell values collected from MLflow, seed statistics, paired tests, figures.

Everything is read back from the tracking store (not from the process that trained), so a report
can be rebuilt at any time from finished cells, including cells trained on other machines.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from medgcsam.tracking.figures import save_png  # noqa: E402

from .config import ExperimentConfig  # noqa: E402
from .records import TAG_CELL_INFO, TIME_PER_EPOCH, TIME_TO_BEST  # noqa: E402
from .selection import CandidateResult  # noqa: E402
from .stats import mcnemar_exact, paired_comparison, summarize  # noqa: E402


@dataclass
class ReportSource:
    """What the report reads: the results table of the planned cells (``collect``), the CV selection, and the
    store holding the cells' curves and artifacts, whose parent run the report is logged to."""

    config: ExperimentConfig
    cells: pd.DataFrame
    selection: dict[str, list[CandidateResult]] | None
    client: MlflowClient
    parent_run_id: str
    output_dir: Path
    experiment_file: str
    overrides: list[str]
    tracking_uri: str
    finished: int
    planned: int

TIME_LABELS = {"time per epoch vs reference": "cell/time_per_epoch_s", "time to best val (s)": "cell/time_to_best_s"}


def collect(cfg: ExperimentConfig, finished: dict[str, Run], planned: set[str]) -> pd.DataFrame:
    """One row per finished cell of the reported stage (grid, or final after selection) among the ``planned``
    cell ids: a cell whose definition changed since (another value, a newly chosen candidate) keeps its finished
    run in the store, and must not count as an extra seed."""
    stage = "final" if cfg.selection is not None else "grid"
    rows = []
    for cell_id, run in finished.items():
        info = json.loads(run.data.tags.get(TAG_CELL_INFO, "{}"))
        if info.get("stage") != stage or cell_id not in planned:
            continue
        row: dict[str, Any] = {"cell_id": cell_id, "run_id": run.info.run_id, "method": info["method"],
                               "axis_values": json.dumps(info.get("axes", {}), sort_keys=True), "seed": info["seed"],
                               "group": group_label(info["method"], info.get("axes", {}))}
        for label, key in cfg.report.metrics.items():
            row[label] = run.data.metrics.get(key, math.nan)
        row["time_per_epoch"] = run.data.metrics.get(TIME_PER_EPOCH, math.nan)
        row["time_to_best"] = run.data.metrics.get(TIME_TO_BEST, math.nan)
        row["start_ms"], row["end_ms"] = run.info.start_time, run.info.end_time
        rows.append(row)
    columns = ["cell_id", "run_id", "method", "axis_values", "seed", "group", *cfg.report.metrics,
               "time_per_epoch", "time_to_best", "start_ms", "end_ms"]
    return pd.DataFrame(rows, columns=columns)


def max_concurrent(df: pd.DataFrame) -> int:
    """Most cells whose runs were open at the same moment (MLflow start/end times).

    Above 1, the time columns compare cells that shared the machine (workers, or a resumed cell whose
    run spans other cells' runs), so they are not the optimizers' step-time ratios."""
    events = sorted([(int(t), 1) for t in df.start_ms.dropna()] + [(int(t), -1) for t in df.end_ms.dropna()])
    running = peak = 0
    for _, delta in events:  # at equal times an end (-1) sorts before a start: touching runs do not overlap
        running += delta
        peak = max(peak, running)
    return peak


def group_label(method: str, axes: dict[str, Any]) -> str:
    return " ".join([method, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in axes.items())])


def _compatible(a: str, b: str) -> bool:
    """Two cells are comparable when they agree on every grid axis both have (e.g. the same backbone)."""
    da, db = json.loads(a), json.loads(b)
    return all(da[k] == db[k] for k in set(da) & set(db))


def matched(df: pd.DataFrame, row_axes: str, seeds: list[int], method: str, column: str) -> list[Any]:
    """``column`` of ``method`` for each seed in ``seeds``, on cells compatible with ``row_axes`` (None if none)."""
    ref = df[(df.method == method) & df.axis_values.map(lambda a: _compatible(a, row_axes))]
    out = []
    for s in seeds:
        hit = ref[ref.seed == s]
        if len(hit) > 1:
            raise ValueError(f"{len(hit)} cells of {method} (axes {sorted(hit.axis_values)}) match seed {s} of the "
                             f"cells with axes {row_axes}; a comparison against {method} would pick one arbitrarily. "
                             f"Give {method} the same grid axes, or compare against a method that has them "
                             f"(report.baselines, report.time_reference)")
        out.append(hit[column].iloc[0] if len(hit) else None)
    return out


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values])


def summary_table(df: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Per method x axes: every metric as mean, SD and t-interval over seeds, plus relative time per epoch."""
    rows = []
    conf = cfg.report.confidence
    ref = cfg.report.time_reference
    for (group, axes), g in df.groupby(["group", "axis_values"], sort=False):
        row: dict[str, Any] = {"group": group, "method": g.method.iloc[0], "axes": axes, "n seeds": len(g)}
        for label in cfg.report.metrics:
            row[label] = summarize(g[label].to_numpy(), conf)
        seeds = g.seed.tolist()
        if ref in set(df.method):
            base = _floats(matched(df, axes, seeds, ref, "time_per_epoch"))
            row["time per epoch vs reference"] = summarize(g.time_per_epoch.to_numpy() / base, conf)
        row["time to best val (s)"] = summarize(g.time_to_best.to_numpy(), conf)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(df: pd.DataFrame, cfg: ExperimentConfig, predictions: dict[str, pd.Series] | None) -> pd.DataFrame:
    """Each method group minus each baseline on the primary metric, over matched seeds (+ McNemar per seed)."""
    primary, conf = cfg.report.primary, cfg.report.confidence
    rows = []
    for baseline in cfg.report.baselines:
        if baseline not in set(df.method):
            continue
        for (group, axes), g in df.groupby(["group", "axis_values"], sort=False):
            method = g.method.iloc[0]
            bases = cfg.report.baselines
            if method == baseline or (method in bases and bases.index(method) > bases.index(baseline)):
                continue  # itself, or the mirror of a pair already listed (adam vs sam = -(sam vs adam))
            seeds = sorted(g.seed.tolist())
            mine = [float(g[g.seed == s][primary].iloc[0]) for s in seeds]
            theirs = _floats(matched(df, axes, seeds, baseline, primary))
            p = paired_comparison(mine, theirs, conf)
            row = {"group": group, "baseline": baseline, "n pairs": p.n, "mean diff": p.mean_diff,
                   "low": p.low, "high": p.high, "p (sign-flip, exact)": p.p_sign_flip,
                   "wins/losses": f"{p.wins}/{p.losses}", "McNemar per seed": ""}
            if predictions:
                row["McNemar per seed"] = _mcnemar_cell(df, g, axes, seeds, baseline, predictions)
            rows.append(row)
    return pd.DataFrame(rows)


def _mcnemar_cell(df: pd.DataFrame, g: pd.DataFrame, axes: str, seeds: list[int], baseline: str,
                  predictions: dict[str, pd.Series]) -> str:
    parts = []
    for s, rb in zip(seeds, matched(df, axes, seeds, baseline, "run_id"), strict=True):
        ra = g[g.seed == s].run_id.iloc[0]
        if rb is None or ra not in predictions or rb not in predictions:
            continue
        mine, theirs = predictions[ra], predictions[rb]
        if set(mine.index) != set(theirs.index):  # paired by image identity, never by position
            parts.append(f"s{s}: not the same test images ({len(mine)} vs {len(theirs)})")
            continue
        b, c, p = mcnemar_exact(mine.to_numpy(), theirs.reindex(mine.index).to_numpy())
        parts.append(f"s{s}: {b}/{c} p={p:.3g}")
    return "; ".join(parts)


def load_predictions(src: ReportSource, df: pd.DataFrame) -> dict[str, pd.Series]:
    """Per-run boolean correctness on the test images, indexed by image id (path, else row number)."""
    artifact = src.config.report.predictions_artifact
    if not artifact:
        return {}
    out: dict[str, pd.Series] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in df.run_id:
            try:
                local = src.client.download_artifacts(run_id, artifact, tmp)
            except Exception:  # the run logged no predictions: McNemar is skipped for it
                continue
            table = pd.read_csv(local)
            image = "path" if "path" in table.columns else "row"
            # accuracy is the argmax's: `argmax_label`, named `predicted` by runs before the `decision` column
            predicted = "argmax_label" if "argmax_label" in table.columns else "predicted"
            missing = {image, "label", predicted} - set(table.columns)
            if missing:
                raise ValueError(f"run {run_id} artifact {artifact}: columns {sorted(missing)} missing "
                                 f"(has {list(table.columns)}); set report.predictions_artifact to a per-image "
                                 f"table with path (or row), label, argmax_label")
            out[run_id] = pd.Series((table.label.astype(str) == table[predicted].astype(str)).to_numpy(),
                                    index=table[image].astype(str).to_numpy())
    return out


def _fmt(x: Any, expected_n: int | None = None) -> str:
    """A Summary as mean ± SD [interval]; its n is shown whenever it is below the row's number of seeds."""
    if hasattr(x, "mean") and hasattr(x, "n"):
        if x.n == 0:
            return "n/a"
        if x.n == 1 or math.isnan(x.sd):
            return f"{x.mean:.4g} (n=1)"
        short = f" (n={x.n})" if expected_n is not None and x.n < expected_n else ""
        return f"{x.mean:.4g} ± {x.sd:.2g} [{x.low:.4g}, {x.high:.4g}]{short}"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def markdown_table(df: pd.DataFrame, columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c], r.get("n seeds")) for c in columns) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


def selection_markdown(cfg: ExperimentConfig, table: dict[str, list[CandidateResult]]) -> str:
    """The CV table behind every choice."""
    sel = cfg.selection
    assert sel is not None
    lines = [f"## Cross-validated selection ({sel.folds}-fold x seeds {sel.seeds}, metric `{sel.metric}`, {sel.mode})",
             "", "Rule: the first candidate in simplicity order whose mean is within one pooled SD of the best "
             "(simplicity: passes per step, settings changed from the preset, distance from the preset, listed order).",
             ""]
    for label, rows in table.items():
        lines += [f"### {label}", "", "| candidate | settings | mean | SD | gap to best | pooled SD | within 1 SD | "
                  "simplicity key | chosen |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.index} | `{json.dumps(r.settings)}` | {r.mean:.4g} | {_fmt(r.sd)} | "
                         f"{r.gap_to_best:.4g} | {_fmt(r.pooled_sd_with_best)} | {r.within_one_sd} | {r.key} | "
                         f"{'**yes**' if r.chosen else ''} |")
        lines.append("")
    return "\n".join(lines)


# ---- figures -----------------------------------------------------------------------------------

def rho_figure(df: pd.DataFrame, cfg: ExperimentConfig, out: Path) -> Path | None:
    """Primary metric against rho per method (mean and t-interval); methods without rho as horizontal lines."""
    rho_keys = [k for k in cfg.grid if k.rsplit(".", 1)[-1] == "rho"]
    if not rho_keys or df.empty:
        return None
    key, primary = rho_keys[0], cfg.report.primary
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, g in df.groupby("method", sort=False):
        rhos = g.axis_values.map(lambda a: json.loads(a).get(key))
        if rhos.isna().all():
            s = summarize(g[primary].to_numpy(), cfg.report.confidence)
            ax.axhline(s.mean, linestyle="--", linewidth=1, label=f"{method} (no rho)", color=f"C{len(ax.lines)}")
            continue
        xs = sorted(set(rhos.dropna()))
        stats = [summarize(g[rhos == x][primary].to_numpy(), cfg.report.confidence) for x in xs]
        means = np.array([s.mean for s in stats])
        err = np.array([[s.mean - s.low, s.high - s.mean] for s in stats]).T
        ax.errorbar(xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("rho")
    ax.set_ylabel(primary)
    ax.set_title(f"rho sensitivity (mean and {cfg.report.confidence:.0%} t-interval over seeds)")
    ax.legend(fontsize=8)
    return save_png(fig, out / "rho_sensitivity.png")


def grad_norm_figures(src: ReportSource, df: pd.DataFrame, out: Path) -> list[Path]:
    """Gradient-norm traces per step (first seed) and per epoch (mean of the epoch's steps, mean over seeds)."""
    key = src.config.report.grad_norm_key
    traces: dict[str, list[tuple[np.ndarray, int]]] = {}
    for group, g in df.groupby("group", sort=False):
        for run_id in g.sort_values("seed").run_id:
            hist = sorted((m.step, m.value) for m in src.client.get_metric_history(run_id, key))
            if hist:
                epochs = len(src.client.get_metric_history(run_id, "epoch_time_s")) or 1
                traces.setdefault(group, []).append((np.array(hist, dtype=float), epochs))
    if not traces:
        return []
    step_fig, step_ax = plt.subplots(figsize=(7, 4))
    epoch_fig, epoch_ax = plt.subplots(figsize=(7, 4))
    for group, runs in traces.items():
        first = runs[0][0]
        step_ax.plot(first[:, 0], first[:, 1], linewidth=0.7, label=group)
        per_epoch = [_epoch_means(trace, epochs) for trace, epochs in runs]
        n = min(len(p) for p in per_epoch)
        epoch_ax.plot(np.arange(1, n + 1), np.mean([p[:n] for p in per_epoch], axis=0), marker="o", label=group)
    paths = []
    for fig, ax, xlabel, name in ((step_fig, step_ax, "step (first seed)", "grad_norm_per_step.png"),
                                  (epoch_fig, epoch_ax, "epoch (mean over seeds)", "grad_norm_per_epoch.png")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{key} (first-pass L2 norm)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        paths.append(save_png(fig, out / name))
    return paths


def _epoch_means(trace: np.ndarray, epochs: int) -> np.ndarray:
    """Mean per epoch of a (step, value) trace whose steps are 1..epochs*steps_per_epoch."""
    per_epoch = max(1, int(np.ceil(trace[:, 0].max() / epochs)))
    index = ((trace[:, 0] - 1) // per_epoch).astype(int)
    return np.array([trace[index == e, 1].mean() for e in range(index.max() + 1)])


def landscape_figure(src: ReportSource, df: pd.DataFrame, out: Path) -> Path | None:
    """1-D loss landscapes (``alphas``, ``loss`` arrays) of the first seed of each group."""
    if src.config.report.landscape_points <= 0 or df.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    with tempfile.TemporaryDirectory() as tmp:
        for group, g in df.groupby("group", sort=False):
            run_id = g.sort_values("seed").run_id.iloc[0]
            try:
                local = src.client.download_artifacts(run_id, src.config.report.landscape_artifact, tmp)
            except Exception:  # no landscape logged for this run
                continue
            with np.load(local) as data:
                ax.plot(data["alphas"], data["loss"], marker=".", label=group)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step along a random filter-normalized direction")
    ax.set_ylabel("training loss (fixed subset)")
    ax.legend(fontsize=7)
    return save_png(fig, out / "loss_landscape.png")


# ---- the report --------------------------------------------------------------------------------

def write_report(src: ReportSource) -> Path:
    """Write report.md, cells.csv and PNGs under <output_dir>/report and log them to the parent run."""
    out = src.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg, df = src.config, src.cells
    df.to_csv(out / "cells.csv", index=False)
    lines = [f"# Experiment `{cfg.name}`", "", cfg.description, "",
             f"- experiment file: `{src.experiment_file}`; overrides: `{src.overrides}`",
             f"- parent MLflow run: `{src.parent_run_id}` in `{src.tracking_uri}`",
             f"- cells finished: {src.finished} of {src.planned} planned"
             f"{' (final fits are planned once the CV is complete)' if cfg.selection else ''}",
             f"- intervals: two-sided {cfg.report.confidence:.0%} t-intervals over seeds (mean ± SD [low, high]); "
             "paired p-values: exact sign-flip permutation over seeds (with 3 seeds the smallest possible is 0.25)",
             ""]
    if src.selection is not None:
        lines += [selection_markdown(cfg, src.selection), ""]
    if df.empty:
        lines += ["No finished cells to report yet."]
    else:
        summ = summary_table(df, cfg)
        missing = [label for label in cfg.report.metrics if df[label].isna().all()]
        cols = ["group", "n seeds", *[m for m in cfg.report.metrics if m not in missing],
                *[c for c in TIME_LABELS if c in summ.columns]]
        lines += ["## Results over seeds", "", markdown_table(summ, cols), ""]
        shared = max_concurrent(df)
        if shared > 1:
            lines += [f"**Timing caveat:** up to {shared} of these cells were running at the same time (their MLflow "
                      "runs overlap), so the time columns compare cells that shared the machine; they are not the "
                      "optimizers' step-time ratios. Measure those with `benchmarks/train_step.py` on an idle "
                      "machine.", ""]
        if missing:
            lines += [f"Not logged by any cell (left out): {', '.join(missing)}.", ""]
        paired = paired_table(df, cfg, load_predictions(src, df))
        if not paired.empty:
            lines += [f"## Paired comparisons on {cfg.report.primary} (method minus baseline, same seeds, same test "
                      "images)", "", markdown_table(paired, list(paired.columns)), "",
                      "McNemar per seed: images only the method gets right / only the baseline gets right, exact "
                      "binomial p.", ""]
        figures = [p for p in (rho_figure(df, cfg, out), *grad_norm_figures(src, df, out),
                               landscape_figure(src, df, out)) if p is not None]
        if figures:
            lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text, encoding="utf-8")
    src.client.log_artifacts(src.parent_run_id, str(out), "report")
    return out / "report.md"
