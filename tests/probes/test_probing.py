"""Sparse probing (SAEBench): the pure core on synthetic data, balancing and splits, and end to end
on a small tiny-llama workspace (a three-domain JSONL corpus, 8,192 tokens in contexts of 16, a
TopK SAE of width 64, k 4)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import saes
from probes.probe_fit import ProbingError, full_probe, probe_features, rank_by_mean_difference
from probes.probe_split import binary_tasks, split_task
from probes.probe_table import format_table
from probes.probing import context_domains, probe_texts, sparse_probing, text_features
from workbench.activations import HOLDOUT_EVERY, read_contexts
from workbench.caching import ActivationCacher, CacheRequest
from workbench.cli import main
from workbench.data import load_corpus
from workbench.errors import WorkbenchError
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"
SAE = "probe-topk"


# -- the pure core on synthetic data --------------------------------------------------------

def one_informative(n: int, n_features: int, informative: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, n_features))
    x[:, informative] = 3.0 * y + 0.3 * rng.normal(size=n)
    return x, y


def test_k1_picks_the_one_informative_feature_and_a_noise_feature_is_chance():
    x_train, y_train = one_informative(400, 20, informative=7, seed=0)
    x_test, y_test = one_informative(400, 20, informative=7, seed=1)
    probes = probe_features(x_train, y_train, x_test, y_test, ks=(1, 2, 5))
    assert [p.k for p in probes] == [1, 2, 5]
    assert probes[0].features == (7,)
    assert all(p.features[0] == 7 and len(p.features) == p.k for p in probes)
    assert probes[0].accuracy >= 0.98
    noise = probe_features(x_train[:, [3]], y_train, x_test[:, [3]], y_test, ks=(1,))[0]
    assert 0.4 <= noise.accuracy <= 0.6


def test_full_probe_is_at_least_the_sparse_probes_on_a_dense_linear_task():
    rng = np.random.default_rng(0)
    w = rng.normal(size=30)  # the label depends on every feature
    x = rng.normal(size=(1200, 30))
    y = (x @ w > 0).astype(int)
    sparse = probe_features(x[:800], y[:800], x[800:], y[800:], ks=(1, 2, 5))
    full = full_probe(x[:800], y[:800], x[800:], y[800:])
    assert full >= 0.9
    assert full >= max(p.accuracy for p in sparse) + 0.05
    assert sparse[0].accuracy <= sparse[-1].accuracy


def test_mean_difference_ranking_matches_a_naive_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 25))
    x[:, 10] = x[:, 4]  # an exact tie: the lower index must come first
    y = rng.integers(0, 2, 60)
    scores = []
    for j in range(x.shape[1]):
        pos = [x[i, j] for i in range(len(y)) if y[i] == 1]
        neg = [x[i, j] for i in range(len(y)) if y[i] == 0]
        scores.append(abs(sum(pos) / len(pos) - sum(neg) / len(neg)))
    naive = sorted(range(x.shape[1]), key=lambda j: (-round(scores[j], 12), j))
    assert rank_by_mean_difference(x, y).tolist() == naive
    chosen = probe_features(x[:40], y[:40], x[40:], y[40:], ks=(5,))[0].features
    assert list(chosen) == rank_by_mean_difference(x[:40], y[:40])[:5].tolist()


def test_balancing_and_splits_are_seeded_balanced_and_capped():
    rng = np.random.default_rng(0)
    positive = rng.random(1000) < 0.2
    holdout = np.arange(1000) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    a = split_task(positive, holdout, task="t", seed=0, max_per_class=100)
    b = split_task(positive, holdout, task="t", seed=0, max_per_class=100)
    c = split_task(positive, holdout, task="t", seed=1, max_per_class=100)
    assert a.split == "holdout"
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.train, c.train)
    for part, y in ((a.train, a.y_train), (a.test, a.y_test)):
        assert (y == 1).sum() == (y == 0).sum()  # balanced
        np.testing.assert_array_equal(y, positive[part].astype(int))  # labels follow the examples
    assert (a.y_train == 1).sum() == 100  # capped
    assert holdout[a.test].all() and not holdout[a.train].any()  # the workspace's rule
    assert len(set(a.train) | set(a.test)) == len(a.train) + len(a.test)

    few = split_task(positive[:200], holdout[:200], task="t", seed=0)  # ~2 positive holdout examples
    assert few.split == "stratified"
    assert (few.y_test == 1).sum() == (few.y_test == 0).sum() >= 1
    assert not set(few.train) & set(few.test)
    notice = split_task(positive[:30], holdout[:30], task="domain=x", seed=0, min_per_class=10)
    assert isinstance(notice, str) and notice.startswith("domain=x: skipped")


def test_binary_tasks():
    assert [name for name, _ in binary_tasks([0, 1, 1, 0], "label")] == ["label=1"]
    tasks = binary_tasks(["a", "b", "c", "a"], "label")
    assert [name for name, _ in tasks] == ["label=a", "label=b", "label=c"]
    np.testing.assert_array_equal(tasks[0][1], [True, False, False, True])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: probe_features(x, y, x, y, ks=(0,)), "k must be between 1"),
        (lambda x, y: probe_features(x, y, x, y, ks=(9,)), "k must be between 1 and the number of features (8)"),
        (lambda x, y: probe_features(x, y, x, y, ks=()), "ks is empty"),
        (lambda x, y: probe_features(x, np.zeros_like(y), x, y), "needs both classes"),
        (lambda x, y: probe_features(x, y, x[:, :4], y), "differ in width"),
        (lambda x, y: probe_features(x, y[:-1], x, y), "labels must have shape"),
        (lambda x, y: probe_features(x, y + 1, x, y), "labels must be 0/1"),
        (lambda x, y: binary_tasks(["a"] * 5, "label"), "at least 2 classes"),
    ],
)
def test_bad_core_input_is_a_one_line_error(call, message):
    x, y = one_informative(40, 8, informative=0, seed=0)
    with pytest.raises(WorkbenchError) as err:
        call(x, y)
    assert isinstance(err.value, ProbingError)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- end to end on a tiny workspace ---------------------------------------------------------

def write_corpus(path: Path, n_per_domain: int = 60, seed: int = 0) -> Path:
    """A JSONL corpus with three plentiful domains and one too rare to probe."""
    rng = random.Random(seed)
    words = "the a river city old young walked quietly over bridge morning evening letter friend garden rain".split()
    idents = "value count items result index total buffer name key node".split()
    docs = []
    for i in range(n_per_domain):
        body = "\n".join(f"    {rng.choice(idents)} = {rng.choice(idents)}[{rng.randint(0, 99)}] + {rng.randint(0, 9)}"
                         for _ in range(4))
        docs.append(("code", f"def f{i}(items):\n{body}\n    return result"))
        docs.append(("prose", " ".join(rng.choice(words) for _ in range(30)).capitalize() + "."))
        docs.append(("numbers", ", ".join(str(rng.randint(0, 10_000)) for _ in range(12))))
    docs += [("rare", "Copyright (c) the authors. All rights reserved. " * 3)] * 2
    path.write_text("\n".join(json.dumps({"domain": d, "text": t}) for d, t in docs))
    return path


@pytest.fixture(scope="module")
def probe_db(tmp_path_factory, tiny) -> Path:
    """8,192 tokens in contexts of 16 (512 contexts, ~25 held out), cached with the session's tiny
    model (one model load fewer than `workbench cache`), and a TopK SAE trained by the CLI."""
    root = tmp_path_factory.mktemp("probing")
    corpus = write_corpus(root / "corpus.jsonl")
    db = root / "ws.duckdb"
    request = CacheRequest(model="tiny-llama", hooks=(HOOK,), corpus=str(corpus), tokens=8192, ctx_len=16, batch_size=64)
    with Workspace(db) as ws:
        ActivationCacher(ws, tiny, load_corpus(str(corpus)), request).run(progress=False)
    assert main(["train", "--db", str(db), "--hook", HOOK, "--arch", "topk", "--width", "64", "--k", "4",
                 "--tokens", "8192", "--batch-size", "256", "--no-downstream", "--name", SAE]) == 0
    return db


def test_sparse_probing_end_to_end_on_the_workspace_domains(probe_db):
    with Workspace(probe_db, read_only=True) as ws:
        domains = {d for _, _, d in context_domains(ws, 1)}
        result = sparse_probing(ws, SAE, ks=(1, 2, 5))
        again = sparse_probing(ws, SAE, ks=(1, 2, 5))
        forced = sparse_probing(ws, SAE, ks=(1,), min_test_per_class=50)  # more than the holdout has
    assert domains == {"code", "numbers", "prose", "rare"}
    assert result.tasks == ["domain=code", "domain=numbers", "domain=prose"]
    assert len(result.skipped) == 1 and result.skipped[0].startswith("domain=rare: skipped")
    assert len(result.rows) == 3 * (2 * 3 + 1)
    for row in result.rows:
        assert 0.0 <= row.accuracy <= 1.0 and row.n_train > 0 and row.n_test > 0
        assert row.split == "holdout" and row.n_test <= 2 * 10  # the workspace's 5 % test split
        assert len(row.features) == (0 if row.source == "full" else row.k)
        assert row.k == 64 if row.source == "full" else row.k in (1, 2, 5)
    assert result.rows == again.rows  # deterministic by seed
    assert {r.split for r in forced.rows} == {"stratified"} and forced.tasks == result.tasks
    stored = result.to_rows()
    assert stored[0].keys() >= {"sae", "hook", "task", "source", "k", "accuracy", "n_train", "n_test", "features", "split"}
    table = format_table(result)
    assert all(task in table for task in result.tasks) and "sae@5" in table and "full" in table
    assert result.skipped[0] in table


def test_workspace_rows_match_a_naive_per_context_reference(probe_db):
    """Recompute every task by hand: labels by counting domains, per-context pooling, the same split."""
    with Workspace(probe_db, read_only=True) as ws:
        result = sparse_probing(ws, SAE, ks=(1, 2))
        record = resolve_sae(ws, SAE)
        sae = saes.load_sae(record.path)
        tokens = ws.query("SELECT t.context_id, t.position, d.domain FROM tokens t JOIN documents d USING (doc_id) "
                          "WHERE t.position > 0 ORDER BY 1, 2")
        index = dict(ws.query("SELECT context_id, corpus_context FROM contexts"))
        ids = sorted(index)
        acts = read_contexts(ws, HOOK, ids)  # [n, L, d]
    counts: dict[int, dict[str, int]] = {}
    for cid, _, domain in tokens:
        counts.setdefault(cid, {}).setdefault(domain, 0)
        counts[cid][domain] += 1
    majority = [min(counts[c], key=lambda d: (-counts[c][d], d)) for c in ids]
    holdout = np.array([index[c] % 20 == 19 for c in ids])
    with torch.no_grad():
        sae_x = np.stack([sae.encode(a[1:]).mean(0).double().numpy() for a in acts])  # [n, 64]
    res_x = np.stack([a[1:].mean(0).double().numpy() for a in acts])  # [n, 64]
    for task in result.tasks:
        split = split_task(np.array([m == task.split("=")[1] for m in majority]), holdout, task=task, seed=0)
        rows = {(r.source, r.k): r for r in result.rows if r.task == task}
        for source, x in (("sae", sae_x), ("residual", res_x)):
            for probe in probe_features(x[split.train], split.y_train, x[split.test], split.y_test, ks=(1, 2)):
                assert rows[(source, probe.k)].features == probe.features
                assert rows[(source, probe.k)].accuracy == pytest.approx(probe.accuracy)
        full = full_probe(res_x[split.train], split.y_train, res_x[split.test], split.y_test)
        assert rows[("full", 64)].accuracy == pytest.approx(full)
        assert rows[("sae", 1)].split == split.split and rows[("sae", 1)].n_test == len(split.test)

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sae_ref": "nope"}, "no SAE 'nope'"),
        ({"ks": (0, 1)}, "k must be between 1"),
        ({"ks": (65,)}, "k must be between 1 and the number of latents"),
        ({"max_per_class": 3}, "max_per_class (3) must be at least min_per_class (10)"),
        ({"min_per_class": 1}, "min_per_class must be at least 2"),
        ({"min_per_class": 500, "max_per_class": 500}, "no task has enough examples"),
    ],
)
def test_bad_workspace_input_is_a_one_line_error(probe_db, kwargs, message):
    kwargs = {"sae_ref": SAE, **kwargs}
    with Workspace(probe_db, read_only=True) as ws, pytest.raises(WorkbenchError) as err:
        sparse_probing(ws, kwargs.pop("sae_ref"), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- user-supplied labelled texts -----------------------------------------------------------

CODE = [f"def f{i}(x):\n    return x * {i} + len([y for y in range({i})])" for i in range(12)]
PROSE = [f"On day {i} the old sailor walked slowly to the harbour and watched the boats." for i in range(12)]


def test_probe_texts_runs_on_any_labelled_texts(probe_db, tiny):
    with Workspace(probe_db, read_only=True) as ws:
        result = probe_texts(ws, SAE, CODE + PROSE, ["code"] * 12 + ["prose"] * 12, tiny, min_per_class=5)
        with pytest.raises(WorkbenchError, match="differ in length"):
            probe_texts(ws, SAE, CODE, ["code"], tiny)
        with pytest.raises(WorkbenchError, match="at least 2 classes"):
            probe_texts(ws, SAE, CODE, ["code"] * 12, tiny)
    assert result.tasks == ["label=prose"]
    assert {r.split for r in result.rows} == {"stratified"}
    assert all(0.0 <= r.accuracy <= 1.0 for r in result.rows)
    full = next(r for r in result.rows if r.source == "full")
    assert full.accuracy >= 0.75 and full.n_test == 6  # 25 % of 12 per class


def test_text_features_do_not_depend_on_batch_padding(probe_db, tiny):
    with Workspace(probe_db, read_only=True) as ws:
        sae = saes.load_sae(resolve_sae(ws, SAE).path)
    texts = ["x = 1", CODE[3], PROSE[5]]
    alone = [text_features(tiny, sae, HOOK, [t]) for t in texts]
    batched_sae, batched_res = text_features(tiny, sae, HOOK, texts, batch_size=3)
    for i, (s, r) in enumerate(alone):
        # padded batches of 3 against single texts: other attention and matmul shapes, so float32 residuals and
        # latents differ by ulps (~1e-7 seen), far below rtol 1e-4 / atol 1e-5; padding that leaked would not be
        np.testing.assert_allclose(batched_res[i], r[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched_sae[i], s[0], rtol=1e-4, atol=1e-5)
