"""The DuckDB workspace: one database file (plus a folder of SAE weights beside it).

Schema (version 1)::

    schema_version(version)                                    one row
    corpora(corpus_id, spec, n_documents, created_at)
    documents(corpus_id, doc_id, domain, source, text)          only documents that were used
    vocab(tokenizer, token_id, token)                          display strings of the vocabulary
    runs(run_id, kind, model, corpus_id, ctx_len, seed, n_contexts_target, dtype, config, status, ...)
    run_hooks(run_id, hook, d)                                 what a cache run stores
    contexts(context_id, run_id, corpus_context)               corpus_context = index in the seeded stream
    tokens(context_id, position, token_id, doc_id)             doc_id -1: BOS or separator
    activations(run_id, hook, context_id, data)                data: [ctx_len, d] float16/bfloat16 bytes

Version 2 adds the dictionaries trained or loaded on a cached hook::

    saes(sae_id, name, run_id, hook, arch, d_in, width, k, path, config, status, metrics, ...)
    training_log(sae_id, step, tokens, metrics)                metrics: JSON of the trainer's log line

Version 3 adds the sparse feature store and what the feature browser reads::

    analyses(sae_id, n_contexts, contexts_done, n_tokens, status)     progress of `workbench analyze`
    feature_acts(sae_id, context_id, position, feature, value)       every nonzero latent, in context order
    feature_stats(sae_id, feature, n_fired, density, mean_value, max_value, hist_counts)
    feature_examples(sae_id, feature, band, rank, context_id, position, value)   band -1: top examples
    feature_logits(sae_id, feature, rank, token_id, effect)           rank > 0 promoted, < 0 suppressed
    feature_related(sae_id, feature, other, cosine, cooccurrence)      decoder neighbours with Jaccard

Version 5 adds the expert probes (``workbench moe``) and sparse probing (``workbench probe``)::

    moe_runs(moe_run_id, model, architecture, source, layers, n_experts, k, sae, corpus, domains, ...)
    moe_groups(moe_run_id, layer, kind, grouping, grp, tokens, specialised_share, n_specialised, entropy)
    moe_mass(moe_run_id, layer, kind, grouping, grp, expert, mass, freq)       r_{e,d} and f_{e,d}
    moe_experts(moe_run_id, layer, kind, grouping, expert, purity, specialist, freq)
    moe_comparison(moe_run_id, layer, kind, grouping, experts, dead, specialised_share, ...)
    moe_selectivity(moe_run_id, kind, target, measured, n_masked, loss_before, loss_after, delta_loss, selectivity)
    moe_k_curve(moe_run_id, k, grp, loss, dense_loss)                           grp 'all' or a domain
    moe_routes(moe_run_id, layer, row, position, token_id, grp, experts, weights)   per evaluated token
    probe_runs(probe_run_id, sae, hook, dataset, ks, seed, skipped, created_at)   dataset: 'domains' or a texts file
    probe_results(probe_run_id, task, source, k, accuracy, n_train, n_test, split, features)

Version 6 masks by token concept and at matched budgets, and adds Monet's concept purge::

    moe_selectivity(..., grouping, budget, target_pos, measured_pos)   grouping 'domain' | 'concept';
                                                 budget 'skew' | 'matched'; *_pos: the groups' order
    moe_correlation(moe_run_id, kind, layer, concept, expert, rho)     ρ on the fit tokens
    moe_purge(moe_run_id, kind, concept, tau, n_removed, share_removed, concept_loss, other_loss,
              concept_before, other_before)

Version 7 records why a job failed (``status = 'failed'``; a rerun resumes it)::

    runs(..., error)   saes(..., error)   analyses(..., error)

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

from workbench.errors import WorkbenchError

SCHEMA_VERSION = 7

# Migration N takes a workspace from version N-1 to N. Append, never edit.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    INSERT INTO schema_version VALUES (0);
    CREATE SEQUENCE corpus_ids START 1;
    CREATE TABLE corpora (
        corpus_id   INTEGER PRIMARY KEY DEFAULT nextval('corpus_ids'),
        spec        VARCHAR NOT NULL UNIQUE,
        n_documents INTEGER NOT NULL,
        created_at  TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE documents (
        corpus_id INTEGER NOT NULL,
        doc_id    INTEGER NOT NULL,
        domain    VARCHAR NOT NULL,
        source    VARCHAR NOT NULL,
        text      VARCHAR NOT NULL,
        PRIMARY KEY (corpus_id, doc_id)
    );
    CREATE TABLE vocab (
        tokenizer VARCHAR NOT NULL,
        token_id  INTEGER NOT NULL,
        token     VARCHAR NOT NULL,
        PRIMARY KEY (tokenizer, token_id)
    );
    CREATE SEQUENCE run_ids START 1;
    CREATE TABLE runs (
        run_id            INTEGER PRIMARY KEY DEFAULT nextval('run_ids'),
        kind              VARCHAR NOT NULL,
        model             VARCHAR NOT NULL,
        corpus_id         INTEGER NOT NULL,
        ctx_len           INTEGER NOT NULL,
        seed              INTEGER NOT NULL,
        n_contexts_target INTEGER NOT NULL,
        dtype             VARCHAR NOT NULL,
        config            JSON NOT NULL,
        status            VARCHAR NOT NULL,
        created_at        TIMESTAMP DEFAULT current_timestamp,
        finished_at       TIMESTAMP
    );
    CREATE TABLE run_hooks (
        run_id INTEGER NOT NULL,
        hook   VARCHAR NOT NULL,
        d      INTEGER NOT NULL,
        PRIMARY KEY (run_id, hook)
    );
    CREATE TABLE contexts (
        context_id     BIGINT PRIMARY KEY,
        run_id         INTEGER NOT NULL,
        corpus_context INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        context_id BIGINT NOT NULL,
        position   SMALLINT NOT NULL,
        token_id   INTEGER NOT NULL,
        doc_id     INTEGER NOT NULL
    );
    CREATE TABLE activations (
        run_id     INTEGER NOT NULL,
        hook       VARCHAR NOT NULL,
        context_id BIGINT NOT NULL,
        data       BLOB NOT NULL
    );
    """,
    2: """
    CREATE SEQUENCE sae_ids START 1;
    CREATE TABLE saes (
        sae_id      INTEGER PRIMARY KEY DEFAULT nextval('sae_ids'),
        name        VARCHAR NOT NULL UNIQUE,
        run_id      INTEGER NOT NULL,
        hook        VARCHAR NOT NULL,
        arch        VARCHAR NOT NULL,
        d_in        INTEGER NOT NULL,
        width       INTEGER NOT NULL,
        k           INTEGER,
        path        VARCHAR NOT NULL,
        config      JSON NOT NULL,
        status      VARCHAR NOT NULL,
        metrics     JSON,
        created_at  TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP
    );
    CREATE TABLE training_log (
        sae_id  INTEGER NOT NULL,
        step    INTEGER NOT NULL,
        tokens  BIGINT NOT NULL,
        metrics JSON NOT NULL,
        PRIMARY KEY (sae_id, step)
    );
    """,
    3: """
    CREATE TABLE analyses (
        sae_id        INTEGER PRIMARY KEY,
        n_contexts    INTEGER NOT NULL,
        contexts_done INTEGER NOT NULL,
        n_tokens      BIGINT NOT NULL,
        status        VARCHAR NOT NULL
    );
    CREATE TABLE feature_acts (
        sae_id     INTEGER NOT NULL,
        context_id BIGINT NOT NULL,
        position   SMALLINT NOT NULL,
        feature    INTEGER NOT NULL,
        value      REAL NOT NULL
    );
    CREATE TABLE feature_stats (
        sae_id      INTEGER NOT NULL,
        feature     INTEGER NOT NULL,
        n_fired     BIGINT NOT NULL,
        density     DOUBLE NOT NULL,
        mean_value  DOUBLE,
        max_value   DOUBLE,
        hist_counts BIGINT[],
        PRIMARY KEY (sae_id, feature)
    );
    CREATE TABLE feature_examples (
        sae_id     INTEGER NOT NULL,
        feature    INTEGER NOT NULL,
        band       SMALLINT NOT NULL,
        rank       SMALLINT NOT NULL,
        context_id BIGINT NOT NULL,
        position   SMALLINT NOT NULL,
        value      REAL NOT NULL
    );
    CREATE INDEX feature_examples_by_feature ON feature_examples (sae_id, feature);
    CREATE TABLE feature_logits (
        sae_id   INTEGER NOT NULL,
        feature  INTEGER NOT NULL,
        rank     SMALLINT NOT NULL,
        token_id INTEGER NOT NULL,
        effect   REAL NOT NULL
    );
    CREATE INDEX feature_logits_by_feature ON feature_logits (sae_id, feature);
    CREATE TABLE feature_related (
        sae_id       INTEGER NOT NULL,
        feature      INTEGER NOT NULL,
        other        INTEGER NOT NULL,
        cosine       REAL NOT NULL,
        cooccurrence REAL NOT NULL
    );
    CREATE INDEX feature_related_by_feature ON feature_related (sae_id, feature);
    """,
    4: """
    CREATE SEQUENCE sparsity_ids START 1;
    CREATE TABLE sparsity_measurements (
        measurement_id   INTEGER PRIMARY KEY DEFAULT nextval('sparsity_ids'),
        model            VARCHAR NOT NULL,
        series           VARCHAR,
        train_tokens     BIGINT,
        activation       VARCHAR NOT NULL,
        d_model          INTEGER NOT NULL,
        n_layers         INTEGER NOT NULL,
        d_mlp            INTEGER NOT NULL,
        metric           VARCHAR NOT NULL,
        p                DOUBLE,
        knob             DOUBLE,
        ppl_dense        DOUBLE NOT NULL,
        ppl              DOUBLE NOT NULL,
        activation_ratio DOUBLE NOT NULL,
        eval_tokens      BIGINT NOT NULL,
        corpus           VARCHAR NOT NULL,
        created_at       TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE sparsity_layers (
        measurement_id   INTEGER NOT NULL,
        layer            INTEGER NOT NULL,
        activation_ratio DOUBLE NOT NULL,
        threshold        DOUBLE,
        PRIMARY KEY (measurement_id, layer)
    );
    CREATE TABLE sparsity_curve (
        measurement_id   INTEGER NOT NULL,
        knob             DOUBLE NOT NULL,
        ppl              DOUBLE NOT NULL,
        activation_ratio DOUBLE NOT NULL
    );
    CREATE TABLE sparsity_fits (
        series     VARCHAR NOT NULL,
        law        VARCHAR NOT NULL,
        metric     VARCHAR NOT NULL,
        fit        VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (series, law, metric)
    );
    """,
    5: """
    CREATE SEQUENCE moe_run_ids START 1;
    CREATE TABLE moe_runs (
        moe_run_id   INTEGER PRIMARY KEY DEFAULT nextval('moe_run_ids'),
        model        VARCHAR NOT NULL,
        architecture VARCHAR NOT NULL,
        source       VARCHAR NOT NULL,
        layers       INTEGER[] NOT NULL,
        n_experts    INTEGER NOT NULL,
        k            INTEGER NOT NULL,
        sae          VARCHAR,
        corpus       VARCHAR NOT NULL,
        domains      VARCHAR[] NOT NULL,
        eval_tokens  BIGINT NOT NULL,
        balance      VARCHAR NOT NULL,
        config       JSON NOT NULL,
        notices      VARCHAR[] NOT NULL,
        seconds      DOUBLE,
        created_at   TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE moe_groups (
        moe_run_id        INTEGER NOT NULL,
        layer             INTEGER NOT NULL,
        kind              VARCHAR NOT NULL,
        grouping          VARCHAR NOT NULL,
        grp               VARCHAR NOT NULL,
        tokens            BIGINT NOT NULL,
        specialised_share DOUBLE NOT NULL,
        n_specialised     INTEGER NOT NULL,
        entropy           DOUBLE
    );
    CREATE TABLE moe_mass (
        moe_run_id INTEGER NOT NULL,
        layer      INTEGER NOT NULL,
        kind       VARCHAR NOT NULL,
        grouping   VARCHAR NOT NULL,
        grp        VARCHAR NOT NULL,
        expert     INTEGER NOT NULL,
        mass       DOUBLE NOT NULL,
        freq       DOUBLE NOT NULL
    );
    CREATE INDEX moe_mass_by_kind ON moe_mass (moe_run_id, layer, kind, grouping);
    CREATE TABLE moe_experts (
        moe_run_id INTEGER NOT NULL,
        layer      INTEGER NOT NULL,
        kind       VARCHAR NOT NULL,
        grouping   VARCHAR NOT NULL,
        expert     INTEGER NOT NULL,
        purity     DOUBLE,
        specialist VARCHAR,
        freq       DOUBLE NOT NULL
    );
    CREATE TABLE moe_comparison (
        moe_run_id        INTEGER NOT NULL,
        layer             INTEGER NOT NULL,
        kind              VARCHAR NOT NULL,
        grouping          VARCHAR NOT NULL,
        experts           INTEGER NOT NULL,
        dead              INTEGER NOT NULL,
        specialised_share DOUBLE NOT NULL,
        mean_entropy      DOUBLE,
        mean_purity       DOUBLE,
        mi_nats           DOUBLE NOT NULL,
        mi_norm           DOUBLE NOT NULL,
        PRIMARY KEY (moe_run_id, layer, kind, grouping)
    );
    CREATE TABLE moe_selectivity (
        moe_run_id  INTEGER NOT NULL,
        kind        VARCHAR NOT NULL,
        target      VARCHAR NOT NULL,
        measured    VARCHAR NOT NULL,
        n_masked    INTEGER NOT NULL,
        loss_before DOUBLE NOT NULL,
        loss_after  DOUBLE NOT NULL,
        delta_loss  DOUBLE NOT NULL,
        selectivity DOUBLE
    );
    CREATE TABLE moe_k_curve (
        moe_run_id INTEGER NOT NULL,
        k          INTEGER NOT NULL,
        grp        VARCHAR NOT NULL,
        loss       DOUBLE NOT NULL,
        dense_loss DOUBLE NOT NULL
    );
    CREATE TABLE moe_routes (
        moe_run_id INTEGER NOT NULL,
        layer      INTEGER NOT NULL,
        row        INTEGER NOT NULL,
        position   SMALLINT NOT NULL,
        token_id   INTEGER NOT NULL,
        grp        VARCHAR,
        experts    INTEGER[] NOT NULL,
        weights    REAL[] NOT NULL
    );
    CREATE SEQUENCE probe_run_ids START 1;
    CREATE TABLE probe_runs (
        probe_run_id INTEGER PRIMARY KEY DEFAULT nextval('probe_run_ids'),
        sae          VARCHAR NOT NULL,
        hook         VARCHAR NOT NULL,
        dataset      VARCHAR NOT NULL,
        ks           INTEGER[] NOT NULL,
        seed         INTEGER NOT NULL,
        skipped      VARCHAR[] NOT NULL,
        created_at   TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE probe_results (
        probe_run_id INTEGER NOT NULL,
        task         VARCHAR NOT NULL,
        source       VARCHAR NOT NULL,
        k            INTEGER NOT NULL,
        accuracy     DOUBLE NOT NULL,
        n_train      INTEGER NOT NULL,
        n_test       INTEGER NOT NULL,
        split        VARCHAR NOT NULL,
        features     INTEGER[] NOT NULL
    );
    """,
    6: """
    ALTER TABLE moe_selectivity ADD COLUMN grouping VARCHAR DEFAULT 'domain';
    ALTER TABLE moe_selectivity ADD COLUMN budget VARCHAR DEFAULT 'skew';
    ALTER TABLE moe_selectivity ADD COLUMN target_pos INTEGER DEFAULT 0;
    ALTER TABLE moe_selectivity ADD COLUMN measured_pos INTEGER DEFAULT 0;
    CREATE TABLE moe_correlation (
        moe_run_id INTEGER NOT NULL,
        kind       VARCHAR NOT NULL,
        layer      INTEGER NOT NULL,
        concept    VARCHAR NOT NULL,
        expert     INTEGER NOT NULL,
        rho        DOUBLE
    );
    CREATE TABLE moe_purge (
        moe_run_id     INTEGER NOT NULL,
        kind           VARCHAR NOT NULL,
        concept        VARCHAR NOT NULL,
        tau            DOUBLE NOT NULL,
        n_removed      INTEGER NOT NULL,
        share_removed  DOUBLE NOT NULL,
        concept_loss   DOUBLE NOT NULL,
        other_loss     DOUBLE NOT NULL,
        concept_before DOUBLE NOT NULL,
        other_before   DOUBLE NOT NULL
    );
    """,
    7: """
    ALTER TABLE runs ADD COLUMN error VARCHAR;
    ALTER TABLE saes ADD COLUMN error VARCHAR;
    ALTER TABLE analyses ADD COLUMN error VARCHAR;
    """,
}

