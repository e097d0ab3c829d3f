"""Scale-out: the Parquet store, caches written by several processes, DDP training from shards,
shards on object storage, and the bad input of each.

Processes are real: ``torchrun --standalone --nproc-per-node 2 -m workbench …`` on gloo. What one
process writes is compared with what two write, row for row and row group for row group (the same
forward batches: the same computation), never across different computations.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.activations import context_ids, iter_activations, read_contexts
from workbench.cli import main
from workbench.errors import BAD_INPUT
from workbench.loader import batches_per_rank, epochs_for, rank_slice
from workbench.shards import ShardLayout, open_store
from workbench.workspace import Workspace

HOOK = "blocks.1.hook_resid_post"
CACHE = ["cache", "--model", "tiny-llama", "--hook", HOOK, "--ctx", "32", "--batch", "8", "--commit-contexts", "16"]
TRAIN = ["train", "--hook", HOOK, "--width", "96", "--k", "4", "--batch-size", "256", "--warmup-steps", "2", "--no-downstream"]


def torchrun(argv: list[str], cwd: Path, nproc: int = 2, **kwargs) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node nproc -m workbench argv`` in ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                             "-m", "workbench", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def shard_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def shard_contents(root: Path) -> dict[str, tuple]:
    """Each shard's rows, row groups and footer metadata, less the run key (which differs between
    workspaces by design): what must be equal when two jobs cached the same request."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(root.rglob("*.parquet")):
        meta = json.loads(pq.read_metadata(path).metadata[b"workbench"])
        assert len(meta.pop("key")) == 16
        out[str(path.relative_to(root))] = (pq.read_table(path).to_pydict(), pq.ParquetFile(path).num_row_groups, meta)
    return out


