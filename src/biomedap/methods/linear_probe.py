"""Linear probe: multinomial logistic regression on frozen image features (Radford et al., 2021).

scikit-learn's ``LogisticRegression`` (lbfgs, L2, intercept, ``max_iter`` 1000) is fitted on one
feature per training image, and its inverse regularisation strength ``C`` is chosen on the
few-shot validation split by the search of CoOp's ``lpclip`` protocol, which BiomedCoOp's LP
baseline reuses (reference notes: baselines.md §3.9):

1. coarse grid: fit at every ``C`` of ``c_grid`` (1e6, 1e4, …, 1e-6), ``c* = argmax`` val
   accuracy (the first one on ties);
2. ``search_steps`` (8) bisection steps in log space on ``[c*/10, 10·c*]``: fit at both ends;
   if ``acc(left) < acc(right)`` keep the right end's classifier and move to
   ``[geometric mid, right]``, else keep the left end's and move to ``[left, geometric mid]``
   (``mid = 10^((log10 left + log10 right) / 2)``);
3. the classifier kept at the **last** step is the result (not the best one seen).

Logits are the classifier's decision function ``f·Wᵀ + b`` (no logit scale).  The saved state is
``weight`` [C, D], ``bias`` [C] and the chosen ``chosen_c`` (persistent buffers).  For two classes
scikit-learn fits one weight vector ``w``; it is stored as ``[-w/2, w/2]`` (and likewise the
intercept), whose softmax equals the binary model's sigmoid.

Large ``C`` on separable few-shot data does not converge within ``max_iter``; the published code
ran into the same limit and kept the unconverged fit, so the warning is silenced here and
recorded in :attr:`LinearProbe.search_trace` instead.

The published BiomedCLIP LP used one random augmented view per training image (RRC 0.5–1 + flip)
and the seed-1 split for its three runs (``presets/linear_probe.yaml``); the original ``lpclip``
protocol used un-augmented features.  No code deviation from the protocol: no ``variant``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Batch, Method, MethodConfig, TrainingData

DEFAULT_C_GRID: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeConfig(MethodConfig):
    c_grid: tuple[float, ...] = field(
        default=DEFAULT_C_GRID,
        metadata={"help": "coarse grid of inverse L2 strengths C; the best on val (first on ties) centres "
                          "the bisection interval [C/10, 10·C]"},
    )
    search_steps: int = field(
        default=8,
        metadata={"help": "log-space bisection steps after the coarse grid; the classifier kept at the last "
                          "step is the result (0 = the best grid value)"},
    )
    max_iter: int = field(default=1000, metadata={"help": "lbfgs iterations per fit"})

    def __post_init__(self):
        if not self.c_grid:
            raise ValueError("c_grid: give at least one value of C")
        for c in self.c_grid:
            if not (c > 0 and math.isfinite(c)):
                raise ValueError(f"c_grid: every C must be a finite number > 0, got {c}")
        if self.search_steps < 0:
            raise ValueError(f"search_steps must be ≥ 0, got {self.search_steps}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be ≥ 1, got {self.max_iter}")


@dataclass(frozen=True)
class SearchPoint:
    """One fit of the regularisation search, in the order it was requested."""

    stage: str  # "grid" or "step <k>" (k = 1..search_steps)
    c: float
    val_accuracy: float
    converged: bool


class LinearProbe(Method):
    name = "linear_probe"
    summary = "Linear probe: logistic regression on image features, C searched on val (CoOp lpclip protocol)"
    Config = LinearProbeConfig
    trainable = False
    supports_unseen_classes = False
    uses_validation = True

    def __init__(self, backbone, classnames: Sequence[str], config: LinearProbeConfig | None = None):
        super().__init__(backbone, classnames, config)
        device = backbone.device
        num_classes, dim = len(self.classnames), backbone.embed_dim
        # Learned by prepare() or loaded from a run: persistent. chosen_c = 0 marks "not fitted yet".
        self.register_buffer("weight", torch.zeros(num_classes, dim, device=device))
        self.register_buffer("bias", torch.zeros(num_classes, device=device))
        self.register_buffer("chosen_c", torch.zeros((), dtype=torch.float64, device=device))
        self.search_trace: list[SearchPoint] = []

    # ------------------------------------------------------------------ fitting
    def prepare(self, data: TrainingData) -> None:
        val_features, val_labels = data.require_validation(self.name)
        x = data.train_features.detach().double().cpu().numpy()
        y = data.train_labels.detach().cpu().numpy()
        x_val = val_features.detach().double().cpu().numpy()
        y_val = val_labels.detach().cpu().numpy()
        missing = sorted(set(range(len(self.classnames))) - set(y.tolist()))
        if missing:
            raise ValueError(f"{self.name}: no training features for classes "
                             f"{[self.classnames[i] for i in missing]}")
        clf, c, trace = search_logistic_regression(
            x, y, x_val, y_val, self.config.c_grid, self.config.search_steps, self.config.max_iter,
        )
        self.search_trace = trace
        weight, bias = _multiclass_coefficients(clf)
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(weight))
            self.bias.copy_(torch.from_numpy(bias))
            self.chosen_c.fill_(c)

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Batch) -> torch.Tensor:
        if float(self.chosen_c) == 0.0:
            raise RuntimeError(f"{self.name}: not fitted; run prepare() on training data or load a saved "
                               "state")
        features = self.image_features(batch)
        return features.to(self.weight.dtype) @ self.weight.t() + self.bias


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    """One scikit-learn fit: lbfgs, L2 (the default penalty), intercept, multinomial for > 2 classes.

    The features are fitted in float64: with float32 input, scikit-learn's arithmetic precision
    would depend on whether ``C`` is a Python float or a NumPy float64 (NumPy 2 promotion), and
    the bisection produces both.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=float(c), solver="lbfgs", max_iter=max_iter, fit_intercept=True,
                             random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in the trace instead
        clf.fit(np.asarray(x, dtype=np.float64), y)
    return clf


