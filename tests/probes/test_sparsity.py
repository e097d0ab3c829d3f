"""CETT, the threshold and PPL-p% searches, and truncated forwards against direct computations."""

import math

import pytest
import torch

from probes.cett import LayerThresholdSearch, cett
from probes.neurons import NeuronSiteError, mlp_sites
from probes.sparsity import RULES, ZERO, Evaluation, SparsityError, bisect_knob, calibrate, evaluate, measure


def direct_cett(acts: torch.Tensor, w_out: torch.Tensor, eps: float) -> torch.Tensor:
    """Loop over tokens and neurons: ‖Σ_{‖n_i‖<ε} n_i‖ / ‖Σ_i n_i‖."""
    out = []
    for a in acts:
        neurons = [w_out[:, i] * a[i] for i in range(a.numel())]  # each (d_model,)
        dropped = sum((n for n in neurons if n.norm() < eps), torch.zeros(w_out.shape[0]))
        out.append(dropped.norm() / sum(neurons).norm())
    return torch.stack(out)


def test_cett_of_a_hand_built_layer_matches_the_direct_sum():
    torch.manual_seed(0)
    acts, w_out = torch.randn(6, 9), torch.randn(4, 9)
    for eps in (0.0, 0.3, 1.0, 2.5, 100.0):
        # a matmul against a Python loop of float32 sums over 9 neurons (ratios <= 1): a few ulps apart
        torch.testing.assert_close(cett(acts, w_out, eps), direct_cett(acts, w_out, eps), rtol=1e-5, atol=1e-6)
    assert cett(acts, w_out, 0.0).abs().max() == 0  # nothing dropped
    torch.testing.assert_close(cett(acts, w_out, 1e9), torch.ones(6))  # everything dropped


def test_threshold_search_returns_the_largest_grid_value_within_the_target():
    torch.manual_seed(1)
    acts, w_out = torch.randn(64, 32) * torch.rand(32) * 3, torch.randn(8, 32)
    search = LayerThresholdSearch(acts, w_out, grid_size=256)
    for target in (0.005, 0.05, 0.2, 0.6, 0.95):
        eps = search.threshold(target)
        index = search.grid.index(eps)
        assert cett(acts, w_out, eps).mean().item() <= target + 1e-6
        assert search.mean_cett(index) == pytest.approx(cett(acts, w_out, eps).mean().item(), abs=1e-6)
        if index + 1 < len(search.grid):
            assert search.mean_cett(index + 1) > target  # one grid step further breaks the target
    before = search.evaluations()
    search.threshold(0.2)
    assert search.evaluations() == before  # memoised: a repeated target costs nothing


def test_threshold_search_extremes():
    acts, w_out = torch.randn(16, 8), torch.randn(4, 8)
    search = LayerThresholdSearch(acts, w_out, grid_size=64)
    assert cett(acts, w_out, search.threshold(0.0)).max() == 0  # drops nothing
    assert search.threshold(1.0) == search.grid[-1]  # above every norm: all dropped, CETT = 1


def fake(ppl: float) -> Evaluation:
    return Evaluation(ppl, [1.0], [0.0])


@pytest.mark.parametrize("tolerance", [1e-3, 1e-2])
def test_knob_bisection_meets_its_tolerance(tolerance):
    truth = 0.3712  # ppl(κ) = 100·(1 + κ²) crosses the goal here
    goal = 100 * (1 + truth**2)
    result = bisect_knob(lambda k: fake(100 * (1 + k**2)), goal, tolerance)
    assert result.evaluation.ppl <= goal
    assert result.knob <= truth < result.knob + tolerance
    failing = [k for k, e in result.tried.items() if e.ppl > goal]
    assert min(failing) - result.knob <= tolerance  # the bracket closed within the tolerance
    assert len(result.tried) <= math.ceil(math.log2(1 / tolerance)) + 7  # growth from 1/32, then bisection


def test_knob_search_spends_few_passes_on_small_knobs():
    truth = 0.013
    result = bisect_knob(lambda k: fake(100 * (1 + k)), 100 * (1 + truth))
    assert result.knob <= truth < result.knob + 1e-3
    assert len(result.tried) <= 7  # 0, 1/32, then 5 halvings of [0, 1/32]; bisecting [0, 1] takes 11


def test_knob_bisection_takes_all_of_the_range_when_it_never_hurts():
    assert bisect_knob(lambda k: fake(10.0), goal_ppl=10.0).knob == 1.0


@pytest.fixture(scope="module")
def held_out(tiny):
    torch.manual_seed(0)
    return torch.randint(0, 2000, (4, 24))


def test_truncation_at_zero_reproduces_the_dense_loss_exactly(tiny, held_out):
    sites = mlp_sites(tiny.model)
    dense = evaluate(tiny.model, sites, held_out)
    cal = calibrate(tiny.model, sites, held_out, n_tokens=64)
    for name, rule in RULES.items():
        truncated = evaluate(tiny.model, sites, held_out, rule(cal, 0.0))
        assert truncated.ppl == dense.ppl, name
        assert truncated.layer_ratios == [1.0] * len(sites), name


