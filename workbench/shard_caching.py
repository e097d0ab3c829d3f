"""Caching into Parquet shards, by one process or by N under ``torchrun -m workbench cache``.

    rank 0                                           every rank (rank 0 too)
    --------------------------------------------     ---------------------------------------------
    open the workspace, check the request and the    load the model on its own device
      store; find or create the run; list which      tokenise the seeded stream (the same on all)
      chunks are published and valid (registered    take chunks todo[rank::world]; forward their
      files of the recorded size, or new files         batches; a writer thread writes each chunk's
      whose footer says they are that chunk)           shard per hook and publishes it (tmp + move)
    share the plan  ------------------------------>  barrier
    record every newly published chunk: the manifest row per hook, and the chunk's contexts,
      tokens and documents (read back from its token columns); the run is done when all are

A chunk is work that a rank either publishes whole or not at all, so a killed job (any rank, any
moment) loses at most the chunks in flight; the same command, with any number of processes,
redoes just those. Only rank 0 opens DuckDB (one writing process per file); the shards are the
only thing several processes write, each to its own files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from workbench import distributed
from workbench.activations import shard_layout
from workbench.cache_writer import CONTEXT_ID_SHIFT, CacheError, CacheWriter
from workbench.caching import ActivationCacher, CacheRequest, CacheSummary, _batches, validate_request
from workbench.hooks import Capture, attached
from workbench.shards import TMP_PREFIX, ShardError, ShardLayout, ShardSink, Store, chunk_name, chunk_of_name, open_store, shard_state
from workbench.storage import insert_arrow
from workbench.workspace import Workspace, ensure_writable, fetch_one


@dataclass(frozen=True)
class ShardPlan:
    """What rank 0 decided, sent to every rank."""

    layout: ShardLayout
    dims: dict[str, int]  # hook -> d
    todo: tuple[int, ...]  # chunks to write, in stream order
    done_contexts: int  # contexts in chunks already published


def default_store(db: str | Path) -> str:
    """Where a workspace's shards go when --shards is not given: DB.shards/ beside the database file."""
    return str(Path(db).expanduser().resolve().with_suffix(".shards"))


def cache_sharded(db: str | Path, request: CacheRequest, *, device: str | None = None, model_dtype: str | None = None,
                  progress: bool = True) -> CacheSummary | None:
    """Run ``request`` into Parquet shards (see the module docstring); returns the summary on rank
    0, None on the others."""
    from workbench.data import load_corpus
    from workbench.models import load_model

    if request.store != "parquet":
        raise CacheError("several processes (torchrun) write Parquet shards, not the DuckDB file, which allows one writer: "
                         "add --store parquet")
    rank, size = distributed.init()
    try:
        if rank == 0:
            ensure_writable(db)  # before the model loads
        loaded = load_model(request.model, device=device, dtype=model_dtype)
        validate_request(loaded, request)
        corpus = load_corpus(request.corpus)
        ok: object = True
    except Exception as err:  # noqa: BLE001 - rank 0's error reaches every rank through share
        if rank != 0:
            raise
        ok = err
    distributed.share(ok if rank == 0 else None)

    ws = Workspace(db) if rank == 0 else None
    with contextlib.ExitStack() as stack:
        if ws is not None:
            stack.callback(ws.close)
        plan = distributed.decided_by_rank0(lambda: _plan(ws, loaded, corpus, request))
        if ws is not None:
            stack.enter_context(ws.job("runs", plan.layout.run_id))  # a failure is recorded on the run; the same command resumes
        cacher = ActivationCacher(ws, loaded, corpus, request) if rank == 0 else _Forward(loaded, corpus, request)
        store = open_store(plan.layout.url)
        outcome = _Outcome()
        try:
            _cache_chunks(cacher, store, plan, plan.todo[rank::size], rank, progress and rank == 0, outcome)
        except Exception as err:  # noqa: BLE001 - every rank reports; rank 0 records what was published, then all stop
            outcome.error = err
        everyone = distributed.gather(outcome.shared())
        if rank == 0:
            written = {chunk: (r, sizes) for r, (chunks, _, _) in enumerate(everyone) for chunk, sizes in chunks}
            n_contexts = register(ws, store, plan, corpus, written, stream=outcome.stream)
        failed = [(r, line) for r, (_, _, line) in enumerate(everyone) if line is not None]
        if outcome.error is not None:
            raise outcome.error
        if failed:
            r, line = failed[0]
            raise distributed.RankFailed(f"rank {r} of {size} failed: {line}; the same command resumes", everyone[r][1])
        if rank != 0:
            return None
        return CacheSummary(run_id=plan.layout.run_id, hooks=request.hooks, n_contexts=n_contexts,
                            n_tokens=n_contexts * request.ctx_len, resumed_from=plan.done_contexts,
                            bytes_per_token=shard_bytes_per_token(ws, plan.layout.run_id))


