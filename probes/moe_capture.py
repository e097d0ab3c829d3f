"""Forward passes of a `workbench moe run`: capturing activations, and the interventions that
change a forward (hooks plus an optional context, such as re-routing a MoE's routers).

Nothing here knows about unit kinds; ``probes.moe_kinds`` builds its scores and removals from
these pieces.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from workbench.hooks import Capture, attached


class Pass(NamedTuple):
    """What one pass over a token set left behind: captured activations and the routers' recorded
    choices (a ``probes.routing.RoutingRecorder``; None when the experts are not a model's own)."""

    capture: Capture
    recorder: object | None


class Intervention(NamedTuple):
    """A changed forward: hooks [(hook name, fn)] attached for it, inside ``context`` if given."""

    hooks: list
    context: AbstractContextManager | None = None


def passthrough_bos(fn):
    """Apply ``fn`` to positions ≥ 1 of a (b, T, d) activation; BOS passes unchanged."""

    def hook(acts, hook=None):
        return torch.cat([acts[:, :1], fn(acts[:, 1:])], dim=1)

    return hook


def run_forward(model, tokens: torch.Tensor, hooks, batch_size: int, stop_at: int | None, desc: str,
                progress: bool) -> None:
    """Run ``tokens`` (rows, ctx) through ``model`` in batches with ``hooks`` attached, up to ``stop_at``."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, leave=False):
        chunk = tokens[start : start + batch_size].to(model.cfg.device)
        with torch.inference_mode(), attached(model, hooks):
            model(chunk, stop_at_layer=stop_at)
