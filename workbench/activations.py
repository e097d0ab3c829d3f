"""Read cached activations back, from either store: shuffled training batches and whole contexts.

A run keeps its activations in the DuckDB file (rows of ``activations``) or in Parquet shards
(``workbench.shards``); every function here reads both, so training, evaluation, analysis, probes
and export never ask which. Under DDP, ``iter_activations(..., rank=r, world=n)`` gives rank r a
disjoint slice of each epoch (``workbench.loader.block_order``).

Train/test split: a context is held out (``split="test"``) when its index in the seeded corpus
stream satisfies ``index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1`` (5 %); every other context is
``"train"``. The split is a property of the context, so it is the same for every hook and run size.
"""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import torch

from workbench.loader import batches_per_rank, prefetched_batches, read_blocks, target_device
from workbench.shards import CONTEXT_ID_SHIFT, ShardHook, ShardLayout, ShardReader, run_key, stream_index
from workbench.storage import STORAGE_DTYPES, blob_tensor, gather_blobs
from workbench.workspace import Workspace, WorkspaceError, fetch_one

HOLDOUT_EVERY = 20
Split = Literal["train", "test", "all"]

_SPLIT_SQL = {
    "train": f"corpus_context % {HOLDOUT_EVERY} <> {HOLDOUT_EVERY - 1}",
    "test": f"corpus_context % {HOLDOUT_EVERY} = {HOLDOUT_EVERY - 1}",
    "all": "TRUE",
}


def _run_layout(ws: Workspace, run_id: int, hook: str) -> tuple[int, int, str]:
    """(ctx_len, d, storage dtype) of one cached hook."""
    row = fetch_one(
        ws.con,
        "SELECT r.ctx_len, h.d, r.dtype FROM runs r JOIN run_hooks h USING (run_id) WHERE run_id = ? AND hook = ?",
        [run_id, hook],
    )
    return int(row[0]), int(row[1]), str(row[2])


def context_ids(ws: Workspace, hook: str, *, run_id: int | None = None, split: Split = "all") -> list[int]:
    """Ids of the contexts with stored activations for ``hook``, in stream order."""
    if split not in _SPLIT_SQL:
        raise WorkspaceError(f"split must be one of {', '.join(_SPLIT_SQL)}, got '{split}'")
    run_id = ws.resolve_hook_run(hook, run_id)
    store, chunk = fetch_one(ws.con, "SELECT store, chunk_contexts FROM runs WHERE run_id = ?", [run_id])
    stored = ("EXISTS (SELECT 1 FROM shards s WHERE s.run_id = c.run_id AND s.hook = ? AND s.chunk = c.corpus_context // ?)"
              if store == "parquet" else
              "EXISTS (SELECT 1 FROM activations a WHERE a.run_id = c.run_id AND a.hook = ? AND a.context_id = c.context_id)")
    params = [run_id, hook, chunk] if store == "parquet" else [run_id, hook]
    rows = ws.con.execute(
        f"SELECT c.context_id FROM contexts c WHERE c.run_id = ? AND {_SPLIT_SQL[split]} AND {stored} ORDER BY c.context_id",
        params,
    ).fetchall()
    return [r[0] for r in rows]


def shard_layout(ws: Workspace, run_id: int) -> ShardLayout | None:
    """The geometry of a Parquet run (None for a DuckDB run): store, chunking, target and key."""
    row = fetch_one(ws.con, """SELECT store, store_url, chunk_contexts, ctx_len, n_contexts_target, dtype, created_at, config::VARCHAR
                               FROM runs WHERE run_id = ?""", [run_id])
    if row is None or row[0] != "parquet":
        return None
    _, url, chunk, ctx_len, target, dtype, created, identity = row
    return ShardLayout(url=url, run_id=run_id, ctx_len=int(ctx_len), chunk_contexts=int(chunk), n_contexts=int(target), dtype=dtype,
                       key=run_key(run_id, created, identity))


