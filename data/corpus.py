"""One entry point, ``load_corpus(spec)``, from a corpus spec string to a Corpus."""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.data.dedup import DomainCounts, format_report
from workbench.data.documents import CorpusError, Document
from workbench.data.hf_loader import load_hf, parse_hf_spec
from workbench.data.loaders import load_jsonl, load_parquet, load_txt_dir, load_txt_file
from workbench.data.stdlib_corpus import stdlib_dedup_report, stdlib_documents

CORPUS_SPEC_HELP = (
    "stdlib (built-in offline corpus), stdlib:balanced[:SEED] (the same, cut into pieces and "
    "interleaved so that every domain has about the same number of tokens), a .txt file (blank-line-separated documents), "
    "a directory of .txt files (one document each), a .jsonl file ('text' field, optional "
    "'domain'), a .parquet file ('text' column, optional 'domain'), or hf:NAME[:SPLIT] / "
    "hf:NAME:CONFIG:SPLIT (a Hugging Face dataset)"
)

_FILE_LOADERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    ".txt": load_txt_file,
    ".jsonl": load_jsonl,
    ".parquet": load_parquet,
}


@dataclass(frozen=True)
class Corpus:
    """A named, non-empty, ordered collection of documents; ``name`` is the spec it came from."""

    name: str
    documents: tuple[Document, ...]
    # Per domain: documents kept, dropped as exact and as near duplicates (the built-in corpus only,
    # counted over the whole corpus before any ``max_documents`` cut); None for other corpora.
    dedup_report: Mapping[str, DomainCounts] | None = field(default=None, compare=False)

    @property
    def domains(self) -> tuple[str, ...]:
        """The distinct domain labels, sorted."""
        return tuple(sorted({doc.domain for doc in self.documents}))


def load_corpus(spec: str, *, max_documents: int | None = None) -> Corpus:
    """Load the corpus named by ``spec`` (see CORPUS_SPEC_HELP), skipping whitespace-only texts.

    ``max_documents`` keeps the first N documents in the corpus's own order (for ``stdlib``:
    sorted by source, so a small N covers few domains; chunk_and_tokenize shuffles instead).
    Raises CorpusError (one line) on any bad input, including a corpus with no documents.
    """
    if max_documents is not None and max_documents < 1:
        raise CorpusError(f"max_documents must be a positive integer or None, got {max_documents}")
    non_empty = (doc for doc in _documents(spec) if doc.text.strip())
    documents = tuple(itertools.islice(non_empty, max_documents))
    if not documents:
        raise CorpusError(f"corpus {spec!r} is empty: it has no non-whitespace documents; "
                          "a corpus needs at least one")
    report = stdlib_dedup_report() if spec == "stdlib" or _balanced_seed(spec) is not None else None
    return Corpus(spec, documents, report)


def corpus_report(corpus: Corpus) -> str:
    """One line for the CLI: the corpus, its documents per domain, and what deduplication dropped."""
    counts: dict[str, int] = {}
    for doc in corpus.documents:
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    line = f"corpus {corpus.name}: {len(corpus.documents):,} documents (" + ", ".join(
        f"{domain} {counts[domain]:,}" for domain in sorted(counts)) + ")"
    if corpus.dedup_report is not None:
        line += f"; deduplicated: {format_report(dict(corpus.dedup_report))}"
    return line


# Balanced corpus (``stdlib:balanced[:SEED]``).
PIECE_TOKENS = 256  # a document is cut at line ends into pieces of at most this many estimated tokens (two demo contexts)
# Token estimate: word pieces of up to 8 characters, other visible characters, newlines and runs of
# spaces. On the built-in corpus it is within ~15% of SmolLM2's token count in every domain (code
# 0.99, prose 1.14, package 1.04, license 1.07 estimated tokens per token), where characters / 4 is off by 40%.
_TOKEN_ESTIMATE = re.compile(r"\w{1,8}|[^\w\s]|\n| {2,}")
_BALANCED = re.compile(r"stdlib:balanced(?::(\d+))?")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate of a text's token count (see ``_TOKEN_ESTIMATE``)."""
    return len(_TOKEN_ESTIMATE.findall(text))


