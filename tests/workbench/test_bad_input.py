"""Every bad input, through the real CLI: one line on stderr, exit status 2, every table as it was,
and no file created outside the workspace or the folder the user named.

The cases come from an adversarial pass (hostile paths and names, overflowing sizes, broken
weight files, invalid UTF-8, deeply nested JSON, bad ports); the mechanism they test is general:
validation at each boundary, ``WorkbenchError`` subclasses per layer, and ``main``'s one path
from any exception to one line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import saes
from workbench.cli import main
from workbench.errors import BAD_INPUT, FAILURE, report
from workbench.workspace import Workspace

HOOK = "blocks.1.hook_resid_post"
SAE = "base"
TRAIN = ["train", "--db", "{db}", "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "1024", "--batch-size", "256",
         "--no-downstream"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small finished workspace: one cache run, one trained and analysed SAE."""
    db = tmp_path_factory.mktemp("built") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "4096", "--ctx", "32", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "8192",
                 "--batch-size", "256", "--warmup-steps", "2", "--no-downstream", "--name", SAE]) == 0
    assert main(["analyze", "--db", str(db), "--sae", SAE, "--no-logits"]) == 0
    return db


@pytest.fixture
def ws(built, private_copy) -> Path:
    """A private copy of the built workspace (file and weights folder); the test runs inside tmp_path."""
    return private_copy(built)


