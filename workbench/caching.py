"""Cache activations at chosen hooks into the workspace, resumably.

One forward pass serves every requested hook and stops after the deepest requested block. While
the model runs batch b, a writer thread (``workbench.cache_writer``) stores batch b-1: the
contexts, tokens, documents used and the activations of every hook, ``commit_contexts`` contexts
(whole forward batches) per transaction. A run killed at any point keeps only whole
transactions; running the same command again finds the run by its configuration and continues
after the last committed context. Context ids are ``run_id << 32 | index in the seeded stream``,
so a resumed run writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from workbench.cache_writer import CONTEXT_ID_SHIFT, CacheError, CacheWriter, DuckDBSink, HostBatch, to_host
from workbench.data import Corpus, chunk_and_tokenize, token_strings
from workbench.hooks import Capture, attached, end_after, stop_layer, validate_hooks
from workbench.models import LoadedModel, max_context
from workbench.storage import STORAGE_DTYPES, bulk_blob_settings, insert_arrow
from workbench.workspace import Workspace, ensure_writable, fetch_one

__all__ = ["CONTEXT_ID_SHIFT", "CacheError", "CacheRequest", "CacheSummary", "ActivationCacher", "cache", "run_cache"]

MAX_CONTEXTS = 2**31 - 1  # a context's index is a 32-bit column (and the low half of its id)
MAX_CTX = 2**15 - 1  # positions are 16-bit
STORES = ("duckdb", "parquet")


@dataclass(frozen=True)
class CacheRequest:
    """What to cache; identical requests resume the same run."""

    hooks: tuple[str, ...]
    """Hook names (see `workbench hooks`); one forward pass serves them all."""
    tokens: int
    """Tokens to cache, rounded up to whole contexts (a larger number later extends the run)."""
    model: str = "smollm2-135m"
    """Model: an alias (smollm2-135m, tiny-llama), a local Hugging Face folder or a hub id."""
    corpus: str = "stdlib"
    """Corpus spec: stdlib, a .txt/.jsonl/.parquet file, a folder of .txt files, or hf:NAME[:CONFIG][:SPLIT]."""
    ctx_len: int = 128
    """Context length in tokens, BOS included."""
    batch_size: int = 16
    """Contexts per forward pass."""
    seed: int = 0
    """Seed of the document order (recorded in the run)."""
    dtype: Literal["float16", "bfloat16"] = "float16"
    """Storage dtype, 2 bytes per dimension (float16 is refused where an activation would overflow it)."""
    commit_contexts: int = 128
    """Contexts per committed transaction (duckdb) or shard file (parquet), rounded up to whole batches: what a kill loses at most."""
    store: Literal["duckdb", "parquet"] = "duckdb"
    """Where activations go: the DuckDB file (small caches), or Parquet shards (large caches, and N processes under torchrun)."""
    shards: str | None = None
    """Parquet store: the shards' root, a folder or a file://, s3:// or gs:// URL (default: DB.shards/ beside the workspace)."""

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise CacheError(f"--tokens must be a positive number of tokens, got {self.tokens}")
        if not 2 <= self.ctx_len <= MAX_CTX:
            raise CacheError(f"--ctx must be between 2 (BOS plus one token) and {MAX_CTX}, got {self.ctx_len}")
        if self.n_contexts > MAX_CONTEXTS:
            raise CacheError(f"--tokens {self.tokens} is {self.n_contexts:,} contexts of {self.ctx_len} tokens; "
                             f"a run holds at most {MAX_CONTEXTS:,} contexts")
        if self.batch_size <= 0:
            raise CacheError(f"--batch must be a positive number of contexts, got {self.batch_size}")
        if self.commit_contexts <= 0:
            raise CacheError(f"--commit-contexts must be a positive number of contexts, got {self.commit_contexts}")
        if self.dtype not in STORAGE_DTYPES:
            raise CacheError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got '{self.dtype}'")
        if len(set(self.hooks)) != len(self.hooks):
            raise CacheError(f"a hook is repeated in {list(self.hooks)}")
        if self.store not in STORES:
            raise CacheError(f"--store must be one of {', '.join(STORES)}, got '{self.store}'")
        if self.shards is not None and self.store != "parquet":
            raise CacheError("--shards names where Parquet shards go; add --store parquet (or leave --shards out)")

    @property
    def chunk_contexts(self) -> int:
        """Contexts per shard chunk: ``commit_contexts`` rounded up to whole batches."""
        return -(-self.commit_contexts // self.batch_size) * self.batch_size

    @property
    def n_contexts(self) -> int:
        return math.ceil(self.tokens / self.ctx_len)

    def identity(self) -> dict:
        """The fields that define a run (everything but the size, the batching and the commit size)."""
        fields = asdict(self)
        fields["hooks"] = sorted(self.hooks)
        del fields["tokens"], fields["batch_size"], fields["commit_contexts"], fields["store"], fields["shards"]
        return fields


@dataclass(frozen=True)
class CacheSummary:
    run_id: int
    hooks: tuple[str, ...]
    n_contexts: int
    n_tokens: int
    resumed_from: int  # contexts already stored when this call started
    bytes_per_token: float


def corpus_fingerprint(corpus: Corpus) -> str:
    digest = hashlib.sha256()
    for doc in corpus.documents:
        digest.update(doc.domain.encode())
        digest.update(b"\0")
        digest.update(doc.text.encode("utf-8", "surrogatepass"))
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def validate_request(loaded: LoadedModel, request: CacheRequest) -> None:
    """Everything that can be checked against the model before the workspace is touched."""
    validate_hooks(loaded.model, request.hooks)
    limit = max_context(loaded.model)
    if request.ctx_len > limit:
        raise CacheError(f"--ctx {request.ctx_len} exceeds the model's context length {limit}")


def _batches(contexts: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for context in contexts:
        batch.append(context)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ActivationCacher:
    """Runs the model over contexts and appends their activations to one cache run."""

    def __init__(self, workspace: Workspace, loaded: LoadedModel, corpus: Corpus, request: CacheRequest):
        validate_request(loaded, request)
        self.ws = workspace
        self.loaded = loaded
        self.corpus = corpus
        self.request = request
        self.stop_at = stop_layer(request.hooks, loaded.model.cfg.n_layers)
        self.end_hooks = end_after(loaded.model, request.hooks)  # a last-block hook: end there, skip the unembedding
        self.transactions = 0  # transactions the last run() committed
        self.tail_s = 0.0  # seconds of the last run() after its last batch was handed to the writer (last commit, checkpoint)

    # -- run bookkeeping -------------------------------------------------------------------
    def _corpus_id(self) -> int:
        fingerprint = corpus_fingerprint(self.corpus)
        spec = f"{self.request.corpus}#{fingerprint}"
        row = fetch_one(self.ws.con, "SELECT corpus_id FROM corpora WHERE spec = ?", [spec])
        if row:
            return int(row[0])
        return int(
            fetch_one(self.ws.con, 
                "INSERT INTO corpora (spec, n_documents) VALUES (?, ?) RETURNING corpus_id",
                [spec, len(self.corpus.documents)],
            )[0]
        )

    def _identity(self) -> dict:
        """The request's identity plus the model's precision when it is not float32: a run cached by a
        bfloat16 model (``--model-dtype auto`` on CUDA) is another run than the float32 one, so a
        resume on another device never mixes the two (float32 runs keep the identity they always had)."""
        fields = self.request.identity()
        model_dtype = str(next(self.loaded.model.parameters()).dtype).removeprefix("torch.")
        if model_dtype != "float32":
            fields["model_dtype"] = model_dtype
        return fields

    def _find_or_create_run(self, corpus_id: int, store_url: str | None = None) -> int:
        """The run of this request (resumed or extended), or a new one; a run keeps the store it
        was started with (``store_url``: the Parquet store's root for a new parquet run)."""
        identity = json.dumps(self._identity(), sort_keys=True)
        req = self.request
        row = fetch_one(self.ws.con,
            "SELECT run_id, n_contexts_target, status, store, store_url FROM runs WHERE kind = 'cache' AND config = ?::JSON",
            [identity])
        if row:
            run_id, target, status, store, url = int(row[0]), int(row[1]), row[2], row[3] or "duckdb", row[4]
            if store != req.store:
                where = f" at {url}" if url else ""
                raise CacheError(f"run {run_id} of this request keeps its activations in {store}{where}; one run cannot mix stores: "
                                 f"rerun with --store {store}, or change the request (e.g. --seed) to start another run")
            if req.shards is not None and store_url != url:
                raise CacheError(f"run {run_id} keeps its shards at {url}, not {req.shards}; rerun with --shards {url} or without --shards")
            if self.request.n_contexts > target or status != "done":  # extended or resumed; earlier failure cleared
                self.ws.con.execute(
                    "UPDATE runs SET n_contexts_target = ?, status = 'running', error = NULL WHERE run_id = ?",
                    [max(target, self.request.n_contexts), run_id],
                )
            return run_id
        run_id = int(
            fetch_one(self.ws.con,
                """INSERT INTO runs (kind, model, corpus_id, ctx_len, seed, n_contexts_target, dtype, config, status,
                                     store, store_url, chunk_contexts)
                   VALUES ('cache', ?, ?, ?, ?, ?, ?, ?::JSON, 'running', ?, ?, ?) RETURNING run_id""",
                [req.model, corpus_id, req.ctx_len, req.seed, req.n_contexts, req.dtype, identity, req.store, store_url,
                 req.chunk_contexts if req.store == "parquet" else None],
            )[0]
        )
        d_model = self._hook_dims()
        self.ws.con.executemany(
            "INSERT INTO run_hooks VALUES (?, ?, ?)", [[run_id, hook, d_model[hook]] for hook in req.hooks]
        )
        return run_id

    def _hook_dims(self) -> dict[str, int]:
        capture = Capture(self.request.hooks)
        probe = torch.zeros(1, 2, dtype=torch.long, device=self.loaded.model.cfg.device)
        with torch.inference_mode(), attached(self.loaded.model, capture.hooks() + self.end_hooks):
            self.loaded.model(probe, stop_at_layer=self.stop_at)
        for hook, value in capture.latest.items():
            if value.dim() != 3:
                raise CacheError(f"hook '{hook}' gives shape {list(value.shape)}; only [batch, pos, d] hooks can be cached")
        return {hook: int(value.shape[-1]) for hook, value in capture.latest.items()}

    def _store_vocab(self) -> None:
        name = self.request.model
        if fetch_one(self.ws.con, "SELECT count(*) FROM vocab WHERE tokenizer = ?", [name])[0]:
            return
        strings = token_strings(self.loaded.tokenizer)
        rows = pa.table({"tokenizer": [name] * len(strings), "token_id": np.arange(len(strings), dtype=np.int32), "token": strings})
        insert_arrow(self.ws.con, "vocab", rows)

    # -- the job ---------------------------------------------------------------------------
    def forward(self, capture: Capture, batch: list, **where) -> HostBatch:
        """One forward pass over a batch of contexts (the hooks of ``capture`` attached), handed
        over for the writer; ``where``: the shard chunk fields of ``HostBatch``."""
        tokens = _to_device(torch.tensor([c.token_ids for c in batch]), self.loaded.model.cfg.device)  # [B, L]
        with torch.inference_mode():
            self.loaded.model(tokens, stop_at_layer=self.stop_at)
            acts, ready = to_host({hook: capture.latest[hook] for hook in self.request.hooks}, self.request.dtype)
        return HostBatch(batch, acts, ready, **where)

    def run(self, progress: bool = True) -> CacheSummary:
        req = self.request
        with self.ws.transaction():
            corpus_id = self._corpus_id()
            run_id = self._find_or_create_run(corpus_id)
            self._store_vocab()
        done = fetch_one(self.ws.con, "SELECT count(*) FROM contexts WHERE run_id = ?", [run_id])[0]
        target = fetch_one(self.ws.con, "SELECT n_contexts_target FROM runs WHERE run_id = ?", [run_id])[0]
        stored_docs = {
            r[0] for r in self.ws.con.execute("SELECT doc_id FROM documents WHERE corpus_id = ?", [corpus_id]).fetchall()
        }

        contexts = chunk_and_tokenize(self.corpus.documents, self.loaded.tokenizer, req.ctx_len, seed=req.seed, max_contexts=target)
        remaining = (c for c in contexts if c.index >= done)
        bar = tqdm(
            total=target * req.ctx_len, initial=done * req.ctx_len, unit="tok", unit_scale=True,
            desc=f"caching run {run_id}", disable=not progress, dynamic_ncols=True,
        )
        capture = Capture(req.hooks)
        written, shown = done, done  # contexts forwarded / shown as committed
        # The writer thread owns the database from here until it has finished (see workbench.cache_writer).
        with self.ws.job("runs", run_id), bar, attached(self.loaded.model, capture.hooks() + self.end_hooks), \
                bulk_blob_settings(self.ws.con):
            writer = CacheWriter(DuckDBSink(self.ws.con, run_id=run_id, corpus_id=corpus_id, corpus=self.corpus, dtype=req.dtype,
                                            ctx_len=req.ctx_len, commit_contexts=req.commit_contexts, stored_docs=stored_docs,
                                            insert=insert_arrow))
            with writer:
                for batch in _batches(remaining, req.batch_size):
                    writer.put(self.forward(capture, batch))
                    written += len(batch)
                    shown = _show(bar, done + writer.committed, shown, req.ctx_len)
                handed = time.perf_counter()
            _show(bar, done + writer.committed, shown, req.ctx_len)
        with self.ws.transaction() as con:
            con.execute(
                "UPDATE runs SET status = 'done', n_contexts_target = ?, finished_at = current_timestamp WHERE run_id = ?",
                [written, run_id],
            )
        summary = CacheSummary(
            run_id=run_id,
            hooks=req.hooks,
            n_contexts=written,
            n_tokens=written * req.ctx_len,
            resumed_from=done,
            bytes_per_token=stored_bytes_per_token(self.ws, run_id),
        )
        self.transactions, self.tail_s = writer.transactions, time.perf_counter() - handed
        return summary


def _show(bar, committed: int, shown: int, ctx_len: int) -> int:
    """Advance the progress bar to the committed contexts (what a kill would keep)."""
    if committed > shown:
        bar.update((committed - shown) * ctx_len)
    return max(committed, shown)


def stored_bytes_per_token(ws: Workspace, run_id: int) -> float:
    """Activation bytes per cached token and hook (2 × d when stored at 2 bytes per dimension)."""
    row = fetch_one(ws.con, 
        "SELECT sum(octet_length(data)), count(DISTINCT hook) FROM activations WHERE run_id = ?", [run_id]
    )
    n_tokens = fetch_one(ws.con, "SELECT count(*) FROM tokens JOIN contexts USING (context_id) WHERE run_id = ?", [run_id])[0]
    if not row[0] or not n_tokens:
        return 0.0
    return float(row[0]) / n_tokens / row[1]


def run_cache(*, db: str | Path, model: str, hooks: Sequence[str], corpus: str, tokens: int, ctx: int = 128,
              batch: int = 16, seed: int = 0, dtype: str = "float16", device: str | None = None, progress: bool = True,
              commit_contexts: int = 128, model_dtype: str | None = None, store: str = "duckdb", shards: str | None = None):
    """Cache ``tokens`` tokens of ``corpus`` at ``hooks`` of ``model`` into workspace ``db`` (created if
    missing; a rerun of the same request resumes). See ``cache``."""
    request = CacheRequest(model=model, hooks=tuple(hooks), corpus=corpus, tokens=tokens, ctx_len=ctx,
                           batch_size=batch, seed=seed, dtype=dtype, commit_contexts=commit_contexts, store=store, shards=shards)
    return cache(db, request, device=device, model_dtype=model_dtype, progress=progress)


def cache(db: str | Path, request: CacheRequest, *, device: str | None = None, model_dtype: str | None = None,
          progress: bool = True) -> CacheSummary:
    """Run ``request`` into workspace ``db`` with the model on ``device`` in ``model_dtype`` (None:
    auto, ``workbench.devices``). Everything is checked first, cheap checks before the model loads,
    so bad input fails fast and writes nothing."""
    from workbench.data import load_corpus
    from workbench.distributed import world
    from workbench.models import load_model

    if request.store == "parquet" or world()[1] > 1:
        from workbench.shard_caching import cache_sharded

        return cache_sharded(db, request, device=device, model_dtype=model_dtype, progress=progress)
    ensure_writable(db)  # missing folder, read-only, busy, not a workspace: before the model loads
    loaded = load_model(request.model, device=device, dtype=model_dtype)
    validate_request(loaded, request)
    documents = load_corpus(request.corpus)
    with Workspace(db) as ws:
        return ActivationCacher(ws, loaded, documents, request).run(progress=progress)


def _to_device(tokens: torch.Tensor, device) -> torch.Tensor:
    """Token ids to the model's device; to CUDA through pinned memory and ``non_blocking``, so the
    host queues the next forward without waiting for the previous one (a pageable copy would)."""
    device = torch.device(device)
    if device.type != "cuda":
        return tokens.to(device)
    return tokens.pin_memory().to(device, non_blocking=True)
