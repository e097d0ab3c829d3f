"""The one tokenise-and-chunk function: documents -> fixed-length BOS-prefixed contexts."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from workbench.data.documents import Document

SEPARATOR_DOC_ID = -1  # doc_id of BOS and EOS-separator tokens


@dataclass(frozen=True)
class Context:
    """One model input of ``ctx_len`` tokens, each token labelled with its document."""

    index: int  # 0-based position in the shuffled stream of contexts
    token_ids: list[int]  # length ctx_len; token_ids[0] == BOS id
    doc_ids: list[int]  # length ctx_len; index into `documents` per token; -1 for BOS and EOS


def chunk_and_tokenize(
    documents: Sequence[Document],
    tokenizer,
    ctx_len: int,
    *,
    seed: int,
    max_contexts: int | None = None,
) -> Iterator[Context]:
    """Yield contexts cut from the shuffled, EOS-joined token stream of ``documents``.

    Order: ``order = list(range(len(documents))); random.Random(seed).shuffle(order)``.
    Documents are tokenised lazily in that order with
    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` (no truncation), joined into one
    stream with ``tokenizer.eos_token_id`` between consecutive documents (documents with no
    tokens are skipped), and cut into pieces of ``ctx_len - 1`` tokens, each prefixed with
    ``tokenizer.bos_token_id`` (EOS when the tokenizer has no BOS). The final partial piece is
    dropped. Tokenising stops once ``max_contexts`` contexts are produced. Same documents,
    tokenizer and seed give the same contexts.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS plus one token), got {ctx_len}")
    if max_contexts is not None and max_contexts < 0:
        raise ValueError(f"max_contexts must be >= 0 or None, got {max_contexts}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; it is needed to separate documents")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    return _contexts(documents, order, tokenizer, ctx_len, bos, eos, max_contexts)


def _contexts(documents, order, tokenizer, ctx_len, bos, eos, max_contexts) -> Iterator[Context]:
    body = ctx_len - 1
    tokens: list[int] = []  # the stream not yet emitted
    doc_ids: list[int] = []
    produced = 0
    started = False
    for doc_id in order:
        if max_contexts is not None and produced >= max_contexts:
            return
        text = documents[doc_id].text
        # verbose=False: no "longer than the maximum length" warning; nothing is truncated
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            continue
        if started:  # an EOS separates this document from the previous one
            tokens.append(eos)
            doc_ids.append(SEPARATOR_DOC_ID)
        started = True
        tokens.extend(ids)
        doc_ids.extend([doc_id] * len(ids))
        start = 0
        while len(tokens) - start >= body:
            if max_contexts is not None and produced >= max_contexts:
                return
            yield Context(
                index=produced,
                token_ids=[bos, *tokens[start : start + body]],
                doc_ids=[SEPARATOR_DOC_ID, *doc_ids[start : start + body]],
            )
            produced += 1
            start += body
        del tokens[:start], doc_ids[:start]
