"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    S = { (b, i) : i ∈ top-k_i P[b, i] }        per token, k latents       (B, k) -> nnz = k·B entries
    Z = ReLU(P) · 1[S]

Training and inference use the same (batch-independent) selection. No host read on any device.
"""

from __future__ import annotations

from torch import Tensor

from . import sparse_ops
from .base import BaseSAE, Selection
from .registry import register


@register
class TopKSAE(BaseSAE):
    arch = "topk"
    threshold_kind = None
    sae_lens_architecture = "topk"

    def select(self, pre: Tensor) -> Selection:
        _, idx = pre.topk(self.cfg.k, dim=1, sorted=False)  # (B, k)
        return Selection(sparse_ops.per_token(idx), None)
