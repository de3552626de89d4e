"""One record per optimizer: every registered name is built by the factory, has an experiment preset and a
selection cost, is listed by `medgcsam optimizers` and in the docs table; every optimizer class is registered."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import medgcsam.optim as optim
from medgcsam.cli import app
from medgcsam.experiments.presets import PASSES, PRESETS
from medgcsam.experiments.selection import simplicity_key
from medgcsam.optim import OPTIMIZERS, WrappedOptimizer, create_optimizer
from medgcsam.optim.registry import markdown_table, register

DOCS = Path(__file__).resolve().parents[1] / "docs" / "optimizers.md"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_is_built_preset_and_documented(name: str) -> None:
    record = OPTIMIZERS[name]
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(name, model.parameters(), base="adam", model=model, **record.preset)
    assert isinstance(opt, record.cls) and opt.name == name and opt.passes_per_step == record.passes
    assert PRESETS[name] == record.overrides() and PRESETS[name]["optimizer.name"] == name
    assert PASSES[name] == record.passes
    assert f"| `{name}` | {record.passes} |" in DOCS.read_text(encoding="utf-8")


def test_the_docs_table_and_the_cli_are_the_registry() -> None:
    assert markdown_table() in DOCS.read_text(encoding="utf-8")
    listing = CliRunner().invoke(app, ["optimizers"])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines() if not line.startswith(" ")] == list(OPTIMIZERS)


def test_every_optimizer_class_is_registered() -> None:
    classes = {cls for _, cls in inspect.getmembers(optim, inspect.isclass)
               if issubclass(cls, WrappedOptimizer) and cls.name not in ("base", "sharpness_aware")}
    registered = {record.cls for record in OPTIMIZERS.values()}
    assert classes <= registered, f"not registered: {sorted(c.__name__ for c in classes - registered)}"


def test_an_unknown_method_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match=r"optimizer.name 'nosuch' is not a registered optimizer"):
        simplicity_key({"optimizer.name": "nosuch"}, {}, 0)
    with pytest.raises(ValueError, match=r"unknown optimizer 'nosuch'; use one of \['adam'"):
        create_optimizer("nosuch", torch.nn.Linear(2, 2).parameters())
    assert simplicity_key({"optimizer.name": "crsam"}, PRESETS["crsam"], 0)[0] == 3


def test_a_record_must_fit_its_class_and_be_unique() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("sam", OPTIMIZERS["sam"].cls, description="", memory="")
    with pytest.raises(ValueError, match=r"preset keys \['rh0'\] are not hyperparameters of SAM"):
        register("sam2", OPTIMIZERS["sam"].cls, description="", memory="", preset={"rh0": 1.0})
    assert "sam2" not in OPTIMIZERS