def tables(db: Path) -> dict[str, list]:
    """The rows a cache run adds (the manifest without the rank that wrote each file)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("contexts", "tokens", "documents", "run_hooks")}
        out["shards"] = con.execute("SELECT * EXCLUDE (rank) FROM shards ORDER BY ALL").fetchall()
        out["runs"] = con.execute("SELECT run_id, n_contexts_target, status, store, chunk_contexts FROM runs").fetchall()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The same request cached into each store by one process: 128 contexts of 32 tokens, 8 chunks."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for store in ("duckdb", "parquet"):
        out[store] = root / f"{store}.duckdb"
        assert main([*CACHE, "--tokens", "4096", "--db", str(out[store]), "--store", store]) == 0
    return out


# -- the reader: one API for both stores -----------------------------------------------------------
def test_the_parquet_store_reads_as_the_duckdb_store(stores):
    with Workspace(stores["duckdb"], read_only=True) as a, Workspace(stores["parquet"], read_only=True) as b:
        for split in ("train", "test", "all"):
            assert context_ids(a, HOOK, split=split) == context_ids(b, HOOK, split=split)
        ids = context_ids(a, HOOK, split="all")
        picked = [ids[i] for i in (77, 3, 120, 3, 64)]  # any order, repeats
        # The same forward batches made both caches (chunks are whole batches): equal to the bit.
        assert torch.equal(read_contexts(a, HOOK, ids, dtype=None), read_contexts(b, HOOK, ids, dtype=None))
        assert torch.equal(read_contexts(a, HOOK, picked), read_contexts(b, HOOK, picked))
        assert a.cached_hooks() == b.cached_hooks()


@pytest.mark.parametrize("store", ["duckdb", "parquet"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_slices_that_cover_every_epoch(stores, store, world):
    """Rank slices (drop_last=False) together are exactly one process's epochs; with drop_last
    every rank yields the same number of batches (no rank waits at the end of DDP)."""
    with Workspace(stores[store], read_only=True) as ws:
        alone = torch.cat(list(iter_activations(ws, HOOK, 100, epochs=2, drop_last=False, seed=3)))  # [n, d]
        parts = [torch.cat(list(iter_activations(ws, HOOK, 100, epochs=2, drop_last=False, seed=3, rank=r, world=world)))
                 for r in range(world)]
        together = torch.cat(parts)
        assert together.shape == alone.shape
        # As multisets: every token of both epochs once across the ranks, none twice, none lost.
        assert torch.equal(_rows_sorted(together), _rows_sorted(alone))
        counts = [len(list(iter_activations(ws, HOOK, 100, epochs=2, seed=3, rank=r, world=world))) for r in range(world)]
        # What DDP drops: per rank, a partial batch and its shortfall against the largest slice (one
        # unit per epoch at most; a unit is a context in DuckDB, a row group of 32 contexts here).
        unit = (32 if store == "parquet" else 1) * 31
        assert len(set(counts)) == 1 and counts[0] * world * 100 >= alone.shape[0] - world * (100 + 2 * unit)


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    order = np.lexsort(x.numpy().T[::-1])
    return x[torch.from_numpy(order)]


def test_rank_slices_partition_and_balance():
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = rng.integers(1, 9, size=int(rng.integers(1, 40))).tolist()
        for world in (1, 2, 3, 5):
            slices = [rank_slice(weights, r, world) for r in range(world)]
            assert [i for s in slices for i in s] == list(range(len(weights)))  # in order, disjoint, complete
            sizes = [sum(weights[i] for i in s) for s in slices]
            assert max(sizes) - min(sizes) <= 2 * max(weights)
            per_rank = [0] * world  # the same totals computed naively, epoch by epoch, from the slices
            for epoch in range(2):
                shuffled = list(weights)
                random.Random(1 + epoch).shuffle(shuffled)
                for r in range(world):
                    per_rank[r] += sum(shuffled[i] for i in rank_slice(shuffled, r, world))
            assert batches_per_rank(weights, seed=1, epochs=2, world=world, batch_size=4) == min(per_rank) // 4
            if len(weights) < world:
                with pytest.raises(ValueError, match="cannot feed"):
                    epochs_for(weights, seed=1, world=world, batch_size=4, batches=1)
                continue
            steps = 3 * sum(weights) // (4 * world) + 1  # needs about three epochs
            epochs = epochs_for(weights, seed=1, world=world, batch_size=4, batches=steps)
            assert batches_per_rank(weights, seed=1, epochs=epochs, world=world, batch_size=4) >= steps
            assert epochs == 1 or batches_per_rank(weights, seed=1, epochs=epochs - 1, world=world, batch_size=4) < steps


def test_layout_arithmetic_finds_every_context():
    layout = ShardLayout(url="/x", run_id=3, ctx_len=128, chunk_contexts=48, n_contexts=100, dtype="float16")
    assert layout.group_contexts == 8 and layout.n_chunks == 3 and list(layout.chunk_range(2)) == [96, 97, 98, 99]
    from workbench.shards import ShardHook

    shard = ShardHook(layout, HOOK, 4, {c: (layout.relative(HOOK, c), 1, len(layout.chunk_range(c))) for c in range(3)})
    seen = []
    for chunk, group in shard.groups():
        seen += list(shard.group_range(chunk, group))
        assert all(shard.locate(i) == (chunk, group) for i in shard.group_range(chunk, group))
    assert seen == list(range(100))


# -- several processes ---------------------------------------------------------------------------
def test_two_processes_write_what_one_writes(stores, tmp_path):
    finished(torchrun([*CACHE, "--tokens", "4096", "--db", "two.duckdb", "--store", "parquet"], tmp_path))
    one_root, two_root = stores["parquet"].with_suffix(".shards"), tmp_path / "two.shards"
    assert shard_contents(two_root) == shard_contents(one_root) and len(shard_files(one_root)) == 8
    assert tables(tmp_path / "two.duckdb") == tables(stores["parquet"])
    with Workspace(tmp_path / "two.duckdb", read_only=True) as ws:
        assert sorted(r for (r,) in ws.query("SELECT DISTINCT rank FROM shards")) == [0, 1]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (a child of ``parent`` with RANK=rank in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_then_a_rerun_with_another_world_size_writes_the_same_shards(tmp_path):
    """SIGKILL rank 1 of two mid-cache; the same command with one process resumes (chunks are
    named by index, not rank) and the result equals an uninterrupted single-process cache."""
    request = [*CACHE[:-4], "--batch", "1", "--commit-contexts", "16", "--tokens", "32768", "--store", "parquet"]
    (tmp_path / "ref").mkdir()
    assert main([*request, "--db", str(tmp_path / "ref" / "ws.duckdb")]) == 0
    proc = torchrun([*request, "--db", "ws.duckdb"], tmp_path)
    folder = tmp_path / "ws.shards" / "run_id=1" / f"hook={HOOK}"
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("chunk-*.parquet"))) >= 3:
            victim = _rank_pid(proc.pid, 1)
            if victim:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.communicate(timeout=120)
    assert victim is not None and proc.returncode != 0, "the job ended before a rank could be killed"
    left = len(list(folder.glob("chunk-*.parquet")))
    assert 3 <= left < 64
    assert main([*request, "--db", str(tmp_path / "ws.duckdb")]) == 0  # one process now
    assert shard_contents(tmp_path / "ws.shards") == shard_contents(tmp_path / "ref" / "ws.shards")
    assert tables(tmp_path / "ws.duckdb") == tables(tmp_path / "ref" / "ws.duckdb")
    assert not list((tmp_path / "ws.shards").rglob(".tmp-*"))


def test_ddp_training_from_shards_matches_one_process(stores, tmp_path):
    """Two gloo processes with the same global batch against one process: the same steps, token
    count and L0 (TopK's k); FVU within 0.03 absolute. The ranks see other orders of the same
    tokens (disjoint slices of each epoch), so the runs differ by data order alone: measured
    |ΔFVU| ≈ 0.005 at this size; 0.03 is six times that, and far below what a wrong gradient
    average or a rank training on the same slice twice gives."""
    db = tmp_path / "ws.duckdb"
    shutil.copy(stores["parquet"], db)
    shutil.copytree(stores["parquet"].with_suffix(".shards"), tmp_path / "ws.shards")
    with Workspace(db) as ws:  # the copied run's shards live in the copy
        ws.con.execute("UPDATE runs SET store_url = ?", [str(tmp_path / "ws.shards")])
    assert main([*TRAIN, "--db", str(db), "--tokens", "16384", "--name", "one"]) == 0
    finished(torchrun([*TRAIN, "--db", "ws.duckdb", "--tokens", "16384", "--name", "two"], tmp_path))
    with Workspace(db, read_only=True) as ws:
        rows = {name: (json.loads(m), status) for name, m, status in ws.query("SELECT name, metrics, status FROM saes")}
        logs = {name: ws.query("SELECT step, tokens FROM training_log JOIN saes USING (sae_id) WHERE name = ? ORDER BY step",
                               [name]) for name in ("one", "two")}
    (one, s1), (two, s2) = rows["one"], rows["two"]
    assert s1 == s2 == "done"
    assert logs["one"] == logs["two"] and logs["one"][-1] == (64, 16384)
    assert one["train_tokens"] == two["train_tokens"] == 16384
    assert one["l0"] == two["l0"] == 4.0
    assert abs(one["fvu"] - two["fvu"]) < 0.03, (one["fvu"], two["fvu"])


# -- object storage: a real S3 API on 127.0.0.1 ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's standalone S3 server on 127.0.0.1 (started here, stopped after), with bucket 'acts'."""
    boto3 = pytest.importorskip("boto3")
    server = Path(sys.executable).with_name("moto_server")
    port = _free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket="acts")
        yield client, f"s3://acts/cache?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_shards_on_s3_cache_train_and_analyze(s3, stores, tmp_path):
    client, url = s3
    db = tmp_path / "s3.duckdb"
    assert main([*CACHE, "--tokens", "4096", "--db", str(db), "--store", "parquet", "--shards", url]) == 0
    listed = client.list_objects_v2(Bucket="acts", Prefix="cache/")["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow leaves empty folder markers after a move
    assert keys == [f"cache/run_id=1/hook={HOOK}/chunk-{c:06d}.parquet" for c in range(8)]
    local = shard_contents(stores["parquet"].with_suffix(".shards"))
    pulled = tmp_path / "pulled"
    for key in keys:  # what went to S3 is what a local store holds
        (pulled / key).parent.mkdir(parents=True, exist_ok=True)
        (pulled / key).write_bytes(client.get_object(Bucket="acts", Key=key)["Body"].read())
    assert shard_contents(pulled / "cache") == local
    assert main([*TRAIN, "--db", str(db), "--tokens", "4096", "--name", "s3"]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "s3", "--no-logits"]) == 0
    with Workspace(db, read_only=True) as ws, Workspace(stores["parquet"], read_only=True) as ref:
        ids = context_ids(ws, HOOK, split="all")
        assert torch.equal(read_contexts(ws, HOOK, ids), read_contexts(ref, HOOK, ids))
        assert ws.query("SELECT status FROM analyses") == [("done",)]
        assert ws.query("SELECT count(*) > 0 FROM feature_acts") == [(True,)]


