"""Out-of-distribution scores: how unlike the training images an input is, per image.

Mahalanobis distance on the backbone's pooled penultimate features (Lee et al. 2018): one mean per
class and one covariance shared by all classes, fitted on the training split, shrunk towards a scaled
identity (Ledoit-Wolf) so that a few hundred images in a 512-dimensional feature space still give an
invertible, stable matrix. The score of an image is its distance to the nearest class mean. The flag
threshold is the ``1 - false_alarm`` quantile of the validation split's scores: by construction about
5% of in-distribution images are flagged, and the rate on the test split says whether that held.

The statistics are a dict of tensors (``ood.pt`` in a logged model, ``"ood"`` in a checkpoint), so they
load with ``torch.load(weights_only=True)`` like the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

OOD_FILE = "ood.pt"
FALSE_ALARM = 0.05  # the share of in-distribution (validation) images the threshold flags
_KEYS = ("means", "precision", "threshold", "false_alarm", "n_train", "shrinkage")


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pooled penultimate features from one forward pass (timm's forward_features/forward_head)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"{type(model).__name__} has no forward_features/forward_head (a timm model has them); "
                         f"OOD scores need the pooled features before the classifier")
    feats = model.forward_features(images)
    return model.forward_head(feats), model.forward_head(feats, pre_logits=True).flatten(1)


@dataclass(frozen=True)
class OODStats:
    """Class means and shared precision of the training features, and the flag threshold on the distance."""

    means: torch.Tensor  # (K, D) float32
    precision: torch.Tensor  # (D, D) float32
    threshold: float
    false_alarm: float
    n_train: int
    shrinkage: float

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of ``features`` (B, D) to its nearest class mean, on its device."""
        f = features.float()
        diff = f[:, None, :] - self.means.to(f.device)[None]  # (B, K, D)
        d2 = torch.einsum("bkd,de,bke->bk", diff, self.precision.to(f.device), diff)
        return d2.min(dim=1).values.clamp_min(0).sqrt()

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.float().cpu(), "precision": self.precision.float().cpu(),
                "threshold": torch.tensor(self.threshold, dtype=torch.float64),
                "false_alarm": torch.tensor(self.false_alarm, dtype=torch.float64),
                "n_train": torch.tensor(self.n_train, dtype=torch.int64),
                "shrinkage": torch.tensor(self.shrinkage, dtype=torch.float64)}

    @classmethod
    def from_state(cls, state: object, source: str = "OOD statistics") -> OODStats:
        """Refuse a damaged file here, by name, rather than as a shape error in the middle of a prediction job."""
        if not isinstance(state, dict) or any(k not in state or not torch.is_tensor(state[k]) for k in _KEYS):
            raise ValueError(f"{source}: not OOD statistics (a dict of tensors {list(_KEYS)}); refit them by "
                             f"training again, or remove the file to predict without OOD flags")
        means, precision = state["means"].float(), state["precision"].float()
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"{source}: means {tuple(means.shape)} and precision {tuple(precision.shape)} do not "
                             f"fit together; the file is damaged")
        return cls(means, precision, float(state["threshold"]), float(state["false_alarm"]),
                   int(state["n_train"]), float(state["shrinkage"]))


def ood_scores(model: nn.Module, stats: OODStats, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and OOD distances of a normalized batch, for callers (e.g. the served model) that hold the model."""
    logits, features = logits_and_features(model, images)
    return logits, stats.scores(features)


@torch.no_grad()
def collect(model: nn.Module, loader: Iterable, device: torch.device | str,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, D) and labels (N,) of a loader of ``{"image", "label"}`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            x = batch["image"].to(device)
            _, f = logits_and_features(model, prepare(x) if prepare is not None else x)
            feats.append(f.float())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("no images to fit the OOD statistics on")
    return torch.cat(feats).cpu().double().numpy(), torch.cat(labels).cpu().long().numpy()


def fit_ood(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
            false_alarm: float = FALSE_ALARM) -> OODStats:
    """Class means and a Ledoit-Wolf shrunk shared covariance on training features; the threshold flags a
    ``false_alarm`` share of the validation features."""
    from sklearn.covariance import ledoit_wolf

    if not 0.0 < false_alarm < 1.0:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    classes = np.unique(train_labels)
    means = np.zeros((int(train_labels.max()) + 1, train_features.shape[1]))
    for k in classes:
        means[k] = train_features[train_labels == k].mean(axis=0)
    centred = train_features - means[train_labels]
    cov, shrinkage = ledoit_wolf(centred, assume_centered=True)
    precision = np.linalg.pinv(cov, hermitian=True)
    stats = OODStats(torch.from_numpy(means[classes]).float(), torch.from_numpy(precision).float(), float("inf"),
                     false_alarm, len(train_labels), float(shrinkage))
    val_scores = stats.scores(torch.from_numpy(val_features)).numpy()
    threshold = float(np.quantile(val_scores, 1.0 - false_alarm, method="higher"))
    return OODStats(stats.means, stats.precision, threshold, false_alarm, stats.n_train, stats.shrinkage)


def save_ood(stats: OODStats, path: str | Path) -> Path:
    path = Path(path)
    torch.save(stats.state(), path)
    return path


def load_ood(path: str | Path) -> OODStats:
    """Weights-only load: the file comes from an artifact store and must not be able to run code."""
    return OODStats.from_state(torch.load(path, map_location="cpu", weights_only=True), str(path))
