"""Base sparse autoencoder; variants override only `select`.

    x_n  = s * x                                   (B, d)   s: input scale, E||x_n||^2 = d
    P    = (x_n - b_dec) W_enc + b_enc             (B, F)   pre-activations
    Z'   = ReLU(P)
    S    = select(P)                               the surviving (token, latent) entries (CSR, saes.sparse_ops)
    Z    = Z' * 1[S]                               (B, F)   latents
    x̂_n  = Z W_dec + b_dec ,  x̂ = x̂_n / s          (B, d)   rows of W_dec unit norm
    L    = ||x_n - x̂_n||^2 / ||x_n - mean_B(x_n)||^2  + aux terms (saes.losses)

Training uses the variant's batch-dependent `select`; `encode` (and `forward` in eval mode)
uses the batch-independent inference form: the same top-k for TopK, one global threshold θ
(BatchTopK, Mutual Choice) or per-feature thresholds θ_i (Feature Choice), Z = Z'·1[P > θ].

Nothing in a training step reads a device value into Python: AuxK takes a fixed k_aux per token,
running statistics are updated with `torch.where`, and every selection has a size known on the
host (see saes.sparse_ops). The CPU-only fast paths may read CPU memory (AuxK reads how many
latents are eligible, to gather fewer slots). `thresholds_ready` is the one read, outside training: once True it is
remembered (the update count only grows), so inference reads it at most until thresholds exist.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import sparse_ops
from .config import SAEConfig
from .losses import auxk_loss, normalized_mse
from .sparse_ops import Entries


class Selection(NamedTuple):
    """What a variant's `select` returns."""

    entries: Entries
    """The selected (token, latent) pairs in CSR order (saes.sparse_ops)."""
    threshold_stat: Tensor | None = None
    """Per-batch statistic the inference threshold EMA tracks: () smallest selected value,
    or (F,) m_i-th largest per feature (NaN when m_i = 0)."""


class Latents(NamedTuple):
    """Sparse latents in one of two layouts.

    Per token (``offsets`` is None): values, indices (B, K), Z[b, indices[b, j]] = values[b, j]
    (the codebook's k codes; the dense (B, F) latents of an eval-mode forward, indices = arange(F)).
    Entries (``offsets`` given): values, indices, token (nnz,) in CSR order, Z[token[e], indices[e]]
    = values[e], token b's entries starting at offsets[b] (B,) (training forward of every SAE).
    """

    values: Tensor
    """(B, K) or (nnz,) float activations (>= 0)."""
    indices: Tensor
    """(B, K) or (nnz,) int64 latent ids."""
    offsets: Tensor | None = None
    """(B,) start of each token's entries (entries layout only)."""
    token: Tensor | None = None
    """(nnz,) token of each entry (entries layout only)."""

    def to_dense(self, width: int) -> Tensor:
        if self.offsets is None:
            z = self.values.new_zeros(self.values.shape[0], width)  # (B, F)
            return z.scatter_add_(1, self.indices, self.values)
        z = self.values.new_zeros(self.offsets.shape[0], width)  # (B, F)
        return z.index_put_((self.token, self.indices), self.values, accumulate=True)


