"""The data path behind ``iter_activations``: blocks read ahead on a thread, batches made on the device.

    reader thread (host)                                   consumer's thread (target device)
    ----------------------------------------------------   ------------------------------------------
    context ids of block k   -> DuckDB -> Arrow blobs       block k: data.to(device, non_blocking)
    viewed as [rows, d] in the storage dtype (no copy;      per batch: data.index_select(0, idx).float()
      one copy into pinned memory when the target is CUDA)  rows carried over open the next batch
    its shuffled row order (CPU generator) -> index [n]
    -> bounded queue (``prefetch`` blocks)  ------------->

The host never makes a float32 copy; conversion and shuffle happen where the batch is used, and
nothing on the device side reads a value back (no ``item``, no data-dependent shapes).

Order is exactly that of the first implementation, so a trainer resuming from a checkpoint sees
the same batches: epoch ``e`` shuffles the units (contexts in DuckDB, row groups of Parquet
shards) with ``random.Random(seed + e)``, reads them ``per_read`` at a time, and permutes each
block's selected rows with ``torch.randperm`` on a CPU generator seeded ``seed + e``; rows left
after the last whole batch of a block start the next one. Under DDP each rank reads a disjoint
slice of every epoch's order (``block_order``), and every rank yields the same number of batches
(``batches_per_rank``), so no rank waits for another at the end.

The thread stops when the consumer closes the iterator, drops it, or breaks out of a loop over it
(a stop flag, then a join); an exception on the thread is raised again in the consumer.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from workbench.storage import SERIAL_ELEMENTS

_POLL_S = 0.05


def target_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``: "auto" (or None), cpu, meta and cuda[:N] through
    ``saes.resolve_device`` (checked, one-line errors); anything else ``torch.device`` accepts."""
    from saes.devices import DEVICE_PATTERN, resolve_device

    spec = "auto" if device is None else str(device).strip().lower()
    if DEVICE_PATTERN.match(spec):
        return resolve_device(spec)
    return torch.device(device)


@dataclass
class Block:
    """One buffer of whole contexts as stored, with the order its rows are served in."""

    data: torch.Tensor  # [n_contexts * ctx_len, d] storage dtype, host memory: the Arrow buffer itself, or pinned for CUDA
    index: torch.Tensor  # [n_rows] int64 row numbers of ``data``, shuffled; BOS rows left out when asked


@dataclass
class _Failed:
    error: BaseException


_END = object()


class Prefetcher:
    """Runs ``produce(put)`` on a daemon thread; ``put(item)`` blocks while ``depth`` items wait and
    returns False once the consumer has stopped (``produce`` should then return). Iterating yields
    the items in order and re-raises the thread's exception; ``close()`` stops and joins the thread."""

    def __init__(self, produce: Callable[[Callable[[object], bool]], None], depth: int, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce: Callable[[Callable[[object], bool]], None]) -> None:
        try:
            produce(self._put)
            self._put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failed(err))

    def __iter__(self) -> Iterator[object]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{self._thread.name} thread ended without a result") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the thread (it finishes the block in hand, then exits) and wait for it."""
        self._stop.set()
        while True:  # free a put that is waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


def block_order(units: Sequence, *, seed: int, epochs: int, per_read: int, weights: Sequence[int] | None = None,
                rank: int = 0, world: int = 1) -> Iterator[tuple[int, list]]:
    """(epoch, units of one block) in reading order: each epoch a new seeded shuffle of ``units``
    (context ids, or row groups of shards). With ``world`` > 1, rank ``rank`` reads its slice of
    each epoch's shuffled order: the units whose first token (by ``weights``, tokens per unit;
    1 each by default) falls in [rank·T/world, (rank+1)·T/world), so the ranks' slices are disjoint,
    cover the epoch and differ in size by at most one unit."""
    for epoch in range(epochs):
        order = list(units)
        random.Random(seed + epoch).shuffle(order)
        if world > 1:
            order = [order[i] for i in rank_slice(_shuffled_weights(weights, len(units), seed + epoch), rank, world)]
        for start in range(0, len(order), per_read):
            yield epoch, order[start : start + per_read]


