"""Steps 4 and 5 of a `workbench moe run` (``probes.moe_measure``): masking selectivity and the
concept purge, given the units chosen on the fit tokens and a function that runs an ablated
forward (``Ablate``), so nothing here touches the model.

4. Masking selectivity per kind, grouping (targets and measured groups are domains, or token
   concepts) and budget: for each target, remove in every chosen layer either the kind's
   specialists of it (``skew``: as many as pass Monet's test, so kinds differ in how much they
   remove) or at most ⌈share·E⌉ units per layer, the most skewed towards it among those whose
   strongest group it is (``matched``: about the same share of every kind's units; fewer where
   fewer units peak on the target). ΔLoss on every group against the kind's own baseline.
5. Concept purge (Monet's toxicity purge, per token concept): for each τ, remove the units with
   ρ_e > τ and measure the loss where the concept holds against the loss on the rest (our
   "general loss": the tokens outside the concept, so the two never overlap).

A removal that would leave a router layer without an expert (``UnitKind.keeps_one_per_layer``)
is skipped with a notice.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from probes import domains as dom
from probes.concept_purge import purge_curve
from probes.concepts import OTHER
from probes.expert_masking import selectivity_matrix
from probes.expert_summary import ExpertSummary
from probes.moe_groups import TokenGroups
from probes.moe_kinds import UNIT_KINDS
from probes.moe_request import GROUPINGS, MoeRequest
from probes.moe_results import Masking, Purge, PurgePoint

Ablate = Callable[[str, dict, str], torch.Tensor]  # (kind, {layer: units}, description) -> token losses (rows, ctx − 1)


def masking_matrices(layers_of: dict[str, list[int]], specialists: dict[tuple[str, int, str], ExpertSummary],
                     baseline: dict[str, torch.Tensor], groups: TokenGroups, ablated: Ablate, request: MoeRequest,
                     notices: list[str]) -> list[Masking]:
    """Step 4: for each kind, grouping and budget, remove each target's units (chosen on the fit
    tokens: ``specialists``) in every layer of the kind, and the ΔLoss matrix against the baseline;
    skips are added to ``notices``."""
    out: list[Masking] = []
    for kind, unit_layers in layers_of.items():
        keeps_one = UNIT_KINDS[kind].keeps_one_per_layer
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
                    if keeps_one and any(len(v) >= fitted[L].n_experts for L, v in remove.items()):
                        notices.append(f"mask {kind} of {target} ({budget}): skipped, it would remove every expert of a layer")
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
        keeps_one = UNIT_KINDS[kind].keeps_one_per_layer
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
                if keeps_one and any(len(v) >= curves[L].n_experts for L, v in remove.items()):
                    notices.append(f"purge {kind} by {concept} at τ={tau}: skipped, it would remove every expert of a layer")
                    continue
                after = dom.group_losses(ablated(kind, remove, f"purge {kind} by {concept} at τ={tau}"), split, pair)
                n = int(sum(len(v) for v in remove.values()))
                points.append(PurgePoint(float(tau), n, n / total, after[concept], after["rest"]))
            out.append(Purge(kind, concept, before[concept], before["rest"], points))
    return out
