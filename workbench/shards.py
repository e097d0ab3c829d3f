"""Parquet shards: the activation store of large and multi-process caches, local or on object storage.

Layout under the store's root URL (a folder, ``file://``, ``s3://``, ``gs://``, …)::

    ROOT/run_id=R/hook=H/chunk-CCCCCC.parquet

Chunk c of a run holds the contexts whose index in the seeded stream lies in [c·C, min((c+1)·C, N))
(C: the run's ``chunk_contexts``, N: its target), in index order, one row per token::

    context_id int64   position int16   token_id int32   doc_id int32
    activation fixed_size_list<float16>[d]      (bfloat16 caches: the bits as uint16; the field's
                                                 metadata says dtype=bfloat16, Parquet has no bfloat16)

Row groups hold G = max(1, ROW_GROUP_TOKENS // L) contexts (L: the context length), so context i
is in chunk i // C, row group (i mod C) // G, rows L·((i mod C) mod G) onwards: readers find any
context by arithmetic, without reading a footer first.

Publishing is atomic: a chunk is written under a ``.tmp-…`` name beside its final one and moved there
once complete (a rename on a file system; on object storage the copy appears whole or not at all).
A chunk is named by its index, never by the process that wrote it, and the files carry no time
or rank, so a rerun with any number of processes skips the published chunks and writes the others
byte for byte as one process would. The workspace's ``shards`` table (written by rank 0 only)
lists the published files with their sizes; a listed file that went missing or changed size is
reported by readers in one line, and the next ``workbench cache`` rewrites it.
"""

from __future__ import annotations

import os
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from workbench.cache_writer import CONTEXT_ID_SHIFT, HostBatch, storage_bits
from workbench.errors import WorkbenchError, first_line

ROW_GROUP_TOKENS = 1024  # tokens per row group: the unit a reader fetches and shuffles
TMP_PREFIX = ".tmp-"
_META = b"workbench"
_INDEX_MASK = (1 << CONTEXT_ID_SHIFT) - 1


class ShardError(WorkbenchError):
    """A shard store that cannot be reached, or a shard that is missing, truncated or not ours."""


# -- where shards live -----------------------------------------------------------------------
@dataclass
class Store:
    """A shard store: a pyarrow file system and the root path in it; ``url`` as the user gave it."""

    url: str
    fs: pafs.FileSystem
    root: str

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def where(self, relative: str = "") -> str:
        """``relative`` under the store as a person reads it: the URL without its query (endpoint options)."""
        base = self.url.split("?", 1)[0].rstrip("/")
        return f"{base}/{relative}" if relative else base

    def listing(self, folder: str) -> dict[str, int]:
        """{file name: bytes} of one folder under the root ({} when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        except OSError as err:
            raise ShardError(f"cannot list {self.where(folder)}: {first_line(err)}") from None
        return {info.base_name: int(info.size or 0) for info in infos if info.type == pafs.FileType.File}

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except (OSError, FileNotFoundError):
            pass


def _s3(parsed: urllib.parse.ParseResult) -> tuple[pafs.FileSystem, str]:
    """An S3 file system that fails fast when the endpoint does not answer. The query string takes
    pyarrow's ``endpoint_override``, ``scheme`` and ``region``; ``AWS_ENDPOINT_URL`` works too."""
    query = dict(urllib.parse.parse_qsl(parsed.query))
    unknown = sorted(set(query) - {"endpoint_override", "scheme", "region"})
    if unknown:
        raise ShardError(f"unknown option '{unknown[0]}' in the store URL; valid: endpoint_override, scheme, region")
    endpoint = query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    scheme = query.get("scheme")
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    options = dict(connect_timeout=2.0, request_timeout=20.0, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
                   region=query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    if endpoint:
        options["endpoint_override"] = endpoint
    if scheme:
        options["scheme"] = scheme
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")


def open_store(url: str | Path) -> Store:
    """The store at ``url``: a local folder (absolute or relative), ``file://``, ``s3://bucket/prefix``
    or any URL pyarrow knows (``gs://``, ``hdfs://``). Checks that it answers, in seconds."""
    text = str(url)
    parsed = urllib.parse.urlparse(text)
    try:
        if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a path (a drive letter is not a scheme)
            local = Path(parsed.path if parsed.scheme == "file" else text).expanduser().resolve()
            fs, root, text = pafs.LocalFileSystem(), str(local), str(local) if parsed.scheme == "" else text
        elif parsed.scheme == "s3":
            fs, root = _s3(parsed)
        else:
            fs, root = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, ValueError, OSError) as err:
        raise ShardError(f"cannot use '{text}' as a shard store: {first_line(err)}; use a folder, file://, s3:// or gs:// URL") from None
    store = Store(text, fs, root)
    try:
        info = fs.get_file_info(root)
    except OSError as err:
        raise ShardError(f"shard store {text} is unreachable: {first_line(err)}") from None
    if info.type == pafs.FileType.File:
        raise ShardError(f"shard store {text} is a file; give a folder or a bucket prefix")
    return store


