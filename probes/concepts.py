"""Token concepts: predicates on a token's text (the `CONCEPTS` registry) and the group labels they give.

A token t is read with the byte-level BPE / sentencepiece markers (Ġ ▁ → space, Ċ → newline,
ĉ → tab) turned back into whitespace; w(t) is that text without its leading whitespace. In
precedence order:

    whitespace      t is non-empty and all whitespace
    digits          w(t) is non-empty and, trailing whitespace dropped, all ASCII digits
    punctuation     w(t) stripped is non-empty and all punctuation (ASCII, or Unicode category P*)
    code_keywords   w(t), trailing whitespace dropped, is a Python keyword
    capitalised     w(t), trailing whitespace dropped, is alphabetic and starts upper-case

Concepts may overlap (`concept_masks`: c_j(x) ∈ {0, 1} per concept j). The exclusive label of a
token is its first concept, else 'other' (`concept_groups`, `exclusive_labels`):

    ℓ(x) = min{j : c_j(x) = 1},  or C (the index of 'other') when no concept matches; C = #concepts

These labels are the groups of `probes.score_matrix.routing_stats`.
"""

from __future__ import annotations

import keyword
import string
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from probes.score_matrix import ExpertsError

_SPACE_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}  # byte-level BPE / sentencepiece spellings


def _plain(token: str) -> str:
    return "".join(_SPACE_MARKERS.get(ch, ch) for ch in token)


def _word(token: str) -> str:
    """The token without its leading whitespace (' the' -> 'the')."""
    return _plain(token).lstrip()


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


# The single source of concept names: CLI choices, app labels and tests read this mapping.
# Order is precedence in `concept_groups` (a token gets the first concept it matches).
CONCEPTS: dict[str, Callable[[str], bool]] = {
    "whitespace": lambda t: _plain(t) != "" and _plain(t).isspace(),
    "digits": lambda t: _word(t) != "" and all(ch in string.digits for ch in _word(t).rstrip()),
    "punctuation": lambda t: _word(t).strip() != "" and all(_is_punct(ch) for ch in _word(t).strip()),
    "code_keywords": lambda t: _word(t).rstrip() in keyword.kwlist,
    "capitalised": lambda t: _word(t).rstrip().isalpha() and _word(t)[0].isupper(),
}
OTHER = "other"


def _check_concepts(names: Iterable[str] | None) -> list[str]:
    """The concepts asked for (default: all), in `CONCEPTS` order whatever order they were given in."""
    names = list(CONCEPTS) if names is None else list(names)
    unknown = [n for n in names if n not in CONCEPTS]
    if unknown:
        raise ExpertsError(f"unknown concept {unknown[0]!r}; valid: {', '.join(CONCEPTS)}")
    return [n for n in CONCEPTS if n in names]


def concept_masks(tokens: Sequence[str], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """name -> bool (n_tokens,): which tokens satisfy each concept predicate (concepts may overlap)."""
    names = _check_concepts(names)
    unique, inverse = np.unique(np.asarray(tokens, dtype=object).astype(str), return_inverse=True)
    return {n: np.fromiter((CONCEPTS[n](t) for t in unique), bool, len(unique))[inverse] for n in names}


def concept_groups(tokens: Sequence[str], names: Iterable[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Exclusive labels (n_tokens,) int64: the first matching concept in `CONCEPTS` order, else 'other'."""
    return exclusive_labels(concept_masks(tokens, names))


def exclusive_labels(masks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Concept masks (name -> bool (n,), in precedence order) -> exclusive labels (n,) and the names plus 'other'."""
    n = len(next(iter(masks.values()))) if masks else 0
    labels = np.full(n, len(masks), dtype=np.int64)
    for j, hit in reversed(list(enumerate(masks.values()))):  # earlier concepts overwrite later ones
        labels[hit] = j
    return labels, (*masks, OTHER)
