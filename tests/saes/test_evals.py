"""saes.evals on the device: streamed sums stay on the SAE's device (meta runs them), one host read
per evaluation, and the chunked float32 KL against a float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from saes import SAEConfig, build
from saes.evals import downstream_metrics, kl_sum, metrics_from_sums, reconstruction_metrics, reconstruction_sums

EPS32 = torch.finfo(torch.float32).eps


def _naive_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The old computation: float64 log-softmaxes of the whole logits, KL per position (...)."""
    lc, ls = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    return (lc.exp() * (lc - ls)).sum(-1)


def _kl_tolerance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-position bound of the float32 error (kl_sum's docstring): each float32 log-probability is off
    by ≲ ε·(|log p_v| + |logsumexp|) ≤ ε·2·(max|logit| + log V), and the KL sums p-weighted differences of
    two of them, so |ΔKL| ≲ 4ε·(max|logit| + log V), plus ε·KL for the weights p in float32."""
    return 4 * EPS32 * (max(a.abs().max().item(), b.abs().max().item()) + math.log(a.shape[-1]))


@pytest.mark.parametrize("chunk_elements", [1, 3000, 7 * 1000, 1 << 24])  # one row, uneven chunks, all at once
def test_chunked_float32_kl_matches_the_float64_reference(chunk_elements):
    torch.manual_seed(0)
    a = 4 * torch.randn(5, 7, 1000)  # (batch, pos, vocab)
    b = a + 0.3 * torch.randn_like(a)
    mask = torch.rand(5, 7) > 0.3
    reference = _naive_kl(a, b)[mask].sum()
    got = kl_sum(a, b, mask, chunk_elements=chunk_elements)
    assert got.dtype == torch.float64 and got.shape == ()
    tol = _kl_tolerance(a, b) * int(mask.sum())
    assert abs(float(got) - float(reference)) <= tol
    assert float(kl_sum(a, a.clone(), mask, chunk_elements=chunk_elements)) == 0.0  # identical logits: exactly 0


def test_masked_out_positions_never_reach_the_kl():
    a = torch.randn(2, 3, 50)
    b = a.clone()
    b[0, 0] = float("nan")  # e.g. a padded position
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    assert float(kl_sum(a, b, mask)) == 0.0


def test_downstream_metrics_match_the_float64_reference():
    torch.manual_seed(1)
    acts = torch.randn(4, 9, 16)
    U = 3 * torch.randn(16, 300)
    targets = torch.randint(0, 300, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[:, 0] = False
    mask[3, 5:] = False  # padding

    def run_loss(patch):
        a = acts if patch is None else patch(acts)
        logits = a @ U  # (4, 9, 300)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"), logits, mask

    got = downstream_metrics(run_loss, patch=lambda a: 0.8 * a + 0.05)
    clean, spliced = acts @ U, (0.8 * acts + 0.05) @ U
    ref_kl = float(_naive_kl(clean, spliced)[mask].mean())
    # the CE means are float64 sums of the same float32 losses in another order: equal to ~1e-15
    assert got["ce_clean"] == pytest.approx(float(run_loss(None)[0].double()[mask].mean()), rel=1e-12)
    assert got["ce_zero_ablated"] == pytest.approx(math.log(300), rel=1e-6)
    assert abs(got["kl_clean_spliced"] - ref_kl) <= _kl_tolerance(clean, spliced)


def test_downstream_metrics_read_the_host_once(host_reads):
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 40)
    losses = torch.rand(2, 5)
    with host_reads() as reads:
        downstream_metrics(lambda patch: (losses, logits if patch is None else patch(logits)), patch=lambda a: a + 0.1)
    assert reads.calls == {"tolist": 1}


def _batches(n: int, d: int = 16, rows: int = 32, device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [(torch.randn(rows, d, generator=generator) + 1).to(device) for _ in range(n)]


@pytest.mark.parametrize("arch", ["topk", "codebook"])
def test_reconstruction_metrics_read_the_host_a_constant_number_of_times(host_reads, arch):
    sae = build(SAEConfig(d_in=16, width=64, k=4, arch=arch))
    counts = []
    for n in (2, 10):
        with host_reads() as reads:
            reconstruction_metrics(sae, _batches(n))
        counts.append(reads.count)
    assert counts[0] == counts[1] <= 1, counts  # the stacked results, once; nothing per batch


def test_reconstruction_sums_run_on_meta():
    """meta raises on a tensor made on another device and on any value read: the per-batch part has neither."""
    sae = build(SAEConfig(d_in=16, width=64, k=4)).to("meta").eval()
    sums, n = reconstruction_sums(sae, _batches(3, device="meta"))
    assert n == 96
    assert all(t.device.type == "meta" for t in sums.values())
    assert sums["x"].shape == (16,) and sums["fires"].shape == (64,) and sums["fires"].dtype == torch.int64
    assert sums["err"].dtype == torch.float64


def test_reconstruction_metrics_equal_the_naive_cpu_ones():
    torch.manual_seed(3)
    sae = build(SAEConfig(d_in=16, width=64, k=4)).eval()
    xs = _batches(5)
    got = reconstruction_metrics(sae, xs)
    X = torch.cat(xs).double()
    with torch.no_grad():
        Z = torch.cat([sae.encode(x) for x in xs])
        Xh = torch.cat([sae.decode(sae.encode(x)) for x in xs]).double()
    fires = (Z != 0).sum(0)
    # float64 sums of the same float32 values, in another order: relative ~1e-15
    assert got["fvu"] == pytest.approx(float((X - Xh).pow(2).sum() / (X - X.mean(0)).pow(2).sum()), rel=1e-9)
    assert got["l0"] == float((Z != 0).sum()) / X.shape[0]
    assert got["dead_fraction"] == float((fires == 0).double().mean())
    assert got["tokens"] == X.shape[0]
    with pytest.raises(ValueError, match="no batches"):
        metrics_from_sums(reconstruction_sums(sae, [])[0], 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evals_on_cuda_match_the_cpu():
    torch.manual_seed(4)
    sae = build(SAEConfig(d_in=16, width=64, k=4)).eval()
    xs = _batches(6)
    cpu = reconstruction_metrics(sae, xs)
    cuda_sae = build(SAEConfig(d_in=16, width=64, k=4)).eval()
    cuda_sae.load_state_dict(sae.state_dict())
    gpu = reconstruction_metrics(cuda_sae.cuda(), xs)  # CPU batches: moved to the SAE's device
    # TF32 may be on for CUDA matmuls (10-bit mantissa): FVU and cosine within 1e-2 relative; L0 and the
    # fractions count latents, which may differ only where two pre-activations tie within that precision
    assert gpu["fvu"] == pytest.approx(cpu["fvu"], rel=1e-2) and gpu["cosine"] == pytest.approx(cpu["cosine"], rel=1e-3)
    assert gpu["l0"] == pytest.approx(cpu["l0"]) and gpu["tokens"] == cpu["tokens"]
    logits = torch.randn(3, 20, 5000)
    losses = torch.rand(3, 20)

    def run(device):
        return downstream_metrics(lambda p: (losses.to(device), (logits if p is None else p(logits)).to(device)),
                                  patch=lambda a: 0.9 * a)

    on_cpu, on_cuda = run("cpu"), run("cuda")
    assert on_cuda["ce_clean"] == pytest.approx(on_cpu["ce_clean"], rel=1e-12)
    assert on_cuda["kl_clean_spliced"] == pytest.approx(on_cpu["kl_clean_spliced"], rel=1e-4, abs=1e-6)
