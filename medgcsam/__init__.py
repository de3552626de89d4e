"""medgcsam: medical-image classifiers trained with GCSAM and its baselines, tracked in MLflow.

The public names below are imported on first use (``medgcsam.Trainer`` loads the engine then), so
``import medgcsam`` stays fast and pulls in neither torch nor MLflow. README.md, "Python API", shows them at work.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PipelineConfig": "medgcsam.config", "load_config": "medgcsam.config",
    "train": "medgcsam.engine.trainer", "TrainResult": "medgcsam.engine.trainer",
    "Trainer": "medgcsam.engine.loop", "Handler": "medgcsam.engine.loop", "TrainState": "medgcsam.engine.state",
    "Checkpointing": "medgcsam.engine.handlers", "EarlyStopping": "medgcsam.engine.handlers",
    "Progress": "medgcsam.engine.handlers", "MlflowTracking": "medgcsam.engine.handlers.tracking",
    "create_optimizer": "medgcsam.optim", "OPTIMIZERS": "medgcsam.optim", "create_model": "medgcsam.models.factory",
    "load_checkpoint": "medgcsam.checkpoint", "load_classifier": "medgcsam.inference.package",
}

__all__ = sorted(_EXPORTS)


def lazy_attributes(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use of ``name``."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - it is the module hook
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return __getattr__


__getattr__ = lazy_attributes(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
