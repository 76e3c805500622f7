"""biomedap.metrics: agreement with scikit-learn and hand-computed values on tiny inputs."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from biomedap import metrics as M


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _binary_logits(p0: list[float]) -> np.ndarray:
    """Two-class logits whose softmax puts probability ``p0`` on class 0."""
    p = np.asarray(p0, dtype=np.float64)
    return np.stack([np.log(p), np.log1p(-p)], axis=1)


# --------------------------------------------------------------------------- versus scikit-learn


def test_matches_sklearn_all_classes_present():
    rng = np.random.default_rng(0)
    c, n = 5, 300
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]  # informative but imperfect
    pred = logits.argmax(1)
    prob = _softmax(logits)

    assert M.accuracy(logits, labels) == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-12)
    assert M.balanced_accuracy(logits, labels) == pytest.approx(
        skm.balanced_accuracy_score(labels, pred), abs=1e-12
    )
    assert M.macro_f1(logits, labels) == pytest.approx(skm.f1_score(labels, pred, average="macro"), abs=1e-12)
    assert M.macro_auroc_ovr(logits, labels) == pytest.approx(
        skm.roc_auc_score(labels, prob, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert M.confusion_matrix(logits, labels) == skm.confusion_matrix(labels, pred).tolist()
    np.testing.assert_allclose(
        M.per_class_recall(logits, labels), skm.recall_score(labels, pred, average=None), atol=1e-12
    )
    assert M.negative_log_likelihood(logits, labels) == pytest.approx(skm.log_loss(labels, prob), rel=1e-9)


def test_matches_sklearn_with_class_absent_from_labels():
    rng = np.random.default_rng(1)
    c, n = 5, 200
    labels = rng.choice([0, 1, 3, 4], size=n)  # class 2 never occurs ...
    logits = rng.normal(size=(n, c)) + 1.0 * np.eye(c)[labels]
    logits[:15, 2] += 10.0  # ... but is predicted for some samples
    pred = logits.argmax(1)
    assert (pred == 2).sum() >= 10
    prob = _softmax(logits)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the predicted-but-absent class
        sk_bacc = skm.balanced_accuracy_score(labels, pred)
        sk_f1 = skm.f1_score(labels, pred, average="macro")
    assert M.balanced_accuracy(logits, labels) == pytest.approx(sk_bacc, abs=1e-12)
    # sklearn averages F1 over y_true ∪ y_pred: class 2 (predicted, never true) counts as F1 = 0.
    assert M.macro_f1(logits, labels) == pytest.approx(sk_f1, abs=1e-12)
    sk_f1_true_only = skm.f1_score(labels, pred, average="macro", labels=[0, 1, 3, 4])
    assert M.macro_f1(logits, labels) < sk_f1_true_only

    present = [0, 1, 3, 4]
    onehot = np.eye(c)[labels]
    expected_auc = skm.roc_auc_score(onehot[:, present], prob[:, present], average="macro")
    assert M.macro_auroc_ovr(logits, labels) == pytest.approx(expected_auc, abs=1e-12)

    recall = M.per_class_recall(logits, labels)
    assert len(recall) == c and math.isnan(recall[2])
    sk_recall = skm.recall_score(labels, pred, labels=present, average=None)
    np.testing.assert_allclose([recall[k] for k in present], sk_recall, atol=1e-12)

    cm = M.confusion_matrix(logits, labels)
    assert len(cm) == c and all(len(row) == c for row in cm)
    assert cm[2] == [0] * c  # absent class: an all-zero row ...
    assert sum(row[2] for row in cm) == int((pred == 2).sum())  # ... but its column counts predictions


def test_binary_auroc_uses_positive_class_probability():
    rng = np.random.default_rng(2)
    n = 120
    labels = rng.integers(0, 2, size=n)
    logits = rng.normal(size=(n, 2)) + 0.8 * np.eye(2)[labels]
    prob = _softmax(logits)
    expected = skm.roc_auc_score(labels, prob[:, 1])
    assert M.macro_auroc_ovr(logits, labels) == pytest.approx(expected, abs=1e-12)
    # Scoring class 0 instead would give 1 - AUC: make sure we did not.
    assert abs(skm.roc_auc_score(labels, prob[:, 0]) - M.macro_auroc_ovr(logits, labels)) > 0.1


def test_auroc_ties_match_sklearn():
    rng = np.random.default_rng(3)
    c, n = 3, 90
    labels = rng.integers(0, c, size=n)
    # Rows drawn from a pool of 6: identical rows give bit-identical probabilities, i.e. exact ties.
    pool = rng.normal(size=(6, c))
    logits = pool[rng.integers(0, 6, size=n)]
    prob = _softmax(logits)
    assert M.macro_auroc_ovr(logits, labels) == pytest.approx(
        skm.roc_auc_score(labels, prob, multi_class="ovr", average="macro"), abs=1e-12
    )


def test_auroc_single_class_present_is_nan_with_warning(caplog):
    logits = np.array([[2.0, 0.0, 1.0], [0.5, 0.1, 0.2], [1.0, 3.0, 0.0]])
    labels = np.array([1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="biomedap.metrics"):
        value = M.macro_auroc_ovr(logits, labels)
    assert math.isnan(value)
    assert any("AUROC" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- by hand


def test_ece_by_hand_15_bins():
    # Class-0 probability (= confidence, all > 0.5 so class 0 is predicted) and labels.
    conf = [0.95, 0.92, 0.75, 0.78, 0.55, 0.58]
    labels = np.array([0, 1, 0, 1, 1, 0])  # correct, wrong, correct, wrong, wrong, correct
    # Bins of width 1/15: 0.95 -> (14/15, 1]; 0.92 -> (13/15, 14/15]; 0.75, 0.78 -> (11/15, 12/15];
    # 0.55, 0.58 -> (8/15, 9/15].
    #   bin 14: n=1, acc 1,   conf 0.95  -> 1/6 * 0.05
    #   bin 13: n=1, acc 0,   conf 0.92  -> 1/6 * 0.92
    #   bin 11: n=2, acc 0.5, conf 0.765 -> 2/6 * 0.265
    #   bin  8: n=2, acc 0.5, conf 0.565 -> 2/6 * 0.065
    expected = (0.05 + 0.92 + 2 * 0.265 + 2 * 0.065) / 6
    assert M.expected_calibration_error(_binary_logits(conf), labels) == pytest.approx(expected, abs=1e-12)
    # A single global bin would give |3/6 - 4.53/6|: the binning must matter.
    assert abs(expected - abs(3 - sum(conf)) / 6) > 0.01


def test_ece_bins_are_right_closed():
    # Logits [0, 0] give a confidence of exactly 0.5, the edge between the two bins of n_bins=2.
    logits = np.array([[0.0, 0.0], [math.log(0.75), math.log(0.25)]])
    labels = np.array([0, 1])  # first correct (argmax picks class 0 on the tie), second wrong
    # (0, 0.5] holds the 0.5 sample: |1 - 0.5| = 0.5; (0.5, 1] holds 0.75 wrong: 0.75 -> mean 0.625.
    # A left-closed [0.5, 1) convention would pool both: |0.5 - 0.625| = 0.125.
    assert M.expected_calibration_error(logits, labels, n_bins=2) == pytest.approx(0.625, abs=1e-12)


def test_nll_by_hand_and_stable():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = np.array([2, 1])
    first = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    second = -math.log(1 / 3)
    assert M.negative_log_likelihood(logits, labels) == pytest.approx((first + second) / 2, rel=1e-12)
    # Large logits: a naive softmax overflows to inf/nan; log-softmax gives the exact 1000 nats.
    huge = torch.tensor([[1000.0, 0.0]])
    assert M.negative_log_likelihood(huge, torch.tensor([1])) == pytest.approx(1000.0, rel=1e-12)


def test_confusion_matrix_rows_are_true_classes():
    # Predictions 0, 1, 1, 1 for true labels 0, 0, 1, 2; class 3 never occurs.
    logits = np.array([
        [5.0, 0.0, 0.0, 0.0],
        [0.0, 5.0, 0.0, 0.0],
        [0.0, 5.0, 0.0, 0.0],
        [0.0, 5.0, 0.0, 0.0],
    ])
    labels = np.array([0, 0, 1, 2])
    assert M.confusion_matrix(logits, labels) == [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
    ]
    recall = M.per_class_recall(logits, labels)
    assert recall[:3] == [0.5, 1.0, 0.0] and math.isnan(recall[3])
    assert M.balanced_accuracy(logits, labels) == pytest.approx(0.5)  # mean over classes 0, 1, 2 only
    assert M.accuracy(logits, labels) == pytest.approx(0.5)


# --------------------------------------------------------------------------- evaluate_logits and errors


def test_evaluate_logits_keys_types_and_json():
    rng = np.random.default_rng(4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = torch.tensor(rng.normal(size=(8, 4)), dtype=torch.float32)  # class 3 absent
    out = M.evaluate_logits(logits, labels, classnames=["a", "b", "c", "d"])
    assert set(out) == {
        "accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "nll",
        "per_class_recall", "confusion_matrix", "n", "classnames",
    }
    assert out["n"] == 8 and isinstance(out["n"], int)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "nll"):
        assert type(out[key]) is float, key
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"):
        assert 0.0 <= out[key] <= 1.0, key  # fractions, not percentages
    assert math.isnan(out["per_class_recall"][3])
    assert out["classnames"] == ["a", "b", "c", "d"]
    back = json.loads(json.dumps(out))  # NaN is written as the bare token NaN and read back
    assert back["confusion_matrix"] == out["confusion_matrix"]
    assert math.isnan(back["per_class_recall"][3])


def test_bfloat16_logits_equal_their_float32_upcast():
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(size=(20, 3)), dtype=torch.bfloat16)
    labels = torch.tensor(rng.integers(0, 3, size=20))
    a = M.evaluate_logits(logits, labels)
    b = M.evaluate_logits(logits.float(), labels)
    assert json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (np.zeros((3, 2)), np.array([0, 1]), ValueError, "disagree on N"),
        (np.zeros((3, 1)), np.array([0, 0, 0]), ValueError, "at least 2"),
        (np.zeros(3), np.array([0, 0, 0]), ValueError, r"shape \[N, C\]"),
        (np.zeros((3, 2)), np.array([[0], [1], [0]]), ValueError, r"shape \[N\]"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), ValueError, "empty"),
        (np.zeros((3, 2)), np.array([0, 2, 1]), ValueError, r"\[0, 2\)"),
        (np.zeros((3, 2)), np.array([0, -1, 1]), ValueError, r"\[0, 2\)"),
        (np.zeros((3, 2)), np.array([0.0, 1.0, 1.0]), TypeError, "integers"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), ValueError, "NaN"),
    ],
)
def test_input_errors(logits, labels, error, match):
    with pytest.raises(error, match=match):
        M.evaluate_logits(logits, labels)


def test_classnames_length_checked():
    with pytest.raises(ValueError, match="classnames"):
        M.evaluate_logits(np.zeros((2, 3)), np.array([0, 1]), classnames=["a", "b"])
