"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits by NLL.

Dividing logits by T leaves the argmax, hence accuracy and the confusion matrix, unchanged;
only the confidence changes, so ECE before and after compares like with like.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

# A validation split that the model separates perfectly drives the NLL-optimal T to 0 (or, all wrong, to
# infinity); such a T means nothing on test, so the search is bounded to a plausible range.
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The NLL of softmax(beta * logits) is convex in beta = 1/T, so a bounded 1-D search over beta finds the
    optimum exactly, with T kept in [T_MIN, T_MAX] (float64, CPU)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)

    def nll(beta: float) -> float:
        return float(F.cross_entropy(z * beta, y))

    result = minimize_scalar(nll, bounds=(1.0 / T_MAX, 1.0 / T_MIN), method="bounded", options={"xatol": 1e-7})
    return float(1.0 / result.x)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
