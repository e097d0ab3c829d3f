"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    S = { (b, i) : i ∈ top-k_i P[b, i] }        per token, k latents       (B, k)
    Z = ReLU(P) · 1[S]

Training and inference use the same (batch-independent) selection.
"""

from __future__ import annotations

from torch import Tensor

from .base import BaseSAE, Selection
from .registry import register


@register
class TopKSAE(BaseSAE):
    arch = "topk"
    threshold_kind = None
    sae_lens_architecture = "topk"

    def select(self, pre: Tensor) -> Selection:
        _, idx = pre.topk(self.cfg.k, dim=1, sorted=False)  # (B, k)
        return Selection(idx, None, None)
