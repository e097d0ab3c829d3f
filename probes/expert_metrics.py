"""Concentration metrics of a routing-mass matrix r (D, E): Monet skew specialisation, p(e|d),
routing entropy, p(d|e), purity and mutual information.

Pure functions on arrays; r_{e,d} and the group sizes n_d come from
`probes.score_matrix.routing_stats` (groups with no tokens already dropped).

    skew (Monet)          e specialises in d* = argmax_d r_{e,d}  iff  r_{e,d*} > 0 and
                          r_{e,d*} ≥ factor · max_{d≠d*} r_{e,d}   (factor > 1, Monet 2; needs D ≥ 2,
                          so ties never specialise)
    skew ratio            s_{e,d} = r_{e,d} / max_{d'≠d} r_{e,d'}  (∞ when only d has mass); a fixed
                          budget of n experts for d takes the n largest s_{e,d} among the experts
                          whose strongest group is d (`skew_ranking`)
    specialised share     s_d = |{e : e specialises in d}| / E
    p(e|d)                = r_{e,d} / Σ_e' r_{e',d}                 (NaN row if domain d has no mass)
    routing entropy       H_d = −Σ_e p(e|d) log p(e|d) / log E      (normalised to [0, 1]; 0 when E = 1)
    joint mass            m_{e,d} = n_d · r_{e,d} = Σ_{x∈T_d} g_e(x);   p(e, d) = m_{e,d} / Σ m
    p(d|e)                = m_{e,d} / Σ_d' m_{e,d'}                 (routing mass weighted by token counts;
                          balanced=True uses r_{e,d} / Σ_d' r_{e,d'}, every domain weighted equally)
    purity                P_e = max_d p(d|e)                         (NaN for a dead expert: no mass)
    mutual information    I(E; D) = Σ_{e,d} p(e,d) log[p(e,d) / (p(e) p(d))]  in nats;
                          normalised I / min(H(E), H(D)) ∈ [0, 1]  (0 when that minimum is 0)

With top-k weights that sum to 1 per token, p(d) = n_d / n and I(E; D) is the information the
routing carries about the domain.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from probes.score_matrix import ExpertsError


def specialists(mass: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """(E,) int64: the group each expert specialises in (Monet skew test on r (D, E)), or −1."""
    if not factor > 1:
        raise ExpertsError(f"skew factor must be > 1 (Monet uses 2); got {factor}")
    n_groups, n_experts = mass.shape
    out = np.full(n_experts, -1, dtype=np.int64)
    if n_groups < 2:
        return out  # specialising needs another group to compare with
    order = np.sort(mass, axis=0)  # (D, E) ascending
    best, runner_up = order[-1], order[-2]
    ok = (best > 0) & (best >= factor * runner_up)
    out[ok] = mass.argmax(axis=0)[ok]
    return out


def skew_ranking(mass: np.ndarray, group: int) -> np.ndarray:
    """Experts whose strongest group is ``group`` (mass r (D, E)), most specialised first.

    Ordered by the skew ratio s_e = r_{e,group} / max_{d≠group} r_{e,d} descending (∞ when no other
    group has mass), ties by larger r_{e,group}, then lower id; experts whose mass on ``group`` is
    not strictly the largest are left out (so an expert tied between two groups is in neither).
    The first n of it are the (at most) n experts a matched masking budget removes.
    """
    n_groups, n_experts = mass.shape
    if not 0 <= group < n_groups:
        raise ExpertsError(f"group {group} is out of range for {n_groups} groups")
    on_group = mass[group]
    if n_groups < 2:
        candidates = np.flatnonzero(on_group > 0)
        return candidates[np.lexsort((candidates, -on_group[candidates]))]
    others = np.delete(mass, group, axis=0).max(axis=0)  # (E,)
    candidates = np.flatnonzero((on_group > 0) & (on_group > others))  # a tie specialises in neither group
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(others[candidates] > 0, on_group[candidates] / np.where(others[candidates] > 0, others[candidates], 1),
                         np.inf)
    return candidates[np.lexsort((candidates, -on_group[candidates], -ratio))]


def specialised_share(specialist: np.ndarray, n_groups: int) -> np.ndarray:
    """(D,) share of all experts that specialise in each group."""
    counts = np.bincount(specialist[specialist >= 0], minlength=n_groups)
    return counts / max(len(specialist), 1)


def p_expert_given_group(mass: np.ndarray) -> np.ndarray:
    """(D, E) p(e|d) = r_{e,d} / Σ_e r_{e,d}; NaN rows for groups with no routing mass."""
    total = mass.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, mass / np.where(total > 0, total, 1), np.nan)


def _entropy(p: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0).sum(axis=axis)


def routing_entropy(mass: np.ndarray) -> np.ndarray:
    """(D,) entropy of p(e|d) divided by log E (1 = uniform routing); NaN for groups with no mass."""
    p = p_expert_given_group(mass)
    h = _entropy(p, axis=1)
    h = np.where(np.isnan(p).any(axis=1), np.nan, h)
    n_experts = mass.shape[1]
    return h / math.log(n_experts) if n_experts > 1 else np.where(np.isnan(h), np.nan, 0.0)


def p_group_given_expert(mass: np.ndarray, counts: np.ndarray, balanced: bool = False) -> np.ndarray:
    """(D, E) p(d|e) ∝ n_d · r_{e,d} (balanced: ∝ r_{e,d}); NaN columns for dead experts."""
    joint = mass if balanced else mass * counts[:, None]
    total = joint.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, joint / np.where(total > 0, total, 1), np.nan)


def purity(mass: np.ndarray, counts: np.ndarray, balanced: bool = False) -> np.ndarray:
    """(E,) max_d p(d|e); NaN for experts that never receive mass."""
    p = p_group_given_expert(mass, counts, balanced)
    out = np.full(p.shape[1], np.nan)
    alive = ~np.isnan(p).any(axis=0) & (p.shape[0] > 0)
    if alive.any():
        out[alive] = p[:, alive].max(axis=0)
    return out


class MutualInformation(NamedTuple):
    nats: float  # I(E; D)
    normalised: float  # I / min(H(E), H(D)) in [0, 1]


def mutual_information(mass: np.ndarray, counts: np.ndarray) -> MutualInformation:
    """I(E; D) of the joint p(e, d) ∝ n_d · r_{e,d} = Σ_{x∈T_d} g_e(x)."""
    joint = mass * counts[:, None]  # (D, E)
    total = joint.sum()
    if total <= 0:
        return MutualInformation(0.0, 0.0)
    p = joint / total
    pd, pe = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / (pd * pe)), 0.0)
    nats = max(float(terms.sum()), 0.0)
    bound = min(float(_entropy(pd.ravel(), 0)), float(_entropy(pe.ravel(), 0)))
    return MutualInformation(nats, min(nats / bound, 1.0) if bound > 1e-12 else 0.0)
