"""CETT: cumulative error of tail truncation (Luo et al. 2024, "Sparsing Law").

For one token and one layer with neuron outputs n_i = W_out[:, i]·a_i, a threshold ε drops the
tail D(ε) = {i : ‖n_i‖ < ε}:

    CETT(ε) = ‖Σ_{i∈D(ε)} n_i‖ / ‖Σ_i n_i‖ = ‖W_out (a ⊙ 1[‖n‖<ε])‖ / ‖W_out a‖

(the output bias, if any, is not a neuron and is left out of both norms). Per layer we look for
the largest ε whose token-averaged CETT stays ≤ a target τ. CETT is monotone in ε only on
average, so the search bisects over a grid of candidate thresholds — just above each of
``grid_size`` quantiles of ‖n_i‖ in the calibration sample (so the last drops all), plus 0 —
and memoises every evaluation: the outer PPL search asks for many nearby targets, and each new
target starts from the tightest bracket already known.
"""

from __future__ import annotations

import torch

GRID_SIZE = 4096  # candidate thresholds per layer: ε resolution of 1/4096 in quantile


def neuron_norms(acts: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """‖n_i‖ = |a_i|·‖W_out[:, i]‖ for (..., d_mlp) activations."""
    return acts.abs() * column_norms


def cett(acts: torch.Tensor, w_out: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token CETT at threshold ε. acts (N, d_mlp), w_out (d_model, d_mlp) -> (N,)."""
    acts, w_out = acts.float(), w_out.float()
    total = (acts @ w_out.T).norm(dim=-1)  # (N,)
    return _tail_error(acts, neuron_norms(acts, w_out.norm(dim=0)), w_out, total, eps)


def _tail_error(acts, norms, w_out, total, eps: float) -> torch.Tensor:
    """‖W_out (a ⊙ 1[‖n‖ < ε])‖ / ‖W_out a‖ per token (0 where the MLP output is 0)."""
    error = ((acts * (norms < eps)) @ w_out.T).norm(dim=-1)  # (N,)
    return torch.where(total > 0, error / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


class LayerThresholdSearch:
    """Largest-ε-under-target search for one layer over a fixed calibration sample.

    Runs where ``w_out`` lives (the model's device; the activations are moved there): the grid is
    read to the host once, and each new grid point costs one read of its mean CETT.
    """

    def __init__(self, acts: torch.Tensor, w_out: torch.Tensor, grid_size: int = GRID_SIZE):
        self.w_out = w_out.detach().float()  # (d_model, d_mlp)
        self.acts = acts.to(self.w_out.device).float()  # (N, d_mlp)
        self.norms = neuron_norms(self.acts, self.w_out.norm(dim=0))  # (N, d_mlp)
        self.total = (self.acts @ self.w_out.T).norm(dim=-1)  # (N,)
        flat = self.norms.flatten().sort().values  # (N·d_mlp,)
        picks = flat[torch.linspace(0, flat.numel() - 1, grid_size, device=flat.device).round().long()]  # (grid_size,)
        # ε just above each picked norm drops that neuron too; ε = 0 drops nothing, the last ε drops all.
        above = torch.nextafter(picks, torch.full_like(picks, float("inf")))
        self.grid = torch.cat([picks.new_zeros(1), above]).unique().tolist()  # ascending ε, on the host
        self._known: dict[int, float] = {0: 0.0}  # grid index -> mean CETT; ε=0 drops nothing

    def mean_cett(self, index: int) -> float:
        if index not in self._known:
            self._known[index] = _tail_error(self.acts, self.norms, self.w_out, self.total, self.grid[index]).mean().item()
        return self._known[index]

    def threshold(self, target: float) -> float:
        """The largest grid ε with mean CETT ≤ target (0 when even the smallest step exceeds it)."""
        known = sorted(self._known)
        # Tightest bracket from earlier evaluations: lo satisfies the target, hi does not.
        lo = max(i for i in known if self._known[i] <= target)
        hi = min([i for i in known if i > lo and self._known[i] > target], default=len(self.grid))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.mean_cett(mid) <= target:
                lo = mid
            else:
                hi = mid
        return self.grid[lo]

    def evaluations(self) -> int:
        return len(self._known) - 1

