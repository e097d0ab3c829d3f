"""Fixtures shared by the expert-probe and sparsity tests, and by the app's Experts and Sparsity page tests
(tests/app/conftest.py takes them from here: sibling folders do not see each other's conftest)."""

from pathlib import Path

import numpy as np
import pytest
import torch

TINY_MEASURE = ["sparsity", "measure", "--model", "tiny-llama", "--tokens", "512", "--ctx", "32",
                "--calibration-tokens", "128", "--metric", "cett", "--metric", "zero"]


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


def _synthetic_series(ws, name: str, activation: str, d_model: int, n_layers: int, ratios) -> None:
    """Store checkpoints whose cett@PPL-1% ratio follows ``ratios`` (what a trained series writes)."""
    from probes import records
    from probes.sparsity import Measurement

    shape = records.ModelShape(activation, d_model, n_layers, 4 * d_model)
    for tokens, ratio in ratios:
        m = Measurement("cett", 1.0, 0.3, 20.0, 20.2, [ratio] * n_layers, [0.1] * n_layers, [(0.0, 20.0, 1.0), (0.3, 20.2, ratio)])
        records.save_measurements(ws, [m], model=f"{name}/tokens_{tokens}", shape=shape, corpus="stdlib", eval_tokens=1000,
                                  series=name, train_tokens=tokens)


@pytest.fixture
def synthetic_series():
    """``synthetic_series(ws, name, activation, d_model, n_layers, [(train_tokens, ratio), ...])``."""
    return _synthetic_series


@pytest.fixture
def tiny_measure() -> list[str]:
    """The `workbench` arguments of the tiny-llama measurement in ``sparsity_db`` (add --p, --db, ...)."""
    return list(TINY_MEASURE)


@pytest.fixture(scope="module")
def sparsity_db(tmp_path_factory) -> Path:
    """tiny-llama measured at PPL +1% and +5% (cett) and zero, a synthetic relu and silu series of checkpoints
    (d_model 128, 4 layers), and a silu-law fit of the silu series."""
    from probes.runs import run_fit
    from workbench.cli import main
    from workbench.workspace import Workspace

    db = tmp_path_factory.mktemp("sparsity") / "ws.duckdb"
    assert main([*TINY_MEASURE, "--p", "1", "--p", "5", "--db", str(db)]) == 0
    tokens = np.geomspace(1e6, 64e6, 7).astype(int)
    with Workspace(db) as ws:
        _synthetic_series(ws, "relu-d128-l4", "relu", 128, 4, [(t, 0.1 + 0.5 * np.exp(-t / 8e6)) for t in tokens])
        _synthetic_series(ws, "silu-d128-l4", "silu", 128, 4, [(t, 0.6 - 0.2 * (t / 1e6) ** -0.5) for t in tokens])
        run_fit(ws, "silu-d128-l4", "silu", "cett@PPL-1%")
    return db