# -- what one run's shards look like ---------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """One Parquet run's geometry: everything a process needs to write or read its shards."""

    url: str
    run_id: int
    ctx_len: int
    chunk_contexts: int
    n_contexts: int  # the run's target
    dtype: str
    key: str = ""  # the run's key (``run_key``): in every footer, so files of another run are never taken for this one's

    @property
    def group_contexts(self) -> int:
        return max(1, min(self.chunk_contexts, ROW_GROUP_TOKENS // self.ctx_len))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_contexts // self.chunk_contexts)

    def chunk_range(self, chunk: int) -> range:
        """Stream indices of the contexts of ``chunk``."""
        start = chunk * self.chunk_contexts
        return range(start, min(start + self.chunk_contexts, self.n_contexts))

    def folder(self, hook: str) -> str:
        return f"run_id={self.run_id}/hook={hook}"

    def relative(self, hook: str, chunk: int) -> str:
        return f"{self.folder(hook)}/{chunk_name(chunk)}"


def run_key(run_id: int, created_at: object, identity: str) -> str:
    """A run's key: 16 hex digits of a hash of its id, creation time and identity. Two workspaces
    whose runs share a number (both start at 1), or a deleted workspace's leftover shards, have
    other keys, so their files are never taken for this run's."""
    import hashlib

    return hashlib.sha256(f"{run_id}|{created_at}|{identity}".encode()).hexdigest()[:16]


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.parquet"


def chunk_of_name(name: str) -> int | None:
    if name.startswith("chunk-") and name.endswith(".parquet") and name[6:-8].isdigit():
        return int(name[6:-8])
    return None


def _schema(layout: ShardLayout, hook: str, d: int, chunk: int) -> pa.Schema:
    value = pa.float16() if layout.dtype == "float16" else pa.uint16()
    # Required elements and v2 data pages: list levels are what a reader decodes; these halve them (measured, docs/scaling.md).
    activation = pa.field("activation", pa.list_(pa.field("element", value, nullable=False), d), nullable=False,
                          metadata={"dtype": layout.dtype})
    meta = {"run_id": layout.run_id, "key": layout.key, "hook": hook, "chunk": chunk, "ctx_len": layout.ctx_len, "d": d,
            "dtype": layout.dtype, "first_context": layout.chunk_range(chunk).start}
    return pa.schema([("context_id", pa.int64()), ("position", pa.int16()), ("token_id", pa.int32()), ("doc_id", pa.int32()),
                      activation], metadata={_META: _encode(meta)})


def _encode(meta: dict) -> bytes:
    import json

    return json.dumps(meta, sort_keys=True).encode()


def shard_metadata(store: Store, relative: str) -> dict | None:
    """The workbench metadata of a shard whose footer reads back whole, else None (missing or truncated)."""
    import json

    try:
        with store.fs.open_input_file(store.path(relative)) as f:
            meta = pq.read_metadata(f)
        out = json.loads(meta.metadata[_META])
        out["num_rows"] = meta.num_rows
        return out
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return None


def shard_state(store: Store, layout: ShardLayout, hook: str, chunk: int, d: int) -> str:
    """What the published file of (hook, chunk) is: "valid" (complete, and that chunk of this run),
    "foreign" (a complete shard of another run: never ours to use or to overwrite) or "broken"
    (unreadable, truncated, or written for a target the run no longer has: rewritten by a rerun)."""
    meta = shard_metadata(store, layout.relative(hook, chunk))
    if meta is None:
        return "broken"
    if meta.get("key") != layout.key or meta.get("run_id") != layout.run_id:
        return "foreign"
    expected = len(layout.chunk_range(chunk))
    same = meta.get("hook") == hook and meta.get("chunk") == chunk and meta.get("d") == d and meta.get("ctx_len") == layout.ctx_len
    return "valid" if same and meta.get("num_rows") == expected * layout.ctx_len else "broken"


# -- writing ----------------------------------------------------------------------------------
class ShardSink:
    """A ``CacheWriter`` sink that writes each chunk's batches into one Parquet file per hook and
    publishes them when the chunk's last batch is in (``HostBatch.closes_chunk``)."""

    def __init__(self, store: Store, layout: ShardLayout, dims: dict[str, int], tag: str):
        self.store, self.layout, self.dims, self.tag = store, layout, dims, tag
        self.published: list[tuple[int, dict[str, int]]] = []  # (chunk, {hook: bytes}) in publishing order
        self._chunk: int | None = None
        self._writers: dict[str, tuple[pq.ParquetWriter, object]] = {}
        self._pending: dict[str, list[pa.Table]] = {}
        self._contexts = 0

    def _tmp(self, hook: str) -> str:
        return f"{self.layout.folder(hook)}/{TMP_PREFIX}{self.layout.key}-{self.tag}-{chunk_name(self._chunk)}"

    def begin(self) -> None:
        self._chunk, self._contexts = None, 0

    def _open(self, chunk: int) -> None:
        self._chunk = chunk
        for hook, d in self.dims.items():
            if self.store.fs.type_name == "local":  # object stores have no folders (pyarrow would write marker objects)
                self.store.fs.create_dir(self.store.path(self.layout.folder(hook)), recursive=True)
            stream = self.store.fs.open_output_stream(self.store.path(self._tmp(hook)))
            writer = pq.ParquetWriter(stream, _schema(self.layout, hook, d, chunk), compression="none", use_dictionary=False,
                                      write_statistics=["context_id"], data_page_version="2.0")
            self._writers[hook], self._pending[hook] = (writer, stream), []

    def write(self, batch: HostBatch) -> bool:
        if self._chunk is None:
            self._open(batch.chunk)
        elif batch.chunk != self._chunk:
            raise RuntimeError(f"a batch of chunk {batch.chunk} arrived while chunk {self._chunk} is open")
        L, n = self.layout.ctx_len, len(batch.contexts)
        ids = np.array([(self.layout.run_id << CONTEXT_ID_SHIFT) | c.index for c in batch.contexts], dtype=np.int64)  # [B]
        columns = [pa.array(np.repeat(ids, L)), pa.array(np.tile(np.arange(L, dtype=np.int16), n)),
                   pa.array(np.array([c.token_ids for c in batch.contexts], dtype=np.int32).reshape(-1)),
                   pa.array(np.array([c.doc_ids for c in batch.contexts], dtype=np.int32).reshape(-1))]
        for hook, value in batch.acts.items():
            bits = storage_bits(value, self.layout.dtype, hook).reshape(-1)  # [B * L * d] int16
            kind = pa.float16() if self.layout.dtype == "float16" else pa.uint16()
            flat = pa.Array.from_buffers(kind, bits.size, [None, pa.py_buffer(bits)])
            schema = self._writers[hook][0].schema
            table = pa.Table.from_arrays([*columns, pa.FixedSizeListArray.from_arrays(flat, type=schema.field("activation").type)],
                                         schema=schema)
            self._pending[hook].append(table)
            self._flush(hook, final=False)
        self._contexts += n
        return batch.closes_chunk

    def _flush(self, hook: str, final: bool) -> None:
        """Write the pending rows of ``hook`` in row groups of exactly ``group_contexts`` contexts (the rest at the end)."""
        rows_per_group = self.layout.group_contexts * self.layout.ctx_len
        pending = pa.concat_tables(self._pending[hook]) if self._pending[hook] else None
        if pending is None:
            return
        whole = pending.num_rows // rows_per_group * rows_per_group
        writer = self._writers[hook][0]
        for start in range(0, whole, rows_per_group):
            writer.write_table(pending.slice(start, rows_per_group), row_group_size=rows_per_group)
        rest = pending.slice(whole)
        if final and rest.num_rows:
            writer.write_table(rest, row_group_size=rows_per_group)
            rest = rest.slice(rest.num_rows)
        self._pending[hook] = [rest] if rest.num_rows else []

    def commit(self) -> int:
        sizes = {}
        for hook, (writer, stream) in self._writers.items():
            self._flush(hook, final=True)
            writer.close()
            stream.close()
            final = self.layout.relative(hook, self._chunk)
            self.store.fs.move(self.store.path(self._tmp(hook)), self.store.path(final))
            sizes[hook] = int(self.store.fs.get_file_info(self.store.path(final)).size)
        self.published.append((self._chunk, sizes))
        self._writers, self._pending = {}, {}
        return self._contexts

    def rollback(self) -> None:
        for hook, (writer, stream) in self._writers.items():
            try:
                writer.close()
                stream.close()
            except Exception:  # noqa: BLE001 - a half-written temporary file; removed next
                pass
            self.store.delete(self._tmp(hook))
        self._writers, self._pending = {}, {}

    def close(self) -> None:
        pass


# -- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardHook:
    """What a process needs to read one hook of a Parquet run without the workspace: the layout,
    the hook's width and its published chunks ({chunk: (relative path, bytes)}). Picklable, so rank
    0 can send it to the others under torchrun."""

    layout: ShardLayout
    hook: str
    d: int
    chunks: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # chunk -> (relative path, bytes, contexts)

    def locate(self, index: int) -> tuple[int, int]:
        """(chunk, row group) holding the context of stream index ``index``."""
        chunk, within = divmod(index, self.layout.chunk_contexts)
        return chunk, within // self.layout.group_contexts

    def contexts(self, chunk: int) -> range:
        """Stream indices of the contexts the published file of ``chunk`` holds (the manifest's count,
        not the run's current target: a run being extended keeps reading its old last chunk)."""
        start = chunk * self.layout.chunk_contexts
        return range(start, start + self.chunks[chunk][2])

    def group_range(self, chunk: int, group: int) -> range:
        """Stream indices of the contexts in row group ``group`` of ``chunk``."""
        contexts = self.contexts(chunk)
        start = contexts.start + group * self.layout.group_contexts
        return range(start, min(start + self.layout.group_contexts, contexts.stop))

    def groups(self) -> list[tuple[int, int]]:
        """Every (chunk, row group) of the published chunks, in stream order."""
        G = self.layout.group_contexts
        return [(c, g) for c in sorted(self.chunks) for g in range(-(-len(self.contexts(c)) // G))]


class ShardReader:
    """Reads row groups of one hook's shards as [rows, d] int16 bits; keeps the last ``cache``
    opened files (their footers) so a reader does not re-read a footer per row group."""

    def __init__(self, shard: ShardHook, store: Store | None = None, cache: int = 64):
        self.shard = shard
        self.store = store or open_store(shard.layout.url)
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._cache = cache

    def _file(self, chunk: int) -> pq.ParquetFile:
        if chunk in self._files:
            self._files.move_to_end(chunk)
            return self._files[chunk]
        if chunk not in self.shard.chunks:
            raise ShardError(f"chunk {chunk} of run {self.shard.layout.run_id} is not cached for '{self.shard.hook}'")
        relative, size, _ = self.shard.chunks[chunk]
        where = self.store.where(relative)
        hint = "run the same `workbench cache` command again to rewrite it"
        try:
            info = self.store.fs.get_file_info(self.store.path(relative))
            if info.type != pafs.FileType.File:
                raise ShardError(f"shard {where} is missing; {hint}")
            if info.size != size:
                raise ShardError(f"shard {where} has {info.size} bytes, {size} were written (truncated or replaced); {hint}")
            handle = pq.ParquetFile(self.store.fs.open_input_file(self.store.path(relative)))
        except ShardError:
            raise
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"shard {where} cannot be read ({first_line(err)}); {hint}") from None
        self._files[chunk] = handle
        if len(self._files) > self._cache:
            self._files.popitem(last=False)
        return handle

    def read_group(self, chunk: int, group: int, out: np.ndarray) -> None:
        """Row group ``group`` of ``chunk`` into ``out`` ([rows, d] int16, rows = its contexts × L)."""
        try:
            column = self._file(chunk).read_row_group(group, columns=["activation"]).column(0)
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"shard {self.store.where(self.shard.chunks[chunk][0])} cannot be read ({first_line(err)}); "
                             "run the same `workbench cache` command again to rewrite it") from None
        start = 0
        for piece in column.chunks:
            values = piece.flatten()  # float16 / uint16, offsets applied
            bits = np.frombuffer(values.buffers()[1], dtype=np.int16, count=len(values), offset=values.offset * 2)
            rows = len(values) // self.shard.d
            out[start : start + rows] = bits.reshape(rows, self.shard.d)
            start += rows
        if start != out.shape[0]:
            raise ShardError(f"shard chunk {chunk} row group {group} of '{self.shard.hook}' holds {start} rows, expected {out.shape[0]}")

    def read_contexts(self, indices: list[int]) -> torch.Tensor:
        """[len(indices), L, d] int16 bits of the contexts of these stream indices, in their order;
        each row group is read once."""
        L, d = self.shard.layout.ctx_len, self.shard.d
        out = torch.empty((len(indices), L, d), dtype=torch.int16)
        view = out.numpy()
        by_group: dict[tuple[int, int], list[int]] = {}
        for slot, index in enumerate(indices):
            by_group.setdefault(self.shard.locate(index), []).append(slot)
        for (chunk, group), slots in by_group.items():
            contexts = self.shard.group_range(chunk, group)
            block = np.empty((len(contexts) * L, d), dtype=np.int16)
            self.read_group(chunk, group, block)
            block = block.reshape(len(contexts), L, d)
            for slot in slots:
                view[slot] = block[indices[slot] - contexts.start]
        return out

    def read_groups(self, groups: list[tuple[int, int]]) -> tuple[torch.Tensor, list[range]]:
        """[rows, d] int16 bits of several row groups one after another, and each one's stream indices."""
        L, d = self.shard.layout.ctx_len, self.shard.d
        ranges = [self.shard.group_range(c, g) for c, g in groups]
        out = torch.empty((sum(len(r) for r in ranges) * L, d), dtype=torch.int16)
        view, start = out.numpy(), 0
        for (chunk, group), contexts in zip(groups, ranges):
            rows = len(contexts) * L
            self.read_group(chunk, group, view[start : start + rows])
            start += rows
        return out, ranges


def stream_index(context_id: int) -> int:
    return int(context_id) & _INDEX_MASK
