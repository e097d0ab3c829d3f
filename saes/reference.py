"""Naive dense references for the fast paths (used by the tests; slow, obviously correct).

    P = (s x - b_dec) W_enc + b_enc  (autograd through the dense matmul),  Z = ReLU(P) · mask,
    x̂_n = Z W_dec + b_dec,  aux: ê = (ReLU(P) · 1[top-k_aux over eligible]) W_dec.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import auxk_loss, normalized_mse


def selection_mask(sel, shape) -> Tensor:
    """(B, F) bool mask of a Selection's entries."""
    e = sel.entries
    mask = torch.zeros(shape, dtype=torch.bool, device=e.latent.device)
    mask[e.token, e.latent] = True
    return mask


def dense_forward(sae, x: Tensor, aux_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Every term of `sae.forward` with dense matmuls and autograd (on the CPU: it reads counts)."""
    x_n = x.to(sae.W_enc.dtype) * sae.input_scale  # as BaseSAE._center (float32 SAEs: x.float())
    x_c = x_n - sae.b_dec
    pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)  # (B, F), same op as the fast path so selections tie-break identically
    mask = selection_mask(sae.select(pre.detach()), pre.shape) if sae.training else sae.inference_mask(pre.detach())
    z = pre.relu() * mask  # (B, F)
    recon = z @ sae.W_dec + sae.b_dec  # (B, d)
    out = {"z": z, "recon": recon / sae.input_scale, "nmse": normalized_mse(recon, x_n), "aux": recon.new_zeros(())}
    if aux_mask is not None and int(aux_mask.sum()) > 0:
        ka = sae.cfg.k_aux_effective
        n = int(aux_mask.sum())
        scale = min(n / ka, 1.0) if sae.cfg.aux_scale_by_dead else 1.0
        masked = pre.detach().masked_fill(~aux_mask, -math.inf)
        thr = masked.topk(min(ka, n), dim=1).indices
        amask = torch.zeros_like(mask).scatter_(1, thr, True)
        e_hat = (pre.relu() * amask) @ sae.W_dec
        out["aux"] = auxk_loss(e_hat, (x_n - recon).detach(), scale)
    return out


def naive_topk_mask(pre: Tensor, k: int) -> Tensor:
    order = pre.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(pre, dtype=torch.bool).scatter_(1, order, True)


def naive_batchtopk_mask(pre: Tensor, k: int) -> Tensor:
    flat = pre.flatten()
    order = flat.argsort(descending=True)[: k * pre.shape[0]]
    m = torch.zeros_like(flat, dtype=torch.bool)
    m[order] = True
    return m.view_as(pre)


def naive_feature_choice_mask(pre: Tensor, m: Tensor) -> Tensor:
    out = torch.zeros_like(pre, dtype=torch.bool)
    for i in range(pre.shape[1]):
        if int(m[i]) > 0:
            out[pre[:, i].argsort(descending=True)[: int(m[i])], i] = True
    return out


def naive_water_fill(w: Tensor, total: int, cap: int) -> Tensor:
    """The iterative water-filling `feature_choice.water_fill` computes in closed form: shares of
    `total` proportional to w, those above `cap` capped and the excess re-spread, until none is."""
    alloc = torch.zeros_like(w)
    free = torch.ones_like(w, dtype=torch.bool)
    for _ in range(w.numel()):
        remaining = total - float(alloc[~free].sum())
        share = remaining * torch.where(free, w, torch.zeros_like(w)) / float(w[free].sum())
        over = free & (share > cap)
        if not bool(over.any()):
            alloc[free] = share[free]
            break
        alloc[over] = cap
        free &= ~over
    return alloc
