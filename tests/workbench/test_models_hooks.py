import time

import pytest
import torch

from workbench.hooks import HookError, attached, hook_shapes, layer_of, stop_layer, validate_hooks
from workbench.models import ModelError, load_model, tiny_llama_dir


def test_tiny_llama_is_deterministic_by_seed(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def weights(cache):
        monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
        return load_file(tiny_llama_dir(seed=0) / "model.safetensors")

    first, second = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "c"))
    other = load_file(tiny_llama_dir(seed=1) / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_hook_shapes_list_residual_and_mlp(tiny):
    shapes = hook_shapes(tiny.model)
    assert shapes["blocks.1.hook_resid_post"] == "[batch, pos, 64]"
    assert shapes["blocks.0.mlp.hook_post"] == "[batch, pos, 192]"
    assert shapes["blocks.0.attn.hook_pattern"] == "[batch, 4, pos, pos]"


def test_unknown_hook_names_the_closest(tiny):
    with pytest.raises(HookError) as err:
        validate_hooks(tiny.model, ["blocks.1.hook_resid_pots"])
    message = str(err.value)
    assert "\n" not in message and "blocks.1.hook_resid_post" in message


def test_unknown_model_is_one_line_error():
    with pytest.raises(ModelError) as err:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value) and "tiny-llama" in str(err.value)


def test_stop_layer_covers_the_deepest_hook():
    assert layer_of("blocks.12.mlp.hook_post") == 12 and layer_of("ln_final.hook_out") is None
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.3.hook_resid_pre"], n_layers=30) == 4
    assert stop_layer(["blocks.29.hook_resid_post"], n_layers=30) is None
    assert stop_layer(["ln_final.hook_out"], n_layers=30) is None


def test_attached_removes_hooks_even_when_the_body_raises(tiny):
    calls = []
    point = tiny.model.hook_dict["blocks.0.hook_resid_post"]
    with pytest.raises(RuntimeError):
        with attached(tiny.model, [("blocks.0.hook_resid_post", lambda x, hook: calls.append(1))]):
            assert len(point.fwd_hooks) == 1
            raise RuntimeError("boom")
    assert len(point.fwd_hooks) == 0
    tiny.model(torch.zeros(1, 3, dtype=torch.long))
    assert calls == []


def test_nested_blocks_on_one_hook_point_keep_each_others_hooks(tiny):
    calls = []
    name = "blocks.0.hook_resid_post"
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with attached(tiny.model, [(name, lambda x, hook: calls.append("outer"))]):
        with attached(tiny.model, [(name, lambda x, hook: calls.append("inner"))]):
            tiny.model(tokens)
        tiny.model(tokens)  # the inner block is gone, the outer hook must still run
    tiny.model(tokens)
    assert calls == ["outer", "inner", "outer"]
    assert tiny.model.hook_dict[name].fwd_hooks == []


@pytest.mark.slow
def test_default_model_loads_warm_and_predicts(smollm2):
    model, tokenizer, _ = smollm2
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (30, 576, 49152)
    start = time.perf_counter()
    load_model("smollm2-135m", device="cpu")
    assert time.perf_counter() - start < 5.0  # ≤ 2 s on an idle machine; benchmarks/bench_cache.py measures it
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        top = model(ids)[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(t)) for t in top]


def test_a_forward_needing_only_the_last_block_ends_there(tiny):
    """``end_after``: hooks in the last block end the forward at its output, so the final norm and
    the unembedding never run, and the captured activations are those of the full forward."""
    from workbench.hooks import Capture, attached, end_after

    hooks = ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    tokens = torch.randint(0, 1000, (2, 9))
    calls = []
    later = [("ln_final.hook_in", lambda x, hook: calls.append(1)), ("unembed.hook_out", lambda x, hook: calls.append(2))]
    full, short = Capture(hooks), Capture(hooks)
    with torch.inference_mode():
        with attached(tiny.model, full.hooks() + later):
            tiny.model(tokens)
        assert calls == [1, 2]
        calls.clear()
        ends = end_after(tiny.model, hooks)
        assert [name for name, _ in ends] == ["blocks.1.hook_resid_post"]
        with attached(tiny.model, short.hooks() + ends + later):
            tiny.model(tokens)
    assert calls == []  # nothing after the last block ran
    for hook in hooks:
        assert torch.equal(short.latest[hook], full.latest[hook])  # the same computation up to there
    assert end_after(tiny.model, ["blocks.0.hook_resid_post"]) == []  # stop_at_layer covers earlier blocks
    assert end_after(tiny.model, ["ln_final.hook_normalized"]) == []