def bad_sae_dir(root: Path, *, width: int, real_width: int = 96) -> Path:
    """An SAE folder whose cfg.json claims ``width`` latents while its weights hold ``real_width``."""
    folder = root / f"claims-{width}"
    saes.save_sae(saes.build(saes.SAEConfig(d_in=64, width=real_width, k=4)), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = width
    cfg["saes_config"]["width"] = width
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def layer_norm_sae_dir(root: Path) -> Path:
    """An SAELens-layout folder whose cfg.json asks for sae-lens's per-token layer norm of the inputs."""
    folder = root / "layer-norm"
    saes.save_sae(saes.build(saes.SAEConfig(d_in=64, width=96, k=4)), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saes_config"]
    cfg["normalize_activations"] = "layer_norm"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def nested_json(tmp: Path, depth: int = 100_000) -> Path:
    path = tmp / "deep.json"
    path.write_text("[" * depth + "]" * depth)
    return path


# Each case: the argv (``{db}`` the workspace, ``{tmp}`` the test's folder) and a phrase the line must hold.
CASES = {
    "cache-tokens-overflow": (["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "1000000000000000",
                               "--db", "{tmp}/new.duckdb"], "at most 2,147,483,647 contexts"),
    "cache-ctx-overflow": (["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "64", "--ctx", "70000",
                            "--db", "{db}"], "--ctx must be between 2"),
    "train-width-overflow": ([*TRAIN, "--width", "1000000000000"], "width must be at most"),
    "train-width-memory": ([*TRAIN, "--width", "2000000000"], "GiB are available"),
    "train-name-traversal": ([*TRAIN, "--name", "../../escaped"], "invalid SAE name"),
    "train-name-absolute": ([*TRAIN, "--name", "/abs/path"], "invalid SAE name"),
    "train-name-hidden": ([*TRAIN, "--name", ".hidden"], "invalid SAE name"),
    "train-name-sql": ([*TRAIN, "--name", "x'; DROP TABLE saes; --"], "invalid SAE name"),
    "train-name-taken": ([*TRAIN, "--name", SAE], "already trained"),
    "train-out-forbidden": ([*TRAIN, "--out", "/proc/forbidden"], "cannot create weights folder"),
    "train-missing-workspace": ([*TRAIN, "--db", "{tmp}/none.duckdb"], "no workspace at"),
    "train-width-not-integer": ([*TRAIN, "--width", "lots"], "expected an integer"),
    "eval-width-huge": (["eval", "--db", "{db}", "--sae", "{claims-1000000000000}", "--hook", HOOK, "--no-downstream"],
                        "width must be at most"),
    "eval-width-large": (["eval", "--db", "{db}", "--sae", "{claims-2000000000}", "--hook", HOOK, "--no-downstream"],
                         "has shape"),
    "eval-layer-norm": (["eval", "--db", "{db}", "--sae", "{layer-norm}", "--hook", HOOK, "--no-downstream"],
                        "normalize_activations='layer_norm' normalises each input on its own"),
    "analyze-batch-zero": (["analyze", "--db", "{db}", "--sae", SAE, "--batch", "0", "--no-logits"], "positive integer"),
    "analyze-batch-negative": (["analyze", "--db", "{db}", "--sae", SAE, "--batch", "-1", "--no-logits"], "positive integer"),
    "analyze-sae-bad-utf8": (["analyze", "--db", "{db}", "--sae", "b\udcffad", "--no-logits"], "--sae is not valid UTF-8"),
    "steer-nested-spec": (["steer", "--db", "{db}", "--spec", "{deep}", "--prompt", "hi"], "nested too deeply"),
    "steer-prompt-bad-utf8": (["steer", "--db", "{db}", "--sae", SAE, "--feature", "1", "--prompt", "\udcc3("],
                              "--prompt is not valid UTF-8"),
    "steer-strength-huge": (["steer", "--db", "{db}", "--sae", SAE, "--feature", "1", "--strength", "1e30",
                             "--prompt", "hi"], "within ±10000"),
    "steer-strength-nan": (["steer", "--db", "{db}", "--sae", SAE, "--feature", "1", "--strength", "nan",
                            "--prompt", "hi"], "within ±10000"),
    "export-out-is-a-file": (["export", "--db", "{db}", "--out", "{db}"], "is not a folder"),
    "export-out-forbidden": (["export", "--db", "{db}", "--out", "/proc/forbidden"], "cannot create export folder"),
    "export-unknown-hook": (["export", "--db", "{db}", "--out", "{tmp}/exported", "--hook", "nope"],
                            "hook 'nope' is not cached"),
    "app-port-high": (["app", "--db", "{db}", "--port", "70000"], "--port must be between 1 and 65535"),
    "app-port-negative": (["app", "--db", "{db}", "--port", "-1"], "--port must be between 1 and 65535"),
    "app-address": (["app", "--db", "{db}", "--address", "not an ip"], "--address must be an IP address"),
    "train-device-unknown": ([*TRAIN, "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    "analyze-device-absent": (["analyze", "--db", "{db}", "--sae", SAE, "--device", "cuda:7"], "--device cuda:7 asked for"),
    "train-model-dtype": ([*TRAIN, "--model-dtype", "int8"], "invalid choice: 'int8'"),
    "unknown-command": (["nope"], "invalid choice"),
    "missing-flag": (["cache", "--db", "{db}"], "required"),
    "info-missing-workspace": (["info", "--db", "{tmp}/none.duckdb"], "no workspace at"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, ws, tmp_path, capsys, table_digest, expect_one_line, files_under):
    argv, phrase = CASES[case]
    places = {"{db}": str(ws), "{tmp}": str(tmp_path), "{deep}": str(nested_json(tmp_path)),
              "{claims-1000000000000}": str(bad_sae_dir(tmp_path, width=10**12)),
              "{claims-2000000000}": str(bad_sae_dir(tmp_path, width=2_000_000_000)),
              "{layer-norm}": str(layer_norm_sae_dir(tmp_path))}
    argv = [next((arg.replace(k, v) for k, v in places.items() if k in arg), arg) for arg in argv]
    before_tables, before_files = table_digest(ws), files_under(tmp_path)
    err = expect_one_line(argv, capsys)
    assert phrase in err
    assert table_digest(ws) == before_tables
    assert files_under(tmp_path) == before_files  # nothing created, in the workspace's folder or beside it
    assert not Path("/abs/path").exists() and not (tmp_path.parent / "escaped").exists()


def test_export_writes_only_into_the_named_folder_whatever_its_name(ws, tmp_path, capsys, table_digest):
    """The path reaches DuckDB's COPY TO as a quoted literal: an injection attempt is a folder name."""
    hostile = "x' (FORMAT csv); COPY vocab TO 'INJECTED.csv' (FORMAT csv); --"
    before = table_digest(ws)
    assert main(["export", "--db", str(ws), "--out", hostile]) == 0, capsys.readouterr().err
    assert (tmp_path / hostile / "tokens.parquet").is_file()
    assert not list(tmp_path.rglob("INJECTED*")) and not Path("INJECTED.csv").exists()
    assert {p.parts[0] for p in (q.relative_to(tmp_path) for q in tmp_path.rglob("*"))} == {"home", hostile}
    assert table_digest(ws) == before


def test_a_database_that_is_not_a_workspace_is_refused(tmp_path, capsys, table_digest, expect_one_line):
    import duckdb

    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE mine AS SELECT 42 AS answer")
    con.close()
    before = table_digest(other)
    err = expect_one_line(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "64", "--ctx", "32",
                           "--db", str(other)], capsys)
    assert "not a workbench workspace" in err
    assert table_digest(other) == before


def test_a_read_only_folder_is_refused_before_any_work(ws, capsys, table_digest, expect_one_line):
    folder = ws.parent
    if os.geteuid() == 0:  # root ignores permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("this file system supports neither permission bits for root nor chattr +i")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        before = table_digest(ws)
        err = expect_one_line(["train", "--db", str(ws), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "1024",
                               "--no-downstream", "--name", "ro"], capsys)
        assert "cannot be written" in err
        err = expect_one_line(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "64", "--ctx", "32",
                               "--db", str(ws)], capsys)
        assert "cannot be written" in err
        assert table_digest(ws) == before
    finally:
        subprocess.run(undo, check=True)


def test_invalid_utf8_bytes_from_a_real_shell(ws, tmp_path):
    """The real process, with raw bytes in argv as a shell passes them."""
    proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"workbench.cli", b"steer", b"--db", os.fsencode(ws),
                           b"--sae", SAE.encode(), b"--feature", b"1", b"--prompt", b"\xc3("],
                          capture_output=True, cwd=tmp_path, timeout=300)
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 2, err
    assert err == "workbench: error: --prompt is not valid UTF-8 text"


def test_a_job_that_fails_is_recorded_failed_and_resumes(ws, capsys, monkeypatch, expect_one_line):
    """Disk full in the middle of `analyze`: one line saying so, the row says failed with the
    reason (and `info` shows it), and the same command resumes to the uninterrupted result."""
    import workbench.analysis as analysis

    with Workspace(ws, read_only=True) as w:
        expected = w.query("SELECT * FROM feature_acts ORDER BY ALL")
    real_insert, calls = analysis.insert_arrow, []

    def fill_the_disk(con, table, rows):
        calls.append(table)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_insert(con, table, rows)

    assert main(["analyze", "--db", str(ws), "--sae", SAE, "--no-logits", "--batch", "16"]) == 0
    with Workspace(ws) as w:  # start over: forget the finished analysis
        w.con.execute("DELETE FROM analyses")
    monkeypatch.setattr(analysis, "insert_arrow", fill_the_disk)
    err = expect_one_line(["analyze", "--db", str(ws), "--sae", SAE, "--no-logits", "--batch", "16"], capsys, FAILURE)
    assert "disk full" in err and "run the same command again to resume" in err
    with Workspace(ws, read_only=True) as w:
        assert w.query("SELECT status, error, contexts_done FROM analyses") == [
            ("failed", "OSError: [Errno 28] No space left on device", 16)]
    assert main(["info", "--db", str(ws)]) == 0
    assert "[failed] error: OSError: [Errno 28] No space left on device" in capsys.readouterr().out
    monkeypatch.setattr(analysis, "insert_arrow", real_insert)
    assert main(["analyze", "--db", str(ws), "--sae", SAE, "--no-logits", "--batch", "16"]) == 0
    with Workspace(ws, read_only=True) as w:
        assert w.query("SELECT status, error FROM analyses") == [("done", None)]
        assert w.query("SELECT * FROM feature_acts ORDER BY ALL") == expected


def test_a_failed_training_is_recorded_and_the_rerun_resumes(ws, capsys, monkeypatch, expect_one_line):
    import workbench.training as training

    argv = ["train", "--db", str(ws), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "2048",
            "--batch-size", "256", "--warmup-steps", "2", "--no-downstream", "--name", "flaky"]

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(training, "evaluate", broken_evaluate)
    err = expect_one_line(argv, capsys, FAILURE)
    assert "internal error (RuntimeError: evaluation exploded)" in err
    with Workspace(ws, read_only=True) as w:
        assert w.query("SELECT status, error FROM saes WHERE name = 'flaky'") == [("failed", "RuntimeError: evaluation exploded")]
    monkeypatch.undo()
    monkeypatch.chdir(ws.parent)
    assert main(argv) == 0
    with Workspace(ws, read_only=True) as w:
        assert w.query("SELECT status, error FROM saes WHERE name = 'flaky'") == [("done", None)]


@pytest.mark.parametrize("err, status, phrase", [
    (OSError(errno.ENOSPC, "No space left on device"), FAILURE, "disk full"),
    (RuntimeError("IO Error: Could not write all bytes to file"), FAILURE, "disk full"),
    (MemoryError(), FAILURE, "out of memory"),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), FAILURE, "cannot write /x"),
    (KeyError("surprise"), FAILURE, "internal error (KeyError: 'surprise')"),
    (saes.SAEConfigError("k must be > 0"), BAD_INPUT, "k must be > 0"),
])
def test_report_gives_one_line_for_every_kind_of_failure(err, status, phrase):
    outcome = report(err)
    assert outcome.status == status and phrase in outcome.line and "\n" not in outcome.line


