"""Read cached activations back: shuffled training batches, whole contexts, Parquet export.

Train/test split: a context is held out (``split="test"``) when its index in the seeded corpus
stream satisfies ``index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1`` (5 %); every other context is
``"train"``. The split is a property of the context, so it is the same for every hook and run size.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from workbench.safety import check_writable_dir, sql_string
from workbench.storage import STORAGE_DTYPES
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
    row = fetch_one(ws.con, 
        "SELECT r.ctx_len, h.d, r.dtype FROM runs r JOIN run_hooks h USING (run_id) WHERE run_id = ? AND hook = ?",
        [run_id, hook],
    )
    return int(row[0]), int(row[1]), str(row[2])


def context_ids(ws: Workspace, hook: str, *, run_id: int | None = None, split: Split = "all") -> list[int]:
    """Ids of the contexts with stored activations for ``hook``, in stream order."""
    if split not in _SPLIT_SQL:
        raise WorkspaceError(f"split must be one of {', '.join(_SPLIT_SQL)}, got '{split}'")
    run_id = ws.resolve_hook_run(hook, run_id)
    rows = ws.con.execute(
        f"""SELECT c.context_id FROM contexts c
            WHERE c.run_id = ? AND {_SPLIT_SQL[split]}
              AND EXISTS (SELECT 1 FROM activations a WHERE a.run_id = c.run_id AND a.hook = ? AND a.context_id = c.context_id)
            ORDER BY c.context_id""",
        [run_id, hook],
    ).fetchall()
    return [r[0] for r in rows]


def read_contexts(ws: Workspace, hook: str, ids: list[int], *, run_id: int | None = None) -> torch.Tensor:
    """Activations of whole contexts, in the order of ``ids``: [len(ids), ctx_len, d] float32."""
    run_id = ws.resolve_hook_run(hook, run_id)
    ctx_len, d, dtype = _run_layout(ws, run_id, hook)
    table = ws.con.sql(
        """SELECT context_id, data FROM activations
           WHERE run_id = ? AND hook = ? AND context_id IN (SELECT unnest(?::BIGINT[]))""",
        params=[run_id, hook, ids],
    ).to_arrow_table()
    if table.num_rows != len(set(ids)):
        raise WorkspaceError(f"{len(set(ids)) - table.num_rows} of the requested contexts have no '{hook}' activations")
    stored = _blobs_to_tensor(table.column("data"), dtype, ctx_len, d)  # [n, L, d], in table order
    order = {cid: i for i, cid in enumerate(table.column("context_id").to_pylist())}
    return stored[torch.tensor([order[cid] for cid in ids], dtype=torch.long)]


def _blobs_to_tensor(column: pa.ChunkedArray, dtype: str, ctx_len: int, d: int) -> torch.Tensor:
    """Equal-size blobs → one [n, ctx_len, d] float32 tensor without per-row Python work."""
    array = column.combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32 if array.type == pa.binary() else np.int64)
    start, stop = offsets[array.offset], offsets[array.offset + len(array)]
    raw = np.frombuffer(array.buffers()[2], dtype=np.uint8)[start:stop].view(np.int16)
    halves = torch.from_numpy(raw.copy()).view(STORAGE_DTYPES[dtype])
    return halves.view(len(array), ctx_len, d).float()


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
) -> Iterator[torch.Tensor]:
    """Shuffled float32 batches [batch_size, d] of one hook's cached activations.

    Memory is bounded by ``buffer_tokens`` (plus one batch): contexts are read in a shuffled
    order a buffer at a time, and tokens are shuffled within the buffer. Each epoch visits
    every selected token exactly once in a new order (seeded by ``seed + epoch``); tokens left
    over at the end of a buffer carry into the next, and only the final remainder smaller than
    ``batch_size`` is dropped (yielded as a last, smaller batch when ``drop_last`` is False).
    ``skip_bos`` leaves out position 0 (the BOS token, whose
    residual is an outlier that SAEs should not spend latents on).
    """
    if batch_size <= 0:
        raise WorkspaceError(f"batch_size must be positive, got {batch_size}")
    run_id = ws.resolve_hook_run(hook, run_id)
    ids = context_ids(ws, hook, run_id=run_id, split=split)
    if not ids:
        raise WorkspaceError(f"no cached contexts for '{hook}' in split '{split}'")
    ctx_len, _, _ = _run_layout(ws, run_id, hook)
    per_read = max(1, buffer_tokens // ctx_len)
    leftover: torch.Tensor | None = None
    for epoch in range(epochs):
        order = list(ids)
        random.Random(seed + epoch).shuffle(order)
        generator = torch.Generator().manual_seed(seed + epoch)
        for start in range(0, len(order), per_read):
            acts = read_contexts(ws, hook, order[start : start + per_read], run_id=run_id)  # [n, L, d]
            if skip_bos:
                acts = acts[:, 1:]
            flat = acts.reshape(-1, acts.shape[-1])  # [n * L', d]
            flat = flat[torch.randperm(flat.shape[0], generator=generator)]
            if leftover is not None:
                flat = torch.cat([leftover, flat])
            n_full = flat.shape[0] // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield flat[i : i + batch_size].to(device)
            leftover = flat[n_full:]
    if not drop_last and leftover is not None and leftover.shape[0]:
        yield leftover.to(device)


def export_parquet(ws: Workspace, out_dir: str | Path, *, hooks: list[str] | None = None) -> Path:
    """Write tokens, contexts, documents and activations as partitioned Parquet under ``out_dir``.

    ``activations/run_id=R/hook=H/*.parquet`` holds one row per token: context_id, position and
    ``activation`` (a fixed-size list of float16, or float32 for bfloat16 caches, since Parquet
    has no bfloat16). Tables go through DuckDB's ``COPY ... PARTITION_BY``.
    """
    cached = sorted({hook for _, _, hook, _, stored in ws.cached_hooks() if stored})
    unknown = sorted(set(hooks or ()) - set(cached))
    if unknown:
        raise WorkspaceError(f"hook {unknown[0]!r} is not cached in {ws.path.name}; cached: {', '.join(cached) or 'none'}")
    out = check_writable_dir(out_dir, "export folder").resolve()
    for table, partition in (("tokens", None), ("contexts", "run_id"), ("documents", "corpus_id")):
        # COPY TO cannot bind its file name: the path is quoted by the one tested helper.
        if partition is None:
            target, options = out / f"{table}.parquet", "FORMAT parquet"
        else:
            target, options = out / table, f"FORMAT parquet, OVERWRITE_OR_IGNORE, PARTITION_BY ({partition})"
        ws.con.execute(f"COPY {table} TO {sql_string(str(target))} ({options})")
    for run_id, _, hook, d, stored in ws.cached_hooks():
        if stored == 0 or (hooks and hook not in hooks):
            continue
        ctx_len, d, dtype = _run_layout(ws, run_id, hook)
        ids = context_ids(ws, hook, run_id=run_id)
        value_type = pa.float16() if dtype == "float16" else pa.float32()
        for part, start in enumerate(range(0, len(ids), 256)):
            chunk = ids[start : start + 256]
            acts = read_contexts(ws, hook, chunk, run_id=run_id)  # [n, L, d]
            values = acts.half() if dtype == "float16" else acts
            flat = pa.array(values.reshape(-1).numpy(), type=value_type)
            table = pa.table(
                {
                    "context_id": np.repeat(np.array(chunk, np.int64), ctx_len),
                    "position": np.tile(np.arange(ctx_len, dtype=np.int16), len(chunk)),
                    "activation": pa.FixedSizeListArray.from_arrays(flat, d),
                }
            )
            folder = out / "activations" / f"run_id={run_id}" / f"hook={hook}"
            folder.mkdir(parents=True, exist_ok=True)
            pads.write_dataset(
                table, folder, format="parquet", basename_template=f"part-{part:05d}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
            )
    return out
