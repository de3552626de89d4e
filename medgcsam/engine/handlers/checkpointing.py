"""``last.pt``/``best.pt`` in one folder, written as a pair (``medgcsam.checkpoint.save_pair``) at every epoch end
and every ``every_steps`` steps inside an epoch, by rank 0. Put it after any handler that changes the state it
saves (``EarlyStopping``) and before tracking, so an epoch is on disk before its curves are sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medgcsam import checkpoint as ckpt_io
from medgcsam.engine.loop import EpochEnd, Handler, Trainer
from medgcsam.engine.metrics import TrainMeter


class Checkpointing(Handler):
    def __init__(self, directory: str | Path, *, every_steps: int | None = None) -> None:
        self.directory = Path(directory)
        self.every_steps = every_steps
        self.best_sha256: str | None = None  # of the best weights, as last.pt records it

    @property
    def last(self) -> Path:
        return self.directory / ckpt_io.LAST

    def resume(self, trainer: Trainer, payload: dict[str, Any]) -> None:
        """Continue ``trainer`` from ``payload`` (``last.pt``) and the best weights it names."""
        best_state, self.best_sha256 = ckpt_io.load_best(self.directory, payload)
        trainer.resume(payload, best_state)

    def save(self, trainer: Trainer, meter: TrainMeter | None, *, best: bool = False) -> None:
        if trainer.ctx.is_main:
            self.best_sha256 = ckpt_io.save_pair(self.directory, trainer.state.state_dict(meter), best=best,
                                                 best_sha256=self.best_sha256)

    def on_step_end(self, trainer: Trainer, meter: TrainMeter) -> None:
        step = trainer.state.step
        if self.every_steps and step % self.every_steps == 0 and step < trainer.steps_per_epoch:
            self.save(trainer, meter)

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        self.save(trainer, None, best=end.improved)
