"""Interop with other libraries' files: sparsify SAEs in, sparsify / sae-lens readers out, sparsity.safetensors.

sparsify (eai-sparsify) and sae-lens are dependencies of the test environment: were either missing,
these tests must fail, not skip. Every comparison runs the other library's own reader and forward.
"""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sparsify import SparseCoder, SparseCoderConfig

from saes import SAEConfig, build, load_sae, save_sae
from saes.errors import SAEConfigError, SAEError, SAELoadError
from saes.io import (
    SPARSITY_FILENAME,
    load_sparsify,
    save_sparsify,
    save_sparsity,
    sparsity_from_density,
)

D, W, K = 32, 128, 4
# Ours and sparsify evaluate the same float32 formulas (a matmul plus a bias against F.linear, a dense decode
# against embedding_bag): agreement to a few ulps, checked as ||ours - theirs|| / ||theirs|| <= 1e-5.
REL = 1e-5


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach(), theirs.detach()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))


def _one_line(e):
    assert isinstance(e, ValueError) and isinstance(e, SAEError) and "\n" not in str(e), str(e)


def _random_sparsify(d_in=D, dtype=None, seed=0, **cfg) -> SparseCoder:
    """A sparsify SAE with random weights (nonzero biases, decoder rows of random norms)."""
    torch.manual_seed(seed)
    sae = SparseCoder(d_in, SparseCoderConfig(**{"num_latents": W, "k": K, **cfg}), dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def _theirs_dense(theirs: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's encode as dense latents (B, F), and its decode of them (B, d)."""
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x.to(theirs.dtype))
        z = torch.zeros(x.shape[0], theirs.num_latents, dtype=acts.dtype).scatter_(1, idx, acts)
        return z.float(), theirs.decode(acts, idx).float()


# ----------------------------------------------------------------------------- sparsify -> project
@pytest.mark.parametrize("kind", ["plain", "multi_topk", "no_normalize_decoder", "expansion_factor", "bfloat16"])
def test_sparsify_sae_loads_with_sparsifys_activations(tmp_path, kind):
    cfg = {"multi_topk": kind == "multi_topk", "normalize_decoder": kind != "no_normalize_decoder"}
    if kind == "expansion_factor":
        cfg.update(num_latents=0, expansion_factor=4)  # F = 4 d
    saved = _random_sparsify(dtype=torch.bfloat16 if kind == "bfloat16" else None, **cfg)
    saved.save_to_disk(tmp_path)
    theirs = SparseCoder.load_from_disk(tmp_path).float()  # sparsify's own reader; bf16 weights run in float32
    ours = load_sae(tmp_path, expected_d_in=D)
    assert ours.cfg.arch == "topk" and ours.cfg.k == K and ours.cfg.width == theirs.num_latents and not ours.training
    x = torch.randn(64, D)
    z_theirs, recon_theirs = _theirs_dense(theirs, x)
    with torch.no_grad():
        z_ours = ours.encode(x)
        recon_ours = ours.decode(z_ours)
    assert torch.equal(z_ours != 0, z_theirs != 0)  # the same k latents per token
    assert _rel(z_ours, z_theirs) <= REL and _rel(recon_ours, recon_theirs) <= REL
    if kind != "multi_topk":  # with multi_topk, sparsify's training forward returns the 4k reconstruction of its extra loss
        assert _rel(recon_ours, theirs(x).sae_out.float().detach()) <= REL


def test_sparsify_hookpoint_folders(tmp_path):
    """A sparsify run saves one folder per hookpoint: each loads; the run folder itself names them."""
    for i, name in enumerate(["layers.5", "layers.11"]):
        _random_sparsify(seed=i).save_to_disk(tmp_path / "run" / name)
    assert set(SparseCoder.load_many(str(tmp_path / "run"), local=True)) == {"layers.5", "layers.11"}
    ours = load_sae(tmp_path / "run" / "layers.11")
    z_theirs, _ = _theirs_dense(SparseCoder.load_from_disk(tmp_path / "run" / "layers.11"), x := torch.randn(8, D))
    assert _rel(ours.encode(x), z_theirs) <= REL
    with pytest.raises(SAELoadError) as info:
        load_sae(tmp_path / "run")
    _one_line(info.value)
    assert "layers.11, layers.5" in str(info.value) and "pass one of them" in str(info.value)


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("make, phrase", [
    (lambda p: _random_sparsify(activation="groupmax").save_to_disk(p), "activation='groupmax' is not supported"),
    (lambda p: _random_sparsify(transcode=True).save_to_disk(p), "transcoder"),
    (lambda p: _random_sparsify(skip_connection=True).save_to_disk(p), "skip_connection=true"),
    (lambda p: (_random_sparsify(skip_connection=True).save_to_disk(p), _edit_cfg(p, skip_connection=False)),
     "holds a skip connection W_skip"),
    (lambda p: (_random_sparsify().save_to_disk(p), _edit_cfg(p, signed=True)), "option(s) signed=True not known"),
    (lambda p: (_random_sparsify().save_to_disk(p), _edit_cfg(p, k=W)), "k must be < width"),
    (lambda p: (_random_sparsify().save_to_disk(p), _edit_cfg(p, k="4")), "k must be a non-negative integer"),
    (lambda p: (_random_sparsify().save_to_disk(p), _edit_cfg(p, num_latents=2 * W)), "encoder.weight has shape (128, 32)"),
    (lambda p: (_random_sparsify().save_to_disk(p), (p / "sae.safetensors").write_bytes(b"\x00" * 10)), "corrupted"),
])
def test_sparsify_what_cannot_be_honoured_is_refused_in_one_line(tmp_path, make, phrase):
    make(tmp_path)
    with pytest.raises(SAELoadError) as info:
        load_sae(tmp_path)
    _one_line(info.value)
    assert phrase in str(info.value)


def test_sparsify_wrong_d_in(tmp_path):
    _random_sparsify().save_to_disk(tmp_path)
    with pytest.raises(SAELoadError) as info:
        load_sparsify(tmp_path, expected_d_in=D + 1)
    _one_line(info.value)
    assert f"d_in={D}, expected d_in={D + 1}" in str(info.value)


# ----------------------------------------------------------------------------- project -> sparsify
def test_topk_saved_for_sparsify_loads_in_sparsify(make_sae, tmp_path):
    ours = make_sae("topk", d_in=D, width=W, k=K, scale=1.7).eval()
    save_sparsify(ours, tmp_path)
    theirs = SparseCoder.load_from_disk(tmp_path)
    x = torch.randn(64, D) * 3
    z_theirs, recon_theirs = _theirs_dense(theirs, x)
    with torch.no_grad():
        assert _rel(ours.encode(x), z_theirs) <= REL and _rel(ours.decode(ours.encode(x)), recon_theirs) <= REL
        back = load_sae(tmp_path)  # and back, with s folded into the weights
        assert _rel(back.decode(back.encode(x)), ours.decode(ours.encode(x))) <= REL


def test_only_topk_is_saved_for_sparsify(make_sae, tmp_path):
    with pytest.raises(SAEConfigError) as info:
        save_sparsify(make_sae("batchtopk", d_in=D, width=W, k=K), tmp_path)
    _one_line(info.value)
    assert "'batchtopk'" in str(info.value)


# ----------------------------------------------------------------------------- codebook, unknown architectures
def test_codebook_in_sae_lens_fails_on_its_architecture_name(tmp_path):
    """The codebook's cfg.json carries the keys every sae-lens config reads (dtype, device, ...), so sae-lens
    gets as far as its architecture lookup and names "codebook" (it raised KeyError: 'dtype' before)."""
    torch.manual_seed(0)
    cb = build(SAEConfig(d_in=D, width=64, k=3, arch="codebook"))
    cb.init_from_data(torch.randn(500, D) * 4)
    cb.input_scale.fill_(2.0)
    save_sae(cb, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert {"dtype": "float32", "device": "cpu", "normalize_activations": "expected_average_only_in",
            "norm_scaling_factor": 2.0, "reshape_activations": "none"}.items() <= cfg.items()
    with pytest.raises(KeyError) as info:
        SAE.load_from_disk(tmp_path)
    assert "codebook" in str(info.value)
    back = load_sae(tmp_path, expected_d_in=D)  # ours still reads it, scale included
    x = torch.randn(20, D) * 4
    assert float(back.input_scale) == 2.0
    torch.testing.assert_close(back.decode(back.encode(x)), cb.decode(cb.encode(x)))


def test_unknown_architecture_names_what_loads(make_sae, tmp_path):
    save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saes_config"]
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAELoadError) as info:
        load_sae(tmp_path)
    _one_line(info.value)
    message = str(info.value)
    assert "'gated'" in message and "SAELens topk, jumprelu, standard" in message and "feature_choice" in message
    assert "sparsify" in message
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "saes_config": {**cfg.get("saes_config", {}), "arch": "gated",
                                                                            "d_in": D, "width": W, "k": K}}))
    with pytest.raises(SAELoadError) as info:  # a project cfg.json with an unknown arch: the registry's list
        load_sae(tmp_path)
    _one_line(info.value)
    assert "unknown architecture 'gated'" in str(info.value) and "mutual_choice" in str(info.value)


