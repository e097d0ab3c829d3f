"""The training data path (``iter_activations`` over ``workbench.loader``): the batches of the first
implementation, on any device, from a reader thread that stops however the consumer stops."""

import random
import threading
from collections import Counter

import pytest
import torch

from workbench import activations
from workbench.activations import context_ids, iter_activations, read_contexts
from workbench.caching import ActivationCacher, CacheRequest
from workbench.loader import Block, device_batches, target_device
from workbench.workspace import Workspace, WorkspaceError

HOOK = "blocks.0.hook_resid_post"  # d 64
D, CTX = 64, 32


@pytest.fixture(scope="module")
def ws_path(tmp_path_factory, tiny, stdlib_corpus):
    path = tmp_path_factory.mktemp("loader") / "ws.duckdb"
    request = CacheRequest(model="tiny-llama", hooks=(HOOK,), corpus="stdlib", tokens=80 * CTX, ctx_len=CTX, batch_size=8)
    with Workspace(path) as ws:
        ActivationCacher(ws, tiny, stdlib_corpus, request).run(progress=False)
    return path


def first_implementation(ws, hook, batch_size, *, seed=0, split="train", epochs=1, buffer_tokens=65_536, skip_bos=True,
                         drop_last=True):
    """``iter_activations`` as it was: float32 copies on the host, shuffled there, the same seeds."""
    ids = context_ids(ws, hook, split=split)
    per_read = max(1, buffer_tokens // CTX)
    leftover = None
    for epoch in range(epochs):
        order = list(ids)
        random.Random(seed + epoch).shuffle(order)
        generator = torch.Generator().manual_seed(seed + epoch)
        for start in range(0, len(order), per_read):
            acts = read_contexts(ws, hook, order[start : start + per_read])
            if skip_bos:
                acts = acts[:, 1:]
            flat = acts.reshape(-1, acts.shape[-1])
            flat = flat[torch.randperm(flat.shape[0], generator=generator)]
            if leftover is not None:
                flat = torch.cat([leftover, flat])
            n_full = flat.shape[0] // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield flat[i : i + batch_size]
            leftover = flat[n_full:]
    if not drop_last and leftover is not None and leftover.shape[0]:
        yield leftover


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "activation-reader"]


@pytest.mark.parametrize("kw", [
    dict(batch_size=31, seed=3, epochs=2, buffer_tokens=200),  # several blocks per batch, carried rows
    dict(batch_size=100, seed=0, buffer_tokens=CTX * 7, skip_bos=False, drop_last=False),
    dict(batch_size=16, seed=5, buffer_tokens=10, split="all"),  # one context per block
    dict(batch_size=4096, seed=1, split="test", drop_last=False),  # one block, one short batch
])
def test_the_batches_are_the_first_implementations(ws_path, kw):
    """Same seed, same batches, bit for bit: a trainer resuming a checkpoint sees what it saw."""
    with Workspace(ws_path, read_only=True) as ws:
        expected = list(first_implementation(ws, HOOK, **kw))
        got = list(iter_activations(ws, HOOK, **kw))
    assert len(got) == len(expected) > 0
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))


def test_each_epoch_serves_every_token_once_in_a_seeded_order(ws_path):
    with Workspace(ws_path, read_only=True) as ws:
        tokens = read_contexts(ws, HOOK, context_ids(ws, HOOK, split="train"))[:, 1:].reshape(-1, D)  # BOS left out
        one = list(iter_activations(ws, HOOK, 50, seed=7, epochs=1, buffer_tokens=300, drop_last=False))
        two = list(iter_activations(ws, HOOK, 50, seed=7, epochs=2, buffer_tokens=300, drop_last=False))
        other = list(iter_activations(ws, HOOK, 50, seed=8, epochs=1, buffer_tokens=300, drop_last=False))

    def rows(tensors):
        return Counter(map(tuple, torch.cat(tensors).tolist()))

    assert rows(one) == rows([tokens]) == rows(other)
    assert rows(two) == rows([tokens, tokens])
    assert all(torch.equal(a, b) for a, b in zip(one[:-1], two))  # epoch 0 is the same with more epochs after it
    assert not torch.equal(one[0], other[0])


def test_meta_device_gives_meta_float32_batches_of_the_cpu_shapes(ws_path):
    """On "meta" every tensor of the device side must be made there (a stray CPU tensor raises)."""
    kw = dict(batch_size=37, seed=2, buffer_tokens=150, drop_last=False)
    with Workspace(ws_path, read_only=True) as ws:
        cpu = [b.shape for b in iter_activations(ws, HOOK, **kw, device="cpu")]
        meta = list(iter_activations(ws, HOOK, **kw, device="meta"))
        on_meta = list(iter_activations(ws, HOOK, **kw, device=torch.device("meta")))
    assert [b.shape for b in meta] == [b.shape for b in on_meta] == cpu and cpu[-1] != cpu[0]
    assert all(b.device.type == "meta" and b.dtype == torch.float32 for b in meta)


