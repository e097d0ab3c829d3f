"""Monosemanticity metrics for anything routed per token: MoE experts, SAE latents, MLP neurons.

Pure functions on tensors/arrays (no model, no workspace). An "expert" is a column of a score
matrix G (n_tokens, E) with g_e(x) ≥ 0 and g_e(x) = 0 when e is not selected for token x:

    MoE router        g_e(x) = top-k routing weight (0 for unselected experts)  — see dense_scores
    MoEfied MLP       g_e(x) = ‖a_{N_e}(x)‖ for the top-k experts, else 0        — see probes.moefy
    SAE latents       g_e(x) = latent activation
    neurons           g_e(x) = |a_e(x)|  (or 1[a_e(x) > 0])

Tokens carry one integer group label ℓ(x) ∈ {0..D−1} (a domain of the corpus, or a token
concept from `concept_groups`); labels < 0 mark tokens to ignore. T_d = {x : ℓ(x) = d}, n_d = |T_d|.
A group with n_d = 0 is *skipped*: dropped from every result and listed in `skipped`.

    routing mass          r_{e,d} = (1/n_d) Σ_{x∈T_d} g_e(x)
    selection frequency   f_{e,d} = (1/n_d) Σ_{x∈T_d} 1[e selected for x]   (selected = g ≠ 0 by default)
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
    concept correlation   ρ_e = Pearson(g_e(x), c(x)) over tokens (NaN when either is constant)
    purge (Monet)         remove the experts with ρ_e > τ; the curve sorts experts by ρ descending
    masking selectivity   Δ_d = L_after(d) − L_before(d);  sel(d*) = Δ_{d*} − mean_{d≠d*} Δ_d

With top-k weights that sum to 1 per token, p(d) = n_d / n and I(E; D) is the information the
routing carries about the domain. Masking follows Mixtral: p = softmax(logits) over all experts,
keep the top-k, renormalise the kept weights to sum 1 (`normalise_topk=False` for OLMoE/Qwen-MoE
style routers that keep raw softmax weights). Removing experts sets their logits to −∞ first.
"""

from __future__ import annotations

import keyword
import math
import string
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError

CHUNK_ROWS = 65_536  # tokens converted to float64 at a time


class ExpertsError(WorkbenchError):
    """Bad input to an expert metric."""


ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# -- token concepts --------------------------------------------------------------------------
_SPACE_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}  # byte-level BPE / sentencepiece spellings


def _plain(token: str) -> str:
    return "".join(_SPACE_MARKERS.get(ch, ch) for ch in token)


def _word(token: str) -> str:
    """The token without its leading whitespace (' the' -> 'the')."""
    return _plain(token).lstrip()


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


# The single source of concept names: CLI choices, app labels and tests read this mapping.
# Order is precedence in `concept_groups` (a token gets the first concept it matches).
CONCEPTS: dict[str, Callable[[str], bool]] = {
    "whitespace": lambda t: _plain(t) != "" and _plain(t).isspace(),
    "digits": lambda t: _word(t) != "" and all(ch in string.digits for ch in _word(t).rstrip()),
    "punctuation": lambda t: _word(t).strip() != "" and all(_is_punct(ch) for ch in _word(t).strip()),
    "code_keywords": lambda t: _word(t).rstrip() in keyword.kwlist,
    "capitalised": lambda t: _word(t).rstrip().isalpha() and _word(t)[0].isupper(),
}
OTHER = "other"


def _check_concepts(names: Iterable[str] | None) -> list[str]:
    """The concepts asked for (default: all), in `CONCEPTS` order whatever order they were given in."""
    names = list(CONCEPTS) if names is None else list(names)
    unknown = [n for n in names if n not in CONCEPTS]
    if unknown:
        raise ExpertsError(f"unknown concept {unknown[0]!r}; valid: {', '.join(CONCEPTS)}")
    return [n for n in CONCEPTS if n in names]


