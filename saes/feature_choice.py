"""Feature Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice SAEs").

    training:   S = { (b, i) : b ∈ top-m_i_b P[b, i] }   each feature picks its m_i tokens, Σ m_i = k·B = nnz
    inference:  Z = ReLU(P) · 1[P[b, i] > θ_i]           per-feature thresholds
    θ_i ← EMA_{0.999}( m_i-th largest ReLU(P[:, i]) ), started after LR warm-up (choice)

Capacities (choice): uniform m_i = ⌊k·B/F⌋, the remainder r = k·B - F·⌊k·B/F⌋ going to the r
features with the largest max pre-activation in the batch; or Zipf-shaped m_i ∝ rank_i^-α with
α fitted to the running densities, capped at B with the excess re-spread (water-filling), then
rounded by largest remainder so that Σ m_i = k·B. A token may end with zero latents.

Host reads: none with uniform capacities (the largest capacity ⌈k·B/F⌉ is known on the host).
Zipf capacities read one number per step, the largest m_i, which sizes the per-feature top-m;
everything else (the fit of α, water-filling, rounding) stays on the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import sparse_ops
from .base import BaseSAE, Selection
from .losses import fit_zipf, ranks
from .registry import register


@register
class FeatureChoiceSAE(BaseSAE):
    arch = "feature_choice"
    threshold_kind = "per_feature"
    sae_lens_architecture = "jumprelu"

    def capacities(self, pre_t: Tensor) -> Tensor:
        """(F,) int64 tokens per feature for this batch, each <= B, summing to k·B.

        Takes the transposed pre-activations ``pre_t`` (F, B): row reductions are contiguous.
        """
        F, B = pre_t.shape
        total = self.cfg.k * B
        if self.cfg.capacity == "uniform":
            q, r = divmod(total, F)
            m = torch.full((F,), q, dtype=torch.int64, device=pre_t.device)
            if r:  # the r features with the largest batch max pre-activation take one more
                m.index_fill_(0, torch.topk(pre_t.max(dim=1).values, r).indices, q + 1)
            return m
        _, alpha = fit_zipf(self.density)  # () float64; 0 before any density (-> uniform shares)
        raw = water_fill(ranks(self.density).double().pow(-alpha), total, B)  # (F,) real shares <= B, summing to k·B
        m = raw.floor().to(torch.int64).clamp(max=B)
        rem = total - m.sum()  # () remainder, < F
        key = torch.where(alpha > 0, raw - m.double(), pre_t.max(dim=1).values.double())  # largest remainder (uniform: batch max)
        key = key.masked_fill(m >= B, -math.inf)
        order = torch.argsort(key, descending=True, stable=True)
        place = torch.empty_like(order).scatter_(0, order, torch.arange(F, device=order.device))  # (F,) rank of each key
        return m + ((place < rem) & (m < B)).to(torch.int64)

    def max_capacity(self, m: Tensor, n_tokens: int) -> int:
        """max_i m_i as a host int: ⌈k·B/F⌉ for uniform capacities; Zipf reads it (the one read per step)."""
        if self.cfg.capacity == "uniform":
            return -(-self.cfg.k * n_tokens // self.width)
        return max(1, int(m.max().item()))

    def select(self, pre: Tensor) -> Selection:
        B, F = pre.shape
        pre_t = pre.t().contiguous()  # (F, B): topk and max along contiguous rows, ~2x faster on CPU
        m = self.capacities(pre_t)  # (F,)
        mmax = self.max_capacity(m, B)
        vals, rows = pre_t.topk(mmax, dim=1, sorted=True)  # (F, mmax) each row descending
        keep = torch.arange(mmax, device=pre.device)[None, :] < m[:, None]  # (F, mmax), k·B True
        last = vals.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0].float().relu()  # (F,)
        stat = torch.where(m > 0, last, torch.full_like(last, float("nan")))
        keys = rows * F + torch.arange(F, device=pre.device)[:, None]  # (F, mmax) flat keys b·F + i
        kept = sparse_ops.compact(keys.reshape(-1), keep.reshape(-1), self.cfg.k * B)  # (k·B,)
        return Selection(sparse_ops.from_keys(kept, B, F), stat)


def water_fill(w: Tensor, total: float, cap: float) -> Tensor:
    """Shares of `total` proportional to w (F,) >= 0, each capped at `cap` with the excess re-spread
    over the others; needs total <= F·cap. Closed form, no loop and no read: with w sorted
    descending, the first c* shares are capped, where c* is the smallest c whose level
    λ_c = (total - c·cap) / Σ_{j>=c} w_j leaves the next share uncapped (λ_c w_c <= cap)."""
    order = torch.argsort(w, descending=True, stable=True)
    ws = w[order]  # (F,) descending
    suffix = ws.flip(0).cumsum(0).flip(0)  # (F,) Σ_{j>=c} w_j
    c = torch.arange(w.numel(), device=w.device, dtype=w.dtype)
    level = (total - c * cap) / suffix.clamp_min(torch.finfo(w.dtype).tiny)  # (F,)
    c_star = torch.argmax((level * ws <= cap).to(torch.int8))  # first True (the last c always qualifies)
    shares = torch.where(c < c_star, torch.full_like(ws, cap), level.index_select(0, c_star.reshape(1)) * ws)
    return torch.empty_like(shares).scatter_(0, order, shares)
