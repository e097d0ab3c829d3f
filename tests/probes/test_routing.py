"""Routing capture and expert masking on tiny random MoE models of every family in
``probes.routing.FAMILIES`` (transformers config classes, SmolLM2's tokenizer, 2 layers, d_model 32)."""

from pathlib import Path

import pytest
import torch

from probes.expert_masking import masked_routing
from probes.routing import (
    FAMILIES,
    RoutingError,
    check_layers,
    expert_source,
    masked_experts,
    moe_layers,
    recorded_routing,
    rerouted,
    route_logits,
    router_spec,
)

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
CONFIGS = {  # family -> (config class, model class, extra config); 4 experts, top-2 unless said otherwise
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                                      norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=32, num_experts=4,
                                                                num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                                                num_experts_per_tok=2, head_dim=16)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=16, num_local_experts=4,
                                                                     num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_group=2, topk_group=1, routed_scaling_factor=2.5)),
}
TOKENS = torch.tensor([[1, 17, 250, 3000, 42, 7, 901, 12, 5], [1, 8, 8, 8, 400, 2, 66, 19, 33]])


def save_tiny(family: str, root: Path) -> Path:
    """A randomly initialised MoE of ``family`` saved with SmolLM2's tokenizer; routers get larger random weights
    (and DeepSeek-V3 a random choice bias) so routing is far from uniform."""
    import transformers
    from transformers import AutoTokenizer

    from workbench.models import default_tokenizer_dir

    config_class, model_class, extra = CONFIGS[family]
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    path = root / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    loaded = {}

    def get(family: str):
        from workbench.models import load_model

        if family not in loaded:
            model = load_model(str(save_tiny(family, root)), device="cpu").model
            generator = torch.Generator().manual_seed(1)
            for layer in moe_layers(model):
                with torch.no_grad():
                    layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
                    if hasattr(layer.router, "e_score_correction_bias"):
                        layer.router.e_score_correction_bias.copy_(0.3 * torch.randn(4, generator=generator))
            loaded[family] = model
        return loaded[family]

    return get


