"""Code steering (docs/algorithms.md §2, §7): the two code modes against a naive reference, and the
Jensen–Shannon divergence of the next-token distribution that forcing a code causes (tiny model)."""

import math

import pytest
import torch
import torch.nn.functional as F

import saes
from workbench import steering
from workbench.hooks import attached
from workbench.steering import SteeringSpec, js_divergence, kl_divergence, measure, resolve_spec

H0 = "blocks.0.hook_resid_post"
PROMPT = "The weather today is very nice and the sun"
NEUTRAL = ["Some neutral words about nothing in particular.", "A second, equally plain sentence."]
K = 3


def _codebook_dir(tmp_path_factory, combine: str) -> str:
    torch.manual_seed(0)
    cb = saes.build(saes.SAEConfig(d_in=64, width=16, k=K, arch="codebook", codebook_combine=combine)).eval()
    with torch.no_grad():
        cb.input_scale.fill_(2.0)  # a non-trivial input scale, so decode's 1/c is exercised
    return str(saes.save_sae(cb, tmp_path_factory.mktemp("codebook") / combine))


@pytest.fixture(scope="module", params=["sum", "mean"])
def codebook(request, tmp_path_factory):
    path = _codebook_dir(tmp_path_factory, request.param)
    return path, saes.load_sae(path)


def residual(model, tokens):
    probe = {}
    with torch.inference_mode(), attached(model, [(H0, lambda a, hook=None: probe.__setitem__("x", a[0].clone()))]):
        model(tokens)
    return probe["x"]  # (L, d)


def steered_residual(model, tokens, spec):
    """The activation at H0 after the spec's interventions there."""
    seen = {}
    hooks = [(H0, r.fn) for r in resolve_spec(model, spec)]
    hooks.append((H0, lambda a, hook=None: seen.__setitem__("after", a[0].clone())))
    with torch.inference_mode(), attached(model, hooks):
        model(tokens)
    return seen["after"]


def selection(cb, x):
    """Naive reference: the codebook's selected codes and the lowest-scoring one per position."""
    z = cb.encode(x)  # (L, N): weight b on the k selected codes
    scores = F.layer_norm(x * cb.input_scale, (64,)) @ F.normalize(cb.codebook, dim=1).T  # (L, N)
    lowest = scores.masked_fill(z == 0, float("inf")).argmin(dim=1)  # (L,)
    return z, lowest


# -- the two modes ---------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 2.5])
def test_replace_all_leaves_only_the_forced_code(tiny, codebook, strength):
    path, cb = codebook
    model, tokens = tiny.model, tiny.model.to_tokens(PROMPT)
    x = residual(model, tokens)
    z, _ = selection(cb, x)
    code = 5
    after = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=code, method="code",
                                                                  strength=strength, code_mode="replace_all"))
    # every one of the k slots holds the code: x̂' = k·b·s·C_i / c, b = 1 (sum) or 1/k (mean)
    b = 1.0 if cb.cfg.codebook_combine == "sum" else 1.0 / K
    z_ref = torch.zeros_like(z)
    z_ref[:, code] = K * b * strength
    expected = x - cb.decode(z) + cb.decode(z_ref)  # x̂(z') + (x − x̂(z))
    # the hook and this reference add the same float32 vectors (entries below ~1) in other orders: ulps, below 1e-5
    assert torch.allclose(after, expected, atol=1e-5)
    assert torch.allclose(after - (x - cb.decode(z)), (K * b * strength) * cb.codebook[code] / cb.input_scale, atol=1e-5)
    (r,) = resolve_spec(model, SteeringSpec.single(hook=H0, source=path, index=code, method="code", strength=strength,
                                                   code_mode="replace_all"))
    assert r.amount == pytest.approx(K * b * strength) == steering.code_weight(cb, strength, "replace_all")


