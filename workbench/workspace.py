"""The DuckDB workspace: one database file (plus a folder of SAE weights beside it).

``Workspace`` opens it (creating or migrating the schema of ``workbench/schema.py``), runs
transactions, records failed jobs, and answers the small queries every reader shares. The checks a
writer makes before it loads a model live here too (``ensure_writable``).

Activations are stored one row per (hook, context) as a raw little-endian blob of 2-byte floats:
DuckDB has no 16-bit float type, and whole contexts are what every reader (training, analysis)
consumes. Every write goes through ``transaction()``, so a crash leaves only whole batches.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb

from workbench.errors import WorkbenchError, one_line
from workbench.safety import probe_write
from workbench.schema import JOB_TABLES, MIGRATIONS, SCHEMA_VERSION


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row of a query, with the result fully consumed (DuckDB ≥ 2 requires that
    before the connection runs anything else)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


class WorkspaceError(WorkbenchError):
    """A workspace that cannot be opened or does not hold what was asked for."""


class WorkspaceBusy(WorkspaceError):
    """Another process holds the workspace open for writing."""


class WorkspaceNeedsMigration(WorkspaceError):
    """An older schema, opened read-only: a writer must migrate it first."""


_LOCK_PID = re.compile(r"PID (\d+)")


def _check_place(path: Path, must_exist: bool) -> None:
    """The workspace's folder exists, and ``path`` is a file (or, unless ``must_exist``, free)."""
    if not path.parent.is_dir():
        raise WorkspaceError(f"workspace directory does not exist: {path.parent} (create it first or choose another --db)")
    if must_exist and not path.exists():
        raise WorkspaceError(f"no workspace at {path}: build one with `workbench cache ... --db {path}`")
    if path.exists() and not path.is_file():
        raise WorkspaceError(f"{path} is not a file: --db names a workspace file (*.duckdb)")


def _connect(path: Path, read_only: bool, create: bool = True) -> duckdb.DuckDBPyConnection:
    _check_place(path, must_exist=read_only or not create)
    if not read_only:
        _check_writable(path)
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            pid = _LOCK_PID.search(str(err))
            holder = f" (pid {pid.group(1)})" if pid else ""
            raise WorkspaceBusy(
                f"workspace busy: {path} is open for writing by another process{holder}; wait for it to finish"
            ) from err
        raise WorkspaceError(f"cannot open workspace {path}: {str(err).splitlines()[0]}") from err
    except duckdb.Error as err:
        raise WorkspaceError(f"{path} is not a DuckDB workspace: {str(err).splitlines()[0]}") from err


def _check_writable(path: Path) -> None:
    """DuckDB writes the file and a ``.wal`` beside it; find out now, not at the first commit."""
    try:
        probe_write(path.parent)
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as err:
        raise WorkspaceError(
            f"workspace {path} cannot be written ({err.strerror or err}): DuckDB needs to write the file and a "
            f".wal beside it; choose a writable folder"
        ) from None