def hf_router_outputs(model):
    """The Hugging Face routers' own (logits, weights, indices) per MoE layer over TOKENS."""
    raw, handles = {}, []
    for layer in moe_layers(model):
        handles.append(layer.router.register_forward_hook(lambda m, a, out, L=layer.layer: raw.setdefault(L, out)))
    try:
        with torch.no_grad():
            model(TOKENS)
    finally:
        for h in handles:
            h.remove()
    return raw


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_family_rule_reproduces_the_models_own_routing_and_capture_reads_it(tiny_moe, family):
    model = tiny_moe(family)
    spec = router_spec(model)
    assert spec.family.name == family and spec.n_experts == 4 and spec.k == 2
    assert expert_source(model) == "router"
    raw = hf_router_outputs(model)
    with torch.no_grad(), recorded_routing(model) as recorder:
        model(TOKENS)
    routers = {m.layer: m.router for m in moe_layers(model)}
    for layer, (logits, weights, indices) in raw.items():
        bias = getattr(routers[layer], "e_score_correction_bias", None)
        ours = route_logits(spec, logits, None, bias)
        got = recorder.routing(layer)
        assert got.indices.shape == (TOKENS.numel(), 2)
        assert torch.equal(ours.indices, got.indices)  # both take the top-k of the same scores of the same logits
        # the weights: the same float32 scores, normalised and scaled by transformers' code and by ours (sums of
        # at most 4 terms, a few ulps of weights <= 2.5)
        torch.testing.assert_close(ours.weights, got.weights, atol=1e-6, rtol=1e-5)
        assert set(map(tuple, got.indices.sort(-1).values.tolist())) == set(map(tuple, indices.long().sort(-1).values.tolist()))
        scores = recorder.scores(layer)  # G (n, E): weights at the selected experts, 0 elsewhere
        assert ((scores > 0).sum(-1) == 2).all()
        torch.testing.assert_close(scores.sum(-1), got.weights.sum(-1))
    if family == "deepseek_v2":  # group-limited greedy: both experts come from one group of two
        assert (got.indices // 2)[:, 0].eq((got.indices // 2)[:, 1]).all() and spec.scale == 1.5 and not spec.normalise
    if family in ("mixtral", "granitemoe", "qwen2_moe"):
        torch.testing.assert_close(got.weights.sum(-1), torch.ones(TOKENS.numel()))


def test_mixtral_rule_matches_the_dense_reference_in_probes_experts():
    spec_logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    from probes.routing import FAMILIES, RouterSpec

    spec = RouterSpec(FAMILIES["mixtral"], 8, 3, True, 1.0, 1, 1)
    for remove in ([], [2], [0, 5, 7]):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[remove] = True
        ours = route_logits(spec, spec_logits, mask)
        dense = torch.zeros(50, 8).scatter_(1, ours.indices, ours.weights)
        # two float32 implementations of softmax over 8 logits and a renormalisation: a few ulps of weights <= 1
        torch.testing.assert_close(dense, masked_routing(spec_logits, remove, 3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_masking_removes_exactly_the_chosen_experts_and_unhooks(tiny_moe, family):
    model = tiny_moe(family)
    first = check_layers(model, None)[0]
    with torch.no_grad(), recorded_routing(model, [first]) as before:
        base = model(TOKENS)
    with torch.no_grad(), masked_experts(model, {first: [0, 3]}), recorded_routing(model, [first]) as after:
        masked = model(TOKENS)
    old, new = before.routing(first), after.routing(first)
    kept = new.indices[new.weights > 0]
    assert not torch.isin(kept, torch.tensor([0, 3])).any()  # never routed to a removed expert
    assert set(kept.tolist()) == {1, 2}
    untouched = ~torch.isin(old.indices, torch.tensor([0, 3])).any(-1)  # tokens that never used 0 or 3
    if family == "mixtral":  # normalised weights: those tokens route exactly as before
        assert untouched.any()
        assert torch.equal(old.indices[untouched], new.indices[untouched])
        torch.testing.assert_close(old.weights[untouched], new.weights[untouched])
    if family == "olmoe":  # raw softmax weights grow: the removed experts' probability goes to the rest
        assert (new.weights.sum(-1) > old.weights.sum(-1) - 1e-6).all()
    assert not torch.allclose(base, masked)
    with torch.no_grad():
        again = model(TOKENS)  # the hook is gone
    torch.testing.assert_close(again, base)
    with torch.no_grad(), masked_experts(model, {first: []}):
        torch.testing.assert_close(model(TOKENS), base)


# Two forwards that route the same experts with the same weights give the same outputs only up to rounding:
# transformers' expert block groups the token slots by expert (grouped_mm), so another slot order, or extra
# zero-weight slots, changes the rows of each expert's matmul, and the CPU's kernels (MKL, oneDNN; AMX, AVX-512
# or AVX2) may sum a row's products in an order that depends on that shape. In float32 (eps 1.2e-7) each output
# logit here is a few dot products of length <= 64 deep (d_model 32, 2 layers), so such a reordering moves it by
# a few ulps of the logit scale (|logit| < 1; 1.2e-7 seen with MKL's AVX2 kernels): 1e-5 is far above that and
# far below what another k changes (some logit moves by >= 1.8e-3 for every family and k here).
OUTPUT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_rerouting_at_another_k_follows_the_family_rule_and_the_own_k_changes_nothing(tiny_moe, family):
    model = tiny_moe(family)
    spec = router_spec(model)
    first = check_layers(model, None)[0]  # later layers see changed inputs; the first sees the same logits
    raw = hf_router_outputs(model)  # the unhooked routers' logits
    routers = {m.layer: m.router for m in moe_layers(model)}
    bias = getattr(routers[first], "e_score_correction_bias", None)
    own = route_logits(spec, raw[first][0], None, bias)  # the family rule at the config's k
    with torch.no_grad():
        base = model(TOKENS)
    with torch.no_grad(), rerouted(model, k=spec.k), recorded_routing(model, [first]) as rec:
        same = model(TOKENS)
    # the routing decision is the same computation (the rule on bit-identical logits): equal to the bit
    assert torch.equal(rec.routing(first).indices, own.indices) and torch.equal(rec.routing(first).weights, own.weights)
    torch.testing.assert_close(same, base, **OUTPUT_TOL)
    allowed = spec.topk_group * (spec.n_experts // spec.n_group)  # experts the group-limited choice can reach
    for k in (1, 4):
        with torch.no_grad(), rerouted(model, k=k), recorded_routing(model) as rec:
            out = model(TOKENS)
        got = rec.routing(first)
        want = route_logits(spec._replace(k=k), raw[first][0], None, bias)
        assert got.indices.shape == (TOKENS.numel(), k)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.weights, want.weights)
        assert ((got.weights > 0).sum(-1) <= allowed).all()  # outside the kept groups: weight 0
        if spec.normalise and spec.scale == 1.0:
            torch.testing.assert_close(got.weights.sum(-1), torch.ones(TOKENS.numel()), atol=1e-5, rtol=0)
        if min(k, allowed) == spec.k:  # grouped families: no room above their k
            # the slots that carry weight are exactly the own-k routing (the extra slots hold 0, and adding an
            # exact 0 to the normalising sum changes no bit), so only the output's rounding may differ
            assert (got.weights[:, spec.k:] == 0).all()
            assert torch.equal(got.indices[:, : spec.k], own.indices) and torch.equal(got.weights[:, : spec.k], own.weights)
            torch.testing.assert_close(out, base, **OUTPUT_TOL)
        else:
            assert not torch.allclose(out, base, **OUTPUT_TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), base)  # unhooked
    with pytest.raises(RoutingError, match=r"k=5 is out of range for 4 experts; choose 1 ≤ k ≤ 4"):
        with rerouted(model, k=5):
            pass


def test_hand_built_logits_give_the_known_assignments_and_weights():
    from probes.routing import RouterSpec

    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 5.0]]).log_softmax(-1)  # softmax = normalised exp
    mixtral = RouterSpec(FAMILIES["mixtral"], 4, 2, True, 1.0, 1, 1)
    r = route_logits(mixtral, logits)
    assert r.indices.tolist() == [[0, 1], [3, 2]]
    e = torch.tensor([4.0, 2.0, 1.0, 5.0]).exp()
    torch.testing.assert_close(r.weights, torch.stack([e[[0, 1]] / e[[0, 1]].sum(), e[[3, 2]] / e[[3, 2]].sum()]))
    masked = route_logits(mixtral, logits, torch.tensor([True, False, False, False]))
    assert masked.indices[0].tolist() == [1, 2] and masked.indices[1].tolist() == [3, 2]  # only token 0 moves
    torch.testing.assert_close(masked.weights[1], r.weights[1])
    olmoe = RouterSpec(FAMILIES["olmoe"], 4, 2, False, 1.0, 1, 1)  # raw softmax weights, renormalised over the rest
    p = torch.softmax(logits[0, 1:], -1)
    torch.testing.assert_close(route_logits(olmoe, logits, torch.tensor([True, False, False, False])).weights[0], p[:2])
    v3 = RouterSpec(FAMILIES["deepseek_v3"], 4, 1, False, 2.0, 1, 1)  # the bias moves the choice, not the weight
    z = torch.tensor([[0.0, 0.1, -3.0, -3.0]])
    chosen = route_logits(v3, z, bias=torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert chosen.indices.tolist() == [[0]] and torch.allclose(chosen.weights, 2.0 * torch.sigmoid(z[:, :1]))
    assert route_logits(v3, z).indices.tolist() == [[1]]
    with pytest.raises(RoutingError, match="every expert is removed"):
        route_logits(mixtral, logits, torch.ones(4, dtype=torch.bool))


def test_bad_layers_and_experts_are_one_line_errors(tiny_moe):
    model = tiny_moe("deepseek_v3")  # layer 0 is dense (first_k_dense_replace=1)
    with pytest.raises(RoutingError, match="layer 0 of DeepseekV3ForCausalLM has no router; MoE layers: 1"):
        check_layers(model, [0])
    with pytest.raises(RoutingError, match=r"experts to remove must be in 0\.\.3"):
        with masked_experts(model, {1: [4]}):
            pass
    with pytest.raises(RoutingError, match="removing all 4 experts of layer 1"):
        with masked_experts(model, {1: [0, 1, 2, 3]}):
            pass
    with pytest.raises(RoutingError, match="layer 0 has no router"):
        with masked_experts(model, {0: [1]}):
            pass


def test_dense_models_are_moefied_and_a_model_with_neither_is_refused_by_name(tiny, tmp_path):
    import transformers
    from transformers import AutoTokenizer

    from workbench.models import default_tokenizer_dir, load_model

    assert expert_source(tiny.model) == "moefied"
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    config = transformers.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    mamba = load_model(str(tmp_path), device="cpu").model  # blocks with a mixer, no MLP and no router
    with pytest.raises(RoutingError) as err:
        expert_source(mamba)
    message = str(err.value)
    assert message.startswith("MambaForCausalLM has no MoE router layers") and "no dense MLP to MoEfy" in message
    assert "\n" not in message and all(name in message for name in FAMILIES)


def test_a_moe_family_without_a_routing_rule_is_refused_by_name(tiny_moe, monkeypatch):
    model = tiny_moe("olmoe")
    monkeypatch.delitem(FAMILIES, "olmoe")
    with pytest.raises(RoutingError, match="OlmoeForCausalLM \\(model_type 'olmoe'\\) has MoE layers but no routing rule"):
        expert_source(model)
