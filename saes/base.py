"""Base sparse autoencoder; variants override only `select`.

    x_n  = s * x                                   (B, d)   s: input scale, E||x_n||^2 = d
    P    = (x_n - b_dec) W_enc + b_enc             (B, F)   pre-activations
    Z'   = ReLU(P)
    S    = select(P)                               the surviving (token, latent) pairs
    Z    = Z' * 1[S]                               (B, F)   latents
    x̂_n  = Z W_dec + b_dec ,  x̂ = x̂_n / s          (B, d)   rows of W_dec unit norm
    L    = ||x_n - x̂_n||^2 / ||x_n - mean_B(x_n)||^2  + aux terms (saes.losses)

Training uses the variant's batch-dependent `select`; `encode` (and `forward` in eval mode)
uses the batch-independent inference form: the same top-k for TopK, one global threshold θ
(BatchTopK, Mutual Choice) or per-feature thresholds θ_i (Feature Choice), Z = Z'·1[P > θ].
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import sparse_ops
from .config import SAEConfig
from .losses import auxk_loss, normalized_mse


class Selection(NamedTuple):
    """What a variant's `select` returns."""

    indices: Tensor
    """(B, K) int64 latent indices per token (padded when rows hold different counts)."""
    valid: Tensor | None
    """(B, K) bool, False on padding slots; None when every slot is real (TopK)."""
    threshold_stat: Tensor | None = None
    """Per-batch statistic the inference threshold EMA tracks: () smallest selected value,
    or (F,) m_i-th largest per feature (NaN when m_i = 0)."""


class Latents(NamedTuple):
    """Sparse latents: Z[b, indices[b, j]] = values[b, j] (padding slots carry value 0)."""

    values: Tensor
    """(B, K) float activations (>= 0)."""
    indices: Tensor
    """(B, K) int64 latent ids."""

    def to_dense(self, width: int) -> Tensor:
        z = self.values.new_zeros(self.values.shape[0], width)  # (B, F)
        return z.scatter_add_(1, self.indices, self.values)


class ForwardOutput(NamedTuple):
    """One typed output for every variant (the trainer never branches on the variant)."""

    reconstruction: Tensor
    """(B, d_in) x̂ in the caller's (un-normalised) space."""
    latents: Latents
    """Sparse latents (values, indices); `.to_dense(width)` gives (B, F)."""
    losses: dict[str, Tensor]
    """Unweighted loss terms: `nmse` (normalised MSE = batch FVU) and `aux` (AuxK / aux_zipf; 0 if unused).
    The codebook adds `codebook_mse` (already weighted by λ)."""
    feature_counts: Tensor
    """(F,) number of tokens on which each latent fired (> cfg.fire_threshold) in this batch."""
    threshold_stat: Tensor | None
    """Statistic for the inference-threshold EMA (None for batch-independent variants)."""


