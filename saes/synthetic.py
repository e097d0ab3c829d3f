"""Synthetic activations from known sparse features in superposition (ground-truth tests).

    f_1..f_n ∈ ℝ^d  random unit directions (n > d: superposition)
    x = Σ_{i∈A} a_i f_i + σ ε ,   |A| = k per token, A drawn with Zipf-ish feature frequencies
                                  p_i ∝ i^-freq_decay, a_i ~ U[0.5, 1.5]
Recovery score: mean over true features of max_j cos(f_i, W_dec[j]).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class SyntheticFeatures:
    def __init__(self, d: int = 32, n_features: int = 64, k: int = 3, noise: float = 0.01, freq_decay: float = 0.5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        f = torch.randn(n_features, d, generator=g)
        self.features = f / f.norm(dim=1, keepdim=True)  # (n, d)
        p = torch.arange(1, n_features + 1, dtype=torch.float64) ** -freq_decay
        self.probs = (p / p.sum()).float()  # (n,)
        self.k, self.noise, self.seed = k, noise, seed

    def batches(self, n_batches: int, batch_size: int, seed: int | None = None) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        for _ in range(n_batches):
            idx = torch.multinomial(self.probs.expand(batch_size, -1), self.k, replacement=False, generator=g)  # (B, k)
            a = torch.rand(batch_size, self.k, generator=g) + 0.5  # (B, k)
            x = torch.einsum("bk,bkd->bd", a, self.features[idx])  # (B, d)
            yield x + self.noise * torch.randn(x.shape, generator=g)


def recovery_score(true_features: Tensor, W_dec: Tensor) -> float:
    """Mean over true features of the max cosine similarity with any decoder row."""
    t = true_features / true_features.norm(dim=1, keepdim=True)
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((t @ w.t()).max(dim=1).values.mean())
