"""Training engine on tiny real PNG folders: one-, two- and three-pass optimizers, checkpoints,
SIGKILL + resume equals an uninterrupted run, and config errors before any work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch.nn.modules.module import register_module_forward_hook

from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.engine import FinishError, load_checkpoint, run_dir, train
from medgcsam.engine.loop import interrupted, seed_everything
from medgcsam.engine.schedule import lr_factor
from medgcsam.models import create_model
from tests.helpers_images import make_manifest

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("benign", "malignant")


def write_image_folder(root: Path) -> Path:
    """40 learnable grey PNGs: per class 8 train (fold 1), 8 validation (fold 0) and 4 test images."""
    manifest = root / "manifest.csv"
    make_manifest(root, manifest, classes=CLASSES, n_per_class=20, k=2)
    return manifest


def tiny_config(manifest: Path, out: Path, name: str, optimizer: str = "gcsam", **train_cfg) -> dict:
    """A pipeline dict for test_resnet at 32 px on CPU, fp32, no model logging or evaluation."""
    return {
        "name": name, "output_dir": str(out),
        "data": {"manifest": str(manifest), "image_size": 32, "channels": 1, "batch_size": 4, "num_workers": 0,
                 "cache": "memory", "augment": False, "val_fold": 0},
        "model": {"name": "test_resnet"},
        "optimizer": {"name": optimizer, "base": "adam", "lr": 0.003},
        "train": {"epochs": 2, "warmup_epochs": 0.5, "amp": "none", "device": "cpu", "seed": 0, **train_cfg},
        "tracking": {"log_model": False},
        "evaluation": {"enabled": False},
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output dir (one sqlite store, migrated once) shared by the module's runs."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize(("optimizer", "passes"), [("adam", 1), ("msam", 1), ("gcsam", 2), ("crsam", 3)])
def test_short_run_each_pass_count(images, out, optimizer, passes):
    cfg = PipelineConfig.model_validate(tiny_config(images, out, f"short-{optimizer}", optimizer))
    train_forwards = []

    def count(module, args, output):
        if type(module).__name__ == "ResNet" and module.training:
            train_forwards.append(1)

    hook = register_module_forward_hook(count)
    try:
        result = train(cfg)
    finally:
        hook.remove()

    steps = 2 * 4  # 2 epochs x (16 train images / batch 4)
    assert len(train_forwards) == steps * passes
    assert result.run_id and result.best_checkpoint is not None
    assert len(result.epoch_times) == 2 and 1 <= result.best_epoch <= 2
    state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    assert state["spec"]["class_names"] == list(CLASSES) and state["config_sha256"] == cfg.sha256()
    last = load_checkpoint(result.checkpoint_dir / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 0 and last["global_step"] == steps
    seed_everything(0)
    fresh = create_model("test_resnet", 2, in_chans=1).state_dict()
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert any(not torch.equal(v, last["model"][k]) for k, v in fresh.items() if v.is_floating_point())

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.name"] == optimizer
    # what ran, defaults included, beside what the YAML set
    assert run.data.params["effective.base.betas"] == "(0.9, 0.999)" and run.data.params["effective.amp"] == "none"
    if optimizer == "gcsam":
        assert run.data.params["effective.optimizer.perturbation_norm"] == "gc"
        assert run.data.params["effective.optimizer.rho"] == "0.05"
    assert run.data.params["split.train.n"] == "16" and run.data.params["split.val.n"] == "16"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_epoch/loss")] == [1, 2]
    norms = client.get_metric_history(result.run_id, "train/grad_norm")
    assert len(norms) == 8 and all(np.isfinite(m.value) and m.value > 0 for m in norms)
    if optimizer == "gcsam":  # centralization removes the per-filter mean: the norm can only shrink
        gc = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/grad_norm_gc")}
        assert all(gc[m.step] <= m.value * (1 + 1e-6) for m in norms)
        assert any(gc[m.step] < m.value * 0.999 for m in norms)
    trace = (run_dir(cfg) / "grad_norm_trace.csv").read_text().splitlines()
    assert trace[0] == "step,grad_norm,grad_norm_gc" and len(trace) == steps + 1


def test_warm_start_and_schedule(images, out):
    """Base optimizer for the first epoch, then GCSAM; LR follows warmup + cosine per optimizer step."""
    cfg = PipelineConfig.model_validate(tiny_config(images, out, "warm", "gcsam", warm_start_epochs=1, epochs=2))
    result = train(cfg)
    history = load_checkpoint(result.checkpoint_dir / "last.pt")["history"]
    expected = [0.003 * lr_factor(s, total_steps=8, warmup_steps=2, kind="cosine", min_ratio=0.01) for s in (4, 8)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    norms = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/grad_norm")}
    gc = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/grad_norm_gc")}
    assert set(gc) == {5, 6, 7, 8}  # GC norms only once GCSAM takes over
    assert set(norms) == set(range(1, 9))


def _train_cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "medgcsam", "train", str(config), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(images, tmp_path):
    raw = tiny_config(images, tmp_path / "killed", "resume", "gcsam", epochs=2, checkpoint_every_steps=1)
    raw["data"]["batch_size"] = 2  # 8 steps per epoch: room to kill mid-epoch
    raw["data"].update(augment=True, num_workers=2)  # augmented batches from persistent workers
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    last = tmp_path / "killed" / "resume" / "checkpoints" / "last.pt"

    proc = _train_cli(config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["global_step"] >= 10:  # in epoch 2: persistent workers reused
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed = load_checkpoint(last)
    assert killed["step"] > 0 and 8 < killed["global_step"] < 16, "the kill must land mid-epoch 2, before the end"

    resumed = _train_cli(config, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    final = load_checkpoint(last)
    assert final["global_step"] == 16 and final["mlflow_run_id"] == killed["mlflow_run_id"]

    reference_cfg = PipelineConfig.model_validate({**raw, "output_dir": str(tmp_path / "straight")})
    reference = train(reference_cfg)
    expected = load_checkpoint(reference.checkpoint_dir / "last.pt")
    for key, value in expected["model"].items():
        assert torch.equal(value, final["model"][key]), f"{key} differs after resume"
    assert [h["train/loss"] for h in final["history"]] == [h["train/loss"] for h in expected["history"]]
    base_a, base_b = expected["optimizer"]["base"]["state"], final["optimizer"]["base"]["state"]
    assert all(torch.equal(base_a[i]["exp_avg_sq"], base_b[i]["exp_avg_sq"]) for i in base_a)


def test_augmented_training_does_not_depend_on_the_worker_count(images, tmp_path):
    """Each batch's augmentation is seeded by its indices, so in-process loading and two persistent workers
    (which draw batches in turn, and keep their state across epochs) train bit-identical weights."""
    weights = []
    for workers in (0, 2):
        raw = tiny_config(images, tmp_path / f"w{workers}", "workers", "sam", epochs=2)
        raw["data"].update(augment=True, num_workers=workers)
        result = train(PipelineConfig.model_validate(raw))
        weights.append(load_checkpoint(result.checkpoint_dir / "last.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_refuses_another_config(images, out):
    cfg = PipelineConfig.model_validate(tiny_config(images, out, "short-adam", "adam"))
    changed = cfg.model_copy(deep=True)
    changed.optimizer.lr = 0.1
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        train(changed, resume=True)


def test_bad_optimizer_hyperparameter_fails_before_work(images, tmp_path):
    raw = tiny_config(images, tmp_path, "bad", "gcsam")
    raw["optimizer"]["rhoo"] = 0.05
    cfg = PipelineConfig.model_validate(raw)
    with pytest.raises(ValueError, match="rhoo"):
        train(cfg)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "bad").exists()


def test_end_of_training_evaluation_and_sharpness(images, out):
    """The frozen operating point reaches best.pt (so checkpoint predictions decide like the registry model)
    and the Hessian figures land in the run when the config asks for them."""
    raw = tiny_config(images, out, "eval-sharp", "gcsam", epochs=1)
    raw["evaluation"] = {"enabled": True, "positive_class": "malignant", "bootstrap": 20}
    raw["sharpness"] = {"enabled": True, "n_samples": 8, "batch_size": 8, "lanczos_steps": 4, "trace_probes": 2,
                        "density_steps": 4}
    result = train(PipelineConfig.model_validate(raw))
    spec = load_checkpoint(result.best_checkpoint)["spec"]
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(result.run_id)
    assert spec["threshold"] is not None and spec["threshold"]["positive_class"] == "malignant"
    assert float(run.data.tags["operating_point.threshold"]) == pytest.approx(spec["threshold"]["value"], rel=1e-5)
    assert run.data.metrics["hessian_hvp_count"] > 0 and np.isfinite(run.data.metrics["hessian_top_eig"])


def test_failed_stage_after_training_is_named_and_resume_finishes_it(images, tmp_path):
    """An evaluation that cannot write its report fails as that stage (not as "logging"), keeps the
    checkpoints, and ``resume=True`` then runs only what is left: no new epoch, evaluation logged."""
    raw = tiny_config(images, tmp_path, "late-fail", "adam", epochs=1)
    raw["evaluation"] = {"enabled": True, "positive_class": "malignant", "bootstrap": 20}
    cfg = PipelineConfig.model_validate(raw)
    blocker = run_dir(cfg) / "evaluation"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the evaluation folder goes")
    with pytest.raises(FinishError, match=r"the end-of-training evaluation failed \((FileExistsError|NotADirectory)"):
        train(cfg)
    assert (run_dir(cfg) / "checkpoints" / "best.pt").is_file()
    blocker.unlink()
    result = train(cfg, resume=True)
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
    assert len(result.epoch_times) == 1


def test_evaluation_keys_checked_before_training_and_no_finite_monitor_selects_nothing(images, tmp_path):
    """A misspelt positive class fails before any epoch; a monitor that is NaN every epoch (AUROC on a validation
    split with one class) selects no model, so nothing is evaluated or registered."""
    raw = tiny_config(images, tmp_path, "typo", "adam", epochs=1)
    raw["evaluation"] = {"enabled": True, "positive_class": "malignat"}
    with pytest.raises(ConfigError, match="evaluation.positive_class 'malignat'"):
        train(PipelineConfig.model_validate(raw))
    assert not (run_dir(PipelineConfig.model_validate(raw)) / "checkpoints").exists()

    frame = pd.read_csv(images)
    one_class = images.with_name("one_class_val.csv")
    frame[~((frame.fold == 0) & (frame.label == "malignant"))].to_csv(one_class, index=False)
    raw = tiny_config(one_class, tmp_path, "nan-monitor", "adam", epochs=2, monitor="val_auroc")
    raw["tracking"] = {"log_model": True, "register_as": "never"}
    with pytest.raises(FinishError, match="no epoch gave a finite validation val_auroc"):
        train(PipelineConfig.model_validate(raw))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []


def test_diverged_training_selects_nothing_instead_of_crashing_in_auroc(images, tmp_path):
    """NaN logits made the per-epoch AUROC raise sklearn's 'Input contains NaN', so an experiment cell that
    diverged failed the same way on every retry; now its epochs log NaN and no model is kept."""
    raw = tiny_config(images, tmp_path, "diverged", "adam", epochs=1, monitor="val_auroc")
    raw["optimizer"]["lr"] = 1e30
    with pytest.raises(FinishError, match="no epoch gave a finite validation val_auroc"):
        train(PipelineConfig.model_validate(raw))


@pytest.mark.parametrize("name", ["bus", "St Mary's bus"])  # the apostrophe broke MLflow's filter string
def test_a_registered_name_keeps_its_label_space(images, tmp_path, name):
    """Registering a 3-class run under a name whose champion is 2-class is refused before any epoch."""
    raw = tiny_config(images, tmp_path, "two", "adam", epochs=1)
    raw["tracking"] = {"log_model": True, "register_as": name, "alias": "champion"}
    assert train(PipelineConfig.model_validate(raw)).registered_version == "1"
    three = tmp_path / "three" / "manifest.csv"
    make_manifest(three.parent, three, classes=("benign", "malignant", "normal"), n_per_class=10, k=2)
    raw3 = tiny_config(three, tmp_path, "three", "adam", epochs=1)
    raw3["tracking"] = raw["tracking"]
    with pytest.raises(ConfigError, match=re.escape(f"{name!r}: version 1 holds classes ['benign', 'malignant']")):
        train(PipelineConfig.model_validate(raw3))
    assert not (run_dir(PipelineConfig.model_validate(raw3)) / "checkpoints").exists()


def test_accumulation_cycles_never_straddle_a_checkpoint(images, tmp_path):
    """Checkpoints hold no half-summed gradient: every N steps must end a cycle, and so must every epoch."""
    raw = tiny_config(images, tmp_path, "acc", "gcsam", accumulation_steps=2, checkpoint_every_steps=3)
    with pytest.raises(ValueError, match="checkpoint_every_steps 3 is not a multiple of accumulation_steps 2"):
        PipelineConfig.model_validate(raw)
    raw = tiny_config(images, tmp_path, "acc", "gcsam", accumulation_steps=3)  # 4 steps per epoch
    with pytest.raises(ConfigError, match="accumulation_steps 3 does not divide the 4 steps of an epoch"):
        train(PipelineConfig.model_validate(raw))


def test_an_epoch_checkpointed_but_never_logged_is_sent_on_resume(images, tmp_path, monkeypatch):
    """Killed between the epoch's checkpoint and its flush: resume sends epoch 1's curves and gradient norms
    too, so the run's history has no hole (and spilled metrics of an earlier process are sent as well)."""
    from medgcsam.engine.handlers.tracking import MlflowTracking

    cfg = PipelineConfig.model_validate(tiny_config(images, tmp_path, "hole", "adam"))
    original = MlflowTracking.log_epoch

    def dies_once(self, record, rows):
        monkeypatch.setattr(MlflowTracking, "log_epoch", original)
        raise RuntimeError("killed after the checkpoint")

    monkeypatch.setattr(MlflowTracking, "log_epoch", dies_once)
    with pytest.raises(RuntimeError, match="killed after the checkpoint"):
        train(cfg)
    spill = run_dir(cfg) / "unsent_metrics.json"
    run_id = load_checkpoint(run_dir(cfg) / "checkpoints" / "last.pt")["mlflow_run_id"]
    spill.write_text(json.dumps({"run_id": run_id, "metrics": [
        {"key": "late/figure", "value": 0.5, "timestamp": 0, "step": 3}]}))
    result = train(cfg, resume=True)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.run_id == run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_epoch/loss")] == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/grad_norm")) == list(range(1, 9))
    assert [m.value for m in client.get_metric_history(run_id, "late/figure")] == [0.5] and not spill.exists()