def _shuffled_weights(weights: Sequence[int] | None, n: int, seed: int) -> list[int]:
    """``weights`` in the order ``random.Random(seed).shuffle`` puts a list of ``n`` items (it
    permutes positions whatever the items are)."""
    shuffled = list(weights) if weights is not None else [1] * n
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _owners(weights: Sequence[int], world: int) -> np.ndarray:
    """[n] the rank of each item: ⌊start · world / total⌋, start = the tokens before it (integers, no rounding)."""
    w = np.asarray(weights, dtype=np.int64)
    starts = np.cumsum(w) - w
    return starts * world // max(1, int(w.sum()))


def rank_slice(weights: Sequence[int], rank: int, world: int) -> range:
    """Positions of ``rank``'s slice of items with these ``weights`` (see ``block_order``); contiguous,
    since owners never decrease along the order."""
    mine = np.flatnonzero(_owners(weights, world) == rank)
    return range(int(mine[0]), int(mine[-1]) + 1) if len(mine) else range(0)


def rank_tokens(weights: Sequence[int], *, seed: int, epochs: int, world: int) -> np.ndarray:
    """[world] the tokens each rank reads over ``epochs`` (``weights``: tokens per unit)."""
    totals = np.zeros(world, dtype=np.int64)
    for epoch in range(epochs):
        shuffled = _shuffled_weights(weights, len(weights), seed + epoch)
        totals += np.bincount(_owners(shuffled, world), weights=shuffled, minlength=world).astype(np.int64)
    return totals


def batches_per_rank(weights: Sequence[int], *, seed: int, epochs: int, world: int, batch_size: int) -> int:
    """How many whole batches every rank can yield: the least over ranks of its tokens (all epochs) // batch_size."""
    return int(rank_tokens(weights, seed=seed, epochs=epochs, world=world).min()) // batch_size


def epochs_for(weights: Sequence[int], *, seed: int, world: int, batch_size: int, batches: int, limit: int = 100_000) -> int:
    """The fewest epochs after which every rank can yield ``batches`` batches (each rank's share of an
    epoch differs by up to a unit, so the least rank sets the pace). Raises ValueError when some
    rank would get nothing (fewer units than ranks, or one unit outweighing the rest) or ``limit``
    epochs would not do."""
    if len(weights) < world:
        raise ValueError(f"{len(weights)} units cannot feed {world} ranks")
    totals = np.zeros(world, dtype=np.int64)
    for epoch in range(limit):
        shuffled = _shuffled_weights(weights, len(weights), seed + epoch)
        totals += np.bincount(_owners(shuffled, world), weights=shuffled, minlength=world).astype(np.int64)
        if int(totals.min()) // batch_size >= batches:
            return epoch + 1
        if epoch == 15 and int(totals.min()) == 0:
            break
    raise ValueError(f"some of {world} ranks get too little data from these {len(weights)} units")