class BaseSAE(nn.Module):
    arch: ClassVar[str] = "base"
    threshold_kind: ClassVar[str | None] = None
    """None (batch-independent select), "global" (one θ) or "per_feature" (θ_i)."""
    trainable: ClassVar[bool] = True
    sae_lens_architecture: ClassVar[str] = "topk"
    """Architecture written to cfg.json: the sae-lens class that reproduces the inference form."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, F = cfg.d_in, cfg.width
        W_dec = torch.randn(F, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (F, d)
        self.W_enc = nn.Parameter(W_dec.t().clone().contiguous())  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(F))  # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))  # (d,)
        self.register_buffer("input_scale", torch.tensor(1.0))
        th_shape = (F,) if self.threshold_kind == "per_feature" else ()
        self.register_buffer("threshold", torch.zeros(th_shape))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("density_ema", torch.zeros(F))
        self.register_buffer("density_updates", torch.tensor(0, dtype=torch.int64))

    # ------------------------------------------------------------------ selection (override)
    def select(self, pre: Tensor) -> Selection:
        """Training-time selection from pre-activations P (B, F) (detached)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    @property
    def width(self) -> int:
        return self.cfg.width

    def _center(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_n = x.to(self.W_enc.dtype) * self.input_scale  # (B, d)
        return x_n, x_n - self.b_dec  # (B, d), (B, d)

    def _pre(self, x_c: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.addmm(self.b_enc, x_c.detach(), self.W_enc.detach())  # (B, F), bf16 under autocast

    @property
    def thresholds_ready(self) -> bool:
        return self.threshold_kind is None or int(self.threshold_updates) > 0

    def inference_mask(self, pre: Tensor) -> Tensor:
        """(B, F) bool: the batch-independent selection."""
        if self.threshold_kind is None or not self.thresholds_ready:
            sel = self.select(pre)
            v = sel.valid if sel.valid is not None else torch.ones_like(sel.indices, dtype=torch.bool)
            # scatter_add, not scatter_: padding slots share index 0 with real ones
            return torch.zeros(pre.shape, dtype=torch.int32, device=pre.device).scatter_add_(1, sel.indices, v.int()) > 0
        return pre > self.threshold.to(pre.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, width) latents in the batch-independent inference form."""
        _, x_c = self._center(x)
        pre = x_c @ self.W_enc + self.b_enc  # (B, F)
        return pre.relu() * self.inference_mask(pre.detach())

    def decode(self, z: Tensor) -> Tensor:
        """(B, width) -> (B, d_in) reconstruction in the input's (un-normalised) space."""
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: Tensor, aux_mask: Tensor | None = None) -> ForwardOutput:
        """Training forward (batch-dependent select) in train mode; inference form in eval mode.

        aux_mask: (F,) bool, the latents the auxiliary loss may use (dead for AuxK, under-used
        for aux_zipf); None or all-False -> aux loss 0.
        """
        x_n, x_c = self._center(x)
        pre = self._pre(x_c)  # (B, F), no grad
        if self.training:
            sel = self.select(pre)
        else:
            mask = self.inference_mask(pre)
            rows, cols = mask.nonzero(as_tuple=True)
            idx, valid = sparse_ops.pairs_to_padded(rows, cols, pre.shape[0])
            sel = Selection(idx, valid, None)
        vals = sparse_ops.gather_linear(x_n, self.b_dec, self.W_enc, self.b_enc, pre, sel.indices, sel.valid).relu()  # (B, K)
        with torch.autocast(device_type=x.device.type, enabled=False):
            vals = vals.float() if vals.dtype != self.W_dec.dtype else vals
            recon_n = sparse_ops.sparse_decode(vals, sel.indices, self.W_dec, sel.valid) + self.b_dec  # (B, d)
            nmse = normalized_mse(recon_n, x_n)
            aux = self._aux(x_n, x_c, recon_n, pre, aux_mask)
        fired = (vals.detach() > self.cfg.fire_threshold).to(vals.dtype)
        counts = torch.zeros(self.width, dtype=vals.dtype, device=vals.device).index_add_(
            0, sel.indices.reshape(-1), fired.reshape(-1)
        )  # (F,)
        return ForwardOutput(
            reconstruction=recon_n / self.input_scale,
            latents=Latents(vals, sel.indices),
            losses={"nmse": nmse, "aux": aux},
            feature_counts=counts,
            threshold_stat=sel.threshold_stat,
        )

    def _aux(self, x_n: Tensor, x_c: Tensor, recon_n: Tensor, pre: Tensor, aux_mask: Tensor | None) -> Tensor:
        zero = recon_n.new_zeros(())
        if aux_mask is None:
            return zero
        n_elig = int(aux_mask.sum())
        if n_elig == 0:
            return zero
        k_aux = min(self.cfg.k_aux_effective, n_elig)
        scale = min(n_elig / self.cfg.k_aux_effective, 1.0) if self.cfg.aux_scale_by_dead else 1.0
        masked = pre.masked_fill(~aux_mask, -math.inf)  # (B, F)
        _, aux_idx = masked.topk(k_aux, dim=1, sorted=False)  # (B, k_aux)
        aux_vals = sparse_ops.gather_linear(x_n, self.b_dec, self.W_enc, self.b_enc, pre, aux_idx).relu().float()
        e_hat = sparse_ops.sparse_decode(aux_vals, aux_idx, self.W_dec)  # (B, d), no b_dec
        return auxk_loss(e_hat, (x_n - recon_n).detach(), scale)

    # ------------------------------------------------------------------ running statistics
    @torch.no_grad()
    def update_running_stats(self, feature_counts: Tensor, n_tokens: int, threshold_stat: Tensor | None, update_thresholds: bool) -> None:
        """Update firing-density EMA and (after warm-up) the inference threshold EMA."""
        dd = self.cfg.density_decay
        self.density_ema.mul_(dd).add_(feature_counts.to(self.density_ema.dtype) / max(1, n_tokens), alpha=1 - dd)
        self.density_updates += 1
        if update_thresholds and threshold_stat is not None and self.threshold_kind is not None:
            stat = threshold_stat.to(self.threshold.dtype)
            if int(self.threshold_updates) == 0:
                new = torch.where(torch.isnan(stat), torch.zeros_like(stat), stat)
            else:
                td = self.cfg.threshold_decay
                new = torch.where(torch.isnan(stat), self.threshold, td * self.threshold + (1 - td) * stat)
            self.threshold.copy_(new)
            self.threshold_updates += 1

    @property
    def density(self) -> Tensor:
        """(F,) bias-corrected EMA of each latent's firing density."""
        n = int(self.density_updates)
        if n == 0:
            return torch.zeros_like(self.density_ema)
        return self.density_ema / (1 - self.cfg.density_decay**n)

    # ------------------------------------------------------------------ constraints / init
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) row of W_dec."""
        if self.W_dec.grad is None:
            return
        par = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)  # (F, 1)
        self.W_dec.grad.sub_(par * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """Set the input scale (E||s x||^2 = d) and b_dec (geometric median / mean) from a sample (N, d)."""
        sample = sample.to(torch.float64)
        if self.cfg.normalize_inputs:
            ms = sample.pow(2).sum(dim=1).mean()
            self.input_scale.fill_(float(math.sqrt(self.cfg.d_in / float(ms))) if ms > 0 else 1.0)
        xs = sample * float(self.input_scale)
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xs.mean(0).to(self.b_dec.dtype))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xs).to(self.b_dec.dtype))

    def post_step(self, x: Tensor, step: int, seed: int) -> dict[str, float]:
        """Hook after each optimizer step (the codebook re-initialises dead codes here)."""
        return {}


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations for the geometric median of the rows of x (N, d)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)  # (N,)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < 1e-6 * (1 + y.norm()):
            return y_new
        y = y_new
    return y
