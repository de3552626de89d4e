"""The paper's experimental protocol: grids of nested MLflow runs, CV selection, seed statistics, reports."""

from .config import ExperimentConfig, load_experiment
from .grid import Cell, cv_cells, final_cells, grid_cells
from .runner import Experiment, ExperimentError, RunSummary
from .selection import CandidateResult, select, simplicity_key
from .stats import Summary, mcnemar_exact, paired_comparison, pooled_sd, sign_flip_pvalue, summarize

__all__ = [
    "CandidateResult", "Cell", "Experiment", "ExperimentConfig", "ExperimentError", "RunSummary", "Summary",
    "cv_cells", "final_cells", "grid_cells", "load_experiment", "mcnemar_exact", "paired_comparison",
    "pooled_sd", "select", "sign_flip_pvalue", "simplicity_key", "summarize",
]
