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

import torch
from torch import Tensor


def normalized_mse(recon: Tensor, x: Tensor) -> Tensor:
    """||x - x̂||^2 / ||x - mean(x)||^2 over the batch (B, d) -> ()."""
    num = (recon - x).pow(2).sum()
    den = (x - x.mean(0)).pow(2).sum()
    return num / den.clamp_min(torch.finfo(x.dtype).tiny)


def auxk_loss(e_hat: Tensor, e: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """scale * ||e - ê||^2 / ||e - mean(e)||^2, zero when NaN/inf."""
    loss = scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


def fit_zipf(density: Tensor) -> tuple[Tensor, Tensor]:
    """Fit ρ(r) = C r^-α to densities sorted descending (ranks from 1); returns (C, α) as 0-d
    float64 tensors on the density's device (no host read).

    Least squares on log ρ = log C - α log r over the positive densities (a prefix of the sorted
    ones); (0, 0) when no latent has fired, (ρ_max, 0) when one has.
    """
    d = torch.sort(density.double(), descending=True).values  # (F,)
    pos = d > 0
    w = pos.double()
    n = pos.sum()  # ()
    n_f = n.clamp_min(1).double()
    r = torch.arange(1, d.numel() + 1, dtype=torch.float64, device=d.device).log()
    y = torch.where(pos, d, torch.ones_like(d)).log()  # 0 where ρ = 0 (weight 0)
    rm, ym = (w * r).sum() / n_f, (w * y).sum() / n_f
    slope = (w * (r - rm) * (y - ym)).sum() / (w * (r - rm).pow(2)).sum().clamp_min(1e-300)
    fitted = n >= 2
    alpha = torch.where(fitted, -slope, torch.zeros_like(slope))
    c = torch.where(fitted, (ym - slope * rm).exp(), torch.where(n == 1, d[0], torch.zeros_like(slope)))
    return c, alpha


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