# The job tables whose rows say 'running' / 'training' while a job works on them: table -> key.
JOB_TABLES = {"runs": "run_id", "saes": "sae_id", "analyses": "sae_id"}


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row of a query, with the result fully consumed (DuckDB ≥ 2 requires that
    before the connection runs anything else)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


class WorkspaceError(WorkbenchError):
    """A workspace that cannot be opened or does not hold what was asked for."""


class WorkspaceBusy(WorkspaceError):
    """Another process holds the workspace open for writing."""


_LOCK_PID = re.compile(r"PID (\d+)")


def _connect(path: Path, read_only: bool, create: bool = True) -> duckdb.DuckDBPyConnection:
    if not path.parent.is_dir():
        raise WorkspaceError(f"workspace directory does not exist: {path.parent} (create it first or choose another --db)")
    if (read_only or not create) and not path.exists():
        raise WorkspaceError(f"no workspace at {path}: build one with `workbench cache ... --db {path}`")
    if path.exists() and not path.is_file():
        raise WorkspaceError(f"{path} is not a file: --db names a workspace file (*.duckdb)")
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
    import tempfile

    try:  # a real write: os.access says yes to root even on a read-only mount
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".workbench-probe-"):
            pass
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
    if not path.parent.is_dir():
        raise WorkspaceError(f"workspace directory does not exist: {path.parent} (create it first or choose another --db)")
    if path.exists() and not path.is_file():
        raise WorkspaceError(f"{path} is not a file: --db names a workspace file (*.duckdb)")
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
        from workbench.errors import one_line

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
        wal = self.path.with_name(self.path.name + ".wal")
        return self.path.stat().st_size, wal.stat().st_size if wal.exists() else 0

    # -- schema ----------------------------------------------------------------------------
    def schema_version(self) -> int:
        return _check_version(self.con, self.path)

    def _check_or_migrate(self) -> None:
        version = self.schema_version()
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise WorkspaceError(
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
                   (SELECT count(*) FROM activations a WHERE a.run_id = h.run_id AND a.hook = h.hook)
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
    """An SAE of the workspace by name or id; the error lists the available ones."""
    rows = ws.query(
        "SELECT sae_id, name, run_id, hook, arch, width, d_in, path FROM saes WHERE status = 'done' AND (name = ? OR CAST(sae_id AS VARCHAR) = ?)",
        [str(ref), str(ref)],
    )
    if not rows:
        names = [f"{i}:{n}" for i, n in ws.query("SELECT sae_id, name FROM saes WHERE status = 'done' ORDER BY sae_id")]
        listing = ", ".join(names) if names else "none: train one with `workbench train`"
        raise WorkspaceError(f"no SAE '{ref}' in {ws.path.name}; available: {listing}")
    sae_id, name, run_id, hook, arch, width, d_in, path = rows[0]
    return SAERecord(int(sae_id), name, int(run_id), hook, arch, int(width), int(d_in), Path(path))