def shard_hook(ws: Workspace, hook: str, run_id: int) -> ShardHook | None:
    """What reading ``hook`` of a Parquet run needs (no workspace afterwards); None for a DuckDB run."""
    layout = shard_layout(ws, run_id)
    if layout is None:
        return None
    d = _run_layout(ws, run_id, hook)[1]
    chunks = {int(c): (p, int(b), int(n)) for c, p, b, n in ws.query(
        "SELECT chunk, path, bytes, n_contexts FROM shards WHERE run_id = ? AND hook = ? ORDER BY chunk", [run_id, hook])}
    return ShardHook(layout, hook, d, chunks)


def _fetch(con, run_id: int, hook: str, ids: list[int]) -> pa.Table:
    """context_id and data of the stored contexts among ``ids`` (in no particular order)."""
    return con.sql(
        """SELECT context_id, data FROM activations
           WHERE run_id = ? AND hook = ? AND context_id IN (SELECT unnest(?::BIGINT[]))""",
        params=[run_id, hook, ids],
    ).to_arrow_table()


def _rows_of(table: pa.Table, ids: list[int], hook: str) -> np.ndarray:
    """[len(ids)] int64: the row of ``table`` holding each of ``ids``; a missing one raises."""
    found = table.column("context_id").to_numpy()  # [n_found]
    wanted = np.asarray(ids, dtype=np.int64)
    missing = len(np.unique(wanted)) - len(found)
    if missing:
        raise WorkspaceError(f"{missing} of the requested contexts have no '{hook}' activations")
    order = np.argsort(found)
    return order[np.searchsorted(found, wanted, sorter=order)]


def _read_block(con, run_id: int, hook: str, ids: list[int], ctx_len: int, d: int, dtype: str) -> torch.Tensor:
    """[len(ids), ctx_len, d] in the storage dtype, in the order of ``ids``: the Arrow blobs copied
    once, no conversion."""
    table = _fetch(con, run_id, hook, ids)
    rows = _rows_of(table, ids, hook)
    raw = torch.empty((len(ids), ctx_len, d), dtype=torch.int16)  # numpy has no bfloat16: copy the bits
    try:
        gather_blobs(table.column("data"), rows, raw.numpy().view(np.uint8).reshape(len(ids), ctx_len * d * 2))
    except ValueError as err:
        raise WorkspaceError(f"'{hook}' activations do not match the run's layout [{ctx_len}, {d}]: {err}") from None
    return raw.view(STORAGE_DTYPES[dtype])


def _row_ids(con, run_id: int, hook: str) -> tuple[np.ndarray, np.ndarray]:
    """[n] context ids (sorted) and [n] DuckDB row ids of one hook's stored contexts."""
    table = con.sql("SELECT context_id, rowid FROM activations WHERE run_id = ? AND hook = ? ORDER BY context_id",
                    params=[run_id, hook]).to_arrow_table()
    return table.column(0).to_numpy(), table.column(1).to_numpy()


