"""One entry point, ``load_corpus(spec)``, from a corpus spec string to a Corpus."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench.data.documents import CorpusError, Document
from workbench.data.hf_loader import load_hf, parse_hf_spec
from workbench.data.loaders import load_jsonl, load_parquet, load_txt_dir, load_txt_file
from workbench.data.stdlib_corpus import stdlib_documents

CORPUS_SPEC_HELP = (
    "stdlib (built-in offline corpus), a .txt file (blank-line-separated documents), "
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
    return Corpus(spec, documents)


def _documents(spec: str) -> Iterator[Document]:
    if spec == "stdlib":
        return iter(stdlib_documents())
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
