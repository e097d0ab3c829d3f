"""What the explainers and scorers read: the analysed corpus as arrays, and one feature's firing on it.

``Corpus`` holds every analysed context of an SAE's hook as [contexts, ctx_len] arrays (token id,
document id), the display string of every vocabulary id, each document's domain, and which
contexts are held out. Held-out contexts are the cache's test split
(``workbench.activations.context_ids(..., split="test")``, 5 % of the stream): ``analyze`` stores
the nonzero latents of *every* cached context, so the test split's firing is known exactly and
none of it is used to build a label. ``Firing`` is one feature's activation on every analysed
token (position 0, the BOS, never fires: ``analyze`` leaves it out).

Windows shown to a language model are short token spans around a token; marked tokens are shown
delphi's way, ``<<like this>>`` (consecutive marked tokens share one pair of brackets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.activations import context_ids
from workbench.workspace import SAERecord, Workspace, fetch_one

BEFORE, AFTER = 20, 4  # tokens shown before and after the focus token of a window


@dataclass
class Corpus:
    contexts: np.ndarray  # [C] context ids, stream order
    tokens: np.ndarray  # [C, L] token ids
    docs: np.ndarray  # [C, L] document ids (-1: BOS or separator)
    test: np.ndarray  # [C] bool: held out (the cache's test split)
    strings: np.ndarray  # [vocab] object: display string of each token id
    domains: np.ndarray  # [C, L] object: the domain of each token's document ('' for none)

    @property
    def ctx_len(self) -> int:
        return int(self.tokens.shape[1])

    def text(self, row: int, start: int, stop: int, marked: np.ndarray | None = None) -> str:
        """Tokens ``start..stop-1`` of context row ``row`` as one line, ``marked`` ones in <<…>>."""
        return render(self.window_tokens(row, start, stop), None if marked is None else list(marked))

    def window_tokens(self, row: int, start: int, stop: int) -> list[str]:
        return [str(s) for s in self.strings[self.tokens[row, start:stop]]]


def load_corpus(ws: Workspace, record: SAERecord) -> Corpus:
    """Every context the SAE's analysis covered, as arrays (one query per table)."""
    ids = context_ids(ws, record.hook, run_id=record.run_id, split="all")
    test = set(context_ids(ws, record.hook, run_id=record.run_id, split="test"))
    ctx_len = int(fetch_one(ws.con, "SELECT ctx_len FROM runs WHERE run_id = ?", [record.run_id])[0])
    table = ws.con.execute(
        """SELECT t.context_id, t.position, t.token_id, t.doc_id, coalesce(d.domain, '') AS domain
           FROM tokens t JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
           LEFT JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
           WHERE c.run_id = ? ORDER BY t.context_id, t.position""",
        [record.run_id],
    ).fetchnumpy()
    row_of = {cid: i for i, cid in enumerate(ids)}
    keep = np.array([cid in row_of for cid in table["context_id"]], dtype=bool)
    rows = np.array([row_of[c] for c in table["context_id"][keep]], dtype=np.int64)
    pos = np.asarray(table["position"][keep], dtype=np.int64)
    tokens = np.zeros((len(ids), ctx_len), np.int64)
    docs = np.full((len(ids), ctx_len), -1, np.int64)
    domains = np.full((len(ids), ctx_len), "", dtype=object)
    tokens[rows, pos] = np.asarray(table["token_id"][keep])
    docs[rows, pos] = np.asarray(table["doc_id"][keep])
    domains[rows, pos] = np.asarray(table["domain"][keep], dtype=object)
    model = ws.run_model(record.run_id)
    vocab = ws.query("SELECT token_id, token FROM vocab WHERE tokenizer = ? ORDER BY token_id", [model])
    size = max([int(tokens.max()) + 1] + [t + 1 for t, _ in vocab[-1:]])
    strings = np.array([f"<{i}>" for i in range(size)], dtype=object)
    for token_id, text in vocab:
        strings[token_id] = text
    return Corpus(np.asarray(ids, np.int64), tokens, docs, np.array([c in test for c in ids], bool), strings, domains)


