"""delphi's two scorers of an explanation, on held-out windows, and the judge they ask.

A scorer is an object with one method, ``score(explanation, sample)``; it asks a ``Judge`` (one
method, ``ask(questions)`` -> P(yes) each: ``workbench.explain_llm.LLMJudge``, or a deterministic
stub in tests):

- detection: held-out windows where the feature fires and as many where it does not, shown
  plainly; "is this feature active anywhere in the text?";
- fuzzing: held-out windows where it fires, half with the firing tokens marked, half with as many
  non-firing tokens of the window marked; "does the description fit every marked token?".

Both report balanced accuracy, (TPR + TNR) / 2, answering "yes" when P(yes) > 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from workbench.explain_data import Corpus, Firing, Shown, shown, window
from workbench.explain_llm import Question


class Judge(Protocol):
    def ask(self, questions: Sequence[Question]) -> list[float]:
        """P(yes) for each question."""


def balanced_accuracy(p_pos: Sequence[float], p_neg: Sequence[float]) -> float | None:
    """(TPR + TNR) / 2 with "yes" meaning P(yes) > 0.5; None without both kinds."""
    if not len(p_pos) or not len(p_neg):
        return None
    tpr = float(np.mean([p > 0.5 for p in p_pos]))
    tnr = float(np.mean([p <= 0.5 for p in p_neg]))
    return (tpr + tnr) / 2


def auc(p_pos: Sequence[float], p_neg: Sequence[float]) -> float | None:
    """P(a random positive gets a higher P(yes) than a random negative), ties counting half: the
    threshold-free companion of balanced accuracy (a judge biased towards "no" can still rank)."""
    if not len(p_pos) or not len(p_neg):
        return None
    a, b = np.asarray(p_pos, float)[:, None], np.asarray(p_neg, float)[None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


@dataclass(frozen=True)
class Sample:
    """The held-out windows a feature's explanation is scored on."""

    positives: tuple[Shown, ...]  # detection: the feature fires in the window (no marks)
    negatives: tuple[Shown, ...]  # detection: it fires nowhere in the window
    correct: tuple[Shown, ...]  # fuzzing: its firing tokens marked
    wrong: tuple[Shown, ...]  # fuzzing: as many of its non-firing tokens marked


def held_out_sample(corpus: Corpus, firing: Firing, rng: np.random.Generator, n: int = 5) -> Sample:
    """Up to ``n`` windows of each kind from the held-out contexts; detection takes equal numbers."""
    test_rows = np.flatnonzero(corpus.test)
    fired = firing.fired
    rows, positions = np.nonzero(fired[test_rows])
    rows = test_rows[rows]
    order = rng.permutation(rows.size)
    picks, used = [], set()
    for i in order:  # distinct windows: one focus per (context, window start)
        key = (int(rows[i]), window(corpus, int(positions[i]))[0] // 8)
        if key not in used:
            used.add(key)
            picks.append((int(rows[i]), int(positions[i])))
        if len(picks) == 3 * n:
            break
    negatives = []
    for _ in range(50 * n):
        if len(negatives) == n or test_rows.size == 0:
            break
        row = int(test_rows[rng.integers(test_rows.size)])
        pos = int(rng.integers(1, corpus.ctx_len))
        start, stop = window(corpus, pos)
        if not fired[row, start:stop].any():
            negatives.append(shown(corpus, firing, row, pos, show_marks=False))
    detect = picks[:n]
    k = min(len(detect), len(negatives))
    positives = tuple(shown(corpus, firing, r, p, show_marks=False) for r, p in detect[:k])
    fuzz = picks[n:] if len(picks) >= n + 2 else picks
    half = len(fuzz) // 2
    correct = tuple(shown(corpus, firing, r, p) for r, p in fuzz[:half])
    wrong = []
    for r, p in fuzz[half: 2 * half]:
        start, stop = window(corpus, p)
        on = fired[r, start:stop]
        off = np.flatnonzero(~on)
        if off.size == 0:
            continue
        marks = np.zeros(on.size, bool)
        marks[rng.choice(off, size=min(int(on.sum()), off.size), replace=False)] = True
        wrong.append(shown(corpus, firing, r, p, marks=marks))
    return Sample(positives, tuple(negatives[:k]), correct, tuple(wrong))


class DetectionScorer:
    """``score`` -> balanced accuracy; ``last`` keeps the P(yes) of the positives and negatives it asked."""

    def __init__(self, judge: Judge):
        self.judge, self.last = judge, ((), ())

    def score(self, explanation: str, sample: Sample) -> float | None:
        questions = [Question("detection", explanation, w) for w in sample.positives + sample.negatives]
        if not sample.positives or not sample.negatives:
            return None
        p = self.judge.ask(questions)
        self.last = (p[: len(sample.positives)], p[len(sample.positives):])
        return balanced_accuracy(*self.last)


class FuzzingScorer:
    """``score`` -> balanced accuracy; ``last`` keeps the P(yes) of the correct and wrong windows it asked."""

    def __init__(self, judge: Judge):
        self.judge, self.last = judge, ((), ())

    def score(self, explanation: str, sample: Sample) -> float | None:
        if not sample.correct or not sample.wrong:
            return None
        p = self.judge.ask([Question("fuzzing", explanation, w) for w in sample.correct + sample.wrong])
        self.last = (p[: len(sample.correct)], p[len(sample.correct):])
        return balanced_accuracy(*self.last)


SCORERS = {"detection": DetectionScorer, "fuzzing": FuzzingScorer}
