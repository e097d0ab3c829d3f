"""SAEBench-style "core" metrics (docs/algorithms.md §3), streamed over batches on the SAE's device.

    L0        = mean number of nonzero latents per token (inference form)
    FVU       = Σ||x - x̂||² / Σ||x - x̄||²   (x̄ = mean over all evaluated tokens),  EV = 1 - FVU
    cosine    = mean_tokens cos(x, x̂)
    dead      = fraction of latents that never fired on the evaluated tokens
    dense_p   = fraction of latents firing on > p of the tokens (p = 1%, 10%)
    downstream: H clean, H* spliced, H₀ zero-ablated (masked mean CE),
                CE loss recovered = (H₀ - H*) / (H₀ - H),  KL(clean || spliced) = Σ_v p_v (log p_v - log q_v)

Everything is accumulated as tensors on the SAE's (or the logits') device, float64 where sums
cancel (the FVU denominator Σx² - |Σx|²/n) and int64 for counts; the host reads the results once,
at the end. ``reconstruction_sums`` is the per-batch part on its own (no value is read, so it runs
on the ``meta`` device too).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

KL_CHUNK_ELEMENTS = 1 << 24  # logits per KL chunk: a few float32 (rows, vocab) temporaries of 64 MiB each


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def reconstruction_sums(sae: torch.nn.Module, batches: Iterable[Tensor]) -> tuple[dict[str, Tensor], int]:
    """Device-resident sums over ``batches`` (each (B, d), moved to the SAE's device) and the token count.

    No value is read into Python (the count comes from shapes), so this runs on ``meta`` and, on
    CUDA, never waits for the kernels it queues.
    """
    device = _device(sae)
    width = sae.cfg.width
    f64 = dict(dtype=torch.float64, device=device)
    sums = {
        "x": torch.zeros(sae.cfg.d_in, **f64),  # (d,) Σx
        "sq": torch.zeros((), **f64),  # Σ||x||²
        "err": torch.zeros((), **f64),  # Σ||x - x̂||²
        "cos": torch.zeros((), **f64),  # Σ cos(x, x̂)
        "fires": torch.zeros(width, dtype=torch.int64, device=device),  # (F,) tokens each latent fired on
    }
    n = 0
    for x in batches:
        x = x.to(device, non_blocking=True).float()  # (B, d)
        z = sae.encode(x)  # (B, F)
        x_hat = sae.decode(z).float()  # (B, d)
        xd = x.double()  # (B, d): small next to z
        sums["x"] += xd.sum(0)
        sums["sq"] += xd.pow(2).sum()
        sums["err"] += (xd - x_hat.double()).pow(2).sum()
        sums["cos"] += F.cosine_similarity(x, x_hat, dim=1).double().sum()
        sums["fires"] += (z != 0).sum(0)
        n += x.shape[0]
    return sums, n


def metrics_from_sums(sums: dict[str, Tensor], n: int) -> dict[str, float]:
    """The core metrics from ``reconstruction_sums``: one host read of a stacked float64 vector."""
    if n == 0:
        raise ValueError("reconstruction_metrics got no batches")
    fires = sums["fires"]
    freq = fires.double() / n  # (F,)
    total_var = sums["sq"] - sums["x"].pow(2).sum() / n
    stacked = torch.stack([
        total_var, sums["err"], sums["cos"], fires.sum().double(),
        (fires == 0).double().mean(), (freq > 0.01).double().mean(), (freq > 0.10).double().mean(),
    ])
    total_var, err, cos, l0, dead, dense1, dense10 = stacked.tolist()  # the one host read
    fvu = err / total_var if total_var > 0 else float("nan")
    return {
        "tokens": n,
        "l0": l0 / n,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "cosine": cos / n,
        "mse": err / n,
        "dead_fraction": dead,
        "dense_fraction_1pct": dense1,
        "dense_fraction_10pct": dense10,
    }


@torch.no_grad()
def reconstruction_metrics(sae: torch.nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """L0, FVU, EV, cosine, MSE, dead and dense fractions of ``sae`` over ``batches``, on the SAE's device."""
    was_training = sae.training
    sae.eval()
    try:
        sums, n = reconstruction_sums(sae, batches)
    finally:
        if was_training:
            sae.train()
    return metrics_from_sums(sums, n)


def _unpack(res: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(res, dict):
        return res["losses"], res["logits"], res.get("mask")
    if len(res) == 2:
        return res[0], res[1], None
    return res[0], res[1], res[2]


def sae_patch(sae: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """patch(acts (..., d)) -> SAE reconstruction of acts, same shape, dtype and device (the SAE runs on its own device)."""
    device = _device(sae)

    @torch.no_grad()
    def patch(acts: Tensor) -> Tensor:
        flat = acts.reshape(-1, acts.shape[-1]).to(device).float()  # (N, d)
        return sae.decode(sae.encode(flat)).reshape(acts.shape).to(acts.device, acts.dtype)

    return patch


def zero_patch(acts: Tensor) -> Tensor:
    return torch.zeros_like(acts)


def masked_mean(t: Tensor, mask: Tensor) -> Tensor:
    """Mean of t over mask (same shape) as a float64 0-d tensor on t's device (no boolean indexing,
    so no host sync); NaN or inf outside the mask is left out."""
    picked = torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device)).double()
    return picked.sum() / mask.sum()


def kl_sum(logit_p: Tensor, logit_q: Tensor, mask: Tensor, chunk_elements: int = KL_CHUNK_ELEMENTS) -> Tensor:
    """Σ over masked positions of KL(softmax(logit_p) || softmax(logit_q)): a float64 0-d tensor.

    logit_p, logit_q (..., V) float32 (any float dtype), mask (...) bool. The log-softmaxes are taken
    in float32 over chunks of ⌊chunk_elements / V⌋ positions, so the temporaries are a few
    (rows, V) float32 blocks and no float64 copy of the logits is ever made; each chunk's masked
    per-position KLs are added to one float64 scalar. Accuracy against float64 log-softmaxes: each
    float32 log-probability is off by ≲ ε₃₂·(|log p_v| + |logsumexp|), so a position's KL by
    ≲ 2ε₃₂·(H(p) + |logsumexp|) ≈ 1e-6 at V = 256 k (ε₃₂ = 1.2e-7, logits of order 10); identical
    logits give exactly 0.
    """
    V = logit_p.shape[-1]
    p, q = logit_p.reshape(-1, V), logit_q.reshape(-1, V)  # (N, V)
    m = mask.reshape(-1)  # (N,)
    rows = max(1, chunk_elements // max(1, V))
    total = torch.zeros((), dtype=torch.float64, device=p.device)
    for start in range(0, p.shape[0], rows):
        lp = F.log_softmax(p[start : start + rows].float(), dim=-1)  # (r, V)
        lq = F.log_softmax(q[start : start + rows].to(lp.device).float(), dim=-1)  # (r, V)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # (r,)
        keep = m[start : start + rows].to(kl.device)
        total += torch.where(keep, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).double().sum()
    return total


@torch.no_grad()
def downstream_metrics(run_loss: Callable[[Callable[[Tensor], Tensor] | None], Any], sae: torch.nn.Module | None = None, *,
                       patch: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered and KL(clean || spliced).

    run_loss(patch) runs the LM with the hooked activation replaced by patch(acts) (None = clean)
    and returns (per-token losses, logits) or (losses, logits, mask) or a dict with those keys;
    mask (bool, same leading shape as losses) marks positions to score (BOS/padding excluded).
    Give either `sae` (spliced patch = its reconstruction) or an explicit `patch`. The means are
    float64 sums of the float32 losses on their device, KL as in ``kl_sum``; one host read at the end.
    """
    if patch is None:
        if sae is None:
            raise ValueError("downstream_metrics needs an sae or a patch")
        was_training = sae.training
        sae.eval()
        patch = sae_patch(sae)
    else:
        was_training = False
    l_clean, logit_clean, mask = _unpack(run_loss(None))
    l_splice, logit_splice, _ = _unpack(run_loss(patch))
    l_zero, _, _ = _unpack(run_loss(zero_patch))
    if sae is not None and was_training:
        sae.train()
    m = torch.ones_like(l_clean, dtype=torch.bool) if mask is None else mask.to(l_clean.device).bool()
    device = l_clean.device
    kl = kl_sum(logit_clean, logit_splice, m.to(logit_clean.device)).to(device) / m.sum()
    stacked = torch.stack([masked_mean(l_clean, m), masked_mean(l_splice.to(device), m), masked_mean(l_zero.to(device), m), kl])
    h, h_star, h0, kl_mean = stacked.tolist()  # the one host read
    denom = h0 - h
    return {
        "ce_clean": h,
        "ce_spliced": h_star,
        "ce_zero_ablated": h0,
        "ce_loss_recovered": (h0 - h_star) / denom if denom != 0 else float("nan"),
        "kl_clean_spliced": kl_mean,
    }
