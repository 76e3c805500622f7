"""Classification metrics over logits: pure functions, no state, no printing.

Every function takes ``logits`` of shape ``[N, C]`` (a ``torch.Tensor`` of any float dtype, or a
NumPy array) and integer ``labels`` of shape ``[N]`` with values in ``[0, C)``. Predictions are
``argmax(logits, axis=1)`` (the first maximum on ties); probabilities are ``softmax(logits)``
computed in float64, so bf16/fp16 logits give the same numbers as their fp32 upcast.

Conventions (read these before putting numbers in a table):

* **Fractions, not percentages.** ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auroc``,
  ``ece`` and ``per_class_recall`` are stored in ``[0, 1]``. The papers quote accuracy in percent;
  reports multiply by 100 when they render, the data never does.
* **Absent classes.** A class that never occurs in ``labels`` has no recall and no AUROC: it is
  ``NaN`` in :func:`per_class_recall` and is left out of ``balanced_accuracy`` and ``auroc`` (as
  scikit-learn does). ``macro_f1`` averages over the classes present in ``labels`` *or* in the
  predictions, exactly like ``sklearn.metrics.f1_score(average="macro")`` with ``labels=None``.
  The confusion matrix always covers all ``C`` classes.
* **NaN in files.** :func:`evaluate_logits` returns plain floats, ints and lists, ready for
  ``json.dumps``. A metric that is undefined (e.g. AUROC with a single class in ``labels``) is
  ``float("nan")``, which ``json.dumps`` writes as the bare token ``NaN``. Python's ``json`` module
  reads it back, but strict JSON parsers (``jq``, JavaScript) do not.

Balanced accuracy, macro-F1, AUROC and the confusion matrix come from scikit-learn (imported on
first use, so ``import biomedap`` stays light). Accuracy, per-class recall, ECE (which
scikit-learn lacks) and NLL are computed here; NLL from a float64 log-softmax of the logits rather
than ``sklearn.metrics.log_loss``, which clips probabilities and so caps the loss of a confident
mistake.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

#: What the metric functions accept for ``logits`` and ``labels``.
ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

#: Number of equal-width confidence bins of :func:`expected_calibration_error` (Guo et al., 2017).
ECE_BINS = 15

__all__ = [
    "ECE_BINS",
    "accuracy",
    "balanced_accuracy",
    "confusion_matrix",
    "evaluate_logits",
    "expected_calibration_error",
    "macro_auroc_ovr",
    "macro_f1",
    "negative_log_likelihood",
    "per_class_recall",
]


# --------------------------------------------------------------------------- input handling


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # NumPy has no bfloat16; upcast floats before leaving torch (float64 keeps fp32 exact).
        if x.is_floating_point():
            x = x.to(torch.float64)
        return x.numpy()
    return np.asarray(x)


def _check(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(float64 logits [N, C], int64 labels [N])``."""
    z = _to_numpy(logits)
    y = _to_numpy(labels)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape [N, C], got shape {tuple(z.shape)}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {tuple(y.shape)}")
    n, c = z.shape
    if y.shape[0] != n:
        raise ValueError(f"logits and labels disagree on N: logits {tuple(z.shape)}, labels {tuple(y.shape)}")
    if n == 0:
        raise ValueError("cannot evaluate an empty set: logits and labels have N = 0")
    if c < 2:
        raise ValueError(f"logits need at least 2 class columns, got C = {c}")
    if not np.issubdtype(z.dtype, np.number) or np.issubdtype(z.dtype, np.complexfloating):
        raise TypeError(f"logits must be real numbers, got dtype {z.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        # Float labels usually mean logits and labels were swapped, or a one-hot got flattened.
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    z = z.astype(np.float64, copy=False)
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    y = y.astype(np.int64, copy=False)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"labels must lie in [0, {c}) for C = {c} logit columns, got values in [{lo}, {hi}]")
    return z, y


def _log_softmax(z: np.ndarray) -> np.ndarray:
    # Subtracting the row max keeps exp() from overflowing; exact in exact arithmetic.
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def _confusion(y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    return sk_confusion_matrix(y, pred, labels=np.arange(c))


def _recalls(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


# --------------------------------------------------------------------------- metrics


def accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy as a fraction in ``[0, 1]``."""
    z, y = _check(logits, labels)
    return float(np.mean(z.argmax(axis=1) == y))


def per_class_recall(logits: ArrayLike, labels: ArrayLike) -> list[float]:
    """Recall of each of the ``C`` classes (length-``C`` list); ``NaN`` for a class absent from ``labels``."""
    z, y = _check(logits, labels)
    c = z.shape[1]
    return [float(v) for v in _recalls(_confusion(y, z.argmax(axis=1), c))]


def balanced_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``labels``.

    ``sklearn.metrics.balanced_accuracy_score(labels, argmax(logits))``: predicted classes that
    never occur in ``labels`` lower the recall of the true classes but add no term.
    """
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    z, y = _check(logits, labels)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the documented case above
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, z.argmax(axis=1)))


