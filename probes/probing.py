"""Sparse probing (SAEBench): how few SAE latents, or raw residual dimensions, does a concept need?

This module holds the drivers, which read the workspace or run the model, and what they return
(``ProbingResult``); the pure core is ``probes.probe_fit`` (ranking, logistic regression at k)
and ``probes.probe_split`` (tasks, balancing, splits); the text table is ``probes.probe_table``.

For a binary task (y_i ∈ {0, 1}) over sequences i whose hook activations are a_{i,t} ∈ R^d, with
positions t ∈ T_i = {1, …, n_i − 1} (the BOS at t = 0 is left out), every example gets two
mean-pooled feature vectors:

    x_i^sae = 1/|T_i| Σ_{t∈T_i} encode(a_{i,t})  ∈ R^width      (the SAE's inference-form latents)
    x_i^res = 1/|T_i| Σ_{t∈T_i} a_{i,t}          ∈ R^d          (raw residual dimensions)

Then, per task and per feature source x:

1. Balance: the majority class is downsampled (seeded) to the minority's size, and each class is
   capped at ``max_per_class``. A task with fewer than ``min_per_class`` examples in a class is
   skipped with a notice in ``ProbingResult.skipped``.
2. Split: the workspace's rule (``workbench.activations.HOLDOUT_EVERY``): a context whose index in
   the corpus stream satisfies ``index % 20 == 19`` is test, every other one train; balancing
   and the cap apply to each split separately. When that leaves fewer than
   ``min_test_per_class`` examples of a class in the test split (or in train), as in small
   workspaces, the task falls back to a seeded stratified split: the balanced pool (capped at
   ``max_per_class`` per class) is shuffled per class and ``TEST_FRACTION`` of each class held
   out. Every row records which split was used (``"holdout"`` or ``"stratified"``); user-supplied
   texts have no corpus index and always use the stratified split.
3. Rank on the training split only: s_j = | mean_{i: y_i=1} x_ij − mean_{i: y_i=0} x_ij |, and
   S_k = the k largest s_j (ties: lower index first).
4. Fit sklearn ``LogisticRegression`` (L2, C = ``SPARSE_C``) on x[:, S_k] standardised with the
   training mean and std; report test accuracy for each k in ``ks`` (default 1, 2, 5).
5. Ceiling: the same on all d residual dimensions (L2, C = ``FULL_C``), the full linear probe.

One row per (task, source, k): source ``"sae"`` and ``"residual"`` for each k, and ``"full"``
with k = d and ``features`` empty (meaning all dimensions).

Tasks: from the workspace corpus, one per domain d, "the context's majority domain is d" vs the
rest (a context's domain is that of most of its non-BOS tokens, via tokens.doc_id →
documents.domain; separator tokens carry no domain; ties go to the alphabetically first domain).
From user data (``probe_texts``): one task per label value vs the rest, or a single task
"label = b" when there are exactly two values a < b.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import saes
from probes.probe_fit import DEFAULT_KS, ProbingError, check_ks, full_probe, probe_features
from probes.probe_split import (
    DEFAULT_MAX_PER_CLASS,
    DEFAULT_MIN_PER_CLASS,
    DEFAULT_MIN_TEST_PER_CLASS,
    TaskSplit,
    binary_tasks,
    split_task,
)
from workbench.activations import HOLDOUT_EVERY, context_ids, read_contexts
from workbench.hooks import Capture, attached, stop_layer, validate_hooks
from workbench.workspace import SAERecord, Workspace, fetch_one, resolve_sae

SOURCES = ("sae", "residual", "full")
_CHUNK_FLOATS = 1 << 25  # ~128 MB of dense latents per encoded chunk


@dataclass(frozen=True)
class ProbeRow:
    """One (task, feature source, k) result; ``asdict`` of it is a storable row."""

    task: str  # e.g. "domain=code"
    source: str  # "sae" | "residual" | "full"
    k: int  # features used (d for the full probe)
    accuracy: float  # test accuracy in [0, 1]
    n_train: int
    n_test: int
    split: str  # "holdout" (the workspace's rule) | "stratified" (seeded fallback)
    features: tuple[int, ...]  # selected indices, best first; empty for the full probe (all dims)


@dataclass(frozen=True)
class ProbingResult:
    """Every row of one probing run, with the tasks that were skipped and why."""

    sae: str  # SAE name
    hook: str
    ks: tuple[int, ...]
    seed: int
    rows: list[ProbeRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one notice per skipped task

    def to_rows(self) -> list[dict]:
        """Plain dicts (features as a list) for storage; the SAE and hook are added to each."""
        return [{"sae": self.sae, "hook": self.hook, **asdict(row), "features": list(row.features)} for row in self.rows]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(row.task for row in self.rows))


# -- the shared driver -------------------------------------------------------------------------

Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # indices -> (sae [n, W], residual [n, d])


def _run(
    tasks: list[tuple[str, np.ndarray]],
    holdout: np.ndarray | None,
    extract: Extractor,
    record: SAERecord,
    ks: tuple[int, ...],
    *,
    seed: int,
    max_per_class: int,
    min_per_class: int,
    min_test_per_class: int,
) -> ProbingResult:
    result = ProbingResult(sae=record.name, hook=record.hook, ks=ks, seed=seed)
    splits: list[tuple[str, TaskSplit]] = []
    for name, positive in tasks:
        outcome = split_task(positive, holdout, task=name, seed=seed, max_per_class=max_per_class,
                             min_per_class=min_per_class, min_test_per_class=min_test_per_class)
        if isinstance(outcome, str):
            result.skipped.append(outcome)
        else:
            splits.append((name, outcome))
    if not splits:
        raise ProbingError("no task has enough examples to probe: " + "; ".join(result.skipped))
    needed = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for _, s in splits]))
    sae_x, res_x = extract(needed)  # [m, W], [m, d], rows in the order of `needed`
    where = {int(i): row for row, i in enumerate(needed)}
    for name, s in splits:
        tr = np.array([where[int(i)] for i in s.train])
        te = np.array([where[int(i)] for i in s.test])
        common = dict(task=name, n_train=len(tr), n_test=len(te), split=s.split)
        for source, x in (("sae", sae_x), ("residual", res_x)):
            for probe in probe_features(x[tr], s.y_train, x[te], s.y_test, ks):
                result.rows.append(ProbeRow(source=source, k=probe.k, accuracy=probe.accuracy, features=probe.features, **common))
        accuracy = full_probe(res_x[tr], s.y_train, res_x[te], s.y_test)
        result.rows.append(ProbeRow(source="full", k=res_x.shape[1], accuracy=accuracy, features=(), **common))
    return result


def _check_counts(max_per_class: int, min_per_class: int, min_test_per_class: int) -> None:
    if min_per_class < 2:
        raise ProbingError(f"min_per_class must be at least 2 (one train and one test example), got {min_per_class}")
    if min_test_per_class < 1:
        raise ProbingError(f"min_test_per_class must be at least 1, got {min_test_per_class}")
    if max_per_class < min_per_class:
        raise ProbingError(f"max_per_class ({max_per_class}) must be at least min_per_class ({min_per_class})")


def _load(ws: Workspace, sae_ref: str | int, ks: Sequence[int]) -> tuple[SAERecord, torch.nn.Module, tuple[int, ...]]:
    record = resolve_sae(ws, sae_ref)
    ks = check_ks(ks, record.width, f"latents of SAE '{record.name}'")
    check_ks(ks, record.d_in, f"residual dimensions of {record.hook}")
    sae = saes.load_sae(record.path, expected_d_in=record.d_in)
    sae.eval()
    return record, sae, ks


def _pool(sae: torch.nn.Module, acts: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean over positions 1..lengths-1 of latents and activations; acts [n, L, d] (BOS at 0)."""
    n, L, d = acts.shape
    body = acts[:, 1:]  # [n, L-1, d]
    mask = (torch.arange(1, L)[None, :] < lengths[:, None]).float()  # [n, L-1]
    count = mask.sum(1, keepdim=True)  # [n, 1]
    with torch.no_grad():
        z = sae.encode(body.reshape(-1, d).float()).reshape(n, L - 1, -1)  # [n, L-1, W]
    sae_mean = (z * mask[..., None]).sum(1) / count  # [n, W]
    res_mean = (body * mask[..., None]).sum(1) / count  # [n, d]
    return sae_mean.double().numpy(), res_mean.double().numpy()


