"""Export a workspace's cached activations and their context as partitioned Parquet that other tools read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from workbench.activations import _run_layout, context_ids, read_contexts
from workbench.safety import check_writable_dir, sql_string
from workbench.workspace import Workspace, WorkspaceError

__all__ = ["export_parquet"]


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
            values = read_contexts(ws, hook, chunk, run_id=run_id, dtype=None if dtype == "float16" else torch.float32)  # [n, L, d]
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