def balance_by_tokens(documents: Sequence[Document], *, seed: int = 0, piece_tokens: int = PIECE_TOKENS) -> tuple[Document, ...]:
    """The documents cut into pieces and interleaved so each domain holds about the same number of tokens.

    Each domain's documents are shuffled (``random.Random(f"{seed}:{domain}")``) and cut at line
    ends into pieces of at most ``piece_tokens`` estimated tokens (a longer single line stays one
    piece); a cut document's pieces get sources ``SOURCE#1``, ``SOURCE#2``, ... Every domain is
    capped at the estimated tokens of the smallest domain, and pieces are interleaved by always
    taking the next piece of the domain with the fewest tokens so far (ties: domain name), so every
    prefix of the result, and the whole, holds each domain's tokens within one piece of the others.
    ``chunk_and_tokenize`` shuffles documents again; with equal totals and short pieces each
    domain's share of any long enough prefix of its stream stays close to 1 / #domains.
    """
    by_domain: dict[str, list[Document]] = {}
    for doc in documents:
        by_domain.setdefault(doc.domain, []).append(doc)
    if not by_domain:
        return ()
    totals = {domain: sum(estimate_tokens(doc.text) for doc in docs) for domain, docs in by_domain.items()}
    budget = min(totals.values())
    streams = {}
    for domain in sorted(by_domain):
        docs = list(by_domain[domain])
        random.Random(f"{seed}:{domain}").shuffle(docs)
        streams[domain] = itertools.chain.from_iterable(_pieces(doc, piece_tokens) for doc in docs)
    heap = [(0, domain) for domain in sorted(streams)]
    out: list[Document] = []
    while heap:
        emitted, domain = heapq.heappop(heap)
        if emitted >= budget:
            continue
        piece = next(streams[domain], None)
        if piece is None:
            continue
        out.append(piece[0])
        heapq.heappush(heap, (emitted + piece[1], domain))
    return tuple(out)


def _pieces(doc: Document, piece_tokens: int) -> Iterator[tuple[Document, int]]:
    """(piece, estimated tokens) of one document, cut at line ends; the document itself when it fits."""
    lines = doc.text.splitlines(keepends=True)
    sizes = [estimate_tokens(line) for line in lines]
    if sum(sizes) <= piece_tokens:
        if sum(sizes):
            yield doc, sum(sizes)
        return
    pieces: list[tuple[str, int]] = []
    text, size = [], 0
    for line, n in zip(lines, sizes):
        if text and size + n > piece_tokens:
            pieces.append(("".join(text), size))
            text, size = [], 0
        text.append(line)
        size += n
    if text:
        pieces.append(("".join(text), size))
    number = 0
    for text_, size_ in pieces:
        if size_ and text_.strip():
            number += 1
            yield Document(text_, doc.domain, f"{doc.source}#{number}"), size_


def _balanced_seed(spec: str) -> int | None:
    match = _BALANCED.fullmatch(spec)
    return None if match is None else int(match.group(1) or 0)


@functools.lru_cache(maxsize=4)
def _balanced_stdlib(seed: int) -> tuple[Document, ...]:
    return balance_by_tokens(stdlib_documents(), seed=seed)


def _documents(spec: str) -> Iterator[Document]:
    if spec == "stdlib":
        return iter(stdlib_documents())
    seed = _balanced_seed(spec)
    if seed is not None:
        return iter(_balanced_stdlib(seed))
    if spec.startswith("stdlib:"):
        raise CorpusError(f"unknown built-in corpus variant {spec!r}; valid: stdlib, stdlib:balanced, stdlib:balanced:SEED "
                          "(SEED a non-negative integer)")
    if spec.startswith("hf:"):
        return load_hf(parse_hf_spec(spec))
    path = Path(spec).expanduser()
    if spec.strip() and path.is_dir():
        return load_txt_dir(path)
    suffix = path.suffix.lower()
    if spec.strip() and path.exists():
        if suffix not in _FILE_LOADERS:
            raise CorpusError(f"unsupported corpus file type {path.suffix or '(none)'!r} for "
                              f"{spec!r}; supported: {', '.join(_FILE_LOADERS)} files or a "
                              "directory of .txt files")
        return _FILE_LOADERS[suffix](path)
    if suffix in _FILE_LOADERS or "/" in spec:
        raise CorpusError(f"corpus file not found: {spec!r}; expected an existing "
                          f"{', '.join(_FILE_LOADERS)} file or a directory of .txt files")
    raise CorpusError(f"unknown corpus spec {spec!r}; valid: {CORPUS_SPEC_HELP}")
