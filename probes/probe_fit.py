"""The pure core of sparse probing (SAEBench): rank features by mean difference on the training
split, fit a standardised L2 logistic regression on the top k, and report test accuracy; the
same on every feature is the full probe (the ceiling). Arrays in, numbers out: no workspace, no
model.

Ranking: s_j = | mean_{i: y_i=1} x_ij − mean_{i: y_i=0} x_ij |, S_k = the k largest s_j (ties:
lower index first). Fitting: sklearn ``LogisticRegression`` (L2, C = ``SPARSE_C``, or ``FULL_C``
for the full probe) on x[:, S_k] standardised with the training mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from workbench.errors import WorkbenchError

DEFAULT_KS = (1, 2, 5)
SPARSE_C = 1.0  # inverse L2 strength of the k-sparse probes
FULL_C = 1.0  # inverse L2 strength of the full linear probe
MAX_ITER = 2000


class ProbingError(WorkbenchError):
    """Bad probing input: k out of range, fewer than two classes, mismatched arrays, no task to run."""


@dataclass(frozen=True)
class SparseProbe:
    """Test accuracy of a logistic regression on the k features ranked highest by mean difference."""

    k: int
    accuracy: float
    features: tuple[int, ...]  # the selected feature indices, best first


def _check_xy(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ProbingError(f"{name} features must be 2-D [examples, features], got shape {list(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ProbingError(f"{name} labels must have shape [{x.shape[0]}], got {list(y.shape)}")
    if not np.isin(y, (0, 1)).all():
        raise ProbingError(f"{name} labels must be 0/1 (or bool), got values {sorted(set(np.unique(y).tolist()))[:5]}")
    return x, y.astype(np.int64)


def _check_pair(x_train, y_train, x_test, y_test) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train = _check_xy(x_train, y_train, "training")
    x_test, y_test = _check_xy(x_test, y_test, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ProbingError(f"training and test features differ in width: {x_train.shape[1]} vs {x_test.shape[1]}")
    if len(np.unique(y_train)) < 2:
        raise ProbingError(f"the training split needs both classes, got only class {int(y_train[0]) if len(y_train) else 'none'}")
    if len(y_test) == 0:
        raise ProbingError("the test split is empty")
    return x_train, y_train, x_test, y_test


def check_ks(ks: Sequence[int], n_features: int, what: str = "features") -> tuple[int, ...]:
    """``ks`` sorted and deduplicated, or a one-line error when one is not in 1..n_features."""
    ks = tuple(ks)
    if not ks:
        raise ProbingError("ks is empty: give at least one k, e.g. 1 2 5")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ProbingError(f"k must be an integer, got {k!r}")
        if k <= 0 or k > n_features:
            raise ProbingError(f"k must be between 1 and the number of {what} ({n_features}), got {k}")
    return tuple(sorted({int(k) for k in ks}))


def rank_by_mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices by |mean over y=1 − mean over y=0|, largest first (ties: lower index first)."""
    x, y = _check_xy(x, y, "training")
    if len(np.unique(y)) < 2:
        raise ProbingError("ranking by mean difference needs both classes in the training split")
    score = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))  # [F]
    return np.argsort(-score, kind="stable")


def _fit_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float) -> float:
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(C=c, max_iter=MAX_ITER)
    probe.fit(scaler.transform(x_train), y_train)
    return float((probe.predict(scaler.transform(x_test)) == y_test).mean())


def probe_features(x_train, y_train, x_test, y_test, ks: Sequence[int] = DEFAULT_KS, *, c: float = SPARSE_C) -> list[SparseProbe]:
    """SAEBench k-sparse probes: top-k features by mean difference on train, standardised L2 logistic
    regression on those k, accuracy on test. One ``SparseProbe`` per k, in increasing k.

    x_train [n_train, F], y_train [n_train] in {0, 1}; x_test [n_test, F], y_test [n_test].
    """
    x_train, y_train, x_test, y_test = _check_pair(x_train, y_train, x_test, y_test)
    ks = check_ks(ks, x_train.shape[1])
    order = rank_by_mean_difference(x_train, y_train)
    out = []
    for k in ks:
        chosen = order[:k]
        accuracy = _fit_accuracy(x_train[:, chosen], y_train, x_test[:, chosen], y_test, c)
        out.append(SparseProbe(k, accuracy, tuple(int(i) for i in chosen)))
    return out


def full_probe(x_train, y_train, x_test, y_test, *, c: float = FULL_C) -> float:
    """Test accuracy of a standardised L2 logistic regression on every feature (the ceiling)."""
    x_train, y_train, x_test, y_test = _check_pair(x_train, y_train, x_test, y_test)
    return _fit_accuracy(x_train, y_train, x_test, y_test, c)
