"""Caching, resuming and reading activations back, on the tiny model."""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch

import workbench.caching as caching
from workbench.activations import context_ids, iter_activations, read_contexts
from workbench.caching import ActivationCacher, CacheError, CacheRequest
from workbench.data import chunk_and_tokenize
from workbench.export import export_parquet
from workbench.hooks import attached
from workbench.workspace import Workspace

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post")


def cache(path, tiny, corpus, tokens=2048, ctx=32, batch=4, hooks=HOOKS, seed=0, **fields):
    request = CacheRequest(model="tiny-llama", hooks=hooks, corpus="stdlib", tokens=tokens, ctx_len=ctx, batch_size=batch, seed=seed,
                           **fields)
    with Workspace(path) as ws:
        return ActivationCacher(ws, tiny, corpus, request).run(progress=False)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cache-writer"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny, stdlib_corpus):
    path = tmp_path_factory.mktemp("cache") / "ws.duckdb"
    summary = cache(path, tiny, stdlib_corpus)
    return path, summary


def test_cached_activations_equal_a_direct_forward(cached, tiny, stdlib_corpus):
    path, summary = cached
    assert summary.n_contexts == 64 and summary.n_tokens == 2048
    contexts = list(chunk_and_tokenize(stdlib_corpus.documents, tiny.tokenizer, 32, seed=0, max_contexts=64))
    tokens = torch.tensor([c.token_ids for c in contexts[:8]])
    _, direct = tiny.model.run_with_cache(tokens, names_filter=list(HOOKS))
    with Workspace(path, read_only=True) as ws:
        for hook in HOOKS:
            ids = context_ids(ws, hook)[:8]
            stored = read_contexts(ws, hook, ids)
            assert stored.shape == direct[hook].shape
            torch.testing.assert_close(stored, direct[hook].float(), rtol=1e-3, atol=1e-3)  # float16 storage
        stored_tokens = ws.query("SELECT token_id FROM tokens WHERE context_id = ? ORDER BY position", [ids[3]])
        assert [t for (t,) in stored_tokens] == contexts[3].token_ids


def test_workspace_records_bytes_documents_and_vocab(cached, tiny):
    path, summary = cached
    assert summary.bytes_per_token == 2 * (64 + 192) / 2  # 2 bytes per dimension, averaged over the two hooks
    with Workspace(path, read_only=True) as ws:
        (n_vocab,) = ws.query("SELECT count(*) FROM vocab")[0]
        assert n_vocab == len(tiny.tokenizer)
        missing = ws.query(
            """SELECT count(*) FROM tokens t WHERE t.doc_id >= 0
               AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.doc_id = t.doc_id)"""
        )[0][0]
        assert missing == 0
        assert ws.query("SELECT status FROM runs")[0][0] == "done"


def test_rerun_is_a_no_op_and_a_larger_request_extends(tmp_path, tiny, stdlib_corpus):
    path = tmp_path / "ws.duckdb"
    cache(path, tiny, stdlib_corpus, tokens=256)
    again = cache(path, tiny, stdlib_corpus, tokens=256)
    assert again.resumed_from == 8 and again.n_contexts == 8
    bigger = cache(path, tiny, stdlib_corpus, tokens=512)
    assert bigger.resumed_from == 8 and bigger.n_contexts == 16
    with Workspace(path, read_only=True) as ws:
        assert ws.query("SELECT count(*) FROM runs")[0][0] == 1
        assert ws.query("SELECT count(*) FROM activations")[0][0] == 16 * len(HOOKS)


def test_iter_activations_yields_every_training_token_once_per_epoch(cached):
    path, _ = cached
    hook = HOOKS[0]
    with Workspace(path, read_only=True) as ws:
        ids = context_ids(ws, hook, split="train")
        reference = read_contexts(ws, hook, ids)[:, 1:].reshape(-1, 64)  # BOS skipped
        batches = list(iter_activations(ws, hook, batch_size=31, seed=3, epochs=2, buffer_tokens=200))
        again = list(iter_activations(ws, hook, batch_size=31, seed=3, epochs=2, buffer_tokens=200))
        other = list(iter_activations(ws, hook, batch_size=31, seed=4, epochs=1, buffer_tokens=200))
    assert all(b.shape == (31, 64) and b.dtype == torch.float32 for b in batches)
    assert len(batches) == (2 * reference.shape[0]) // 31
    def rows(tensors):
        return Counter(map(tuple, torch.cat(tensors).tolist()))
    first_epoch = rows(batches)  # both epochs, minus a remainder < 31 rows
    expected = rows([reference, reference])
    assert sum((expected - first_epoch).values()) < 31 and not (first_epoch - expected)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(batches[0], other[0])


