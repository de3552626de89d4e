"""Package a trained classifier so it can be served anywhere, and load it back without unpickling.

A logged model is an MLflow pyfunc (:mod:`medgcsam.inference.pyfunc`, logged as models-from-code) that
answers per image, with two artifacts: the plain state dict (``artifacts/state_dict.pt``, the only copy of
the weights) and the :class:`ModelSpec` (``artifacts/spec.json``, also in the MLmodel ``metadata``).
:func:`load_classifier` rebuilds the timm model from the spec and loads the state dict with
``weights_only=True``, so the result can move to any device, be fine-tuned, and nothing from the
artifact store can execute code on the inference machine. Models logged before (pt2 graph plus
``extra_files/``) still load.
"""

from __future__ import annotations

import io
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from PIL import Image
from pydantic import ValidationError
from torch import nn

from medgcsam.data.io import read_image
from medgcsam.files import pause_point
from medgcsam.inference import pyfunc
from medgcsam.models.factory import ModelLoadError, build_classifier, load_state_dict_file
from medgcsam.models.ood import OOD_FILE, OODStats, load_ood, save_ood
from medgcsam.models.spec import ModelSpec
from medgcsam.tracking.uri import http_unreachable

STATE_DICT_FILE = "state_dict.pt"
SPEC_FILE = "spec.json"
ARTIFACTS_DIR = "artifacts"  # where mlflow.pyfunc copies ``artifacts`` inside the model
EXTRA_FILES_DIR = "extra_files"  # the same files in models logged as pt2 by earlier versions
# what the served model needs beyond medgcsam itself, at the versions it was logged with
SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "monai", "pydicom", "pillow", "numpy", "pandas", "mlflow")
METADATA_KEY = "medgcsam_spec"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/")
MODEL_REFERENCE_HELP = ("models:/name@alias, models:/name/3, models:/m-<id>, runs:/<id>/model, "
                        "a downloaded MLflow model folder, or a checkpoint .pt file")


def log_classifier(
    model: nn.Module,
    spec: ModelSpec,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    alias: str | None = None,
    ood: OODStats | None = None,
    example_image: str | Path | None = None,
):
    """Log ``model`` as an MLflow LoggedModel (image pyfunc + state dict + spec, and the ``ood`` statistics when
    given); register and alias it when asked.

    ``example_image`` (a training image) becomes the input example, re-encoded as a PNG of its pixels so no
    DICOM header reaches the artifact store; MLflow serves it once at logging time, which proves the logged
    model loads and answers. Call inside an active run so the model is linked to the run that trained it.
    Returns MLflow's ``ModelInfo``.
    """
    if alias is not None and registered_model_name is None:
        raise ValueError(f"alias {alias!r} needs registered_model_name: an alias points at a registered version")
    was_training = model.training
    device = next(model.parameters()).device
    cpu_model = model.to("cpu").eval()
    pre = spec.preprocessing
    signature = ModelSignature(pyfunc.input_schema(), pyfunc.output_schema(spec, ood is not None),
                               pyfunc.params_schema())
    example = None if example_image is None else pd.DataFrame({pyfunc.IMAGE: [example_png(example_image)]})
    try:
        with torch.no_grad():
            logits = cpu_model(torch.zeros(2, spec.in_chans, pre.image_size, pre.image_size))
        if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
            raise ValueError(f"model outputs shape {tuple(logits.shape)} for a batch of 2, but the spec says "
                             f"{spec.num_classes} classes {spec.class_names}; log the model with its own spec")
        with tempfile.TemporaryDirectory(prefix="medgcsam-log-") as tmp:
            state_path, spec_path = Path(tmp) / STATE_DICT_FILE, Path(tmp) / SPEC_FILE
            torch.save({k: v.detach().clone() for k, v in cpu_model.state_dict().items()}, state_path)
            spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
            artifacts = {"state_dict": str(state_path), "spec": str(spec_path)}
            if ood is not None:
                artifacts["ood"] = str(save_ood(ood, Path(tmp) / OOD_FILE))
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(pyfunc.ENTRY_FILE),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                metadata={METADATA_KEY: spec.model_dump(mode="json")},
                pip_requirements=[f"{p}=={installed_version(p)}" for p in SERVING_REQUIREMENTS],
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


def example_png(path: str | Path, max_side: int = 256) -> bytes:
    """The pixels of a real image as a small PNG (8-bit, at most ``max_side``): an input example with no header."""
    pixels = np.rint(read_image(path, multiframe="first") * 255).astype(np.uint8)
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


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
            local = _download_model_files(ref, Path(tmp))
            spec, state, ood = _read_model_dir(local, ref)
    else:
        path = Path(ref)
        if path.is_dir():
            files = path / ARTIFACTS_DIR
            spec, state, ood = _read_model_dir(files if (files / SPEC_FILE).is_file() else path / EXTRA_FILES_DIR,
                                               ref)
        elif path.is_file():
            spec, state, ood = _read_checkpoint(path)
        else:
            raise ModelLoadError(f"model {ref!r} is neither an existing file/folder nor a models:/ or runs:/ URI")
    return build_classifier(spec, state, source=ref).to(device), spec, ood


def _download_model_files(ref: str, dst: Path) -> Path:
    """The folder holding spec.json and state_dict.pt of a model URI, downloaded (``extra_files/`` when the model
    predates the image pyfunc)."""
    try:
        repo = get_artifact_repository(ref)
        names = {Path(f.path).name for f in repo.list_artifacts("")}
        folder = ARTIFACTS_DIR if ARTIFACTS_DIR in names else EXTRA_FILES_DIR
        return Path(repo.download_artifacts(folder, dst_path=str(dst)))
    except Exception as exc:  # MLflow raises several types (MlflowException, OSError, KeyError)
        raise ModelLoadError(f"cannot fetch {ref}: {exc}. Check the model name/alias, "
                             f"MLFLOW_TRACKING_URI, and that it was logged with log_classifier") from exc


def _read_model_dir(extra_dir: Path, source: str) -> tuple[ModelSpec, dict[str, torch.Tensor], OODStats | None]:
    spec_path, state_path = extra_dir / SPEC_FILE, extra_dir / STATE_DICT_FILE
    for p in (spec_path, state_path):
        if not p.is_file():
            raise ModelLoadError(f"{source}: {extra_dir.name}/{p.name} missing; the model was not logged with "
                                 f"medgcsam.inference.package.log_classifier")
    try:
        state = load_state_dict_file(state_path)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe state dict"
        raise ModelLoadError(f"{source}: {extra_dir.name}/{STATE_DICT_FILE} is not a weights-only state dict "
                             f"({exc})") from exc
    ood_path = extra_dir / OOD_FILE
    try:
        ood = load_ood(ood_path) if ood_path.is_file() else None
    except Exception as exc:  # unpickling errors come in many types
        raise ModelLoadError(f"{source}: {extra_dir.name}/{OOD_FILE} cannot be read ({exc})") from exc
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
