"""Linear probe: the lpclip C search (trace, ties, last-step classifier), logits, state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from biomedap.methods import Batch, LinearProbeConfig, TrainingData, build_method
from biomedap.methods import linear_probe as lp_module
from biomedap.methods.linear_probe import search_logistic_regression

GRID = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]


def _problem(seed=9, classes=3, dim=8, shots=4, val_shots=8):
    """Overlapping Gaussian classes on the sphere; seed 9 makes the search take both branches."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim))

    def sample(k):
        y = np.repeat(np.arange(classes), k)
        x = means[y] * 0.6 + rng.normal(size=(len(y), dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True), y  # float64, as the probe fits

    return (*sample(shots), *sample(val_shots))


def _f32(array):
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def _torch(array):
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _reference_search(x, y, x_val, y_val):
    """The search written out step by step as the published lpclip code does it (a fit per request)."""
    tried = []

    def fit(c):
        tried.append(c)
        clf = LogisticRegression(C=c, solver="lbfgs", max_iter=1000, random_state=0).fit(x, y)
        return clf, float(np.mean(clf.predict(x_val) == y_val))

    accs = [fit(c)[1] for c in GRID]
    c_peak = GRID[int(np.argmax(accs))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    decisions = []
    for _ in range(8):
        clf_left, acc_left = fit(c_left)
        clf_right, acc_right = fit(c_right)
        if acc_left < acc_right:
            c_final, clf_final = c_right, clf_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
            decisions.append("R")
        else:
            c_final, clf_final = c_left, clf_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
            decisions.append("L")
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return tried, c_final, clf_final, "".join(decisions)


def test_search_trace_and_result_match_the_reference_procedure():
    x, y, x_val, y_val = _problem()
    tried, c_ref, clf_ref, decisions = _reference_search(x, y, x_val, y_val)
    assert "R" in decisions and "L" in decisions, "the problem should exercise both branches"
    clf, c, trace = search_logistic_regression(x, y, x_val, y_val)
    assert [p.c for p in trace] == tried  # exact floats, in order
    assert [p.stage for p in trace] == ["grid"] * 7 + [f"step {k}" for k in range(1, 9) for _ in (0, 1)]
    assert c == c_ref
    np.testing.assert_allclose(clf.coef_, clf_ref.coef_, rtol=0, atol=0)
    np.testing.assert_allclose(clf.intercept_, clf_ref.intercept_, rtol=0, atol=0)


class _Fake:
    """A stand-in classifier whose validation accuracy is a chosen function of C."""

    def __init__(self, c, accuracy_of_c, size=1000):
        self.c = c
        correct = int(round(size * accuracy_of_c(c)))
        self.predictions = np.r_[np.zeros(correct, dtype=int), np.ones(size - correct, dtype=int)]
        self.n_iter_ = np.array([1])

    def predict(self, x):
        return self.predictions


def _scripted_search(monkeypatch, accuracy_of_c, steps=8):
    monkeypatch.setattr(lp_module, "fit_logistic_regression",
                        lambda x, y, c, max_iter: _Fake(c, accuracy_of_c))
    y_val = np.zeros(1000, dtype=int)
    return search_logistic_regression(None, None, None, y_val, GRID, steps, 1000)


def test_bisection_steps_by_hand(monkeypatch):
    # Accuracy falls off linearly with the distance of log10(C) to 1.3 (C ≈ 20).
    clf, c, trace = _scripted_search(monkeypatch, lambda c: 1 - 0.1 * abs(math.log10(c) - 1.3))
    # Grid: C = 1e2 is closest (distance 0.7) -> interval [10, 1000], i.e. log10 in [1, 3]. By hand:
    # step 1: 1 vs 3       -> left,  [1, 2]          step 5: 1.25 vs 1.375   -> left,  [1.25, 1.3125]
    # step 2: 1 vs 2       -> left,  [1, 1.5]        step 6: 1.25 vs 1.3125  -> right, [1.28125, 1.3125]
    # step 3: 1 vs 1.5     -> right, [1.25, 1.5]     step 7: 1.28125 vs 1.3125 -> right, [1.296875, 1.3125]
    # step 4: 1.25 vs 1.5  -> left,  [1.25, 1.375]   step 8: 1.296875 vs 1.3125 -> left: keep 1.296875
    ends = [1, 3, 1, 2, 1, 1.5, 1.25, 1.5, 1.25, 1.375, 1.25, 1.3125, 1.28125, 1.3125, 1.296875, 1.3125]
    assert [p.c for p in trace[:7]] == GRID
    np.testing.assert_allclose([math.log10(p.c) for p in trace[7:]], ends, rtol=0, atol=1e-12)
    assert math.log10(c) == pytest.approx(1.296875, abs=1e-12)
    assert clf.c == c  # the classifier kept at the last step, not the best one seen


def test_grid_ties_pick_the_first_and_bisection_ties_keep_the_left_end(monkeypatch):
    # Peak at C = 10: the grid's 1e2 and 1 tie (distance 1); the first, 1e2, must centre the interval.
    clf, c, trace = _scripted_search(monkeypatch, lambda c: 1 - 0.1 * abs(math.log10(c) - 1.0))
    assert (trace[7].c, trace[8].c) == (10.0, 1000.0)
    assert c == pytest.approx(10.0, rel=1e-12)
    # Flat accuracy: the grid picks 1e6, every step ties and keeps the left end, 1e5.
    clf, c, trace = _scripted_search(monkeypatch, lambda c: 0.5)
    assert (trace[7].c, trace[8].c) == (1e5, 1e7)
    assert c == pytest.approx(1e5, rel=1e-12)
    assert all(math.isclose(p.c, 1e5) for p in trace[7::2])
    # No bisection: the best grid value.
    clf, c, trace = _scripted_search(monkeypatch, lambda c: 1 - 0.1 * abs(math.log10(c) - 1.3), steps=0)
    assert c == 1e2 and len(trace) == 7


def _data(x, y, x_val, y_val):
    return TrainingData(_torch(x), torch.from_numpy(y), val_features=_torch(x_val),
                        val_labels=torch.from_numpy(y_val))


def test_method_keeps_the_searched_classifier_and_logits_are_its_decision_function(tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    dim = tiny_backbone.embed_dim
    x, y, x_val, y_val = _problem(seed=1, dim=dim)
    x, x_val = _f32(x), _f32(x_val)  # what a float32 feature tensor holds
    _, c_ref, clf_ref, _ = _reference_search(x, y, x_val, y_val)
    names = ["a", "b", "c"]
    method = build_method("linear_probe", tiny_backbone, names)
    method.prepare(_data(x, y, x_val, y_val))
    assert float(method.chosen_c) == c_ref and method.chosen_c.dtype == torch.float64
    probe = np.random.default_rng(0).normal(size=(5, dim)).astype(np.float32)
    logits = method(Batch(features=_torch(probe)))
    np.testing.assert_allclose(logits.numpy(), clf_ref.decision_function(probe), rtol=1e-5, atol=1e-5)
    assert len(method.search_trace) == 23

    save_file(method.learned_state(), tmp_path / "state.safetensors")
    assert set(load_file(tmp_path / "state.safetensors")) == {"weight", "bias", "chosen_c"}
    other = build_method("linear_probe", tiny_backbone, names, seed=7)
    with pytest.raises(RuntimeError, match="not fitted"):
        other(Batch(features=_torch(probe)))
    other.load_learned_state(load_file(tmp_path / "state.safetensors"))
    assert torch.equal(other(Batch(features=_torch(probe))), logits)


def test_binary_problem_gives_the_sigmoid_as_a_two_class_softmax(tiny_backbone):
    x, y, x_val, y_val = _problem(seed=3, classes=2, dim=tiny_backbone.embed_dim)
    x, x_val = _f32(x), _f32(x_val)
    method = build_method("linear_probe", tiny_backbone, ["a", "b"], LinearProbeConfig(search_steps=2))
    method.prepare(_data(x, y, x_val, y_val))
    clf = LogisticRegression(C=float(method.chosen_c), solver="lbfgs", max_iter=1000, random_state=0)
    clf.fit(x, y)
    logits = method(Batch(features=_torch(x_val))).double()
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), clf.decision_function(x_val), atol=1e-5)
    np.testing.assert_allclose(logits.softmax(-1).numpy(), clf.predict_proba(x_val), atol=1e-6)


def test_needs_validation_and_every_class(tiny_backbone):
    x, y, x_val, y_val = _problem(dim=tiny_backbone.embed_dim)
    method = build_method("linear_probe", tiny_backbone, ["a", "b", "c"])
    with pytest.raises(ValueError, match="validation"):
        method.prepare(TrainingData(_torch(x), torch.from_numpy(y)))
    method = build_method("linear_probe", tiny_backbone, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="'d'"):
        method.prepare(_data(x, y, x_val, y_val))
    assert not method.needs_fit()


@pytest.mark.parametrize("option, value", [("c_grid", ()), ("c_grid", (1.0, -1.0)), ("search_steps", -1),
                                           ("max_iter", 0)])
def test_config_errors_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        LinearProbeConfig(**{option: value})