def ensure_writable(path: str | Path) -> None:
    """Every check a writer can make before it loads a model: the folder exists and takes files,
    no other process is writing, and an existing file is a workspace this version can open."""
    path = Path(path).expanduser().resolve()
    _check_place(path, must_exist=False)
    _check_writable(path)
    if not path.exists():
        return
    con = _connect(path, read_only=True)
    try:
        _check_version(con, path)
    finally:
        con.close()


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version of an open database; a newer workbench's workspace, or a DuckDB file
    that is not a workspace at all, is refused."""
    if not fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'")[0]:
        tables = fetch_one(con, "SELECT count(*) FROM information_schema.tables")[0]
        if tables:
            raise WorkspaceError(f"{path} is a DuckDB database with {tables} tables but not a workbench workspace "
                                 "(no schema_version table); choose a new file for --db")
        return 0
    version = int(fetch_one(con, "SELECT version FROM schema_version")[0])
    if version > SCHEMA_VERSION:
        raise WorkspaceError(f"{path} has schema version {version}, newer than this workbench's {SCHEMA_VERSION}: "
                             "upgrade the workbench to open it")
    return version


class Workspace:
    """A connection to one workspace file; use as a context manager to close it."""

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True):
        """Open (``create``: or create) the workspace at ``path``; an older schema is migrated
        unless ``read_only``."""
        self.path = Path(path).expanduser().resolve()
        self.read_only = read_only
        self.con = _connect(self.path, read_only, create)
        try:
            self._check_or_migrate()
        except Exception:
            self.con.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def weights_dir(self) -> Path:
        """Folder beside the database for SAE weight files (SAELens layout)."""
        return self.path.with_suffix(".saes")

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All statements inside commit together or not at all."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    @contextmanager
    def job(self, table: str, key: int) -> Iterator[None]:
        """Work on the row ``key`` of a job table (``JOB_TABLES``); if the work raises, the row
        is marked ``failed`` with a one-line reason (a rerun resumes it). Committed batches
        stay; if the database itself can no longer be written (disk full), the row keeps its
        status and the original error propagates."""
        column = JOB_TABLES[table]
        try:
            yield
        except BaseException as err:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {one_line(err)}"
            try:
                self.con.execute(f"UPDATE {table} SET status = 'failed', error = ? WHERE {column} = ?", [reason[:500], key])
            except duckdb.Error:
                pass
            raise

    def file_bytes(self) -> tuple[int, int]:
        """(bytes in the database file, bytes in its write-ahead log not yet checkpointed)."""
        wal = wal_path(self.path)
        return self.path.stat().st_size, wal.stat().st_size if wal.exists() else 0

    # -- schema ----------------------------------------------------------------------------
    def schema_version(self) -> int:
        return _check_version(self.con, self.path)

    def _check_or_migrate(self) -> None:
        version = self.schema_version()
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise WorkspaceNeedsMigration(
                f"{self.path} has schema version {version}; open it once for writing to migrate it to {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as con:
                con.execute(MIGRATIONS[target])
                con.execute("UPDATE schema_version SET version = ?", [target])

    # -- small queries shared by readers ---------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def runs(self) -> list[dict]:
        """Every run with its model, corpus (spec without its fingerprint), context length, status and size."""
        rows = self.query(
            """SELECT r.run_id, r.kind, r.model, c.spec, r.ctx_len, r.status,
                      (SELECT count(*) FROM contexts x WHERE x.run_id = r.run_id), r.error
               FROM runs r JOIN corpora c USING (corpus_id) ORDER BY r.run_id"""
        )
        keys = ("run", "kind", "model", "corpus", "ctx_len", "status", "contexts", "error")
        return [dict(zip(keys, row), corpus=row[3].split("#")[0], tokens=row[6] * row[4]) for row in rows]

    def run_model(self, run_id: int) -> str:
        """The model (alias, folder or hub id) that cached run ``run_id``."""
        row = fetch_one(self.con, "SELECT model FROM runs WHERE run_id = ?", [run_id])
        if row is None:
            raise WorkspaceError(f"no run {run_id} in {self.path.name}")
        return row[0]

    def cached_hooks(self) -> list[tuple[int, str, str, int, int]]:
        """(run_id, model, hook, d, contexts stored) for every hook with stored activations."""
        return self.query(
            """
            SELECT h.run_id, r.model, h.hook, h.d,
                   CASE WHEN r.store = 'parquet'
                        THEN (SELECT coalesce(sum(s.n_contexts), 0) FROM shards s WHERE s.run_id = h.run_id AND s.hook = h.hook)
                        ELSE (SELECT count(*) FROM activations a WHERE a.run_id = h.run_id AND a.hook = h.hook) END
            FROM run_hooks h JOIN runs r USING (run_id)
            ORDER BY h.run_id, h.hook
            """
        )

    def resolve_hook_run(self, hook: str, run_id: int | None = None) -> int:
        """The cache run holding ``hook``; errors name the cached hooks when it is missing or ambiguous."""
        rows = [r for r in self.cached_hooks() if r[2] == hook and (run_id is None or r[0] == run_id) and r[4] > 0]
        if not rows:
            available = sorted({f"{r[2]} (run {r[0]})" for r in self.cached_hooks() if r[4] > 0})
            listing = ", ".join(available) if available else "none yet: run `workbench cache` first"
            raise WorkspaceError(f"hook '{hook}' is not cached in {self.path.name}; cached: {listing}")
        if len(rows) > 1:
            runs = ", ".join(str(r[0]) for r in rows)
            raise WorkspaceError(f"hook '{hook}' is cached by several runs ({runs}); choose one with --run")
        return rows[0][0]


@dataclass(frozen=True)
class SAERecord:
    """A finished SAE (or codebook) of the workspace: its row in ``saes``."""

    sae_id: int
    name: str
    run_id: int
    hook: str
    arch: str
    width: int
    d_in: int
    path: Path


def resolve_sae(ws: Workspace, ref: str | int) -> SAERecord:
    """An SAE of the workspace by name or id (or the ``saelens:RELEASE/SAE_ID`` it was registered from);
    the error lists the available ones."""
    if isinstance(ref, str) and ref.startswith("saelens:"):
        from workbench.pretrained import resolve_registered

        return resolve_registered(ws, ref)
    rows = ws.query(
        "SELECT sae_id, name, run_id, hook, arch, width, d_in, path FROM saes "
        "WHERE status = 'done' AND (name = ? OR CAST(sae_id AS VARCHAR) = ?)",
        [str(ref), str(ref)],
    )
    if not rows:
        names = [f"{i}:{n}" for i, n in ws.query("SELECT sae_id, name FROM saes WHERE status = 'done' ORDER BY sae_id")]
        listing = ", ".join(names) if names else "none: train one with `workbench train`"
        raise WorkspaceError(f"no SAE '{ref}' in {ws.path.name}; available: {listing}")
    sae_id, name, run_id, hook, arch, width, d_in, path = rows[0]
    return SAERecord(int(sae_id), name, int(run_id), hook, arch, int(width), int(d_in), Path(path))


def wal_path(path: str | Path) -> Path:
    """DuckDB's write-ahead log beside a database file."""
    return Path(str(path) + ".wal")


def change_stamp(path: str | Path) -> tuple[int, int]:
    """Modification times (ns) of a workspace's database file and its write-ahead log, 0 for a missing one:
    equal stamps mean an unchanged workspace, so callers key their caches of its contents on it."""
    out = []
    for file in (Path(path), wal_path(path)):
        try:
            out.append(file.stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)
