"""The token groups of a `workbench moe run`: each token's domain and token concepts, and which
position a group's loss is credited to.

Units are scored against a grouping's per-token labels (``TokenGroups.labels``); losses are
credited by ``TokenGroups.loss_labels`` and split for a purge by ``TokenGroups.concept_split``.

Where a loss is credited: the loss at position t predicts token t+1. A domain's loss is on its
target tokens (neighbours share a domain, so either side would do); a concept's loss is at the
positions whose *input* token satisfies it — the positions where the units scored on that
concept fire and where removing them acts directly — i.e. the loss of predicting the token after
a concept token. BOS and separators are unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probes.concepts import concept_masks, exclusive_labels


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
