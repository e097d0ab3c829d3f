"""Routing of Hugging Face MoE models through the TransformerBridge: capture and expert masking.

Every supported family's router (transformers 5.x) is a module that returns the tuple
``(router_logits (n, E), top_k_weights (n, k), top_k_index (n, k))`` for the n = batch·pos tokens
of one layer, and the sparse block multiplies expert e's output by its weight. One registry,
``FAMILIES``, says per family how those weights follow from the logits (all read from the
model's config, the bias from the router's own buffer):

    softmax families    p = softmax(l);  S = top-k(p);  w_e = p_e · [1 / Σ_{S} p  if normalise]
    mixtral             normalise always                       (num_local_experts, num_experts_per_tok)
    olmoe, qwen2_moe,   normalise = config.norm_topk_prob      (num_experts)
    qwen3_moe
    granitemoe          softmax over the top-k logits, the same as normalise = True
    deepseek_v2         w = p_S · routed_scaling_factor, never normalised; topk_method
                        "group_limited_greedy" keeps the topk_group of n_group expert groups
                        with the largest max p first
    deepseek_v3         s = sigmoid(l); choose with s + e_score_correction_bias inside the
                        topk_group groups whose best two choice scores sum highest; w = s_S,
                        normalised if norm_topk_prob, times routed_scaling_factor

Capture reads that tuple at the bridge's router component (``blocks.L.mlp.gate``), so the
selected experts and weights are exactly what the layer used. (The TransformerLens hook point
``blocks.L.mlp.gate.hook_out`` carries the logits for every family here except GraniteMoE, where
transformer-lens 3.9 hooks the last tuple element, i.e. ``top_k_index`` under transformers 5.x;
``blocks.L.mlp.hook_router_scores`` never fires, because 5.x sparse blocks return a plain tensor.)

Masking (Monet) and re-routing: a forward hook on the Hugging Face router sets the removed
experts' logits to −∞ (sigmoid scores to 0 and their choice scores to −∞) *before* the top-k and
recomputes the weights with the family rule above, optionally with another k (the k-vs-loss
curve of a MoE model), so the remaining experts are renormalised exactly as the family
renormalises. A token left with fewer than k allowed experts keeps the ones it has (the extra
slots get weight 0). With nothing removed and the config's k the recomputation reproduces the
model's own routing (tested per family); every family's expert block accepts any number of slots.

A model with no MoE layer is not an error here: ``expert_source`` says whether to route
("router") or to MoEfy its dense MLPs ("moefied"), and refuses, naming the architecture, a model
that offers neither.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping, NamedTuple

import torch

from probes.neurons import NeuronSiteError, architecture_name, mlp_sites
from workbench.errors import WorkbenchError


class RoutingError(WorkbenchError):
    """A model, layer or expert that routing capture or masking cannot handle."""


@dataclass(frozen=True)
class RouterFamily:
    """How one Hugging Face MoE family routes; see the module docstring for the equations."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values of the family
    experts_fields: tuple[str, ...]  # config fields holding E (the first one present wins)
    scoring: Literal["softmax", "sigmoid"]
    normalise: bool | str  # fixed, or the config field that decides (norm_topk_prob)
    scale_field: str | None = None  # config field multiplying the kept weights
    grouping: Literal["max", "top2"] | None = None  # group-limited selection (DeepSeek)
    grouping_when: tuple[str, str] | None = None  # (config field, value) that turns grouping on
    choice_bias: str | None = None  # router buffer added to the scores for choosing only
    outputs: tuple[str, str, str] = ("logits", "weights", "indices")  # the router's return tuple


