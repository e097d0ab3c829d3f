"""The request of `workbench moe run` and its plan: what to measure, checked before anything runs.

``MoeRequest`` is the user's request, validated on construction (nothing loaded yet);
``plan_run`` resolves it against the loaded model and the workspace's SAE: where the experts
come from (the model's own routers, or a MoEfied dense MLP), the layers, E, k, the k curve and
the unit kinds compared (see ``probes.moe_kinds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from probes.concepts import _check_concepts
from probes.moefy import check_experts, check_k
from probes.neurons import MLPSite, architecture_name, mlp_sites
from probes.routing import RouterSpec, check_layers, expert_source, router_spec
from probes.unit_kinds import KINDS
from workbench.errors import WorkbenchError
from workbench.hooks import layer_of, validate_hooks

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EXPERTS = 32
DEFAULT_K = 8
GROUPINGS = ("domain", "concept")
BUDGETS = ("skew", "matched")  # which experts a masking removes: Monet's specialists, or the same share of every kind
DEFAULT_PURGE_TAUS = (0.5, 0.3, 0.2, 0.1)


class MoeRunError(WorkbenchError):
    """Bad `workbench moe run` request."""


@dataclass(frozen=True)
class MoeRequest:
    """What one `workbench moe run` measures; checked in ``__post_init__`` (nothing loaded yet)."""

    model: str | None = None
    """model alias, local HF directory or hub id (default: the workspace SAE's model, else smollm2-135m)"""
    layers: tuple[int, ...] = ()
    """layers to study (default: the SAE's layer, else the middle layer; all MoE layers for a MoE model)"""
    n_experts: int | None = None
    """MoEfication: experts per MLP layer, must divide d_mlp (default 32; a MoE model's own E otherwise)"""
    k: int | None = None
    """MoEfication: experts kept per token (default 8; a MoE model's num_experts_per_tok otherwise)"""
    ks: tuple[int, ...] = ()
    """k values of the k-vs-loss curve (default: powers of two below E, plus k)"""
    sae: str | None = None
    """SAE name or id in the workspace whose latents join the comparison"""
    corpus: str | None = None
    """corpus spec (default: the workspace's corpus, else stdlib)"""
    eval_tokens: int = 512
    """evaluation tokens per domain"""
    fit_tokens: int = 1024
    """tokens per domain for the MoEfication partition and for choosing specialists"""
    ctx: int = 128
    """context length, BOS included"""
    batch_size: int = 24
    """contexts per forward (the default evaluation set, 4 domains × 5 contexts, is one batch)"""
    seed: int = 0
    """corpus shuffle and k-means seed"""
    factor: float = 2.0
    """Monet skew factor: specialised when mass ≥ factor × the runner-up domain's"""
    mask: tuple[str, ...] = KINDS
    """kinds whose specialists are masked (selectivity matrices) and purged (concept purge curves)"""
    budgets: tuple[str, ...] = BUDGETS
    """masking budgets: skew (Monet's specialists, as many as pass the test) and/or matched (the same share of every kind)"""
    matched_share: float = 1 / 16
    """matched budget: the share of each kind's units removed per target (the most skewed towards it)"""
    purge_taus: tuple[float, ...] = DEFAULT_PURGE_TAUS
    """concept purge thresholds: remove the experts whose correlation ρ with the concept exceeds τ"""
    concepts: tuple[str, ...] | None = None
    """token concepts (default: all of probes.concepts.CONCEPTS)"""
    device: str | None = None

    def __post_init__(self):
        if self.n_experts is not None and self.n_experts < 1:
            raise MoeRunError(f"--experts must be at least 1, got {self.n_experts}")
        if self.k is not None and self.k < 1:
            raise MoeRunError(f"--k must be at least 1, got {self.k}")
        if self.k is not None and self.n_experts is not None:
            check_k(self.k, self.n_experts)
        for k in self.ks:
            if k < 1 or (self.n_experts is not None and k > self.n_experts):
                top = self.n_experts if self.n_experts is not None else "E"
                raise MoeRunError(f"curve k={k} is out of range; choose 1 ≤ k ≤ {top}")
        if self.eval_tokens <= 0 or self.fit_tokens <= 0 or self.ctx < 2 or self.batch_size <= 0:
            raise MoeRunError(f"need --tokens > 0, --fit-tokens > 0, --ctx ≥ 2 and --batch > 0 "
                              f"(got {self.eval_tokens}, {self.fit_tokens}, {self.ctx}, {self.batch_size})")
        if not self.factor > 1:
            raise MoeRunError(f"--factor must be > 1 (Monet uses 2), got {self.factor}")
        unknown = [m for m in self.mask if m not in KINDS]
        if unknown:
            raise MoeRunError(f"unknown kind to mask {unknown[0]!r}; valid: {', '.join(KINDS)}")
        unknown = [b for b in self.budgets if b not in BUDGETS]
        if unknown or not self.budgets:
            raise MoeRunError(f"unknown masking budget {unknown[0] if unknown else 'none'!r}; valid: {', '.join(BUDGETS)}")
        if not 0 < self.matched_share < 1:
            raise MoeRunError(f"--matched-share must be in (0, 1), got {self.matched_share}")
        bad_tau = [t for t in self.purge_taus if not -1 <= t < 1]
        if bad_tau:
            raise MoeRunError(f"--purge-tau {bad_tau[0]} is out of range; a correlation threshold is in [-1, 1)")
        if any(layer < 0 for layer in self.layers):
            raise MoeRunError(f"layers are block indices ≥ 0, got {min(self.layers)}")
        _check_concepts(self.concepts)


@dataclass
class Plan:
    """The request resolved against the model (and the workspace's SAE)."""

    source: str  # "router" | "moefied"
    architecture: str
    layers: list[int]
    n_experts: int
    k: int
    ks: list[int]
    kinds: list[str]
    mask: list[str]
    sae: object | None = None  # workbench.workspace.SAERecord
    sae_layer: int | None = None
    spec: RouterSpec | None = None
    sites: dict[int, MLPSite] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


def plan_run(model, request: MoeRequest, sae_record=None) -> Plan:
    """Check the request against the model: source, layers, E, k, the SAE's hook."""
    source = expert_source(model)  # a model with neither routers nor a dense MLP fails here
    arch = architecture_name(model)
    n_layers = int(model.cfg.n_layers)
    notices: list[str] = []
    sae_layer = None
    if sae_record is not None:
        validate_hooks(model, [sae_record.hook])
        sae_layer = layer_of(sae_record.hook)
    for layer in request.layers:
        if layer >= n_layers:
            raise MoeRunError(f"layer {layer} is out of range: {arch} has layers 0..{n_layers - 1}")
    if source == "router":
        spec = router_spec(model)
        layers = check_layers(model, request.layers or None)
        for given, own, what in ((request.n_experts, spec.n_experts, "--experts"), (request.k, spec.k, "--k")):
            if given is not None and given != own:
                raise MoeRunError(f"{what} {given} does not match {arch}'s routing (E={spec.n_experts}, k={spec.k}); "
                                  f"leave {what} out for a MoE model")
        for curve_k in request.ks:
            if not 1 <= curve_k <= spec.n_experts:
                raise MoeRunError(f"curve k={curve_k} is out of range; choose 1 ≤ k ≤ {spec.n_experts}")
        kinds = ["moe"] + (["sae"] if sae_record is not None else [])
        plan = Plan(source, arch, layers, spec.n_experts, spec.k, _curve_ks(request.ks, spec.n_experts, spec.k, upto=True),
                    kinds, [], spec=spec)
        notices.append(f"{arch} is a {spec.family.name} MoE: E={spec.n_experts}, top-{spec.k}, "
                       f"{'normalised' if spec.normalise else 'unnormalised'} weights; the k curve re-routes every MoE "
                       f"layer top-k by the same rule (k={spec.k} is the model itself)")
    else:
        sites = {s.layer: s for s in mlp_sites(model)}
        d_mlp = int(next(iter(sites.values())).w_out.shape[1])
        n_experts = request.n_experts or DEFAULT_EXPERTS
        check_experts(d_mlp, n_experts)
        k = request.k or min(DEFAULT_K, n_experts)
        check_k(k, n_experts)
        for curve_k in request.ks:
            check_k(curve_k, n_experts)
        layers = sorted(set(request.layers)) or ([sae_layer] if sae_layer is not None else [n_layers // 2])
        kinds = ["moefied", "neuron"] + (["sae"] if sae_record is not None else [])
        plan = Plan(source, arch, layers, n_experts, k, _curve_ks(request.ks, n_experts, k, upto=False), kinds, [],
                    sites={L: sites[L] for L in layers})
        notices.append(f"MoEfied {arch}: layer(s) {', '.join(map(str, layers))} split into E={n_experts} experts of "
                       f"{d_mlp // n_experts} neurons, top-{k} routing")
    if sae_record is not None:
        if sae_layer is None:
            notices.append(f"SAE '{sae_record.name}' reads {sae_record.hook}, outside the blocks; compared with layer(s) "
                           f"{', '.join(map(str, plan.layers))}")
        else:
            nearest = min(plan.layers, key=lambda L: (abs(L - sae_layer), L))
            how = ("the same layer" if nearest == sae_layer else f"the nearest chosen layer, {abs(nearest - sae_layer)} away")
            notices.append(f"SAE '{sae_record.name}' reads {sae_record.hook}; its latents are compared with the MLP of "
                           f"layer {nearest} ({how})")
    plan.sae, plan.sae_layer = sae_record, sae_layer
    plan.mask = [m for m in request.mask if m in plan.kinds]
    plan.notices = notices
    return plan


def _curve_ks(asked: tuple[int, ...], n_experts: int, k: int, *, upto: bool) -> list[int]:
    """The curve's k values: the ones asked for, else the powers of two below E (``upto``: up to E), plus k."""
    if asked:
        return sorted(set(asked) | {k})
    powers = {2**i for i in range(int(math.log2(n_experts)) + 1)}
    return sorted({p for p in powers if p < n_experts or (upto and p == n_experts)} | {k})
