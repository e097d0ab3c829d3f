"""Inference-only architectures for SAEs trained elsewhere (loaded from SAELens layout).

    jumprelu:  Z = ReLU(P) · 1[P > θ_i]        (per-feature thresholds, as sae-lens JumpReLUSAE)
    standard:  Z = ReLU(P)                     (sae-lens StandardSAE)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import sparse_ops
from .base import BaseSAE, Selection
from .registry import register


@register
class JumpReLUSAE(BaseSAE):
    arch = "jumprelu"
    threshold_kind = "per_feature"
    trainable = False
    sae_lens_architecture = "jumprelu"

    @property
    def thresholds_ready(self) -> bool:  # loaded thresholds: always ready, nothing to read
        return True

    def select(self, pre: Tensor) -> Selection:
        """Z' > θ_i as entries; data-sized (reads the count), which is fine: never trained here."""
        return Selection(sparse_ops.from_mask(pre > self.threshold.to(pre.dtype)), None)


@register
class StandardSAE(JumpReLUSAE):
    """ReLU SAE: a JumpReLU with all thresholds 0."""

    arch = "standard"
    sae_lens_architecture = "standard"

    def __init__(self, cfg):
        super().__init__(cfg)
        torch.nn.init.zeros_(self.threshold)
