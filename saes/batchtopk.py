"""BatchTopK SAE (Bussmann et al. 2024) and Mutual Choice SAE (Ayonrinde 2024).

    training:   S = top-(k·B) entries of the flattened P (B·F)        budget k·B per batch
    inference:  Z = ReLU(P) · 1[P > θ]                                 one global threshold
    θ ← EMA_{0.999}( min_{(b,i)∈S} ReLU(P[b,i]) ), started after LR warm-up (choice)

Mutual Choice's unconstrained allocation is the same selection (tokens and features choose
each other under one k·B budget); it is a separate registry entry so that its config (and its
default use with aux_zipf) is recorded explicitly.
"""

from __future__ import annotations

from torch import Tensor

from . import sparse_ops
from .base import BaseSAE, Selection
from .registry import register


@register
class BatchTopKSAE(BaseSAE):
    arch = "batchtopk"
    threshold_kind = "global"
    sae_lens_architecture = "jumprelu"

    def select(self, pre: Tensor) -> Selection:
        B = pre.shape[0]
        rows, cols = sparse_ops.batch_topk_pairs(pre, self.cfg.k * B, self.cfg.k)  # (k·B,), (k·B,)
        stat = pre[rows, cols].float().relu().min()  # ()
        idx, valid = sparse_ops.pairs_to_padded(rows, cols, B)  # (B, K_max)
        return Selection(idx, valid, stat)


@register
class MutualChoiceSAE(BatchTopKSAE):
    arch = "mutual_choice"
