"""Domain-balanced token sets and per-domain next-token losses for the expert probes.

The built-in corpus is ~91 % code tokens, so sampling its stream would leave the other domains
with a few hundred tokens. Here every domain d of the corpus gets its own seeded stream of
domain-pure contexts (``data.chunk_and_tokenize`` over d's documents only), and the first
``eval_tokens`` of it become the evaluation set, the next ``fit_tokens`` the fitting set
(MoEfication partition, choosing specialists): **equal tokens per domain**, from different
contexts (mostly different documents). A domain too short for one context of each is skipped
with a notice; a domain with fewer tokens than asked keeps what it has (notice), and the metrics
that would be biased by the counts use per-domain-normalised mass (``balanced`` purity).

Labels: every token carries its domain's index, except BOS and document separators (−1). The
loss at position t predicts token t+1 and counts for the domain of token t+1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.data import chunk_and_tokenize, load_corpus
from workbench.errors import WorkbenchError
from workbench.hooks import attached


class DomainError(WorkbenchError):
    """Bad token-set request: sizes, or a corpus with fewer than two usable domains."""


@dataclass(frozen=True)
class DomainTokens:
    """Equal-size token sets per domain: (rows, ctx) ids with (rows, ctx) domain labels."""

    names: tuple[str, ...]  # kept domains, sorted
    eval_tokens: torch.Tensor  # (rows_e, ctx) int64, BOS first
    eval_labels: torch.Tensor  # (rows_e, ctx) int64 domain index; −1 for BOS / separators
    fit_tokens: torch.Tensor  # (rows_f, ctx)
    fit_labels: torch.Tensor  # (rows_f, ctx)
    notices: tuple[str, ...] = field(default=())
    balance: str = ""  # how the domains were balanced, for the stored run

    def counts(self, which: str = "eval") -> dict[str, int]:
        labels = self.eval_labels if which == "eval" else self.fit_labels
        return {name: int((labels == d).sum()) for d, name in enumerate(self.names)}


def domain_tokens(tokenizer, corpus: str = "stdlib", *, eval_tokens: int = 512, fit_tokens: int = 1024,
                  ctx: int = 128, seed: int = 0, min_domains: int = 2) -> DomainTokens:
    """Sample ``eval_tokens`` + ``fit_tokens`` tokens per domain of ``corpus`` (see the module doc)."""
    if eval_tokens <= 0 or fit_tokens <= 0 or ctx < 2:
        raise DomainError(f"need --tokens > 0, --fit-tokens > 0 and --ctx ≥ 2 (got {eval_tokens}, {fit_tokens}, {ctx})")
    documents = load_corpus(corpus).documents
    body = ctx - 1
    n_eval, n_fit = math.ceil(eval_tokens / body), math.ceil(fit_tokens / body)
    names, notices = [], []
    parts: dict[str, tuple[list, list]] = {}
    for domain in sorted({d.domain for d in documents}):
        docs = [d for d in documents if d.domain == domain]
        contexts = list(chunk_and_tokenize(docs, tokenizer, ctx, seed=seed, max_contexts=n_eval + n_fit))
        if len(contexts) < 2:
            notices.append(f"domain {domain}: skipped, {len(contexts)} context(s) of {ctx} tokens (needs 2)")
            continue
        if len(contexts) < n_eval + n_fit:
            share = max(1, min(len(contexts) - 1, round(len(contexts) * n_eval / (n_eval + n_fit))))
            notices.append(f"domain {domain}: only {len(contexts) * body} tokens (asked for {(n_eval + n_fit) * body}); "
                           f"{share * body} eval + {(len(contexts) - share) * body} fit")
        else:
            share = n_eval
        parts[domain] = (contexts[:share], contexts[share:])
        names.append(domain)
    if len(names) < min_domains:
        have = ", ".join(names) or "none"
        raise DomainError(f"corpus '{corpus}' has {len(names)} usable domain(s) ({have}); expert metrics need at least {min_domains}")

    def stack(which: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = [], []
        for d, name in enumerate(names):
            for context in parts[name][which]:
                ids.append(context.token_ids)
                labels.append([-1 if doc < 0 else d for doc in context.doc_ids])
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    (e_ids, e_lab), (f_ids, f_lab) = stack(0), stack(1)
    balance = (f"equal tokens per domain: {n_eval * body} eval + {n_fit * body} fit tokens from domain-pure "
               f"contexts of {ctx} (seed {seed}); purity uses per-domain-normalised mass")
    return DomainTokens(tuple(names), e_ids, e_lab, f_ids, f_lab, tuple(notices), balance)


def token_losses(model, tokens: torch.Tensor, *, hooks=None, batch_size: int = 8, desc: str = "forward",
                 progress: bool = False) -> torch.Tensor:
    """Next-token losses (rows, ctx − 1) of ``tokens`` (rows, ctx) with ``hooks`` attached (TransformerLens)."""
    out = []
    device = model.cfg.device
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, leave=False):
        chunk = tokens[start : start + batch_size].to(device)  # (b, T)
        with torch.inference_mode(), attached(model, hooks):
            logits = model(chunk).float()[:, :-1]  # (b, T-1, vocab)
            flat = logits.reshape(-1, logits.shape[-1])  # (b·(T-1), vocab): contiguous rows, not a strided (b, vocab, T-1) view
            losses = F.cross_entropy(flat, chunk[:, 1:].reshape(-1), reduction="none")  # (b·(T-1),)
        out.append(losses.reshape(chunk.shape[0], -1).cpu())  # (b, T-1)
    return torch.cat(out)


def group_losses(losses: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """Mean loss per domain, the loss at t counted for the label of token t+1; labels (rows, ctx)."""
    target = labels[:, 1:].reshape(-1).numpy()
    flat = losses.reshape(-1).double().numpy()
    out = {}
    for d, name in enumerate(names):
        hit = target == d
        if hit.any():
            out[name] = float(flat[hit].mean())
    return out


def mean_loss(losses: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean loss over every labelled target (domain tokens, no separators)."""
    keep = (labels[:, 1:] >= 0).reshape(-1).numpy()
    return float(losses.reshape(-1).double().numpy()[keep].mean())
