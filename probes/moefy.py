"""MoEfication of a dense MLP layer (Zhang et al. 2022): split its neurons into E equal experts.

Neurons that fire together go to the same expert. Over sample activations A (n_tokens, d_mlp),
neuron i is the vector v_i = standardise(|A[:, i]|) (or of 1[A[:, i] > 0] with binary=True, the
paper's ReLU co-activation), so v_i · v_j is the Pearson correlation of the two neurons'
activation magnitudes over tokens; constant (dead) neurons get v_i = 0.

Balanced k-means on {v_i}, run in kernel form on the d_mlp × d_mlp correlation matrix K (so the
token count only enters once, when K is accumulated chunk by chunk):

    centroid      c_e = (1/m) Σ_{j∈N_e} v_j,                     m = d_mlp / E
    distance      ‖v_i − c_e‖² = K_ii − (2/m) Σ_{j∈N_e} K_ij + (1/m²) Σ_{j,l∈N_e} K_jl
    objective     J = Σ_i ‖v_i − c_{e(i)}‖²
    init          k-means++ seeded by `seed` (torch.Generator); `n_init` restarts, lowest J wins
    assignment    greedy proposal rounds with capacity m: every unassigned neuron proposes to its
                  nearest expert that still has room; each expert keeps its closest proposers up
                  to its remaining room; repeat until all neurons are placed (≤ E rounds in practice).
                  Then swap pairs of neurons between experts while a swap lowers J itself (the
                  centroids move with the swap; see `improve_by_swaps`). No Hungarian / min-cost
                  flow; the swap search holds the d_mlp × d_mlp gains in row blocks. Ties break by
                  the lower index, so the result is deterministic.

Iterations stop once one lowers J by less than SWAP_RTOL·J (or after `max_iter`); the restart with
the lowest J is kept, then experts are renumbered by their smallest neuron so equal partitions compare equal.

Routing: an expert's score is the norm of its neurons' activations, s_e(x) = ‖A[x, N_e]‖₂; a token
keeps its top-k experts and the neurons of the other experts are zeroed (`mask_to_topk`, the function
an MLP forward hook calls to measure what top-k routing costs in loss).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import torch

from workbench.errors import WorkbenchError

SWAP_ROWS = 1024  # rows of the (d_mlp, d_mlp) swap-gain matrix held at once
SWAP_TOLERANCE = 1e-9  # smallest gain worth a swap
SWAP_RTOL = 1e-4  # stop swapping once a round lowers J by less than this share of J


class MoefyError(WorkbenchError):
    """Bad input to MoEfication."""


def check_experts(d_mlp: int, n_experts: int) -> int:
    """Expert size d_mlp / E, or a one-line error naming the valid E."""
    if n_experts < 1 or d_mlp % n_experts:
        divisors = [e for e in range(1, d_mlp + 1) if d_mlp % e == 0]
        raise MoefyError(f"E={n_experts} does not divide d_mlp={d_mlp}; valid E: {', '.join(map(str, divisors))}")
    return d_mlp // n_experts


def check_k(k: int, n_experts: int) -> None:
    if not 1 <= k <= n_experts:
        raise MoefyError(f"k={k} is out of range for E={n_experts} experts; choose 1 ≤ k ≤ {n_experts}")


class Partition(NamedTuple):
    """Neurons of one MLP layer split into E experts of d_mlp / E neurons each."""

    expert_of_neuron: torch.Tensor  # (d_mlp,) int64
    neurons_of_expert: torch.Tensor  # (E, d_mlp // E) int64, ascending within each expert
    seed: int

    @property
    def d_mlp(self) -> int:
        return self.expert_of_neuron.numel()

    @property
    def n_experts(self) -> int:
        return self.neurons_of_expert.shape[0]

    @classmethod
    def from_labels(cls, expert_of_neuron, seed: int) -> Partition:
        """Build (and check) a partition from the expert id of every neuron."""
        labels = torch.as_tensor(expert_of_neuron, dtype=torch.int64).flatten()  # (d_mlp,)
        n_experts = int(labels.max()) + 1 if labels.numel() else 0
        counts = torch.bincount(labels.clamp(min=0), minlength=n_experts) if n_experts else torch.zeros(0)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(counts.min()) != int(counts.max()):
            raise MoefyError(f"not a balanced partition: expert sizes {counts.tolist()} over d_mlp={labels.numel()}")
        order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))  # by expert, then neuron
        return cls(labels, order.view(n_experts, -1), int(seed))

    def to_dict(self) -> dict:
        return {
            "d_mlp": self.d_mlp,
            "n_experts": self.n_experts,
            "seed": self.seed,
            "expert_of_neuron": self.expert_of_neuron.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        part = cls.from_labels(data["expert_of_neuron"], data["seed"])
        if (part.d_mlp, part.n_experts) != (data.get("d_mlp", part.d_mlp), data.get("n_experts", part.n_experts)):
            said = f"d_mlp={data.get('d_mlp')}, E={data.get('n_experts')}"
            raise MoefyError(f"partition says {said} but holds {part.d_mlp} neurons in {part.n_experts} experts")
        return part


# -- co-activation ---------------------------------------------------------------------------
def coactivation(acts: torch.Tensor | Iterable[torch.Tensor], binary: bool = False) -> torch.Tensor:
    """(d_mlp, d_mlp) float64 correlation of neuron activation magnitudes over all tokens.

    `acts` is one tensor (..., d_mlp) or an iterable of such chunks; 0 for constant neurons.
    """
    chunks = [acts] if isinstance(acts, torch.Tensor) else acts
    n, shift, s1, s2 = 0, None, None, None
    for chunk in chunks:
        v = chunk.reshape(-1, chunk.shape[-1])  # (c, d_mlp)
        v = (v > 0).to("cpu", torch.float64) if binary else v.to("cpu", torch.float64).abs()
        if shift is None:
            shift = v.mean(0) if v.shape[0] else torch.zeros(v.shape[1], dtype=torch.float64)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(v.shape[1], v.shape[1], dtype=torch.float64)
        elif v.shape[1] != shift.numel():
            raise MoefyError(f"activation chunks disagree on d_mlp: {shift.numel()} then {v.shape[1]}")
        v = v - shift  # shifted sums keep the covariance accurate
        s1 += v.sum(0)
        s2 += v.T @ v
        n += v.shape[0]
    if not n:
        raise MoefyError("no activations to MoEfy: need at least one token")
    cov = s2 - torch.outer(s1, s1) / n  # (d, d), n × covariance
    std = cov.diagonal().clamp(min=0).sqrt()
    alive = std > 1e-12 * max(float(std.max()), 1.0)
    inv = torch.where(alive, 1 / torch.where(alive, std, 1.0), 0.0)
    return cov * inv[:, None] * inv[None, :]


# -- balanced k-means in kernel form ---------------------------------------------------------
def _kernel_distances(gram: torch.Tensor, labels: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, float]:
    """‖v_i − c_e‖² (d, E) for the centroids of `labels`, and the objective J of `labels`."""
    size = labels.numel() // n_experts
    onehot = torch.nn.functional.one_hot(labels, n_experts).double() / size  # (d, E)
    k_h = gram @ onehot  # (d, E): (1/m) Σ_{j∈e} K_ij
    cc = (onehot * k_h).sum(0)  # (E,): (1/m²) Σ_{j,l∈e} K_jl
    diag = gram.diagonal()
    dist = (diag[:, None] - 2 * k_h + cc[None, :]).clamp(min=0)
    return dist, float(diag.sum() - size * cc.sum())


def balanced_assign(dist: np.ndarray, size: int) -> np.ndarray:
    """Labels (d,) with exactly `size` neurons per expert, by greedy proposal rounds on dist (d, E)."""
    d, n_experts = dist.shape
    labels = np.full(d, -1, dtype=np.int64)
    room = np.full(n_experts, size, dtype=np.int64)
    while (free := np.flatnonzero(labels < 0)).size:
        masked = np.where(room[None, :] > 0, dist[free], np.inf)  # (f, E)
        choice = masked.argmin(axis=1)  # first minimum: ties go to the lower expert id
        for e in np.unique(choice):
            proposers = free[choice == e]
            take = proposers[np.argsort(dist[proposers, e], kind="stable")[: room[e]]]
            labels[take] = e
            room[e] -= take.size
    return labels


def improve_by_swaps(gram: torch.Tensor, labels: np.ndarray, n_experts: int, max_rounds: int = 100) -> np.ndarray:
    """Swap pairs of neurons between experts while a swap lowers J exactly (centroids move with it).

    With R[x, e] = Σ_{a∈N_e} K_xa, swapping i ∈ A with j ∈ B lowers J by
    (2/m)·(R[j,A] − R[i,A] + R[i,B] − R[j,B] + K_ii + K_jj − 2K_ij). Each round scores every pair
    (row blocks), then walks the rows' best partners from the largest gain down, re-checking each gain
    against the updated R before applying it, so J strictly decreases with every swap.
    """
    k = gram.numpy()
    labels = labels.copy()
    d = labels.size
    diag = k.diagonal()
    r = k @ np.eye(n_experts)[labels]  # (d, E)
    size = d // n_experts
    for _ in range(max_rounds):
        objective = float(diag.sum() - (r[np.arange(d), labels]).sum() / size)  # J of the current labels
        own = r[np.arange(d), labels]  # (d,)
        partner, gain = np.empty(d, dtype=np.int64), np.empty(d)
        for start in range(0, d, SWAP_ROWS):
            rows = np.arange(start, min(d, start + SWAP_ROWS))
            g = (
                r[rows][:, labels] + r[:, labels[rows]].T - own[rows, None] - own[None, :]
                + diag[rows, None] + diag[None, :] - 2 * k[rows]
            )  # (b, d)
            g[labels[rows, None] == labels[None, :]] = -np.inf
            partner[rows] = g.argmax(axis=1)
            gain[rows] = g[np.arange(rows.size), partner[rows]]
        improved = 0.0
        for i in np.argsort(-gain, kind="stable"):
            if gain[i] <= SWAP_TOLERANCE:
                break
            j = partner[i]
            a, b = labels[i], labels[j]
            exact = r[j, a] - r[i, a] + r[i, b] - r[j, b] + diag[i] + diag[j] - 2 * k[i, j] if a != b else 0.0
            if exact <= SWAP_TOLERANCE:
                continue  # an earlier swap this round changed this pair
            labels[i], labels[j] = b, a
            r[:, a] += k[:, j] - k[:, i]
            r[:, b] += k[:, i] - k[:, j]
            improved += 2 * float(exact) / size
        if improved <= SWAP_RTOL * objective:  # converged, up to a negligible share of J
            break
    return labels


def _kmeans_pp(gram: torch.Tensor, n_experts: int, generator: torch.Generator) -> torch.Tensor:
    """(d, E) squared distances from every neuron to E k-means++ seed neurons."""
    d = gram.shape[0]
    diag = gram.diagonal()
    centres = [int(torch.randint(d, (1,), generator=generator))]
    closest = (diag + diag[centres[0]] - 2 * gram[:, centres[0]]).clamp(min=0)  # (d,)
    while len(centres) < n_experts:
        weights = closest.clone()
        weights[centres] = 0
        if float(weights.sum()) <= 0:  # all remaining neurons coincide with a centre
            weights = torch.ones(d, dtype=torch.float64)
            weights[centres] = 0
        c = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(c)
        closest = torch.minimum(closest, (diag + diag[c] - 2 * gram[:, c]).clamp(min=0))
    idx = torch.tensor(centres)
    return (diag[:, None] + diag[idx][None, :] - 2 * gram[:, idx]).clamp(min=0)


def _canonical(labels: np.ndarray, n_experts: int) -> np.ndarray:
    """Renumber experts by their smallest neuron index."""
    first = np.full(n_experts, labels.size)
    np.minimum.at(first, labels, np.arange(labels.size))
    rank = np.empty(n_experts, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_experts)
    return rank[labels]


def balanced_kmeans(gram: torch.Tensor, n_experts: int, seed: int = 0, n_init: int = 2, max_iter: int = 100) -> np.ndarray:
    """Expert id (d,) for each point of a Gram matrix (d, d), every expert exactly d / E points."""
    d = gram.shape[0]
    size = check_experts(d, n_experts)
    if n_experts == 1:
        return np.zeros(d, dtype=np.int64)
    if size == 1:
        return np.arange(d, dtype=np.int64)
    gram = gram.double()
    generator = torch.Generator().manual_seed(int(seed))
    objective = lambda lab: _kernel_distances(gram, torch.from_numpy(lab), n_experts)
    best, best_j = None, float("inf")
    for _ in range(max(1, n_init)):
        init = _kmeans_pp(gram, n_experts, generator).numpy()  # (d, E) distances to the seeds
        labels = improve_by_swaps(gram, balanced_assign(init, size), n_experts)
        dist, j = objective(labels)
        for _ in range(max_iter):  # Lloyd step (balanced) + swaps, while J drops by more than SWAP_RTOL
            new = improve_by_swaps(gram, balanced_assign(dist.numpy(), size), n_experts)
            new_dist, new_j = objective(new)
            if new_j >= j * (1 - SWAP_RTOL):
                break
            labels, dist, j = new, new_dist, new_j
        if j < best_j - 1e-9:
            best, best_j = labels, j
    return _canonical(best, n_experts)


def moefy(
    acts: torch.Tensor | Iterable[torch.Tensor],
    n_experts: int,
    *,
    seed: int = 0,
    binary: bool = False,
    n_init: int = 2,
    max_iter: int = 100,
) -> Partition:
    """Partition the d_mlp neurons seen in `acts` ((..., d_mlp) or chunks of it) into E experts."""
    if isinstance(acts, torch.Tensor):
        check_experts(acts.shape[-1], n_experts)  # fail before the pass over the data
    gram = coactivation(acts, binary=binary)
    return Partition.from_labels(balanced_kmeans(gram, n_experts, seed, n_init, max_iter), seed)


# -- routing ---------------------------------------------------------------------------------
def _check_acts(acts: torch.Tensor, partition: Partition) -> None:
    if acts.shape[-1] != partition.d_mlp:
        raise MoefyError(f"activations have width {acts.shape[-1]} but the partition covers d_mlp={partition.d_mlp}")


def expert_scores(acts: torch.Tensor, partition: Partition) -> torch.Tensor:
    """s_e(x) = ‖acts[..., N_e]‖₂: (..., d_mlp) -> (..., E) float32."""
    _check_acts(acts, partition)
    grouped = acts.float()[..., partition.neurons_of_expert.to(acts.device)]  # (..., E, m)
    return grouped.norm(dim=-1)


def route(acts: torch.Tensor, partition: Partition, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (..., E), selected (..., k) top-k expert ids, highest score first)."""
    check_k(k, partition.n_experts)
    scores = expert_scores(acts, partition)
    return scores, scores.topk(k, dim=-1).indices


def topk_scores(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Scores (..., E) with 0 for unselected experts: the g_e(x) that probes.score_matrix expects."""
    return torch.zeros_like(scores).scatter_(-1, selected, scores.gather(-1, selected))


def mask_to_topk(acts: torch.Tensor, partition: Partition, k: int) -> torch.Tensor:
    """Zero the neurons of every expert outside each token's top-k: (..., d_mlp) -> (..., d_mlp)."""
    _, selected = route(acts, partition, k)
    keep = torch.zeros(*selected.shape[:-1], partition.n_experts, dtype=torch.bool, device=acts.device)
    keep.scatter_(-1, selected, True)  # (..., E)
    keep_neuron = keep[..., partition.expert_of_neuron.to(acts.device)]  # (..., d_mlp)
    return torch.where(keep_neuron, acts, torch.zeros((), dtype=acts.dtype, device=acts.device))
