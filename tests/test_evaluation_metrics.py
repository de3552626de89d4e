"""Clinical metrics against scikit-learn on fixed predictions; bootstrap coverage; calibration; thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from medgcsam.evaluation.calibration import fit_temperature, softmax
from medgcsam.evaluation.metrics import (
    auroc,
    average_precision,
    binary_counts,
    bootstrap_ci,
    confusion,
    expected_calibration_error,
    headline,
    per_class,
    row_normalise,
)
from medgcsam.evaluation.operating_point import choose_threshold

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture
def preds():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    logits[:5] = np.round(logits[:5], 1)  # some tied scores
    return softmax(logits), y


def test_counts_and_ratios_match_sklearn(preds):
    probs, y = preds
    yhat = probs.argmax(axis=1)
    cm = confusion(y, yhat, 3)
    np.testing.assert_array_equal(cm, confusion_matrix(y, yhat, labels=[0, 1, 2]))
    np.testing.assert_allclose(row_normalise(cm), confusion_matrix(y, yhat, labels=[0, 1, 2], normalize="true"))
    mcm = multilabel_confusion_matrix(y, yhat, labels=[0, 1, 2])
    prec, rec, f1, _ = precision_recall_fscore_support(y, yhat, labels=[0, 1, 2], zero_division=np.nan)
    pc = per_class(cm, CLASSES)
    for k, c in enumerate(CLASSES):
        (tn, fp), (fn, tp) = mcm[k]
        assert (pc[c]["tp"], pc[c]["fn"], pc[c]["fp"], pc[c]["tn"]) == (tp, fn, fp, tn)
        assert pc[c]["sensitivity"] == pytest.approx(rec[k])
        assert pc[c]["ppv"] == pytest.approx(prec[k])
        assert pc[c]["f1"] == pytest.approx(f1[k])
        assert pc[c]["specificity"] == pytest.approx(tn / (tn + fp))
        assert pc[c]["npv"] == pytest.approx(tn / (tn + fn))
    h = headline(probs, y, CLASSES)
    assert h["accuracy"] == pytest.approx(accuracy_score(y, yhat))
    assert h["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yhat))


def test_discrimination_and_calibration_match_sklearn(preds):
    probs, y = preds
    h = headline(probs, y, CLASSES)
    per = roc_auc_score(y, probs, multi_class="ovr", average=None)
    for k, c in enumerate(CLASSES):
        assert h[f"auroc/{c}"] == pytest.approx(per[k], abs=1e-12)
        assert h[f"pr_auc/{c}"] == pytest.approx(average_precision_score(y == k, probs[:, k]), abs=1e-12)
    assert h["auroc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert h["nll"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]))
    assert h["brier"] == pytest.approx(brier_score_loss(y, probs, labels=[0, 1, 2], scale_by_half=False))


def test_ece_hand_computed_and_undefined_ratios_are_nan():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # bins of width 1/2: (0.5,1] holds all; conf mean 0.7875, accuracy 3/4
    assert expected_calibration_error(probs, y, n_bins=2) == pytest.approx(abs(0.75 - 0.7875))
    # 15 bins: 0.95 -> bin 14 (acc 1), 0.9 -> bin 13 (acc 0), 0.7 -> bin 10, 0.6 -> bin 8 (both correct)
    assert expected_calibration_error(probs, y, 15) == pytest.approx((0.05 + 0.9 + 0.3 + 0.4) / 4)
    c = binary_counts(np.zeros(4, bool), np.zeros(4, bool))
    assert np.isnan(c["sensitivity"]) and np.isnan(c["ppv"]) and c["specificity"] == 1.0
    assert np.isnan(auroc(np.ones(4, bool), np.arange(4.0)))
    assert np.isnan(average_precision(np.zeros(4, bool), np.arange(4.0)))


def test_bootstrap_covers_true_value_at_nominal_rate():
    """Accuracy of a classifier with true accuracy 0.8: the 95% interval covers 0.8 about 95% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 150
    for t in range(trials):
        correct = rng.random(200) < 0.8
        ci = bootstrap_ci(lambda idx, c=correct: {"acc": float(c[idx].mean())}, 200, n_resamples=400, seed=t)["acc"]
        covered += ci.low <= 0.8 <= ci.high
    # binomial sd of the coverage estimate at 150 trials is ~1.8 points
    assert 0.88 <= covered / trials <= 0.99


