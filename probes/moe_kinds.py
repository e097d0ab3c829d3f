"""One adapter per kind of unit a `workbench moe run` compares, and one per source of experts.

The units of every kind are scored per token as ``probes.score_matrix`` expects (g ≥ 0, 0 when not
selected):

    moe      a Hugging Face MoE's own routers      g_e = routing weight of a selected expert
    moefied  a dense MLP split into E experts      g_e = ‖a_{N_e}‖ for the top-k experts, else 0
             (probes.moefy; partition fitted on the fit tokens)
    neuron   the same MLP's neurons                g_i = |a_i|
    sae      an SAE of the workspace               g_f = latent activation

and removed from a forward as follows: moe, router logits −∞ before the top-k; moefied, expert
scores −∞ before the top-k, so its neurons are zeroed; neuron, zero them; sae, subtract the
latents' decoded contribution, keeping the SAE's error term. BOS (position 0) passes every hook
unchanged; a MoE's router hook re-routes every position, BOS included, as its own router would.

``UNIT_KINDS`` maps a kind's name to its ``UnitKind`` (where its units live, which activations
its scores need, the scores, the removal); ``EXPERT_SOURCES`` maps a plan's source ("router" or
"moefied") to its ``ExpertSource`` (fitting, routing records, the top-k model of the k curve,
the per-token routes). ``probes.moe_measure`` only goes through these two mappings.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from probes.moe_capture import Intervention, Pass, passthrough_bos
from probes.moe_request import Plan
from probes.moefy import Partition, expert_scores, moefy, topk_scores
from probes.routing import recorded_routing, rerouted
from workbench.hooks import Capture

SAE_ROWS = 4096  # tokens encoded at a time


@dataclass
class Units:
    """What the adapters share within one run: the model, the plan, the loaded SAE (if the plan
    has one) and the MoEfied partitions (fitted on the fit pass by the moefied source)."""

    model: object
    plan: Plan
    sae: torch.nn.Module | None = None
    partitions: dict[int, Partition] = field(default_factory=dict)

    def mlp_hook(self, layer: int) -> str:
        return self.plan.sites[layer].hook


class UnitKind(NamedTuple):
    """How one kind of unit is located, scored and removed."""

    layers: Callable[[Plan], list[int]]
    """the layers its units are scored at (an SAE outside the blocks: -1)"""
    captures: Callable[[Plan], list[str]]
    """the hooks whose activations its scores need"""
    scores: Callable[[Units, int, Pass], torch.Tensor]
    """(units, layer, pass) -> per-token scores g (n, units of the layer)"""
    removal: Callable[[Units, dict[int, np.ndarray]], Intervention]
    """(units, {layer: units to remove}) -> the forward without them"""
    keeps_one_per_layer: bool = False
    """a router needs an expert left in every layer: a removal of them all is skipped"""


class ExpertSource(NamedTuple):
    """Where a plan's experts come from: a MoE's own routers, or a MoEfied dense MLP."""

    kind: str
    """the unit kind of its experts"""
    recording: Callable[[Units], AbstractContextManager]
    """around a pass: yields what the routers chose (``Pass.recorder``), or None"""
    fit: Callable[[Units, Capture, torch.Tensor, int], None]
    """(units, fit-pass capture, labelled-token mask (n,), seed): prepare the experts"""
    reference_k: Callable[[Plan], int]
    """the k at which the k curve is the unchanged model"""
    top_k: Callable[[Units, int], Intervention]
    """every chosen layer routed top-k"""
    top_k_desc: str
    """progress label of a top-k forward, formatted with k and E"""
    routes: Callable[[Units, int, Pass], tuple[torch.Tensor, torch.Tensor]]
    """(units, layer, pass) -> (experts (n, k), weights (n, k)) per token"""


def routed(acts: torch.Tensor, partition: Partition, k: int, remove=()) -> torch.Tensor:
    """MoEfied top-k of (..., d_mlp) activations with some experts removed (scores −∞ before the
    top-k, so they are never kept); with nothing removed this is ``probes.moefy.mask_to_topk``."""
    scores = expert_scores(acts, partition)  # (..., E)
    remove = sorted({int(e) for e in remove})
    if remove:
        scores[..., remove] = float("-inf")
    selected = scores.topk(k, dim=-1).indices  # (..., k)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, selected, True)
    if remove:
        keep[..., remove] = False  # fewer than k experts left: the removed ones still stay off
    keep_neuron = keep[..., partition.expert_of_neuron.to(acts.device)]  # (..., d_mlp)
    return torch.where(keep_neuron, acts, torch.zeros((), dtype=acts.dtype, device=acts.device))


def _sae_device(sae) -> torch.device:
    return next(sae.parameters()).device


def _sae_encode(sae, acts: torch.Tensor) -> torch.Tensor:
    """Latents of (n, d) activations, encoded SAE_ROWS at a time on the SAE's device: (n, width) on acts' device."""
    device = _sae_device(sae)
    with torch.inference_mode():
        return torch.cat([sae.encode(acts[i : i + SAE_ROWS].to(device).float()).float().to(acts.device)
                          for i in range(0, acts.shape[0], SAE_ROWS)])


def _chosen_layers(plan: Plan) -> list[int]:
    return list(plan.layers)


def _mlp_captures(plan: Plan) -> list[str]:
    return [plan.sites[L].hook for L in plan.layers]


# -- moe: a MoE model's own router experts ---------------------------------------------------
def _moe_scores(units: Units, layer: int, run: Pass) -> torch.Tensor:
    return run.recorder.scores(layer)


def _moe_removal(units: Units, remove: dict[int, np.ndarray]) -> Intervention:
    return Intervention([], rerouted(units.model, {L: v.tolist() for L, v in remove.items()}))


def _router_routes(units: Units, layer: int, run: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    r = run.recorder.routing(layer)
    return r.indices, r.weights


# -- moefied: a dense MLP split into experts -------------------------------------------------
def _moefied_scores(units: Units, layer: int, run: Pass) -> torch.Tensor:
    scores = expert_scores(run.capture.rows(units.mlp_hook(layer)), units.partitions[layer])
    return topk_scores(scores, scores.topk(units.plan.k, dim=-1).indices)


def _moefied_top_k(units: Units, k: int, remove: dict[int, np.ndarray] | None = None) -> Intervention:
    """Every chosen layer's MLP routed top-k over its experts, ``remove``'s experts never kept."""
    remove = remove or {}
    return Intervention([(units.mlp_hook(L), passthrough_bos(lambda a, L=L: routed(a, units.partitions[L], k, remove.get(L, ()))))
                         for L in units.plan.layers])


def _moefied_removal(units: Units, remove: dict[int, np.ndarray]) -> Intervention:
    return _moefied_top_k(units, units.plan.k, remove)


def _moefied_fit(units: Units, capture: Capture, labelled: torch.Tensor, seed: int) -> None:
    for L in units.plan.layers:
        units.partitions[L] = moefy(capture.rows(units.mlp_hook(L))[labelled], units.plan.n_experts, seed=seed)


def _moefied_routes(units: Units, layer: int, run: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    top = expert_scores(run.capture.rows(units.mlp_hook(layer)), units.partitions[layer]).topk(units.plan.k, dim=-1)
    return top.indices, top.values


# -- neuron: the same MLP's neurons ----------------------------------------------------------
def _neuron_scores(units: Units, layer: int, run: Pass) -> torch.Tensor:
    return run.capture.rows(units.mlp_hook(layer)).abs()


def _neuron_removal(units: Units, remove: dict[int, np.ndarray]) -> Intervention:
    return Intervention([(units.mlp_hook(L), passthrough_bos(lambda a, v=v: a.index_fill(-1, torch.as_tensor(v, device=a.device), 0.0)))
                         for L, v in remove.items()])


# -- sae: the latents of a workspace SAE -----------------------------------------------------
def _sae_layers(plan: Plan) -> list[int]:
    return [plan.sae_layer if plan.sae_layer is not None else -1]


def _sae_captures(plan: Plan) -> list[str]:
    return [plan.sae.hook]


def _sae_scores(units: Units, layer: int, run: Pass) -> torch.Tensor:
    return _sae_encode(units.sae, run.capture.rows(units.plan.sae.hook))


def _sae_removal(units: Units, remove: dict[int, np.ndarray]) -> Intervention:
    latents = next(iter(remove.values()))
    sae = units.sae

    def ablate(a, latents=latents):
        if _sae_device(sae) != a.device:  # measure() loads it on the model's device; a hook elsewhere moves it once
            sae.to(a.device)
        idx = torch.as_tensor(latents, device=a.device)
        flat = a.reshape(-1, a.shape[-1])  # (n, d)
        z = sae.encode(flat.float())  # (n, width)
        kept = z.index_fill(-1, idx, 0.0)
        return (flat - (sae.decode(z) - sae.decode(kept)).to(flat.dtype)).reshape(a.shape)

    return Intervention([(units.plan.sae.hook, passthrough_bos(ablate))])


UNIT_KINDS: dict[str, UnitKind] = {
    "moe": UnitKind(_chosen_layers, lambda plan: [], _moe_scores, _moe_removal, keeps_one_per_layer=True),
    "moefied": UnitKind(_chosen_layers, _mlp_captures, _moefied_scores, _moefied_removal),
    "neuron": UnitKind(_chosen_layers, _mlp_captures, _neuron_scores, _neuron_removal),
    "sae": UnitKind(_sae_layers, _sae_captures, _sae_scores, _sae_removal),
}

EXPERT_SOURCES: dict[str, ExpertSource] = {
    "router": ExpertSource(
        kind="moe",
        recording=lambda units: recorded_routing(units.model, units.plan.layers),
        fit=lambda units, capture, labelled, seed: None,
        reference_k=lambda plan: plan.k,  # the config's k is the model itself
        top_k=lambda units, k: Intervention([], rerouted(units.model, k=k)),
        top_k_desc="re-routed top-{k} of {E}",
        routes=_router_routes,
    ),
    "moefied": ExpertSource(
        kind="moefied",
        recording=lambda units: nullcontext(),
        fit=_moefied_fit,
        reference_k=lambda plan: plan.n_experts,  # k = E keeps every expert: the dense model
        top_k=_moefied_top_k,
        top_k_desc="top-{k} of {E}",
        routes=_moefied_routes,
    ),
}