# The single source of supported families: CLI help, errors and tests read this mapping.
FAMILIES: dict[str, RouterFamily] = {
    f.name: f
    for f in (
        RouterFamily("mixtral", ("mixtral",), ("num_local_experts",), "softmax", True),
        RouterFamily("olmoe", ("olmoe",), ("num_experts",), "softmax", "norm_topk_prob"),
        RouterFamily("qwen2_moe", ("qwen2_moe",), ("num_experts",), "softmax", "norm_topk_prob"),
        RouterFamily("qwen3_moe", ("qwen3_moe",), ("num_experts", "num_local_experts"), "softmax", "norm_topk_prob"),
        RouterFamily("granitemoe", ("granitemoe",), ("num_local_experts",), "softmax", True),
        RouterFamily("deepseek_v2", ("deepseek_v2",), ("n_routed_experts",), "softmax", False,
                     scale_field="routed_scaling_factor", grouping="max",
                     grouping_when=("topk_method", "group_limited_greedy")),
        RouterFamily("deepseek_v3", ("deepseek_v3",), ("n_routed_experts",), "sigmoid", "norm_topk_prob",
                     scale_field="routed_scaling_factor", grouping="top2", choice_bias="e_score_correction_bias"),
    )
}


class RouterSpec(NamedTuple):
    """One model's routing rule, resolved from its config."""

    family: RouterFamily
    n_experts: int
    k: int
    normalise: bool
    scale: float
    n_group: int  # 1 = no group-limited selection
    topk_group: int


class Routing(NamedTuple):
    """Per token (n = batch·pos, row-major), the selected experts and their routing weights."""

    indices: torch.Tensor  # (n, k) int64, highest weight first
    weights: torch.Tensor  # (n, k) float32; 0 for a slot a masked token could not fill


class MoELayer(NamedTuple):
    layer: int
    router: torch.nn.Module  # the Hugging Face router module (masking hooks go here)
    gate: torch.nn.Module  # the bridge component wrapping it (capture hooks go here)


def _config(model):
    inner = getattr(model, "original_model", model)
    return getattr(inner, "config", None)


def moe_layers(model) -> list[MoELayer]:
    """The blocks whose MLP is a routed MoE (dense blocks of interleaved stacks are left out)."""
    from transformer_lens.model_bridge.generalized_components.moe import MoEBridge

    out = []
    for layer, block in enumerate(getattr(model, "blocks", None) or []):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, MoEBridge) or mlp.bound_dense:
            continue
        gate = getattr(mlp, "gate", None)
        router = getattr(gate, "original_component", None)
        if isinstance(router, torch.nn.Module):
            out.append(MoELayer(layer, router, gate))
    return out


