"""`workbench demo`'s stages at a tiny scale: each stage runs once, a rerun reuses them all, and every
feature ends with a pattern label."""

from __future__ import annotations

from workbench import demo
from workbench.cli import main
from workbench.workspace import Workspace


def test_demo_builds_every_stage_once_and_labels_every_feature(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.DEMO, "model", "tiny-llama")
    monkeypatch.setitem(demo.DEMO, "hook", "blocks.1.hook_resid_post")
    monkeypatch.setitem(demo.DEMO, "tokens", 4096)
    monkeypatch.setitem(demo.DEMO, "ctx", 64)
    monkeypatch.setitem(demo.DEMO_SAE, "width", 64)
    monkeypatch.setitem(demo.DEMO_SAE, "k", 4)
    monkeypatch.setitem(demo.DEMO_SAE, "train_tokens", 16384)
    monkeypatch.setitem(demo.DEMO_SAE, "batch_size", 512)
    db = tmp_path / "demo.duckdb"

    first = demo.build_demo(db)
    assert set(first) == set(demo.STAGES) and all(first[stage] > 0 for stage in demo.STAGES), first
    with Workspace(db, read_only=True) as ws:
        labels = ws.query("SELECT count(DISTINCT feature), min(explainer), max(explainer) FROM feature_explanations")[0]
        stamp = ws.query("SELECT count(*) FROM runs")[0][0], ws.query("SELECT count(*) FROM saes")[0][0]
    assert labels == (64, "pattern", "pattern")

    assert demo.build_demo(db) == dict.fromkeys(demo.STAGES, 0.0)  # everything reused
    assert main(["demo", "--db", str(db), "--no-serve"]) == 0
    captured = capsys.readouterr()
    assert "demo-topk [topk, done]" in captured.out and "built in" not in captured.err
    with Workspace(db, read_only=True) as ws:
        assert (ws.query("SELECT count(*) FROM runs")[0][0], ws.query("SELECT count(*) FROM saes")[0][0]) == stamp