def search_logistic_regression(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    search_steps: int = 8,
    max_iter: int = 1000,
):
    """The ``lpclip`` regularisation search; returns ``(classifier, C, trace)``.

    ``trace`` lists every fit in the order the protocol requests it (grid, then left and right end
    of each bisection step).  A C requested twice (an interval end carried over to the next step)
    is fitted once: lbfgs is deterministic, so the refit the reference does is the same classifier.
    """
    fits: dict[float, tuple[object, float, bool]] = {}
    trace: list[SearchPoint] = []

    def evaluate(c: float, stage: str):
        if c not in fits:
            clf = fit_logistic_regression(x, y, c, max_iter)
            accuracy = float(np.mean(clf.predict(x_val) == y_val))
            converged = bool(np.all(np.asarray(clf.n_iter_) < max_iter))
            fits[c] = (clf, accuracy, converged)
        clf, accuracy, converged = fits[c]
        trace.append(SearchPoint(stage, c, accuracy, converged))
        return clf, accuracy

    grid = [float(c) for c in c_grid]
    results = [evaluate(c, "grid") for c in grid]
    peak = int(np.argmax([acc for _, acc in results]))  # first maximum on ties
    chosen_c, (chosen, _) = grid[peak], results[peak]
    left, right = chosen_c * 1e-1, chosen_c * 1e1
    for step in range(1, search_steps + 1):
        clf_left, acc_left = evaluate(left, f"step {step}")
        clf_right, acc_right = evaluate(right, f"step {step}")
        # The reference's arithmetic, kept exactly (the carried end goes through log10 and back).
        if acc_left < acc_right:
            chosen_c, chosen = right, clf_right
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            chosen_c, chosen = left, clf_left
            left, right = np.log10(left), 0.5 * (np.log10(right) + np.log10(left))
        left, right = float(np.power(10.0, left)), float(np.power(10.0, right))
    return chosen, chosen_c, trace


def _multiclass_coefficients(clf) -> tuple[np.ndarray, np.ndarray]:
    """``(weight [C, D], bias [C])`` as float32, rows in label order 0..C-1."""
    coef = np.asarray(clf.coef_, dtype=np.float64)
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: one score s = w·f + b for class 1; softmax([-s/2, s/2]) = sigmoid(s)
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    # classes_ is sorted and every class is present (checked in prepare): rows are in label order.
    return coef.astype(np.float32), intercept.astype(np.float32)