def test_resume_of_a_finished_run_repeats_no_stage(images, tmp_path):
    """--resume on a run that already finished registers no second version and logs no second evaluation."""
    raw = tiny_config(images, tmp_path, "done", "adam", epochs=1)
    raw["evaluation"] = {"enabled": True, "positive_class": "malignant", "bootstrap": 20}
    raw["tracking"] = {"log_model": True, "register_as": "once", "alias": "champion"}
    cfg = PipelineConfig.model_validate(raw)
    first = train(cfg)
    again = train(cfg, resume=True)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (again.run_id, again.registered_version, again.model_uri) == (first.run_id, "1", first.model_uri)
    assert len(client.search_model_versions("name = 'once'")) == 1
    assert len(client.get_metric_history(first.run_id, "val/accuracy")) == 1
    assert str(client.get_model_version_by_alias("once", "champion").version) == "1"


def test_yaml_exponent_numbers_are_numbers(images, tmp_path):
    """`alpha: 1e-1` is 0.1 (YAML 1.2), not the string PyYAML's 1.1 rules make of it, in free-form sections too."""
    from medgcsam.config import load_config

    raw = tiny_config(images, tmp_path, "exp", "gsam")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw) + "")
    text = path.read_text().replace("lr: 0.003", "lr: 3e-3\n  alpha: 1e-1\n  rho: 5e-2")
    path.write_text(text)
    cfg = load_config(path, ["optimizer.eps=1e-12"])
    assert cfg.optimizer.lr == 0.003
    assert cfg.optimizer.hyperparameters == {"alpha": 0.1, "rho": 0.05, "eps": 1e-12}


