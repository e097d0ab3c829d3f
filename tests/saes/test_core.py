"""Fast paths vs naive references (values and gradients), selections, registry, bad input.

The tests that take the ``path`` fixture run twice: with the CPU-only fast paths of saes.sparse_ops
(numpy sorts, CSR matmul, BatchTopK candidates) and with the device path that CUDA and meta run.
"""


import pytest
import torch

import saes
from saes import SAEConfig, architecture_names, build, sparse_ops
from saes.errors import SAEConfigError, SAEError, UnknownArchitectureError
from saes.reference import (
    dense_forward,
    naive_batchtopk_mask,
    naive_feature_choice_mask,
    naive_topk_mask,
    selection_mask,
)

SAE_ARCHS = [a for a in architecture_names() if saes.get_class(a).__mro__[1].__name__ != "Module" and hasattr(saes.get_class(a), "select")]


@pytest.fixture(params=["cpu-fast-paths", "device-path"])
def path(request, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CPU_FAST_PATHS", request.param == "cpu-fast-paths")
    return request.param


def test_registry_names():
    names = architecture_names()
    for n in ("topk", "batchtopk", "feature_choice", "mutual_choice", "codebook"):
        assert n in names
    assert set(SAE_ARCHS) == set(names) - {"codebook"}
    for n in architecture_names(include_inference_only=True):
        assert saes.get_class(n).arch == n


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("with_aux", [False, True])
def test_fast_forward_matches_dense_reference(make_sae, arch, with_aux, path):
    sae = make_sae(arch)
    sae.train()
    x = torch.randn(48, 32) * 2 + 0.5
    aux_mask = (torch.arange(128) % 3 == 0) if with_aux else None
    out = sae(x, aux_mask)
    loss = out.losses["nmse"] + 0.5 * out.losses["aux"] + out.reconstruction.square().mean() * 1e-2
    grads = torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    ref = dense_forward(sae, x, aux_mask)
    rloss = ref["nmse"] + 0.5 * ref["aux"] + ref["recon"].square().mean() * 1e-2
    rgrads = torch.autograd.grad(rloss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    # The selection is the same computation on both sides (the same addmm, see saes.reference), so the same latents
    # are chosen; values and losses come from other kernels (gathers and sparse sums against dense float32 matmuls
    # over d_in = 32 or width = 128): a few ulps of values up to ~13, inside 1e-5 + 1e-5·|v|. The gradients (<= 0.1)
    # sum over the 48 tokens in other orders (sparse CSR matmuls against dense ones), hence rtol 1e-4, and atol 1e-6
    # (1e-5 of the largest) for entries that cancel to ~0.
    torch.testing.assert_close(out.latents.to_dense(128), ref["z"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, ref["recon"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["nmse"], ref["nmse"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["aux"], ref["aux"], rtol=1e-5, atol=1e-6)
    if with_aux:
        assert float(out.losses["aux"].detach()) > 0
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_gather_linear_input_grad(path):
    torch.manual_seed(0)
    x = torch.randn(16, 8, requires_grad=True)
    bd = torch.randn(8, requires_grad=True)
    W = torch.randn(8, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    pre = ((x - bd) @ W + b).detach()
    idx = pre.topk(5, dim=1).indices
    g = torch.randn(16, 5)
    v = sparse_ops.gather_linear(x, bd, W, b, pre, sparse_ops.per_token(idx)).view(16, 5)
    gs = torch.autograd.grad((v * g).sum(), [x, bd, W, b])
    ref = ((x - bd) @ W + b).gather(1, idx)
    rs = torch.autograd.grad((ref * g).sum(), [x, bd, W, b])
    for a, r in zip(gs, rs):  # sparse and dense float32 gradient sums of <= 16 terms of size ~1-10: a few ulps
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_sparse_decode_matches_dense(path):
    torch.manual_seed(0)
    W = torch.randn(50, 7, requires_grad=True)
    vals = torch.rand(9, 4, requires_grad=True)
    idx = torch.randint(0, 50, (9, 4))
    y = sparse_ops.sparse_decode(vals.reshape(-1), sparse_ops.per_token(idx), W)
    dense = torch.zeros(9, 50).scatter_add(1, idx, vals)
    yr = dense @ W
    torch.testing.assert_close(y, yr)
    g = torch.randn(9, 7)
    a = torch.autograd.grad((y * g).sum(), [W, vals])
    b = torch.autograd.grad((yr * g).sum(), [W, vals])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_variable_length_selections_match_the_dense_reference(path):
    """Tokens with different numbers of entries (as batch-level variants produce), one with none:
    values, reconstruction and every gradient equal the dense masked computation."""
    torch.manual_seed(1)
    x = torch.randn(12, 8, requires_grad=True)
    bd, W_enc, b = (torch.randn(8, requires_grad=True), torch.randn(8, 30, requires_grad=True), torch.randn(30, requires_grad=True))
    W_dec = torch.randn(30, 8, requires_grad=True)
    pre = ((x - bd) @ W_enc + b).detach()
    mask = torch.zeros(12, 30, dtype=torch.bool).scatter_(1, pre.topk(6, dim=1).indices, torch.rand(12, 6) < 0.5)
    mask[3] = False  # a token with no latent at all
    e = sparse_ops.from_mask(mask)
    assert torch.equal(e.offsets, torch.cumsum(mask.sum(1), 0) - mask.sum(1))
    g = torch.randn(12, 8)

    vals = sparse_ops.gather_linear(x, bd, W_enc, b, pre, e).relu()  # (nnz,)
    out = sparse_ops.sparse_decode(vals, e, W_dec)
    fast = torch.autograd.grad((out * g).sum(), [x, bd, W_enc, b, W_dec])

    ref_z = ((x - bd) @ W_enc + b).relu() * mask
    ref_out = ref_z @ W_dec
    ref = torch.autograd.grad((ref_out * g).sum(), [x, bd, W_enc, b, W_dec])
    torch.testing.assert_close(vals, ref_z.detach()[mask])  # CSR order = row-major order of the mask
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(out[3], torch.zeros(8))
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_entries_are_in_csr_order_with_static_sizes(make_sae, path):
    """Every trainable variant's selection: nnz = k·B (known before any value), tokens ascending
    (CSR order), no pair twice, offsets where each token starts."""
    pre = torch.randn(48, 128)
    pre[5] += 4.0  # a token with many latents in the batch-level variants
    for arch in SAE_ARCHS:
        e = make_sae(arch).select(pre).entries
        assert e.latent.shape == e.token.shape == (4 * 48,) and e.offsets.shape == (48,), arch
        assert torch.all(e.token[1:] >= e.token[:-1]) and (e.token * 128 + e.latent).unique().numel() == 4 * 48, arch
        assert torch.equal(e.offsets, torch.searchsorted(e.token, torch.arange(48))), arch


@pytest.mark.parametrize("arch", ["topk", "mutual_choice", "feature_choice"])
def test_training_step_under_a_callers_bf16_autocast(make_sae, arch, path):
    """Wrapping the whole step in autocast (as users do) works and stays close to fp32."""
    sae = make_sae(arch)
    sae.train()
    x = torch.randn(64, 32)
    ref = torch.autograd.grad(sae(x).losses["nmse"], sae.W_dec)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad = torch.autograd.grad(sae(x).losses["nmse"], sae.W_dec)[0]
    assert grad.dtype == torch.float32
    # bf16 pre-activations may flip a few near-tied selections, so compare directions, not elements
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.98


def test_topk_selection_matches_naive(make_sae, path):
    sae = make_sae("topk")
    pre = torch.randn(64, 128)
    torch.testing.assert_close(selection_mask(sae.select(pre), pre.shape), naive_topk_mask(pre, 4))


@pytest.mark.parametrize("skewed", [False, True])
def test_batchtopk_selection_matches_naive(make_sae, skewed, path):
    sae = make_sae("batchtopk")
    pre = torch.randn(64, 128)
    if skewed:  # one token holds more than 4k of the batch's top entries -> exact fallback path
        pre[3] += 10.0
    sel = sae.select(pre)
    torch.testing.assert_close(selection_mask(sel, pre.shape), naive_batchtopk_mask(pre, 4))
    assert float(sel.threshold_stat) == pytest.approx(float(pre[naive_batchtopk_mask(pre, 4)].relu().min()))


@pytest.mark.parametrize("seed", range(5))
def test_batch_topk_keys_equal_flat_topk_with_saturated_rows(seed, path):
    """Rows lifted by different amounts saturate their candidates (CPU fast path: exact second pass)."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(48, 200, generator=gen)
    lifted = torch.randperm(48, generator=gen)[:4]
    pre[lifted] += torch.tensor([0.5, 1.5, 3.0, 8.0])[:, None]
    keys = sparse_ops.batch_topk_keys(pre, n=6 * 48, row_k=6)
    got = torch.zeros(pre.numel(), dtype=torch.bool)
    got[keys] = True
    want = torch.zeros(pre.numel(), dtype=torch.bool)
    want[pre.reshape(-1).topk(6 * 48).indices] = True
    assert keys.numel() == 6 * 48 and torch.equal(got, want)


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_selection_matches_naive(make_sae, capacity, path):
    sae = make_sae("feature_choice", capacity=capacity)
    if capacity == "zipf":
        dens = torch.linspace(1, 0.001, 128) ** 2
        sae.update_running_stats(dens * 1000, 1000, None, False)
    pre = torch.randn(64, 128)
    m = sae.capacities(pre.t().contiguous())
    assert int(m.sum()) == 4 * 64
    if capacity == "zipf":
        assert int(m[0]) > int(m[-1])
    sel = sae.select(pre)
    mask = selection_mask(sel, pre.shape)
    torch.testing.assert_close(mask, naive_feature_choice_mask(pre, m))
    assert torch.equal(mask.sum(0), m)
    assert int(m.max()) <= 64
    # threshold statistic: m_i-th largest value per feature
    for i in (0, 5, 100):
        if int(m[i]) > 0:
            assert float(sel.threshold_stat[i]) == pytest.approx(float(pre[:, i].sort(descending=True).values[int(m[i]) - 1].relu()))


@pytest.mark.parametrize("arch", ["batchtopk", "mutual_choice", "feature_choice"])
def test_threshold_inference_form_is_batch_independent(make_sae, arch):
    sae = make_sae(arch)
    sae.train()
    x = torch.randn(256, 32)
    for _ in range(3):
        out = sae(x)
        sae.update_running_stats(out.feature_counts, 256, out.threshold_stat, update_thresholds=True)
    assert sae.thresholds_ready
    sae.eval()
    x = torch.randn(256, 32)  # fresh tokens: none sits exactly on a threshold
    z_full = sae.encode(x)
    z_rows = torch.cat([sae.encode(x[i : i + 1]) for i in range(256)])
    # One row and 256 rows go through different matmul kernels: latents (~3, float32 dot products over d_in = 32)
    # differ by a few ulps (<= 2e-6 seen), inside the float32 default of assert_close (1e-5 + 1.3e-6·|z|). No
    # pre-activation is near its threshold (the closest is ~3e-4 away for these seeds), so none flips.
    torch.testing.assert_close(z_full, z_rows)
    # inference L0 near the training budget once θ tracks it (same batch, EMA of the same stat)
    assert 0 < float((z_full != 0).sum(1).float().mean()) < 4 * 4
    # eval forward uses the inference form too
    torch.testing.assert_close(sae(x).latents.to_dense(128), z_full)


def test_threshold_ema_formula(make_sae):
    sae = make_sae("batchtopk")
    sae.update_running_stats(torch.zeros(128), 10, torch.tensor(2.0), True)
    assert float(sae.threshold) == 2.0
    sae.update_running_stats(torch.zeros(128), 10, torch.tensor(1.0), True)
    assert float(sae.threshold) == pytest.approx(0.999 * 2 + 0.001 * 1)
    sae.update_running_stats(torch.zeros(128), 10, torch.tensor(5.0), False)  # before warm-up end
    assert float(sae.threshold) == pytest.approx(0.999 * 2 + 0.001 * 1)


def test_zipf_fit_and_underused():
    from saes.losses import fit_zipf, underused_mask

    r = torch.arange(1, 201, dtype=torch.float64)
    dens = 0.3 * r ** -1.2
    c, a = fit_zipf(dens[torch.randperm(200)])  # 0-d tensors on the density's device
    assert float(a) == pytest.approx(1.2, rel=1e-6) and float(c) == pytest.approx(0.3, rel=1e-6)
    assert [float(v) for v in fit_zipf(torch.zeros(5))] == [0.0, 0.0]
    assert [float(v) for v in fit_zipf(torch.tensor([0.0, 0.25, 0.0]))] == [0.25, 0.0]
    dens2 = dens.clone()
    dens2[-20:] *= 0.01  # the tail falls far below the fitted law -> under-used
    dens2[-1] = 0
    m = underused_mask(dens2[torch.arange(199, -1, -1)], 0.1).flip(0)  # order-independent
    assert set(m.nonzero().flatten().tolist()) == set(range(180, 200))
    assert int(underused_mask(dens2, 1e-9).sum()) == 1  # gamma -> 0: only never-fired (dead)


@pytest.mark.parametrize("seed", range(6))
def test_water_fill_closed_form_matches_the_iterative_one(seed):
    from saes.feature_choice import water_fill
    from saes.reference import naive_water_fill

    gen = torch.Generator().manual_seed(seed)
    F, B = 96, 64
    alpha = [0.0, 0.5, 1.0, 1.5, 3.0, 6.0][seed]  # from uniform to one feature wanting far more than B
    w = torch.randperm(F, generator=gen).add(1).double().pow(-alpha)
    if seed == 1:
        w[:10] = w[0]  # ties among the capped
    for total in (4 * B, 40 * B):
        fast, ref = water_fill(w, total, B), naive_water_fill(w, total, B)
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-9)  # float64, sums in another order
        assert float(fast.max()) <= B and float(fast.sum()) == pytest.approx(total)


def test_decoder_constraints(make_sae):
    sae = make_sae("topk")
    sae.train()
    out = sae(torch.randn(32, 32))
    out.losses["nmse"].backward()
    sae.remove_parallel_grad()
    par = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert par.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))


def test_init_from_data_scale_and_median():
    sae = build(SAEConfig(d_in=16, width=64, k=4))
    x = torch.randn(2000, 16) * 5 + 3
    sae.init_from_data(x)
    s = float(sae.input_scale)
    assert (x * s).pow(2).sum(1).mean().item() == pytest.approx(16, rel=1e-4)
    torch.testing.assert_close(sae.b_dec / s, torch.full((16,), 3.0), atol=0.4, rtol=0)


# ----------------------------------------------------------------------------- bad input
def _one_line_value_error(exc: BaseException) -> None:
    assert isinstance(exc, ValueError) and isinstance(exc, SAEError)
    assert "\n" not in str(exc) and str(exc)


@pytest.mark.parametrize(
    "kw",
    [dict(width=0), dict(width=-3), dict(k=64), dict(k=100), dict(k=0), dict(d_in=0), dict(aux_loss="bogus")],
)
def test_bad_config(kw):
    args = dict(d_in=16, width=64, k=4) | kw
    with pytest.raises(SAEConfigError) as e:
        SAEConfig(**args)
    _one_line_value_error(e.value)


def test_unknown_arch_lists_registry():
    with pytest.raises(UnknownArchitectureError) as e:
        SAEConfig(d_in=16, width=64, k=4, arch="nope")
    _one_line_value_error(e.value)
    for n in architecture_names():
        assert n in str(e.value)


def test_bad_train_config():
    with pytest.raises(SAEConfigError) as e:
        saes.TrainConfig(lr=-1.0)
    _one_line_value_error(e.value)


def test_saes_imports_no_model_or_db_code():
    import subprocess
    import sys

    code = (
        "import sys, saes; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('duckdb', 'transformers', 'transformer_lens', 'workbench', 'sae_lens', 'sparsify')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