def test_an_unreachable_store_fails_fast_in_one_line(tmp_path, capsys, table_digest):
    db = tmp_path / "ws.duckdb"
    assert main([*CACHE, "--tokens", "512", "--db", str(db)]) == 0
    before = table_digest(db)
    url = f"s3://acts/x?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    start = time.perf_counter()
    err = _bad([*CACHE, "--tokens", "512", "--db", str(db), "--store", "parquet", "--shards", url, "--seed", "1"], capsys)
    assert time.perf_counter() - start < 30 and "unreachable" in err and url in err
    assert table_digest(db) == before


# -- bad input ------------------------------------------------------------------------------------
def _bad(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == BAD_INPUT, err
    assert err and err[-1].startswith("workbench: error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture
def parquet_copy(stores, tmp_path) -> Path:
    db = tmp_path / "ws.duckdb"
    shutil.copy(stores["parquet"], db)
    shutil.copytree(stores["parquet"].with_suffix(".shards"), tmp_path / "ws.shards")
    with Workspace(db) as ws:
        ws.con.execute("UPDATE runs SET store_url = ?", [str(tmp_path / "ws.shards")])
    return db


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_shard_is_named_and_the_rerun_rewrites_it(parquet_copy, capsys, damage):
    db = parquet_copy
    shard = db.with_suffix(".shards") / "run_id=1" / f"hook={HOOK}" / "chunk-000003.parquet"
    original = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(original[: len(original) // 2])
    else:
        shard.unlink()
    err = _bad([*TRAIN, "--db", str(db), "--tokens", "2048"], capsys)
    assert "chunk-000003.parquet" in err and "workbench cache" in err, err
    assert main([*CACHE, "--tokens", "4096", "--db", str(db), "--store", "parquet"]) == 0
    assert "chunk-000003.parquet is missing or changed; rewriting it" in capsys.readouterr().err
    assert shard.read_bytes() == original
    assert main([*TRAIN, "--db", str(db), "--tokens", "2048", "--name", "after"]) == 0


def test_one_run_never_mixes_stores(stores, tmp_path, capsys, table_digest):
    db = tmp_path / "ws.duckdb"
    shutil.copy(stores["duckdb"], db)
    before = table_digest(db)
    err = _bad([*CACHE, "--tokens", "8192", "--db", str(db), "--store", "parquet"], capsys)
    assert "keeps its activations in duckdb" in err and "--store duckdb" in err
    assert table_digest(db) == before and not db.with_suffix(".shards").exists()


def test_shards_without_the_parquet_store_and_ddp_from_duckdb_are_refused(stores, tmp_path, capsys, table_digest):
    err = _bad([*CACHE, "--tokens", "512", "--db", str(tmp_path / "x.duckdb"), "--shards", str(tmp_path)], capsys)
    assert "--store parquet" in err and not (tmp_path / "x.duckdb").exists()
    from workbench.caching import CacheRequest
    from workbench.shard_caching import cache_sharded
    from workbench.training import TrainingError, train_sae_ddp

    with pytest.raises(ValueError, match="--store parquet"):
        cache_sharded(tmp_path / "y.duckdb", CacheRequest(hooks=(HOOK,), tokens=512, model="tiny-llama"))
    db = tmp_path / "d.duckdb"
    shutil.copy(stores["duckdb"], db)
    before = table_digest(db)
    with pytest.raises(TrainingError, match="cache it again with --store parquet"):  # one process standing in for rank 0
        train_sae_ddp(db, HOOK, {"width": 96, "k": 4}, __import__("saes").TrainConfig(batch_size=256, total_tokens=1024))
    assert table_digest(db) == before and not db.with_suffix(".saes").exists()


def test_the_default_store_is_beside_the_workspace(stores):
    store = open_store(stores["parquet"].with_suffix(".shards"))
    assert store.listing(f"run_id=1/hook={HOOK}") and store.url == str(stores["parquet"].with_suffix(".shards"))


def test_every_hook_of_a_damaged_chunk_is_registered_again(tmp_path, capsys):
    """Two hooks; one hook's shard of chunk 2 is deleted: the rerun rewrites the chunk and the
    manifest lists both hooks' files again (the run is whole for each hook)."""
    hooks = ["--hook", "blocks.0.hook_resid_post"]
    db = tmp_path / "ws.duckdb"
    assert main([*CACHE, *hooks, "--tokens", "2048", "--db", str(db), "--store", "parquet"]) == 0
    victim = tmp_path / "ws.shards" / "run_id=1" / "hook=blocks.0.hook_resid_post" / "chunk-000002.parquet"
    original, manifest = victim.read_bytes(), tables(db)["shards"]
    victim.unlink()
    assert main([*CACHE, *hooks, "--tokens", "2048", "--db", str(db), "--store", "parquet"]) == 0
    assert victim.read_bytes() == original and tables(db)["shards"] == manifest and len(manifest) == 2 * 4
    with Workspace(db, read_only=True) as ws:
        assert [r[4] for r in ws.cached_hooks()] == [64, 64]


def test_a_corpus_shorter_than_the_target_ends_the_run_where_it_ends(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + " ".join(f"word{j}" for j in range(40 + i)) for i in range(12)))
    db = tmp_path / "ws.duckdb"
    request = [*CACHE, "--corpus", str(corpus), "--tokens", "100000", "--db", str(db), "--store", "parquet"]
    assert main(request) == 0
    with Workspace(db, read_only=True) as ws:
        (target, status), = ws.query("SELECT n_contexts_target, status FROM runs")
        n = len(context_ids(ws, HOOK, split="all"))
        assert status == "done" and target == n < 100000 // 32 and ws.cached_hooks()[0][4] == n
        assert read_contexts(ws, HOOK, context_ids(ws, HOOK, split="all")[-1:]).shape == (1, 32, 64)
    assert main(request) == 0  # nothing left to do


def test_another_runs_shards_are_never_taken_or_overwritten(stores, tmp_path, capsys, table_digest):
    """A new workspace whose default store still holds a deleted workspace's run 1: refused in one
    line, nothing written, the old files untouched."""
    shutil.copytree(stores["parquet"].with_suffix(".shards"), tmp_path / "ws.shards")
    db = tmp_path / "ws.duckdb"
    Workspace(db).close()  # a new, empty workspace: its first run is run 1 again
    before, files = table_digest(db), shard_files(tmp_path / "ws.shards")
    err = _bad([*CACHE, "--tokens", "4096", "--db", str(db), "--store", "parquet", "--seed", "3"], capsys)
    assert "belongs to another run" in err and "--shards" in err
    assert table_digest(db) == before and shard_files(tmp_path / "ws.shards") == files


def test_readers_refuse_fewer_units_than_ranks_and_ids_of_another_run(stores):
    with Workspace(stores["parquet"], read_only=True) as ws:
        with pytest.raises(ValueError, match="fewer than the 9 processes"):
            next(iter_activations(ws, HOOK, 64, split="test", rank=0, world=9))
        with pytest.raises(ValueError, match="context ids of run 2"):
            read_contexts(ws, HOOK, [(2 << 32) | 5])
