"""One layer's expert metrics over one grouping (domains or concepts), bundled as `ExpertSummary`.

`summarise` runs every metric on scores G (n, E) and group labels ℓ (n,):
`probes.score_matrix.routing_stats` (r_{e,d}, f_{e,d}, n_d), then the skew specialists, the
specialised share, the routing entropy, the purity and the mutual information of
`probes.expert_metrics`. The summary's rows for the tables:

    per group    tokens n_d, specialised share s_d, |{e : e specialises in d}|, entropy H_d
    per expert   purity P_e, specialist group, selection frequency f_e = Σ_d n_d f_{e,d} / Σ_d n_d
    per layer    dead = |{e : no mass}|, specialised share |{e : e specialises}| / E,
                 mean_d H_d (NaN groups left out), mean P_e over live experts, I(E; D) and its normalised form
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from probes.expert_metrics import (
    MutualInformation,
    mutual_information,
    purity,
    routing_entropy,
    skew_ranking,
    specialised_share,
    specialists,
)
from probes.score_matrix import ArrayLike, routing_stats


@dataclass(frozen=True)
class ExpertSummary:
    """Every concentration metric of one layer over one grouping (domains or concepts)."""

    layer: int | str | None
    kind: str  # what the experts are: "moe", "moefied", "sae", "neuron", ...
    names: tuple[str, ...]  # groups with tokens
    skipped: tuple[str, ...]  # groups with no tokens (left out)
    counts: np.ndarray  # (D,) tokens per group
    mass: np.ndarray  # (D, E) r_{e,d}
    freq: np.ndarray  # (D, E) f_{e,d}
    specialist: np.ndarray  # (E,) group index or −1
    share: np.ndarray  # (D,) share of experts specialised in each group
    entropy: np.ndarray  # (D,) normalised routing entropy
    purity: np.ndarray  # (E,) max_d p(d|e), NaN for dead experts
    mi: MutualInformation
    factor: float  # skew factor used

    @property
    def n_experts(self) -> int:
        return self.mass.shape[1]

    @property
    def notice(self) -> str | None:
        return f"skipped groups with no tokens: {', '.join(self.skipped)}" if self.skipped else None

    def specialised_in(self, group: str) -> np.ndarray:
        """Experts that specialise in `group` (the ones Monet masking removes)."""
        return np.flatnonzero(self.specialist == self.names.index(group))

    def most_specialised_in(self, group: str, n: int) -> np.ndarray:
        """The ``n`` experts most skewed towards ``group`` (fewer if fewer have it as their strongest group)."""
        return skew_ranking(self.mass, self.names.index(group))[: max(int(n), 0)]

    def summary_rows(self) -> list[dict]:
        """One row per group: tokens, specialised share and count, normalised entropy."""
        return [
            {
                "layer": self.layer,
                "kind": self.kind,
                "group": name,
                "tokens": int(self.counts[d]),
                "specialised_share": float(self.share[d]),
                "n_specialised": int((self.specialist == d).sum()),
                "entropy": float(self.entropy[d]),
            }
            for d, name in enumerate(self.names)
        ]

    def expert_rows(self) -> list[dict]:
        """One row per expert: purity, specialist group (or None), total selection frequency."""
        total = self.counts.sum()
        freq = (self.freq * self.counts[:, None]).sum(0) / total if total else np.zeros(self.n_experts)
        return [
            {
                "layer": self.layer,
                "kind": self.kind,
                "expert": e,
                "purity": float(self.purity[e]),
                "specialist": self.names[self.specialist[e]] if self.specialist[e] >= 0 else None,
                "freq": float(freq[e]),
            }
            for e in range(self.n_experts)
        ]

    def layer_row(self) -> dict:
        """One row for the experts-vs-latents-vs-neurons table (means over live experts)."""
        alive = ~np.isnan(self.purity)
        return {
            "layer": self.layer,
            "kind": self.kind,
            "experts": self.n_experts,
            "dead": int((~alive).sum()),
            "specialised_share": float((self.specialist >= 0).mean()) if self.n_experts else 0.0,
            "mean_entropy": float(np.nanmean(self.entropy)) if np.isfinite(self.entropy).any() else float("nan"),
            "mean_purity": float(self.purity[alive].mean()) if alive.any() else float("nan"),
            "mi_nats": self.mi.nats,
            "mi_norm": self.mi.normalised,
        }


def summarise(
    scores: ArrayLike,
    labels: ArrayLike,
    names: Sequence[str],
    *,
    selected: ArrayLike | None = None,
    factor: float = 2.0,
    balanced_purity: bool = False,
    layer: int | str | None = None,
    kind: str = "experts",
) -> ExpertSummary:
    """All metrics of one layer: scores (n, E), labels (n,) into `names`, optional selection (n, E)."""
    stats = routing_stats(scores, labels, names, selected)
    spec = specialists(stats.mass, factor)
    return ExpertSummary(
        layer=layer,
        kind=kind,
        names=stats.names,
        skipped=stats.skipped,
        counts=stats.counts,
        mass=stats.mass,
        freq=stats.freq,
        specialist=spec,
        share=specialised_share(spec, len(stats.names)),
        entropy=routing_entropy(stats.mass),
        purity=purity(stats.mass, stats.counts, balanced_purity),
        mi=mutual_information(stats.mass, stats.counts),
        factor=factor,
    )
