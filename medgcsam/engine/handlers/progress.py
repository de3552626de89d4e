"""A progress bar per epoch (loss, accuracy, images/s a few times per epoch: the only host syncs) and one log
line per epoch, on rank 0."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from medgcsam.engine.loop import EpochEnd, Handler, Trainer
from medgcsam.engine.metrics import TrainMeter

log = logging.getLogger("medgcsam.engine.trainer")  # the name the epoch lines have always been logged under


class Progress(Handler):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.refresh = max(1, trainer.steps_per_epoch // 10)
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.state.step, disable=not trainer.ctx.is_main,
                        desc=f"epoch {trainer.state.epoch + 1}/{trainer.epochs}", leave=False, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, meter: TrainMeter) -> None:
        self.bar.update(1)
        step = trainer.state.step
        if trainer.ctx.is_main and (step % self.refresh == 0 or step == trainer.steps_per_epoch):
            s = meter.summary()  # the only host sync, between steps, a few times per epoch
            self.bar.set_postfix(loss=f"{s['loss']:.4f}", acc=f"{s['accuracy']:.3f}",
                                 img_s=f"{meter.images_per_s:.1f}")
        if step == trainer.steps_per_epoch:
            self.bar.close()

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        if not trainer.ctx.is_main:
            return
        r = end.record
        val = f", val {trainer.monitor} {end.value:.4f}" if trainer.val_loader is not None else ""
        log.info("epoch %d/%d: train loss %.4f acc %.3f%s (%.1f s, train %.1f images/s)", trainer.state.epoch,
                 trainer.epochs, r["train/loss"], r["train/accuracy"], val, r["epoch_time_s"],
                 r["train/images_per_s"])
