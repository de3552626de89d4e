"""One record per optimizer, registered beside its class: the factory, the experiments' presets and selection
order, ``medgcsam optimizers``, the docs table and the parametrized tests all read it, so a method added here is
added everywhere (tests/test_optim_registry.py checks that)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class OptimizerRecord:
    """What the code and the docs know about one optimizer name.

    ``cls`` is the ``WrappedOptimizer`` subclass (its ``passes`` and ``hyperparameters`` defaults are the
    class's own); ``preset`` holds the authors' values an experiment starts from, beyond the class defaults;
    ``capturable``: the whole step can run in a CUDA graph once made graph-safe."""

    name: str
    cls: type
    description: str
    memory: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    capturable: bool = True

    @property
    def passes(self) -> int:
        """Forward+backward passes per optimizer step: what a step costs, and "simpler" in model selection."""
        return int(self.cls.passes)

    def overrides(self) -> dict[str, Any]:
        """The preset as the dotted pipeline overrides an experiment cell starts from."""
        return {"optimizer.name": self.name, **{f"optimizer.{k}": v for k, v in self.preset.items()}}


_RECORDS: dict[str, OptimizerRecord] = {}
OPTIMIZERS: Mapping[str, OptimizerRecord] = MappingProxyType(_RECORDS)  # read-only view, in registration order


def register(name: str, cls: type, *, description: str, memory: str, preset: Mapping[str, Any] | None = None,
             capturable: bool = True) -> OptimizerRecord:
    """Record ``name``; a preset key the class does not take, or a second record of one name, is an error."""
    if name in _RECORDS:
        raise ValueError(f"optimizer {name!r} is registered twice")
    unknown = sorted(set(preset or {}) - set(cls.hyperparameters))
    if unknown:
        raise ValueError(f"optimizer {name!r}: preset keys {unknown} are not hyperparameters of {cls.__name__}")
    record = OptimizerRecord(name, cls, description, memory, MappingProxyType(dict(preset or {})), capturable)
    _RECORDS[name] = record
    return record


def optimizer_record(name: str) -> OptimizerRecord:
    """The record of ``name`` (case-insensitive); an unknown name is a ValueError listing the known ones."""
    record = _RECORDS.get(str(name).lower())
    if record is None:
        raise ValueError(f"unknown optimizer {name!r}; use one of {sorted(_RECORDS)}")
    return record


def markdown_table() -> str:
    """The methods table of docs/optimizers.md (a test keeps the docs equal to it)."""
    lines = ["| name | passes / step | extra memory | method hyperparameters (class defaults) | authors' preset "
             "| about |", "|---|---|---|---|---|---|"]
    for r in _RECORDS.values():
        defaults = ", ".join(f"`{k}={v!r}`" for k, v in r.cls.hyperparameters.items()) or "-"
        preset = ", ".join(f"`{k}={v!r}`" for k, v in r.preset.items()) or "class defaults"
        lines.append(f"| `{r.name}` | {r.passes} | {r.memory} | {defaults} | {preset} | {r.description} |")
    return "\n".join(lines)
