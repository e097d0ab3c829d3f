"""workbench.tinylm: tokenizer, config, gated-MLP activations, training series, resume, shapes."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from workbench.tinylm import (
    ACTIVATIONS,
    CHECKPOINT_JSON,
    MANIFEST,
    OPTIMIZER_FILE,
    SeriesError,
    TinyLMConfig,
    build_model,
    load_heldout,
    load_series,
    load_token_data,
    non_embedding_params,
    prepare_token_data,
    shapes_at_fixed_params,
    train_tiny_lm,
    train_tokenizer,
)

VOCAB, CTX = 512, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    from workbench.data import load_corpus

    return load_corpus("stdlib", max_documents=40)


@pytest.fixture(scope="module")
def token_data(corpus, tmp_path_factory):
    return prepare_token_data(corpus, tmp_path_factory.mktemp("data") / "tokens", vocab_size=VOCAB, context=CTX, seed=0)


def tiny_cfg(**kw) -> TinyLMConfig:
    base = dict(d_model=32, n_layers=2, context=CTX, vocab_size=VOCAB, batch_size=8, total_tokens=8 * CTX * 40,
                n_checkpoints=4, first_checkpoint_fraction=1 / 8, dtype="fp32", eval_rows=8, lr=3e-3)
    return TinyLMConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def series(token_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("series") / "relu"
    return out, train_tiny_lm(tiny_cfg(), token_data, out, progress=False)


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_is_deterministic(corpus):
    texts = [doc.text for doc in corpus.documents[:20]]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 400
    assert (a.unk_token_id, a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 1, 2, 3)
    for text in [texts[0], "def f(x):\n\treturn x  # tabs, spaces\n", "naïve café 日本語 🙂", "  leading and trailing  "]:
        ids = a(text, add_special_tokens=False)["input_ids"]
        assert a.decode(ids) == text
        assert a(text)["input_ids"] == [a.bos_token_id, *ids]  # BOS by default, like the training rows


def test_token_data_heldout_disjoint_and_cached(corpus, token_data, tmp_path):
    assert token_data.train.shape[1] == token_data.heldout.shape[1] == CTX
    assert (token_data.train[:, 0] == token_data.tokenizer.bos_token_id).all()
    assert len(token_data.heldout) == (len(token_data.train) + len(token_data.heldout)) // 20  # every 20th row
    train_rows = {tuple(r) for r in token_data.train.tolist()}
    assert not any(tuple(r) in train_rows for r in token_data.heldout.tolist())
    # a second call with the same directory loads the same data; different arguments are refused
    directory = tmp_path / "tok"
    first = prepare_token_data(corpus, directory, vocab_size=VOCAB, context=CTX)
    assert first.fingerprint == token_data.fingerprint == load_token_data(directory).fingerprint
    with pytest.raises(SeriesError, match="holds token data"):
        prepare_token_data(corpus, directory, vocab_size=VOCAB, context=64)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"activation": "gelu"}, "activation must be one of relu, silu"),
        ({"dtype": "fp16"}, "dtype must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"d_model": 100}, "multiple of head_dim"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"d_mlp": -3}, "d_mlp must be"),
        ({"context": 1}, "context must be at least 2"),
        ({"vocab_size": 100}, "vocab_size must be at least"),
        ({"lr": 0.0}, "lr must be"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"adam_betas": (0.9, 1.5)}, "adam_betas"),
        ({"checkpoint_tokens": (100, 50)}, "strictly increasing"),
        ({"checkpoint_tokens": (10**12,)}, "at most total_tokens"),
    ],
)
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(SeriesError, match=match) as err:
        TinyLMConfig(**kw)
    assert "\n" not in str(err.value)


def test_config_derived_values():
    cfg = TinyLMConfig()
    assert cfg.mlp_width == 4 * cfg.d_model and cfg.n_heads == cfg.d_model // cfg.head_dim
    steps = cfg.milestone_steps
    assert steps[-1] == cfg.total_steps and list(steps) == sorted(set(steps)) and 8 <= len(steps) <= 12
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert max(ratios) / min(ratios) < 1.5  # roughly log-spaced
    assert TinyLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    explicit = tiny_cfg(checkpoint_tokens=(256, 2560))
    assert explicit.milestone_steps == (1, 10, explicit.total_steps)


def test_non_embedding_param_count_matches_model():
    cfg = TinyLMConfig(d_model=64, n_layers=3, d_mlp=96, vocab_size=300, context=16)
    model = build_model(cfg)
    counted = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert counted == cfg.non_embedding_params == non_embedding_params(64, 3, 96)


# -------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gated_mlp_exact_zeros_only_for_relu(activation, dtype):
    cfg = TinyLMConfig(activation=activation, d_model=32, n_layers=2, vocab_size=300, context=16, dtype=dtype)
    model = build_model(cfg)
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [mlp.act_fn.register_forward_hook(lambda m, i, o: seen.__setitem__("act", o)),
               mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("product", i[0]))]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.no_grad():
            model(input_ids=torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    for name in ("act", "product"):
        zero_fraction = float((seen[name] == 0).float().mean())
        if activation == "relu":
            assert 0.3 < zero_fraction < 0.7, name
        else:
            assert zero_fraction == 0.0, name


# ----------------------------------------------------------------------------------- training
def test_series_writes_checkpoints_and_manifest(series, token_data):
    out, checkpoints = series
    cfg = tiny_cfg()
    assert [c.step for c in checkpoints] == list(cfg.milestone_steps) == [5, 10, 20, 40]
    assert [c.path.name for c in checkpoints] == [f"tokens_{s * 8 * CTX}" for s in (5, 10, 20, 40)]
    for c in checkpoints:
        assert {"config.json", "model.safetensors", "tokenizer.json", CHECKPOINT_JSON} <= {p.name for p in c.path.iterdir()}
        assert (c.path / OPTIMIZER_FILE).exists() == (c is checkpoints[-1])  # only the newest keeps it
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["config"] == cfg.to_dict()
    assert manifest["data"]["fingerprint"] == token_data.fingerprint
    assert [r["tokens"] for r in manifest["checkpoints"]] == [c.tokens for c in checkpoints]
    assert load_series(out) == checkpoints
    assert torch.equal(load_heldout(out), token_data.heldout)
    assert checkpoints[-1].train_loss < checkpoints[0].train_loss - 0.3
    assert checkpoints[-1].heldout_loss < checkpoints[0].heldout_loss - 0.3
    assert checkpoints[0].heldout_loss < math.log(VOCAB) + 0.5


def test_load_model_loads_a_checkpoint(series, token_data):
    from transformers import AutoModelForCausalLM

    from workbench.models import load_model

    path = series[1][-1].path
    loaded = load_model(str(path), device="cpu")
    assert len(loaded.tokenizer) == len(token_data.tokenizer)
    rows = token_data.heldout[:2]
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        want = hf(input_ids=rows).logits
        got = loaded.model(rows)
    # the same float32 forward through the bridge's modules and through Hugging Face's: they differ by ~1e-6
    # (different kernels and summation orders); 1e-4 is far below what a wrong weight or a missing layer would do
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert loaded.model.original_model.config.hidden_act == "relu"


def test_resume_equals_uninterrupted_and_rerun_is_a_no_op(series, token_data, tmp_path):
    full_dir, full = series
    out = tmp_path / "resumed"

    class Interrupt(Exception):
        pass

    def interrupt(checkpoint):
        if checkpoint.step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_tiny_lm(tiny_cfg(), token_data, out, progress=False, on_checkpoint=interrupt)
    assert [c.step for c in load_series(out)] == [5, 10]
    (out / ".tokens_5120-crashed").mkdir()  # staging left by a crash mid-save is cleared
    resumed = train_tiny_lm(tiny_cfg(), token_data, out, progress=False)
    assert not (out / ".tokens_5120-crashed").exists()
    assert [(c.step, c.tokens, c.train_loss, c.heldout_loss) for c in resumed] == [
        (c.step, c.tokens, c.train_loss, c.heldout_loss) for c in full
    ]
    for mine, theirs in zip(resumed, full):
        a, b = load_file(str(mine.path / "model.safetensors")), load_file(str(theirs.path / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    calls = []
    again = train_tiny_lm(tiny_cfg(), token_data, out, progress=False, on_checkpoint=calls.append)
    assert again == resumed and calls == []
    with pytest.raises(SeriesError, match="another config") as err:
        train_tiny_lm(tiny_cfg(activation="silu"), token_data, out, progress=False)
    assert "\n" not in str(err.value)


def test_bf16_silu_series_trains(token_data, tmp_path):
    cfg = tiny_cfg(activation="silu", dtype="bf16", total_tokens=8 * CTX * 20, n_checkpoints=2, first_checkpoint_fraction=0.5)
    checkpoints = train_tiny_lm(cfg, token_data, tmp_path / "silu", progress=False)
    assert [c.step for c in checkpoints] == [10, 20]
    assert checkpoints[-1].train_loss < checkpoints[0].train_loss


def test_data_that_does_not_fit_the_config_is_refused(token_data, tmp_path):
    with pytest.raises(SeriesError, match="context=64"):
        train_tiny_lm(tiny_cfg(context=64), token_data, tmp_path / "x", progress=False)
    with pytest.raises(SeriesError, match="more than vocab_size"):
        train_tiny_lm(tiny_cfg(vocab_size=300), token_data, tmp_path / "y", progress=False)


# ------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("n_params", [1_000_000, 2_000_000, 3_000_000])
def test_shapes_at_fixed_params(n_params):
    ratios = [8, 16, 32, 64, 128]
    shapes = shapes_at_fixed_params(n_params, ratios, head_dim=32, tolerance=0.15)
    assert len(shapes) == len(ratios)
    for (d_model, n_layers), ratio in zip(shapes, ratios):
        assert d_model % 32 == 0 and n_layers >= 1
        assert abs(non_embedding_params(d_model, n_layers) / n_params - 1) <= 0.15
    achieved = [d / n for d, n in shapes]
    assert achieved == sorted(achieved)  # wider-and-shallower as the ratio grows
    assert abs(math.log(achieved[len(ratios) // 2] / ratios[len(ratios) // 2])) < math.log(2)


def test_shapes_at_fixed_params_example_and_errors():
    assert shapes_at_fixed_params(2_000_000, [8, 16, 32, 64, 128]) == [(96, 12), (128, 8), (160, 5), (192, 3), (256, 2)]
    with pytest.raises(SeriesError, match="ratios must be > 0"):
        shapes_at_fixed_params(2_000_000, [0])
