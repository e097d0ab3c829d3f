"""workbench.tinylm with experts: Mixtral config, CE + coef·LB objective, training, exact resume,
loading through the bridge and routing capture on the trained (learned) routers.

LB is checked against a naive re-computation of the Switch load-balancing loss from router
logits read with forward hooks, LB = (1/L) Σ_l E · Σ_e f_{l,e} · P_{l,e} (module docstring of
workbench.tinylm.train), not against transformers' function that the trainer calls.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from workbench.tinylm import (
    MANIFEST,
    SeriesError,
    TinyLMConfig,
    build_model,
    heldout_loss,
    load_balancing_loss,
    load_series,
    measure_throughput,
    moe_non_embedding_params,
    prepare_token_data,
    train_tiny_lm,
    training_loss,
)

VOCAB, CTX, E, K = 512, 32, 4, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from workbench.data import load_corpus

    corpus = load_corpus("stdlib", max_documents=40)
    return prepare_token_data(corpus, tmp_path_factory.mktemp("data") / "tokens", vocab_size=VOCAB, context=CTX, seed=0)


def moe_cfg(**kw) -> TinyLMConfig:
    base = dict(d_model=32, n_layers=2, n_experts=E, experts_per_token=K, context=CTX, vocab_size=VOCAB, batch_size=8,
                total_tokens=8 * CTX * 40, n_checkpoints=4, first_checkpoint_fraction=1 / 8, dtype="fp32", eval_rows=8, lr=3e-3)
    return TinyLMConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def moe_series(token_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("series") / "moe"
    return out, train_tiny_lm(moe_cfg(), token_data, out, progress=False)


def router_outputs(model, run) -> dict[int, tuple]:
    """Each Mixtral layer's router output (logits (n, E), weights (n, k), indices (n, k)) during ``run()``."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def naive_switch_loss(logits_per_layer: list[torch.Tensor], k: int) -> float:
    """Mean over layers of E · Σ_e f_e · P_e, f_e = the layer's top-k count of e / n, P_e = its mean softmax prob of e."""
    n_experts = logits_per_layer[0].shape[-1]
    terms = []
    for logits in logits_per_layer:  # (n, E)
        p = torch.softmax(logits.detach().float(), dim=-1)  # (n, E), as the router computes it
        chosen = p.topk(k, dim=-1).indices  # (n, k)
        f = F.one_hot(chosen, n_experts).sum(dim=(0, 1)).double() / logits.shape[0]  # (E,), sums to k
        terms.append(n_experts * float(f @ p.double().mean(dim=0)))
    return sum(terms) / len(terms)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_experts": -1}, "n_experts must be a non-negative integer"),
        ({"n_experts": 2.5}, "n_experts must be a non-negative integer"),
        ({"n_experts": True}, "n_experts must be a non-negative integer"),
        ({"n_experts": 4, "experts_per_token": 0}, r"experts_per_token must be an integer in \[1, n_experts=4\]"),
        ({"n_experts": 4, "experts_per_token": 5}, r"experts_per_token must be an integer in \[1, n_experts=4\]"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef must be a finite number >= 0"),
        ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef must be"),
        ({"router_aux_loss_coef": "0.01"}, "router_aux_loss_coef must be"),
    ],
)
def test_moe_config_errors_are_one_line(kw, match):
    with pytest.raises(SeriesError, match=match) as err:
        TinyLMConfig(**kw)
    assert "\n" not in str(err.value)


def test_wrong_config_builder_is_refused():
    with pytest.raises(SeriesError, match="use hf_config") as err:
        moe_cfg().llama_config()
    assert "\n" not in str(err.value)
    with pytest.raises(SeriesError, match="dense"):
        TinyLMConfig().mixtral_config()