# -- the workspace corpus ----------------------------------------------------------------------

def context_domains(ws: Workspace, run_id: int) -> list[tuple[int, int, str]]:
    """(context_id, corpus_context, majority domain of its non-BOS tokens) for every context of a run."""
    return ws.query(
        """WITH counts AS (
               SELECT t.context_id, c.corpus_context, d.domain, count(*) AS n
               FROM tokens t JOIN contexts c USING (context_id) JOIN runs r ON r.run_id = c.run_id
               JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
               WHERE c.run_id = ? AND t.position > 0
               GROUP BY ALL)
           SELECT context_id, corpus_context, domain FROM counts
           QUALIFY row_number() OVER (PARTITION BY context_id ORDER BY n DESC, domain) = 1
           ORDER BY context_id""",
        [run_id],
    )


def sparse_probing(
    ws: Workspace,
    sae_ref: str | int,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    max_per_class: int = DEFAULT_MAX_PER_CLASS,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    min_test_per_class: int = DEFAULT_MIN_TEST_PER_CLASS,
    seed: int = 0,
    progress: bool = False,
) -> ProbingResult:
    """SAEBench sparse probing of an SAE of the workspace on its corpus's domain tasks (read-only)."""
    _check_counts(max_per_class, min_per_class, min_test_per_class)
    record, sae, ks = _load(ws, sae_ref, ks)
    cached = set(context_ids(ws, record.hook, run_id=record.run_id))
    labelled = [row for row in context_domains(ws, record.run_id) if row[0] in cached]
    if not labelled:
        raise ProbingError(f"run {record.run_id} has no cached contexts with domain-labelled tokens")
    ids = np.array([row[0] for row in labelled], np.int64)
    holdout = np.array([row[1] % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for row in labelled])
    domains = [row[2] for row in labelled]
    if len(set(domains)) < 2:
        raise ProbingError(f"domain probing needs at least 2 domains in the corpus, got only '{domains[0]}'")
    tasks = [(f"domain={d}", np.array([x == d for x in domains])) for d in sorted(set(domains))]
    ctx_len = int(fetch_one(ws.con, "SELECT ctx_len FROM runs WHERE run_id = ?", [record.run_id])[0])
    per_chunk = max(1, _CHUNK_FLOATS // ((ctx_len - 1) * max(record.width, record.d_in)))

    def extract(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sae_parts, res_parts = [], []
        for start in tqdm(range(0, len(indices), per_chunk), desc=f"probing {record.name}", unit="chunk",
                          disable=not progress, dynamic_ncols=True):
            chunk = ids[indices[start : start + per_chunk]].tolist()
            acts = read_contexts(ws, record.hook, chunk, run_id=record.run_id)  # [n, L, d]
            s, r = _pool(sae, acts, torch.full((len(chunk),), ctx_len))
            sae_parts.append(s)
            res_parts.append(r)
        return np.concatenate(sae_parts), np.concatenate(res_parts)

    return _run(tasks, holdout, extract, record, ks, seed=seed, max_per_class=max_per_class,
                min_per_class=min_per_class, min_test_per_class=min_test_per_class)


# -- any labelled dataset ----------------------------------------------------------------------

def text_features(
    loaded,
    sae: torch.nn.Module,
    hook: str,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled (SAE latents [n, W], activations [n, d]) of texts run live through ``loaded`` at ``hook``.

    Each text becomes [BOS, first ``max_tokens`` − 1 tokens]; texts are batched with right padding,
    which never changes a real position's activation under causal attention, and each is pooled
    over its own non-BOS positions.
    """
    if max_tokens < 2:
        raise ProbingError(f"max_tokens must be at least 2 (BOS plus one token), got {max_tokens}")
    if batch_size <= 0:
        raise ProbingError(f"batch_size must be positive, got {batch_size}")
    model, tokenizer = loaded.model, loaded.tokenizer
    validate_hooks(model, [hook])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer(str(text), add_special_tokens=False, verbose=False)["input_ids"][: max_tokens - 1]
        if not ids:
            raise ProbingError(f"text {i} has no tokens: every labelled text needs at least one")
        encoded.append([bos, *ids])
    d_in = int(sae.W_dec.shape[1])  # W_dec [width, d_in] (the codebook exposes its codes as W_dec)
    stop_at = stop_layer([hook], model.cfg.n_layers)
    capture = Capture([hook])
    sae_parts, res_parts = [], []
    with attached(model, capture.hooks()):
        for start in tqdm(range(0, len(encoded), batch_size), desc="probing texts", unit="batch",
                          disable=not progress, dynamic_ncols=True):
            batch = encoded[start : start + batch_size]
            lengths = torch.tensor([len(b) for b in batch])  # [B]
            longest = int(lengths.max())
            tokens = torch.tensor([b + [pad] * (longest - len(b)) for b in batch], device=model.cfg.device)  # [B, L]
            with torch.inference_mode():
                model(tokens, stop_at_layer=stop_at)
            acts = capture.latest[hook].float().cpu()  # [B, L, d]
            if acts.shape[-1] != d_in:
                raise ProbingError(f"{hook} of this model has d={acts.shape[-1]} but the SAE expects d_in={d_in}: "
                                   "load the model the SAE was trained on")
            s, r = _pool(sae, acts, lengths)
            sae_parts.append(s)
            res_parts.append(r)
    return np.concatenate(sae_parts), np.concatenate(res_parts)


def probe_texts(
    ws: Workspace,
    sae_ref: str | int,
    texts: Sequence[str],
    labels: Sequence,
    loaded,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    max_per_class: int = DEFAULT_MAX_PER_CLASS,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> ProbingResult:
    """Sparse probing of a workspace SAE on any labelled texts; ``loaded`` (a ``LoadedModel``, the
    model whose hook the SAE was trained on) is run live at the SAE's hook (see ``text_features``).

    Labels may be any hashable values; tasks come from ``binary_tasks`` (prefix "label"); texts
    have no corpus index, so the split is always the seeded stratified one.
    """
    if len(texts) != len(labels):
        raise ProbingError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}")
    _check_counts(max_per_class, min_per_class, 1)
    tasks = binary_tasks(labels, "label")
    record, sae, ks = _load(ws, sae_ref, ks)
    texts = list(texts)

    def extract(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return text_features(loaded, sae, record.hook, [texts[i] for i in indices],
                             max_tokens=max_tokens, batch_size=batch_size, progress=progress)

    return _run(tasks, None, extract, record, ks, seed=seed, max_per_class=max_per_class,
                min_per_class=min_per_class, min_test_per_class=1)