def test_settings_the_data_or_machine_cannot_honour_fail_before_training(images, tmp_path):
    """Early stopping without a validation split, and a CUDA device on a machine without one."""
    raw = tiny_config(images, tmp_path, "nostop", "adam", early_stopping_patience=2)
    raw["data"]["val_fold"] = None
    with pytest.raises(ConfigError, match="early_stopping_patience needs a validation split"):
        train(PipelineConfig.model_validate(raw))
    if not torch.cuda.is_available():
        raw = tiny_config(images, tmp_path, "gpu", "adam", device="cuda")
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            train(PipelineConfig.model_validate(raw))


def test_yaml_and_override_mistakes_are_config_errors(images, tmp_path):
    """A key given twice (PyYAML silently keeps the last), a value that is not YAML, a misspelt task and a device
    torch cannot parse: each a ConfigError naming the place, before any work, instead of a loss or a traceback."""
    from medgcsam.config import load_config

    path = tmp_path / "p.yaml"
    text = yaml.safe_dump(tiny_config(images, tmp_path, "dup", "adam"))
    path.write_text(text + "optimizer:\n  name: gcsam\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'optimizer'"):
        load_config(path)
    path.write_text(text + "anchors:\n  base: &b {lr: 0.1}\n  merged:\n    <<: *b\n    lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"anchors: Extra inputs"):  # merge keys may still be overridden
        load_config(path)
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[1': the value is not valid YAML"):
        load_config(path, ["train.epochs=[1"])
    with pytest.raises(ConfigError, match=r"data.task: .*unknown task 'bus_binaryy'"):
        load_config(path, ["data.task=bus_binaryy"])
    with pytest.raises(ConfigError, match=r"train.device 'gpu' is not a device"):
        train(load_config(path, ["train.device=gpu"]))
    assert not (tmp_path / "dup").exists()


def test_an_interrupt_that_a_library_turned_into_its_own_error_still_counts_as_one():
    """SIGTERM inside torch.save surfaced as 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'
    raised while handling the KeyboardInterrupt, and the run ended FAILED (1 run in 3 of the test below)."""
    def wrapped() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 3032000 vs 3031888") from None  # no __cause__, __context__ kept

    with pytest.raises(RuntimeError) as err:
        wrapped()
    assert interrupted(err.value) and interrupted(KeyboardInterrupt())
    assert not interrupted(RuntimeError("disk full")) and not interrupted(None)
    looped = ValueError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped  # a cycle must end the walk
    assert not interrupted(looped)


def test_sigterm_ends_the_run_killed(images, tmp_path):
    """`docker stop` sends SIGTERM (to `medgcsam` as PID 1); the MLflow run must end KILLED, not stay RUNNING."""
    raw = tiny_config(images, tmp_path, "stopped", "adam", epochs=500)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    last = tmp_path / "stopped" / "checkpoints" / "last.pt"
    proc = _train_cli(config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be stopped:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output
    run_id = load_checkpoint(last)["mlflow_run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None, output


@pytest.mark.parametrize(("field", "value", "message"), [
    ("register_as", "site/bus", r"model name 'site/bus' is refused by MLflow"),
    ("alias", "my champion", r"alias 'my champion': MLflow aliases hold only letters"),
    ("alias", "V3", r"alias 'V3' is reserved by MLflow"),
])
def test_registry_names_mlflow_refuses_fail_before_training(images, tmp_path, field, value, message):
    """MLflow checks these only when it registers the model, after the whole run (and --resume cannot change them)."""
    raw = tiny_config(images, tmp_path, "names", "adam")
    raw["tracking"] = {"log_model": True, "register_as": "bus", field: value}
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(raw)
