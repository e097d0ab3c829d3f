"""Fixtures shared by the expert-probe tests."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A saved 2-layer random Mixtral (d_model 32, E=4, top-2) with SmolLM2's tokenizer; routers far from uniform."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from workbench.models import default_tokenizer_dir

    path = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(2.0 * torch.randn(layer.mlp.gate.weight.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