def manual_truncated_ppl(model, tokens, thresholds) -> tuple[float, list[float]]:
    """Zero neurons with |a_i|·‖W_out[:, i]‖ < ε_l on the Hugging Face down_proj inputs directly."""
    hf = model.original_model
    kept, handles = [], []
    for layer, block in enumerate(hf.model.layers):
        proj = block.mlp.down_proj
        norms = proj.weight.norm(dim=0)

        def pre(module, inputs, eps=thresholds[layer], norms=norms):
            (a,) = inputs
            keep = (a.abs() * norms >= eps)
            keep[:, 0] = True  # BOS untouched
            kept.append(keep[:, 1:].float().mean().item())
            return (a * keep,)

        handles.append(proj.register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            logits = hf(tokens).logits[:, :-1].float()
    finally:
        for h in handles:
            h.remove()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
    return math.exp(loss.item()), kept


def test_truncated_forward_equals_zeroing_neurons_in_the_hf_model(tiny, held_out):
    sites = mlp_sites(tiny.model)
    cal = calibrate(tiny.model, sites, held_out, n_tokens=64)
    truncation = RULES["cett"](cal, 0.3)
    assert all(t > 0 for t in truncation.thresholds)
    ours = evaluate(tiny.model, sites, held_out, truncation, batch_size=len(held_out))
    ppl, kept = manual_truncated_ppl(tiny.model, held_out, truncation.thresholds)
    # ppl = exp(mean CE): the two float32 means of CE (~11) over 92 tokens, summed in other orders, differ by ~1e-6,
    # which exp turns into a relative ~1e-6 (4e-8 seen); rel 1e-4 leaves room for any kernel.
    assert ours.ppl == pytest.approx(ppl, rel=1e-4)
    # The keep decisions are the same computation on both sides (the bridge hook sees the tensor the HF module gets,
    # bit for bit, and both take |a|·‖W_out[:, i]‖ with the same ops), so they agree exactly even for a neuron within
    # an ulp of ε (layer 0 has one); one flip would move a ratio by 1/(92·192) ≈ 6e-5. abs 1e-6 only absorbs the
    # float32 mean that turns the kept flags into a fraction.
    assert ours.layer_ratios == pytest.approx(kept, abs=1e-6)
    assert all(r < 1 for r in ours.layer_ratios)


def test_topk_rule_keeps_exactly_k_per_token(tiny, held_out):
    sites = mlp_sites(tiny.model)
    cal = calibrate(tiny.model, sites, held_out, n_tokens=64)
    truncation = RULES["topk"](cal, 0.75)
    d_mlp = sites[0].column_norms.numel()
    assert truncation.thresholds == [math.ceil(0.25 * d_mlp)] * len(sites)
    result = evaluate(tiny.model, sites, held_out, truncation)
    assert result.layer_ratios == pytest.approx([math.ceil(0.25 * d_mlp) / d_mlp] * len(sites))


def test_fat_rule_drops_about_the_requested_fraction(tiny, held_out):
    sites = mlp_sites(tiny.model)
    cal = calibrate(tiny.model, sites, held_out, n_tokens=10_000)  # the whole held-out sample
    result = evaluate(tiny.model, sites, held_out, RULES["fat"](cal, 0.4))
    assert result.activation_ratio == pytest.approx(0.6, abs=0.02)


def test_measure_reports_every_metric_and_meets_the_goal(tiny, held_out):
    results = measure(tiny.model, held_out, metrics=["cett", "topk", ZERO], ps=[1.0, 5.0], calibration_tokens=64,
                      progress=False)
    assert [(m.metric, m.p) for m in results] == [(ZERO, None), ("cett", 1.0), ("cett", 5.0), ("topk", 1.0), ("topk", 5.0)]
    for m in results:
        assert len(m.layer_ratios) == 2 and all(0 <= r <= 1 for r in m.layer_ratios)
        if m.p is not None:
            assert m.ppl <= (1 + m.p / 100) * m.ppl_dense
            assert [k for k, _, _ in m.curve] == sorted(k for k, _, _ in m.curve)
    assert results[0].layer_ratios == [1.0, 1.0]  # SiLU: no exact zeros


def test_bad_requests_are_one_line_errors(tiny, held_out):
    with pytest.raises(SparsityError, match="p must be a positive"):
        measure(tiny.model, held_out, ps=[0.0])
    with pytest.raises(SparsityError, match="p must be a positive"):
        measure(tiny.model, held_out, ps=[float("nan")])
    with pytest.raises(SparsityError, match="unknown sparsity metric 'l1'; valid: cett, topk, fat, zero"):
        measure(tiny.model, held_out, metrics=["l1"])
    with pytest.raises(SparsityError, match="rows, ctx"):
        measure(tiny.model, held_out[:, :1])


def test_a_model_without_dense_mlp_neurons_is_refused_by_architecture(tmp_path):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from workbench.models import default_tokenizer_dir, load_model

    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=64)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    moe = load_model(str(tmp_path), device="cpu")
    with pytest.raises(NeuronSiteError, match="MixtralForCausalLM has no per-neuron MLP activations") as err:
        mlp_sites(moe.model)
    assert "\n" not in str(err.value)
