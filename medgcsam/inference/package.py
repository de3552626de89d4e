"""Package a trained classifier so it can be served anywhere, and load it back without unpickling.

A logged model carries three things: a ``torch.export`` (pt2) graph so MLflow's own pyfunc serving
works, the plain state dict (``extra_files/state_dict.pt``) and the :class:`ModelSpec`
(``extra_files/spec.json``, also in the MLmodel ``metadata``). :func:`load_classifier` never touches
the pt2 graph: it rebuilds the timm model from the spec and loads the state dict with
``weights_only=True``, so the result can move to any device, be fine-tuned, and nothing from the
artifact store can execute code on the inference machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import torch
from mlflow.models import infer_signature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from pydantic import ValidationError
from torch import nn

from medgcsam.files import pause_point
from medgcsam.models.factory import create_model, load_state_dict_file
from medgcsam.models.ood import OOD_FILE, OODStats, load_ood, save_ood
from medgcsam.models.spec import ModelSpec
from medgcsam.tracking.uri import http_unreachable

STATE_DICT_FILE = "state_dict.pt"
SPEC_FILE = "spec.json"
EXTRA_FILES_DIR = "extra_files"  # where mlflow.pytorch copies ``extra_files`` inside the model
METADATA_KEY = "medgcsam_spec"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/")
MODEL_REFERENCE_HELP = ("models:/name@alias, models:/name/3, models:/m-<id>, runs:/<id>/model, "
                        "a downloaded MLflow model folder, or a checkpoint .pt file")


class ModelLoadError(RuntimeError):
    """A model reference that cannot be turned into a classifier; the message says which and why."""


def log_classifier(
    model: nn.Module,
    spec: ModelSpec,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    alias: str | None = None,
    ood: OODStats | None = None,
):
    """Log ``model`` as an MLflow LoggedModel (pt2 + state dict + spec, and ``ood`` statistics when given as
    ``extra_files/ood.pt``); register and alias it when asked.

    The model is exported in eval mode on CPU with a batch-2 example so the batch dimension stays
    dynamic in the pt2 graph (a batch of 1 would be specialized to a constant). Call inside an
    active run so the model is linked to the run that trained it. Returns MLflow's ``ModelInfo``.
    """
    if alias is not None and registered_model_name is None:
        raise ValueError(f"alias {alias!r} needs registered_model_name: an alias points at a registered version")
    was_training = model.training
    device = next(model.parameters()).device
    cpu_model = model.to("cpu").eval()
    pre = spec.preprocessing
    example = torch.rand(2, spec.in_chans, pre.image_size, pre.image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            logits = cpu_model(example)
        if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
            raise ValueError(f"model outputs shape {tuple(logits.shape)} for a batch of 2, but the spec says "
                             f"{spec.num_classes} classes {spec.class_names}; log the model with its own spec")
        signature = infer_signature(example.numpy(), logits.numpy())
        with tempfile.TemporaryDirectory(prefix="medgcsam-log-") as tmp:
            state_path, spec_path = Path(tmp) / STATE_DICT_FILE, Path(tmp) / SPEC_FILE
            torch.save({k: v.detach().clone() for k, v in cpu_model.state_dict().items()}, state_path)
            spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
            extra = [str(state_path), str(spec_path)]
            if ood is not None:
                extra.append(str(save_ood(ood, Path(tmp) / OOD_FILE)))
            info = mlflow.pytorch.log_model(
                cpu_model,
                name=name,
                serialization_format="pt2",
                input_example=example.numpy(),
                signature=signature,
                metadata={METADATA_KEY: spec.model_dump(mode="json")},
                extra_files=extra,
                registered_model_name=registered_model_name,
            )
    finally:
        model.to(device).train(was_training)
    if alias is not None:
        mlflow.MlflowClient().set_registered_model_alias(registered_model_name, alias, info.registered_model_version)
    pause_point("model registered")
    return info


def registered_by_run(name: str, run_id: str, alias: str | None = None) -> dict[str, str] | None:
    """The version of ``name`` that run ``run_id`` already registered, with ``alias`` (re)set on it: a run resumed
    after a kill between MLflow's registration and the run's record of it reuses that version instead of
    registering a second. MLflow registers a version only once its artifacts are uploaded, so it is complete."""
    client = mlflow.MlflowClient()
    quote = '"' if "'" in name else "'"  # the filter grammar has no escapes
    versions = [v for v in client.search_model_versions(f"name = {quote}{name}{quote}") if v.run_id == run_id]
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return {"model_uri": version.source, "version": str(version.version)}


def load_classifier(uri_or_path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the classifier from a registry/run/logged-model URI, a model folder, or an engine checkpoint.

    Accepted: ``models:/name@alias``, ``models:/name/3``, ``models:/m-<id>``, ``runs:/<run_id>/model``,
    a local MLflow model folder (with ``MLmodel``), or a checkpoint ``.pt`` written by the engine
    (a dict with ``"model"``: state dict and ``"spec"``: ModelSpec dict). Returns ``(model.eval(), spec)``.
    """
    model, spec, _ = load_classifier_with_ood(uri_or_path, device=device)
    return model, spec


