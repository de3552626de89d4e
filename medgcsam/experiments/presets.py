"""Authors' default hyperparameters per optimizer (docs/shared optimizers.md section 2), as dotted overrides.

A method in an experiment starts from its preset; the experiment file may override any value.
The learning rate and base optimizer come from the base pipeline (the GCSAM paper: Adam, lr 1e-4),
so presets only carry what is specific to the method.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "adam": {"optimizer.name": "adam"},
    "adamw": {"optimizer.name": "adamw"},
    "sgd": {"optimizer.name": "sgd"},
    "gc_adam": {"optimizer.name": "gc_adam"},
    # SAM: Foret et al. / davda54 default radius.
    "sam": {"optimizer.name": "sam", "optimizer.rho": 0.05},
    # ASAM: official SamsungLabs class defaults (rho about 10x SAM's, eta 0.01).
    "asam": {"optimizer.name": "asam", "optimizer.rho": 0.5, "optimizer.eta": 0.01},
    # GSAM: constant radius 0.05 (SAM's) and the PyTorch ports' surrogate-gap weight 0.4.
    "gsam": {"optimizer.name": "gsam", "optimizer.rho": 0.05, "optimizer.alpha": 0.4},
    # WSAM: official class radius, README gamma.
    "wsam": {"optimizer.name": "wsam", "optimizer.rho": 0.05, "optimizer.gamma": 0.9},
    # CR-SAM: the official training script's values.
    "crsam": {"optimizer.name": "crsam", "optimizer.rho": 0.1, "optimizer.gamma": 0.1, "optimizer.beta": 0.01},
    # MSAM: no rho here, so the optimizer's base-dependent class default applies (1.0 Adam-type, 0.3 SGD).
    "msam": {"optimizer.name": "msam"},
    # GCSAM: author script radius; GC on the ascent only.
    "gcsam": {"optimizer.name": "gcsam", "optimizer.rho": 0.05},
}

# Forward+backward passes per step; the first criterion of "simpler" in the selection rule.
PASSES: dict[str, int] = {
    "adam": 1, "adamw": 1, "sgd": 1, "gc_adam": 1, "msam": 1,
    "sam": 2, "asam": 2, "gsam": 2, "wsam": 2, "gcsam": 2,
    "crsam": 3,
}
