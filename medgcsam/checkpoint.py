"""Crash-safe checkpoints that ``torch.load(weights_only=True)`` can read.

Only tensors and primitives go in (RNG states are converted), and every write goes to a temporary
file that replaces the old one atomically, so a SIGKILL at any moment leaves the previous
checkpoint intact.

``last.pt`` and ``best.pt`` are one record: ``last.pt`` names the SHA-256 of the best weights, and a new
``best.pt`` is committed in three steps (staged as ``best.pt.staged``, then ``last.pt`` naming it, then the
rename), so after a kill at any instant :func:`load_best` finds the weights ``last.pt`` names, completes an
interrupted rename, or refuses: a resumed run never registers stale weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgcsam.files import exclusive_lock, pause_point, remove_stale_temps, temp_path

LAST, BEST = "last.pt", "best.pt"
STAGED = "best.pt.staged"  # a new best.pt, written before last.pt names it
RUN_LOCK = "train.lock"  # in the run folder, while a process trains into it

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """Checkpoints that do not belong together; the message names the files and what to do."""


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in weights-only-loadable form."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("xb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        pause_point(f"replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names and tensor bytes: what ``last.pt`` records of the best weights."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_pair(directory: Path, payload: dict[str, Any], *, best: bool, best_sha256: str | None) -> str | None:
    """Write ``last.pt`` (and, when ``best``, ``best.pt`` from the same payload) so that the pair agrees at every
    instant; returns the digest of the best weights that ``last.pt`` now names (``best_sha256`` when not ``best``)."""
    if best:
        best_sha256 = weights_digest(payload["model"])
        save_checkpoint(directory / STAGED, payload)
    payload = {**payload, "best_sha256": best_sha256}
    save_checkpoint(directory / LAST, payload)
    if best:
        pause_point("commit best.pt")
        os.replace(directory / STAGED, directory / BEST)
    return best_sha256


def lock_run(directory: Path) -> contextlib.AbstractContextManager:
    """Held by the one process training into ``directory``: a second would overwrite its checkpoints (and take
    its temp files for stale ones); a lock left by a killed run is taken over."""
    directory.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(directory / RUN_LOCK, f"run folder {directory}",
                          "wait for it to finish, or give this run another name or output_dir", error=CheckpointError)


def remove_stale_files(directory: Path, *others: Path) -> None:
    """Temp files of writes a kill interrupted (a checkpoint's is as large as the checkpoint), in the checkpoint
    ``directory`` and of the ``others``. Only the process that owns the run folder calls this, before it writes."""
    for path in remove_stale_temps(*(directory / name for name in (LAST, BEST, STAGED)), *others):
        log.info("removed %s, left by an interrupted write", path)


def load_best(directory: Path, last: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The best weights that ``last`` names, and their digest; completes a ``best.pt`` commit a kill interrupted,
    and refuses a ``best.pt`` that is not the one ``last.pt`` names (never resume, and then register, stale ones)."""
    epoch, want = last["best_epoch"], last.get("best_sha256")
    best, staged = directory / BEST, directory / STAGED
    if epoch < 0:  # nothing selected yet; a best.pt here is from an earlier run in this folder
        staged.unlink(missing_ok=True)
        return None, None
    found: dict[str, str] = {}
    for path in (best, staged, best):  # best again: another rank may have just completed the rename
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except FileNotFoundError:
            continue
        digest = weights_digest(state["model"])
        if digest == want or (want is None and state.get("epoch") == epoch + 1):  # None: written before digests
            if path == staged:
                with contextlib.suppress(FileNotFoundError):  # another rank completed it first
                    os.replace(staged, best)
                log.warning("completed the interrupted commit of %s (best epoch %d)", best, epoch + 1)
            staged.unlink(missing_ok=True)  # a staged best.pt of an epoch after last.pt: that epoch is redone
            return state["model"], digest
        found[path.name] = f"{path.name} holds epoch {state.get('epoch')} (weights sha256 {digest[:12]})"
    what = "; ".join(found.values()) if found else f"{best} does not exist"
    raise CheckpointError(f"{directory / LAST} names best epoch {epoch + 1} (weights sha256 {str(want)[:12]}), but "
                          f"{what}: the checkpoints do not belong together (copied or changed by hand?). Restore the "
                          f"matching {BEST}, or start a new run without --resume")


def update_checkpoint(path: str | Path, **fields: Any) -> Path:
    """Set ``fields`` in the checkpoint at ``path`` and write it back atomically (the model card and OOD
    statistics that stages after training add to ``best.pt``, a threshold that ``evaluate`` stores)."""
    state = load_checkpoint(path)
    state.update(fields)
    return save_checkpoint(path, state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run without --resume to start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a checkpoint we wrote"
        raise ValueError(f"{path}: not a medgcsam weights-only checkpoint ({exc}); delete it or start a new "
                         f"run without --resume") from exc
