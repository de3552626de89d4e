"""Orchestration with real training: nested runs, resumption, Ray tasks, the selection protocol.

Each cell is a real `engine.train` call on generated PNGs (timm test_resnet, 32 px, 1 epoch of
2 steps) tracked in a sqlite MLflow store, run as a task of this module's local Ray instance
(test_experiments_ray covers killed workers, concurrent runners and clusters).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medgcsam.config import ConfigError
from medgcsam.experiments import CandidateResult, Experiment, ExperimentError, cv_cells, select, simplicity_key
from medgcsam.experiments.presets import PRESETS
from medgcsam.experiments.runner import TAG_CELL, TAG_SUPERSEDED
from medgcsam.tracking.uri import TrackingError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("local_ray")  # the in-process runners share one local Ray instance


def write_experiment(tmp_path: Path, data_dir: Path, exp: dict, **sections) -> Path:
    base = {
        "name": "tiny", "output_dir": str(tmp_path / "out"),
        "data": {"manifest": str(data_dir / "manifest.csv"), "image_size": 32, "channels": 1, "batch_size": 4,
                 "num_workers": 0, "val_fold": 0, "augment": False},
        "model": {"name": "test_resnet"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "amp": "none", "warmup_epochs": 0},
        "tracking": {"log_model": False},
        "evaluation": {"bootstrap": 0, "positive_class": "malignant"},
        **sections,
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **exp}))
    return path


def children(ex: Experiment) -> list:
    return ex.client.search_runs([ex.experiment_id()], f"tags.`mlflow.parentRunId` = '{ex.parent_run_id()}'")


def test_worker_cell_resume_and_growth(tmp_path, data_dir):
    path = write_experiment(tmp_path, data_dir, {"name": "grid", "methods": ["adam", "gcsam"], "seeds": [0]})
    # one cell trained by a separate `--cell` invocation (its own local Ray instance)
    worker = subprocess.run([sys.executable, "-m", "medgcsam", "experiment", str(path), "--cell", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stderr[-3000:]
    ex = Experiment(path)
    plan = ex.plan()
    assert list(ex.finished_runs()) == [plan[1].id]

    summary = ex.run(workers=2)  # skips that cell; the other one trains as a Ray task
    assert summary.ran == [plan[0].id] and summary.skipped == [plan[1].id] and not summary.pending
    runs = children(ex)
    assert sorted(r.data.tags[TAG_CELL] for r in runs) == sorted(c.id for c in plan)
    assert all(r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics for r in runs)
    assert {r.data.params["optimizer.name"] for r in runs} == {"adam", "gcsam"}
    assert ex.client.get_run(ex.parent_run_id()).info.status == "FINISHED"
    assert not list((ex.output_dir / "cells").rglob("*.pt"))  # finished cells drop their checkpoints
    text = summary.report.read_text()
    assert "| adam | 1 |" in text and "| gcsam | 1 |" in text and "cells finished: 2 of 2" in text

    again = Experiment(path).run()  # resumption: nothing left to train
    assert again.ran == [] and sorted(again.skipped) == sorted(c.id for c in plan)

    grown = Experiment(path, ["methods=[adam, gcsam, gc_adam]"]).run()
    assert len(grown.ran) == 1 and len(grown.skipped) == 2  # only the new method's cell
    assert len(children(ex)) == 3


def test_killed_attempt_is_marked_when_the_cell_finishes(tmp_path, data_dir):
    """A cell whose earlier attempt died mid-run (its child run left RUNNING, its checkpoints gone) trains again
    from scratch; the dead run is then marked KILLED and points at the run that finished the cell."""
    path = write_experiment(tmp_path, data_dir, {"name": "crash", "methods": ["adam"], "seeds": [0]})
    ex = Experiment(path)
    cell = ex.plan()[0]
    dead = ex.client.create_run(ex.experiment_id(), run_name=cell.name,
                                tags={"mlflow.parentRunId": ex.parent_run_id()}).info.run_id
    other = ex.client.create_run(ex.experiment_id(), run_name="grid/other/seed0",
                                 tags={"mlflow.parentRunId": ex.parent_run_id()}).info.run_id
    summary = ex.run()
    done = ex.finished_runs()[cell.id].info.run_id
    assert summary.ran == [cell.id] and done != dead
    stale = ex.client.get_run(dead)
    assert stale.info.status == "KILLED" and stale.data.tags[TAG_SUPERSEDED] == done
    assert ex.client.get_run(other).info.status == "RUNNING"  # another cell's run is not touched
    # a dead attempt left over from before (e.g. a store from an older version): swept by the collecting run
    late = ex.client.create_run(ex.experiment_id(), run_name=cell.name,
                                tags={"mlflow.parentRunId": ex.parent_run_id()}).info.run_id
    assert Experiment(path).run().ran == []
    assert ex.client.get_run(late).info.status == "KILLED" and ex.finished_runs()[cell.id].info.run_id == done


def test_selection_protocol_end_to_end(tmp_path, data_dir):
    sel = {"folds": 2, "seeds": [0], "metric": "val_epoch/balanced_accuracy",
           "candidates": {"gcsam": [{"optimizer.rho": 0.05}, {"optimizer.rho": 0.5}]}}
    sharpness = {"enabled": True, "n_samples": 8, "batch_size": 8, "lanczos_steps": 3, "trace_probes": 1,
                 "density_steps": 2, "tol": 0.1}
    path = write_experiment(tmp_path, data_dir, {"name": "sel", "methods": ["gcsam"], "seeds": [0], "selection": sel,
                                                 "report": {"landscape_points": 3}}, sharpness=sharpness)
    ex = Experiment(path)
    summary = ex.run()
    cv = cv_cells(ex.config)
    finished = ex.finished_runs()
    assert all(c.id in finished for c in cv) and len(summary.ran) == len(cv) + 1
    # the CV never touched the test split
    assert not any(k.startswith("test/") for c in cv for k in finished[c.id].data.metrics)
    assert {finished[c.id].data.params["data.val_fold"] for c in cv} == {"0", "1"}
    # the choice is the rule applied to the logged validation scores
    preset = PRESETS["gcsam"]
    rows = []
    for ci, rho in enumerate((0.05, 0.5)):
        settings = {**preset, "optimizer.rho": rho}
        scores = [ex.cv_score(c, finished[c.id]) for c in cv if c.candidate == ci]
        rows.append(CandidateResult(ci, settings, scores, simplicity_key(settings, preset, ci)))
    assert summary.chosen == {"gcsam": select(rows).index}
    final = [r for r in finished.values() if '"stage": "final"' in r.data.tags["medgcsam.cell"]]
    assert len(final) == 1 and "test/accuracy" in final[0].data.metrics
    assert "hessian_top_eig" in final[0].data.metrics  # sharpness of the final model only, never in CV
    assert not any("hessian_top_eig" in finished[c.id].data.metrics for c in cv)
    assert float(final[0].data.params["optimizer.rho"]) == (0.05, 0.5)[summary.chosen["gcsam"]]
    text = summary.report.read_text()
    assert "Cross-validated selection (2-fold" in text and "**yes**" in text
    assert (ex.output_dir / "report" / "selection.md").is_file()
    assert "top Hessian eigenvalue" in text and (ex.output_dir / "report" / "loss_landscape.png").is_file()


def test_bad_hyperparameter_fails_before_any_run(tmp_path, data_dir):
    path = write_experiment(tmp_path, data_dir, {"name": "bad", "methods": {"sam": {"set": {"optimizer.rhoo": 1}}}})
    ex = Experiment(path)
    with pytest.raises(ConfigError, match="rhoo"):
        ex.run()
    assert ex.parent_run_id(create=False) is None


def test_workers_started_together_share_one_parent(tmp_path, data_dir):
    """Two processes that both found no parent run each create one; both must end up under the first, or the
    cells of the other are invisible to the collecting run (trained again, missing from the report)."""
    path = write_experiment(tmp_path, data_dir, {"name": "race", "methods": ["adam"], "seeds": [0]})
    first, second = Experiment(path), Experiment(path)
    create = second.client.create_run

    def create_after_the_other(*args, **kwargs):  # `second` searched and found nothing; `first` gets in between
        first.parent_run_id()
        return create(*args, **kwargs)

    second.client.create_run = create_after_the_other
    assert second.parent_run_id() == first.parent_run_id()
    parents = first.client.search_runs([first.experiment_id()], "tags.`medgcsam.role` = 'parent'")
    assert [r.info.run_id for r in parents] == [first.parent_run_id()]


def test_a_changed_base_pipeline_makes_finished_cells_stale(tmp_path, data_dir):
    """The cell id covers the cell's own settings only; a run trained on another base pipeline (or other
    experiment overrides) must be trained again, not reported as a result of the new configuration."""
    path = write_experiment(tmp_path, data_dir, {"name": "stale", "methods": ["adam"], "seeds": [0],
                                                 "keep_checkpoints": True})
    ex = Experiment(path)
    old = ex.run()
    cell = ex.plan()[0]
    changed = Experiment(path, ['overrides=["optimizer.lr=0.01"]'])
    new = changed.run()  # the kept checkpoints of the old configuration are not resumed
    assert new.ran == [cell.id] and new.skipped == []
    run = changed.finished_runs()[cell.id]
    assert run.data.params["optimizer.lr"] == "0.01" and "cells finished: 1 of 1" in new.report.read_text()
    assert Experiment(path).finished_runs()[cell.id].info.run_id != run.info.run_id  # the old one is still there
    assert Experiment(path).run().ran == [] and old.ran == [cell.id]
    # what differs between the machines that run one experiment does not make its cells stale
    local = Experiment(path, ['overrides=["data.num_workers=1", "train.device=cpu"]'])
    assert local.base_fingerprint == ex.base_fingerprint


def test_unwritable_output_folder_is_a_tracking_error(tmp_path, data_dir):
    (tmp_path / "file").write_text("")
    path = write_experiment(tmp_path, data_dir, {"name": "nowhere", "methods": ["adam"], "seeds": [0],
                                                 "output_dir": str(tmp_path / "file" / "out")})
    with pytest.raises(TrackingError, match="output_dir or tracking.uri"):
        Experiment(path).run()


def test_a_worker_whose_cell_failed_says_so(tmp_path, data_dir):
    """A cell that raises fails the invocation (exit 1 from the CLI) with its error, also with `--cell`; its
    task is not retried by Ray (the same error would come back)."""
    missing = str(tmp_path / "gone_weights.pth")  # valid config, fails when the cell builds its model
    path = write_experiment(tmp_path, data_dir, {"name": "broken", "seeds": [0],
                                                 "methods": {"adam": {"set": {"model.pretrained_path": missing}}}})
    with pytest.raises(ExperimentError, match="gone_weights.pth"):
        Experiment(path).run(cells=["0"])


def test_a_metric_nan_on_a_fold_is_not_called_a_missing_curve(tmp_path, data_dir):
    """AUROC is NaN (so never logged) on a validation fold without malignant images; the error must say that,
    not only advise a per-epoch curve, which val_epoch/auroc already is."""
    rows = (data_dir / "manifest.csv").read_text().splitlines()
    moved = [r.rsplit(",", 1)[0] + ",0" if ",malignant,train," in r else r for r in rows]
    (data_dir / "one_class_fold.csv").write_text("\n".join(moved) + "\n")
    data = {"manifest": str(data_dir / "one_class_fold.csv"), "image_size": 32, "channels": 1, "batch_size": 4,
            "num_workers": 0, "val_fold": 0, "augment": False}
    sel = {"folds": 2, "seeds": [0], "metric": "val_epoch/auroc"}
    path = write_experiment(tmp_path, data_dir, {"name": "nanfold", "methods": ["adam"], "seeds": [0],
                                                 "selection": sel}, data=data)
    with pytest.raises(ExperimentError, match=r"fold1.*NaN at every epoch.*lacks a class"):
        Experiment(path).run()
