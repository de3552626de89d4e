"""Aggregation and the report, from cells recorded in a real sqlite MLflow store (no training).

This is the path of cells trained elsewhere: their child runs exist under the parent with their
metrics, and the experiment only collects them.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric

from medgcsam.experiments import Experiment, grid_cells, mcnemar_exact, summarize
from medgcsam.experiments.report import (
    _fmt,
    collect,
    matched,
    max_concurrent,
    paired_table,
    summary_table,
    write_report,
)
from medgcsam.experiments.runner import TAG_CELL, TIME_PER_EPOCH

ACC = {"adam": [0.70, 0.72, 0.71], "sam": [0.74, 0.73, 0.76], "gcsam": [0.75, 0.77, 0.74]}
EPOCH_S = {"adam": [1.0, 1.1, 0.9], "sam": [2.0, 2.2, 1.8], "gcsam": [2.1, 2.3, 1.9]}
LABELS = np.array(["benign", "malignant"] * 10)


def predictions(method: str, seed: int) -> pd.DataFrame:
    """Test predictions whose correctness pattern differs by method (deterministic)."""
    rng = np.random.default_rng({"adam": 1, "sam": 2, "gcsam": 3}[method] * 10 + seed)
    correct = rng.random(LABELS.size) < ACC[method][seed]
    pred = np.where(correct, LABELS, np.where(LABELS == "benign", "malignant", "benign"))
    return pd.DataFrame({"row": range(LABELS.size), "path": [f"img{i:02d}.png" for i in range(LABELS.size)],
                         "label": LABELS, "argmax_label": pred})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One store for the module: 3 methods x 3 seeds, gcsam seed 2 left RUNNING."""
    tmp_path = tmp_path_factory.mktemp("agg")
    base = {"name": "agg", "output_dir": str(tmp_path / "out"), "data": {"manifest": "m.csv"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(
        {"name": "agg", "base": "base.yaml", "methods": ["adam", "sam", "gcsam"], "seeds": [0, 1, 2]}))
    ex = Experiment(tmp_path / "exp.yaml")
    for cell in grid_cells(ex.config):
        log_cell(ex, cell, tmp_path, finish=not (cell.method == "gcsam" and cell.seed == 2))
    return ex


def log_cell(ex: Experiment, cell, tmp_path, *, finish: bool = True) -> str:
    """A child run with what the engine and evaluation log, then recorded as the cell's result."""
    client, i = ex.client, cell.seed
    run_id = client.create_run(ex.experiment_id(), run_name=cell.name,
                               tags={"mlflow.parentRunId": ex.parent_run_id()}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("test/accuracy", ACC[cell.method][i], now, 0),
               Metric("test/auroc_macro", ACC[cell.method][i] + 0.1, now, 0)]
    metrics += [Metric("train/grad_norm", 1.0 / step + i, now, step) for step in range(1, 7)]  # 2 epochs x 3 steps
    metrics += [Metric("epoch_time_s", EPOCH_S[cell.method][i], now, epoch) for epoch in (1, 2)]
    client.log_batch(run_id, metrics=metrics)
    (tmp_path / cell.id).mkdir()
    path = tmp_path / cell.id / "predictions_test.csv"
    predictions(cell.method, i).to_csv(path, index=False)
    client.log_artifact(run_id, str(path), "evaluation")
    if not finish:
        client.set_tag(run_id, TAG_CELL, cell.id)  # tagged but still RUNNING: not finished
        return run_id
    client.set_terminated(run_id, "FINISHED")
    ex.record_cell(run_id, cell, {TIME_PER_EPOCH: EPOCH_S[cell.method][i]})
    return run_id


def test_collect_and_summaries(recorded):
    ex = recorded
    finished = ex.finished_runs()
    assert len(finished) == 8  # the RUNNING gcsam seed-2 cell does not count
    df = collect(ex.config, finished, {c.id for c in ex.plan(finished)})
    summ = summary_table(df, ex.config).set_index("group")
    for method in ("adam", "sam"):
        got = summ.loc[method, "test accuracy"]
        assert got == summarize(ACC[method])
    assert summ.loc["gcsam", "n seeds"] == 2
    assert summ.loc["gcsam", "test accuracy"] == summarize(ACC["gcsam"][:2])
    rel = summ.loc["sam", "time per epoch vs reference"]
    assert rel.mean == pytest.approx(2.0) and rel.sd == pytest.approx(0.0, abs=1e-12)
    assert summ.loc["adam", "time per epoch vs reference"].mean == pytest.approx(1.0)
    assert summ.loc["adam", "test balanced accuracy"].n == 0  # never logged: n/a, not 0


def test_paired_comparisons_match_seeds(recorded):
    ex = recorded
    df = ex.report_source(ex.finished_runs()).cells
    paired = paired_table(df, ex.config, None).set_index(["group", "baseline"])
    row = paired.loc[("sam", "adam")]
    diffs = np.subtract(ACC["sam"], ACC["adam"])
    assert row["n pairs"] == 3 and row["mean diff"] == pytest.approx(diffs.mean())
    assert row["p (sign-flip, exact)"] == pytest.approx(0.25) and row["wins/losses"] == "3/0"
    assert paired.loc[("gcsam", "sam"), "n pairs"] == 2  # only the seeds both finished
    assert ("sam", "sam") not in paired.index


def test_report_written_and_logged(recorded):
    ex = recorded
    path = write_report(ex.report_source(ex.finished_runs()))
    text = path.read_text()
    assert "cells finished: 8 of 9 planned" in text
    s = summarize(ACC["sam"])
    assert f"{s.mean:.4g} ± {s.sd:.2g} [{s.low:.4g}, {s.high:.4g}]" in text
    b, c, p = mcnemar_exact(*(predictions(m, 0).pipe(lambda t: (t.label == t.argmax_label).to_numpy())
                              for m in ("sam", "adam")))
    assert f"s0: {b}/{c} p={p:.3g}" in text
    assert "Not logged by any cell (left out): test balanced accuracy, test ECE, top Hessian eigenvalue" in text
    for png in ("grad_norm_per_step.png", "grad_norm_per_epoch.png"):
        assert (path.parent / png).stat().st_size > 1000
        assert f"({png})" in text
    logged = {a.path for a in ex.client.list_artifacts(ex.parent_run_id(), "report")}
    assert {"report/report.md", "report/cells.csv", "report/grad_norm_per_step.png"} <= logged
    cells = pd.read_csv(path.parent / "cells.csv")
    assert len(cells) == 8 and json.loads(cells.axis_values[0]) == {}
    assert "Timing caveat" not in text  # the cells were recorded one after another


def test_max_concurrent_counts_overlapping_runs():
    df = pd.DataFrame({"start_ms": [0, 10, 20, 35, 100], "end_ms": [30, 40, 35, 50, None]})
    assert max_concurrent(df) == 3  # 20-30: the first three; the fourth starts as the third ends
    assert max_concurrent(df.iloc[[0, 3]]) == 1


def test_report_flags_cells_that_shared_the_machine(tmp_path):
    """Two cells whose runs overlap (as with --workers 2): the report says its time columns are not ratios."""
    base = {"name": "shared", "output_dir": str(tmp_path / "out"), "data": {"manifest": "m.csv"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(
        {"name": "shared", "base": "base.yaml", "methods": ["adam", "sam"], "seeds": [0]}))
    ex = Experiment(tmp_path / "exp.yaml")
    first, second = (log_cell(ex, cell, tmp_path) for cell in grid_cells(ex.config))
    later = ex.client.get_run(second).info.end_time + 1000
    ex.client.set_terminated(first, "FINISHED", end_time=later)  # the first cell was still running
    text = write_report(ex.report_source(ex.finished_runs())).read_text()
    assert "**Timing caveat:** up to 2 of these cells were running at the same time" in text


def test_stale_cells_and_other_test_images_are_not_compared(tmp_path):
    """A finished cell whose definition left the plan is not an extra seed; runs scored on different test images
    get no McNemar test (the report says so instead of pairing images by position)."""
    base = {"name": "stale", "output_dir": str(tmp_path / "out"), "data": {"manifest": "m.csv"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(
        {"name": "stale", "base": "base.yaml", "methods": ["adam", "sam"], "seeds": [0, 1]}))
    ex = Experiment(tmp_path / "exp.yaml")
    cells = grid_cells(ex.config)
    runs = {(c.method, c.seed): log_cell(ex, c, tmp_path) for c in cells}
    old = dataclasses.replace(cells[0], settings={**cells[0].settings, "optimizer.lr": 0.5})
    ex.client.log_metric(log_cell(ex, old, tmp_path), "test/accuracy", 0.1, step=1)
    renamed = predictions("sam", 1).assign(path=lambda t: t.path.str.replace("img00", "other00"))
    path = tmp_path / "renamed" / "predictions_test.csv"
    path.parent.mkdir()
    renamed.to_csv(path, index=False)
    ex.client.log_artifact(runs[("sam", 1)], str(path), "evaluation")

    finished = ex.finished_runs()
    assert len(finished) == 5
    df = collect(ex.config, finished, {c.id for c in ex.plan(finished)})
    assert sorted(zip(df.method, df.seed, strict=True)) == [("adam", 0), ("adam", 1), ("sam", 0), ("sam", 1)]
    summ = summary_table(df, ex.config).set_index("group")
    assert summ.loc["adam", "test accuracy"] == summarize(ACC["adam"][:2])
    text = write_report(ex.report_source(finished)).read_text()
    assert "s1: not the same test images (20 vs 20)" in text and "s0: " in text


def test_ambiguous_baselines_are_refused_and_short_summaries_show_n():
    df = pd.DataFrame({"method": ["sam", "sam", "gcsam"], "seed": [0, 0, 0], "acc": [0.7, 0.8, 0.75],
                       "axis_values": ['{"optimizer.rho": 0.01}', '{"optimizer.rho": 0.1}', "{}"]})
    with pytest.raises(ValueError, match="would pick one arbitrarily"):
        matched(df, "{}", [0], "sam", "acc")
    assert matched(df, '{"optimizer.rho": 0.1}', [0], "sam", "acc") == [0.8]
    assert _fmt(summarize([0.7, 0.8]), 3).endswith("(n=2)")
    assert "(n=" not in _fmt(summarize([0.7, 0.8, 0.9]), 3)
