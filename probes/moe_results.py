"""What a `workbench moe run` measured, before it is stored (``probes.moe_records.save_run``):
the per-kind summaries, the k curve, the masking matrices, the purge curves and the routes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from probes import domains as dom
from probes.expert_masking import SelectivityMatrix
from probes.expert_summary import ExpertSummary
from probes.moe_request import MoeRequest, Plan


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