@dataclass
class Firing:
    """One feature's activation on every analysed token: ``values`` [C, L], 0 where it did not fire."""

    feature: int
    values: np.ndarray

    @property
    def fired(self) -> np.ndarray:
        return self.values > 0


def load_firing(ws: Workspace, record: SAERecord, corpus: Corpus, features: list[int]) -> dict[int, Firing]:
    """The firing of each of ``features`` (one query for all of them)."""
    table = ws.con.execute(
        """SELECT feature, context_id, position, value FROM feature_acts
           WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))""",
        [record.sae_id, features],
    ).fetchnumpy()
    row_of = {int(cid): i for i, cid in enumerate(corpus.contexts)}
    out = {f: Firing(f, np.zeros(corpus.tokens.shape, np.float32)) for f in features}
    for feature, cid, pos, value in zip(table["feature"], table["context_id"], table["position"], table["value"]):
        row = row_of.get(int(cid))
        if row is not None:
            out[int(feature)].values[row, int(pos)] = float(value)
    return out


def window(corpus: Corpus, pos: int) -> tuple[int, int]:
    """[start, stop) of the window around position ``pos`` (never the BOS at 0)."""
    return max(1, pos - BEFORE), min(corpus.ctx_len, pos + AFTER + 1)


def render(tokens: list[str], marked: list[bool] | None = None) -> str:
    """Tokens as one line (newlines shown as ↵), runs of marked tokens inside one <<…>>."""
    out, open_ = [], False
    for i, tok in enumerate(tokens):
        mark = bool(marked[i]) if marked is not None else False
        if mark and not open_:
            out.append("<<")
        elif open_ and not mark:
            out.append(">>")
        open_ = mark
        out.append(tok.replace("\n", "↵"))
    if open_:
        out.append(">>")
    return "".join(out)


@dataclass(frozen=True)
class Shown:
    """One window as a scorer or explainer sees it."""

    row: int
    start: int
    tokens: tuple[str, ...]
    marked: tuple[bool, ...]  # which tokens are highlighted (all False for detection)
    fires: bool  # the feature fires somewhere in the window
    value: float = 0.0  # the largest activation in the window

    @property
    def text(self) -> str:
        return render(list(self.tokens), list(self.marked))


def shown(corpus: Corpus, firing: Firing, row: int, pos: int, *, marks: np.ndarray | None = None, show_marks: bool = True) -> Shown:
    start, stop = window(corpus, pos)
    values = firing.values[row, start:stop]
    marked = (values > 0) if marks is None else marks
    return Shown(row, start, tuple(corpus.window_tokens(row, start, stop)),
                 tuple(bool(m) and show_marks for m in marked), bool((values > 0).any()), float(values.max(initial=0.0)))


def train_examples(corpus: Corpus, firing: Firing, rng: np.random.Generator, *, n_top: int = 8, n_band: int = 4) -> list[Shown]:
    """Examples for an explainer, from the training contexts only: the ``n_top`` strongest firings
    (one per context), then ``n_band`` drawn from equal bands of (0, max] below them (delphi's
    top plus quantile sampling)."""
    values = np.where(corpus.test[:, None], 0.0, firing.values)
    rows, positions = np.nonzero(values > 0)
    if rows.size == 0:
        return []
    order = np.argsort(-values[rows, positions], kind="stable")
    picked, used = [], set()
    for i in order:
        if int(rows[i]) not in used:
            used.add(int(rows[i]))
            picked.append((int(rows[i]), int(positions[i])))
        if len(picked) == n_top:
            break
    rest = [i for i in range(rows.size) if int(rows[i]) not in used]
    peak = float(values.max())
    for b in range(n_band):
        lo, hi = peak * b / n_band, peak * (b + 1) / n_band
        band = [i for i in rest if lo < values[rows[i], positions[i]] <= hi]
        if band:
            i = band[int(rng.integers(len(band)))]
            picked.append((int(rows[i]), int(positions[i])))
    return [shown(corpus, firing, r, p) for r, p in picked]
