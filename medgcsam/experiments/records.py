"""The names under which an experiment's cells are recorded in MLflow: written by the runner, read by the report
(and by any other machine that collects the cells), so both import them from here."""

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
