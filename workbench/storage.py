"""How rows reach the workspace's tables and how activation blobs come back, shared by every
writer (caching, analysis, probes) and reader (``activations``, ``loader``).

- ``STORAGE_DTYPES``: the 2-byte float formats activations are stored in, one blob per
  (hook, context): ``[ctx_len, d]`` little-endian values, no header.
- ``insert_arrow``: append an Arrow table in one statement (thousands of rows at Arrow speed).
- ``blob_array``: rows of a 2-D array as an Arrow binary column without a copy (the writer's side).
- ``blob_views`` / ``blob_tensor`` / ``gather_blobs``: an Arrow column of equal-size blobs as NumPy
  views or one tensor without a copy, or one copy of chosen blobs into a caller's buffer (the
  reader's side: no per-row Python work).
- ``convert_serial`` / ``overflowing``: float activations to a storage dtype on one core, and
  whether stored 2-byte floats hold an infinity or NaN (from their bits).
- ``bulk_blob_settings``: the DuckDB settings a bulk blob writer runs under (blobs stored
  uncompressed, so a reader can fetch any context without decompressing its neighbours).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from workbench.safety import sql_string

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Bits of the exponent field: all ones means infinity or NaN.
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}
SERIAL_ELEMENTS = 32_767  # torch runs an op on the calling thread alone below at::internal::GRAIN_SIZE (32,768)

# DuckDB compresses a column of strings whose average length reaches ``zstd_min_string_length``
# with ZSTD. ZSTD saves ~8 % on float16 activations, but a scan then decompresses every blob of a
# 2,048-row vector to return one of them: fetching a shuffled buffer of contexts cost a full table
# scan per buffer (~180 ms per context at d 576). Stored plainly, a context is a ~1 ms fetch.
# The checkpoint threshold is raised for the same job: a checkpoint every 16 MB of WAL rewrote
# the growing blob segments, halving the write rate and leaving the file ~1.7x the data. One
# DuckDB thread appends a few large rows twice as fast as two (no parallel scan of 16 rows to split).
BULK_BLOB_SETTINGS = {"zstd_min_string_length": "2147483647", "checkpoint_threshold": "1GB", "threads": "1"}


def insert_arrow(con, table: str, rows: pa.Table | dict) -> None:
    """Append ``rows`` (an Arrow table, or a dict of columns) to ``table``; columns in schema order.
    ``table`` is one of the workspace's own table names, never user input."""
    rows = rows if isinstance(rows, pa.Table) else pa.table(rows)
    if rows.num_rows == 0:
        return
    con.register("_incoming", rows)
    try:
        con.execute(f"INSERT INTO {table} SELECT * FROM _incoming")
    finally:
        con.unregister("_incoming")


def blob_array(rows: np.ndarray, large: bool | None = None) -> pa.Array:
    """``rows`` [n, ...] (any fixed-width dtype) as n binary blobs, sharing its memory when contiguous:
    ``binary`` (32-bit offsets, which DuckDB appends faster) unless ``large`` or past 2 GiB."""
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    size = rows.nbytes // n if n else 0
    large = rows.nbytes >= 2**31 if large is None else large
    kind, offset_type = (pa.large_binary(), np.int64) if large else (pa.binary(), np.int32)
    offsets = np.arange(n + 1, dtype=offset_type) * size
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(rows.reshape(-1).view(np.uint8))])


def blob_views(column: pa.ChunkedArray | pa.Array, row_bytes: int) -> list[np.ndarray]:
    """Read-only ``[n_chunk, row_bytes]`` uint8 views of a column of blobs, one per Arrow chunk,
    without a copy; a blob of another length raises ``ValueError``."""
    views = []
    for array in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if len(array) == 0:
            continue
        if array.type == pa.binary():
            offset_type = np.int32
        elif array.type == pa.large_binary():
            offset_type = np.int64
        else:
            raise ValueError(f"expected a binary column, got {array.type}")
        offsets = np.frombuffer(array.buffers()[1], dtype=offset_type)[array.offset : array.offset + len(array) + 1]
        lengths = np.diff(offsets)
        if not (lengths == row_bytes).all():
            bad = int(lengths[lengths != row_bytes][0])
            raise ValueError(f"a stored blob holds {bad} bytes where {row_bytes} were expected")
        data = np.frombuffer(array.buffers()[2], dtype=np.uint8, count=len(array) * row_bytes, offset=int(offsets[0]))
        views.append(data.reshape(len(array), row_bytes))
    return views