def load_classifier_with_ood(uri_or_path: str | Path, *,
                             device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, OODStats | None]:
    """:func:`load_classifier` plus the OOD statistics stored with the model (None for a model without them)."""
    ref = str(uri_or_path)
    if ref.startswith(URI_SCHEMES):
        stores = set() if ref.startswith("file:/") else {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}
        for store in stores:
            # MLflow's client retries a dead server for minutes; a batch job should say so at once
            reason = http_unreachable(store) if urlparse(store).scheme in ("http", "https") else None
            if reason is not None:
                raise ModelLoadError(f"cannot fetch {ref}: MLflow server {store} is unreachable ({reason}); start "
                                     f"it or set MLFLOW_TRACKING_URI to the store that holds the model")
        with tempfile.TemporaryDirectory(prefix="medgcsam-load-") as tmp:
            try:
                local = get_artifact_repository(ref).download_artifacts(EXTRA_FILES_DIR, dst_path=tmp)
            except Exception as exc:  # MLflow raises several types (MlflowException, OSError, KeyError)
                raise ModelLoadError(f"cannot fetch {ref}/{EXTRA_FILES_DIR}: {exc}. Check the model name/alias, "
                                     f"MLFLOW_TRACKING_URI, and that it was logged with log_classifier") from exc
            spec, state, ood = _read_model_dir(Path(local), ref)
    else:
        path = Path(ref)
        if path.is_dir():
            spec, state, ood = _read_model_dir(path / EXTRA_FILES_DIR, ref)
        elif path.is_file():
            spec, state, ood = _read_checkpoint(path)
        else:
            raise ModelLoadError(f"model {ref!r} is neither an existing file/folder nor a models:/ or runs:/ URI")
    return build_classifier(spec, state, source=ref).to(device), spec, ood


def build_classifier(spec: ModelSpec, state_dict: dict[str, torch.Tensor], *, source: str = "") -> nn.Module:
    """The timm model the spec describes, with ``state_dict`` loaded strictly, in eval mode."""
    try:
        model = create_model(spec.backbone, spec.num_classes, in_chans=spec.in_chans,
                             image_size=spec.preprocessing.image_size)
    except ValueError as exc:  # e.g. a backbone this timm version does not have
        raise ModelLoadError(f"{source}: {exc}") from exc
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: weights do not fit backbone {spec.backbone!r} with "
                             f"{spec.num_classes} classes: {exc}") from exc
    return model.eval()


def _read_model_dir(extra_dir: Path, source: str) -> tuple[ModelSpec, dict[str, torch.Tensor], OODStats | None]:
    spec_path, state_path = extra_dir / SPEC_FILE, extra_dir / STATE_DICT_FILE
    for p in (spec_path, state_path):
        if not p.is_file():
            raise ModelLoadError(f"{source}: {EXTRA_FILES_DIR}/{p.name} missing; the model was not logged with "
                                 f"medgcsam.inference.package.log_classifier")
    try:
        state = load_state_dict_file(state_path)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe state dict"
        raise ModelLoadError(f"{source}: {EXTRA_FILES_DIR}/{STATE_DICT_FILE} is not a weights-only state dict "
                             f"({exc})") from exc
    ood_path = extra_dir / OOD_FILE
    try:
        ood = load_ood(ood_path) if ood_path.is_file() else None
    except Exception as exc:  # unpickling errors come in many types
        raise ModelLoadError(f"{source}: {EXTRA_FILES_DIR}/{OOD_FILE} cannot be read ({exc})") from exc
    return *_checked(source, spec_path.read_text(encoding="utf-8"), state), ood


def _read_checkpoint(path: Path) -> tuple[ModelSpec, dict[str, torch.Tensor], OODStats | None]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe checkpoint"
        raise ModelLoadError(f"{path}: not a weights-only torch checkpoint ({exc}); pass a file written by "
                             f"`medgcsam train` or a models:/ URI") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelLoadError(f"{path}: checkpoint needs keys 'model' (state dict) and 'spec' (model card); "
                             f"found {keys}")
    try:
        ood = OODStats.from_state(ckpt["ood"], f"{path} ['ood']") if "ood" in ckpt else None
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    return *_checked(str(path), ckpt["spec"], ckpt["model"]), ood


def _checked(source: str, spec: str | dict, state: Any) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The model card (JSON text or dict) and the weights, refused with ModelLoadError when damaged, so that a bad
    model reads as a model error and not as a prediction job that crashed part-way."""
    try:
        parsed = ModelSpec.model_validate_json(spec) if isinstance(spec, str) else ModelSpec.model_validate(spec)
    except ValidationError as exc:
        raise ModelLoadError(f"{source}: the model spec is not valid: {exc}") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{source}: the weights are a {type(state).__name__}, not a state dict")
    return parsed, state