def concept_masks(tokens: Sequence[str], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """name -> bool (n_tokens,): which tokens satisfy each concept predicate (concepts may overlap)."""
    names = _check_concepts(names)
    unique, inverse = np.unique(np.asarray(tokens, dtype=object).astype(str), return_inverse=True)
    return {n: np.fromiter((CONCEPTS[n](t) for t in unique), bool, len(unique))[inverse] for n in names}


def concept_groups(tokens: Sequence[str], names: Iterable[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Exclusive labels (n_tokens,) int64: the first matching concept in `CONCEPTS` order, else 'other'."""
    return exclusive_labels(concept_masks(tokens, names))


def exclusive_labels(masks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Concept masks (name -> bool (n,), in precedence order) -> exclusive labels (n,) and the names plus 'other'."""
    n = len(next(iter(masks.values()))) if masks else 0
    labels = np.full(n, len(masks), dtype=np.int64)
    for j, hit in reversed(list(enumerate(masks.values()))):  # earlier concepts overwrite later ones
        labels[hit] = j
    return labels, (*masks, OTHER)


# -- routing statistics ----------------------------------------------------------------------
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


# -- concept correlation and purge -----------------------------------------------------------
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


# -- masking ---------------------------------------------------------------------------------
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


# -- per-layer summary -----------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertSummary:
    """Every concentration metric of one layer over one grouping (domains or concepts)."""

    layer: int | str | None
    kind: str  # what the experts are: "moe", "moefied", "sae", "neuron", ...
    names: tuple[str, ...]  # groups with tokens
    skipped: tuple[str, ...]  # groups with no tokens (left out)
    counts: np.ndarray  # (D,) tokens per group
    mass: np.ndarray  # (D, E) r_{e,d}
    freq: np.ndarray  # (D, E) f_{e,d}
    specialist: np.ndarray  # (E,) group index or −1
    share: np.ndarray  # (D,) share of experts specialised in each group
    entropy: np.ndarray  # (D,) normalised routing entropy
    purity: np.ndarray  # (E,) max_d p(d|e), NaN for dead experts
    mi: MutualInformation
    factor: float  # skew factor used

    @property
    def n_experts(self) -> int:
        return self.mass.shape[1]

    @property
    def notice(self) -> str | None:
        return f"skipped groups with no tokens: {', '.join(self.skipped)}" if self.skipped else None

    def specialised_in(self, group: str) -> np.ndarray:
        """Experts that specialise in `group` (the ones Monet masking removes)."""
        return np.flatnonzero(self.specialist == self.names.index(group))

    def most_specialised_in(self, group: str, n: int) -> np.ndarray:
        """The ``n`` experts most skewed towards ``group`` (fewer if fewer have it as their strongest group)."""
        return skew_ranking(self.mass, self.names.index(group))[: max(int(n), 0)]

    def summary_rows(self) -> list[dict]:
        """One row per group: tokens, specialised share and count, normalised entropy."""
        return [
            {
                "layer": self.layer,
                "kind": self.kind,
                "group": name,
                "tokens": int(self.counts[d]),
                "specialised_share": float(self.share[d]),
                "n_specialised": int((self.specialist == d).sum()),
                "entropy": float(self.entropy[d]),
            }
            for d, name in enumerate(self.names)
        ]

    def expert_rows(self) -> list[dict]:
        """One row per expert: purity, specialist group (or None), total selection frequency."""
        total = self.counts.sum()
        freq = (self.freq * self.counts[:, None]).sum(0) / total if total else np.zeros(self.n_experts)
        return [
            {
                "layer": self.layer,
                "kind": self.kind,
                "expert": e,
                "purity": float(self.purity[e]),
                "specialist": self.names[self.specialist[e]] if self.specialist[e] >= 0 else None,
                "freq": float(freq[e]),
            }
            for e in range(self.n_experts)
        ]

    def layer_row(self) -> dict:
        """One row for the experts-vs-latents-vs-neurons table (means over live experts)."""
        alive = ~np.isnan(self.purity)
        return {
            "layer": self.layer,
            "kind": self.kind,
            "experts": self.n_experts,
            "dead": int((~alive).sum()),
            "specialised_share": float((self.specialist >= 0).mean()) if self.n_experts else 0.0,
            "mean_entropy": float(np.nanmean(self.entropy)) if np.isfinite(self.entropy).any() else float("nan"),
            "mean_purity": float(self.purity[alive].mean()) if alive.any() else float("nan"),
            "mi_nats": self.mi.nats,
            "mi_norm": self.mi.normalised,
        }


def summarise(
    scores: ArrayLike,
    labels: ArrayLike,
    names: Sequence[str],
    *,
    selected: ArrayLike | None = None,
    factor: float = 2.0,
    balanced_purity: bool = False,
    layer: int | str | None = None,
    kind: str = "experts",
) -> ExpertSummary:
    """All metrics of one layer: scores (n, E), labels (n,) into `names`, optional selection (n, E)."""
    stats = routing_stats(scores, labels, names, selected)
    spec = specialists(stats.mass, factor)
    return ExpertSummary(
        layer=layer,
        kind=kind,
        names=stats.names,
        skipped=stats.skipped,
        counts=stats.counts,
        mass=stats.mass,
        freq=stats.freq,
        specialist=spec,
        share=specialised_share(spec, len(stats.names)),
        entropy=routing_entropy(stats.mass),
        purity=purity(stats.mass, stats.counts, balanced_purity),
        mi=mutual_information(stats.mass, stats.counts),
        factor=factor,
    )