def shuffled_index(n_contexts: int, ctx_len: int, skip: int, generator: torch.Generator, rows: np.ndarray) -> torch.Tensor:
    """[n_contexts * (ctx_len - skip)] int64 row numbers of a stored block: the selected positions
    (``skip`` onwards) of the block's contexts in the order ``torch.randperm`` gives their flattened
    [n_contexts, ctx_len - skip] selection. ``rows[i]``: where context i of the block sits in the
    stored data (the database returns them in its own order)."""
    kept = ctx_len - skip
    perm = torch.randperm(n_contexts * kept, generator=generator).numpy()  # arithmetic in NumPy: one core, no OpenMP team
    return torch.from_numpy(rows[perm // kept] * ctx_len + perm % kept + skip)


def _pinned(data: torch.Tensor) -> torch.Tensor:
    """A page-locked copy (what ``non_blocking`` host-to-CUDA copies need), copied by NumPy on this thread."""
    out = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    out.view(torch.int16).numpy()[...] = data.view(torch.int16).numpy()
    return out


def read_blocks(read: Callable[[list], tuple[torch.Tensor, np.ndarray]], units: Sequence, *, ctx_len: int, seed: int,
                epochs: int, per_read: int, skip: int, pin: bool, weights: Sequence[int] | None = None, rank: int = 0,
                world: int = 1) -> Callable[[Callable[[object], bool]], None]:
    """The reader thread's job: ``read(units)`` gives a block as stored, [n * ctx_len, d] in the
    storage dtype (any context order), and the context slot in it of each selected context; each
    block is put (pinned when ``pin``) with its shuffled index. ``block_order`` says which units
    this rank reads."""

    def produce(put: Callable[[object], bool]) -> None:
        generator, current = torch.Generator(), None
        for epoch, chunk in block_order(units, seed=seed, epochs=epochs, per_read=per_read, weights=weights, rank=rank, world=world):
            if epoch != current:
                generator.manual_seed(seed + epoch)
                current = epoch
            data, rows = read(chunk)
            index = shuffled_index(len(rows), ctx_len, skip, generator, rows)
            if not put(Block(_pinned(data), index.pin_memory()) if pin else Block(data, index)):
                return

    return produce


def gather_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``data[index]`` as float32 [len(index), d], on ``data``'s device.

    On the CPU the work goes in slices below torch's parallel grain (32,768 elements), so each op
    runs on the calling core: with an OpenMP team of 2 on a busy 2-core machine the same gather
    ran 7x slower (threads waiting at barriers), and one core already outruns a CPU trainer.
    Elsewhere it is one ``index_select`` and one conversion per batch."""
    if data.device.type != "cpu":
        return data.index_select(0, index).float()
    out = torch.empty((index.shape[0], data.shape[1]), dtype=torch.float32)
    step = max(1, SERIAL_ELEMENTS // max(1, data.shape[1]))
    for i in range(0, index.shape[0], step):
        out[i : i + step].copy_(data.index_select(0, index[i : i + step]))
    return out


def device_batches(blocks: Iterator[Block], batch_size: int, device: torch.device, drop_last: bool) -> Iterator[torch.Tensor]:
    """float32 [batch_size, d] batches on ``device``: each block moved there as stored, each batch
    gathered by its slice of the shuffled index and converted there. Rows left after a block's last
    whole batch open the next one; the final remainder is yielded only when not ``drop_last``.
    (``prefetched_batches`` stops after ``limit`` batches when given.)"""
    carry: torch.Tensor | None = None  # [r < batch_size, d] float32 on device
    for block in blocks:
        data = block.data.to(device, non_blocking=True)  # [rows, d] storage dtype
        index = block.index.to(device, non_blocking=True)  # [n] int64
        n, start = index.shape[0], 0
        if carry is not None:
            need = batch_size - carry.shape[0]
            head = gather_rows(data, index[:need])  # [min(need, n), d]
            if n < need:
                carry = torch.cat([carry, head])
                continue
            yield torch.cat([carry, head])
            carry, start = None, need
        stop = start + (n - start) // batch_size * batch_size
        for i in range(start, stop, batch_size):
            yield gather_rows(data, index[i : i + batch_size])  # [batch_size, d]
        if stop < n:
            carry = gather_rows(data, index[stop:])
    if not drop_last and carry is not None and carry.shape[0]:
        yield carry


def prefetched_batches(produce: Callable[[Callable[[object], bool]], None], *, batch_size: int, device: torch.device,
                       drop_last: bool, prefetch: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """``device_batches`` over blocks from a ``Prefetcher`` running ``produce``, at most ``limit``
    of them (None: all); the thread is stopped and joined however the iteration ends (exhausted,
    closed, dropped, or raising)."""
    reader = Prefetcher(produce, depth=prefetch, name="activation-reader")
    try:
        batches = device_batches(iter(reader), batch_size, device, drop_last)
        yield from batches if limit is None else itertools.islice(batches, limit)
    finally:
        reader.close()
