"""Shared fixtures. Tests never touch the network or the user's cache.

The environment is set at import time so subprocesses (CLI kill/resume tests) inherit it:
the hub is offline, and converted models go to a cache directory private to this test session.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WORKBENCH_CACHE", tempfile.mkdtemp(prefix="workbench-test-cache-"))


@pytest.fixture(scope="session")
def tiny():
    """The 2-layer random Llama (d_model 64) with SmolLM2's tokenizer."""
    from workbench.models import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model; only for tests marked slow."""
    from workbench.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def stdlib_corpus():
    from workbench.data import load_corpus

    return load_corpus("stdlib")


@pytest.fixture
def workspace_path(tmp_path: Path) -> Path:
    return tmp_path / "ws.duckdb"


@pytest.fixture
def table_digest():
    """``digest(db)`` → {table: sha256 of its columns and of all its rows in a total order}, read
    through a read-only connection; equal digests before and after mean nothing was written."""
    import hashlib

    import duckdb

    def digest(db) -> dict[str, str]:
        con = duckdb.connect(str(db), read_only=True)
        try:
            out = {}
            for (table,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
                columns = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = ? ORDER BY ordinal_position", [table]).fetchall()
                quoted = '"' + table.replace('"', '""') + '"'
                rows = con.execute(f"SELECT * FROM {quoted} ORDER BY ALL").fetchall()
                out[table] = hashlib.sha256(repr((columns, rows)).encode()).hexdigest()
            return out
        finally:
            con.close()

    return digest


# -- the expert-probe and sparsity fixtures, used by tests/probes and by the Experts and Sparsity page tests --

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


# -- host reads: what makes the host wait for a GPU, counted on the CPU --------------------------------------
class HostReads(TorchFunctionMode):
    """Counts tensor calls that read a device value into Python or size an output from values.

    On CUDA each of these waits for the queued kernels: a value read (`item`, `tolist`, `bool`,
    `float`, `int`, `__index__`, formatting, `cpu`, `numpy`), an output sized by the data
    (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`, `repeat_interleave`
    without `output_size`). On the CPU they are cheap, so the count is what shows them.
    ``calls`` is a Counter by name; ``count`` its total.
    """

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "cpu", "numpy",
             "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}

    def __init__(self):
        super().__init__()
        from collections import Counter

        self.calls = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls[name] += 1
        elif name == "repeat_interleave" and "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.calls["repeat_interleave without output_size"] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
            self.calls[f"boolean-mask {name}"] += 1
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


@pytest.fixture
def host_reads():
    """``with host_reads() as reads: ...`` then ``reads.count`` / ``reads.calls`` (see ``HostReads``)."""
    return HostReads
