"""The workspace schema: every table, and the migrations that build it version by version.

Version 1::

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

Version 8 lets a cache run keep its activations as Parquet shards (``workbench.shards``)::

    runs(..., store, store_url, chunk_contexts)     store 'duckdb' (rows of ``activations``) or 'parquet'
    shards(run_id, hook, chunk, path, n_contexts, bytes, rank)   the published shard files of a
                                                 parquet run; path relative to store_url

Version 9 adds scored feature labels (``workbench explain``, ``workbench.explanations``)::

    feature_explanations(sae_id, feature, explainer, label, detail, scores, examples, seed, created_at)
                                                 one row per explainer ('pattern', 'hf:MODEL', 'openai:URL');
                                                 detail, scores, examples: JSON
"""

from __future__ import annotations

SCHEMA_VERSION = 9

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
    8: """
    ALTER TABLE runs ADD COLUMN store VARCHAR DEFAULT 'duckdb';
    ALTER TABLE runs ADD COLUMN store_url VARCHAR;
    ALTER TABLE runs ADD COLUMN chunk_contexts INTEGER;
    CREATE TABLE shards (
        run_id     INTEGER NOT NULL,
        hook       VARCHAR NOT NULL,
        chunk      INTEGER NOT NULL,
        path       VARCHAR NOT NULL,
        n_contexts INTEGER NOT NULL,
        bytes      BIGINT NOT NULL,
        rank       INTEGER NOT NULL,
        PRIMARY KEY (run_id, hook, chunk)
    );
    """,
    9: """
    CREATE TABLE feature_explanations (
        sae_id     INTEGER,
        feature    INTEGER,
        explainer  VARCHAR,
        label      VARCHAR NOT NULL,
        detail     JSON,
        scores     JSON,
        examples   JSON,
        seed       INTEGER,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (sae_id, feature, explainer)
    );
    """,
}

# The job tables whose rows say 'running' / 'training' while a job works on them: table -> key.
JOB_TABLES = {"runs": "run_id", "saes": "sae_id", "analyses": "sae_id"}
