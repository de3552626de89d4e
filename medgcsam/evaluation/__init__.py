"""Clinical evaluation: per-class counts and ratios with bootstrap CIs, calibration, a frozen operating point."""

from medgcsam.evaluation.calibration import fit_temperature, softmax
from medgcsam.evaluation.evaluate import EvaluationResult, evaluate, log_evaluation
from medgcsam.evaluation.operating_point import choose_threshold
from medgcsam.evaluation.predict import predict_split
from medgcsam.metrics import bootstrap_ci, headline

__all__ = [
    "EvaluationResult",
    "bootstrap_ci",
    "choose_threshold",
    "evaluate",
    "fit_temperature",
    "headline",
    "log_evaluation",
    "predict_split",
    "softmax",
]