@dataclass
class _Outcome:
    """What a rank's caching left: the chunks it published, the stream's length when it read it
    to the end (the corpus may hold fewer contexts than the run's target), and its error."""

    published: list = field(default_factory=list)  # (chunk, {hook: bytes})
    stream: int | None = None
    error: BaseException | None = None

    def shared(self) -> tuple[list, int, str | None]:
        """(published, exit status, one line or None): what every rank sends rank 0 (picklable)."""
        if self.error is None:
            return self.published, 0, None
        from workbench.errors import report

        outcome = report(self.error)
        return self.published, outcome.status, outcome.line


class _Forward(ActivationCacher):
    """The forward pass of a rank other than 0: an ``ActivationCacher`` without a workspace."""

    def __init__(self, loaded, corpus, request: CacheRequest):  # noqa: D107 - no workspace on this rank
        validate_request(loaded, request)
        self.ws, self.loaded, self.corpus, self.request = None, loaded, corpus, request
        from workbench.hooks import end_after, stop_layer

        self.stop_at = stop_layer(request.hooks, loaded.model.cfg.n_layers)
        self.end_hooks = end_after(loaded.model, request.hooks)


def _plan(ws: Workspace, loaded, corpus, request: CacheRequest) -> ShardPlan:
    """Rank 0: the run (created or found), the store checked, and the chunks left to write. One
    transaction: a store holding another run's files under this run's folder is refused, and
    the workspace is left as it was."""
    cacher = ActivationCacher(ws, loaded, corpus, request)
    url = request.shards
    if url is None:  # the run's recorded store, else the default beside the workspace
        identity = json.dumps(cacher._identity(), sort_keys=True)
        row = fetch_one(ws.con, "SELECT store_url FROM runs WHERE kind = 'cache' AND config = ?::JSON", [identity])
        url = row[0] if row and row[0] else default_store(ws.path)
    store = open_store(url)  # unreachable: one line, before anything is written
    with ws.transaction():
        corpus_id = cacher._corpus_id()
        run_id = cacher._find_or_create_run(corpus_id, store.url)
        cacher._store_vocab()
        layout = shard_layout(ws, run_id)
        dims = dict(ws.query("SELECT hook, d FROM run_hooks WHERE run_id = ? ORDER BY hook", [run_id]))
        complete = _complete_chunks(ws, store, layout, dims)
    todo = tuple(c for c in range(layout.n_chunks) if c not in complete)
    done = sum(len(layout.chunk_range(c)) for c in complete)
    return ShardPlan(layout, dims, todo, done)


def _complete_chunks(ws: Workspace, store: Store, layout: ShardLayout, dims: dict[str, int], *, quiet: bool = False) -> set[int]:
    """Chunks whose shard exists for every hook and holds the whole chunk: registered files of the
    recorded size, or unregistered files whose footer says so. A registered file that went missing
    or changed loses its manifest row (and is said so: the chunk is rewritten); temporary files this
    run's killed jobs left are removed; a complete file of another run is refused in one line."""
    registered = {(h, c): (p, b, n) for h, c, p, b, n in ws.query(
        "SELECT hook, chunk, path, bytes, n_contexts FROM shards WHERE run_id = ?", [layout.run_id])}
    complete: set[int] | None = None
    for hook, d in dims.items():
        listing = store.listing(layout.folder(hook))
        for name in listing:
            if name.startswith(f"{TMP_PREFIX}{layout.key}-"):
                store.delete(f"{layout.folder(hook)}/{name}")
        good = set()
        for chunk in range(layout.n_chunks):
            name = chunk_name(chunk)
            expected = len(layout.chunk_range(chunk))
            if (hook, chunk) in registered:
                path, size, n = registered[(hook, chunk)]
                if listing.get(name) == size and n == expected:
                    good.add(chunk)
                    continue
                if listing.get(name) != size and not quiet:
                    print(f"workbench: shard {store.where(path)} is missing or changed; rewriting it", file=sys.stderr)
                ws.con.execute("DELETE FROM shards WHERE run_id = ? AND hook = ? AND chunk = ?", [layout.run_id, hook, chunk])
            if name not in listing:
                continue
            state = shard_state(store, layout, hook, chunk, d)
            if state == "foreign":
                raise ShardError(f"{store.where(layout.relative(hook, chunk))} belongs to another run (another workspace, or one "
                                 f"deleted since) that used this store; give this run its own --shards, or remove "
                                 f"{store.where(layout.folder(hook))} if that data is no longer wanted")
            if state == "valid":
                good.add(chunk)
        complete = good if complete is None else complete & good
    return complete or set()


