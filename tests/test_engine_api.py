"""The engine as a Python API: a model, an optimizer and loaders over in-memory tensors, no tracking, no files
unless a handler writes them; the checkpoint is the TrainState and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medgcsam.checkpoint import load_checkpoint
from medgcsam.engine import Checkpointing, EarlyStopping, Handler, Trainer, TrainState
from medgcsam.optim import create_optimizer


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    return TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long())  # learnable: the sign of channel 0's mean


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))


def trainer(handlers=(), epochs: int = 3, monitor: str = "val_accuracy") -> Trainer:
    model = net()
    loaders = {"train": DataLoader(data(64, 1), batch_size=16, shuffle=True,
                                   generator=torch.Generator().manual_seed(0), drop_last=True),
               "val": DataLoader(data(32, 2), batch_size=16)}
    opt = create_optimizer("gcsam", model.parameters(), base="adam", model=model, lr=3e-2)
    return Trainer(model, opt, loaders, epochs=epochs, class_names=["neg", "pos"], monitor=monitor,
                   handlers=handlers)


class Events(Handler):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_start(self, trainer):
        self.seen.append("start")

    def on_improvement(self, trainer, end):
        self.seen.append(f"improved {trainer.state.epoch}")

    def on_epoch_end(self, trainer, end):
        self.seen.append(f"epoch {trainer.state.epoch}")

    def on_end(self, trainer):
        self.seen.append("end")

    def on_close(self, trainer, status):
        self.seen.append(status)


def test_train_in_memory_without_tracking(tmp_path, monkeypatch):
    """Learns the toy task, selects the best epoch, emits the events in order; no MLflow, no files."""
    monkeypatch.chdir(tmp_path)
    events = Events()
    t = trainer([events])
    before = [p.detach().clone() for p in t.raw.parameters()]
    state = t.fit()
    assert state.epoch == 3 and state.global_step == 12 and len(state.history) == 3
    assert state.history[-1]["train/loss"] < state.history[0]["train/loss"]
    assert state.best_metric == max(r["val_epoch/accuracy"] for r in state.history) > 0.7  # chance is 0.5
    assert events.seen[0] == "start" and events.seen[-2:] == ["end", "FINISHED"]
    assert [e for e in events.seen if e.startswith("epoch")] == ["epoch 1", "epoch 2", "epoch 3"]
    assert f"improved {state.best_epoch + 1}" in events.seen
    best = state.history[state.best_epoch]["val_epoch/accuracy"]
    logits, labels = t.predict(t.val_loader)
    assert (logits.argmax(1) == labels).mean() == best  # the selected weights are in the model
    assert any(not torch.equal(a, b) for a, b in zip(before, t.raw.parameters(), strict=True))
    assert list(tmp_path.iterdir()) == [] and state.mlflow_run_id is None


def test_the_state_is_the_checkpoint_and_resumes_exactly(tmp_path):
    """Three epochs in one go equal two epochs, a checkpoint, and a new Trainer resumed for the third."""
    whole = trainer(epochs=3).fit()
    first = trainer([Checkpointing(tmp_path / "ckpt")], epochs=2)
    first.fit()
    payload = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert set(TrainState.progress_fields()) <= set(payload) and payload["epoch"] == 2
    resumed_handler = Checkpointing(tmp_path / "ckpt")
    second = trainer([resumed_handler], epochs=3)
    resumed_handler.resume(second, payload)
    state = second.fit()
    timeless = [[{k: v for k, v in r.items() if k not in ("epoch_time_s", "train/images_per_s")} for r in h]
                for h in (state.history, whole.history)]
    assert timeless[0] == timeless[1]
    for a, b in zip(whole.model.state_dict().values(), state.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_and_an_interrupt(tmp_path):
    """Patience 1 on a monitor that cannot improve stops after two epochs; an exception in a handler ends the
    loop with FAILED (a KeyboardInterrupt: KILLED) and propagates."""
    t = trainer([EarlyStopping(1)], epochs=10)
    t.val_loader = [(torch.zeros(4, 2, 4, 4), torch.tensor([0, 1, 0, 1]))]  # constant accuracy 0.5 at best
    state = t.fit()
    assert state.stopped and state.epoch <= 3 and state.bad_epochs == 1

    class Boom(Handler):
        def on_epoch_end(self, trainer, end):
            raise KeyboardInterrupt

    events = Events()
    with pytest.raises(KeyboardInterrupt):
        trainer([Boom(), events]).fit()
    assert events.seen == ["start", "improved 1", "KILLED"]


def test_monitor_must_be_known():
    with pytest.raises(ValueError, match="monitor must be one of"):
        trainer(monitor="val_f1")