def test_splits_are_disjoint_and_cover_every_context(cached):
    path, _ = cached
    with Workspace(path, read_only=True) as ws:
        train, test, everything = (set(context_ids(ws, HOOKS[0], split=s)) for s in ("train", "test", "all"))
    assert train.isdisjoint(test) and train | test == everything and len(test) == 64 // 20


def test_export_parquet_round_trips(cached, tmp_path):
    import duckdb

    path, _ = cached
    with Workspace(path, read_only=True) as ws:
        out = export_parquet(ws, tmp_path / "export")
        ids = context_ids(ws, HOOKS[1])[:2]
        expected = read_contexts(ws, HOOKS[1], ids)
    rows = duckdb.sql(
        f"""SELECT context_id, position, activation FROM read_parquet('{out}/activations/**/*.parquet', hive_partitioning = true)
            WHERE hook = '{HOOKS[1]}' AND context_id IN ({ids[0]}, {ids[1]}) ORDER BY context_id, position"""
    ).fetchall()
    exported = torch.tensor([r[2] for r in rows]).view(2, 32, 192)
    torch.testing.assert_close(exported, expected)
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/tokens.parquet'").fetchall()[0][0] == 64 * 32


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _table_dump(path):
    with Workspace(path, read_only=True) as ws:
        return {
            "contexts": ws.query("SELECT * FROM contexts ORDER BY context_id"),
            "tokens": ws.query("SELECT * FROM tokens ORDER BY context_id, position"),
            "activations": ws.query("SELECT run_id, hook, context_id, md5(data) FROM activations ORDER BY hook, context_id"),
            "documents": ws.query("SELECT * FROM documents ORDER BY corpus_id, doc_id"),
        }


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path):
    args = ["cache", "--model", "tiny-llama", "--hook", HOOKS[0], "--hook", HOOKS[1], "--corpus", "stdlib",
            "--tokens", "24576", "--ctx", "64", "--batch", "2", "--commit-contexts", "8"]
    killed, clean = tmp_path / "killed.duckdb", tmp_path / "clean.duckdb"
    proc = _cli(*args, "--db", str(killed))
    # Wait until the progress bar shows committed batches, then kill without warning.
    seen = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        if not chunk:
            break
        seen += chunk
        if any("/24.6k" in part and not part.strip().startswith("0") for part in seen.split("\r")[-2:]) and seen.count("\r") > 4:
            break
    assert proc.poll() is None, f"the job ended before it could be killed: {seen[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Workspace(killed, read_only=True) as ws:
        (partial,) = ws.query("SELECT count(*) FROM contexts")[0]
        assert ws.query("SELECT status FROM runs")[0][0] == "running"
    assert 0 < partial < 384 and partial % 8 == 0  # only whole transactions of 8 contexts survived
    resumed = _cli(*args, "--db", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed after {partial} contexts" in out
    uninterrupted = _cli(*args, "--db", str(clean))
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    assert _table_dump(killed) == _table_dump(clean)


def test_transactions_hold_commit_contexts_whole_batches(tmp_path, tiny, stdlib_corpus, monkeypatch):
    """64 contexts in batches of 4, 12 contexts per commit: transactions of 12 (3 batches) and a last
    one of 4. A disk that fills at the 5th batch keeps exactly the first transaction; the rerun
    ends with the tables of an uninterrupted run, and no writer thread is left behind."""
    assert CacheRequest(hooks=("h",), tokens=1).commit_contexts >= 128
    whole = tmp_path / "whole.duckdb"
    request = CacheRequest(model="tiny-llama", hooks=HOOKS, corpus="stdlib", tokens=2048, ctx_len=32, batch_size=4, commit_contexts=12)
    with Workspace(whole) as ws:
        cacher = ActivationCacher(ws, tiny, stdlib_corpus, request)
        cacher.run(progress=False)
    assert cacher.transactions == 6  # 5 × 12 + 4

    real_insert, batches = caching.insert_arrow, []

    def fill_the_disk(con, table, rows):
        if table == "activations":
            batches.append(threading.current_thread().name)
            if len(batches) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_insert(con, table, rows)

    monkeypatch.setattr(caching, "insert_arrow", fill_the_disk)
    path = tmp_path / "ws.duckdb"
    with pytest.raises(OSError, match="No space left"):  # the writer's own exception, raised on the caller's thread
        cache(path, tiny, stdlib_corpus, commit_contexts=12)
    assert batches == ["cache-writer"] * 5 and not writer_threads()
    with Workspace(path, read_only=True) as ws:
        assert ws.query("SELECT status, error FROM runs") == [("failed", "OSError: [Errno 28] No space left on device")]
        assert ws.query("SELECT count(*) FROM contexts") == [(12,)]
        assert ws.query("SELECT count(*) FROM activations") == [(12 * len(HOOKS),)]
        assert ws.query("SELECT count(*) FROM tokens") == [(12 * 32,)]
    monkeypatch.setattr(caching, "insert_arrow", real_insert)
    assert cache(path, tiny, stdlib_corpus, commit_contexts=12).resumed_from == 12
    assert _table_dump(path) == _table_dump(whole)


def test_overflowing_activations_fail_the_job_with_one_line_and_keep_the_workspace_whole(tmp_path, tiny, stdlib_corpus):
    path = tmp_path / "ws.duckdb"
    with attached(tiny.model, [(HOOKS[1], lambda act, hook: act * 1e6)]):  # beyond float16's 65,504
        with pytest.raises(CacheError, match=r"activations at 'blocks.1.mlp.hook_post' overflow float16 .*--dtype bfloat16") as err:
            cache(path, tiny, stdlib_corpus, tokens=512, commit_contexts=8)
    assert "\n" not in str(err.value) and not writer_threads()
    with Workspace(path, read_only=True) as ws:
        assert ws.query("SELECT status FROM runs") == [("failed",)]
        assert ws.query("SELECT count(*) FROM contexts") == ws.query("SELECT count(*) FROM activations") == [(0,)]


def test_blobs_are_stored_uncompressed_and_settings_restored(tmp_path, tiny, stdlib_corpus):
    """ZSTD would make every fetch of a context decompress its 2,048-row vector (the loader's speed);
    the job's DuckDB settings are its own and do not outlive it."""
    settings = "SELECT current_setting('zstd_min_string_length'), current_setting('checkpoint_threshold'), current_setting('threads')"
    request = CacheRequest(model="tiny-llama", hooks=HOOKS, corpus="stdlib", tokens=65536, ctx_len=128, batch_size=32)
    with Workspace(tmp_path / "ws.duckdb") as ws:
        before = ws.query(settings)
        ActivationCacher(ws, tiny, stdlib_corpus, request).run(progress=False)
        assert ws.query(settings) == before
        kinds = ws.query("SELECT DISTINCT compression FROM pragma_storage_info('activations') WHERE segment_type = 'BLOB'")
    assert kinds and ("ZSTD",) not in kinds  # with DuckDB's defaults these 16-48 KB blobs get ZSTD


def test_a_bfloat16_model_caches_into_its_own_run(tmp_path):
    """`--model-dtype auto` is bfloat16 on CUDA and float32 on the CPU: a request resumed on the other
    kind of machine must not mix the two precisions into one run. A float32 run keeps the identity
    runs always had, so workspaces cached before the choice existed still resume."""
    import json

    path = tmp_path / "ws.duckdb"
    common = dict(db=path, model="tiny-llama", hooks=[HOOKS[0]], corpus="stdlib", tokens=128, ctx=32, progress=False)
    first = caching.run_cache(**common, device="cpu", model_dtype="float32")
    assert caching.run_cache(**common, device="cpu").run_id == first.run_id  # auto on the CPU: float32, the same run
    other = caching.run_cache(**common, device="cpu", model_dtype="bfloat16")
    assert other.run_id != first.run_id and other.resumed_from == 0
    with Workspace(path, read_only=True) as ws:
        configs = dict(ws.query("SELECT run_id, config FROM runs ORDER BY run_id"))
    assert "model_dtype" not in json.loads(configs[first.run_id])
    assert json.loads(configs[other.run_id])["model_dtype"] == "bfloat16"