def test_the_device_side_reads_no_value_back(ws_path, host_reads):
    """Everything the consumer's thread does per batch runs on the device without the host waiting.
    (The reader thread's NumPy and DuckDB work is the host's own and is not counted.)"""
    with Workspace(ws_path, read_only=True) as ws:
        with host_reads() as reads:
            n = sum(1 for _ in iter_activations(ws, HOOK, 29, buffer_tokens=100, drop_last=False, device="meta"))
    assert n > 10 and reads.count == 0, reads.calls
    # The same for the batching alone, on blocks that are already on the host.
    blocks = [Block(torch.randn(3 * CTX, D).half(), torch.randperm(3 * CTX)) for _ in range(4)]
    with host_reads() as reads:
        batches = list(device_batches(iter(blocks), 50, torch.device("meta"), drop_last=False))
    assert [b.shape[0] for b in batches] == [50] * 7 + [4 * 3 * CTX - 350] and reads.count == 0, reads.calls


def test_stopping_early_leaves_no_reader_thread(ws_path):
    with Workspace(ws_path, read_only=True) as ws:
        it = iter_activations(ws, HOOK, 8, buffer_tokens=CTX, epochs=50)
        next(it)
        assert len(reader_threads()) == 1
        it.close()
        assert not reader_threads()

        for _ in iter_activations(ws, HOOK, 8, buffer_tokens=CTX, epochs=50):
            break
        assert not reader_threads()

        it = iter_activations(ws, HOOK, 8, buffer_tokens=CTX, epochs=50)
        next(it)
        del it  # dropped without closing
        assert not reader_threads()

        def consume_and_fail():
            for i, _ in enumerate(iter_activations(ws, HOOK, 8, buffer_tokens=CTX, epochs=50)):
                if i == 3:
                    raise KeyError("the consumer fails")

        with pytest.raises(KeyError, match="the consumer fails"):
            consume_and_fail()
        assert not reader_threads()
        assert ws.query("SELECT count(*) FROM activations")[0][0] == 80  # the workspace's connection still works


def test_an_error_on_the_reader_thread_reaches_the_consumer(ws_path, monkeypatch):
    real, calls = activations._read_stored, []

    def fails_on_the_third_block(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "_read_stored", fails_on_the_third_block)
    with Workspace(ws_path, read_only=True) as ws:
        got = []
        with pytest.raises(OSError, match="Input/output error"):
            for batch in iter_activations(ws, HOOK, 8, buffer_tokens=CTX):
                got.append(batch)
    assert calls == ["activation-reader"] * 3  # read on the thread
    assert len(got) == 2 * (CTX - 1) // 8  # the two blocks read before the error were served
    assert not reader_threads()


def test_read_contexts_in_the_storage_dtype(ws_path):
    with Workspace(ws_path, read_only=True) as ws:
        ids = context_ids(ws, HOOK)[:5][::-1] + context_ids(ws, HOOK)[:1]  # any order, repeats allowed
        stored = read_contexts(ws, HOOK, ids, dtype=None)
        full = read_contexts(ws, HOOK, ids)
        with pytest.raises(WorkspaceError, match="1 of the requested contexts have no"):
            read_contexts(ws, HOOK, ids + [12345])
    assert stored.dtype == torch.float16 and full.dtype == torch.float32 and stored.shape == (6, CTX, D)
    assert torch.equal(stored.float(), full) and torch.equal(full[0], full[-1]) is False and torch.equal(full[4], full[5])


def test_device_names():
    assert target_device("auto") == target_device(None) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert target_device("meta") == target_device(torch.device("meta")) == torch.device("meta")
    assert target_device("cpu:0") == torch.device("cpu", 0)  # beyond saes.resolve_device's names: torch.device's own
    with pytest.raises(RuntimeError):
        target_device("gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_the_cpu_batches(ws_path):
    kw = dict(batch_size=64, seed=4, epochs=2, buffer_tokens=256, drop_last=False)
    with Workspace(ws_path, read_only=True) as ws:
        cpu = list(iter_activations(ws, HOOK, **kw))
        cuda = list(iter_activations(ws, HOOK, **kw, device="cuda"))
    assert all(g.device.type == "cuda" and torch.equal(g.cpu(), c) for g, c in zip(cuda, cpu)) and len(cuda) == len(cpu)
