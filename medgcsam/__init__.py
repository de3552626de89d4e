"""medgcsam: medical-image classifiers trained with GCSAM and its baselines, tracked in MLflow."""

__version__ = "0.1.0"