@pytest.mark.parametrize("argv, phrase", [
    (["hooks", "--model", "gpt2"], "unknown model 'gpt2'"),
    (["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "64", "--corpus", "hf:wikitext", "--db", "{db}"],
     "cannot load Hugging Face dataset 'wikitext'"),
    (["probe", "--db", "{db}", "--sae", SAE, "--texts", "hf:imdb"], "cannot load Hugging Face dataset 'imdb'"),
])
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "closed port"])
def test_an_unreachable_hub_fails_fast_with_one_line(argv, phrase, offline, ws, capsys, monkeypatch, table_digest, expect_one_line):
    """Offline, a hub name is one line at once (no retries), whether the user said so or the
    connection is refused."""
    import time

    from workbench.data.hub import hub_unreachable

    if offline == "closed port":
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    hub_unreachable.cache_clear()
    before = table_digest(ws)
    start = time.monotonic()
    try:
        err = expect_one_line([arg.replace("{db}", str(ws)) for arg in argv], capsys)
    finally:
        hub_unreachable.cache_clear()
    assert phrase in err and ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "127.0.0.1 is unreachable") in err
    assert time.monotonic() - start < 60  # model loading included; the retries alone took 27–38 s
    assert table_digest(ws) == before


def test_disk_full_while_caching_keeps_whole_batches_and_resumes(tmp_path, capsys, monkeypatch, expect_one_line):
    import workbench.caching as caching

    argv = ["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "2048", "--ctx", "32", "--batch", "16",
            "--commit-contexts", "16"]  # a commit per batch, so the disk fills after some are kept
    assert main([*argv, "--db", str(tmp_path / "whole.duckdb")]) == 0
    real_insert, calls = caching.insert_arrow, []

    def fill_the_disk(con, table, rows):
        calls.append(table)
        if table == "activations" and calls.count("activations") == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_insert(con, table, rows)

    monkeypatch.setattr(caching, "insert_arrow", fill_the_disk)
    db = tmp_path / "ws.duckdb"
    err = expect_one_line([*argv, "--db", str(db)], capsys, FAILURE)
    assert err.startswith("workbench: error: disk full")
    with Workspace(db, read_only=True) as w:  # two whole batches, the third rolled back
        assert w.query("SELECT status, error FROM runs") == [("failed", "OSError: [Errno 28] No space left on device")]
        assert w.query("SELECT count(*) FROM contexts") == w.query("SELECT count(*) FROM activations") == [(32,)]
    monkeypatch.setattr(caching, "insert_arrow", real_insert)
    assert main([*argv, "--db", str(db)]) == 0
    with Workspace(db, read_only=True) as w, Workspace(tmp_path / "whole.duckdb", read_only=True) as whole:
        assert w.query("SELECT status, error FROM runs") == [("done", None)]
        for table in ("contexts", "tokens", "activations", "documents"):
            assert w.query(f"SELECT * FROM {table} ORDER BY ALL") == whole.query(f"SELECT * FROM {table} ORDER BY ALL")


def test_info_counts_what_sits_in_the_write_ahead_log(ws, capsys):
    import duckdb

    con = duckdb.connect(str(ws))  # a writer that stops before its checkpoint leaves its data in the WAL
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("CREATE TABLE ballast AS SELECT repeat('x', 1000) || i AS s FROM range(20000) t(i)")
    con.close()
    wal = ws.with_name(ws.name + ".wal")
    assert wal.stat().st_size > 2**20
    assert main(["info", "--db", str(ws)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"+ {wal.stat().st_size / 2**20:.1f} MiB in the write-ahead log")
