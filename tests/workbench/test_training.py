"""`workbench train` / `workbench eval` on a tiny cache: records, resume, and bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saes
from workbench.cli import main
from workbench.workspace import Workspace

HOOK = "blocks.1.hook_resid_post"
TRAIN = ["train", "--hook", HOOK, "--arch", "topk", "--width", "128", "--k", "4", "--tokens", "16384",
         "--batch-size", "512", "--warmup-steps", "4"]


@pytest.fixture(scope="module")
def cached_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("train") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "12800", "--ctx", "64", "--db", str(db)]) == 0
    return db


def rows(db, sql):
    with Workspace(db, read_only=True) as ws:
        return ws.query(sql)


def test_train_records_the_sae_its_metrics_and_its_log(cached_db, capsys):
    assert main([*TRAIN, "--db", str(cached_db), "--name", "first"]) == 0
    out = capsys.readouterr().out
    assert "ce_loss_recovered" in out
    (status, path, metrics), = rows(cached_db, "SELECT status, path, metrics FROM saes WHERE name = 'first'")
    metrics = json.loads(metrics)
    assert status == "done" and metrics["l0"] == pytest.approx(4.0)
    assert 0 < metrics["fvu"] < 1 and {"ce_clean", "ce_spliced", "kl_clean_spliced", "dead_fraction"} <= metrics.keys()
    assert rows(cached_db, "SELECT count(*) FROM training_log")[0][0] >= 1
    sae = saes.load_sae(path, expected_d_in=64)
    assert sae.cfg.arch == "topk" and sae.cfg.width == 128


def test_eval_registers_a_saved_sae(cached_db, tmp_path, capsys):
    sae = saes.build(saes.SAEConfig(d_in=64, width=96, k=3))
    saes.save_sae(sae, tmp_path / "external")
    assert main(["eval", "--db", str(cached_db), "--sae", str(tmp_path / "external"), "--hook", HOOK, "--no-downstream"]) == 0
    assert rows(cached_db, f"SELECT width, status FROM saes WHERE name = '{HOOK}.external'") == [(96, "done")]


def _bad(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "change, expected",
    [
        (("--width", "0"), "width must be > 0"),
        (("--k", "128"), "k must be < width"),
        (("--arch", "relu"), "batchtopk"),  # lists the registry's names
        (("--hook", "blocks.0.hook_resid_post"), "is not cached"),
    ],
)
def test_bad_train_arguments_write_nothing(cached_db, capsys, change, expected):
    before = rows(cached_db, "SELECT count(*) FROM saes")
    args = [*TRAIN, "--db", str(cached_db)]
    args[args.index(change[0]) + 1] = change[1]
    assert expected in _bad(args, capsys)
    assert rows(cached_db, "SELECT count(*) FROM saes") == before


def test_train_on_an_empty_workspace(tmp_path, capsys):
    db = tmp_path / "empty.duckdb"
    Workspace(db).close()
    assert "none yet" in _bad([*TRAIN, "--db", str(db)], capsys)


def test_eval_refuses_wrong_d_in_and_corrupted_weights(cached_db, tmp_path, capsys):
    saes.save_sae(saes.build(saes.SAEConfig(d_in=32, width=64, k=2)), tmp_path / "narrow")
    assert "d_in" in _bad(["eval", "--db", str(cached_db), "--sae", str(tmp_path / "narrow"), "--hook", HOOK, "--no-downstream"], capsys)
    saes.save_sae(saes.build(saes.SAEConfig(d_in=64, width=64, k=2)), tmp_path / "broken")
    weights = next((tmp_path / "broken").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    _bad(["eval", "--db", str(cached_db), "--sae", str(tmp_path / "broken"), "--hook", HOOK, "--no-downstream"], capsys)
    assert rows(cached_db, "SELECT count(*) FROM saes WHERE name LIKE '%narrow' OR name LIKE '%broken'") == [(0,)]


def test_killed_training_resumes_to_the_uninterrupted_result(cached_db, tmp_path):
    args = [sys.executable, "-m", "workbench.cli", *TRAIN, "--db", str(cached_db), "--tokens", "131072",
            "--checkpoint-every", "8", "--no-downstream"]
    proc = subprocess.Popen([*args, "--name", "killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(64)
        if any(f"| {n}/256" in seen for n in range(20, 200)):
            break
    assert proc.poll() is None, f"training ended before it could be killed: {seen[-300:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rows(cached_db, "SELECT status FROM saes WHERE name = 'killed'") == [("training",)]
    resumed = subprocess.run([*args, "--name", "killed"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run([*args, "--name", "clean"], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    [(killed_path,)] = rows(cached_db, "SELECT path FROM saes WHERE name = 'killed'")
    [(clean_path,)] = rows(cached_db, "SELECT path FROM saes WHERE name = 'clean'")
    a, b = saes.load_sae(killed_path), saes.load_sae(clean_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_sae_lens_attaches_a_trained_sae_to_the_bridge_and_splices_it_as_we_do(cached_db, tiny):
    """cfg.json carries what sae-lens keys on (hook, model, context, BOS, corpus, its own version), so
    `SAETransformerBridge.add_sae(SAE.load_from_disk(dir))` attaches the SAE at the right hook and the
    spliced forward equals ours (the reconstruction replacing the activation at every position)."""
    from importlib.metadata import version

    from sae_lens import SAE
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge

    from workbench.hooks import attached

    assert main([*TRAIN, "--db", str(cached_db), "--name", "for-sae-lens", "--no-downstream"]) == 0
    (path,), = rows(cached_db, "SELECT path FROM saes WHERE name = 'for-sae-lens'")
    meta = json.loads((Path(path) / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == HOOK and meta["model_name"] == "tiny-llama" and meta["context_size"] == 64
    assert meta["prepend_bos"] is True and meta["dataset_path"] == "stdlib" and meta["sae_lens_version"] == version("sae-lens")

    bridge = tiny.model
    theirs = SAE.load_from_disk(path)
    ours = saes.load_sae(path)
    tokens = torch.randint(0, 1000, (2, 16))
    with torch.no_grad(), attached(bridge, [(HOOK, lambda acts, hook: ours.decode(ours.encode(acts.reshape(-1, 64))).view_as(acts))]):
        spliced_here = bridge(tokens)
    original_class = bridge.__class__
    try:
        bridge.__class__, bridge._acts_to_saes, bridge._transcoder_output_hooks = SAETransformerBridge, {}, {}
        bridge.add_sae(theirs, use_error_term=False)
        assert list(bridge.acts_to_saes) == [HOOK]  # attached, not "No hook found"
        with torch.no_grad():
            spliced_there = bridge(tokens)
        bridge.reset_saes()
    finally:
        bridge.__class__ = original_class
    torch.testing.assert_close(spliced_there, spliced_here, rtol=1e-4, atol=1e-4)  # two SAE implementations: float tolerance
    with torch.no_grad():
        assert not torch.allclose(bridge(tokens), spliced_here, atol=1e-3)  # the splice changed the output: a real comparison
