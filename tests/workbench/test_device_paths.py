"""Analysis, evaluation and the probes' SAE and CETT paths run on the device they are given.

On the CPU the hot per-batch parts run on ``meta`` (which raises on any value read and yields meta
outputs only when nothing was made on another device), host reads are counted per batch, and the
compact results are checked against naive dense references. The ``gpu`` tests compare CUDA with the CPU.
"""

import types

import duckdb
import numpy as np
import pytest
import torch

import saes
from saes import SAEConfig, build
from saes.evals import reconstruction_sums
from workbench import analysis, training

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HOOK = "blocks.1.hook_resid_post"


def _sae(width=64, k=5, d_in=16, seed=0, arch="topk", biased=True):
    torch.manual_seed(seed)
    sae = build(SAEConfig(d_in=d_in, width=width, k=k, arch=arch)).eval()
    if arch != "codebook" and biased:
        with torch.no_grad():
            sae.b_enc.copy_(torch.linspace(-4.0, -1.0, width))  # some top-k pre-activations < 0: rows hold 0..k nonzeros
    return sae


def _dense_nonzeros(sae, x):
    with torch.no_grad():
        z = sae.encode(x)
    token, feature = z.nonzero(as_tuple=True)
    return token.numpy(), feature.numpy(), z[token, feature].numpy()


# -- analysis: the encode path ----------------------------------------------------------------
def test_sparse_codes_run_on_meta(monkeypatch):
    monkeypatch.setattr(analysis, "ENCODE_ELEMENTS", 64 * 7)  # 7 rows per chunk: 8 chunks
    sae = _sae().to("meta")
    packed = analysis.sparse_codes(sae, torch.empty(50, 16, device="meta"), 6)
    assert packed.device.type == "meta" and packed.dtype == torch.int32 and packed.shape == (1 + 2 * 50 * 6,)


