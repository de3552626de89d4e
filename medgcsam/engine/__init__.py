"""The training engine: ``train(cfg)`` runs a pipeline end to end (``medgcsam train`` is its CLI); ``Trainer``
(``loop``), ``TrainState`` (``state``, the checkpoint) and the handlers are the parts, usable on their own.

Names are loaded on first use so ``medgcsam.engine.step`` (the bare train step, used by benchmarks
on machines without MLflow) and the CLI's startup do not pull in the tracking stack.
"""

from __future__ import annotations

from medgcsam import lazy_attributes

_EXPORTS = {
    "FinishError": "medgcsam.engine.handlers.stages", "TrainResult": "medgcsam.engine.trainer",
    "run_dir": "medgcsam.engine.trainer", "train": "medgcsam.engine.trainer", "Trainer": "medgcsam.engine.loop",
    "Handler": "medgcsam.engine.loop", "TrainState": "medgcsam.engine.state",
    "Checkpointing": "medgcsam.engine.handlers", "EarlyStopping": "medgcsam.engine.handlers",
    "Progress": "medgcsam.engine.handlers", "MlflowTracking": "medgcsam.engine.handlers.tracking",
    "load_checkpoint": "medgcsam.checkpoint", "save_checkpoint": "medgcsam.checkpoint",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
