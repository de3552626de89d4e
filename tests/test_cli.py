"""The root command lists every command without importing any of them (torch, MLflow, timm, MONAI)."""

from __future__ import annotations

import subprocess
import sys

from medgcsam.cli import COMMANDS

PROBE = """
import sys
from typer.testing import CliRunner
from medgcsam.cli import app
result = CliRunner().invoke(app, ["--help"])
assert result.exit_code == 0, result.output
print(result.output)
print("HEAVY:", sorted(m for m in ("torch", "mlflow", "timm", "monai", "pandas") if m in sys.modules))
"""


def test_root_help_lists_every_command_and_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("HEAVY: []")
    for name in COMMANDS:
        assert f"  {name} " in out
    assert "<bool>" not in out


def test_a_command_still_runs_through_the_lazy_group(tmp_path):
    from typer.testing import CliRunner

    from medgcsam.cli import app

    res = CliRunner().invoke(app, ["validate-external", "--help"])
    assert res.exit_code == 0 and "--refit" in res.output and "<bool>" not in res.output
    res = CliRunner().invoke(app, ["manifest", "validate", str(tmp_path / "missing.csv")])
    assert res.exit_code != 0