def blob_tensor(column: pa.ChunkedArray | pa.Array, row_bytes: int) -> torch.Tensor:
    """A column of equal-size blobs as one int16 tensor [n, row_bytes // 2] in column order: the Arrow
    memory itself when the column is one chunk (handed over by DLPack, which keeps it alive), one
    copy otherwise."""
    views = blob_views(column, row_bytes)
    if len(views) != 1:
        return torch.from_numpy(np.concatenate(views) if views else np.empty((0, row_bytes), np.uint8)).view(torch.int16)
    base = views[0]
    chunk = column.chunks[0] if isinstance(column, pa.ChunkedArray) else column
    data = chunk.buffers()[2]
    start = base.__array_interface__["data"][0] - data.address
    flat = pa.Array.from_buffers(pa.int16(), base.size // 2, [None, data.slice(start, base.size)])
    return torch.from_dlpack(flat).view(base.shape[0], row_bytes // 2)


def gather_blobs(column: pa.ChunkedArray | pa.Array, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = blob rows[i]`` of ``column`` (equal-size blobs): one copy, in NumPy (no GIL held).
    ``out``: [len(rows), row_bytes] uint8, e.g. a view of a (pinned) torch tensor; ``rows`` must be
    valid row numbers of the column."""
    views = blob_views(column, out.shape[1])
    if len(views) == 1:
        np.take(views[0], rows, axis=0, out=out, mode="clip")  # "clip": no bounds pass, no buffered copy of out
        return
    start = 0
    for view in views:
        inside = np.flatnonzero((rows >= start) & (rows < start + len(view)))
        out[inside] = view[rows[inside] - start]
        start += len(view)


def convert_serial(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value.to(dtype)`` on the CPU in slices below torch's parallel grain (32,768 elements), so it
    runs on the calling core alone: a writer thread converting beside a forward that already uses
    every core was 3x faster this way than with its own OpenMP team (measured on 2 busy cores)."""
    flat = value.contiguous().view(-1)
    out = torch.empty(flat.shape, dtype=dtype)
    for start in range(0, flat.shape[0], SERIAL_ELEMENTS):
        out[start : start + SERIAL_ELEMENTS].copy_(flat[start : start + SERIAL_ELEMENTS])
    return out.view(value.shape)


def overflowing(bits: np.ndarray, dtype: str) -> bool:
    """True when 2-byte floats of storage ``dtype``, given as their int16 bit patterns, hold an
    infinity or NaN (every exponent bit set). Runs on the host in NumPy, ~20x faster than
    ``torch.isfinite`` on CPU float16."""
    mask = _EXPONENT_BITS[dtype]
    flat = bits.reshape(-1).view(np.uint16)
    magnitude = np.bitwise_and(flat, np.uint16(0x7FFF))
    return bool(magnitude.max(initial=0) >= mask)


@contextmanager
def bulk_blob_settings(con) -> Iterator[None]:
    """Run the block under ``BULK_BLOB_SETTINGS`` (database-wide DuckDB settings), then checkpoint, so
    what was written is stored under them, and restore the previous values. When the block raises,
    a failure to checkpoint or restore (a full disk, a broken database) does not hide its error."""
    previous = {name: con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0] for name in BULK_BLOB_SETTINGS}
    for name, value in BULK_BLOB_SETTINGS.items():
        con.execute(f"SET {name} = {sql_string(str(value))}")  # SET cannot bind; names are constants
    try:
        yield
    except BaseException:
        _finish_bulk(con, previous, quiet=True)
        raise
    _finish_bulk(con, previous, quiet=False)


def _finish_bulk(con, previous: dict, *, quiet: bool) -> None:
    try:
        con.execute("CHECKPOINT")
    except Exception:  # noqa: BLE001 - the data is safe in the WAL; DuckDB checkpoints it later
        pass
    for name, value in previous.items():
        try:
            con.execute(f"SET {name} = {sql_string(str(value))}")  # SET cannot bind; names are constants
        except Exception:
            if not quiet:
                raise
