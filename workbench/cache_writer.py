"""The caching job's writer thread: finished forward batches into the workspace, many per transaction.

    main thread (the model)                           writer thread (owns the database during the job)
    -----------------------------------------------   -------------------------------------------------
    forward batch b, capture the hooks                batch b-1: to the storage dtype (CPU forward),
    ``to_host``: CPU -> the tensors as they are;        overflow check on the bits, Arrow tables,
      CUDA -> storage dtype on the device, async        INSERT into the open transaction;
      copy into pinned host memory + an event           COMMIT once ``commit_contexts`` contexts are in it
    ``put`` --> bounded queue (``depth`` batches) -->

What the thread does with a batch is its sink's job: ``DuckDBSink`` inserts rows into DuckDB
transactions, ``workbench.shards.ShardSink`` writes Parquet shard files and publishes each when
its chunk is complete. The DuckDB sink uses its own connection (a cursor of the workspace's) and
the main thread does not touch the database while it runs, so no connection is ever used by two
threads at once. Every unit (transaction or shard) holds whole forward batches, so a job killed at
any point keeps whole units.
An error on the writer (disk full, an overflowing activation) rolls its transaction back and is
raised again, the same exception, by the main thread's next ``put`` or by ``finish``; an error on
the main thread rolls the open transaction back (``abort``), and a rerun redoes it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from workbench.errors import WorkbenchError
from workbench.storage import STORAGE_DTYPES, blob_array, convert_serial, overflowing

CONTEXT_ID_SHIFT = 32
_POLL_S = 0.05
_FINISH = object()
_ACTIVATION_COLUMNS = [("run_id", pa.int32()), ("hook", pa.string()), ("context_id", pa.int64())]


class CacheError(WorkbenchError):
    """Bad caching arguments (caught before anything is written), or activations the storage dtype
    cannot hold (caught by the writer before their transaction commits)."""


@dataclass
class HostBatch:
    """One forward batch on its way to the writer."""

    contexts: list  # the batch's contexts (``workbench.data`` records: index, token_ids, doc_ids)
    acts: dict[str, torch.Tensor]  # hook -> [B, L, d] on the host: as captured (CPU) or in the storage dtype (pinned)
    ready: object | None = None  # a torch.cuda.Event recorded after the device-to-host copies, else None
    chunk: int | None = None  # Parquet store: the shard chunk the batch belongs to
    closes_chunk: bool = False  # Parquet store: the chunk's last batch


def to_host(acts: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], object | None]:
    """Captured activations for the writer, without making the host wait for the device.

    CPU tensors are handed over as they are (the writer converts them, off the model's thread).
    Device tensors are converted to the storage dtype there (half the bytes to move) and copied
    with ``non_blocking`` into pinned host memory; the returned CUDA event marks their arrival."""
    host, event, stream = {}, None, None
    for hook, value in acts.items():
        if value.device.type == "cpu":
            host[hook] = value
            continue
        stored = value.to(STORAGE_DTYPES[dtype])  # [B, L, d] on the device
        pin = value.device.type == "cuda"
        host[hook] = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=pin)
        host[hook].copy_(stored, non_blocking=pin)
        if pin:
            event, stream = torch.cuda.Event(), torch.cuda.current_stream(value.device)
    if event is not None:
        event.record(stream)  # the copies' stream: the current device's stream may be another GPU's
    return host, event


def batch_tables(run_id: int, corpus_id: int, batch: list, blobs: dict[str, np.ndarray], ctx_len: int, corpus,
                 stored_docs: set[int]) -> dict[str, pa.Table]:
    """The rows one forward batch adds, by table, in insertion order (contexts, tokens, activations,
    documents); ``blobs``: hook -> [B, L * d] int16 bits in the storage dtype. Documents already in
    ``stored_docs`` are left out."""
    ids = np.array([(run_id << CONTEXT_ID_SHIFT) | c.index for c in batch], dtype=np.int64)  # [B]
    contexts = pa.table({"context_id": ids, "run_id": np.full(len(batch), run_id, np.int32),
                         "corpus_context": np.array([c.index for c in batch], np.int32)})
    tokens = pa.table({
        "context_id": np.repeat(ids, ctx_len),
        "position": np.tile(np.arange(ctx_len, dtype=np.int16), len(batch)),
        "token_id": np.array([c.token_ids for c in batch], dtype=np.int32).reshape(-1),
        "doc_id": np.array([c.doc_ids for c in batch], dtype=np.int32).reshape(-1),
    })
    large = any(rows.nbytes >= 2**31 for rows in blobs.values())
    schema = pa.schema([*_ACTIVATION_COLUMNS, ("data", pa.large_binary() if large else pa.binary())])
    activations = pa.Table.from_batches([
        pa.record_batch([pa.array(np.full(len(batch), run_id, np.int32)), pa.array([hook] * len(batch), pa.string()),
                         pa.array(ids), blob_array(rows, large)], schema=schema)
        for hook, rows in blobs.items()
    ], schema=schema)  # one chunk per hook, the blobs not copied
    new_docs = sorted({d for c in batch for d in c.doc_ids if d >= 0} - stored_docs)
    documents = pa.table({
        "corpus_id": np.full(len(new_docs), corpus_id, np.int32),
        "doc_id": np.array(new_docs, np.int32),
        "domain": [corpus.documents[d].domain for d in new_docs],
        "source": [corpus.documents[d].source for d in new_docs],
        "text": [corpus.documents[d].text for d in new_docs],
    })
    return {"contexts": contexts, "tokens": tokens, "activations": activations, "documents": documents}


def storage_bits(value: torch.Tensor, dtype: str, hook: str) -> np.ndarray:
    """[B, L * d] int16 bits of one hook's batch in the storage dtype; an infinity or NaN raises."""
    stored = value if value.dtype == STORAGE_DTYPES[dtype] else convert_serial(value, STORAGE_DTYPES[dtype])
    bits = stored.contiguous().view(torch.int16).numpy().reshape(stored.shape[0], -1)
    if overflowing(bits, dtype):
        raise CacheError(f"activations at '{hook}' overflow {dtype} (beyond its largest finite value, "
                                     "or not finite); use --dtype bfloat16")
    return bits


class DuckDBSink:
    """Where a DuckDB-store job's batches go: Arrow rows appended inside transactions of about
    ``commit_contexts`` contexts. ``insert(con, table, rows)`` appends (``storage.insert_arrow``).
    The sink uses its own DuckDB connection (a cursor of the workspace's)."""

    def __init__(self, con, *, run_id: int, corpus_id: int, corpus, dtype: str, ctx_len: int, commit_contexts: int,
                 stored_docs: set[int], insert: Callable):
        self._con = con.cursor()
        self._job = dict(run_id=run_id, corpus_id=corpus_id, ctx_len=ctx_len, corpus=corpus)
        self._dtype, self._commit, self._docs, self._insert = dtype, max(1, commit_contexts), stored_docs, insert
        self._pending = 0

    def begin(self) -> None:
        self._con.execute("BEGIN TRANSACTION")
        self._pending = 0

    def write(self, batch: HostBatch) -> bool:
        """Insert one batch into the open transaction; True when it should commit now."""
        blobs = {hook: storage_bits(value, self._dtype, hook) for hook, value in batch.acts.items()}
        tables = batch_tables(self._job["run_id"], self._job["corpus_id"], batch.contexts, blobs, self._job["ctx_len"],
                              self._job["corpus"], self._docs)
        for name, rows in tables.items():
            self._insert(self._con, name, rows)
        self._docs.update(tables["documents"].column("doc_id").to_pylist())
        self._pending += len(batch.contexts)
        return self._pending >= self._commit

    def commit(self) -> int:
        self._con.execute("COMMIT")
        return self._pending

    def rollback(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the connection may be unusable; closing discards the transaction
            pass

    def close(self) -> None:
        self._con.close()


class CacheWriter:
    """The writer thread of one caching job (see the module docstring): batches from ``put`` go to
    ``sink`` (``DuckDBSink``, or ``workbench.shards.ShardSink``), which opens a unit of work with
    ``begin``, takes batches with ``write`` (True: commit now), publishes it with ``commit``
    (returning the contexts it held) or discards it with ``rollback``; ``close`` at the end."""

    def __init__(self, sink, depth: int = 4):
        self.committed = 0  # contexts in committed units (read by the main thread for its progress bar)
        self.transactions = 0
        self._sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    # -- the main thread's side ---------------------------------------------------------------
    def put(self, batch: HostBatch) -> None:
        """Queue a batch (waits while ``depth`` are queued); raises the writer's error if it failed."""
        while True:
            if not self._thread.is_alive():
                self._raise()
            try:
                self._queue.put(batch, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Commit what is queued, stop the thread, and raise its error if it had one."""
        self.put(_FINISH)  # type: ignore[arg-type]
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Roll the open unit back and stop the thread (the main thread is failing)."""
        self._abort.set()
        self._thread.join()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()

    def _raise(self) -> None:
        self._thread.join()
        raise self._error if self._error is not None else RuntimeError("the cache writer thread stopped")

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        sink, open_ = self._sink, False  # whether a unit is open
        try:
            while not self._abort.is_set():
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if self._abort.is_set():
                    break
                if item is _FINISH:
                    if open_:
                        self._commit_open()
                        open_ = False
                    break
                if not open_:
                    sink.begin()
                    open_ = True
                if item.ready is not None:
                    item.ready.synchronize()  # the device-to-host copies have landed
                if sink.write(item):
                    self._commit_open()
                    open_ = False
        except BaseException as err:  # noqa: BLE001 - raised again on the main thread
            self._error = err
        finally:
            if open_:
                sink.rollback()
            sink.close()

    def _commit_open(self) -> None:
        self.committed += self._sink.commit()
        self.transactions += 1
