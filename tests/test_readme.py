"""README.md's "Python API" block runs as written, and ``import medgcsam`` stays light (its names load lazily)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one python block"
    return blocks[0]


def test_the_python_api_section_runs(tmp_path):
    """In a fresh interpreter and an empty folder: it trains, prints, asserts, and writes no file."""
    out = subprocess.run([sys.executable, "-c", python_api_block()], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "1",
                                         "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert re.search(r"best epoch \d: val balanced accuracy 0\.\d{3}", out.stdout)
    assert list(tmp_path.iterdir()) == []


def test_import_medgcsam_is_light_and_exports_lazily():
    probe = ("import sys, medgcsam\n"
             "heavy = sorted(m for m in ('torch', 'mlflow', 'timm', 'monai') if m in sys.modules)\n"
             "names = [n for n in medgcsam.__all__ if n not in dir(medgcsam)]\n"
             "print('HEAVY', heavy, 'MISSING', names)\n"
             "import medgcsam as m\n"
             "print(m.Trainer.__module__, m.train.__module__, m.create_optimizer.__module__,\n"
             "      'gcsam' in m.OPTIMIZERS)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(README.parent), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    lines = out.stdout.splitlines()
    assert lines[0] == "HEAVY [] MISSING []"
    assert lines[1] == "medgcsam.engine.loop medgcsam.engine.trainer medgcsam.optim.factory True"
