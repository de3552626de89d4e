"""Stop after ``patience`` epochs without improvement of the monitored validation figure."""

from __future__ import annotations

from medgcsam.engine.loop import EpochEnd, Handler, Trainer


class EarlyStopping(Handler):
    """Sets ``state.stopped`` (which the checkpoint records, so a resumed run stays stopped): put it before
    ``Checkpointing`` in the handler list. Without a validation loader there is nothing to watch."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        trainer.state.stopped = trainer.val_loader is not None and trainer.state.bad_epochs >= self.patience
