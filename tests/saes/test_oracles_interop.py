"""Oracles (sae-lens, eai-sparsify on the same weights) and SAELens-layout interop."""

import json

import pytest
import torch

# sae-lens is a runtime dependency (pyproject.toml): were it missing, these tests must fail, not skip
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from saes import SAEConfig, architecture_names, build, load_sae, save_sae
from saes.errors import SAEError, SAELoadError

D, W, K = 32, 128, 4
# Tolerances. Ours and the oracles evaluate the same float32 formulas with other ops (addmm against a matmul plus
# a bias, a sparse decode against a dense one), so activations and reconstructions (up to ~30) agree to a few ulps:
# rtol = atol = 1e-5. Gradients and the AuxK loss also sum over the 64 tokens in another order: rtol 1e-4, with
# atol 1e-6 for entries that cancel to ~0. A saved SAE has the input scale and decoder norms folded into its
# weights, which rounds every weight once more before the same sums: rtol 1e-4. Both sides must choose the same
# latents: with these seeds no token has its k-th and (k+1)-th pre-activations closer than ~1e-4, far above rounding.


def _copy_to_sae_lens(ours, theirs):
    with torch.no_grad():
        theirs.W_enc.copy_(ours.W_enc)
        theirs.b_enc.copy_(ours.b_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_dec.copy_(ours.b_dec)


def test_topk_forward_matches_sae_lens(make_sae):
    ours = make_sae("topk", d_in=D, width=W, k=K, scale=1.0)
    theirs = TopKSAE(TopKSAEConfig(d_in=D, d_sae=W, k=K))
    _copy_to_sae_lens(ours, theirs)
    x = torch.randn(64, D)
    ours.eval()
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs(x), rtol=1e-5, atol=1e-5)
    ours.train()  # the fast training path too
    out = ours(x)
    torch.testing.assert_close(out.latents.to_dense(W), theirs.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, theirs(x), rtol=1e-5, atol=1e-5)


def test_auxk_matches_sae_lens(make_sae):
    """sae-lens's AuxK = coef·scale·mean_b ||ê - e||² (no variance normalisation, no ReLU on ê's
    inputs); ours divides by ||e - ē||² (Gao et al.). Same ê and numerator: compare after
    undoing the documented denominators, with dead pre-activations kept positive."""
    ours = make_sae("topk", d_in=D, width=W, k=K, scale=1.0)
    dead = torch.arange(W) % 4 == 1
    with torch.no_grad():
        ours.b_enc[dead] += 20.0
    tcfg = TopKTrainingSAEConfig(d_in=D, d_sae=W, k=K, rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1.0)
    theirs = TopKTrainingSAE(tcfg)
    _copy_to_sae_lens(ours, theirs)
    x = torch.randn(64, D)
    ours.train()
    out = ours(x, dead)
    feat, hidden_pre = theirs.encode_with_hidden_pre(x)
    recon = theirs.decode(feat)
    torch.testing.assert_close(out.reconstruction, recon, rtol=1e-5, atol=1e-5)
    ref = theirs.calculate_topk_aux_loss(sae_in=x, sae_out=recon, hidden_pre=hidden_pre, dead_neuron_mask=dead)
    e = (x - recon).detach()
    ours_unnormalised = out.losses["aux"] * (e - e.mean(0)).pow(2).sum() / x.shape[0]
    torch.testing.assert_close(ours_unnormalised, ref, rtol=1e-4, atol=1e-6)