@pytest.mark.parametrize("elements", [analysis.ENCODE_ELEMENTS, 64 * 7])  # the batch at once; chunks of 7 rows
@pytest.mark.parametrize("start_slots", [1, 5, 64])  # grows from 1; exactly k; the whole width
def test_encode_nonzeros_equal_the_dense_nonzeros(monkeypatch, elements, start_slots):
    monkeypatch.setattr(analysis, "ENCODE_ELEMENTS", elements)
    sae, x = _sae(), torch.randn(50, 16)
    token, feature, value, slots = analysis.encode_nonzeros(sae, x, start_slots)
    if elements == analysis.ENCODE_ELEMENTS:
        expected = _dense_nonzeros(sae, x)
    else:  # each chunk encoded on its own, as the chunked path does (its matmul may round differently)
        parts = [_dense_nonzeros(sae, x[i : i + 7]) for i in range(0, 50, 7)]
        expected = (np.concatenate([t + i * 7 for i, (t, _, _) in enumerate(parts)]),
                    np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
    counts = np.bincount(expected[0], minlength=50)
    assert counts.min() == 0 and counts.max() == 5  # rows of 0..k nonzeros: padding slots were exercised
    np.testing.assert_array_equal(token, expected[0])
    np.testing.assert_array_equal(feature, expected[1])
    np.testing.assert_array_equal(value, expected[2])
    assert slots == (start_slots if start_slots >= 5 else 5)  # 1 grows to max(2·1, 5)


def test_codebook_codes_compact_too():
    sae, x = _sae(width=40, k=3, arch="codebook"), torch.randn(30, 16)
    token, feature, value, _ = analysis.encode_nonzeros(sae, x, 3)
    expected = _dense_nonzeros(sae, x)
    assert token.size == 90
    for got, want in zip((token, feature, value), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows", [20, 300])
def test_encode_nonzeros_read_the_host_once_per_batch(host_reads, monkeypatch, rows):
    monkeypatch.setattr(analysis, "ENCODE_ELEMENTS", 64 * 16)  # 2 and 19 chunks
    sae, x = _sae(), torch.randn(rows, 16)
    with host_reads() as reads:
        analysis.encode_nonzeros(sae, x, 5)
    assert reads.calls == {"cpu": 1, "numpy": 1}  # one packed transfer, whatever the number of chunks
    with host_reads() as reads:
        analysis.encode_nonzeros(sae, x, 1)  # too few slots: one more transfer after the growth
    assert reads.calls == {"cpu": 2, "numpy": 2}


# -- analysis: co-occurrence ------------------------------------------------------------------
def test_cooccurrence_counts_equal_the_dense_reference(monkeypatch):
    monkeypatch.setattr(analysis, "COOC_TOKENS", 2 * 9)  # two contexts per step
    monkeypatch.setattr(analysis, "COOC_LOOKUPS", 12)  # a few nonzeros per lookup slice
    generator = torch.Generator().manual_seed(0)
    ids, ctx_len, width, k = [3, 5, 8, 13, 21], 9, 30, 4
    fires = torch.rand(len(ids), ctx_len, width, generator=generator) < 0.2  # [contexts, L, width]
    fires[:, 0] = False  # BOS is never stored
    fires[4] = False  # the last step (context 21 alone) finds no rows
    c, p, f = fires.nonzero(as_tuple=True)
    con = duckdb.connect()
    con.execute("CREATE TABLE feature_acts (sae_id INTEGER, context_id BIGINT, position SMALLINT, feature INTEGER, value FLOAT)")
    stored = [[ids[a], b, g] for a, b, g in zip(c.tolist(), p.tolist(), f.tolist())]
    con.executemany("INSERT INTO feature_acts VALUES (7, ?, ?, ?, 1.0)", stored)
    con.execute("INSERT INTO feature_acts VALUES (8, 3, 1, 0, 1.0)")  # another SAE's row is not counted
    others = torch.stack([torch.randperm(width - 1, generator=generator)[:k] for _ in range(width)])  # [width, k]
    others += (others >= torch.arange(width)[:, None]).long()  # never the feature itself
    record = types.SimpleNamespace(sae_id=7)
    both = analysis._cooccurrence(con, record, others, ids, ctx_len)
    flat = fires.reshape(-1, width)
    expected = (flat[:, :, None] & flat[:, others]).sum(0)  # [width, k]
    assert torch.equal(both, expected)


# -- training: where evaluation runs ------------------------------------------------------------
def test_run_device_defaults_to_the_models_device():
    loaded = types.SimpleNamespace(model=torch.nn.Linear(2, 2).to("meta"))
    assert training.run_device(None, loaded) == torch.device("meta")
    assert training.run_device("cpu", loaded) == torch.device("cpu")  # an explicit device wins
    assert training.run_device(None) == saes.resolve_device("auto")


def test_evaluate_moves_the_sae_and_its_batches_to_the_device(monkeypatch):
    seen = {}

    def fake_iter(ws, hook, batch_size, **kw):
        seen["device"] = kw["device"]
        return (torch.randn(8, 16).to(kw["device"]) for _ in range(3))  # a generator, as iter_activations is

    def sums_only(sae, batches):  # the per-batch part; meta cannot give values
        sums, n = reconstruction_sums(sae, batches)
        seen["sums"] = {key: t.device.type for key, t in sums.items()}
        return {"tokens": n}

    monkeypatch.setattr(training, "iter_activations", fake_iter)
    monkeypatch.setattr(training, "reconstruction_metrics", sums_only)
    ws = types.SimpleNamespace(resolve_hook_run=lambda hook, run_id: 1)
    sae = _sae()
    assert training.evaluate(ws, sae, HOOK, device="meta") == {"tokens": 24}
    assert seen["device"] == torch.device("meta") and set(seen["sums"].values()) == {"meta"}
    assert next(sae.parameters()).device.type == "meta"


# -- probes: the SAE of a moe run -----------------------------------------------------------------
def test_moe_sae_ablation_runs_on_the_activations_device():
    from probes import moe_kinds

    sae = _sae()  # on the CPU, the activations on meta
    units = moe_kinds.Units(model=None, plan=types.SimpleNamespace(sae=types.SimpleNamespace(hook=HOOK)), sae=sae)
    ((hook, ablate),) = moe_kinds._sae_removal(units, {0: np.array([1, 2])}).hooks
    out = ablate(torch.empty(2, 5, 16, device="meta"))
    assert hook == HOOK and out.device.type == "meta" and out.shape == (2, 5, 16)
    assert next(sae.parameters()).device.type == "meta"


# -- CUDA against the CPU -------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_analysis_encode_on_cuda_matches_the_cpu():
    sae, x = _sae(width=512, k=8), torch.randn(700, 16)
    cpu = analysis.encode_nonzeros(sae, x, 8)
    gpu = analysis.encode_nonzeros(_sae(width=512, k=8).cuda(), x.cuda(), 8)
    # different float32 matmul kernels round differently (~1e-6 relative): the same latents fire unless two
    # pre-activations tie within that, which random weights make improbable at this size
    for a, b in zip(cpu[:2], gpu[:2]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(gpu[2], cpu[2], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_analyze_and_evaluate_on_cuda_match_the_cpu(tmp_path):
    import shutil

    from workbench.cli import main
    from workbench.workspace import Workspace

    db = tmp_path / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "3200", "--ctx", "32", "--db", str(db)]) == 0
    saved = saes.save_sae(_sae(width=96, k=4, d_in=64), tmp_path / "sae")
    with Workspace(db) as ws:
        on_cuda = training.register_saved(ws, saved, HOOK, name="s", device="cuda").metrics
        on_cpu = training.evaluate(ws, saes.load_sae(saved), HOOK, device="cpu")
    assert on_cuda["l0"] == pytest.approx(on_cpu["l0"]) and on_cuda["fvu"] == pytest.approx(on_cpu["fvu"], rel=1e-3)
    copy = tmp_path / "copy.duckdb"
    shutil.copy(db, copy)
    tables = []
    for path, device in ((db, "cpu"), (copy, "cuda")):
        with Workspace(path) as ws:
            analysis.analyze(ws, "s", device=device, progress=False)
            tables.append([ws.query(f"SELECT * FROM {t} ORDER BY ALL") for t in ("feature_acts", "feature_related")])
    (acts_cpu, related_cpu), (acts_gpu, related_gpu) = tables
    assert [r[:4] for r in acts_cpu] == [r[:4] for r in acts_gpu]
    np.testing.assert_allclose([r[4] for r in acts_gpu], [r[4] for r in acts_cpu], rtol=1e-4, atol=1e-5)
    assert [(r[1], r[2], r[4]) for r in related_cpu] == [(r[1], r[2], r[4]) for r in related_gpu]  # ids and Jaccard


@pytest.mark.gpu
@needs_cuda
def test_cett_search_and_moe_scores_on_cuda_match_the_cpu():
    from probes import moe_kinds
    from probes.cett import LayerThresholdSearch

    generator = torch.Generator().manual_seed(0)
    acts, w_out = torch.randn(256, 48, generator=generator).relu(), torch.randn(16, 48, generator=generator)
    cpu, gpu = LayerThresholdSearch(acts, w_out, grid_size=128), LayerThresholdSearch(acts, w_out.cuda(), grid_size=128)
    assert gpu.acts.device.type == "cuda"
    # the same sorted norms and grid up to float32 rounding; thresholds pick the same grid index
    for target in (0.01, 0.05, 0.2):
        assert gpu.threshold(target) == pytest.approx(cpu.threshold(target), rel=1e-5)
    sae, rows = _sae(), torch.randn(100, 16)
    scores = moe_kinds._sae_encode(_sae().cuda(), rows)  # CPU rows, CUDA SAE: scores come back to the rows' device
    assert scores.device.type == "cpu"
    torch.testing.assert_close(scores, moe_kinds._sae_encode(sae, rows), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_prompt_inspector_encodes_on_the_saes_device(tiny):
    from workbench.features import features_for_prompt

    # unbiased: the top 3 of 96 pre-activations are positive, so no zeros tie for a place (their order is the kernel's)
    cpu = features_for_prompt(tiny, _sae(width=96, k=4, d_in=64, biased=False), HOOK, "def main():\n    return 1", top=3)
    gpu = features_for_prompt(tiny, _sae(width=96, k=4, d_in=64, biased=False).cuda(), HOOK, "def main():\n    return 1", top=3)
    assert gpu["tokens"] == cpu["tokens"] and gpu["features"] == cpu["features"]
    np.testing.assert_allclose(gpu["values"], cpu["values"], rtol=1e-4, atol=1e-5)
