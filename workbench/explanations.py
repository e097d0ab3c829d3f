"""Feature explanations: a scored label for every feature of an analysed SAE, stored in the workspace.

    feature_explanations(sae_id, feature, explainer, label, detail, scores, examples, seed, created_at)

one row per (SAE, feature, explainer). ``explainer`` is ``pattern`` (``workbench.explain_pattern``:
a phrase and a regex from the firing statistics, scored exactly by precision, recall and F1 on the
held-out contexts), ``hf:MODEL`` or ``openai:URL[#model]`` (``workbench.explain_llm``: a language
model reads marked examples, scored by detection and fuzzing). ``scores`` holds every score and
``headline``: F1 for ``pattern``, the mean of the LLM scores computed for an LLM label.
``explain`` is resumable: a rerun skips the features that explainer has already labelled.

Readers: ``feature_labels`` (each feature's best label) and ``search_labels`` (substring search).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
from workbench.explain_data import Corpus, load_corpus, load_firing, train_examples
from workbench.explain_llm import ExplainError, LLMExplainer
from workbench.explain_pattern import PatternIndex, explain_pattern, held_out_scores
from workbench.explain_scoring import SCORERS, Judge, held_out_sample
from workbench.workspace import SAERecord, Workspace, fetch_one, resolve_sae

PATTERN = "pattern"
CHUNK = 64  # features whose firing is read in one query


# -- readers -------------------------------------------------------------------------------------
def _has_table(ws: Workspace) -> bool:
    return bool(fetch_one(ws.con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'feature_explanations'")[0])


def feature_labels(ws: Workspace, sae_id: int) -> dict[int, tuple[str, float | None, str]]:
    """feature -> (label, headline score, explainer): an LLM explainer's label when there is one
    (the best-scoring, if several), else the pattern label."""
    if not _has_table(ws):
        return {}
    rows = ws.query("SELECT feature, explainer, label, scores FROM feature_explanations WHERE sae_id = ? ORDER BY created_at, explainer",
                    [sae_id])
    best: dict[int, tuple[tuple, tuple[str, float | None, str]]] = {}
    for feature, explainer, label, scores in rows:
        headline = json.loads(scores).get("headline") if scores else None
        rank = (explainer != PATTERN, headline is not None, headline or 0.0)
        if feature not in best or rank >= best[feature][0]:
            best[feature] = (rank, (label, headline, explainer))
    return {f: value for f, (_, value) in sorted(best.items())}


def search_labels(ws: Workspace, sae_id: int, text: str, limit: int) -> list[tuple[int, str, float | None]]:
    """Features whose best label contains ``text`` (any case), best headline score first."""
    needle = text.lower()
    hits = [(f, label, score) for f, (label, score, _) in feature_labels(ws, sae_id).items() if needle in label.lower()]
    hits.sort(key=lambda h: (h[2] is None, -(h[2] or 0.0), h[0]))
    return hits[: max(0, limit)]


# -- what to explain -----------------------------------------------------------------------------
def parse_features(spec: str, width: int) -> list[int]:
    """``all``, ``N``, ``A-B`` (inclusive) or ``A,B,C`` -> sorted feature ids in [0, width)."""
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(width))
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first:
                raise ExplainError(f"--features range '{part.strip()}' is empty: write A-B with A <= B")
            out.update(range(first, last + 1))
    except ValueError:
        raise ExplainError(f"--features must be all, N, A-B or a comma list of those, got '{spec}'") from None
    bad = sorted(f for f in out if not 0 <= f < width)
    if bad:
        raise ExplainError(f"feature {bad[0]} is out of range: valid ids are 0..{width - 1}")
    return sorted(out)


def check_analysed(ws: Workspace, sae_ref: str | int) -> SAERecord:
    record = resolve_sae(ws, sae_ref)
    status = fetch_one(ws.con, "SELECT status FROM analyses WHERE sae_id = ?", [record.sae_id])
    if not status or status[0] != "done":
        raise ExplainError(f"SAE '{record.name}' is not analysed yet: run `workbench analyze --db {ws.path} --sae {record.name}`")
    return record


def done_features(ws: Workspace, sae_id: int, explainer: str) -> set[int]:
    if not _has_table(ws):
        return set()
    return {f for (f,) in ws.query("SELECT feature FROM feature_explanations WHERE sae_id = ? AND explainer = ?", [sae_id, explainer])}


# -- the job -------------------------------------------------------------------------------------
@dataclass
class Labelled:
    feature: int
    label: str
    detail: dict
    scores: dict
    examples: list = field(default_factory=list)


@dataclass(frozen=True)
class ExplainSummary:
    sae_id: int
    explainer: str
    explained: int
    skipped: int
    seconds: float
    mean_headline: float | None


def label_features(corpus: Corpus, index: PatternIndex, firings: dict, *, explainer: str = PATTERN,
                   llm_explainer: LLMExplainer | None = None, judge: Judge | None = None, scorers: Sequence[str] = (),
                   seed: int = 0) -> list[Labelled]:
    """Label and score each feature of ``firings`` (no workspace access: the benchmark reuses it)."""
    out = []
    for feature, firing in firings.items():
        rng = np.random.default_rng([seed, feature])
        rule, stats = explain_pattern(index, firing)
        scores = held_out_scores(index, rule, firing) if rule.kind != "none" else {}
        examples = train_examples(corpus, firing, rng)
        if rule.kind == "none":  # dead or only held-out firing: nothing to show a model or to score
            out.append(Labelled(feature, rule.phrase, stats, {"headline": None}, []))
            continue
        if explainer == PATTERN:
            label, detail, scores["headline"] = rule.phrase, stats, scores.get("f1")
        else:
            label, detail, scores = llm_explainer.explain(examples), {"pattern": rule.phrase, "pattern_f1": scores.get("f1")}, {}
        if scorers:
            sample = held_out_sample(corpus, firing, rng)
            for name in scorers:
                scores[name] = SCORERS[name](judge).score(label, sample)
            scores["n_detection"], scores["n_fuzzing"] = len(sample.positives) * 2, len(sample.correct) + len(sample.wrong)
            if explainer != PATTERN:
                done = [scores[n] for n in scorers if scores[n] is not None]
                scores["headline"] = float(np.mean(done)) if done else None
        scores.setdefault("headline", None)
        shown = [{"context_id": int(corpus.contexts[e.row]), "start": e.start, "text": e.text, "value": e.value} for e in examples]
        out.append(Labelled(feature, label, detail, scores, shown))
    return out


def explain(ws: Workspace, record: SAERecord, features: list[int], *, explainer: str = PATTERN,
            llm_explainer: LLMExplainer | None = None, judge: Judge | None = None, scorers: Sequence[str] = (),
            seed: int = 0, progress: bool = True, on_row: Callable[[Labelled], None] | None = None) -> ExplainSummary:
    """Label ``features`` with ``explainer`` and store a row each; features it has labelled are skipped."""
    if explainer != PATTERN and llm_explainer is None:
        raise WorkbenchError(f"explainer '{explainer}' needs a language model")
    if scorers and judge is None:
        raise WorkbenchError("detection and fuzzing scores need a judge")
    done = done_features(ws, record.sae_id, explainer)
    todo = [f for f in features if f not in done]
    started = time.perf_counter()
    headlines = []
    with tqdm(total=len(features), initial=len(features) - len(todo), unit="feature", disable=not progress,
              desc=f"explaining sae {record.sae_id} ({explainer})", dynamic_ncols=True) as bar:
        if todo:
            corpus = load_corpus(ws, record)
            index = PatternIndex(corpus)
        for start in range(0, len(todo), CHUNK):
            firings = load_firing(ws, record, corpus, todo[start:start + CHUNK])
            for feature in list(firings):
                row = label_features(corpus, index, {feature: firings.pop(feature)}, explainer=explainer,
                                     llm_explainer=llm_explainer, judge=judge, scorers=scorers, seed=seed)[0]
                ws.con.execute(
                    "INSERT INTO feature_explanations (sae_id, feature, explainer, label, detail, scores, examples, seed) "
                    "VALUES (?, ?, ?, ?, ?::JSON, ?::JSON, ?::JSON, ?)",
                    [record.sae_id, feature, explainer, row.label, json.dumps(row.detail), json.dumps(row.scores),
                     json.dumps(row.examples), seed],
                )
                if row.scores.get("headline") is not None:
                    headlines.append(row.scores["headline"])
                if on_row is not None:
                    on_row(row)
                bar.update(1)
    mean = float(np.mean(headlines)) if headlines else None
    return ExplainSummary(record.sae_id, explainer, len(todo), len(features) - len(todo), time.perf_counter() - started, mean)