def test_topk_and_auxk_match_sparsify(make_sae):
    from sparsify import SparseCoder, SparseCoderConfig

    ours = make_sae("topk", d_in=D, width=W, k=K, scale=1.0)
    theirs = SparseCoder(D, SparseCoderConfig(num_latents=W, k=K))
    with torch.no_grad():
        theirs.encoder.weight.copy_(ours.W_enc.t())
        theirs.encoder.bias.copy_(ours.b_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_dec.copy_(ours.b_dec)
    x = torch.randn(64, D)
    dead = torch.arange(W) % 3 == 0
    ours.train()
    out = ours(x, dead)
    ref = theirs(x, dead_mask=dead)
    torch.testing.assert_close(out.reconstruction, ref.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["nmse"], ref.fvu, rtol=1e-5, atol=1e-6)
    ours_dense = out.latents.to_dense(W)
    theirs_dense = torch.zeros(64, W).scatter_(1, ref.latent_indices, ref.latent_acts)
    torch.testing.assert_close(ours_dense, theirs_dense, rtol=1e-5, atol=1e-5)
    # sparsify normalises AuxK by the variance of x, ours by that of e (documented choice)
    e = (x - out.reconstruction).detach()
    tv = (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.losses["aux"] * (e - e.mean(0)).pow(2).sum() / tv, ref.auxk_loss, rtol=1e-4, atol=1e-6)
    # gradients of the FVU agree too
    g1 = torch.autograd.grad(out.losses["nmse"], [ours.W_enc, ours.W_dec, ours.b_enc])
    g2 = torch.autograd.grad(ref.fvu, [theirs.encoder.weight, theirs.W_dec, theirs.encoder.bias])
    torch.testing.assert_close(g1[0], g2[0].t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g1[1], g2[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g1[2], g2[2], rtol=1e-4, atol=1e-6)


def _fit_thresholds(sae):
    sae.train()
    for _ in range(2):
        out = sae(torch.randn(128, D) * 3)
        sae.update_running_stats(out.feature_counts, 128, out.threshold_stat, True)
    sae.eval()


@pytest.mark.parametrize("arch", [a for a in architecture_names() if a != "codebook"])
def test_saved_sae_loads_in_sae_lens_with_same_activations(make_sae, tmp_path, arch):
    ours = make_sae(arch, d_in=D, width=W, k=K, scale=0.37)
    _fit_thresholds(ours)
    save_sae(ours, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
    assert cfg["saes_config"]["arch"] == arch and "threshold_decay" in cfg["saes_config"]
    theirs = SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, TopKSAE if arch == "topk" else JumpReLUSAE)
    x = torch.randn(64, D) * 3
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs(x), ours.decode(ours.encode(x)), rtol=1e-4, atol=1e-5)
    # ... and round-trips into the project with unit-norm decoder rows again
    back = load_sae(tmp_path, expected_d_in=D)
    assert back.cfg == ours.cfg
    torch.testing.assert_close(back.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(back.W_dec.norm(dim=1), torch.ones(W), rtol=1e-5, atol=1e-5)


def test_register_with_sae_lens(make_sae, tmp_path):
    from saes import register_with_sae_lens

    register_with_sae_lens()
    register_with_sae_lens()  # idempotent
    from sae_lens.registry import SAE_CLASS_REGISTRY

    assert "feature_choice" in SAE_CLASS_REGISTRY and "batchtopk" in SAE_CLASS_REGISTRY


@pytest.mark.parametrize("kind", ["topk", "topk_rescale", "jumprelu", "standard", "standard_no_bdec_in"])
def test_sae_lens_layout_loads_into_project(tmp_path, kind):
    torch.manual_seed(0)
    if kind.startswith("topk"):
        theirs = TopKSAE(TopKSAEConfig(d_in=D, d_sae=W, k=K, rescale_acts_by_decoder_norm=kind == "topk_rescale"))
    elif kind == "jumprelu":
        theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=W))
    else:
        theirs = StandardSAE(StandardSAEConfig(d_in=D, d_sae=W, apply_b_dec_to_input=kind == "standard"))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        if kind == "jumprelu":
            theirs.threshold.uniform_(0.0, 0.5)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path, expected_d_in=D)
    x = torch.randn(64, D)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs(x), rtol=1e-4, atol=1e-4)
    if kind != "topk_rescale":  # folding the decoder norm rescales the activations by ||W_dec_i||
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-5)


