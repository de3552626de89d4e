"""What happens around the loop, one handler per job: tracking (MLflow, or none), checkpoints, early stopping,
progress, and the stages after training (evaluation, OOD, sharpness, the logged model)."""

from medgcsam.engine.handlers.checkpointing import Checkpointing
from medgcsam.engine.handlers.early_stopping import EarlyStopping
from medgcsam.engine.handlers.progress import Progress

__all__ = ["Checkpointing", "EarlyStopping", "Progress"]