def test_dense_dicts_keep_their_old_form_and_old_manifests_load():
    expert_keys = {"n_experts", "experts_per_token", "router_aux_loss_coef"}
    dense = TinyLMConfig()
    old = dense.to_dict()
    assert not expert_keys & old.keys()  # byte-for-byte the dict written before experts existed
    restored = TinyLMConfig.from_dict(json.loads(json.dumps(old)))
    assert restored == dense and (restored.n_experts, restored.experts_per_token, restored.router_aux_loss_coef) == (0, 2, 0.01)
    odd = TinyLMConfig(router_aux_loss_coef=0.5)  # a non-default value is never dropped
    assert odd.to_dict()["router_aux_loss_coef"] == 0.5 and TinyLMConfig.from_dict(odd.to_dict()) == odd
    moe = moe_cfg(router_aux_loss_coef=0.02)
    d = json.loads(json.dumps(moe.to_dict()))
    assert expert_keys <= d.keys() and TinyLMConfig.from_dict(d) == moe


def test_mixtral_config_is_the_dense_twin_with_experts():
    from transformers import MixtralForCausalLM

    cfg = moe_cfg(activation="silu", d_mlp=48, router_aux_loss_coef=0.03)
    hf = cfg.hf_config()
    dense = dataclasses.replace(cfg, n_experts=0).hf_config()
    assert (type(hf).__name__, type(dense).__name__) == ("MixtralConfig", "LlamaConfig")
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size, hf.hidden_act) == (E, K, 48, "silu")
    assert hf.router_aux_loss_coef == 0.03 and hf.output_router_logits is False and hf.router_jitter_noise == 0
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                 "rms_norm_eps", "rope_parameters", "initializer_range", "_attn_implementation"):
        assert getattr(hf, name) == getattr(dense, name), name
    model = build_model(cfg)
    assert isinstance(model, MixtralForCausalLM)


def test_param_counts_match_the_model():
    cfg = moe_cfg(d_model=64, n_layers=3, d_mlp=40)
    model = build_model(cfg)
    params = {n: p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n}
    expert = sum(v for n, v in params.items() if ".mlp.experts." in n)
    assert cfg.non_embedding_params == sum(params.values()) == moe_non_embedding_params(64, 3, 40, E, K).total
    assert cfg.active_non_embedding_params == sum(params.values()) - expert + expert * K // E
    dense = dataclasses.replace(cfg, n_experts=0)
    assert dense.active_non_embedding_params == dense.non_embedding_params


# ------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_loss_is_ce_plus_coef_times_load_balancing(token_data, dtype):
    cfg = moe_cfg(dtype=dtype, router_aux_loss_coef=0.05)
    model = build_model(cfg)
    batch = token_data.train[:4]  # (4, CTX)
    raw = {}

    def run():
        raw["loss"] = training_loss(model, batch, cfg)

    seen = router_outputs(model, run)
    loss = raw["loss"]
    assert len(seen) == cfg.n_layers
    want_lb = naive_switch_loss([seen[i][0] for i in range(cfg.n_layers)], K)
    # transformers' float32 LB (means over 4·CTX tokens) against the float64 naive sum: ulps of ~2 (rel ~1e-7 seen);
    # total = ce + 0.05·LB in float32 then differs from the float64 sum by ~1e-7 relative too
    assert float(loss.load_balancing.detach()) == pytest.approx(want_lb, rel=1e-5)
    assert abs(want_lb - K) < 0.2  # a random router is close to balanced: LB ~ k
    assert float(loss.total.detach()) == pytest.approx(float(loss.ce.detach()) + 0.05 * want_lb, rel=1e-6)
    assert float(loss.ce.detach()) == pytest.approx(heldout_loss(model, batch, cfg), rel=1e-6)  # the held-out loss is plain CE
    if dtype == "fp32":
        with torch.no_grad():
            logits = model(input_ids=batch).logits  # (4, CTX, vocab)
        plain = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        assert float(loss.ce.detach()) == pytest.approx(float(plain), rel=1e-6)

    # the auxiliary term reaches the router's gradient, and coef 0 leaves only CE
    def router_grad(c: TinyLMConfig) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        training_loss(model, batch, c).total.backward()
        return model.model.layers[0].mlp.gate.weight.grad.clone()

    off = dataclasses.replace(cfg, router_aux_loss_coef=0.0)
    assert torch.equal(training_loss(model, batch, off).total, training_loss(model, batch, off).ce)
    assert not torch.allclose(router_grad(cfg), router_grad(off), rtol=1e-3, atol=1e-7)