def _standard_saved(tmp_path, **cfg_changes):
    """A random sae-lens Standard SAE saved by sae-lens, its cfg.json then edited; returns (theirs, folder)."""
    torch.manual_seed(0)
    theirs = StandardSAE(StandardSAEConfig(d_in=D, d_sae=W))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **cfg_changes}))
    return theirs, tmp_path


def test_expected_average_only_in_is_folded_with_its_scaling_factor(tmp_path):
    """sae-lens trains on s·x: the loaded SAE on raw x gives sae-lens's features of s·x and its output / s."""
    s = 2.5
    theirs, folder = _standard_saved(tmp_path, normalize_activations="expected_average_only_in", norm_scaling_factor=s)
    ours = load_sae(folder, expected_d_in=D)
    x = torch.randn(64, D)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(s * x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(s * x)) / s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("changes, phrase", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' normalises each input on its own"),
    ({"normalize_activations": "constant_norm_rescale"}, "supported: none, expected_average_only_in"),
    ({"normalize_activations": "covariance_whitening"}, "supported: none, expected_average_only_in"),
    ({"normalize_activations": "expected_average_only_in"}, "needs its norm_scaling_factor"),
    ({"normalize_activations": "expected_average_only_in", "norm_scaling_factor": -1}, "needs its norm_scaling_factor"),
    ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z' is not supported"),
])
def test_an_input_transform_that_cannot_be_honoured_is_refused_in_one_line(tmp_path, changes, phrase):
    """Never a silent misload: what sae-lens does to inputs is folded in or refused."""
    _, folder = _standard_saved(tmp_path, **changes)
    with pytest.raises(SAELoadError) as info:
        load_sae(folder, expected_d_in=D)
    _one_line(info.value)
    assert phrase in str(info.value)


# ----------------------------------------------------------------------------- bad files
def _one_line(e):
    assert isinstance(e, ValueError) and isinstance(e, SAEError) and "\n" not in str(e)


def test_load_wrong_d_in(make_sae, tmp_path):
    save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path)
    with pytest.raises(SAELoadError) as e:
        load_sae(tmp_path, expected_d_in=D + 1)
    _one_line(e.value)
    assert "d_in" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing", "bad_json", "bad_shape"])
def test_load_corrupted(make_sae, tmp_path, damage):
    save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path)
    wp = tmp_path / "sae_weights.safetensors"
    data = wp.read_bytes()
    if damage == "truncate":
        wp.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        wp.write_bytes(b"\x00\xff" * 100)
    elif damage == "empty":
        wp.write_bytes(b"")
    elif damage == "missing":
        wp.unlink()
    elif damage == "bad_json":
        (tmp_path / "cfg.json").write_text("{not json")
    elif damage == "bad_shape":
        from safetensors.torch import save_file

        save_file({"W_enc": torch.zeros(D, W + 1), "b_enc": torch.zeros(W), "W_dec": torch.zeros(W, D), "b_dec": torch.zeros(D)}, str(wp))
    with pytest.raises(SAELoadError) as e:
        load_sae(tmp_path)
    _one_line(e.value)


def test_load_unknown_arch(make_sae, tmp_path):
    save_sae(make_sae("topk", d_in=D, width=W, k=K), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saes_config"]["arch"] = "mystery"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError) as e:
        load_sae(tmp_path)
    _one_line(e.value)
    assert "topk" in str(e.value) and "feature_choice" in str(e.value)
    cfg["architecture"] = "mystery"
    del cfg["saes_config"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError) as e:
        load_sae(tmp_path)
    _one_line(e.value)


def test_codebook_roundtrip(tmp_path):
    torch.manual_seed(0)
    cb = build(SAEConfig(d_in=D, width=64, k=3, arch="codebook"))
    cb.init_from_data(torch.randn(500, D) * 4)
    save_sae(cb, tmp_path)
    back = load_sae(tmp_path, expected_d_in=D)
    x = torch.randn(20, D) * 4
    torch.testing.assert_close(back.encode(x), cb.encode(x))
    torch.testing.assert_close(back.decode(back.encode(x)), cb.decode(cb.encode(x)))
