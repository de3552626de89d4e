"""Progress of the long commands: whole log lines on stderr when it is not a terminal, stdout untouched."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medgcsam.evaluation.predict import predict_split
from medgcsam.progress import progress


def test_progress_writes_whole_lines_to_stderr_when_not_a_terminal(capsys):
    assert sum(progress(range(5), desc="demo", unit="it")) == 10
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("demo:") and "5/5" in lines[-1]


def test_predict_split_reports_progress_only_when_named(capsys):
    data = DataLoader(TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long)), batch_size=4)
    logits, _ = predict_split(nn.Linear(3, 2), data)
    assert capsys.readouterr().err == ""
    again, _ = predict_split(nn.Linear(3, 2).eval(), data, desc="predict test")
    assert logits.shape == again.shape == (10, 2)
    err = capsys.readouterr().err
    assert err.startswith("predict test:") and "3/3" in err.splitlines()[-1]
