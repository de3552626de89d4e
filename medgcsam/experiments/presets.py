"""Authors' default hyperparameters per optimizer (docs/shared optimizers.md section 2), as dotted overrides.

A method in an experiment starts from its preset; the experiment file may override any value.
The learning rate and base optimizer come from the base pipeline (the GCSAM paper: Adam, lr 1e-4),
so presets only carry what is specific to the method. Both tables are read off the optimizer registry
(``medgcsam.optim.registry``), where each preset is recorded beside its class with its source.
"""

from __future__ import annotations

from typing import Any

from medgcsam.optim import OPTIMIZERS

PRESETS: dict[str, dict[str, Any]] = {name: record.overrides() for name, record in OPTIMIZERS.items()}

# Forward+backward passes per step; the first criterion of "simpler" in the selection rule.
PASSES: dict[str, int] = {name: record.passes for name, record in OPTIMIZERS.items()}
