"""The processes of one job under ``torchrun``: who is rank 0, and how rank 0 shares what it decided.

torchrun starts N copies of the same command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a
rendezvous address in the environment. Only rank 0 opens the DuckDB workspace (DuckDB allows one
writing process per file): it checks the request, decides the work, and sends every rank the same
plan (``share``); the others never touch the database. A bad request found by rank 0 reaches every
rank as the same error, printed once (by rank 0: the others raise ``PeerFailed``, which the CLI
ends quietly with the same exit status). Coordination uses a gloo group (objects, barriers), so
it works on CPUs and beside NCCL's group on GPUs.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch.distributed as dist

from workbench.errors import WorkbenchError

_GROUP = None


class PeerFailed(WorkbenchError):
    """Rank 0 stopped the job; this rank stops with the same exit ``status`` and prints nothing."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RankFailed(Exception):
    """Another rank of this job failed: rank 0 prints ``str(err)`` and every rank exits with ``status``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Failure:
    """An error carried from rank 0 to the others."""

    error: BaseException


def world() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed once it runs, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(backend: str | None = None) -> tuple[int, int]:
    """Join torchrun's process group (``backend``: gloo unless given, e.g. nccl for DDP on GPUs)
    when this process is one of several; returns (rank, world size). Idempotent."""
    global _GROUP
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or "gloo", timeout=datetime.timedelta(minutes=60))
        # torchrun stops the other workers with SIGTERM when one fails: end as Ctrl-C does, so the
        # job's row is marked interrupted and the same command resumes it
        signal.signal(signal.SIGTERM, _interrupted)
    if size > 1 and _GROUP is None:
        _GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return world()


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def share(value: object) -> object:
    """Rank 0's ``value`` on every rank (itself when alone). An exception from rank 0 is raised on
    every rank: as it is on rank 0, as ``PeerFailed`` elsewhere."""
    rank, size = world()
    if size > 1:
        box = [Failure(value) if isinstance(value, BaseException) else value]
        dist.broadcast_object_list(box, src=0, group=_GROUP)
        value = box[0]
    if isinstance(value, Failure):
        value = value.error
    if isinstance(value, BaseException):
        if rank == 0:
            raise value
        from workbench.errors import report

        raise PeerFailed(f"rank 0 stopped the job: {value}", report(value).status)
    return value


def decided_by_rank0(compute) -> object:
    """``compute()`` run on rank 0 alone and its result (or error) shared with every rank, as ``share``."""
    value: object = None
    if world()[0] == 0:
        try:
            value = compute()
        except Exception as err:  # noqa: BLE001 - raised on every rank by share
            value = err
    return share(value)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier(group=_GROUP)


def gather(value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank."""
    size = world()[1]
    if size == 1:
        return [value]
    out: list[object] = [None] * size
    dist.all_gather_object(out, value, group=_GROUP)
    return out
