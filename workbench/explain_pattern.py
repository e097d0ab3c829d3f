"""The ``pattern`` explainer: a label and a regex from a feature's firing statistics, no language model.

From the training contexts (``Corpus.test`` is False) it counts, over the tokens where the feature
fires, which token strings they are, which token precedes them and which domain their document
belongs to. It then picks, by F1 on the training tokens, one rule of these kinds:

- ``tokens``: the token's text is one of a set S of strings (greedy: add the string that raises
  F1 most, at most ``MAX_SET``);
- ``tokens after``: as above, and the preceding token's text is one of a set P (kept only when it
  raises F1 by ``CONTEXT_GAIN``);
- ``after``: the preceding token's text is one of P, whatever the token;
- ``class``: the token's text matches one of ``CLASSES`` (numbers, capitalised words, ...).

A rule is written as a short phrase and as regexes: ``regex`` must match the token's whole text
(``re.fullmatch``) and, when present, ``context_regex`` the preceding token's whole text. The
score is exact: the rule predicts "fires" at every held-out token (positions ≥ 1 of the test
contexts) it matches, and precision, recall and F1 compare that with where the feature fired.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from workbench.explain_data import Corpus, Firing

MAX_SET, N_CANDIDATES, CONTEXT_GAIN, MIN_GAIN = 8, 50, 0.05, 0.01
DOMAIN_SHARE, DOMAIN_LIFT = 0.6, 1.5
CLASSES = {  # phrase -> regex over a token's whole text
    "numbers": r"\s*\d+",
    "capitalised words": r"\s?[A-Z][A-Za-z]*",
    "line breaks and indentation": r"\s+",
    "punctuation": r"\s*[^\w\s]+",
    "the start of a lower-case word": r" [a-z]+",
    "pieces inside a word": r"[a-z]+",
}


@dataclass(frozen=True)
class Rule:
    kind: str  # 'tokens' | 'tokens after' | 'after' | 'class' | 'none'
    regex: str | None  # fullmatch on the token's text (None: any token; 'none' kind: no token)
    context_regex: str | None = None  # fullmatch on the preceding token's text
    phrase: str = ""


def escape(text: str) -> str:
    """``text`` as a literal regex, readable: spaces stay, newlines and tabs become \\n and \\t."""
    return "".join("\\" + c if c in ".^$*+?{}[]\\|()" else {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, c) for c in text)


def either(strings: list[str]) -> str:
    """A regex matching exactly one of ``strings`` (longest first)."""
    return "(?:" + "|".join(escape(s) for s in sorted(strings, key=lambda s: (-len(s), s))) + ")"


def show(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class PatternIndex:
    """Per-corpus arrays the explainer reuses for every feature: each token's string index."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        present = np.unique(corpus.tokens)
        self.names, inverse = np.unique(corpus.strings[present].astype(str), return_inverse=True)
        string_of_id = np.zeros(corpus.strings.shape[0], np.int64)
        string_of_id[present] = inverse
        self.sid = string_of_id[corpus.tokens]  # [C, L]
        self.train = ~corpus.test
        self._matches: dict[str, np.ndarray] = {}

    def matches(self, regex: str) -> np.ndarray:
        """[n strings] bool: which token strings the regex matches whole."""
        if regex not in self._matches:
            pattern = re.compile(regex)
            self._matches[regex] = np.array([pattern.fullmatch(s) is not None for s in self.names], bool)
        return self._matches[regex]

    def predict(self, rule: Rule) -> np.ndarray:
        """[C, L] bool: tokens the rule says fire (never position 0)."""
        pred = np.zeros(self.sid.shape, bool)
        if rule.kind == "none":
            return pred
        pred[:, 1:] = True if rule.regex is None else self.matches(rule.regex)[self.sid[:, 1:]]
        if rule.context_regex is not None:
            pred[:, 1:] &= self.matches(rule.context_regex)[self.sid[:, :-1]]
        return pred