def test_replace_lowest_swaps_the_lowest_scoring_code(tiny, codebook):
    path, cb = codebook
    model, tokens = tiny.model, tiny.model.to_tokens(PROMPT)
    x = residual(model, tokens)
    z, lowest = selection(cb, x)
    code = int((z.sum(0) == 0).nonzero()[0])  # never selected on this prompt
    after = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=code, method="code"))
    b = 1.0 if cb.cfg.codebook_combine == "sum" else 1.0 / K
    z_ref = z.clone()
    z_ref[torch.arange(z.shape[0]), lowest] = 0
    z_ref[:, code] = b
    assert torch.allclose(after, x - cb.decode(z) + cb.decode(z_ref), atol=1e-5)
    default = SteeringSpec.single(hook=H0, source=path, index=code, method="code")
    assert default.interventions[0].code_mode == "replace_lowest"  # the default is unchanged


def test_the_two_modes_differ_and_agree_where_they_should(tiny, codebook):
    """With k = 1 there is only one slot, so both modes are the same intervention; with k = 3 they differ."""
    path, cb = codebook
    model, tokens = tiny.model, tiny.model.to_tokens(PROMPT)
    low = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=5, method="code"))
    every = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=5, method="code", code_mode="replace_all"))
    assert (low - every).abs().max() > 1e-3


def test_with_one_code_per_position_the_modes_coincide(tiny, tmp_path):
    torch.manual_seed(1)
    cb = saes.build(saes.SAEConfig(d_in=64, width=16, k=1, arch="codebook")).eval()
    path = str(saes.save_sae(cb, tmp_path / "k1"))
    model, tokens = tiny.model, tiny.model.to_tokens(PROMPT)
    x = residual(model, tokens)
    code = int((cb.encode(x).sum(0) == 0).nonzero()[0])  # not selected anywhere: both modes swap the one code
    low = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=code, method="code"))
    every = steered_residual(model, tokens, SteeringSpec.single(hook=H0, source=path, index=code, method="code", code_mode="replace_all"))
    assert torch.allclose(low, every, atol=1e-6)


# -- Jensen–Shannon divergence -------------------------------------------------------------------
def test_js_divergence_reference_values():
    torch.manual_seed(0)
    logp = torch.randn(5, 50).log_softmax(-1)
    logq = torch.randn(5, 50).log_softmax(-1)
    assert torch.all(js_divergence(logp, logp) == 0)  # a distribution with itself
    assert torch.allclose(js_divergence(logp, logq), js_divergence(logq, logp), atol=1e-7)  # symmetric
    p, q = logp.exp(), logq.exp()
    m = (p + q) / 2
    naive = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(js_divergence(logp, logq), naive, atol=1e-6)  # float32 sums of 50 small terms, other order: ~1e-8 apart
    disjoint = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])  # p = (1, 0), q = (0, 1)
    assert js_divergence(disjoint[:1], disjoint[1:]).item() == pytest.approx(math.log(2))  # the upper bound
    assert torch.allclose(kl_divergence(logp, logp), torch.zeros(5), atol=1e-7)


@pytest.mark.parametrize("mode", ["replace_lowest", "replace_all"])
def test_forcing_a_code_changes_the_next_token_distribution(tiny, codebook, mode):
    path, _ = codebook
    spec = SteeringSpec.single(hook=H0, source=path, index=5, method="code", code_mode=mode)
    effect = measure(tiny, spec, [PROMPT], NEUTRAL)
    assert 1e-4 < effect["js_neutral"] <= math.log(2)
    assert effect["kl_neutral"] > 0 and effect["interventions"][0]["code_mode"] == mode


def test_js_of_the_baseline_with_itself_is_zero(tiny, codebook):
    path, _ = codebook
    nothing = measure(tiny, SteeringSpec(), [PROMPT], NEUTRAL)  # no intervention: the baseline against itself
    assert nothing["js_neutral"] == 0.0 and abs(nothing["kl_neutral"]) < 1e-7
    zero = measure(tiny, SteeringSpec.single(hook=H0, source=path, index=5, method="code", strength=0.0,
                                           code_mode="replace_all"), [PROMPT], NEUTRAL)
    assert zero["js_neutral"] > 0  # strength 0 in replace_all still removes the selected codes


def test_cli_report_names_the_code_mode(codebook):
    path, _ = codebook
    iv = SteeringSpec.single(hook=H0, source=path, index=5, method="code", code_mode="replace_all").interventions[0]
    assert "code 5" in iv.describe() and "replace_all" in iv.describe()
