"""Drop exact and near-duplicate documents from a corpus, first one of each group kept.

Exact duplicates: two documents whose texts are equal once every run of whitespace is collapsed
to one space and the ends are stripped (``normalise``), compared by SHA-256.

Near duplicates: documents whose sets of word ``SHINGLE_WORDS``-grams (lower-cased ``\\w+`` words)
have a Jaccard similarity of at least ``NEAR_THRESHOLD``. Candidates come from datasketch's
MinHash LSH (``NUM_PERM`` permutations, tuned to propose pairs from a Jaccard 0.1 below the
threshold); each candidate is then checked with the exact Jaccard of the two shingle sets, so the
decision itself is exact and only a pair the LSH never proposes can be missed (rare).

Documents are visited in their given order; a document is dropped when it duplicates one already
kept, so for a deterministic input order the output is deterministic. Shingles are hashed from
per-call word ids with fixed integer arithmetic, never with Python's ``hash``, so
``PYTHONHASHSEED`` changes nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from workbench.data.documents import Document

# Five words: long enough that two unrelated texts share almost none, short enough that a
# changed copyright line or version number disturbs only a few shingles of a licence.
SHINGLE_WORDS = 5
# 0.8: licence copies differing in their copyright line or a few words share well over 80% of their
# 5-grams, while two different licences or two modules on one topic share far fewer.
NEAR_THRESHOLD = 0.8
NUM_PERM = 128  # MinHash permutations: datasketch's default; the Jaccard estimate's standard error is ~0.035 at 0.8
_MINHASH_SEED = 1
_LSH_MARGIN = 0.1  # the LSH proposes pairs from Jaccard ~0.7 on, so few pairs at or above the threshold are missed
_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for the rolling shingle hash


class DomainCounts(NamedTuple):
    """What deduplication did to one domain: documents kept, and dropped as exact or near duplicates."""

    kept: int
    dropped_exact: int
    dropped_near: int


@dataclass(frozen=True)
class Deduplicated:
    documents: tuple[Document, ...]
    report: dict[str, DomainCounts]  # per domain, sorted by domain


def normalise(text: str) -> str:
    """The text compared for exact duplicates: whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def shingles(text: str, vocabulary: dict[str, int]) -> np.ndarray:
    """Distinct 32-bit hashes of the text's word SHINGLE_WORDS-grams (one shingle when it has fewer words).

    ``vocabulary`` maps each lower-cased word to an id and grows as texts are read; the same
    dictionary must be used for all texts being compared.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, np.uint32)
    for word in dict.fromkeys(words):  # new words get the next ids, in order of first appearance
        if word not in vocabulary:
            vocabulary[word] = len(vocabulary) + 1
    ids = np.array(list(map(vocabulary.__getitem__, words)), np.uint64)
    width = min(SHINGLE_WORDS, ids.size)
    n = ids.size - width + 1
    h = ids[:n].copy()
    for j in range(1, width):  # array arithmetic wraps modulo 2^64 without a warning
        h = h * _MULTIPLIER + ids[j : j + n]
    folded = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return np.unique(folded.astype(np.uint32))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sorted arrays of distinct values."""
    both = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - both
    return both / union if union else 1.0


def deduplicate(documents: Sequence[Document], *, threshold: float = NEAR_THRESHOLD) -> Deduplicated:
    """Keep the first document of each exact or near-duplicate group, in the given order."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=max(0.05, threshold - _LSH_MARGIN), num_perm=NUM_PERM)
    template = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED)
    vocabulary: dict[str, int] = {}
    seen_exact: set[bytes] = set()
    kept_shingles: list[np.ndarray] = []
    kept: list[Document] = []
    counts: dict[str, list[int]] = {}
    for doc in documents:
        tally = counts.setdefault(doc.domain, [0, 0, 0])
        digest = hashlib.sha256(normalise(doc.text).encode("utf-8", "surrogatepass")).digest()
        if digest in seen_exact:
            tally[1] += 1
            continue
        seen_exact.add(digest)
        own = shingles(doc.text, vocabulary)
        minhash = None
        if own.size:
            minhash = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, hashfunc=int, permutations=template.permutations,
                              scheme=template.scheme)
            minhash.update_batch(own.tolist())
            if any(jaccard(own, kept_shingles[key]) >= threshold for key in sorted(lsh.query(minhash))):
                tally[2] += 1
                continue
            lsh.insert(len(kept_shingles), minhash)
        kept_shingles.append(own)
        kept.append(doc)
        tally[0] += 1
    report = {domain: DomainCounts(*counts[domain]) for domain in sorted(counts)}
    return Deduplicated(tuple(kept), report)


def format_report(report: dict[str, DomainCounts]) -> str:
    """One line: per domain, documents kept and duplicates dropped (exact, near)."""
    parts = [f"{domain} {c.kept:,} kept, {c.dropped_exact:,} exact + {c.dropped_near:,} near dropped"
             for domain, c in report.items()]
    return "; ".join(parts) if parts else "no documents"