# ----------------------------------------------------------------------------- sparsity.safetensors
def _sae_lens_reads_sparsity(folder: Path, monkeypatch) -> tuple[dict, dict, torch.Tensor | None]:
    """sae-lens's reader of a release folder with its sparsity (`sae_lens_huggingface_loader`), served from disk."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def local_download(repo_id, filename, **_):
        path = folder.parent / filename
        if not path.is_file():
            raise loaders.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    return loaders.sae_lens_huggingface_loader("local/release", folder.name, device="cpu")


def test_sparsity_file_reads_back_in_sae_lens(make_sae, tmp_path, monkeypatch):
    folder = save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path / "sae")
    density = torch.rand(W, dtype=torch.float64) * 0.1
    density[::7] = 0.0  # dead latents
    expected = sparsity_from_density(density)
    assert save_sparsity(folder, expected) == folder / SPARSITY_FILENAME
    _, state, log_sparsity = _sae_lens_reads_sparsity(folder, monkeypatch)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    torch.testing.assert_close(log_sparsity, expected, rtol=0, atol=0)
    assert log_sparsity.shape == (W,) and float(log_sparsity[0]) == pytest.approx(-10.0)  # sae-lens's floor, not -inf
    torch.testing.assert_close(log_sparsity[1:7].double(), torch.log10(density[1:7] + 1e-10), rtol=1e-6, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", SPARSITY_FILENAME]


@pytest.mark.parametrize("values, phrase", [
    (torch.zeros(W + 1), "d_sae=128"),
    (torch.zeros(2, W), "1-D"),
    (torch.full((W,), float("nan")), "without NaN"),
])
def test_bad_sparsity_is_refused(make_sae, tmp_path, values, phrase):
    folder = save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path)
    with pytest.raises(SAEError) as info:
        save_sparsity(folder, values)
    _one_line(info.value)
    assert phrase in str(info.value) and not (folder / SPARSITY_FILENAME).exists()


# ----------------------------------------------------------------------------- through the workbench
HOOK = "blocks.1.hook_resid_post"
D_MODEL = 64  # tiny-llama


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny cache, one SAE trained into DB.saes/, analysed; and a sparsify SAE registered from a user's folder."""
    from workbench.cli import main

    root = tmp_path_factory.mktemp("interop")
    db = root / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "2048", "--ctx", "32", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "4096",
                 "--batch-size", "512", "--no-downstream", "--name", "ours"]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "ours", "--batch", "16", "--no-logits"]) == 0
    user = root / "user" / "layers.1"
    _random_sparsify(d_in=D_MODEL, num_latents=96, k=4).save_to_disk(user)
    assert main(["eval", "--db", str(db), "--sae", str(user), "--hook", HOOK, "--name", "theirs", "--no-downstream"]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "theirs", "--batch", "16", "--no-logits"]) == 0
    return db, user


