"""Errors, and the one place that turns any exception into one line for a person.

Every layer raises its own subclass of ``ValueError`` for bad input (``data.CorpusError``,
``saes.SAEError``, ``WorkbenchError`` and its subclasses here); the CLI and the app call
``report(err)`` and show its line. Failures of the machine (disk full, a read-only folder,
memory) get a line too, saying what was kept. Anything else is a bug: its line says so and
``WORKBENCH_DEBUG=1`` brings the traceback back.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

BAD_INPUT, FAILURE = 2, 1  # exit statuses
_DISK_FULL = ("no space left on device", "disk is full", "not enough space", "could not write all bytes")


class WorkbenchError(ValueError):
    """User-facing error: ``str(err)`` is one line naming what is wrong and what is valid."""


class Report(NamedTuple):
    status: int  # BAD_INPUT or FAILURE
    line: str  # one line, without the program's prefix
    bug: bool  # an unexpected exception: worth a traceback under WORKBENCH_DEBUG


def one_line(text: object) -> str:
    """``text`` with every run of white space (newlines included) folded to one space."""
    return " ".join(str(text).split())


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, or its type's name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """The bad-input exception types of every layer."""
    from saes import SAEError
    from workbench.data import CorpusError

    return (WorkbenchError, CorpusError, SAEError)


def report(err: BaseException) -> Report:
    """What to tell a person about ``err``: exit status and one line."""
    if isinstance(err, user_errors()):
        return Report(BAD_INPUT, one_line(err) or type(err).__name__, False)
    text = one_line(err)
    if _is_disk_full(err):
        return Report(FAILURE, "disk full: every batch committed before it is kept and the workspace is consistent; "
                               "free space and run the same command again to resume", False)
    if isinstance(err, MemoryError) or "out of memory" in text.lower():
        return Report(FAILURE, f"out of memory ({text or 'MemoryError'}): use a smaller batch, width or --tokens", False)
    if isinstance(err, PermissionError) or (isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS)):
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        return Report(FAILURE, f"cannot write{where}: {err.strerror or text}; the workspace keeps every committed batch", False)
    if _is_duckdb_error(err):
        return Report(FAILURE, f"database error ({type(err).__name__}): {text}; committed batches are kept", True)
    return Report(FAILURE, f"internal error ({type(err).__name__}: {text}); set WORKBENCH_DEBUG=1 for the traceback", True)


def _is_disk_full(err: BaseException | None) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the exception and what it was raised from
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if any(marker in str(err).lower() for marker in _DISK_FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


def _is_duckdb_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("duckdb") or type(err).__module__.startswith("_duckdb")
