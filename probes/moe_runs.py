"""The job behind `workbench moe run`: an honest MoE view of a model, and its monosemanticity
next to SAE latents and raw MLP neurons on the same tokens.

Sources of "experts" (``kind``), scored per token as ``probes.experts`` expects (g ≥ 0, 0 when
not selected):

    moe      a Hugging Face MoE's own routers      g_e = routing weight of a selected expert
    moefied  a dense MLP split into E experts      g_e = ‖a_{N_e}‖ for the top-k experts, else 0
             (probes.moefy; partition fitted on the fit tokens)
    neuron   the same MLP's neurons                g_i = |a_i|
    sae      an SAE of the workspace               g_f = latent activation

Steps (domains balanced by sampling: ``probes.domains``):

1. fit pass over the fit tokens (stopping after the deepest layer needed): MLP activations,
   routing, SAE inputs. MoEfication partitions each chosen layer; each kind's **specialists**
   (Monet skew test, factor 2) per domain and per token concept, its skew ranking, and each
   unit's **concept correlation** ρ_e = Pearson(g_e(x), 1[x satisfies the concept]) are all
   taken on these tokens, not on the ones measured below.
2. evaluation pass over the eval tokens, dense: per-domain loss, and every kind's metrics by
   domain and by token concept (``ExpertSummary``: specialised share, entropy, purity, MI), all
   from the dense model's activations (the MoEfied scores are the top-k of those).
3. k vs loss: moefied, every chosen layer routed top-k at once for each k of the curve (k = E is
   the dense model), and the MoEfied model at the run's k is the "MoE" whose experts are
   measured and masked; moe, every MoE layer re-routed top-k by its family's rule (the
   config's k is the model itself).
4. masking selectivity per kind, grouping (targets and measured groups are domains, or token
   concepts) and budget: for each target, remove in every chosen layer either the kind's
   specialists of it (``skew``: as many as pass Monet's test, so kinds differ in how much they
   remove) or at most ⌈share·E⌉ units per layer, the most skewed towards it among those whose
   strongest group it is (``matched``: about the same share of every kind's units; fewer where
   fewer units peak on the target); moe: router logits −∞ before the top-k; moefied: expert
   scores −∞ before the top-k, so its neurons are zeroed; neuron: zero them; sae: subtract the
   latents' decoded contribution, keeping the SAE's error term. ΔLoss on every group against the
   kind's own baseline (moefied: the top-k model; the others: the dense model).
5. concept purge (Monet's toxicity purge, per token concept): for each τ, remove the units with
   ρ_e > τ and measure the loss where the concept holds against the loss on the rest (our
   "general loss": the tokens outside the concept, so the two never overlap); each distinct
   removal set runs one forward, shared with step 4.

Where a loss is credited (``TokenGroups.loss_labels``): the loss at position t predicts token
t+1. A domain's loss is on its target tokens (neighbours share a domain, so either side would
do); a concept's loss is at the positions whose *input* token satisfies it — the positions where
the units scored on that concept fire and where removing them acts directly — i.e. the loss of
predicting the token after a concept token.

BOS (position 0) is never routed or masked for the MoEfied, neuron and SAE kinds (its
activations are outliers); a MoE's router hook re-routes every position, BOS included, as the
model's own router would. Separators and BOS are left out of every metric. Everything is
validated before the model runs, and the results are written in one transaction at the end, so
bad input or an interruption leaves no rows.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple
from pathlib import Path

import numpy as np
import torch

from probes import domains as dom
from probes.experts import (
    OTHER,
    ExpertSummary,
    SelectivityMatrix,
    _check_concepts,
    concept_correlation,
    concept_masks,
    exclusive_labels,
    purge_curve,
    selectivity_matrix,
    summarise,
)
from probes.moefy import Partition, check_experts, check_k, expert_scores, moefy, topk_scores
from probes.neurons import MLPSite, architecture_name, mlp_sites
from probes.routing import RouterSpec, check_layers, expert_source, recorded_routing, rerouted, router_spec
from workbench.errors import WorkbenchError
from workbench.hooks import attached, layer_of, validate_hooks

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EXPERTS = 32
DEFAULT_K = 8
KINDS = ("moe", "moefied", "sae", "neuron")
KIND_LABELS = {"moe": "MoE experts (router)", "moefied": "MoEfied experts", "sae": "SAE latents", "neuron": "MLP neurons"}
GROUPINGS = ("domain", "concept")
BUDGETS = ("skew", "matched")  # which experts a masking removes: Monet's specialists, or the same share of every kind
DEFAULT_PURGE_TAUS = (0.5, 0.3, 0.2, 0.1)
SAE_ROWS = 4096  # tokens encoded at a time


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
    """token concepts (default: all of probes.experts.CONCEPTS)"""
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


# -- forward passes --------------------------------------------------------------------------
class _Capture:
    """Activations (n = rows·ctx, d) of some hooks over every forward inside ``attached(model, hooks)``."""

    def __init__(self, names):
        self.parts = {name: [] for name in names}

    def hooks(self):
        def keep(name):
            def fn(activation, hook):
                self.parts[name].append(activation.detach().reshape(-1, activation.shape[-1]).float().cpu())

            return fn

        return [(name, keep(name)) for name in self.parts]

    def __getitem__(self, name) -> torch.Tensor:
        return torch.cat(self.parts[name])


def _passthrough_bos(fn):
    """Apply ``fn`` to positions ≥ 1 of a (b, T, d) activation; BOS passes unchanged."""

    def hook(acts, hook=None):
        return torch.cat([acts[:, :1], fn(acts[:, 1:])], dim=1)

    return hook


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


def _run(model, tokens: torch.Tensor, hooks, batch_size: int, stop_at: int | None, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, leave=False):
        chunk = tokens[start : start + batch_size].to(model.cfg.device)
        with torch.inference_mode(), attached(model, hooks):
            model(chunk, stop_at_layer=stop_at)


def _sae_encode(sae, acts: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([sae.encode(acts[i : i + SAE_ROWS].float()).float() for i in range(0, acts.shape[0], SAE_ROWS)])


# -- token groups ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGroups:
    """The labels of one token set (rows, ctx): its domains, its exclusive token concepts, and
    each concept's own predicate (concepts overlap there). BOS and separators are −1 / False."""

    domain_names: tuple[str, ...]
    domain: torch.Tensor  # (rows, ctx) int64 into domain_names
    concept_names: tuple[str, ...]  # the concepts, then "other"
    concept: torch.Tensor  # (rows, ctx) int64 into concept_names: the first concept a token satisfies
    hits: dict[str, torch.Tensor]  # concept -> (rows, ctx) bool: the token satisfies it

    @classmethod
    def of(cls, ids: torch.Tensor, domain: torch.Tensor, domain_names, vocab: np.ndarray, concepts) -> "TokenGroups":
        masks = concept_masks(vocab[ids.reshape(-1).numpy()], concepts)
        exclusive, concept_names = exclusive_labels(masks)
        labelled = domain >= 0
        exclusive = torch.from_numpy(exclusive).reshape(ids.shape).masked_fill(~labelled, -1)
        hits = {name: torch.from_numpy(hit).reshape(ids.shape) & labelled for name, hit in masks.items()}
        return cls(tuple(domain_names), domain, concept_names, exclusive, hits)

    def labels(self, grouping: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        """Per-token labels (rows, ctx) of a grouping and its names: what units are scored against."""
        return (self.domain, self.domain_names) if grouping == "domain" else (self.concept, self.concept_names)

    def loss_labels(self, grouping: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        """Labels for ``probes.domains.group_losses`` (which credits the loss at t to label t+1): a
        domain's loss is on its target tokens; a concept's loss is at the positions whose *input*
        token satisfies it (where its units fire), i.e. on the token after it."""
        labels, names = self.labels(grouping)
        return (labels if grouping == "domain" else self._at_inputs(labels)), names

    def concept_split(self, concept: str) -> torch.Tensor:
        """``group_losses`` labels for a purge: 0 where the input token satisfies ``concept``, 1 elsewhere, −1 unlabelled."""
        return self._at_inputs(torch.where(self.domain < 0, -1, torch.where(self.hits[concept], 0, 1)))

    def _at_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """Shift labels (rows, ctx) one right, so that group_losses credits the loss at t to token t's
        label; unlabelled where token t or t+1 is BOS or a separator."""
        shifted = torch.cat([torch.full_like(labels[:, :1], -1), labels[:, :-1]], dim=1)
        return shifted.masked_fill(self.domain < 0, -1)


# -- the result ------------------------------------------------------------------------------
@dataclass
class Masking:
    """One kind's masking selectivity for one grouping and budget: the matrix and what was removed."""

    kind: str
    grouping: str  # "domain" | "concept": what the targets and the measured groups are
    budget: str  # "skew": the Monet specialists; "matched": the same share of every kind's units
    matrix: SelectivityMatrix
    n_masked: dict[str, int]  # target -> experts removed (over all layers)
    before: dict[str, float]
    after: dict[str, dict[str, float]]


class PurgePoint(NamedTuple):
    tau: float
    n_removed: int  # experts with ρ > τ, over all layers
    share_removed: float  # n_removed / the kind's units
    concept_loss: float  # next-token loss at positions whose input token satisfies the concept
    other_loss: float  # ... at the other labelled positions


@dataclass
class Purge:
    """Monet's purge for one kind and concept: remove the experts with ρ > τ, for each τ."""

    kind: str
    concept: str
    concept_before: float
    other_before: float
    points: list[PurgePoint]


@dataclass
class MoeResult:
    model: str
    plan: Plan
    corpus: str
    tokens: dom.DomainTokens
    summaries: list[tuple[str, ExpertSummary]]  # (grouping, summary) on the eval tokens
    dense: dict[str, float]  # domain -> dense loss, plus "all"
    curve: list[tuple[int, str, float]]  # (k, domain or "all", loss)
    masking: list[Masking]
    routes: list[tuple[int, torch.Tensor, torch.Tensor]]  # (layer, experts (n, k), weights (n, k)) per eval token
    notices: list[str]
    correlations: list[tuple[str, int, str, np.ndarray]] = field(default_factory=list)  # (kind, layer, concept, ρ (E,)) on fit tokens
    purges: list[Purge] = field(default_factory=list)
    seconds: float = 0.0

    def config(self, request: MoeRequest) -> dict:
        out = {key: value for key, value in asdict(request).items() if key != "device"}
        out.update(layers=self.plan.layers, n_experts=self.plan.n_experts, k=self.plan.k, ks=self.plan.ks,
                   corpus=self.corpus, model=self.model, kinds=self.plan.kinds, mask=self.plan.mask)
        return out

    def comparison(self) -> list[dict]:
        return [dict(summary.layer_row(), grouping=grouping) for grouping, summary in self.summaries]


def measure(loaded, plan: Plan, tokens: dom.DomainTokens, request: MoeRequest, *, corpus: str = "",
            progress: bool = False) -> MoeResult:
    """Steps 1–5 of the module docstring on a loaded model (``corpus``: the spec the tokens came from); nothing is stored."""
    import saes
    from data.vocab import token_strings

    model = loaded.model
    names = tokens.names
    sae = None
    if plan.sae is not None:
        sae = saes.load_sae(plan.sae.path, expected_d_in=plan.sae.d_in)
        sae.eval()
    mlp_hooks = {L: plan.sites[L].hook for L in plan.layers} if plan.source == "moefied" else {}
    capture_names = list(mlp_hooks.values()) + ([plan.sae.hook] if sae is not None else [])
    deepest = max(plan.layers + ([plan.sae_layer] if plan.sae_layer is not None else []))
    stop_at = deepest + 1 if deepest + 1 < model.cfg.n_layers and (sae is None or plan.sae_layer is not None) else None
    vocab = np.asarray(token_strings(loaded.tokenizer), dtype=object)
    fit_groups = TokenGroups.of(tokens.fit_tokens, tokens.fit_labels, names, vocab, request.concepts)
    eval_groups = TokenGroups.of(tokens.eval_tokens, tokens.eval_labels, names, vocab, request.concepts)
    concepts = list(fit_groups.hits)  # the concepts asked for, in CONCEPTS order

    def routing():  # records the routers' choices (MoE model) or nothing
        return recorded_routing(model, plan.layers) if plan.source == "router" else nullcontext()

    # 1. fit pass: partitions, specialists, concept correlations
    fit = _Capture(capture_names)
    with routing() as fit_rec:
        _run(model, tokens.fit_tokens, fit.hooks(), request.batch_size, stop_at, "fit pass", progress)
    fit_labelled = tokens.fit_labels.reshape(-1) >= 0
    partitions: dict[int, Partition] = {}
    for L, hook in mlp_hooks.items():
        partitions[L] = moefy(fit[hook][fit_labelled], plan.n_experts, seed=request.seed)

    def scores_of(kind: str, layer: int, capture: _Capture, recorder) -> torch.Tensor:
        if kind == "moe":
            return recorder.scores(layer)
        if kind == "sae":
            return _sae_encode(sae, capture[plan.sae.hook])
        acts = capture[mlp_hooks[layer]]
        if kind == "neuron":
            return acts.abs()
        scores = expert_scores(acts, partitions[layer])
        return topk_scores(scores, scores.topk(plan.k, dim=-1).indices)

    def units() -> list[tuple[str, int]]:
        out = [(kind, L) for kind in plan.kinds if kind != "sae" for L in plan.layers]
        if sae is not None:
            out.append(("sae", plan.sae_layer if plan.sae_layer is not None else -1))
        return out

    specialists: dict[tuple[str, int, str], ExpertSummary] = {}
    correlations: list[tuple[str, int, str, np.ndarray]] = []
    for kind, L in units():
        scores = scores_of(kind, L, fit, fit_rec)
        for grouping in GROUPINGS:
            labels, group_names = fit_groups.labels(grouping)
            specialists[(kind, L, grouping)] = summarise(scores, labels.reshape(-1), group_names, factor=request.factor,
                                                         balanced_purity=True, layer=L, kind=kind)
        for concept in concepts:
            rho = concept_correlation(scores[fit_labelled], fit_groups.hits[concept].reshape(-1)[fit_labelled].float())
            correlations.append((kind, L, concept, rho))
    del fit, fit_rec

    def by_domain(losses: torch.Tensor) -> dict[str, float]:
        out = dom.group_losses(losses, tokens.eval_labels, names)
        out["all"] = dom.mean_loss(losses, tokens.eval_labels)
        return out

    # 2. evaluation pass, dense
    capture = _Capture(capture_names)
    with routing() as recorder:
        dense_losses = dom.token_losses(model, tokens.eval_tokens, hooks=capture.hooks(), batch_size=request.batch_size,
                                        desc="dense eval", progress=progress)
    dense = by_domain(dense_losses)
    summaries: list[tuple[str, ExpertSummary]] = []
    notices = list(plan.notices) + list(tokens.notices)
    for kind, L in units():
        scores = scores_of(kind, L, capture, recorder)
        for grouping in GROUPINGS:
            labels, group_names = eval_groups.labels(grouping)
            summary = summarise(scores, labels.reshape(-1), group_names, factor=request.factor, balanced_purity=True,
                                layer=L, kind=kind)
            summaries.append((grouping, summary))
            if summary.notice:
                notices.append(f"{KIND_LABELS[kind]} layer {L} by {grouping}: {summary.notice}")
    routes = []
    if plan.source == "router":
        for L in plan.layers:
            r = recorder.routing(L)
            routes.append((L, r.indices, r.weights))
    else:
        for L in plan.layers:
            scores = expert_scores(capture[mlp_hooks[L]], partitions[L])
            top = scores.topk(plan.k, dim=-1)
            routes.append((L, top.indices, top.values))
    del capture

    def losses_with(hooks, desc: str, context=None) -> torch.Tensor:
        with context or nullcontext():
            return dom.token_losses(model, tokens.eval_tokens, hooks=hooks, batch_size=request.batch_size, desc=desc,
                                    progress=progress)

    def moefied_hooks(k: int, remove: dict[int, np.ndarray] | None = None):
        remove = remove or {}
        return [(mlp_hooks[L], _passthrough_bos(lambda a, L=L: routed(a, partitions[L], k, remove.get(L, ()))))
                for L in plan.layers]

    # 3. k vs loss: the MoEfied model at each k, or the MoE re-routed top-k (its own k is the "dense" reference)
    curve: list[tuple[int, str, float]] = []
    baseline = {kind: dense_losses for kind in plan.kinds}
    reference_k = plan.n_experts if plan.source == "moefied" else plan.k
    for k in plan.ks:
        if k == reference_k:
            losses = dense_losses
        elif plan.source == "moefied":
            losses = losses_with(moefied_hooks(k), f"top-{k} of {plan.n_experts}")
        else:
            losses = losses_with([], f"re-routed top-{k} of {plan.n_experts}", rerouted(model, k=k))
        curve.extend((k, group, loss) for group, loss in by_domain(losses).items())
        if plan.source == "moefied" and k == plan.k:
            baseline["moefied"] = losses  # the MoEfied model whose experts are masked

    # 4 and 5 share the ablated forwards: each removal set runs once per kind
    memo: dict[tuple, torch.Tensor] = {}

    def ablated(kind: str, remove: dict[int, np.ndarray], desc: str) -> torch.Tensor:
        remove = {L: np.asarray(v, dtype=np.int64) for L, v in remove.items() if len(v)}
        key = (kind, tuple(sorted((L, tuple(sorted(v.tolist()))) for L, v in remove.items())))
        if not remove:
            return baseline[kind]
        if key not in memo:
            if kind == "moe":
                memo[key] = losses_with([], desc, rerouted(model, {L: v.tolist() for L, v in remove.items()}))
            elif kind == "moefied":
                memo[key] = losses_with(moefied_hooks(plan.k, remove), desc)
            elif kind == "neuron":
                memo[key] = losses_with([(mlp_hooks[L], _passthrough_bos(lambda a, v=v: a.index_fill(-1, torch.as_tensor(v, device=a.device), 0.0)))
                                         for L, v in remove.items()], desc)
            else:
                latents = next(iter(remove.values()))

                def ablate(a, latents=latents):
                    idx = torch.as_tensor(latents, device=a.device)
                    flat = a.reshape(-1, a.shape[-1])
                    z = sae.encode(flat.float())
                    kept = z.index_fill(-1, idx, 0.0)
                    return (flat - (sae.decode(z) - sae.decode(kept)).to(flat.dtype)).reshape(a.shape)

                memo[key] = losses_with([(plan.sae.hook, _passthrough_bos(ablate))], desc)
        return memo[key]

    # 4. masking selectivity per kind, grouping and budget; 5. concept purge
    layers_of = {kind: [L for (knd, L) in units() if knd == kind] for kind in plan.mask}
    masking = masking_matrices(layers_of, specialists, baseline, eval_groups, ablated, request, notices)
    purges = concept_purges(layers_of, correlations, baseline, eval_groups, ablated, request, notices)

    return MoeResult(loaded.name, plan, corpus, tokens, summaries, dense, curve, masking, routes, notices,
                     correlations, purges)


Ablate = Callable[[str, dict, str], torch.Tensor]  # (kind, {layer: units}, description) -> token losses (rows, ctx − 1)


def masking_matrices(layers_of: dict[str, list[int]], specialists: dict[tuple[str, int, str], ExpertSummary],
                     baseline: dict[str, torch.Tensor], groups: TokenGroups, ablated: Ablate, request: MoeRequest,
                     notices: list[str]) -> list[Masking]:
    """Step 4: for each kind, grouping and budget, remove each target's units (chosen on the fit
    tokens: ``specialists``) in every layer of the kind, and the ΔLoss matrix against the baseline;
    skips are added to ``notices``."""
    out: list[Masking] = []
    for kind, unit_layers in layers_of.items():
        for grouping in GROUPINGS:
            labels, group_names = groups.loss_labels(grouping)
            before = dom.group_losses(baseline[kind], labels, group_names)
            fitted = {L: specialists[(kind, L, grouping)] for L in unit_layers}
            targets = [g for g in group_names if g in before and g != OTHER and all(g in s.names for s in fitted.values())]
            for budget in request.budgets:
                after: dict[str, dict[str, float]] = {}
                n_masked: dict[str, int] = {}
                for target in targets:
                    if budget == "skew":
                        remove = {L: s.specialised_in(target) for L, s in fitted.items()}
                    else:
                        remove = {L: s.most_specialised_in(target, math.ceil(request.matched_share * s.n_experts))
                                  for L, s in fitted.items()}
                    if kind == "moe" and any(len(v) >= fitted[L].n_experts for L, v in remove.items()):
                        notices.append(f"mask moe of {target} ({budget}): skipped, it would remove every expert of a layer")
                        continue
                    n_masked[target] = int(sum(len(v) for v in remove.values()))
                    losses = ablated(kind, remove, f"mask {kind} of {target} ({budget})")
                    after[target] = dom.group_losses(losses, labels, group_names)
                matrix = selectivity_matrix(before, after)
                vacuous = np.array([n_masked[t] == 0 for t in matrix.targets], dtype=bool)
                matrix = matrix._replace(selectivity=np.where(vacuous, np.nan, matrix.selectivity))  # nothing removed: no selectivity
                out.append(Masking(kind, grouping, budget, matrix, n_masked, before, after))
    return out


def concept_purges(layers_of: dict[str, list[int]], correlations: list[tuple[str, int, str, np.ndarray]],
                   baseline: dict[str, torch.Tensor], groups: TokenGroups, ablated: Ablate, request: MoeRequest,
                   notices: list[str]) -> list[Purge]:
    """Step 5: for each kind and concept, remove the units with ρ > τ (fit tokens) for each τ and
    measure the loss on the concept's target tokens and on the rest; skips are added to ``notices``."""
    rho_of = {(kind, L, concept): rho for kind, L, concept, rho in correlations}
    concepts = list(dict.fromkeys(concept for _, _, concept, _ in correlations))
    out: list[Purge] = []
    for kind, unit_layers in layers_of.items():
        for concept in concepts:
            split = groups.concept_split(concept)
            pair = (concept, "rest")
            before = dom.group_losses(baseline[kind], split, pair)
            if concept not in before or "rest" not in before:
                notices.append(f"purge {kind} by {concept}: skipped, no evaluation tokens "
                               f"{'with' if concept not in before else 'without'} it")
                continue
            curves = {L: purge_curve(rho_of[(kind, L, concept)]) for L in unit_layers}
            total = sum(c.n_experts for c in curves.values())
            points = []
            for tau in sorted(request.purge_taus, reverse=True):
                remove = {L: c.at(tau) for L, c in curves.items()}
                if kind == "moe" and any(len(v) >= curves[L].n_experts for L, v in remove.items()):
                    notices.append(f"purge moe by {concept} at τ={tau}: skipped, it would remove every expert of a layer")
                    continue
                after = dom.group_losses(ablated(kind, remove, f"purge {kind} by {concept} at τ={tau}"), split, pair)
                n = int(sum(len(v) for v in remove.values()))
                points.append(PurgePoint(float(tau), n, n / total, after[concept], after["rest"]))
            out.append(Purge(kind, concept, before[concept], before["rest"], points))
    return out


# -- the whole job ---------------------------------------------------------------------------
def _reader(db: Path):
    """The workspace for reading (an older schema is migrated by opening it for writing); None if absent."""
    from workbench.workspace import Workspace, WorkspaceBusy, WorkspaceError

    if not db.exists():
        return None
    try:
        return Workspace(db, read_only=True)
    except WorkspaceBusy:
        raise
    except WorkspaceError:
        return Workspace(db)  # migrates an older schema (no rows written), or raises its own error


def workspace_defaults(ws, sae_ref: str | None):
    """(SAE record or None, the model and corpus the workspace was cached with, or None)."""
    from workbench.workspace import resolve_sae
    from workbench.workspace import fetch_one

    if ws is None:
        if sae_ref is not None:
            raise MoeRunError(f"--sae {sae_ref} needs an existing workspace with that SAE")
        return None, None, None
    record = resolve_sae(ws, sae_ref) if sae_ref is not None else None
    where = ("WHERE r.run_id = ?", [record.run_id]) if record is not None else ("WHERE r.kind = 'cache'", [])
    row = fetch_one(ws.con, f"SELECT r.model, c.spec FROM runs r JOIN corpora c USING (corpus_id) {where[0]} "
                            "ORDER BY r.run_id LIMIT 1", where[1])
    if row is None:
        return record, None, None
    return record, row[0], row[1].split("#")[0]


def run_moe(db: Path, request: MoeRequest, *, loaded=None, progress: bool = True) -> tuple[int, MoeResult]:
    """Validate, measure and store one run; returns (moe_run_id, result)."""
    from probes import moe_records
    from workbench.models import load_model
    from workbench.workspace import Workspace, ensure_writable

    started = time.time()
    db = Path(db)
    if not db.expanduser().resolve().parent.is_dir():
        raise MoeRunError(f"workspace directory does not exist: {db.parent} (create it first or choose another --db)")
    ensure_writable(db)
    ws = _reader(db)
    try:
        record, ws_model, ws_corpus = workspace_defaults(ws, request.sae)
    finally:
        if ws is not None:
            ws.close()
    model_name = request.model or (loaded.name if loaded is not None else None) or ws_model or DEFAULT_MODEL
    if record is not None and ws_model is not None and model_name != ws_model:
        raise MoeRunError(f"SAE '{record.name}' was trained on {ws_model}'s activations; use --model {ws_model}")
    corpus = request.corpus or ws_corpus or "stdlib"
    loaded = loaded or load_model(model_name, device=request.device)
    plan = plan_run(loaded.model, request, record)
    tokens = dom.domain_tokens(loaded.tokenizer, corpus, eval_tokens=request.eval_tokens, fit_tokens=request.fit_tokens,
                               ctx=request.ctx, seed=request.seed)
    result = measure(loaded, plan, tokens, request, corpus=corpus, progress=progress)
    result.model = model_name
    result.seconds = time.time() - started
    with Workspace(db) as ws:
        run_id = moe_records.save_run(ws, result, request)
    return run_id, result


# -- text ------------------------------------------------------------------------------------
def _f(x, digits=3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def describe(run: dict, comparison: list[dict], curve: list[dict], selectivity: list[dict], purge: list[dict] = ()) -> str:
    """The comparison table, the k curve, the masking matrices and the purge curves of one stored run, as text."""
    lines = [f"moe run {run['moe_run_id']}: {run['model']} ({run['architecture']}, {run['source']}), layers "
             f"{', '.join(map(str, run['layers']))}, E={run['n_experts']}, k={run['k']}"
             + (f", SAE {run['sae']}" if run["sae"] else "") + f"; corpus {run['corpus']}, "
             f"{run['eval_tokens']:,} eval tokens over {', '.join(run['domains'])}",
             f"  {run['balance']}"]
    lines += [f"  note: {n}" for n in run["notices"]]
    if curve:
        reference = "dense" if run["source"] == "moefied" else f"own top-{run['k']}"
        dense = next(c["dense_loss"] for c in curve if c["grp"] == "all")
        parts = [f"k={c['k']}: {c['loss']:.3f} ({c['loss'] - dense:+.3f})" for c in curve if c["grp"] == "all"]
        lines.append(f"k vs loss (all domains; {reference} {dense:.3f}): " + ", ".join(parts))
    lines.append("comparison (means over live experts; purity with per-group-normalised mass):")
    head = f"  {'kind':<8} {'layer':>5} {'grouping':<8} {'experts':>7} {'dead':>5} {'specialised':>11} {'entropy':>7} {'purity':>6} {'MI nats':>7} {'MI norm':>7}"
    lines.append(head)
    for row in comparison:
        lines.append(f"  {row['kind']:<8} {row['layer']:>5} {row['grouping']:<8} {row['experts']:>7} {row['dead']:>5} "
                     f"{_f(row['specialised_share']):>11} {_f(row['mean_entropy']):>7} {_f(row['mean_purity']):>6} "
                     f"{_f(row['mi_nats'], 4):>7} {_f(row['mi_norm'], 4):>7}")
    for kind, grouping, budget in dict.fromkeys((r["kind"], r["grouping"], r["budget"]) for r in selectivity):
        rows = [r for r in selectivity if (r["kind"], r["grouping"], r["budget"]) == (kind, grouping, budget)]
        measured = list(dict.fromkeys(r["measured"] for r in rows))
        targets = list(dict.fromkeys(r["target"] for r in rows))
        width = max(len(m) for m in measured + ["target"]) + 1
        removed = "Monet's specialists" if budget == "skew" else "⌈share·units⌉ per layer, most skewed first"
        lines.append(f"masking selectivity, {KIND_LABELS.get(kind, kind)} by {grouping}, {budget} budget "
                     f"(ΔLoss; row: {removed} of the target removed):")
        lines.append(f"  {'target':<{width}} {'removed':>7} " + " ".join(f"{m:>{width}}" for m in measured) + f" {'selectivity':>11}")
        for target in targets:
            cells = {r["measured"]: r for r in rows if r["target"] == target}
            first = cells[measured[0]]
            lines.append(f"  {target:<{width}} {first['n_masked']:>7} "
                         + " ".join(f"{cells[m]['delta_loss']:>+{width}.3f}" for m in measured)
                         + f" {_f(first['selectivity']):>11}")
    for kind in dict.fromkeys(r["kind"] for r in purge):
        lines.append(f"concept purge, {KIND_LABELS.get(kind, kind)} (remove units with ρ > τ; Δ loss on the concept's "
                     "tokens / on the rest):")
        for concept in dict.fromkeys(r["concept"] for r in purge if r["kind"] == kind):
            points = [r for r in purge if (r["kind"], r["concept"]) == (kind, concept)]
            parts = [f"τ={r['tau']:g}: {r['n_removed']} ({100 * r['share_removed']:.1f} %) "
                     f"{r['concept_loss'] - r['concept_before']:+.3f} / {r['other_loss'] - r['other_before']:+.3f}"
                     for r in points]
            lines.append(f"  {concept:<14} " + "; ".join(parts))
    return "\n".join(lines)
