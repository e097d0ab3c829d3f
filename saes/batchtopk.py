"""BatchTopK SAE (Bussmann et al. 2024) and Mutual Choice SAE (Ayonrinde 2024).

    training:   S = top-(k·B) entries of the flattened P (B·F)        budget k·B per batch, nnz = k·B
    inference:  Z = ReLU(P) · 1[P > θ]                                 one global threshold
    θ ← EMA_{0.999}( min_{(b,i)∈S} ReLU(P[b,i]) ), started after LR warm-up (choice)

Mutual Choice's unconstrained allocation is the same selection (tokens and features choose
each other under one k·B budget); it is a separate registry entry so that its config (and its
default use with aux_zipf) is recorded explicitly.

Host reads: none on CUDA and meta (one flattened topk(k·B), then the k·B keys are sorted into CSR
entries). On the CPU the candidate fast path of `sparse_ops.batch_topk_keys` reads one number per
step (how many rows saturated their candidates), where a read costs nothing; with
`sparse_ops.CPU_FAST_PATHS = False` the CPU runs the device path and reads nothing.
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
        B, F = pre.shape
        keys = sparse_ops.batch_topk_keys(pre, self.cfg.k * B, self.cfg.k)  # (k·B,) flat keys b·F + i
        stat = pre.reshape(-1).index_select(0, keys).float().relu().min()  # ()
        return Selection(sparse_ops.from_keys(keys, B, F), stat)


@register
class MutualChoiceSAE(BatchTopKSAE):
    arch = "mutual_choice"
