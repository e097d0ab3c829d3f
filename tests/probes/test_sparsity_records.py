"""Sparsity measurements in the workspace and the `workbench sparsity` CLI, on ``sparsity_db`` (conftest.py).
The app's Sparsity page is tested in tests/app/test_sparsity_page.py."""

import json

import numpy as np
import pytest

from probes import records
from probes.laws import fit_law
from workbench.cli import main
from workbench.workspace import Workspace


def test_measurements_are_recorded_with_layers_and_curves(sparsity_db):
    with Workspace(sparsity_db, read_only=True) as ws:
        rows = [r for r in records.measurements(ws) if r["series"] is None]
        assert [r["label"] for r in rows] == ["cett@PPL-1%", "cett@PPL-5%", "zero"]
        for r in rows:
            assert r["model"] == "tiny-llama" and r["n_layers"] == 2 and r["d_mlp"] == 192 and r["activation"] == "silu"
            layers = records.layer_ratios(ws, r["measurement_id"])
            assert [layer for layer, _, _ in layers] == [0, 1]
            assert np.mean([ratio for _, ratio, _ in layers]) == pytest.approx(r["activation_ratio"])
            if r["metric"] == "cett":
                curve = records.tradeoff_curve(ws, r["measurement_id"])
                assert curve[0][0] == 0.0 and curve[0][1] == pytest.approx(r["ppl_dense"])
                assert r["ppl"] <= (1 + r["p"] / 100) * r["ppl_dense"]


def test_remeasuring_replaces_rather_than_duplicates(sparsity_db, tiny_measure, tmp_path):
    db = tmp_path / "again.duckdb"
    db.write_bytes(sparsity_db.read_bytes())
    assert main([*tiny_measure, "--p", "1", "--db", str(db)]) == 0
    with Workspace(db, read_only=True) as ws:
        labels = [r["label"] for r in records.measurements(ws) if r["series"] is None]
        assert sorted(labels) == ["cett@PPL-1%", "cett@PPL-5%", "zero"]
        assert ws.query("SELECT count(*) FROM sparsity_layers WHERE measurement_id NOT IN "
                        "(SELECT measurement_id FROM sparsity_measurements)") == [(0,)]


def test_fit_from_the_cli_matches_fitting_the_stored_points(sparsity_db, tmp_path, capsys):
    db = tmp_path / "fit.duckdb"
    db.write_bytes(sparsity_db.read_bytes())
    assert main(["sparsity", "fit", "--db", str(db), "--series", "relu-d128-l4", "--law", "relu"]) == 0
    assert "relu law" in capsys.readouterr().out
    with Workspace(db, read_only=True) as ws:
        stored = {(s, f.law): f for s, _, f in records.fits(ws)}
        points = records.series_points(ws, "relu-d128-l4", "cett@PPL-1%")
    direct = fit_law("relu", [t for t, _ in points], [a for _, a in points])
    assert stored[("relu-d128-l4", "relu")].params == pytest.approx(direct.params)
    assert json.dumps(stored[("relu-d128-l4", "relu")].to_dict())


def bad(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: ") and "\n" not in err
    return err


def test_bad_sparsity_input_is_one_line_and_leaves_the_workspace_intact(sparsity_db, tiny_measure, synthetic_series,
                                                                         tmp_path, capsys):
    db = tmp_path / "bad.duckdb"
    db.write_bytes(sparsity_db.read_bytes())
    before = db.read_bytes()
    assert "p must be a positive" in bad([*tiny_measure, "--p", "0", "--db", str(db)], capsys)
    assert "p must be a positive" in bad([*tiny_measure, "--p", "-5", "--db", str(db)], capsys)
    assert "argument --metric: invalid choice: 'l2'" in bad([*tiny_measure, "--metric", "l2", "--db", str(db)], capsys)
    assert "argument --law: invalid choice: 'cubic'" in bad(["sparsity", "fit", "--db", str(db), "--series", "relu-d128-l4",
                                                             "--law", "cubic"], capsys)
    assert "no measurements for series 'nope'" in bad(["sparsity", "fit", "--db", str(db), "--series", "nope", "--law", "relu"], capsys)
    assert db.read_bytes() == before
    with Workspace(db) as ws:  # a series with fewer checkpoints than the law needs
        synthetic_series(ws, "short", "relu", 64, 2, [(1_000_000, 0.5), (2_000_000, 0.4), (4_000_000, 0.35)])
    assert "needs at least 5 checkpoints; the series has 3" in bad(
        ["sparsity", "fit", "--db", str(db), "--series", "short", "--law", "relu"], capsys)


def test_show_prints_measurements_and_fits(sparsity_db, capsys):
    assert main(["sparsity", "show", "--db", str(sparsity_db)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama cett@PPL-1%" in out and "silu-d128-l4 [cett@PPL-1%] silu law" in out


def test_any_model_can_be_recorded_as_a_series_checkpoint(sparsity_db, tiny_measure, tmp_path, capsys):
    """A real checkpoint series (e.g. hub revisions): measure each with --series/--train-tokens, then fit."""
    db = tmp_path / "hub.duckdb"
    db.write_bytes(sparsity_db.read_bytes())
    assert main([*tiny_measure, "--series", "revisions", "--train-tokens", "2000000", "--db", str(db)]) == 0
    capsys.readouterr()
    with Workspace(db, read_only=True) as ws:
        rows = records.measurements(ws, "revisions")
    assert {(r["model"], r["train_tokens"], r["label"]) for r in rows} == {
        ("tiny-llama", 2_000_000, "cett@PPL-1%"), ("tiny-llama", 2_000_000, "zero")}
    assert "needs both --series and --train-tokens" in bad([*tiny_measure, "--series", "revisions", "--db", str(db)], capsys)
    assert "needs both --series and --train-tokens" in bad([*tiny_measure, "--train-tokens", "5", "--db", str(db)], capsys)
