"""The stages after training of a pipeline run (rank 0, on the selected weights): the curves and gradient-norm
trace, the clinical evaluation (its frozen operating point goes into the model card and ``best.pt``), the OOD
statistics, the Hessian sharpness, and the logged (registered) model.

Each stage is done once per run: ``finished_stages.json`` records the ones done (with their results) under the
run id, so ``--resume`` after a failure runs only the stages left, and on a finished run none (no second
registry version). A failure names the stage; the weights are on disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch

from medgcsam import checkpoint as ckpt_io
from medgcsam.config import PipelineConfig
from medgcsam.data.datasets import DataBundle
from medgcsam.engine.loop import Handler, Trainer
from medgcsam.engine.metrics import EPOCH_PREFIX
from medgcsam.engine.ood import fit_and_store_ood, stored_ood
from medgcsam.files import replace_atomically
from medgcsam.models.spec import ModelSpec
from medgcsam.tracking import figures as figs

log = logging.getLogger(__name__)

STAGES_FILE = "finished_stages.json"  # which end-of-training stages this run has done
TRACE = "grad_norm_trace.csv"


class FinishError(RuntimeError):
    """Training finished and its checkpoints are on disk, but a stage after it (logging, evaluation,
    sharpness, model registration) failed; ``--resume`` runs the remaining stages."""


class EndStages(Handler):
    """Runs the stages ``cfg`` asks for into ``run_dir`` and the active MLflow run; ``model_uri``/``version`` say
    what was logged. ``spec`` is the model card (updated with the evaluation's operating point)."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, checkpoint_dir: Path, bundle: DataBundle,
                 spec: ModelSpec, uri: str) -> None:
        self.cfg, self.dir, self.ckpt_dir, self.bundle, self.spec, self.uri = (cfg, run_dir, checkpoint_dir, bundle,
                                                                                spec, uri)
        self.model_uri: str | None = None
        self.version: str | None = None

    def on_end(self, trainer: Trainer) -> None:
        st = trainer.state
        if trainer.val_loader is not None and st.best_epoch < 0:
            raise FinishError(f"no epoch gave a finite validation {trainer.monitor} (it was NaN every time, "
                              f"e.g. AUROC on a validation split with one class), so no model was selected and "
                              f"nothing was evaluated or registered. Monitor val_loss or val_balanced_accuracy, or "
                              f"give the validation split every class; the last weights are in "
                              f"{self.ckpt_dir / ckpt_io.LAST}")
        if not trainer.ctx.is_main:
            return
        cfg = self.cfg
        self.run_id, self.trainer = st.mlflow_run_id, trainer
        trace_csv = self.dir / TRACE
        replace_atomically(trace_csv, lambda fh: fh.write("step,grad_norm,grad_norm_gc\n" + "".join(
            f"{int(s)},{a:.8g},{b:.8g}\n" for s, a, b in st.grad_trace)))
        self._stage("curves", f"logging the training curves to {self.uri}", lambda: self._log_training(trace_csv))
        if cfg.evaluation.enabled:
            spec = self._stage("evaluation", "the end-of-training evaluation", self._evaluate)
            if spec is not None:  # the frozen operating point travels with the model
                self.spec = ModelSpec.model_validate(spec)
            self._stage("ood", "fitting the OOD statistics", lambda: fit_and_store_ood(  # issue 20: OOD flags
                trainer.raw, self.bundle, trainer.device, cfg.data.eval_batch_size or cfg.data.batch_size,
                self.dir, self.ckpt_dir / ckpt_io.BEST))
        if cfg.sharpness.enabled:
            self._stage("sharpness", "the end-of-training sharpness", self._sharpness)
        if cfg.tracking.log_model:
            logged = self._stage("model", f"logging the model to {self.uri}", self._log_model)
            self.model_uri, self.version = logged["model_uri"], logged["version"]

    def _stage(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        path = self.dir / STAGES_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        done = saved.get("done", {}) if saved.get("run_id") == self.run_id else {}
        if key in done:
            return done[key]
        try:
            result = fn()
        except Exception as exc:
            raise FinishError(f"training finished but {what} failed ({type(exc).__name__}: {exc}); the weights "
                              f"are in {self.ckpt_dir / ckpt_io.BEST}; rerun with --resume to finish") from exc
        done[key] = result
        replace_atomically(path, lambda fh: json.dump({"run_id": self.run_id, "done": done}, fh))
        return result

    def _log_training(self, trace_csv: Path) -> None:
        st = self.trainer.state
        mlflow.log_artifact(str(trace_csv), "training")
        mlflow.log_dict({"history": st.history, "epoch_times": st.epoch_times}, "training/history.json")
        for fig, name in ((figs.curves_figure(st.history, EPOCH_PREFIX), "training/curves.png"),
                          (figs.grad_norm_figure(*zip(*st.grad_trace, strict=True)) if st.grad_trace
                           else None, "training/grad_norm.png")):
            if fig is not None:
                mlflow.log_figure(fig, name)
                figs.close(fig)

    def _log_model(self) -> dict[str, str | None]:
        from medgcsam.inference.package import log_classifier, registered_by_run
        from medgcsam.tracking.lineage import record_lineage

        cfg = self.cfg
        alias = cfg.tracking.alias if cfg.tracking.register_as else None
        if cfg.tracking.register_as and (done := registered_by_run(cfg.tracking.register_as, self.run_id, alias)):
            return done  # registered before a kill stopped this stage being recorded: no second version
        info = log_classifier(self.trainer.raw, self.spec, name="model", registered_model_name=cfg.tracking.register_as,
                              alias=alias, ood=stored_ood(self.dir), example_image=self.bundle.train.paths[0])
        version = info.registered_model_version
        record_lineage(cfg, self.spec, self.bundle.manifest_sha256, self.bundle.frames,
                       self.dir / "evaluation" / "evaluation.json",
                       (cfg.tracking.register_as, version) if version is not None else None)
        return {"model_uri": info.model_uri, "version": str(version) if version is not None else None}

    def _evaluate(self) -> dict[str, Any] | None:
        """Operating point and calibration chosen on validation, then reported on every split; returns the
        model spec carrying the frozen threshold (None when there is no validation split to choose it on)."""
        from medgcsam.evaluation.evaluate import evaluate, log_evaluation

        if self.bundle.val is None:
            log.warning("evaluation skipped: it needs a validation split (data.val_fold or split=val rows)")
            return None
        result = evaluate(self.trainer.raw, self.bundle, self.spec, self.cfg.evaluation, self.trainer.device,
                          self.dir / "evaluation", batch_size=self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                          seed=self.cfg.train.seed)
        log_evaluation(result)
        spec = result.spec.model_dump(mode="json")
        best = self.ckpt_dir / ckpt_io.BEST
        if best.is_file():  # the checkpoint serves `predict` too, so it carries the frozen threshold as well
            ckpt_io.update_checkpoint(best, spec=spec)
        return spec

    def _sharpness(self) -> None:
        """Hessian sharpness of the selected weights on a fixed, augmentation-free subset of the train split."""
        from medgcsam.sharpness.compute import compute_sharpness, log_sharpness

        out, device = self.dir / "sharpness", self.trainer.device
        metrics = compute_sharpness(self.trainer.raw, self.bundle.train.without_augmentation(), self.cfg.sharpness,
                                    device, out)
        if device.type == "cuda":  # issue 23: the Hessian products may set the run's memory peak
            metrics["gpu/peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        log_sharpness(metrics, out)