def _cache_chunks(cacher: ActivationCacher, store: Store, plan: ShardPlan, mine: tuple[int, ...], rank: int, progress: bool,
                  outcome: _Outcome) -> None:
    """Forward and write this rank's chunks; ``outcome`` collects what it published (also when it fails)."""
    from workbench.data import chunk_and_tokenize

    layout, req = plan.layout, cacher.request
    if not plan.todo:
        return
    wanted = set(mine)
    stream = chunk_and_tokenize(cacher.corpus.documents, cacher.loaded.tokenizer, req.ctx_len, seed=req.seed,
                                max_contexts=layout.n_contexts)
    seen = [0]  # contexts the stream yielded: its length once it is read to the end

    def counted():
        for context in stream:
            seen[0] = context.index + 1
            yield context

    mine_contexts = (c for c in counted() if c.index // layout.chunk_contexts in wanted)
    total = sum(len(layout.chunk_range(c)) for c in mine) * req.ctx_len
    size = distributed.world()[1]
    label = f"caching run {layout.run_id}" + (f" (rank 0 of {size})" if size > 1 else "")
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=label, disable=not progress, dynamic_ncols=True)
    sink = ShardSink(store, layout, plan.dims, tag=f"r{rank}-p{os.getpid()}")
    outcome.published = sink.published  # the same list: what it holds when a failure stops the job
    capture = Capture(req.hooks)
    shown = 0
    with bar, attached(cacher.loaded.model, capture.hooks() + cacher.end_hooks):
        with CacheWriter(sink) as writer:
            for chunk_contexts in _by_chunk(mine_contexts, layout.chunk_contexts):
                chunk = chunk_contexts[0].index // layout.chunk_contexts
                batches = list(_batches(chunk_contexts, req.batch_size))
                for i, batch in enumerate(batches):
                    writer.put(cacher.forward(capture, batch, chunk=chunk, closes_chunk=i == len(batches) - 1))
                    if writer.committed > shown:
                        bar.update((writer.committed - shown) * req.ctx_len)
                        shown = writer.committed
        bar.update((writer.committed - shown) * req.ctx_len)
    outcome.stream = seen[0]


def _by_chunk(contexts, chunk_contexts: int):
    """Consecutive contexts grouped by chunk (lists, in stream order)."""
    group: list = []
    for context in contexts:
        if group and context.index // chunk_contexts != group[0].index // chunk_contexts:
            yield group
            group = []
        group.append(context)
    if group:
        yield group


