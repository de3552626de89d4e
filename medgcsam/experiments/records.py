"""The names under which an experiment's cells are recorded in MLflow, and what a run of the experiment reports:
written by the runner and its scheduler, read by the report (and by any other machine that collects the cells),
so all of them import these from here, below each of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TAG_ROLE = "medgcsam.role"
TAG_EXPERIMENT = "medgcsam.experiment"
TAG_CELL = "medgcsam.cell_id"
TAG_CELL_INFO = "medgcsam.cell"  # JSON: stage, method, settings, axes, seed, fold, candidate
TAG_SUPERSEDED = "medgcsam.superseded_by"  # on a killed attempt of a cell: the run that finished it
TAG_BASE = "medgcsam.base"  # fingerprint of the base pipeline (+ experiment overrides) the cell trained on
TIME_PER_EPOCH = "cell/time_per_epoch_s"
TIME_TO_BEST = "cell/time_to_best_s"
WALL_TIME = "cell/wall_time_s"
BEST_EPOCH = "cell/best_epoch"


class ExperimentError(RuntimeError):
    """An experiment cannot go on; the message names the cell(s) and what to do."""


@dataclass
class RunSummary:
    """What one invocation did."""

    parent_run_id: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    chosen: dict[str, int] | None = None
    report: Path | None = None
