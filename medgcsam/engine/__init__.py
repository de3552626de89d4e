"""The training engine: ``train(cfg)`` runs a pipeline end to end; ``medgcsam train`` is its CLI."""

from medgcsam.engine.checkpoint import load_checkpoint, save_checkpoint
from medgcsam.engine.trainer import TrainResult, run_dir, train

__all__ = ["TrainResult", "load_checkpoint", "run_dir", "save_checkpoint", "train"]
