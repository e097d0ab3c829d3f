"""The command line: each bad input gives one line on stderr, exit 2, and leaves the workspace as it was."""

import subprocess
import sys

import pytest

from workbench.cli import main
from workbench.workspace import SCHEMA_VERSION, Workspace

BASE = ["cache", "--model", "tiny-llama", "--hook", "blocks.1.hook_resid_post", "--corpus", "stdlib", "--tokens", "64", "--ctx", "32"]


def with_arg(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.fixture
def existing(tmp_path, capsys):
    """A workspace with one finished run; bad commands must not change it."""
    db = tmp_path / "ws.duckdb"
    assert main([*BASE, "--db", str(db)]) == 0
    capsys.readouterr()
    return db


def snapshot(db):
    with Workspace(db, read_only=True) as ws:
        return {t: ws.query(f"SELECT count(*) FROM {t}")[0][0]
                for t in ("runs", "contexts", "tokens", "activations", "documents", "corpora")}


def run_bad(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("workbench: error: ") and "\n" not in err, err
    return err


def test_cache_cli_reports_and_caches(existing, capsys):
    assert snapshot(existing)["contexts"] == 2
    assert main(["info", "--db", str(existing)]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post: d=64, 2 contexts stored" in out and "tokens in domain" in out


def test_hooks_command_lists_shapes(capsys):
    assert main(["hooks", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert any(line.split() == ["blocks.1.hook_resid_post", "[batch,", "pos,", "64]"] for line in out.splitlines())


@pytest.mark.parametrize(
    "change, expected",
    [
        (("--model", "no-such-org/no-such-model"), "unknown model 'no-such-org/no-such-model'"),
        (("--hook", "blocks.1.hook_resid_pots"), "closest: blocks.1.hook_resid_post"),
        (("--corpus", "/no/such/file.txt"), "/no/such/file.txt"),
        (("--tokens", "0"), "--tokens must be a positive"),
        (("--tokens", "-5"), "--tokens must be a positive"),
        (("--ctx", "1000"), "exceeds the model's context length 512"),
        (("--ctx", "100000"), "--ctx must be between 2"),
        (("--dtype", "float32"), "argument --dtype: invalid choice: 'float32' (choose from 'float16', 'bfloat16')"),
    ],
)
def test_bad_cache_arguments_leave_the_workspace_intact(existing, capsys, change, expected):
    before = snapshot(existing)
    err = run_bad(with_arg([*BASE, "--db", str(existing)], *change), capsys)
    assert expected in err
    assert snapshot(existing) == before


def test_empty_corpus_is_rejected(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    db = tmp_path / "new.duckdb"
    err = run_bad(with_arg([*BASE, "--db", str(db)], "--corpus", str(empty)), capsys)
    assert "empty" in err
    assert not db.exists()


def test_non_utf8_corpus_is_decoded_with_replacement_and_a_warning(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes(("caf\xe9 " * 200).encode("latin-1"))
    with pytest.warns(UnicodeWarning, match="latin1.txt"):
        assert main(with_arg([*BASE, "--db", str(tmp_path / "w.duckdb")], "--corpus", str(text))) == 0


def test_workspace_in_a_missing_directory(tmp_path, capsys):
    err = run_bad([*BASE, "--db", str(tmp_path / "nope" / "ws.duckdb")], capsys)
    assert "workspace directory does not exist" in err


def test_workspace_busy_while_another_process_writes(existing, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(existing)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        err = run_bad([*BASE, "--db", str(existing)], capsys)
        assert err.startswith("workbench: error: workspace busy") and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(existing)["contexts"] == 2


def test_an_older_schema_is_migrated_by_the_next_write(existing, capsys):
    import duckdb

    con = duckdb.connect(str(existing))  # roll the file back to schema v1: drop what v2+ added
    for table in ("moe_purge", "moe_correlation", "probe_results", "probe_runs",
                  "moe_routes", "moe_k_curve", "moe_selectivity", "moe_comparison",
                  "moe_experts", "moe_mass", "moe_groups", "moe_runs",
                  "sparsity_fits", "sparsity_curve", "sparsity_layers", "sparsity_measurements",
                  "feature_related", "feature_logits", "feature_examples", "feature_stats", "feature_acts",
                  "analyses", "training_log", "saes", "shards", "feature_explanations"):
        con.execute(f"DROP TABLE {table}")
    for sequence in ("sae_ids", "sparsity_ids", "moe_run_ids", "probe_run_ids"):
        con.execute(f"DROP SEQUENCE {sequence}")
    con.execute("ALTER TABLE runs DROP COLUMN error")  # added by v7
    for column in ("store", "store_url", "chunk_contexts"):  # added by v8
        con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    con.execute("UPDATE schema_version SET version = 1")
    con.close()
    assert "open it once for writing" in run_bad(["info", "--db", str(existing)], capsys)
    assert main([*BASE, "--db", str(existing)]) == 0  # a writer migrates it
    with Workspace(existing, read_only=True) as ws:
        assert ws.schema_version() == SCHEMA_VERSION == 9 and ws.query("SELECT count(*) FROM saes") == [(0,)]
        assert ws.query("SELECT count(*) FROM moe_runs") == ws.query("SELECT count(*) FROM probe_results") == [(0,)]


def test_newer_schema_is_refused(existing, capsys):
    import duckdb

    con = duckdb.connect(str(existing))
    con.execute("UPDATE schema_version SET version = 99")
    con.close()
    err = run_bad(["info", "--db", str(existing)], capsys)
    assert "schema version 99" in err
