"""SAEBench-style "core" metrics (docs/algorithms.md §3), streamed over batches.

    L0        = mean number of nonzero latents per token (inference form)
    FVU       = Σ||x - x̂||² / Σ||x - x̄||²   (x̄ = mean over all evaluated tokens),  EV = 1 - FVU
    cosine    = mean_tokens cos(x, x̂)
    dead      = fraction of latents that never fired on the evaluated tokens
    dense_p   = fraction of latents firing on > p of the tokens (p = 1%, 10%)
    downstream: H clean, H* spliced, H₀ zero-ablated (masked mean CE),
                CE loss recovered = (H₀ - H*) / (H₀ - H),  KL(clean || spliced)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def reconstruction_metrics(sae: torch.nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    was_training = sae.training
    sae.eval()
    n = 0
    sum_x = None
    sum_sq = 0.0
    err = 0.0
    cos = 0.0
    l0 = 0.0
    fires = torch.zeros(sae.cfg.width, dtype=torch.float64)
    for x in batches:
        x = x.float()
        z = sae.encode(x)  # (B, F)
        x_hat = sae.decode(z)  # (B, d)
        xd = x.double()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_sq += float(xd.pow(2).sum())
        err += float((xd - x_hat.double()).pow(2).sum())
        cos += float(F.cosine_similarity(x, x_hat, dim=1).double().sum())
        active = z != 0
        l0 += float(active.sum())
        fires += active.sum(0).double()
        n += x.shape[0]
    if was_training:
        sae.train()
    if n == 0:
        raise ValueError("reconstruction_metrics got no batches")
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    fvu = err / total_var if total_var > 0 else float("nan")
    freq = fires / n
    return {
        "tokens": n,
        "l0": l0 / n,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "cosine": cos / n,
        "mse": err / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction_1pct": float((freq > 0.01).double().mean()),
        "dense_fraction_10pct": float((freq > 0.10).double().mean()),
    }


def _unpack(res: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(res, dict):
        return res["losses"], res["logits"], res.get("mask")
    if len(res) == 2:
        return res[0], res[1], None
    return res[0], res[1], res[2]


def sae_patch(sae: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """patch(acts (..., d)) -> SAE reconstruction of acts, same shape and dtype."""

    @torch.no_grad()
    def patch(acts: Tensor) -> Tensor:
        flat = acts.reshape(-1, acts.shape[-1]).float()
        return sae.decode(sae.encode(flat)).reshape(acts.shape).to(acts.dtype)

    return patch


def zero_patch(acts: Tensor) -> Tensor:
    return torch.zeros_like(acts)


@torch.no_grad()
def downstream_metrics(run_loss: Callable[[Callable[[Tensor], Tensor] | None], Any], sae: torch.nn.Module | None = None, *,
                       patch: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE loss recovered and KL(clean || spliced).

    run_loss(patch) runs the LM with the hooked activation replaced by patch(acts) (None = clean)
    and returns (per-token losses, logits) or (losses, logits, mask) or a dict with those keys;
    mask (bool, same leading shape as losses) marks positions to score (BOS/padding excluded).
    Give either `sae` (spliced patch = its reconstruction) or an explicit `patch`.
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
    m = torch.ones_like(l_clean, dtype=torch.bool) if mask is None else mask.bool()

    def mean(t: Tensor) -> float:
        return float(t.double()[m].mean())

    h, h_star, h0 = mean(l_clean), mean(l_splice), mean(l_zero)
    lp_c = F.log_softmax(logit_clean.double(), dim=-1)
    lp_s = F.log_softmax(logit_splice.double(), dim=-1)
    kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)  # leading shape
    denom = h0 - h
    return {
        "ce_clean": h,
        "ce_spliced": h_star,
        "ce_zero_ablated": h0,
        "ce_loss_recovered": (h0 - h_star) / denom if denom != 0 else float("nan"),
        "kl_clean_spliced": float(kl[m].mean()),
    }
