"""The unit every corpus is made of, and the error every corpus loader raises."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One text with its ground-truth domain label and where it came from."""

    text: str
    domain: str  # ground-truth label, e.g. "prose", "code", "license", "package", "text"
    source: str  # provenance, e.g. "pydoc_data.topics:assert", "stdlib:json/decoder.py"


class CorpusError(ValueError):
    """Bad corpus input; str(err) is one line naming the problem and what is valid."""