class ForwardOutput(NamedTuple):
    """One typed output for every variant (the trainer never branches on the variant)."""

    reconstruction: Tensor
    """(B, d_in) x̂ in the caller's (un-normalised) space."""
    latents: Latents
    """Sparse latents; `.to_dense(width)` gives (B, F)."""
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
        self._thresholds_fitted = False  # host mirror of threshold_updates > 0, once known True

    # ------------------------------------------------------------------ selection (override)
    def select(self, pre: Tensor) -> Selection:
        """Training-time selection from pre-activations P (B, F) (detached)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    @property
    def width(self) -> int:
        return self.cfg.width

    def _center(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_n = x.to(self.W_enc.dtype) * self.input_scale
        return x_n, x_n - self.b_dec  # (B, d), (B, d)

    def _pre(self, x_c: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.addmm(self.b_enc, x_c.detach(), self.W_enc.detach())  # (B, F), bf16 under autocast

    @property
    def thresholds_ready(self) -> bool:
        """Whether the inference thresholds have been fitted. Reads `threshold_updates` until it is
        > 0 (then remembered; forgotten when a state dict is loaded)."""
        if self.threshold_kind is None or self._thresholds_fitted:
            return True
        self._thresholds_fitted = bool(self.threshold_updates > 0)
        return self._thresholds_fitted

    def _load_from_state_dict(self, *args, **kwargs):
        self._thresholds_fitted = False
        super()._load_from_state_dict(*args, **kwargs)

    def inference_mask(self, pre: Tensor) -> Tensor:
        """(B, F) bool: the batch-independent selection (the training selection until θ is fitted)."""
        if self.threshold_kind is None or not self.thresholds_ready:
            return sparse_ops.to_mask(self.select(pre).entries, pre.shape)
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
        """Training forward (batch-dependent select, sparse) in train mode; inference form (dense) in eval mode.

        aux_mask: (F,) bool, the latents the auxiliary loss may use (dead for AuxK, under-used
        for aux_zipf); None or all-False -> aux loss 0.
        """
        x_n, x_c = self._center(x)
        if not self.training:
            return self._forward_inference(x_n, x_c, aux_mask)
        pre = self._pre(x_c)  # (B, F), no grad
        sel = self.select(pre)
        e = sel.entries
        vals = sparse_ops.gather_linear(x_n, self.b_dec, self.W_enc, self.b_enc, pre, e).relu()  # (nnz,)
        with sparse_ops.no_autocast(x.device):
            vals = vals.float() if vals.dtype != self.W_dec.dtype else vals
            recon_n = sparse_ops.sparse_decode(vals, e, self.W_dec) + self.b_dec  # (B, d)
            nmse = normalized_mse(recon_n, x_n)
            aux = self._aux(x_n, recon_n, pre, aux_mask)
        fired = (vals.detach() > self.cfg.fire_threshold).to(vals.dtype)  # (nnz,)
        counts = torch.zeros(self.width, dtype=vals.dtype, device=vals.device).index_add_(0, e.latent, fired)  # (F,)
        return ForwardOutput(
            reconstruction=recon_n / self.input_scale,
            latents=Latents(vals, e.latent, e.offsets, e.token),
            losses={"nmse": nmse, "aux": aux},
            feature_counts=counts,
            threshold_stat=sel.threshold_stat,
        )

    def _forward_inference(self, x_n: Tensor, x_c: Tensor, aux_mask: Tensor | None) -> ForwardOutput:
        """Eval-mode forward: dense latents of the inference form (static shapes, any batch)."""
        pre = x_c @ self.W_enc + self.b_enc  # (B, F)
        mask = self.inference_mask(pre.detach())  # (B, F)
        z = pre.relu() * mask
        with sparse_ops.no_autocast(x_n.device):
            z = z.float() if z.dtype != self.W_dec.dtype else z
            recon_n = z @ self.W_dec + self.b_dec  # (B, d)
            nmse = normalized_mse(recon_n, x_n)
            aux = self._aux(x_n, recon_n, pre.detach(), aux_mask)
        counts = (mask & (z.detach() > self.cfg.fire_threshold)).sum(0).to(z.dtype)  # (F,)
        idx = torch.arange(self.width, device=z.device).expand(z.shape[0], -1)  # (B, F)
        return ForwardOutput(recon_n / self.input_scale, Latents(z, idx), {"nmse": nmse, "aux": aux}, counts, None)

    def _aux(self, x_n: Tensor, recon_n: Tensor, pre: Tensor, aux_mask: Tensor | None) -> Tensor:
        """AuxK over the latents in aux_mask: a fixed k_aux per token (no host read), the top-k_aux of the
        masked pre-activations; slots that fall on ineligible latents (fewer than k_aux eligible) get value 0.
        CPU fast path (sparse_ops.CPU_FAST_PATHS): the count of eligible latents is read (free there), so
        only min(k_aux, #eligible) slots are gathered, and none when no latent is eligible."""
        zero = recon_n.new_zeros(())
        if aux_mask is None:
            return zero
        k_aux = self.cfg.k_aux_effective
        n_elig = aux_mask.sum()  # ()
        k_sel = k_aux
        if sparse_ops.cpu_fast(pre):
            k_sel = min(k_aux, int(n_elig.item()))
            if k_sel == 0:
                return zero
        top, aux_idx = pre.masked_fill(~aux_mask, -math.inf).topk(k_sel, dim=1, sorted=False)  # (B, k_sel)
        e = sparse_ops.per_token(aux_idx)
        eligible = (top > -math.inf).reshape(-1)  # (B·k_sel,)
        aux_vals = sparse_ops.gather_linear(x_n, self.b_dec, self.W_enc, self.b_enc, pre, e).relu().to(self.W_dec.dtype) * eligible
        e_hat = sparse_ops.sparse_decode(aux_vals, e, self.W_dec)  # (B, d), no b_dec
        if self.cfg.aux_scale_by_dead:
            scale = (n_elig / k_aux).clamp(max=1.0)  # 0 when nothing is eligible
        else:
            scale = (n_elig > 0).to(recon_n.dtype)
        return auxk_loss(e_hat, (x_n - recon_n).detach(), scale)

    # ------------------------------------------------------------------ running statistics
    @torch.no_grad()
    def update_running_stats(self, feature_counts: Tensor, n_tokens: int | Tensor, threshold_stat: Tensor | None,
                             update_thresholds: bool) -> None:
        """Update firing-density EMA and (after warm-up) the inference threshold EMA, on the device."""
        dd = self.cfg.density_decay
        n = n_tokens.clamp_min(1) if isinstance(n_tokens, Tensor) else max(1, n_tokens)
        self.density_ema.mul_(dd).add_(feature_counts.to(self.density_ema.dtype) / n, alpha=1 - dd)
        self.density_updates += 1
        if update_thresholds and threshold_stat is not None and self.threshold_kind is not None:
            stat = threshold_stat.to(self.threshold.dtype)
            missing = torch.isnan(stat)
            td = self.cfg.threshold_decay
            first = torch.where(missing, torch.zeros_like(stat), stat)
            ema = torch.where(missing, self.threshold, td * self.threshold + (1 - td) * stat)
            self.threshold.copy_(torch.where(self.threshold_updates == 0, first, ema))
            self.threshold_updates += 1
            self._thresholds_fitted = True

    @property
    def density(self) -> Tensor:
        """(F,) bias-corrected EMA of each latent's firing density (zeros before the first update)."""
        return bias_corrected(self.density_ema, self.density_updates, self.cfg.density_decay)

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
            self.input_scale.copy_(torch.where(ms > 0, (self.cfg.d_in / ms).sqrt(), 1.0))
        xs = sample * self.input_scale.double()
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xs.mean(0).to(self.b_dec.dtype))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xs).to(self.b_dec.dtype))

    def post_step(self, x: Tensor, step: int, seed: int) -> dict[str, Tensor]:
        """Hook after each optimizer step (the codebook re-initialises dead codes here); values stay on the device."""
        return {}


def bias_corrected(ema: Tensor, updates: Tensor, decay: float) -> Tensor:
    """ema / (1 - decay^updates), zeros while updates = 0 (computed on the device, no read)."""
    corr = 1 - torch.full((), decay, dtype=torch.float64, device=ema.device).pow(updates)  # ()
    return torch.where(updates > 0, ema / corr.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(ema))


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations for the geometric median of the rows of x (N, d): a fixed number of
    iterations, each frozen once the step is below 1e-6 (1 + |y|) (the early stop, without a read)."""
    y = x.mean(0)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)  # (N,)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        converged = (y_new - y).norm() < 1e-6 * (1 + y.norm())
        y = torch.where(done, y, y_new)
        done = done | converged
    return y