def test_cluster_bootstrap_resamples_patients_and_widens_interval():
    """Patients with 10 identical images: image-level resampling pretends to have 10x the evidence."""
    rng = np.random.default_rng(1)
    patient_correct = rng.random(40) < 0.7
    correct = np.repeat(patient_correct, 10)
    groups = np.repeat([f"p{i}" for i in range(40)], 10)
    drawn = []

    def stat(idx):
        drawn.append(idx)
        return {"acc": float(correct[idx].mean())}

    by_patient = bootstrap_ci(stat, 400, groups=groups, n_resamples=300, seed=0)["acc"]
    # every resample is made of whole patients: blocks of 10 rows sharing a group
    assert all(len(i) == 400 and len(np.unique(groups[i])) <= 40 for i in drawn[:5])
    assert all(np.all(np.bincount(np.searchsorted(np.unique(groups), groups[i])) % 10 == 0) for i in drawn[:5])
    by_image = bootstrap_ci(lambda idx: {"acc": float(correct[idx].mean())}, 400, n_resamples=300, seed=0)["acc"]
    assert (by_patient.high - by_patient.low) > 2 * (by_image.high - by_image.low)


def test_bootstrap_skips_undefined_resamples():
    y = np.array([1] + [0] * 29)
    score = np.linspace(0, 1, 30)
    ci = bootstrap_ci(lambda idx: {"auroc": auroc(y[idx] == 1, score[idx])}, 30, n_resamples=200, seed=0)["auroc"]
    assert 0 < ci.n_valid < 200  # resamples without the single positive are skipped, and counted


def test_temperature_recovers_scale_and_improves_ece():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(size=(4000, 3)) * 2
    y = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(softmax(overconfident, t), y) < 0.5 * expected_calibration_error(
        softmax(overconfident), y)


def test_operating_point_rules():
    rng = np.random.default_rng(4)
    y = rng.random(500) < 0.3
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    thr = choose_threshold(p, y, "youden", positive_class="malignant")
    fpr, tpr, cut = roc_curve(y, p)
    assert thr.value == pytest.approx(cut[np.argmax(tpr - fpr)])
    assert thr.positive_class == "malignant" and thr.rule == "youden"
    sens = choose_threshold(p, y, "sensitivity", target_sensitivity=0.95)
    achieved = binary_counts(p >= sens.value, y)
    assert achieved["sensitivity"] >= 0.95
    # the highest such threshold: the next observed score above it misses the target
    above = np.unique(p[p > sens.value])
    if len(above):
        assert binary_counts(p >= above[0], y)["sensitivity"] < 0.95
    with pytest.raises(ValueError, match="both are needed"):
        choose_threshold(p, np.zeros(500, bool))
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(p, y, "sensitivity")
    with pytest.raises(ValueError, match="unknown operating point rule"):
        choose_threshold(p, y, "cost")


def test_temperature_stays_bounded_on_separable_validation():
    """Perfectly separated validation logits push the NLL optimum to T -> 0; the fit stops at T_MIN."""
    from medgcsam.evaluation.calibration import T_MIN

    logits = np.array([[5.0, -5.0], [-4.0, 4.0], [3.0, -3.0], [-6.0, 6.0]])
    t = fit_temperature(logits, np.array([0, 1, 0, 1]))
    assert t == pytest.approx(T_MIN, rel=1e-3)
    assert np.isfinite(softmax(logits, t)).all()
