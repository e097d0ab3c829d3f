"""Codebook bottleneck (Tamkin, Taufeeque & Goodman 2023, "Codebook Features").

    a    = s · x                                            (B, d)   input scale as the SAEs
    σ    = LN(a) · (C_i / ||C_i||)                          (B, N)   cosine ranking (LN without affine)
    S    = top-k_i σ[b, i]                                  (B, k)
    q    = Σ_{i∈S} C_i          (choice: sum as in the paper; `codebook_combine="mean"` divides by k)
    out  = q + (a - stopgrad(a))                            straight-through to the input
    L    = nmse(q, a) + λ · MSE(q, stopgrad(a))             λ = cfg.codebook_mse_coef (1)

Only the selected codes receive gradients (embedding_bag backward). Codes not selected for
`cfg.dead_code_window` steps are re-initialised from random inputs of the current batch plus
Gaussian noise (std `cfg.dead_code_noise` · input RMS), using a generator on the batch's device
seeded by (seed, step) so resumed runs match. `encode` returns the (B, N) code indicator (1, or
1/k for "mean") and `decode(z) = z C`, so L0 = k and the usual evals apply.

Host reads: none. The re-initialisation draws a candidate (input row, noise) for every code each
step and `torch.where` keeps it for the dead ones only (N·d random numbers per step, 1/B of the
scoring matmul), so how many codes died is never read; `codes_reinitialised` stays a device
tensor until the trainer's log read.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sparse_ops
from .base import ForwardOutput, Latents, bias_corrected, geometric_median  # noqa: F401
from .config import SAEConfig
from .losses import normalized_mse
from .registry import register


@register
class CodebookBottleneck(nn.Module):
    arch: ClassVar[str] = "codebook"
    threshold_kind: ClassVar[str | None] = None
    trainable: ClassVar[bool] = True
    sae_lens_architecture: ClassVar[str | None] = None  # no sae-lens equivalent

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        codes = torch.randn(cfg.width, cfg.d_in) / math.sqrt(cfg.d_in)
        self.codebook = nn.Parameter(codes)  # (N, d)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("density_ema", torch.zeros(cfg.width))
        self.register_buffer("density_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("steps_since_used", torch.zeros(cfg.width, dtype=torch.int64))
        self.register_buffer("ever_used", torch.zeros(cfg.width, dtype=torch.bool))

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def W_dec(self) -> Tensor:
        return self.codebook

    @property
    def _weight(self) -> float:
        return 1.0 / self.cfg.k if self.cfg.codebook_combine == "mean" else 1.0

    def _select(self, a: Tensor) -> Tensor:
        with torch.no_grad():
            a_ln = F.layer_norm(a.detach().float(), (a.shape[-1],))  # (B, d)
            c_hat = self.codebook.detach() / self.codebook.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
            scores = a_ln @ c_hat.t()  # (B, N)
            return scores.topk(self.cfg.k, dim=1, sorted=False).indices  # (B, k)

    def encode(self, x: Tensor) -> Tensor:
        a = x.float() * self.input_scale
        idx = self._select(a)
        z = torch.zeros(a.shape[0], self.width, dtype=a.dtype, device=a.device)  # (B, N)
        return z.scatter_(1, idx, self._weight)

    def decode(self, z: Tensor) -> Tensor:
        return (z.to(self.codebook.dtype) @ self.codebook) / self.input_scale

    def forward(self, x: Tensor, aux_mask: Tensor | None = None) -> ForwardOutput:
        a = x.float() * self.input_scale  # (B, d)
        idx = self._select(a)  # (B, k)
        w = torch.full(idx.shape, self._weight, dtype=a.dtype, device=a.device)  # (B, k)
        with sparse_ops.no_autocast(a.device):
            q = F.embedding_bag(idx, self.codebook, per_sample_weights=w, mode="sum")  # (B, d)
            nmse = normalized_mse(q, a.detach())
            mse = self.cfg.codebook_mse_coef * F.mse_loss(q, a.detach())
        out = q + (a - a.detach())  # straight-through
        ones = torch.ones_like(w).reshape(-1)  # (B·k,)
        counts = torch.zeros(self.width, dtype=a.dtype, device=a.device).index_add_(0, idx.reshape(-1), ones)  # (N,)
        return ForwardOutput(
            reconstruction=out / self.input_scale,
            latents=Latents(w, idx),
            losses={"nmse": nmse, "aux": q.new_zeros(()), "codebook_mse": mse},
            feature_counts=counts,
            threshold_stat=None,
        )

    # ----- hooks the trainer calls on every module ---------------------------------------------
    @torch.no_grad()
    def update_running_stats(self, feature_counts: Tensor, n_tokens: int | Tensor, threshold_stat, update_thresholds: bool) -> None:
        dd = self.cfg.density_decay
        n = n_tokens.clamp_min(1) if isinstance(n_tokens, Tensor) else max(1, n_tokens)
        self.density_ema.mul_(dd).add_(feature_counts.float() / n, alpha=1 - dd)
        self.density_updates += 1
        used = feature_counts > 0
        self.ever_used |= used
        self.steps_since_used.add_(1).masked_fill_(used, 0)

    @property
    def density(self) -> Tensor:
        return bias_corrected(self.density_ema, self.density_updates, self.cfg.density_decay)

    def remove_parallel_grad(self) -> None:  # no unit-norm constraint on codes
        return None

    def normalize_decoder(self) -> None:
        return None

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """Input scale from the sample, codes = random sample rows (+ noise), drawn on the CPU so every device starts alike."""
        sample = sample.float()
        if self.cfg.normalize_inputs:
            ms = sample.double().pow(2).sum(dim=1).mean()
            self.input_scale.copy_(torch.where(ms > 0, (self.cfg.d_in / ms).sqrt(), 1.0))
        a = sample * self.input_scale
        pick = torch.randint(0, a.shape[0], (self.width,)).to(a.device)
        codes = a[pick] / (self.cfg.k if self.cfg.codebook_combine == "sum" else 1.0)
        noise = torch.randn(codes.shape).to(a.device)
        self.codebook.copy_(codes + self.cfg.dead_code_noise * a.pow(2).mean().sqrt() * noise)

    @torch.no_grad()
    def post_step(self, x: Tensor, step: int, seed: int) -> dict[str, Tensor]:
        dead = self.steps_since_used >= self.cfg.dead_code_window  # (N,)
        device = x.device
        g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        a = x.float() * self.input_scale  # (B, d)
        pick = torch.randint(0, a.shape[0], (self.width,), generator=g, device=device)  # (N,)
        noise = torch.randn(self.width, a.shape[1], generator=g, device=device) * self.cfg.dead_code_noise * a.pow(2).mean().sqrt()
        new = a.index_select(0, pick) / (self.cfg.k if self.cfg.codebook_combine == "sum" else 1.0) + noise  # (N, d)
        self.codebook.copy_(torch.where(dead[:, None], new.to(self.codebook.dtype), self.codebook))
        self.steps_since_used.masked_fill_(dead, 0)
        return {"codes_reinitialised": dead.sum().float()}

    @torch.no_grad()
    def code_usage(self) -> dict[str, float]:
        """Fraction of codes ever used, and the normalised entropy of the running usage."""
        p = self.density.double()
        p = p / p.sum() if p.sum() > 0 else p
        nz = p[p > 0]
        ent = float(-(nz * nz.log()).sum() / math.log(self.width)) if nz.numel() else 0.0
        return {"code_usage_fraction": float(self.ever_used.float().mean()), "code_usage_entropy": ent}
