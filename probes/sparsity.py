"""Activation sparsity of MLP neurons at a fixed perplexity cost (Luo et al. 2024; Li et al. 2022).

A *truncation rule* zeroes neurons in every layer during a real forward pass; its one knob
κ ∈ [0, 1] trades sparsity for perplexity (more truncation as κ grows):

    cett   κ = CETT target τ; per layer the largest ε_l with mean CETT ≤ τ  (see probes.cett);
           keep neuron i iff |a_i|·‖W_out[:, i]‖ ≥ ε_l
    topk   keep the ⌈(1−κ)·d_mlp⌉ neurons with the largest |a_i|·‖W_out[:, i]‖, per token and layer
    fat    one global ε = the κ-quantile of |a_i| over the calibration sample; keep iff |a_i| ≥ ε

**PPL-p% sparsity** bisects κ (tolerance 1e-3) for the largest value whose truncated perplexity
stays ≤ (1 + p/100)·PPL_dense; the *activation ratio* is the fraction of neurons kept, per token,
averaged over tokens (positions ≥ 1) and then layers; sparsity = 1 − activation ratio.
The knob-free **zero** metric counts exact zeros (a_i == 0) in the dense pass: the "lazy neuron"
measure, meaningful for ReLU-family activations (SiLU almost never gives an exact 0).

Thresholds come from dense activations on a calibration sample (the first tokens of the
evaluation text); perplexity and kept fractions come from the truncated forward over all of it.
BOS (position 0) is never truncated or counted: its activations are outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from probes.cett import LayerThresholdSearch
from probes.domains import token_losses
from probes.neurons import MLPSite, mlp_sites
from workbench.errors import WorkbenchError
from workbench.hooks import Capture, attached

SEARCH_TOLERANCE = 1e-3
FAT_SAMPLE_PER_LAYER = 65_536  # |a| values per layer pooled for the global FAT quantiles


class SparsityError(WorkbenchError):
    """Bad input to a sparsity measurement."""


# -- truncation rules ------------------------------------------------------------------------
class Calibration:
    """Dense activations on the calibration sample and what each rule derives from them."""

    def __init__(self, sites: list[MLPSite], acts: list[torch.Tensor], grid_size: int | None = None):
        """acts: per layer (N, d_mlp), any device; everything is computed on each site's (the model's) device."""
        self.sites = sites
        extra = {"grid_size": grid_size} if grid_size else {}
        self._cett = [LayerThresholdSearch(a, s.w_out, **extra) for a, s in zip(acts, sites)]
        generator = torch.Generator().manual_seed(0)  # on the CPU: the same sample on every device
        pooled = []
        for a, s in zip(acts, sites):
            flat = a.to(s.w_out.device).abs().flatten()  # (N·d_mlp,)
            if flat.numel() > FAT_SAMPLE_PER_LAYER:
                flat = flat[torch.randperm(flat.numel(), generator=generator)[:FAT_SAMPLE_PER_LAYER].to(flat.device)]
            pooled.append(flat.float())
        device = sites[0].w_out.device if sites else torch.device("cpu")
        self._fat_sorted = torch.cat([p.to(device) for p in pooled]).sort().values

    def cett_thresholds(self, target: float) -> list[float]:
        return [search.threshold(target) for search in self._cett]

    def fat_threshold(self, quantile: float) -> float:
        if quantile <= 0:
            return 0.0
        index = min(self._fat_sorted.numel() - 1, math.ceil(quantile * self._fat_sorted.numel()) - 1)
        value = self._fat_sorted[index]
        return float(torch.nextafter(value, torch.full_like(value, math.inf)))  # drops that value too


KeepFn = Callable[[MLPSite, torch.Tensor], torch.Tensor]  # (site, acts (b, t, d_mlp)) -> bool keep mask


class Truncation(NamedTuple):
    thresholds: list[float]  # per layer: ε_l (cett, fat) or kept neurons k (topk)
    keep: KeepFn


def _keep_above(thresholds: list[float], by_norm: bool) -> KeepFn:
    def keep(site: MLPSite, acts: torch.Tensor) -> torch.Tensor:
        size = acts.abs() * site.column_norms.to(acts.dtype) if by_norm else acts.abs()
        return size >= thresholds[site.layer]

    return keep


def cett_rule(cal: Calibration, knob: float) -> Truncation:
    thresholds = cal.cett_thresholds(knob)
    return Truncation(thresholds, _keep_above(thresholds, by_norm=True))


def fat_rule(cal: Calibration, knob: float) -> Truncation:
    eps = cal.fat_threshold(knob)
    thresholds = [eps] * len(cal.sites)
    return Truncation(thresholds, _keep_above(thresholds, by_norm=False))


def topk_rule(cal: Calibration, knob: float) -> Truncation:
    ks = [max(0, min(int(s.column_norms.numel()), math.ceil((1 - knob) * s.column_norms.numel()))) for s in cal.sites]

    def keep(site: MLPSite, acts: torch.Tensor) -> torch.Tensor:
        k, d_mlp = ks[site.layer], acts.shape[-1]
        if k >= d_mlp:
            return torch.ones_like(acts, dtype=torch.bool)
        mask = torch.zeros_like(acts, dtype=torch.bool)
        if k > 0:
            top = (acts.abs() * site.column_norms.to(acts.dtype)).topk(k, dim=-1).indices  # (b, t, k)
            mask.scatter_(-1, top, True)
        return mask

    return Truncation([float(k) for k in ks], keep)


RULES: dict[str, Callable[[Calibration, float], Truncation]] = {"cett": cett_rule, "topk": topk_rule, "fat": fat_rule}
ZERO = "zero"  # knob-free exact-zero count


def metric_names() -> list[str]:
    return [*RULES, ZERO]


# -- forward passes --------------------------------------------------------------------------
class Evaluation(NamedTuple):
    ppl: float
    layer_ratios: list[float]  # kept fraction per layer (positions ≥ 1)
    zero_fractions: list[float]  # exact zeros per layer in this pass (dense pass: the lazy-neuron metric)

    @property
    def activation_ratio(self) -> float:
        return sum(self.layer_ratios) / len(self.layer_ratios)


def evaluate(model, sites: list[MLPSite], tokens: torch.Tensor, truncation: Truncation | None = None,
             batch_size: int = 8) -> Evaluation:
    """Perplexity of next-token prediction over tokens (R, T) with the truncation applied in every layer."""
    device = next(model.parameters()).device
    kept = torch.zeros(len(sites), dtype=torch.float64, device=device)
    zeros = torch.zeros(len(sites), dtype=torch.float64, device=device)

    def hook_for(site: MLPSite):
        def apply(acts: torch.Tensor, hook=None):  # acts: (b, t, d_mlp)
            body = acts[:, 1:]
            zeros[site.layer] += (body == 0).sum()
            if truncation is None:
                kept[site.layer] += body.numel()
                return None
            mask = truncation.keep(site, body)  # (b, t-1, d_mlp)
            kept[site.layer] += mask.sum()
            return torch.cat([acts[:, :1], body * mask], dim=1)

        return apply

    losses = token_losses(model, tokens, hooks=[(site.hook, hook_for(site)) for site in sites], batch_size=batch_size)
    n_predicted = losses.numel()  # (R, T-1) next-token losses
    per_layer = [n_predicted * s.column_norms.numel() for s in sites]
    return Evaluation(
        ppl=math.exp(losses.double().mean().item()),
        layer_ratios=[k / n for k, n in zip(kept.tolist(), per_layer)],
        zero_fractions=[z / n for z, n in zip(zeros.tolist(), per_layer)],
    )


def calibrate(model, sites: list[MLPSite], tokens: torch.Tensor, n_tokens: int, batch_size: int = 8,
              grid_size: int | None = None) -> Calibration:
    """Dense MLP activations on the first ``n_tokens`` predicted positions of ``tokens``."""
    rows = max(1, math.ceil(n_tokens / max(1, tokens.shape[1] - 1)))
    sample = tokens[:rows]
    device = next(model.parameters()).device
    capture = Capture([s.hook for s in sites], keep_all=True, skip_first=1)  # rows (b·(t-1), d_mlp), BOS left out
    for start in range(0, sample.shape[0], batch_size):
        with torch.inference_mode(), attached(model, capture.hooks()):
            model(sample[start : start + batch_size].to(device))
    return Calibration(sites, [capture.rows(s.hook)[:n_tokens] for s in sites], grid_size)


# -- PPL-p% search ---------------------------------------------------------------------------
@dataclass
class SearchResult:
    knob: float  # the largest knob meeting the perplexity goal (within the tolerance)
    evaluation: Evaluation  # at that knob
    goal_ppl: float
    tried: dict[float, Evaluation] = field(default_factory=dict)  # every knob evaluated: the trade-off curve


def bisect_knob(evaluate_at: Callable[[float], Evaluation], goal_ppl: float, tolerance: float = SEARCH_TOLERANCE,
                on_step: Callable[[float, Evaluation], None] | None = None, first: float = 1 / 32) -> SearchResult:
    """Largest κ ∈ [0, 1] with ppl(κ) ≤ goal, assuming ppl grows with κ; stops when the bracket ≤ tolerance.

    The bracket grows geometrically from ``first`` (κ = first, 2·first, … up to 1) before bisecting:
    useful knobs are usually small, so this costs fewer forward passes than bisecting [0, 1].
    """
    tried: dict[float, Evaluation] = {}

    def at(knob: float) -> Evaluation:
        if knob not in tried:
            tried[knob] = evaluate_at(knob)
            if on_step:
                on_step(knob, tried[knob])
        return tried[knob]

    lo, hi = 0.0, min(1.0, first)
    at(lo)
    while at(hi).ppl <= goal_ppl:
        if hi == 1.0:
            return SearchResult(hi, tried[hi], goal_ppl, tried)
        lo, hi = hi, min(1.0, 2 * hi)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if at(mid).ppl <= goal_ppl:
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, tried[lo], goal_ppl, tried)


# -- one model, several metrics -------------------------------------------------------------
class Measurement(NamedTuple):
    metric: str  # a rule name or ZERO
    p: float | None  # PPL-p% (None for ZERO)
    knob: float | None
    ppl_dense: float
    ppl: float
    layer_ratios: list[float]
    thresholds: list[float] | None
    curve: list[tuple[float, float, float]]  # (knob, ppl, activation ratio), knob ascending

    @property
    def activation_ratio(self) -> float:
        return sum(self.layer_ratios) / len(self.layer_ratios)


def check_request(metrics: list[str], ps: list[float]) -> None:
    unknown = [m for m in metrics if m not in metric_names()]
    if unknown:
        raise SparsityError(f"unknown sparsity metric '{unknown[0]}'; valid: {', '.join(metric_names())}")
    for p in ps:
        if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
            raise SparsityError(f"p must be a positive number of percent (PPL-p%), got {p}")


def measure(model, tokens: torch.Tensor, *, metrics: list[str] | None = None, ps: list[float] | None = None,
            calibration_tokens: int = 2048, batch_size: int = 8, progress: bool = True) -> list[Measurement]:
    """Activation ratio per layer under each metric at each PPL-p% (and the exact-zero count once)."""
    metrics = list(metrics or ["cett", ZERO])
    ps = list(ps or [1.0])
    check_request(metrics, ps)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
        raise SparsityError(f"evaluation tokens must be (rows, ctx ≥ 2), got shape {tuple(tokens.shape)}")
    sites = mlp_sites(model)
    dense = evaluate(model, sites, tokens, None, batch_size)
    results = []
    if ZERO in metrics:
        nonzero = [1 - z for z in dense.zero_fractions]
        results.append(Measurement(ZERO, None, None, dense.ppl, dense.ppl, nonzero, None, []))
    rules = [m for m in metrics if m in RULES]
    if not rules:
        return results
    cal = calibrate(model, sites, tokens, calibration_tokens, batch_size)
    bar = tqdm(total=len(rules) * len(ps), desc="PPL-p% searches", unit="search", disable=not progress)
    for rule in rules:
        truncations: dict[float, Truncation] = {}

        def evaluate_at(knob: float) -> Evaluation:
            truncations[knob] = RULES[rule](cal, knob)
            return evaluate(model, sites, tokens, truncations[knob], batch_size)

        tried: dict[float, Evaluation] = {0.0: dense}  # κ = 0 truncates nothing: reuse the dense pass
        for p in sorted(ps):
            goal = (1 + p / 100) * dense.ppl

            def cached(knob: float) -> Evaluation:
                if knob not in tried:
                    tried[knob] = evaluate_at(knob)
                return tried[knob]

            found = bisect_knob(cached, goal, on_step=lambda k, e: bar.set_postfix(rule=rule, p=p, knob=f"{k:.4f}", ppl=f"{e.ppl:.3f}"))
            thresholds = truncations[found.knob].thresholds if found.knob in truncations else [0.0] * len(sites)
            curve = [(k, e.ppl, e.activation_ratio) for k, e in sorted(tried.items())]
            results.append(Measurement(rule, p, found.knob, dense.ppl, found.evaluation.ppl,
                                       found.evaluation.layer_ratios, thresholds, curve))
            bar.update()
    bar.close()
    return results
