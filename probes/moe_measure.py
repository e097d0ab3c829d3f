"""The measurement of a `workbench moe run` on a loaded model: an honest MoE view of it, and its
monosemanticity next to SAE latents and raw MLP neurons on the same tokens. Nothing is stored.

The unit kinds (moe, moefied, neuron, sae), their scores and their removal are the adapters of
``probes.moe_kinds``; this module only goes through ``UNIT_KINDS`` and ``EXPERT_SOURCES``.

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
4. masking selectivity and 5. concept purge: ``probes.moe_masking``, against each kind's own
   baseline (moefied: the top-k model; the others: the dense model). Each distinct removal set
   runs one forward, shared by steps 4 and 5.

Where a loss is credited: ``probes.moe_groups.TokenGroups.loss_labels``. BOS (position 0) is
never routed or masked for the MoEfied, neuron and SAE kinds (its activations are outliers); a
MoE's router hook re-routes every position, BOS included, as the model's own router would.
Separators and BOS are left out of every metric.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from probes import domains as dom
from probes.concept_purge import concept_correlation
from probes.expert_summary import ExpertSummary, summarise
from probes.moe_capture import Intervention, Pass, run_forward
from probes.moe_groups import TokenGroups
from probes.moe_kinds import EXPERT_SOURCES, UNIT_KINDS, Units
from probes.moe_masking import concept_purges, masking_matrices
from probes.moe_request import GROUPINGS, MoeRequest, Plan
from probes.moe_results import MoeResult
from probes.unit_kinds import KIND_LABELS
from workbench.hooks import Capture


def measure(loaded, plan: Plan, tokens: dom.DomainTokens, request: MoeRequest, *, corpus: str = "",
            progress: bool = False) -> MoeResult:
    """Steps 1–5 of the module docstring on a loaded model (``corpus``: the spec the tokens came from); nothing is stored."""
    import saes
    from workbench.data.vocab import token_strings

    model = loaded.model
    names = tokens.names
    sae = None
    if plan.sae is not None:
        # on the activations' device: the removal hook ablates the model's own activations
        sae = saes.load_sae(plan.sae.path, expected_d_in=plan.sae.d_in).to(next(model.parameters()).device)
        sae.eval()
    units = Units(model, plan, sae)
    source = EXPERT_SOURCES[plan.source]
    kinds = {kind: UNIT_KINDS[kind] for kind in plan.kinds}
    unit_layers = [(kind, L) for kind, adapter in kinds.items() for L in adapter.layers(plan)]
    capture_names = list(dict.fromkeys(name for adapter in kinds.values() for name in adapter.captures(plan)))
    deepest = max(plan.layers + ([plan.sae_layer] if plan.sae_layer is not None else []))
    stop_at = deepest + 1 if deepest + 1 < model.cfg.n_layers and (sae is None or plan.sae_layer is not None) else None
    vocab = np.asarray(token_strings(loaded.tokenizer), dtype=object)
    fit_groups = TokenGroups.of(tokens.fit_tokens, tokens.fit_labels, names, vocab, request.concepts)
    eval_groups = TokenGroups.of(tokens.eval_tokens, tokens.eval_labels, names, vocab, request.concepts)
    concepts = list(fit_groups.hits)  # the concepts asked for, in CONCEPTS order

    # 1. fit pass: partitions, specialists, concept correlations
    fit = Capture(capture_names, keep_all=True)
    with source.recording(units) as fit_rec:
        run_forward(model, tokens.fit_tokens, fit.hooks(), request.batch_size, stop_at, "fit pass", progress)
    fit_pass = Pass(fit, fit_rec)
    fit_labelled = tokens.fit_labels.reshape(-1) >= 0
    source.fit(units, fit, fit_labelled, request.seed)

    specialists: dict[tuple[str, int, str], ExpertSummary] = {}
    correlations: list[tuple[str, int, str, np.ndarray]] = []
    for kind, L in unit_layers:
        scores = kinds[kind].scores(units, L, fit_pass)
        for grouping in GROUPINGS:
            labels, group_names = fit_groups.labels(grouping)
            specialists[(kind, L, grouping)] = summarise(scores, labels.reshape(-1), group_names, factor=request.factor,
                                                         balanced_purity=True, layer=L, kind=kind)
        for concept in concepts:
            rho = concept_correlation(scores[fit_labelled], fit_groups.hits[concept].reshape(-1)[fit_labelled].float())
            correlations.append((kind, L, concept, rho))
    del fit, fit_rec, fit_pass

    def by_domain(losses: torch.Tensor) -> dict[str, float]:
        out = dom.group_losses(losses, tokens.eval_labels, names)
        out["all"] = dom.mean_loss(losses, tokens.eval_labels)
        return out

    # 2. evaluation pass, dense
    capture = Capture(capture_names, keep_all=True)
    with source.recording(units) as recorder:
        dense_losses = dom.token_losses(model, tokens.eval_tokens, hooks=capture.hooks(), batch_size=request.batch_size,
                                        desc="dense eval", progress=progress)
    eval_pass = Pass(capture, recorder)
    dense = by_domain(dense_losses)
    summaries: list[tuple[str, ExpertSummary]] = []
    notices = list(plan.notices) + list(tokens.notices)
    for kind, L in unit_layers:
        scores = kinds[kind].scores(units, L, eval_pass)
        for grouping in GROUPINGS:
            labels, group_names = eval_groups.labels(grouping)
            summary = summarise(scores, labels.reshape(-1), group_names, factor=request.factor, balanced_purity=True,
                                layer=L, kind=kind)
            summaries.append((grouping, summary))
            if summary.notice:
                notices.append(f"{KIND_LABELS[kind]} layer {L} by {grouping}: {summary.notice}")
    routes = [(L, *source.routes(units, L, eval_pass)) for L in plan.layers]
    del capture, eval_pass

    def losses_with(intervention: Intervention, desc: str) -> torch.Tensor:
        with intervention.context or nullcontext():
            return dom.token_losses(model, tokens.eval_tokens, hooks=intervention.hooks, batch_size=request.batch_size,
                                    desc=desc, progress=progress)

    # 3. k vs loss: the MoEfied model at each k, or the MoE re-routed top-k (its own k is the "dense" reference)
    curve: list[tuple[int, str, float]] = []
    baseline = {kind: dense_losses for kind in plan.kinds}
    reference_k = source.reference_k(plan)
    for k in plan.ks:
        if k == reference_k:
            losses = dense_losses
        else:
            losses = losses_with(source.top_k(units, k), source.top_k_desc.format(k=k, E=plan.n_experts))
        curve.extend((k, group, loss) for group, loss in by_domain(losses).items())
        if k == plan.k:
            baseline[source.kind] = losses  # the model whose experts are masked (a MoE's own k: the dense model)

    # 4 and 5 share the ablated forwards: each removal set runs once per kind
    memo: dict[tuple, torch.Tensor] = {}

    def ablated(kind: str, remove: dict[int, np.ndarray], desc: str) -> torch.Tensor:
        remove = {L: np.asarray(v, dtype=np.int64) for L, v in remove.items() if len(v)}
        key = (kind, tuple(sorted((L, tuple(sorted(v.tolist()))) for L, v in remove.items())))
        if not remove:
            return baseline[kind]
        if key not in memo:
            memo[key] = losses_with(kinds[kind].removal(units, remove), desc)
        return memo[key]

    # 4. masking selectivity per kind, grouping and budget; 5. concept purge
    layers_of = {kind: kinds[kind].layers(plan) for kind in plan.mask}
    masking = masking_matrices(layers_of, specialists, baseline, eval_groups, ablated, request, notices)
    purges = concept_purges(layers_of, correlations, baseline, eval_groups, ablated, request, notices)

    return MoeResult(loaded.name, plan, corpus, tokens, summaries, dense, curve, masking, routes, notices,
                     correlations, purges)
