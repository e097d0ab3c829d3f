"""Loss terms shared by every variant.

    nmse(x̂, x)  = ||x - x̂||^2 / ||x - mean_B(x)||^2                     (sums over the batch)
    AuxK         = scale * ||e - ê||^2 / ||e - mean_B(e)||^2 ,  e = x - x̂ (detached),
                   ê = top-k_aux of ReLU(P) over the eligible latents, decoded without b_dec,
                   scale = min(#eligible / k_aux, 1) (choice, as sae-lens/sparsify); 0 if NaN.
    aux_zipf     = AuxK with "eligible" = under-used instead of dead (project's reading of
                   Ayonrinde 2024, exact form unpublished): fit ρ̂(r) = C r^-α to the running
                   densities sorted by rank (least squares in log-log over ρ > 0); latent i is
                   under-used when ρ_i < γ ρ̂(rank_i). γ -> 0 recovers AuxK (only ρ = 0 latents).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalized_mse(recon: Tensor, x: Tensor) -> Tensor:
    """||x - x̂||^2 / ||x - mean(x)||^2 over the batch (B, d) -> ()."""
    num = (recon - x).pow(2).sum()
    den = (x - x.mean(0)).pow(2).sum()
    return num / den.clamp_min(torch.finfo(x.dtype).tiny)


def auxk_loss(e_hat: Tensor, e: Tensor, scale: float = 1.0) -> Tensor:
    """scale * ||e - ê||^2 / ||e - mean(e)||^2, zero when NaN/inf."""
    loss = scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


def fit_zipf(density: Tensor) -> tuple[float, float]:
    """Fit ρ(r) = C r^-α to densities sorted descending (ranks from 1); returns (C, α).

    Least squares on log ρ = log C - α log r over the positive densities; (0, 0) when fewer
    than two latents have fired.
    """
    d = torch.sort(density.double(), descending=True).values
    pos = d > 0
    n = int(pos.sum())
    if n < 2:
        return (float(d[0]) if n == 1 else 0.0), 0.0
    r = torch.arange(1, d.numel() + 1, dtype=torch.float64)[pos].log()
    y = d[pos].log()
    rm, ym = r.mean(), y.mean()
    slope = float(((r - rm) * (y - ym)).sum() / (r - rm).pow(2).sum().clamp_min(1e-300))
    log_c = float(ym - slope * rm)
    return math.exp(log_c), -slope


def ranks(density: Tensor) -> Tensor:
    """(F,) rank of each latent by density, 1 = densest (ties broken by index)."""
    order = torch.argsort(density, descending=True, stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(1, density.numel() + 1, device=density.device)
    return r


def underused_mask(density: Tensor, gamma: float) -> Tensor:
    """(F,) bool: ρ_i < γ · C · rank_i^-α (aux_zipf eligibility)."""
    c, alpha = fit_zipf(density)
    expected = c * ranks(density).double().pow(-alpha)
    return density.double() < gamma * expected
