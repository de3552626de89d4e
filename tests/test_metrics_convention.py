"""One convention for 0/0 (NaN) shared by model selection and the clinical report, and one set of names."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgcsam.engine.metrics import classification_metrics, is_improvement
from medgcsam.experiments.config import ReportConfig, SelectionConfig
from medgcsam.metrics import headline, monitor

CLASSES = ["benign", "malignant", "normal"]


def test_selection_and_the_report_agree_on_a_class_never_predicted() -> None:
    """No image is predicted 'normal': its precision is 0/0. The loop's monitor and the clinical report both say
    NaN (sklearn's zero_division=0 said 0 in the monitor), and the shared figures are the same numbers."""
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1],
                      [0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    mon, head = monitor(probs, y, CLASSES), headline(probs, y, CLASSES)
    assert math.isnan(mon["precision/normal"]) and math.isnan(head["ppv/normal"])
    assert mon["f1/normal"] == head["f1/normal"] == 0.0  # 0/(0 + 0 + 2): defined, and 0
    assert mon["sensitivity/normal"] == head["sensitivity/normal"] == 0.0
    for key in ("accuracy", "balanced_accuracy"):
        assert mon[key] == head[key]
    assert mon["auroc"] == pytest.approx(head["auroc_macro"], abs=1e-12)
    logged = classification_metrics(np.log(probs), y, CLASSES)
    assert math.isnan(logged["val_epoch/precision/normal"]) and logged["val_epoch/support/normal"] == 2.0


def test_an_undefined_monitor_selects_nothing() -> None:
    """A validation split without one class: macro AUROC is NaN in the monitor, and NaN never improves."""
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    value = monitor(probs, y, CLASSES)["auroc"]
    assert math.isnan(value) and not is_improvement(value, None, "val_auroc")
    assert not math.isnan(monitor(probs, y, CLASSES)["balanced_accuracy"])  # over the classes present


def test_experiment_files_may_only_name_defined_metrics() -> None:
    ReportConfig(metrics={"test AUROC": "test/auroc_macro", "sens": "test/sensitivity/malignant",
                          "op": "test/op/ppv", "eig": "hessian_top_eig"}, primary="test AUROC")
    with pytest.raises(ValueError, match="'test/auroc' is not a metric medgcsam logs"):
        ReportConfig(metrics={"test AUROC": "test/auroc"}, primary="test AUROC")
    with pytest.raises(ValueError, match="'val_epoch/auroc_macro' is not a metric"):
        SelectionConfig(metric="val_epoch/auroc_macro")
