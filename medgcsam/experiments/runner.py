"""Resumable orchestration: one parent MLflow run per experiment, one nested child run per cell.

A cell is finished when a child run of the parent has status FINISHED and the tag
``medgcsam.cell_id``, and was trained on the current base pipeline (tag ``medgcsam.base``); the cell-id tag
is written only after training returned, so a crash mid-cell leaves no tag and the cell is run again
(resuming from its own checkpoints). Cells run as Ray tasks (:mod:`.scheduler`), on a local Ray instance or a
cluster, each under a lease (:mod:`.lease`) so that runners started at once never train one cell twice;
the runner collects them as they finish and writes the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from medgcsam.config import ConfigError, PipelineConfig
from medgcsam.data.manifest import ManifestError, included, read_manifest
from medgcsam.optim import check_hyperparameters
from medgcsam.tracking.uri import choose_tracking_uri, ensure_experiment, ensure_reachable

from .analysis import analyse_cell
from .config import ExperimentConfig, build_pipeline, load_experiment
from .grid import Cell, candidates, cv_cells, final_cells, grid_cells, group_key, groups, method_settings
from .records import (
    BEST_EPOCH,
    TAG_BASE,
    TAG_CELL,
    TAG_CELL_INFO,
    TAG_EXPERIMENT,
    TAG_ROLE,
    TAG_SUPERSEDED,
    TIME_PER_EPOCH,
    TIME_TO_BEST,
    WALL_TIME,
    ExperimentError,
    RunSummary,
)
from .selection import CandidateResult, select, simplicity_key

if TYPE_CHECKING:
    from .report import ReportSource
    from .scheduler import Scheduler

log = logging.getLogger(__name__)



class Experiment:
    """An experiment file bound to its tracking store; every method is safe to call again (idempotent)."""

    def __init__(self, path: str | Path, overrides: list[str] | None = None, *, tracking_uri: str | None = None):
        self.path = Path(path).resolve()
        self.overrides = list(overrides or [])
        self.config, self.base_raw = load_experiment(self.path, self.overrides)
        base = build_pipeline(self.base_raw, self.config.overrides, f"{self.path} (base pipeline + overrides)")
        self.output_dir = (self.config.output_dir or Path(base.output_dir) / "experiments" / self.config.name).resolve()
        self.tracking_uri = choose_tracking_uri(tracking_uri, self.config.tracking_uri, base.tracking.uri,
                                                output_dir=self.output_dir)
        self._base = base
        self.base_fingerprint = fingerprint(base)
        self._parent: str | None = None

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Opened after experiment_id() checked the store (a clear error for an unwritable folder, a server that is
        down) and created it under the tracking module's lock: processes opening a fresh sqlite store at once race."""
        self.experiment_id()
        return MlflowClient(tracking_uri=self.tracking_uri)

    # ---- cells -------------------------------------------------------------------------------
    def pipeline(self, cell: Cell) -> PipelineConfig:
        """The validated pipeline of one cell (base + experiment overrides + cell overrides + tracking),
        including the optimizer's hyperparameters, so a typo fails before any cell trains."""
        fixed = {  # per base pipeline too: a stale cell's checkpoints, written on another one, cannot be resumed
            "output_dir": str(self.output_dir / "cells" / self.base_fingerprint / cell.id),
            "tracking.uri": self.tracking_uri,
            "tracking.experiment": self.config.name,
            "tracking.run_name": cell.name,
            "tracking.register_as": None,
        }
        overrides = [*self.config.overrides, *cell.overrides(), *(f"{k}={json.dumps(v)}" for k, v in fixed.items())]
        where = f"{self.path} cell {cell.id} ({cell.name})"
        cfg = build_pipeline(self.base_raw, overrides, where)
        try:
            check_hyperparameters(cfg.optimizer.name, cfg.optimizer.base, cfg.optimizer.hyperparameters)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cfg

    def first_stage(self) -> list[Cell]:
        return cv_cells(self.config) if self.config.selection is not None else grid_cells(self.config)

    def validate(self) -> None:
        """Build every first-stage cell's pipeline (and one final cell per candidate) so errors come before work."""
        seen: dict[str, Cell] = {}
        checked: set[Path] = set()
        for cell in self.first_stage():
            twin = seen.setdefault(cell.id, cell)
            if twin is not cell:  # e.g. a candidate that repeats another (or the preset): trained twice, and tied
                raise ConfigError(f"{self.path}: cells {twin.name} and {cell.name} have the same settings; "
                                  f"remove the repeated candidate")
            manifest = self.pipeline(cell).data.manifest
            if cell.stage == "cv" and manifest not in checked:
                checked.add(manifest)
                self._check_folds(manifest)
        if self.config.selection is not None:  # every candidate's final cell, as if it were chosen everywhere
            most = max(len(candidates(self.config, label, axes)) for label, axes in groups(self.config))
            for ci in range(most):
                chosen = {group_key(label, axes): min(ci, len(candidates(self.config, label, axes)) - 1)
                          for label, axes in groups(self.config)}
                for cell in final_cells(self.config, chosen)[:: len(self.config.seeds)]:
                    self.pipeline(cell)

    def _check_folds(self, manifest: Path) -> None:
        """CV cell k validates on fold k of the manifest's train split, so k-fold CV needs exactly folds 0..k-1 there
        and no explicit val split (the data layer prefers it to every fold: all folds would validate on it).
        Skipped where the manifest is not at hand (planning or reporting on a machine without the data)."""
        if not manifest.is_file():
            return
        try:
            df = included(read_manifest(manifest))
        except ManifestError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        k = self.config.selection.folds
        if (df["split"] == "val").any():
            raise ConfigError(f"{self.path}: {manifest} has a 'val' split, which every CV cell would validate on "
                              f"instead of its fold; put those rows in the train split's folds for the selection")
        folds = sorted(set(df.loc[df["split"] == "train", "fold"]) - {-1})
        if folds != list(range(k)):
            raise ConfigError(f"{self.path}: selection.folds is {k} but the train split of {manifest} has folds "
                              f"{folds}; set selection.folds to match, or split the manifest into {k} folds")

    # ---- tracking ----------------------------------------------------------------------------
    def experiment_id(self) -> str:
        ensure_reachable(self.tracking_uri, self._base.tracking.connect_timeout_s)
        probe = self._base.model_copy(deep=True)
        probe.output_dir = self.output_dir
        probe.tracking.experiment = self.config.name
        return ensure_experiment(probe, self.tracking_uri)

    def parent_run_id(self, create: bool = True) -> str | None:
        """The experiment's parent run (found by tags), created on first use."""
        if self._parent is not None:
            return self._parent
        exp_id = self.experiment_id()
        self._parent = self._first_parent(exp_id)
        if self._parent is None and create:
            run = self.client.create_run(exp_id, run_name=self.config.name, tags={
                TAG_ROLE: "parent", TAG_EXPERIMENT: self.config.name,
                "mlflow.note.content": self.config.description or f"medgcsam experiment {self.config.name}"})
            # workers started together each found no parent and made one; all keep the first, the others go
            self._parent = self._first_parent(exp_id)
            if self._parent != run.info.run_id:
                self.client.delete_run(run.info.run_id)
                return self._parent
            self.client.log_text(self._parent, self.path.read_text(encoding="utf-8"), f"experiment/{self.path.name}")
            self.client.log_dict(self._parent, self.config.model_dump(mode="json"), "experiment/resolved.json")
        return self._parent

    def _first_parent(self, exp_id: str) -> str | None:
        runs = self.client.search_runs(
            [exp_id], f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_EXPERIMENT}` = '{self.config.name}'",
            order_by=["attributes.start_time ASC"], max_results=1)  # ties broken by run id in MLflow's stores
        return runs[0].info.run_id if runs else None

    def finished_runs(self, only: str | None = None) -> dict[str, Run]:
        """Cell id -> its FINISHED child run (the latest when a cell was run twice) on the current base pipeline;
        ``only``: just that cell id (what a scheduler asks before and after training one cell).

        A run trained before the base pipeline or the experiment's overrides changed is stale: the cell id covers
        only the cell's own settings. Runs without the fingerprint tag (older stores) are taken as they are."""
        parent = self.parent_run_id(create=False)
        if parent is None:
            return {}
        out: dict[str, Run] = {}
        token = None
        one = f" and tags.`{TAG_CELL}` = '{only}'" if only else ""
        while True:
            page = self.client.search_runs(
                [self.experiment_id()],
                f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'{one}",
                order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
            for run in page:
                cell_id = run.data.tags.get(TAG_CELL)
                if cell_id and run.data.tags.get(TAG_BASE, self.base_fingerprint) == self.base_fingerprint:
                    out[cell_id] = run
            token = page.token
            if not token:
                return out

    # ---- selection ---------------------------------------------------------------------------
    def selection_table(self, finished: dict[str, Run]) -> dict[str, list[CandidateResult]] | None:
        """CV results per group (method, axes), or None while some CV cell is unfinished."""
        sel = self.config.selection
        if sel is None:
            return None
        cells = cv_cells(self.config)
        if any(c.id not in finished for c in cells):
            return None
        table: dict[str, list[CandidateResult]] = {}
        for label, axes in groups(self.config):
            preset = {**method_settings(self.config, label), **axes}  # "simpler" = closer to this
            results = []
            for ci, settings in enumerate(candidates(self.config, label, axes)):
                mine = [c for c in cells if c.method == label and c.axes == axes and c.candidate == ci]
                scores = [self.cv_score(c, finished[c.id]) for c in mine]
                results.append(CandidateResult(ci, settings, scores, simplicity_key(settings, preset, ci)))
            select(results, sel.mode)
            table[group_key(label, axes)] = results
        return table

    def cv_score(self, cell: Cell, run: Run) -> float:
        """The selection metric at the epoch the engine kept (its best on the validation fold)."""
        key = self.config.selection.metric
        history = {m.step: m.value for m in self.client.get_metric_history(run.info.run_id, key)}
        if not history:
            raise ExperimentError(f"CV cell {cell.id} ({cell.name}) logged no value of {key!r} (it has "
                                  f"{sorted(run.data.metrics)[:15]}). Either it is not a per-epoch curve: set "
                                  "selection.metric to one, e.g. val_epoch/balanced_accuracy; or it was NaN at every "
                                  "epoch, which is not logged (e.g. AUROC on a validation fold that lacks a class): "
                                  "give every fold every class, or select on a metric defined on such a fold")
        best = int(run.data.metrics.get(BEST_EPOCH, max(history)))
        return float(history.get(best, history[max(history)]))

    @staticmethod
    def chosen(table: dict[str, list[CandidateResult]]) -> dict[str, int]:
        return {label: next(r.index for r in rows if r.chosen) for label, rows in table.items()}

    def plan(self, finished: dict[str, Run] | None = None) -> list[Cell]:
        """Every cell known now: the first stage, plus the final fits once the CV is complete."""
        cells = self.first_stage()
        if self.config.selection is not None:
            table = self.selection_table(self.finished_runs() if finished is None else finished)
            if table is not None:
                cells = cells + final_cells(self.config, self.chosen(table))
        return cells

    # ---- running -----------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> str:
        """Train one cell as a child run of the parent, then tag it finished; returns the run id."""
        from medgcsam.engine import train

        parent = self.parent_run_id()
        cfg = self.pipeline(cell)
        cell_dir = Path(cfg.output_dir)
        resume = cell_dir.is_dir() and any(cell_dir.rglob("*.pt"))
        result = train(cfg, resume=resume, tracking_uri=self.tracking_uri, parent_run_id=parent)
        times = list(result.epoch_times)
        metrics = {WALL_TIME: float(result.wall_time), BEST_EPOCH: float(result.best_epoch)}
        if times:
            metrics[TIME_PER_EPOCH] = float(statistics.median(times))  # robust to the caching epoch
            metrics[TIME_TO_BEST] = float(sum(times[: result.best_epoch]))  # best_epoch is 1-based
        if cell.stage != "cv" and result.model is not None:
            analyse_cell(self.client, result.run_id, result.model, cfg,
                         landscape_points=self.config.report.landscape_points)
        self.record_cell(result.run_id, cell, metrics)
        self._supersede({cell.name: result.run_id})
        if not self.config.keep_checkpoints:  # finished and tagged: a rerun skips it, its checkpoints are dead weight
            shutil.rmtree(result.checkpoint_dir, ignore_errors=True)
            (result.checkpoint_dir.parent / "ood.pt").unlink(missing_ok=True)  # its copy is in the logged run
        return result.run_id

    def record_cell(self, run_id: str, cell: Cell, metrics: dict[str, float]) -> None:
        """Mark a FINISHED child run of the parent as the result of ``cell`` (the cell-id tag goes last)."""
        run = self.client.get_run(run_id)
        parent = self.parent_run_id()
        if run.data.tags.get("mlflow.parentRunId") != parent:
            raise ExperimentError(f"cell {cell.id}: run {run_id} is not nested under the parent run {parent}")
        if run.info.status != "FINISHED":
            raise ExperimentError(f"cell {cell.id}: run {run_id} ended {run.info.status}, not FINISHED")
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, v)
        info = {"stage": cell.stage, "method": cell.method, "settings": cell.settings, "axes": cell.axes,
                "seed": cell.seed, "fold": cell.fold, "candidate": cell.candidate}
        self.client.set_tag(run_id, TAG_CELL_INFO, json.dumps(info, default=str))
        self.client.set_tag(run_id, TAG_BASE, self.base_fingerprint)
        self.client.set_tag(run_id, TAG_CELL, cell.id)

    def _supersede(self, done: dict[str, str]) -> None:
        """Mark earlier attempts of finished cells (``done``: run name -> the run that finished the cell) that
        were killed mid-run (still RUNNING in the store: SIGKILL, a lost machine) as KILLED, tagged with the
        run that finished the cell, so the store shows one live run per cell. A resumed attempt is the
        finishing run itself and is left alone."""
        running = self.client.search_runs(
            [self.experiment_id()],
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id()}' and attributes.status = 'RUNNING'",
            max_results=10_000)
        for run in running:  # names compared here: a cell name may hold characters the filter syntax does not
            finisher = done.get(run.info.run_name)
            if finisher is not None and run.info.run_id != finisher:
                self.client.set_tag(run.info.run_id, TAG_SUPERSEDED, finisher)
                self.client.set_terminated(run.info.run_id, "KILLED")

    def run(self, *, cells: list[str] | None = None, workers: int | None = None, report: bool = True,
            address: str | None = None) -> RunSummary:
        """Run what is unfinished (or only ``cells``, by id or plan index) as Ray tasks, then select and report.

        ``workers``: cells at once (default: 1 on the local Ray instance started here, else what the cluster
        fits); ``address``: a Ray cluster to submit to (default ``RAY_ADDRESS``, else a local instance).
        With ``cells`` given, only those run and no report is written.
        """
        from .scheduler import Scheduler

        self.validate()
        summary = RunSummary(parent_run_id=self.parent_run_id() or "")
        self.client.update_run(summary.parent_run_id, status="RUNNING")
        finished = self.finished_runs()
        with Scheduler(self, workers=workers, address=address) as scheduler:
            if cells:
                plan = self.plan(finished)
                picked = [_pick(plan, key, self.config) for key in cells]
                self._run_stage(picked, finished, scheduler, summary)
                _raise_if_failed(summary)
                return summary
            self._run_stage(self.first_stage(), finished, scheduler, summary)
            finished = self.finished_runs()
            table = self.selection_table(finished)
            if table is not None:
                summary.chosen = self.chosen(table)
                self._log_selection(table)
                self._run_stage(final_cells(self.config, summary.chosen), finished, scheduler, summary)
                finished = self.finished_runs()
        summary.pending = [c.id for c in self.plan(finished) if c.id not in finished]
        self._supersede({run.info.run_name: run.info.run_id for run in finished.values()})
        if report:
            from .report import write_report  # matplotlib, only when a report is written

            summary.report = write_report(self.report_source(finished))
        if not summary.pending and not summary.failed:
            self.client.set_terminated(summary.parent_run_id, "FINISHED")
        _raise_if_failed(summary)
        return summary

    def _run_stage(self, cells: list[Cell], finished: dict[str, Run], scheduler: Scheduler,
                   summary: RunSummary) -> None:
        summary.skipped += [c.id for c in cells if c.id in finished]
        scheduler.run([c for c in cells if c.id not in finished], summary)

    def report_source(self, finished: dict[str, Run]) -> ReportSource:
        """The results table of the cells in the current plan, and where the report goes."""
        from .report import ReportSource, collect

        plan = self.plan(finished)
        return ReportSource(
            config=self.config, cells=collect(self.config, finished, {c.id for c in plan}),
            selection=self.selection_table(finished), client=self.client, parent_run_id=self.parent_run_id(),
            output_dir=self.output_dir, experiment_file=self.path.name, overrides=self.overrides,
            tracking_uri=self.tracking_uri, finished=sum(c.id in finished for c in plan), planned=len(plan))

    def _log_selection(self, table: dict[str, list[CandidateResult]]) -> None:
        from .report import selection_markdown

        text = selection_markdown(self.config, table)
        out = self.output_dir / "report"
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.md").write_text(text, encoding="utf-8")
        self.client.log_text(self.parent_run_id(), text, "report/selection.md")


# Where data, results and runs live, and how fast it goes, differ between the machines that run one experiment's
# cells; none of it changes what a cell computes.
_LOCAL_KEYS = ("output_dir", "tracking.", "data.manifest", "data.root", "data.cache", "data.num_workers",
               "train.device")


def fingerprint(base: PipelineConfig) -> str:
    """Hash of what every cell shares beyond its own settings (the base pipeline after the experiment's overrides)."""
    flat = {k: v for k, v in base.flat().items() if not k.startswith(_LOCAL_KEYS)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def _raise_if_failed(summary: RunSummary) -> None:
    if summary.failed:
        raise ExperimentError("cells failed (finished cells are kept; run the same command again to retry):\n  "
                              + "\n  ".join(f"{k}: {v}" for k, v in summary.failed.items()))


def _pick(plan: list[Cell], key: str, exp: ExperimentConfig) -> Cell:
    for cell in plan:
        if cell.id == key:
            return cell
    if key.isdigit() and int(key) < len(plan):
        return plan[int(key)]
    hint = " (final-stage cells exist only after every CV cell finished)" if exp.selection is not None else ""
    raise ExperimentError(f"cell {key!r} is not in the plan of {exp.name} ({len(plan)} cells){hint}; "
                          f"list them with `medgcsam experiment FILE --plan`")


def describe(cell: Cell, finished: dict[str, Run]) -> dict[str, Any]:
    """One row of the plan listing."""
    run = finished.get(cell.id)
    return {"id": cell.id, "name": cell.name, "status": "finished" if run else "pending",
            "run_id": run.info.run_id if run else ""}