def test_load_balancing_is_per_layer_not_pooled():
    """Layer 0 sends every token to experts {0, 1}, layer 1 to {2, 3}: each layer is collapsed (LB_l = E), but
    pooled over layers (transformers' function on the whole tuple, the model's aux_loss) it looks balanced (= k)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    n = 64
    big = torch.tensor([20.0, 20.0, 0.0, 0.0])
    logits = (big.expand(n, E), big.flip(0).expand(n, E))  # 2 layers x (n, E)
    pooled = float(load_balancing_loss_func(logits, E, K))
    ours = float(load_balancing_loss(logits, E, K))
    assert pooled == pytest.approx(K, rel=1e-3) and ours == pytest.approx(E, rel=1e-3)
    assert ours == pytest.approx(naive_switch_loss(list(logits), K), rel=1e-6)
    uniform = torch.randn(4096, E, generator=torch.Generator().manual_seed(0)) * 1e-3
    assert float(load_balancing_loss((uniform, uniform), E, K)) == pytest.approx(K, rel=0.02)


def test_dense_training_loss_is_the_plain_ce(token_data):
    cfg = dataclasses.replace(moe_cfg(), n_experts=0)
    model = build_model(cfg)
    loss = training_loss(model, token_data.train[:4], cfg)
    assert loss.load_balancing is None and loss.total is loss.ce


def test_throughput_runs_for_moe(monkeypatch):
    """Training tokens per second of the MoE: steps × batch × context over the clock time of the timed steps
    only (warmup left out), each step the CE + LB objective, backpropagated and applied to the routers."""
    from types import SimpleNamespace

    import workbench.tinylm.train as tiny_lm

    cfg = moe_cfg(vocab_size=300, context=16, batch_size=4)
    real_build, real_loss = tiny_lm.build_model, tiny_lm.training_loss
    built, losses, reads, lb_grads = [], [], [], []

    def build(cfg_):
        model = real_build(cfg_)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}))
        return model

    def loss(model, batch, cfg_):
        losses.append(real_loss(model, batch, cfg_))
        losses[-1].load_balancing.register_hook(lb_grads.append)  # fires when the backward pass goes through LB
        return losses[-1]

    def clock():  # 2.5 s between reads; records how many steps had run at each read
        reads.append(len(losses))
        return 100.0 + 2.5 * (len(reads) - 1)

    monkeypatch.setattr(tiny_lm, "build_model", build)
    monkeypatch.setattr(tiny_lm, "training_loss", loss)
    monkeypatch.setattr(tiny_lm, "time", SimpleNamespace(perf_counter=clock))
    assert measure_throughput(cfg, steps=3, warmup=2) == pytest.approx(3 * 4 * 16 / 2.5)
    assert reads == [2, 5]  # the clock starts after the 2 warmup steps and stops after the 3 timed ones
    assert len(losses) == 5 and all(torch.isfinite(r.total) and r.total > r.ce for r in losses)
    assert len(lb_grads) == 5  # every step backpropagated CE + coef·LB, not the CE alone
    ((model, routers_before),) = built
    assert len(routers_before) == cfg.n_layers  # one router per layer, each moved by the optimiser steps
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before) for n, before in routers_before.items())


# ----------------------------------------------------------------------------------- training
def test_moe_series_trains_and_records_the_aux_loss(moe_series, token_data):
    out, checkpoints = moe_series
    cfg = moe_cfg()
    assert [c.step for c in checkpoints] == [5, 10, 20, 40]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["config"] == cfg.to_dict() and manifest["config"]["n_experts"] == E
    model = manifest["model"]
    assert (model["architecture"], model["n_experts"], model["experts_per_token"]) == ("MixtralForCausalLM", E, K)
    assert (model["non_embedding_params"] == cfg.non_embedding_params
            > model["active_non_embedding_params"] == cfg.active_non_embedding_params)
    for record in manifest["checkpoints"]:
        assert K - 0.1 < record["router_aux_loss"] < E  # between balanced (k) and collapsed (E)
    hf_config = json.loads((checkpoints[-1].path / "config.json").read_text())
    assert hf_config["model_type"] == "mixtral" and hf_config["num_local_experts"] == E and not hf_config["output_router_logits"]
    assert checkpoints[-1].train_loss < checkpoints[0].train_loss - 0.3
    assert checkpoints[-1].heldout_loss < checkpoints[0].heldout_loss - 0.3
    assert checkpoints[0].heldout_loss < math.log(VOCAB) + 0.5


def test_the_aux_loss_changes_training(moe_series, token_data, tmp_path):
    """Same seed, data and schedule with coef 0: by step 5 the weights (router and the rest) differ."""

    class Stop(Exception):
        pass

    def stop(checkpoint):
        raise Stop

    off = tmp_path / "coef0"
    with pytest.raises(Stop):
        train_tiny_lm(moe_cfg(router_aux_loss_coef=0.0), token_data, off, progress=False, on_checkpoint=stop)
    with_lb = load_file(str(moe_series[1][0].path / "model.safetensors"))
    without = load_file(str(load_series(off)[0].path / "model.safetensors"))
    assert with_lb.keys() == without.keys()
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert router in with_lb and not torch.equal(with_lb[router], without[router])
    assert not torch.equal(with_lb["model.embed_tokens.weight"], without["model.embed_tokens.weight"])


def test_moe_resume_equals_uninterrupted_and_rerun_is_a_no_op(moe_series, token_data, tmp_path):
    full_dir, full = moe_series
    out = tmp_path / "resumed"

    class Interrupt(Exception):
        pass

    def interrupt(checkpoint):
        if checkpoint.step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_tiny_lm(moe_cfg(), token_data, out, progress=False, on_checkpoint=interrupt)
    assert [c.step for c in load_series(out)] == [5, 10]
    resumed = train_tiny_lm(moe_cfg(), token_data, out, progress=False)
    assert [(c.step, c.tokens, c.train_loss, c.heldout_loss) for c in resumed] == [
        (c.step, c.tokens, c.train_loss, c.heldout_loss) for c in full
    ]
    aux = [[r["router_aux_loss"] for r in json.loads((d / MANIFEST).read_text())["checkpoints"]] for d in (out, full_dir)]
    assert aux[0] == aux[1]
    for mine, theirs in zip(resumed, full):
        a, b = load_file(str(mine.path / "model.safetensors")), load_file(str(theirs.path / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    calls = []
    assert train_tiny_lm(moe_cfg(), token_data, out, progress=False, on_checkpoint=calls.append) == resumed and calls == []
    with pytest.raises(SeriesError, match="differs in router_aux_loss_coef\\)") as err:
        train_tiny_lm(moe_cfg(router_aux_loss_coef=0.1), token_data, out, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(SeriesError, match="differs in experts_per_token, n_experts, router_aux_loss_coef\\)"):
        train_tiny_lm(dataclasses.replace(moe_cfg(), n_experts=0), token_data, out, progress=False)


def test_bf16_moe_series_trains(token_data, tmp_path):
    cfg = moe_cfg(activation="silu", dtype="bf16", total_tokens=8 * CTX * 20, n_checkpoints=2, first_checkpoint_fraction=0.5)
    checkpoints = train_tiny_lm(cfg, token_data, tmp_path / "bf16", progress=False)
    assert [c.step for c in checkpoints] == [10, 20]
    assert checkpoints[-1].train_loss < checkpoints[0].train_loss


# ------------------------------------------------------------------------- loading and routing
def test_checkpoint_loads_through_the_bridge_and_routes_as_trained(moe_series, token_data):
    from transformers import AutoModelForCausalLM

    from probes.routing import expert_source, moe_layers, recorded_routing, route_logits, router_spec
    from workbench.models import load_model

    path = moe_series[1][-1].path
    loaded = load_model(str(path), device="cpu")
    bridge = loaded.model
    assert expert_source(bridge) == "router"
    spec = router_spec(bridge)
    assert (spec.family.name, spec.n_experts, spec.k, spec.normalise) == ("mixtral", E, K, True)
    assert [m.layer for m in moe_layers(bridge)] == [0, 1]

    rows = token_data.heldout[:4]  # (4, CTX)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    want = {}
    raw = router_outputs(hf, lambda: want.__setitem__("logits", hf(input_ids=rows).logits.detach()))
    with torch.no_grad(), recorded_routing(bridge) as recorder:
        got_logits = bridge(rows)  # (4, CTX, vocab)
    # The bridge and the Hugging Face model compute the same float32 forward through different modules and kernels:
    # the logits differ by ~1e-6 (7e-7 seen), router logits by ~1e-7; 1e-4 is far below what a wrong weight would do.
    torch.testing.assert_close(got_logits, want["logits"], rtol=1e-4, atol=1e-4)
    for layer, (logits, weights, indices) in raw.items():
        got = recorder.routing(layer)
        assert got.indices.shape == (rows.numel(), K)
        # The choices may be compared exactly although the two router inputs differ by rounding: no token has its
        # k-th and (k+1)-th expert within 1e-5 of each other in probability, >100 times that rounding.
        assert torch.equal(got.indices.sort(dim=-1).values, indices.long().sort(dim=-1).values)  # the model's own choices
        ours = route_logits(spec, logits.detach())
        assert torch.equal(ours.indices, got.indices)
        # weights: float32 softmax over E = 4 and a renormalisation of k = 2, from logits ~1e-7 apart: a few ulps of <= 1
        torch.testing.assert_close(ours.weights, got.weights, atol=1e-6, rtol=1e-5)
        load = torch.bincount(got.indices.reshape(-1), minlength=E)  # (E,) token slots per expert
        assert (load > 0).sum() >= 3  # the trained router spreads tokens over the experts


# ------------------------------------------------------------------------------ the script
def test_train_tiny_moe_script_smoke_and_rerun(tmp_path):
    """benchmarks/train_tiny_moe.py on a tiny config: trains, reports balance, and a rerun only reports."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_tiny_moe.py"
    spec = importlib.util.spec_from_file_location("train_tiny_moe", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--out", str(tmp_path / "run"), "--max-documents", "40", "--tokens", str(8 * CTX * 10), "--d-model", "32",
            "--layers", "2", "--experts", str(E), "--k", str(K), "--context", str(CTX), "--vocab", str(VOCAB), "--batch", "8",
            "--checkpoints", "2", "--eval-rows", "8", "--balance-rows", "8", "--dtype", "fp32", "--no-progress"]
    lines = []
    first = module.run(module.parse_args(argv), log=lines.append)
    assert first["tokens"] == 8 * CTX * 10 and first["tokens_per_s_this_run"] > 0
    assert [b["layer"] for b in first["balance"]] == [0, 1]
    for b in first["balance"]:
        assert b["tokens"] == 8 * CTX and sum(b["share"]) == pytest.approx(1, abs=1e-3) and len(b["share"]) == E
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["heldout_loss"] == first["heldout_loss"]
    again = module.run(module.parse_args(argv), log=lines.append)
    assert again["tokens_per_s_this_run"] is None and again["heldout_loss"] == first["heldout_loss"]
    assert any(line.startswith("routing on") for line in lines)
