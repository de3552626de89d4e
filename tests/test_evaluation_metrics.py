"""Clinical metrics against scikit-learn on fixed predictions; bootstrap coverage; calibration; thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
from medgcsam.evaluation.operating_point import choose_threshold
from medgcsam.evaluation.report import _bound_note
from medgcsam.metrics import (
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
    best = cut[np.argmax(tpr - fpr)]
    # the same decisions as sklearn's best cut, with the threshold strictly between two observed scores
    assert np.array_equal(p >= thr.value, p >= best)
    assert thr.value < best and not np.isin(thr.value, p)
    assert thr.positive_class == "malignant" and thr.rule == "youden"
    sens = choose_threshold(p, y, "sensitivity", target_sensitivity=0.95)
    achieved = binary_counts(p >= sens.value, y)
    assert achieved["sensitivity"] >= 0.95
    # the highest such cut: the chosen score is the lowest one above the threshold, and the next one misses
    above = np.unique(p[p > sens.value])
    assert np.array_equal(p >= sens.value, p >= above[0])
    if len(above) > 1:
        assert binary_counts(p >= above[1], y)["sensitivity"] < 0.95
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
    # the report says that such a temperature is no calibration; an interior one gets no remark
    assert "bound of the search range" in _bound_note(t) and _bound_note(1.3) == ""


def test_youden_ties_are_exact_and_the_threshold_survives_float32_scores():
    """J = 1/3 at both 0.9 and 0.8: the higher one wins in exact arithmetic (float tpr - fpr picked 0.8)."""
    p = np.array([0.9, 0.8, 0.8, 0.8, 0.8, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    thr = choose_threshold(p, y)
    assert np.array_equal(p >= thr.value, p >= 0.9)
    # a validation image scored again in float32 at inference keeps its validation decision
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(400, 2)) * 2
    probs = softmax(logits)[:, 1]
    y = rng.random(400) < probs
    for rule, target in (("youden", None), ("sensitivity", 0.9)):
        t = choose_threshold(probs, y, rule, target).value
        f32 = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)[:, 1].numpy()
        assert np.array_equal(f32 >= t, probs >= t), rule


def test_macro_figures_never_average_over_fewer_classes_inside_an_interval():
    """A rare class missing from a resample makes the macro figures NaN there (skipped), not a 2-class mean."""
    y = np.r_[np.zeros(29, int), np.ones(29, int), [2, 2]]
    p = np.full((60, 3), 0.2)
    p[np.arange(60), y] = 0.6
    p[58:] = [0.6, 0.2, 0.1]
    p /= p.sum(axis=1, keepdims=True)
    present = np.unique(y)
    ci = bootstrap_ci(lambda i: headline(p[i], y[i], CLASSES, macro_classes=present), 60, n_resamples=2000, seed=0)
    point = headline(p, y, CLASSES)
    for key in ("auroc_macro", "balanced_accuracy", "pr_auc_macro"):
        assert ci[key].n_valid < 2000 and ci[key].high < 1.0, key
        assert ci[key].low <= point[key] <= ci[key].high, key
    # a split without a class averages over the classes it has; a one-class split has no macro AUROC or PR-AUC
    two = y < 2
    assert headline(p[two], y[two], CLASSES)["auroc_macro"] == pytest.approx(
        np.mean([roc_auc_score(y[two] == k, p[two][:, k]) for k in (0, 1)]))
    one = headline(p[y == 0], y[y == 0], CLASSES)
    assert np.isnan(one["auroc_macro"]) and np.isnan(one["pr_auc_macro"])


def test_nll_counts_confident_errors_in_full_and_bad_labels_are_named():
    logits = np.array([[50.0, 0.0], [0.0, 3.0]])
    y = np.array([1, 1])
    expected = float(torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y)))
    assert headline(softmax(logits), y, ["a", "b"])["nll"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="outside 0..1 .*position 1"):
        headline(softmax(logits), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="do not fit the model's 3 classes"):
        headline(softmax(logits), y, CLASSES)