def macro_f1(logits: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean F1 over the classes present in ``labels`` or in the predictions.

    ``sklearn.metrics.f1_score(labels, argmax(logits), average="macro")`` with its default
    ``labels=None``: the classes averaged over are ``unique(y_true) ∪ unique(y_pred)``. A class that
    is predicted but never true, or true but never predicted, contributes an F1 of 0. Classes that
    appear in neither are skipped, so the value can differ from an average over all ``C`` classes.
    """
    from sklearn.metrics import f1_score

    z, y = _check(logits, labels)
    return float(f1_score(y, z.argmax(axis=1), average="macro", zero_division=0))


def macro_auroc_ovr(logits: ArrayLike, labels: ArrayLike) -> float:
    """Macro one-vs-rest ROC AUC of the softmax probabilities, as a fraction in ``[0, 1]``.

    * All ``C`` classes present: ``sklearn.metrics.roc_auc_score(labels, softmax(logits),
      multi_class="ovr", average="macro")``; for ``C = 2`` the score is the positive-class
      probability, as in ``roc_auc_score(labels, p[:, 1])``.
    * Some classes absent from ``labels``: they have no positives, so their one-vs-rest AUC is
      undefined and they are left out of the mean. The present classes are scored on the softmax
      over *all* ``C`` columns (not renormalised over the present ones), i.e. the mean of
      ``roc_auc_score(labels == k, p[:, k])`` over present ``k``.
    * Fewer than two classes present: ``NaN`` and a logged warning (no ranking to score).
    """
    from sklearn.metrics import roc_auc_score

    z, y = _check(logits, labels)
    c = z.shape[1]
    present = np.flatnonzero(np.bincount(y, minlength=c))
    if present.size < 2:
        log.warning("AUROC is undefined with %d class(es) present in labels; returning NaN", present.size)
        return float("nan")
    p = _softmax(z)
    if c == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def expected_calibration_error(logits: ArrayLike, labels: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1) of the top-1 softmax confidence, as a fraction in ``[0, 1]``.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins of the
    maximum softmax probability. Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]``
    (edges from ``numpy.linspace(0, 1, n_bins + 1)``); the first bin is closed on the left so that
    it also takes a confidence of exactly 0. A confidence of exactly ``0.4`` therefore falls in
    ``(1/3, 0.4]``, not in the next bin. Empty bins contribute nothing.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    z, y = _check(logits, labels)
    p = _softmax(z)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns i with edges[i-1] < conf <= edges[i]: the right-closed convention.
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = conf.size
    count = np.bincount(bins, minlength=n_bins)
    sum_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(bins, weights=correct, minlength=n_bins)
    # |B|/N * |acc - conf| = |sum_acc - sum_conf| / N: no division by empty bins needed.
    return float(np.abs(sum_acc - sum_conf).sum() / n)


def negative_log_likelihood(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean cross-entropy in nats, from a float64 log-softmax of the logits."""
    z, y = _check(logits, labels)
    logp = _log_softmax(z)
    return float(-logp[np.arange(y.size), y].mean())


def confusion_matrix(logits: ArrayLike, labels: ArrayLike) -> list[list[int]]:
    """``C x C`` counts (scikit-learn's); row = true class, column = predicted; all ``C`` classes, present or not."""
    z, y = _check(logits, labels)
    cm = _confusion(y, z.argmax(axis=1), z.shape[1])
    return [[int(v) for v in row] for row in cm]


def evaluate_logits(
    logits: ArrayLike, labels: ArrayLike, classnames: Sequence[str] | None = None
) -> dict[str, Any]:
    """All metrics of one evaluated split, as a JSON-serialisable dict.

    Keys (stable; reports and ``results.jsonl`` rely on them): ``accuracy``, ``balanced_accuracy``,
    ``macro_f1``, ``auroc``, ``ece``, ``nll`` (floats; fractions except ``nll`` in nats),
    ``per_class_recall`` (list of ``C`` floats, ``NaN`` for absent classes), ``confusion_matrix``
    (``C x C`` ints, rows = true), ``n`` (int) and ``classnames`` (list of ``C`` strings, or
    ``None`` when not given). See the module docstring for the conventions.

    Raises:
        ValueError: shape mismatch, empty input, fewer than 2 columns, labels outside ``[0, C)``,
            non-finite logits, or ``classnames`` whose length is not ``C``.
        TypeError: non-integer labels.
    """
    z, y = _check(logits, labels)
    c = z.shape[1]
    if classnames is not None:
        classnames = [str(name) for name in classnames]
        if len(classnames) != c:
            raise ValueError(f"got {len(classnames)} classnames for C = {c} logit columns")
    # Every public function re-validates; the float64 copies are cheap next to producing the logits.
    return {
        "accuracy": accuracy(z, y),
        "balanced_accuracy": balanced_accuracy(z, y),
        "macro_f1": macro_f1(z, y),
        "auroc": macro_auroc_ovr(z, y),
        "ece": expected_calibration_error(z, y),
        "nll": negative_log_likelihood(z, y),
        "per_class_recall": per_class_recall(z, y),
        "confusion_matrix": confusion_matrix(z, y),
        "n": int(y.size),
        "classnames": classnames,
    }

