"""Held-out evaluation text as token rows: the contexts the workbench never trains on.

The same rule as the activation cache's test split (``workbench.activations.HOLDOUT_EVERY``):
context ``index % 20 == 19`` of the seeded, chunked corpus stream.
"""

from __future__ import annotations

import math

import torch

from workbench.activations import HOLDOUT_EVERY
from workbench.data import chunk_and_tokenize, load_corpus
from workbench.errors import WorkbenchError


def heldout_tokens(tokenizer, corpus: str = "stdlib", n_tokens: int = 16_384, ctx: int = 256, seed: int = 0) -> torch.Tensor:
    """(rows, ctx) token ids, BOS first, from held-out contexts; rows = ⌈n_tokens / ctx⌉."""
    if n_tokens <= 0 or ctx < 2:
        raise WorkbenchError(f"evaluation needs tokens > 0 and ctx ≥ 2, got tokens={n_tokens}, ctx={ctx}")
    rows = math.ceil(n_tokens / ctx)
    documents = load_corpus(corpus).documents
    picked = []
    for context in chunk_and_tokenize(documents, tokenizer, ctx, seed=seed):
        if context.index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
            picked.append(context.token_ids)
            if len(picked) == rows:
                break
    if not picked:
        raise WorkbenchError(f"corpus '{corpus}' is too small for one held-out context of {ctx} tokens")
    return torch.tensor(picked, dtype=torch.long)  # (rows, ctx)
