"""How strongly each expert follows a token concept, and Monet's purge curve built on it.

    concept correlation   ρ_e = Pearson(g_e(x), c(x)) over tokens (NaN when either is constant)
    purge (Monet)         remove the experts with ρ_e > τ; the curve sorts experts by ρ descending,
                          removing the first i+1 removes (i + 1) / E of all experts (NaN ρ never purged)

g_e(x) is the score matrix G (n, E) of `probes.score_matrix`; c(x) is a concept score per token,
e.g. 1[x satisfies a concept of `probes.concepts`]. ρ is accumulated over chunks of tokens from
sums shifted by the first chunk's mean, so the variance stays accurate.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from probes.score_matrix import CHUNK_ROWS, ArrayLike, ExpertsError, _as_tensor


def concept_correlation(scores: ArrayLike, concept: ArrayLike) -> np.ndarray:
    """(E,) Pearson ρ between each expert's score g_e(x) (n, E) and a concept score c(x) (n,)."""
    scores, concept = _as_tensor(scores), _as_tensor(concept)
    if scores.ndim != 2 or concept.shape != scores.shape[:1]:
        shapes = f"{tuple(scores.shape)} and {tuple(concept.shape)}"
        raise ExpertsError(f"scores must be (n_tokens, E) and concept (n_tokens,); got {shapes}")
    n = scores.shape[0]
    if n < 2:
        return np.full(scores.shape[1], np.nan)
    c = concept.to("cpu", torch.float64)
    c = c - c.mean()  # centre the concept once; the expert side is centred from its running sums
    sg = torch.zeros(scores.shape[1], dtype=torch.float64)
    sgg, sgc = torch.zeros_like(sg), torch.zeros_like(sg)
    shift = scores[: min(n, CHUNK_ROWS)].to("cpu", torch.float64).mean(0)  # shifted sums keep the variance accurate
    for start in range(0, n, CHUNK_ROWS):
        g = scores[start : start + CHUNK_ROWS].to("cpu", torch.float64) - shift  # (c, E)
        sg += g.sum(0)
        sgg += (g * g).sum(0)
        sgc += g.T @ c[start : start + CHUNK_ROWS]
    var_g = sgg - sg * sg / n
    var_c = float((c * c).sum())
    denom = torch.sqrt(var_g.clamp(min=0) * var_c)
    rho = torch.where(denom > 1e-12 * n, sgc / denom, torch.tensor(float("nan"), dtype=torch.float64))
    return rho.clamp(-1, 1).numpy()


class PurgeCurve(NamedTuple):
    """Experts ordered for purging: removing the first i+1 removes share_removed[i] of all experts."""

    order: np.ndarray  # (m,) expert ids by ρ descending (NaN ρ never purged, so left out)
    rho: np.ndarray  # (m,) ρ of those experts
    share_removed: np.ndarray  # (m,) (i + 1) / E
    n_experts: int

    def at(self, tau: float) -> np.ndarray:
        """Experts to mask at threshold τ: those with ρ > τ, in purge order."""
        return self.order[self.rho > tau]

    def share_at(self, tau: float) -> float:
        return len(self.at(tau)) / self.n_experts


def purge_curve(rho: np.ndarray) -> PurgeCurve:
    """Order experts for purging from their concept correlations ρ (E,)."""
    rho = np.asarray(rho, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(rho))
    order = valid[np.argsort(-rho[valid], kind="stable")]
    return PurgeCurve(order, rho[order], np.arange(1, len(order) + 1) / max(len(rho), 1), len(rho))