def family_of(model) -> RouterFamily:
    """The routing family of a MoE model, from ``config.model_type``."""
    model_type = getattr(_config(model), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise RoutingError(
        f"{architecture_name(model)} (model_type {model_type!r}) has MoE layers but no routing rule here; "
        f"supported MoE families: {', '.join(FAMILIES)}"
    )


def router_spec(model) -> RouterSpec:
    """The family's routing rule with E, k, normalisation, scale and groups from the config."""
    family, config = family_of(model), _config(model)
    n_experts = next((getattr(config, f) for f in family.experts_fields if getattr(config, f, None)), None)
    k = getattr(config, "num_experts_per_tok", None)
    if not n_experts or not k:
        raise RoutingError(f"{architecture_name(model)}: config lacks {'/'.join(family.experts_fields)} or num_experts_per_tok")
    normalise = family.normalise if isinstance(family.normalise, bool) else bool(getattr(config, family.normalise, False))
    scale = float(getattr(config, family.scale_field, 1.0) or 1.0) if family.scale_field else 1.0
    grouped = family.grouping is not None and (
        family.grouping_when is None or getattr(config, family.grouping_when[0], None) == family.grouping_when[1]
    )
    n_group = int(getattr(config, "n_group", 1) or 1) if grouped else 1
    topk_group = int(getattr(config, "topk_group", n_group) or n_group) if grouped else 1
    return RouterSpec(family, int(n_experts), int(k), normalise, scale, n_group, topk_group)


def expert_source(model) -> Literal["router", "moefied"]:
    """"router" for a MoE model of a known family, "moefied" for a dense-MLP model; else one clear error."""
    if moe_layers(model):
        router_spec(model)  # an unknown family fails here, by name
        return "router"
    try:
        mlp_sites(model)
    except NeuronSiteError:
        raise RoutingError(
            f"{architecture_name(model)} has no MoE router layers (MoE families: {', '.join(FAMILIES)}) and no dense MLP "
            "to MoEfy (no blocks.L.mlp.out projection carrying per-neuron activations)"
        ) from None
    return "moefied"


def check_layers(model, layers: Iterable[int] | None) -> list[int]:
    """The MoE layers asked for (default: all), or an error listing the MoE layers."""
    available = [m.layer for m in moe_layers(model)]
    if not available:
        raise RoutingError(f"{architecture_name(model)} has no MoE layers")
    if layers is None:
        return available
    layers = sorted(set(int(x) for x in layers))
    bad = [x for x in layers if x not in available]
    if bad:
        raise RoutingError(f"layer {bad[0]} of {architecture_name(model)} has no router; MoE layers: {', '.join(map(str, available))}")
    return layers


# -- the routing rule ------------------------------------------------------------------------
def route_logits(spec: RouterSpec, logits: torch.Tensor, removed: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> Routing:
    """Apply the family's rule to router logits (n, E), with optional removed experts (E,) bool."""
    logits = logits.float()
    n, n_experts = logits.shape
    if n_experts != spec.n_experts:
        raise RoutingError(f"router logits have {n_experts} experts, the config says {spec.n_experts}")
    removed = torch.zeros(n_experts, dtype=torch.bool, device=logits.device) if removed is None else removed.to(logits.device)
    if bool(removed.all()):
        raise RoutingError("every expert is removed; nothing left to route to")
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if spec.family.scoring == "softmax":
        scores = torch.softmax(logits.masked_fill(removed, neg_inf), dim=-1)  # (n, E); removed -> 0
    else:
        scores = torch.sigmoid(logits).masked_fill(removed, 0.0)
    choice = scores if bias is None else scores + bias.float().to(logits.device)  # (n, E)
    if spec.n_group > 1:
        per = n_experts // spec.n_group
        grouped = choice.masked_fill(removed, 0.0).view(n, spec.n_group, per)  # a removed expert counts 0
        if spec.family.grouping == "max":
            group_score = grouped.max(dim=-1).values  # (n, G)
        else:
            group_score = grouped.topk(min(2, per), dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(spec.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(per, dim=1), float("-inf"))
    choice = choice.masked_fill(removed, float("-inf"))
    chosen = choice.topk(spec.k, dim=-1)  # (n, k)
    indices = chosen.indices
    allowed = chosen.values > float("-inf")  # a slot the rule cannot fill (removed or outside the kept groups)
    weights = scores.gather(1, indices).masked_fill(~allowed, 0.0)  # (n, k)
    if spec.normalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * spec.scale
    return _canonical(indices, weights)


def _canonical(indices: torch.Tensor, weights: torch.Tensor) -> Routing:
    """Sort each token's slots by weight, highest first (ties: lower expert id first)."""
    indices, weights = indices.long(), weights.float()
    order = torch.argsort(indices, dim=-1, stable=True)
    indices, weights = indices.gather(1, order), weights.gather(1, order)
    order = torch.argsort(-weights, dim=-1, stable=True)
    return Routing(indices.gather(1, order), weights.gather(1, order))


def _unpack(output, spec: RouterSpec) -> dict[str, torch.Tensor]:
    names = spec.family.outputs
    if not isinstance(output, tuple) or len(output) != len(names):
        raise RoutingError(f"{spec.family.name} router returned {type(output).__name__}, expected a tuple "
                           f"({', '.join(names)}); is this transformers version supported?")
    parts = dict(zip(names, output))
    logits, indices = parts["logits"], parts["indices"]
    if not logits.is_floating_point() or logits.shape[-1] != spec.n_experts or indices.is_floating_point():
        raise RoutingError(f"{spec.family.name} router outputs are not ({', '.join(names)}): got shapes "
                           f"{[tuple(t.shape) for t in output]}; is this transformers version supported?")
    return parts


# -- capture ---------------------------------------------------------------------------------
class RoutingRecorder:
    """Collects each layer's routing over every forward run inside ``recorded_routing``."""

    def __init__(self, spec: RouterSpec, layers: list[int]):
        self.spec = spec
        self.layers = layers
        self._parts: dict[int, list[Routing]] = {layer: [] for layer in layers}

    def add(self, layer: int, routing: Routing) -> None:
        self._parts[layer].append(Routing(routing.indices.cpu(), routing.weights.cpu()))

    def routing(self, layer: int) -> Routing:
        parts = self._parts[layer]
        if not parts:
            raise RoutingError(f"no forward pass reached the router of layer {layer}")
        return Routing(torch.cat([p.indices for p in parts]), torch.cat([p.weights for p in parts]))

    def scores(self, layer: int) -> torch.Tensor:
        """G (n, E): the routing weight of each selected expert, 0 elsewhere (probes.score_matrix' g_e(x))."""
        from probes.score_matrix import dense_scores

        r = self.routing(layer)
        return dense_scores(r.indices, r.weights, self.spec.n_experts)


@contextmanager
def recorded_routing(model, layers: Iterable[int] | None = None) -> Iterator[RoutingRecorder]:
    """Record the experts and weights each MoE layer actually used during the forwards inside."""
    spec = router_spec(model)
    layers = check_layers(model, layers)
    recorder = RoutingRecorder(spec, layers)
    by_layer = {m.layer: m for m in moe_layers(model)}
    handles = []

    def hook_for(layer: int):
        def hook(module, args, output):
            parts = _unpack(output, spec)
            recorder.add(layer, _canonical(parts["indices"], parts["weights"]))

        return hook

    try:
        for layer in layers:
            handles.append(by_layer[layer].gate.register_forward_hook(hook_for(layer)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


# -- masking ---------------------------------------------------------------------------------
@contextmanager
def rerouted(model, remove: Mapping[int, Iterable[int]] | None = None, k: int | None = None) -> Iterator[None]:
    """Route every MoE layer top-``k`` (default: the config's k) and remove experts per layer
    ({layer: experts}) for the forwards inside; always unhooks."""
    spec = router_spec(model)
    by_layer = {m.layer: m for m in moe_layers(model)}
    if k is not None and not 1 <= k <= spec.n_experts:
        raise RoutingError(f"k={k} is out of range for {spec.n_experts} experts; choose 1 ≤ k ≤ {spec.n_experts}")
    routed_spec = spec if k is None else spec._replace(k=int(k))
    masks = {layer: torch.zeros(spec.n_experts, dtype=torch.bool) for layer in (by_layer if k is not None else ())}
    for layer, experts in (remove or {}).items():
        experts = sorted({int(e) for e in experts})
        if layer not in by_layer:
            raise RoutingError(f"layer {layer} has no router; MoE layers: {', '.join(map(str, by_layer))}")
        if any(e < 0 or e >= spec.n_experts for e in experts):
            raise RoutingError(f"experts to remove must be in 0..{spec.n_experts - 1}; got {experts}")
        if len(experts) >= spec.n_experts:
            raise RoutingError(f"removing all {spec.n_experts} experts of layer {layer} leaves nothing to route to")
        if experts:
            masks.setdefault(layer, torch.zeros(spec.n_experts, dtype=torch.bool))[experts] = True

    def hook_for(router: torch.nn.Module, mask: torch.Tensor):
        def hook(module, args, output):
            parts = _unpack(output, spec)
            logits = parts["logits"]
            bias = getattr(router, spec.family.choice_bias, None) if spec.family.choice_bias else None
            routing = route_logits(routed_spec, logits, mask, bias)
            new = {
                "logits": logits.masked_fill(mask.to(logits.device), float("-inf")),
                "weights": routing.weights.to(parts["weights"].dtype),
                "indices": routing.indices.to(parts["indices"].dtype),
            }
            return tuple(new[name] for name in spec.family.outputs)

        return hook

    handles = []
    try:
        for layer, mask in masks.items():
            router = by_layer[layer].router
            handles.append(router.register_forward_hook(hook_for(router, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def masked_experts(model, remove: Mapping[int, Iterable[int]]):
    """Remove experts per layer ({layer: experts}) for the forwards inside (``rerouted`` at the config's k)."""
    return rerouted(model, remove)
