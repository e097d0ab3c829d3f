"""Corpora for the workbench: the built-in offline corpus, file and Hugging Face loaders,
and the one tokenise-and-chunk function. Nothing here touches the model."""

from workbench.data.chunking import Context, chunk_and_tokenize
from workbench.data.corpus import CORPUS_SPEC_HELP, Corpus, load_corpus
from workbench.data.documents import CorpusError, Document
from workbench.data.vocab import token_strings

__all__ = [
    "CORPUS_SPEC_HELP",
    "Context",
    "Corpus",
    "CorpusError",
    "Document",
    "chunk_and_tokenize",
    "load_corpus",
    "token_strings",
]
