"""Experiment files, grid expansion and cell ids (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medgcsam.config import ConfigError
from medgcsam.experiments import Experiment, cv_cells, final_cells, grid_cells, load_experiment

BASE = {
    "name": "tiny",
    "data": {"manifest": "manifest.csv", "image_size": 32, "batch_size": 4},
    "model": {"name": "test_resnet"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "train": {"epochs": 1},
}


def write(tmp_path: Path, exp: dict, base: dict | None = None) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**(base or BASE), "output_dir": str(tmp_path / "out")}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def sweep(**extra) -> dict:
    return {"name": "sweep", "base": "base.yaml", "methods": ["adam", "sam", "gcsam"],
            "grid": {"optimizer.rho": {"values": [0.01, 0.1, 0.5], "methods": ["sam", "gcsam"]}},
            "seeds": [0, 1], **extra}


def test_grid_expands_axes_only_for_their_methods(tmp_path):
    exp, _ = load_experiment(write(tmp_path, sweep()))
    cells = grid_cells(exp)
    assert len(cells) == 2 + 2 * 3 * 2  # adam x seeds + (sam, gcsam) x rho x seeds
    adam = [c for c in cells if c.method == "adam"]
    assert all("optimizer.rho" not in c.settings and c.axes == {} for c in adam)
    sam_rhos = sorted({c.settings["optimizer.rho"] for c in cells if c.method == "sam"})
    assert sam_rhos == [0.01, 0.1, 0.5]  # the axis value replaces the preset's 0.05
    assert len({c.id for c in cells}) == len(cells)


def test_cell_ids_are_stable_when_the_grid_grows(tmp_path):
    exp, _ = load_experiment(write(tmp_path, sweep()))
    before = {c.name: c.id for c in grid_cells(exp)}
    again, _ = load_experiment(write(tmp_path, sweep()))
    assert {c.name: c.id for c in grid_cells(again)} == before
    grown, _ = load_experiment(write(tmp_path, sweep(seeds=[0, 1, 2], methods=["adam", "sam", "gcsam", "asam"])))
    after = {c.name: c.id for c in grid_cells(grown)}
    assert all(after[name] == cid for name, cid in before.items())
    assert len(after) > len(before)


def test_cell_pipelines_carry_the_overrides(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\n")
    ex = Experiment(write(tmp_path, sweep()))
    cell = next(c for c in grid_cells(ex.config) if c.method == "gcsam" and c.seed == 1)
    cfg = ex.pipeline(cell)
    assert cfg.optimizer.name == "gcsam"
    assert cfg.optimizer.hyperparameters["rho"] == cell.settings["optimizer.rho"]
    assert cfg.train.seed == 1
    assert cfg.tracking.experiment == "sweep" and cfg.tracking.register_as is None
    assert cfg.output_dir.name == cell.id
    assert cfg.data.manifest == (tmp_path / "manifest.csv").resolve()  # relative to the base pipeline file


def test_selection_stages(tmp_path):
    sel = {"name": "sel", "base": "base.yaml", "methods": ["adam", "gcsam"], "seeds": [0, 1, 2],
           "selection": {"folds": 3, "seeds": [0, 1], "final_epochs": 4,
                         "candidates": {"gcsam": [{"optimizer.rho": 0.05}, {"optimizer.rho": 0.2}]}}}
    exp, _ = load_experiment(write(tmp_path, sel))
    cv = cv_cells(exp)
    assert len(cv) == (1 + 2) * 2 * 3  # (adam preset + 2 gcsam candidates) x seeds x folds
    assert {c.fold for c in cv} == {0, 1, 2}
    assert all(c.extra["evaluation.enabled"] is False for c in cv)  # the test split is never scored in CV
    final = final_cells(exp, {"adam": 0, "gcsam": 1})
    assert len(final) == 2 * 3
    gc = [c for c in final if c.method == "gcsam"]
    assert all(c.settings["optimizer.rho"] == 0.2 and c.extra["data.val_fold"] == 0 for c in gc)  # final_val_fold
    assert all(c.extra["train.epochs"] == 4 and c.extra["evaluation.splits"] == ["test"] for c in final)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["adam", "nosuch"]}, "no preset 'nosuch'"),
        ({"grid": {"train.seed": [0, 1]}}, "managed by the experiment"),
        ({"grid": {"optimizer.rho": {"values": [0.1], "methods": ["asam"]}}}, "not in methods"),
        ({"grid": {"optimizer.rho": [0.1, 0.1]}}, "repeats a value"),
        ({"grid": {"optimizer.rho": {"values": [0.1], "methods": []}}}, "grid.optimizer.rho.methods"),
        ({"seeds": [0, 0]}, "repeat a value"),
        ({"pipeline": {"data": {"manifest": "m.csv"}}}, "exactly one of 'base'"),
        ({"report": {"primary": "nope"}}, "report.primary"),
        ({"selection": {"candidates": {"sam": [{"optimizer.rho": 0.2}]}}}, "either swept"),
        ({"grid": {}, "selection": {"candidates": {"sam": []}}}, "candidates of 'sam' is empty"),
        ({"selection": {"folds": 3, "final_val_fold": 3}}, "final_val_fold 3 is not one of the 3 folds"),
        ({"selection": {"metric": "val/balanced_accuracy"}}, "'val_epoch/balanced_accuracy'"),
    ],
)
def test_invalid_experiments_name_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, {**sweep(), **change}))


def test_missing_base_and_bad_cell_pipeline(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**sweep(), "base": "elsewhere.yaml"}))
    with pytest.raises(ConfigError, match="elsewhere.yaml does not exist"):
        load_experiment(path)
    bad = write(tmp_path, {**sweep(), "overrides": ["train.epochs=0"]})
    with pytest.raises(ConfigError, match="train.epochs"):
        Experiment(bad).validate()
    misspelt = write(tmp_path, {**sweep(), "grid": {"model.name": ["test_resnet", "tset_vit"]}})
    with pytest.raises(ConfigError, match="unknown backbone 'tset_vit'"):  # before any cell trains, not at its turn
        Experiment(misspelt).validate()


def test_experiment_overrides_from_the_command_line(tmp_path):
    exp, _ = load_experiment(write(tmp_path, sweep()), ["seeds=[7]"])
    assert {c.seed for c in grid_cells(exp)} == {7}


def test_selection_per_backbone(tmp_path):
    sel = {"name": "sel", "base": "base.yaml", "methods": ["adam", "sam"], "seeds": [0],
           "grid": {"model.name": ["test_resnet", "test_vit"]},
           "selection": {"folds": 2, "seeds": [0], "candidates": {"sam": [{}, {"optimizer.rho": 0.1}]}}}
    exp, _ = load_experiment(write(tmp_path, sel))
    cv = cv_cells(exp)
    assert len(cv) == 2 * (1 + 2) * 2  # backbones x (adam + 2 sam candidates) x folds
    chosen = {"adam {\"model.name\": \"test_resnet\"}": 0, "adam {\"model.name\": \"test_vit\"}": 0,
              "sam {\"model.name\": \"test_resnet\"}": 1, "sam {\"model.name\": \"test_vit\"}": 0}
    final = {(c.method, c.axes["model.name"]): c.settings for c in final_cells(exp, chosen)}
    assert final[("sam", "test_resnet")]["optimizer.rho"] == 0.1
    assert final[("sam", "test_vit")]["optimizer.rho"] == 0.05
    assert final[("sam", "test_vit")]["model.name"] == "test_vit"


def test_a_repeated_candidate_is_refused(tmp_path):
    """{} is the preset, so it repeats rho 0.05: the same cells twice (trained twice, an artificial tie)."""
    sel = {"name": "sel", "base": "base.yaml", "methods": ["sam"], "seeds": [0],
           "selection": {"folds": 2, "seeds": [0], "candidates": {"sam": [{"optimizer.rho": 0.05}, {}]}}}
    with pytest.raises(ConfigError, match="cv/sam/cand0/fold0/seed0 and cv/sam/cand1/fold0/seed0 have the same"):
        Experiment(write(tmp_path, sel)).validate()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["a.png,benign,train,0", "b.png,malignant,train,1"], r"selection.folds is 3 but .* has folds \[0, 1\]"),
        ([f"{i}.png,benign,train,{i % 5}" for i in range(5)], r"is 3 but .* has folds \[0, 1, 2, 3, 4\]"),
        ([f"{i}.png,benign,train,{i % 3}" for i in range(3)] + ["v.png,benign,val,-1"], "has a 'val' split"),
    ],
)
def test_selection_folds_must_be_the_manifests_folds(tmp_path, rows, message):
    """Fewer folds: the CV trains, then fails at the missing fold; more: a partial CV reported as k-fold; a val
    split: every fold validates on it. Each is refused before any cell trains."""
    (tmp_path / "manifest.csv").write_text("\n".join(["path,label,split,fold", *rows]) + "\n")
    sel = {"name": "sel", "base": "base.yaml", "methods": ["adam"], "seeds": [0], "selection": {"folds": 3}}
    with pytest.raises(ConfigError, match=message):
        Experiment(write(tmp_path, sel)).validate()


def test_the_experiment_store_follows_mlflow_tracking_uri_like_train(tmp_path):
    """One resolution everywhere: --tracking-uri > experiment/base file > $MLFLOW_TRACKING_URI (at process start)
    > sqlite under the experiment's output folder, as `medgcsam train` resolves it."""
    import os
    import subprocess
    import sys

    path = write(tmp_path, sweep())
    probe = ("import sys; from medgcsam.experiments import Experiment; from medgcsam.config import load_config\n"
             "from medgcsam.tracking import resolve_tracking_uri\n"
             f"print(Experiment({str(path)!r}).tracking_uri)\n"
             f"print(Experiment({str(path)!r}, tracking_uri='sqlite:////tmp/x.db').tracking_uri)\n"
             f"print(resolve_tracking_uri(load_config({str(tmp_path / 'base.yaml')!r})))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    root = str(Path(__file__).resolve().parents[1])
    unset = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**env, "PYTHONPATH": root}).stdout.split()
    assert unset[0] == f"sqlite:///{(tmp_path / 'out' / 'experiments' / 'sweep' / 'mlflow.db').resolve()}"
    assert unset[1] == "sqlite:////tmp/x.db"
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    given = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**env, "PYTHONPATH": root, "MLFLOW_TRACKING_URI": store}).stdout.split()
    assert given == [store, "sqlite:////tmp/x.db", store]


def test_cells_share_the_machine_s_cores_on_a_local_ray_unless_num_cpus_is_set(tmp_path):
    """Unset scheduling.num_cpus: a local instance gives each of --workers cells cores // workers (its torch
    threads), a cluster 1; a set value is used as it is. A fresh interpreter, so no Ray is connected yet."""
    import os
    import subprocess
    import sys

    path = write(tmp_path, sweep())
    (tmp_path / "pinned").mkdir()
    pinned = write(tmp_path / "pinned", sweep(scheduling={"num_cpus": 3}))
    probe = ("from medgcsam.experiments import Experiment; from medgcsam.experiments.scheduler import Scheduler\n"
             f"print(Scheduler(Experiment({str(path)!r}), workers=1).num_cpus)\n"
             f"print(Scheduler(Experiment({str(path)!r}), workers=2).num_cpus)\n"
             f"print(Scheduler(Experiment({str(path)!r}), address='127.0.0.1:1').num_cpus)\n"
             f"print(Scheduler(Experiment({str(pinned)!r}), workers=2).num_cpus)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).stdout.split()
    cores = os.cpu_count() or 1
    assert [float(v) for v in out] == [float(cores), float(max(1, cores // 2)), 1.0, 3.0]