def register(ws: Workspace, store: Store, plan: ShardPlan, corpus, written: dict[int, tuple[int, dict[str, int]]],
             stream: int | None = None) -> int:
    """Rank 0: record every published, unregistered (hook, chunk): its manifest row, and the chunk's
    contexts, tokens and documents when they are not recorded yet, one transaction per chunk. A
    corpus that ended before the run's target (``stream`` contexts) shrinks the target to it. The
    run is done once every chunk is. Returns the contexts the run holds."""
    layout = plan.layout
    if stream is not None and stream < layout.n_contexts:
        with ws.transaction() as con:
            con.execute("UPDATE runs SET n_contexts_target = ? WHERE run_id = ?", [stream, layout.run_id])
        layout = dataclasses.replace(layout, n_contexts=stream)
    registered = set(ws.query("SELECT hook, chunk FROM shards WHERE run_id = ?", [layout.run_id]))
    complete = _complete_chunks(ws, store, layout, plan.dims, quiet=True)
    stored_docs = {d for (d,) in ws.query("SELECT doc_id FROM documents WHERE corpus_id = "
                                          "(SELECT corpus_id FROM runs WHERE run_id = ?)", [layout.run_id])}
    corpus_id = fetch_one(ws.con, "SELECT corpus_id FROM runs WHERE run_id = ?", [layout.run_id])[0]
    hooks = sorted(plan.dims)
    for chunk in sorted(complete):
        missing = [h for h in hooks if (h, chunk) not in registered]
        if not missing:
            continue
        rank, sizes = written.get(chunk, (-1, {}))
        n = len(layout.chunk_range(chunk))
        with ws.transaction() as con:
            first = chunk * layout.chunk_contexts
            ids = [(layout.run_id << CONTEXT_ID_SHIFT) | i for i in range(first, first + n)]
            have = con.execute("SELECT count(*) FROM contexts WHERE context_id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()[0][0]
            if have != n:  # new, or a chunk that grew when the run was extended: its rows are (re)written whole
                if have:
                    con.execute("DELETE FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[]))", [ids])
                    con.execute("DELETE FROM contexts WHERE context_id IN (SELECT unnest(?::BIGINT[]))", [ids])
                stored_docs.update(_record_contexts(con, store, layout, hooks[0], chunk, corpus, corpus_id, stored_docs))
            for hook in missing:
                relative = layout.relative(hook, chunk)
                size = sizes.get(hook) or int(store.fs.get_file_info(store.path(relative)).size)
                con.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [layout.run_id, hook, chunk, relative, n, size, rank])
    held = int(fetch_one(ws.con, "SELECT count(*) FROM contexts WHERE run_id = ?", [layout.run_id])[0])
    if len(complete) == layout.n_chunks:
        with ws.transaction() as con:
            con.execute("UPDATE runs SET status = 'done', finished_at = current_timestamp WHERE run_id = ?", [layout.run_id])
    return held


def _record_contexts(con, store: Store, layout: ShardLayout, hook: str, chunk: int, corpus, corpus_id: int,
                     stored_docs: set[int]) -> list[int]:
    """Insert a chunk's contexts, tokens and new documents, read back from its shard's token columns;
    returns the documents it added."""
    rows = _token_rows(store, layout.relative(hook, chunk))
    ids = rows.column("context_id").to_numpy()[:: layout.ctx_len]  # [n] one per context
    insert_arrow(con, "contexts", pa.table({"context_id": ids, "run_id": np.full(len(ids), layout.run_id, np.int32),
                                            "corpus_context": (ids & 0xFFFFFFFF).astype(np.int32)}))
    insert_arrow(con, "tokens", rows.select(["context_id", "position", "token_id", "doc_id"]))
    new_docs = sorted(set(np.unique(rows.column("doc_id").to_numpy()).tolist()) - stored_docs - {-1})
    insert_arrow(con, "documents", pa.table({
        "corpus_id": np.full(len(new_docs), corpus_id, np.int32), "doc_id": np.array(new_docs, np.int32),
        "domain": [corpus.documents[d].domain for d in new_docs], "source": [corpus.documents[d].source for d in new_docs],
        "text": [corpus.documents[d].text for d in new_docs]}))
    return new_docs


def _token_rows(store: Store, relative: str) -> pa.Table:
    with store.fs.open_input_file(store.path(relative)) as f:
        return pq.read_table(f, columns=["context_id", "position", "token_id", "doc_id"])


def shard_bytes_per_token(ws: Workspace, run_id: int) -> float:
    """Shard bytes per cached token and hook (the activation column and the token columns beside it)."""
    total, hooks = fetch_one(ws.con, "SELECT sum(bytes), count(DISTINCT hook) FROM shards WHERE run_id = ?", [run_id])
    n_tokens = fetch_one(ws.con, "SELECT count(*) FROM tokens JOIN contexts USING (context_id) WHERE run_id = ?", [run_id])[0]
    return float(total) / n_tokens / hooks if total and n_tokens else 0.0


__all__ = ["ShardPlan", "cache_sharded", "chunk_of_name", "default_store", "register"]
