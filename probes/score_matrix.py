"""The score matrix G that every expert metric reads, and its per-group routing mass and frequency.

Pure functions on tensors/arrays (no model, no workspace). An "expert" is a column of a score
matrix G (n_tokens, E) with g_e(x) ≥ 0 and g_e(x) = 0 when e is not selected for token x:

    MoE router        g_e(x) = top-k routing weight (0 for unselected experts)  — see dense_scores
    MoEfied MLP       g_e(x) = ‖a_{N_e}(x)‖ for the top-k experts, else 0        — see probes.moefy
    SAE latents       g_e(x) = latent activation
    neurons           g_e(x) = |a_e(x)|  (or 1[a_e(x) > 0])

Tokens carry one integer group label ℓ(x) ∈ {0..D−1} (a domain of the corpus, or a token
concept from `probes.concepts.concept_groups`); labels < 0 mark tokens to ignore.
T_d = {x : ℓ(x) = d}, n_d = |T_d|. A group with n_d = 0 is *skipped*: dropped from every result
and listed in `skipped`.

    routing mass          r_{e,d} = (1/n_d) Σ_{x∈T_d} g_e(x)
    selection frequency   f_{e,d} = (1/n_d) Σ_{x∈T_d} 1[e selected for x]   (selected = g ≠ 0 by default)

The metrics on r are in `probes.expert_metrics`, one layer's bundle in `probes.expert_summary`,
concept correlation and purge in `probes.concept_purge`, masking in `probes.expert_masking`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError

CHUNK_ROWS = 65_536  # tokens converted to float64 at a time


class ExpertsError(WorkbenchError):
    """Bad input to an expert metric."""


ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def dense_scores(indices: ArrayLike, weights: ArrayLike, n_experts: int) -> torch.Tensor:
    """Selected experts (n, k) and their weights (n, k) -> G (n, E) with 0 for unselected experts."""
    indices, weights = _as_tensor(indices).long(), _as_tensor(weights).float()
    if indices.shape != weights.shape:
        raise ExpertsError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} differ in shape")
    out = torch.zeros(*indices.shape[:-1], n_experts)  # (n, E)
    return out.scatter_(-1, indices, weights)


class GroupStats(NamedTuple):
    """Per-group routing statistics; rows follow `names` (groups with tokens only)."""

    names: tuple[str, ...]  # kept groups, in label order
    skipped: tuple[str, ...]  # groups with no tokens, left out of every array
    counts: np.ndarray  # (D,) int64: n_d
    mass: np.ndarray  # (D, E) float64: r_{e,d}
    freq: np.ndarray  # (D, E) float64: f_{e,d}


def routing_stats(
    scores: ArrayLike, labels: ArrayLike, names: Sequence[str], selected: ArrayLike | None = None
) -> GroupStats:
    """r_{e,d} and f_{e,d} from scores (n, E), labels (n,) and optionally a bool selection (n, E)."""
    scores, labels = _as_tensor(scores), _as_tensor(labels).long().cpu()
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        shapes = f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        raise ExpertsError(f"scores must be (n_tokens, E) and labels (n_tokens,); got {shapes}")
    if selected is not None:
        selected = _as_tensor(selected)
        if selected.shape != scores.shape:
            raise ExpertsError(f"selected {tuple(selected.shape)} must match scores {tuple(scores.shape)}")
    n_groups, n_experts = len(names), scores.shape[1]
    if labels.numel() and int(labels.max()) >= n_groups:
        top = int(labels.max())
        raise ExpertsError(f"label {top} has no name; {n_groups} names given (labels 0..{n_groups - 1}, <0 ignored)")
    mass = torch.zeros(n_groups, n_experts, dtype=torch.float64)
    hits = torch.zeros(n_groups, n_experts, dtype=torch.float64)
    counts = torch.zeros(n_groups, dtype=torch.int64)
    for start in range(0, scores.shape[0], CHUNK_ROWS):
        lab = labels[start : start + CHUNK_ROWS]
        keep = lab >= 0
        lab = lab[keep]
        g = scores[start : start + CHUNK_ROWS].to("cpu", torch.float64)[keep]  # (c, E)
        sel = g != 0 if selected is None else selected[start : start + CHUNK_ROWS].cpu()[keep].bool()
        mass.index_add_(0, lab, g)
        hits.index_add_(0, lab, sel.double())
        counts += torch.bincount(lab, minlength=n_groups)
    kept = (counts > 0).numpy()
    n = counts.double().clamp(min=1)[:, None]
    return GroupStats(
        names=tuple(nm for nm, k in zip(names, kept) if k),
        skipped=tuple(nm for nm, k in zip(names, kept) if not k),
        counts=counts.numpy()[kept],
        mass=(mass / n).numpy()[kept],
        freq=(hits / n).numpy()[kept],
    )