def _read_stored(con, hook: str, ids: list[int], row_ids: tuple[np.ndarray, np.ndarray], ctx_len: int, d: int,
                 dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """The contexts ``ids`` as fetched: [n * ctx_len, d] in the storage dtype and the database's order,
    without a copy, and [n] the row of each id in it.

    Rows are fetched by row id (``row_ids`` from ``_row_ids``): filtering by ``hook`` made DuckDB
    read ~30 % fewer rows per second. Row ids are stable here (activations are only appended); the
    hook and context id of every row are checked, so a moved row is an error, never wrong data."""
    known, rows_of_known = row_ids
    wanted = np.asarray(ids, dtype=np.int64)
    where = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
    table = con.sql("SELECT context_id, hook, data FROM activations WHERE rowid IN (SELECT unnest(?::BIGINT[]))",
                    params=[rows_of_known[where].tolist()]).to_arrow_table()
    if table.column("hook").unique().to_pylist() not in ([hook], []):
        raise WorkspaceError(f"the workspace changed while '{hook}' activations were read (rows moved); start again")
    rows = _rows_of(table, ids, hook)
    try:
        stored = blob_tensor(table.column("data"), ctx_len * d * 2)  # [n, L * d] int16
    except ValueError as err:
        raise WorkspaceError(f"'{hook}' activations do not match the run's layout [{ctx_len}, {d}]: {err}") from None
    return stored.view(STORAGE_DTYPES[dtype]).view(-1, d), rows


def read_contexts(ws: Workspace, hook: str, ids: list[int], *, run_id: int | None = None,
                  dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Activations of whole contexts, in the order of ``ids``: [len(ids), ctx_len, d] float32, or the
    storage dtype (float16 / bfloat16, half the memory, no conversion) with ``dtype=None``."""
    run_id = ws.resolve_hook_run(hook, run_id)
    ctx_len, d, stored = _run_layout(ws, run_id, hook)
    shard = shard_hook(ws, hook, run_id)
    if shard is not None:
        foreign = sorted({int(i) >> CONTEXT_ID_SHIFT for i in ids} - {run_id})
        if foreign:
            raise WorkspaceError(f"context ids of run {foreign[0]} asked of run {run_id}'s '{hook}' activations")
        acts = ShardReader(shard).read_contexts([stream_index(i) for i in ids]).view(STORAGE_DTYPES[stored])  # [n, L, d]
    else:
        acts = _read_block(ws.con, run_id, hook, list(ids), ctx_len, d, stored)  # [n, L, d] storage dtype
    return acts if dtype is None or dtype == acts.dtype else acts.to(dtype)


def iter_activations(
    ws: Workspace,
    hook: str,
    batch_size: int,
    *,
    seed: int = 0,
    run_id: int | None = None,
    split: Split = "train",
    epochs: int = 1,
    buffer_tokens: int = 65_536,
    skip_bos: bool = True,
    drop_last: bool = True,
    device: str | torch.device = "cpu",
    prefetch: int = 2,
    rank: int = 0,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """Shuffled float32 batches [batch_size, d] of one hook's cached activations, on ``device``.

    Contexts are read in a shuffled order a buffer of ``buffer_tokens`` at a time, and tokens are
    shuffled within the buffer. Each epoch visits every selected token exactly once in a new order
    (seeded by ``seed + epoch``; the same batches on every device); tokens left over at the end of
    a buffer carry into the next, and only the final remainder smaller than ``batch_size`` is
    dropped (yielded as a last, smaller batch when ``drop_last`` is False). ``skip_bos`` leaves
    out position 0 (the BOS token, whose residual is an outlier that SAEs should not spend
    latents on). The unit of shuffling is a context in the DuckDB store and a row group of
    ``shards.ROW_GROUP_TOKENS`` tokens in the Parquet store (reads stay sequential there).

    ``rank``/``world`` (DDP): this process's disjoint slice of every epoch; with ``drop_last`` every
    rank yields the same number of batches, so together they visit each epoch's tokens once, less
    a remainder smaller than ``world`` units plus one batch per rank.

    A reader thread keeps ``prefetch`` buffers ready in the storage dtype (pinned for CUDA); the
    conversion to float32 and the shuffle run on ``device`` ("auto", "cpu", "cuda:N", "meta", or
    any ``torch.device``). Host memory: about ``(prefetch + 2) × buffer_tokens × d × 2`` bytes.
    The thread stops when the iterator is closed, dropped or exhausted (see ``workbench.loader``).
    """
    run_id = ws.resolve_hook_run(hook, run_id)
    shard = shard_hook(ws, hook, run_id)
    options = dict(seed=seed, split=split, epochs=epochs, buffer_tokens=buffer_tokens, skip_bos=skip_bos, drop_last=drop_last,
                   device=device, prefetch=prefetch, rank=rank, world=world)
    if shard is not None:
        return iter_shards(shard, batch_size, **options)
    _check_reader(batch_size, prefetch, rank, world)
    ids = context_ids(ws, hook, run_id=run_id, split=split)
    if not ids:
        raise WorkspaceError(f"no cached contexts for '{hook}' in split '{split}'")
    ctx_len, d, dtype = _run_layout(ws, run_id, hook)
    row_ids = _row_ids(ws.con, run_id, hook)
    cursor = ws.con.cursor()  # the reader thread's own connection: DuckDB connections are not shared across threads

    def read(chunk: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        return _read_stored(cursor, hook, chunk, row_ids, ctx_len, d, dtype)

    return _batches(read, ids, [1] * len(ids), ctx_len, batch_size, max(1, buffer_tokens // ctx_len), cursor.close, **options)


def iter_shards(shard: ShardHook, batch_size: int, *, seed: int = 0, split: Split = "train", epochs: int = 1,
                buffer_tokens: int = 65_536, skip_bos: bool = True, drop_last: bool = True, device: str | torch.device = "cpu",
                prefetch: int = 2, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """``iter_activations`` over a Parquet run without the workspace (what ranks other than 0 of a
    torchrun job call, with the ``ShardHook`` rank 0 sent them)."""
    _check_reader(batch_size, prefetch, rank, world)
    if split not in _SPLIT_SQL:
        raise WorkspaceError(f"split must be one of {', '.join(_SPLIT_SQL)}, got '{split}'")
    ctx_len = shard.layout.ctx_len
    units, weights = shard_units(shard, split)
    if not units:
        raise WorkspaceError(f"no cached contexts for '{shard.hook}' in split '{split}'")
    if len(units) < world:
        raise WorkspaceError(f"'{shard.hook}' has {len(units)} row groups in split '{split}', fewer than the {world} processes "
                             "reading it: cache more tokens or use fewer processes")
    reader = ShardReader(shard)
    storage = STORAGE_DTYPES[shard.layout.dtype]

    def read(groups: list[tuple[int, int]]) -> tuple[torch.Tensor, np.ndarray]:
        data, ranges = reader.read_groups(groups)  # [rows, d] int16
        slots, start = [], 0
        for contexts in ranges:
            slots.extend(start + k for k, i in enumerate(contexts) if _in_split(i, split))
            start += len(contexts)
        return data.view(storage), np.asarray(slots, dtype=np.int64)

    per_read = max(1, buffer_tokens // (shard.layout.group_contexts * ctx_len))
    return _batches(read, units, weights, ctx_len, batch_size, per_read, None, seed=seed, epochs=epochs, skip_bos=skip_bos,
                    drop_last=drop_last, device=device, prefetch=prefetch, rank=rank, world=world, split=split,
                    buffer_tokens=buffer_tokens)


def shard_units(shard: ShardHook, split: Split) -> tuple[list[tuple[int, int]], list[int]]:
    """The row groups of a Parquet hook that hold contexts of ``split``, and how many each holds."""
    units, weights = [], []
    for chunk, group in shard.groups():
        n = sum(1 for i in shard.group_range(chunk, group) if _in_split(i, split))
        if n:
            units.append((chunk, group))
            weights.append(n)
    return units, weights


def _check_reader(batch_size: int, prefetch: int, rank: int, world: int) -> None:
    if batch_size <= 0:
        raise WorkspaceError(f"batch_size must be positive, got {batch_size}")
    if prefetch < 1:
        raise WorkspaceError(f"prefetch must be at least 1 buffer, got {prefetch}")
    if world < 1 or not 0 <= rank < world:
        raise WorkspaceError(f"rank must be in [0, world) with world >= 1, got rank {rank} of {world}")


def _in_split(index: int, split: Split) -> bool:
    held_out = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return split == "all" or held_out == (split == "test")


def _batches(read, units: list, weights: list[int], ctx_len: int, batch_size: int, per_read: int, on_close, *, seed: int,
             epochs: int, skip_bos: bool, drop_last: bool, device, prefetch: int, rank: int, world: int, **_) -> Iterator[torch.Tensor]:
    """The shared tail of both stores: the reader thread over ``units`` and the device batches."""
    target = target_device(device)
    skip = 1 if skip_bos else 0
    order = read_blocks(read, units, ctx_len=ctx_len, seed=seed, epochs=epochs, per_read=per_read, skip=skip,
                        pin=target.type == "cuda", weights=weights, rank=rank, world=world)
    limit = None
    if world > 1 and drop_last:
        tokens = [w * (ctx_len - skip) for w in weights]
        limit = batches_per_rank(tokens, seed=seed, epochs=epochs, world=world, batch_size=batch_size)

    def produce(put) -> None:
        try:
            order(put)
        finally:
            if on_close is not None:
                on_close()

    return prefetched_batches(produce, batch_size=batch_size, device=target, drop_last=drop_last, prefetch=prefetch, limit=limit)