def test_analyze_writes_sparsity_that_sae_lens_reads(workspace, monkeypatch):
    from workbench.workspace import Workspace, resolve_sae

    db, _ = workspace
    with Workspace(db, read_only=True) as ws:
        record = resolve_sae(ws, "ours")
        density = [d for (d,) in ws.query("SELECT density FROM feature_stats WHERE sae_id = ? ORDER BY feature",
                                          [record.sae_id])]
    assert record.path.parent == db.with_suffix(".saes")
    _, _, log_sparsity = _sae_lens_reads_sparsity(record.path, monkeypatch)
    assert log_sparsity is not None and log_sparsity.shape == (96,)
    torch.testing.assert_close(log_sparsity, sparsity_from_density(density), rtol=0, atol=0)
    assert max(density) > 0 and float(log_sparsity.max()) == pytest.approx(torch.log10(torch.tensor(max(density))).item(), abs=1e-5)


def test_a_users_folder_is_evaluated_and_analysed_but_not_written_to(workspace):
    """`eval --sae PATH` takes a sparsify folder; `analyze` then writes nothing into the user's folder."""
    from workbench.workspace import Workspace, resolve_sae

    db, user = workspace
    assert sorted(p.name for p in user.iterdir()) == ["cfg.json", "sae.safetensors"]
    with Workspace(db, read_only=True) as ws:
        record = resolve_sae(ws, "theirs")
        status, metrics = ws.query("SELECT status, metrics FROM saes WHERE sae_id = ?", [record.sae_id])[0]
        n_stats = ws.query("SELECT count(*) FROM feature_stats WHERE sae_id = ?", [record.sae_id])[0][0]
    assert record.path == user.resolve() and record.arch == "topk" and status == "done" and json.loads(metrics)
    assert n_stats == 96


def test_steering_takes_a_sparsify_folder(workspace):
    from workbench.steering.sources import load_steering_sae

    _, user = workspace
    ref = load_steering_sae(str(user))
    assert ref.sae.cfg.arch == "topk" and ref.sae.cfg.width == 96 and ref.hook is None  # sparsify does not record the hook