def prf(pred: np.ndarray, fired: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean predictions against boolean firing (same shape)."""
    tp, n_pred, n_fired = int((pred & fired).sum()), int(pred.sum()), int(fired.sum())
    precision = tp / n_pred if n_pred else None
    recall = tp / n_fired if n_fired else None
    f1 = 2 * tp / (n_pred + n_fired) if n_pred + n_fired else None
    return {"precision": precision, "recall": recall, "f1": f1, "n_fired": n_fired, "n_predicted": n_pred, "true_positives": tp}


def _greedy(occ: np.ndarray, fires: np.ndarray, total: int) -> tuple[list[int], float]:
    """Indices whose union maximises F1 = 2·Σfires / (Σocc + total), added greedily; with its F1."""
    least = 2 if total >= 10 else 1  # a string seen firing once in many firings is noise, not a pattern
    candidates = [int(i) for i in np.argsort(-fires, kind="stable")[:N_CANDIDATES] if fires[i] >= least]
    chosen, tp, pred, best = [], 0, 0, 0.0
    while len(chosen) < MAX_SET:
        gains = [(2 * (tp + fires[i]) / (pred + occ[i] + total), -i) for i in candidates if i not in chosen]
        if not gains:
            break
        f1, neg = max(gains)
        if f1 < best + MIN_GAIN:
            break
        chosen.append(-neg)
        tp, pred, best = tp + int(fires[-neg]), pred + int(occ[-neg]), f1
    return chosen, best


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(show(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def top_shares(values: np.ndarray, limit: int = 5) -> list[list]:
    if values.size == 0:
        return []
    names, counts = np.unique(values.astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:limit]
    return [[str(names[i]), round(float(counts[i] / values.size), 4)] for i in order]


def explain_pattern(index: PatternIndex, firing: Firing) -> tuple[Rule, dict]:
    """The rule with the best training F1, and the statistics it came from."""
    corpus, fired = index.corpus, firing.fired
    train_fired = fired & index.train[:, None]
    train_fired[:, 0] = False
    total = int(train_fired.sum())
    if total == 0:
        what = "dead: never fires on the analysed tokens" if not fired.any() else "too rare: fires only on held-out tokens"
        return Rule("none", None, None, what), {"kind": "none", "n_train_fired": 0}
    rows = index.train
    tok, prev, hit = index.sid[rows][:, 1:].ravel(), index.sid[rows][:, :-1].ravel(), train_fired[rows][:, 1:].ravel()
    n = len(index.names)
    occ, fires = np.bincount(tok, minlength=n), np.bincount(tok[hit], minlength=n)
    candidates: list[tuple[float, Rule]] = []

    chosen, f1 = _greedy(occ, fires, total)
    names = [str(index.names[i]) for i in chosen]
    if chosen:
        candidates.append((f1, Rule("tokens", either(names), None, f"the tokens {_listing(names)}")))
        inside = np.isin(tok, chosen)
        p_occ, p_fires = np.bincount(prev[inside], minlength=n), np.bincount(prev[inside & hit], minlength=n)
        before, f1_ctx = _greedy(p_occ, p_fires, total)
        if before and f1_ctx >= f1 + CONTEXT_GAIN:
            after = [str(index.names[i]) for i in before]
            candidates.append((f1_ctx, Rule("tokens after", either(names), either(after),
                                            f"the tokens {_listing(names)} after {_listing(after, 3)}")))
    before, f1_prev = _greedy(np.bincount(prev, minlength=n), np.bincount(prev[hit], minlength=n), total)
    if before:
        after = [str(index.names[i]) for i in before]
        candidates.append((f1_prev, Rule("after", None, either(after), f"the token after {_listing(after)}")))
    for phrase, regex in CLASSES.items():
        pred = index.matches(regex)[tok]
        score = prf(pred, hit)["f1"] or 0.0
        candidates.append((score, Rule("class", regex, None, phrase)))
    best_f1, rule = max(candidates, key=lambda c: c[0])  # first of the ties: token rules come first

    train_pred = index.predict(rule) & index.train[:, None]
    train = prf(train_pred, train_fired)
    where = train_fired.nonzero()
    domains = corpus.domains[where]
    base = corpus.domains[rows][:, 1:].ravel()
    top_domains = top_shares(domains, 3)
    phrase = rule.phrase + f" ({train['recall']:.0%} of its firings)" if rule.kind != "class" else rule.phrase
    if top_domains and len(set(base.tolist())) > 1:
        name, share = top_domains[0]
        base_share = float((base == name).mean())
        if share >= DOMAIN_SHARE and share >= DOMAIN_LIFT * base_share:
            where_text = f"in {name} text" if name else "between documents"  # '' = tokens of no document (end-of-text)
            phrase += f", mostly {where_text} ({share:.0%})"
    rule = Rule(rule.kind, rule.regex, rule.context_regex, phrase)
    detail = {
        "kind": rule.kind, "regex": rule.regex, "context_regex": rule.context_regex, "train": train,
        "n_train_fired": total,
        "top_tokens": top_shares(index.names[index.sid[where]]),
        "top_previous": top_shares(index.names[index.sid[where[0], where[1] - 1]]),
        "domains": top_domains,
    }
    return rule, detail


def held_out_scores(index: PatternIndex, rule: Rule, firing: Firing) -> dict:
    """Precision, recall and F1 of the rule on the held-out tokens (test contexts, positions ≥ 1)."""
    test = index.corpus.test
    pred, fired = index.predict(rule)[test][:, 1:], firing.fired[test][:, 1:]
    scores = prf(pred, fired)
    scores["n_tokens"] = int(pred.size)
    return scores
