"""Removing experts from a router (logits −∞, top-k renormalised) and the masking selectivity of a removal.

    masked logits         l'_e = −∞ for a removed expert e, l_e otherwise
    routing (Mixtral)     p = softmax(l') over all experts; S = top-k(p); w_e = p_e / Σ_{e'∈S} p_e' for e ∈ S, else 0
    ΔLoss matrix          Δ_{t,m} = L_after(t)(m) − L_before(m)   (t's specialists removed, loss on m)
    masking selectivity   Δ_d = L_after(d) − L_before(d);  sel(d*) = Δ_{d*} − mean_{d≠d*} Δ_d

Masking follows Mixtral: p = softmax(logits) over all experts, keep the top-k, renormalise the
kept weights to sum 1 (`normalise_topk=False` for OLMoE/Qwen-MoE style routers that keep raw
softmax weights). Removing experts sets their logits to −∞ first.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

import numpy as np
import torch

from probes.score_matrix import ExpertsError


def mask_logits(logits: torch.Tensor, remove: Iterable[int]) -> torch.Tensor:
    """Router logits (..., E) with the removed experts' logits set to −∞ (a copy)."""
    remove = sorted({int(e) for e in remove})
    n_experts = logits.shape[-1]
    if any(e < 0 or e >= n_experts for e in remove):
        raise ExpertsError(f"experts to remove must be in 0..{n_experts - 1}; got {remove}")
    out = logits.clone()
    out[..., remove] = float("-inf")
    return out


def topk_routing(logits: torch.Tensor, k: int, normalise_topk: bool = True) -> torch.Tensor:
    """Routing weights (..., E): softmax over experts, keep the top-k, renormalise them (Mixtral).

    Experts at −∞ are never kept: a token with fewer than k finite logits uses the ones it has.
    """
    n_experts = logits.shape[-1]
    if not 1 <= k <= n_experts:
        raise ExpertsError(f"k={k} is out of range for E={n_experts} experts; choose 1 ≤ k ≤ {n_experts}")
    if bool((logits == float("-inf")).all(dim=-1).any()):
        raise ExpertsError("every expert is removed for some token; nothing left to route to")
    probs = torch.softmax(logits.double(), dim=-1)  # (..., E); −∞ -> 0
    top, idx = probs.topk(k, dim=-1)  # (..., k)
    if normalise_topk:
        top = top / top.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter_(-1, idx, top)
    return weights.to(logits.dtype)


def masked_routing(logits: torch.Tensor, remove: Iterable[int], k: int, normalise_topk: bool = True) -> torch.Tensor:
    """Routing weights (..., E) after removing experts (logits −∞), renormalised over the rest."""
    return topk_routing(mask_logits(logits, remove), k, normalise_topk)


def masking_selectivity(loss_before: Mapping[str, float], loss_after: Mapping[str, float], target: str) -> float:
    """ΔTarget − mean ΔOthers, with Δ_d = loss_after[d] − loss_before[d] over the domains in both."""
    domains = [d for d in loss_before if d in loss_after]
    if target not in domains:
        raise ExpertsError(f"target {target!r} needs a loss before and after; have {', '.join(domains) or 'none'}")
    others = [d for d in domains if d != target]
    if not others:
        raise ExpertsError(f"selectivity of {target!r} needs at least one other domain")
    delta = {d: loss_after[d] - loss_before[d] for d in domains}
    return delta[target] - sum(delta[d] for d in others) / len(others)


class SelectivityMatrix(NamedTuple):
    targets: tuple[str, ...]  # rows: domain whose specialists were removed
    measured: tuple[str, ...]  # columns: domain whose loss was measured
    delta: np.ndarray  # (T, M) ΔLoss
    selectivity: np.ndarray  # (T,) ΔTarget − mean ΔOthers

    def rows(self) -> list[dict]:
        return [
            {"target": t, "measured": m, "delta_loss": float(self.delta[i, j])}
            for i, t in enumerate(self.targets)
            for j, m in enumerate(self.measured)
        ]


def selectivity_matrix(loss_before: Mapping[str, float], loss_after: Mapping[str, Mapping[str, float]]) -> SelectivityMatrix:
    """loss_after[target][measured] (losses with target's specialists removed) -> ΔLoss matrix."""
    measured = tuple(loss_before)
    targets = tuple(t for t in loss_after if t in loss_before)
    missing = [(t, m) for t in targets for m in measured if m not in loss_after[t]]
    if missing:
        raise ExpertsError(f"no loss on {missing[0][1]!r} after removing {missing[0][0]!r}'s experts")
    delta = np.array([[loss_after[t][m] - loss_before[m] for m in measured] for t in targets])
    delta = delta.reshape(len(targets), len(measured))  # (T, M), also when T = 0
    if len(measured) > 1:
        sel = np.array([masking_selectivity(loss_before, loss_after[t], t) for t in targets])
    else:  # no other domain to compare with
        sel = np.full(len(targets), np.nan)
    return SelectivityMatrix(targets, measured, delta, sel)
