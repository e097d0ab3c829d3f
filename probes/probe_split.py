"""Sparse-probing tasks, and how each is balanced and split into train and test (pure, seeded).

Tasks: ``binary_tasks`` makes one per label value vs the rest, or a single task "prefix=b" when
there are exactly two values a < b.

Balance: the majority class is downsampled (seeded by (seed, task name)) to the minority's size,
and each class is capped at ``max_per_class``; a task with fewer than ``min_per_class`` examples
in a class is skipped with a notice. Split: where the examples carry the workspace's holdout rule
(``workbench.activations.HOLDOUT_EVERY``), its test contexts are test and the rest train, each
balanced and capped separately; when that leaves fewer than ``min_test_per_class`` examples of a
class in either split, or there is no such rule, a seeded stratified split holds out
``TEST_FRACTION`` of each class of the balanced pool. ``TaskSplit.split`` records which.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from probes.probe_fit import ProbingError

DEFAULT_MAX_PER_CLASS = 500
DEFAULT_MIN_PER_CLASS = 10
DEFAULT_MIN_TEST_PER_CLASS = 5
TEST_FRACTION = 0.25  # stratified fallback: share of each class held out

Split = Literal["holdout", "stratified"]


@dataclass(frozen=True)
class TaskSplit:
    """Example indices (into the labelled pool) of one task, balanced; y = 1 for the positives."""

    train: np.ndarray  # [n_train] indices
    y_train: np.ndarray  # [n_train] 0/1
    test: np.ndarray  # [n_test] indices
    y_test: np.ndarray  # [n_test] 0/1
    split: Split


def _task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _take(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n indices of ``pool`` (sorted ascending) chosen without replacement by ``rng``."""
    return np.sort(rng.choice(pool, size=n, replace=False)) if n < len(pool) else np.sort(pool)


def _join(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    return idx, y


def split_task(
    positive: np.ndarray,
    holdout: np.ndarray | None,
    *,
    task: str,
    seed: int = 0,
    max_per_class: int = DEFAULT_MAX_PER_CLASS,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    min_test_per_class: int = DEFAULT_MIN_TEST_PER_CLASS,
) -> TaskSplit | str:
    """Balance and split one task; a notice string instead when a class has too few examples.

    ``positive`` [n] bool marks the task's positives among n labelled examples; ``holdout`` [n]
    bool marks the workspace's test contexts (None: no such rule, use the stratified split).
    Deterministic given (seed, task name).
    """
    positive = np.asarray(positive, dtype=bool)
    pos_all, neg_all = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_class = min(len(pos_all), len(neg_all))
    if n_class < min_per_class:
        return (f"{task}: skipped, {len(pos_all)} positive / {len(neg_all)} negative examples "
                f"(needs at least {min_per_class} of each)")
    rng = _task_rng(seed, task)
    if holdout is not None:
        holdout = np.asarray(holdout, dtype=bool)
        parts = {}
        for name, mask in (("train", ~holdout), ("test", holdout)):
            pos, neg = pos_all[mask[pos_all]], neg_all[mask[neg_all]]
            parts[name] = (pos, neg, min(len(pos), len(neg), max_per_class))
        if parts["test"][2] >= min_test_per_class and parts["train"][2] >= min_test_per_class:
            (tr_pos, tr_neg, n_tr), (te_pos, te_neg, n_te) = parts["train"], parts["test"]
            train, y_train = _join(_take(rng, tr_pos, n_tr), _take(rng, tr_neg, n_tr))
            test, y_test = _join(_take(rng, te_pos, n_te), _take(rng, te_neg, n_te))
            return TaskSplit(train, y_train, test, y_test, "holdout")
    n = min(n_class, max_per_class)
    n_test = max(1, int(round(TEST_FRACTION * n)))
    pos, neg = rng.permutation(_take(rng, pos_all, n)), rng.permutation(_take(rng, neg_all, n))
    train, y_train = _join(np.sort(pos[n_test:]), np.sort(neg[n_test:]))
    test, y_test = _join(np.sort(pos[:n_test]), np.sort(neg[:n_test]))
    return TaskSplit(train, y_train, test, y_test, "stratified")


def binary_tasks(labels: Sequence, prefix: str) -> list[tuple[str, np.ndarray]]:
    """(name, positive mask) per task: one per label value vs the rest; one task "prefix=b" for two values a < b."""
    values = sorted(set(labels), key=str)
    if len(values) < 2:
        shown = f"'{values[0]}'" if values else "none"
        raise ProbingError(f"probing needs at least 2 classes, got {len(values)} ({shown})")
    labels = np.asarray([str(v) for v in labels])
    targets = values[1:] if len(values) == 2 else values
    return [(f"{prefix}={v}", labels == str(v)) for v in targets]
