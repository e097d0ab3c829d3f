"""Steering (docs/algorithms.md §7) on the tiny model: spec, hooks, clamp/ablate/code, KV-cache generation,
measurement, feature units and the `workbench steer` command."""

import json

import pytest
import torch

import saes
from workbench import steering
from workbench.cli import main
from workbench.hooks import attached
from workbench.steering import Intervention, SteeringError, SteeringSpec, feature_scale_stats, measure, resolve_spec, steer, sweep
from workbench.workspace import Workspace

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
PROMPT = "The weather today is very nice and the sun"


# -- fixtures --------------------------------------------------------------------------------
def _topk_sae(seed: int, width: int = 128, k: int = 4):
    torch.manual_seed(seed)
    return saes.build(saes.SAEConfig(d_in=64, width=width, k=k)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    """An untrained TopK SAE (d 64, width 128, k 4) saved in SAELens layout."""
    return str(saes.save_sae(_topk_sae(0), tmp_path_factory.mktemp("sae") / "topk"))


@pytest.fixture(scope="module")
def const_sae_dir(tmp_path_factory):
    """TopK SAE whose latent CONST is 10 at every position (zero encoder column, bias 10, always in
    the top k) while its reconstruction is far from x: clamp must rely on the error term."""
    sae = _topk_sae(1, width=32)
    with torch.no_grad():
        sae.W_enc[:, CONST] = 0
        sae.b_enc[CONST] = 10.0
    return str(saes.save_sae(sae, tmp_path_factory.mktemp("sae") / "const"))


CONST = 7


@pytest.fixture(scope="module")
def ws_db(tmp_path_factory):
    """A workspace with 4,096 cached tokens of tiny-llama at H0 and a TopK SAE 'steer-topk' trained on them."""
    db = tmp_path_factory.mktemp("steer") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", H0, "--tokens", "4096", "--ctx", "64", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", H0, "--arch", "topk", "--width", "128", "--k", "4", "--tokens", "8192",
                 "--batch-size", "512", "--warmup-steps", "2", "--no-downstream", "--name", "steer-topk"]) == 0
    return db


def tokens_of(tiny, text=PROMPT):
    return tiny.model.to_tokens(text)


def logits(model, tokens, hooks=()):
    with torch.inference_mode(), attached(model, list(hooks)):
        return model(tokens)[0].float()


def around(model, spec, tokens, hook):
    """Activation at ``hook`` before and after the spec's interventions there, plus the logits."""
    seen = {}
    fns = [r.fn for r in resolve_spec(model, spec)]
    hooks = [(hook, lambda a, hook=None: seen.__setitem__("before", a[0].clone()))]
    hooks += [(hook, fn) for fn in fns]
    hooks += [(hook, lambda a, hook=None: seen.__setitem__("after", a[0].clone()))]
    out = logits(model, tokens, hooks)
    return seen["before"], seen["after"], out


# -- the spec --------------------------------------------------------------------------------
def test_spec_json_round_trip(tmp_path, sae_dir):
    spec = SteeringSpec((
        Intervention(hook=H0, source=sae_dir, index=3, method="add", strength=2.5, unit="feature_max"),
        Intervention(hook=H0, source=sae_dir, index=3, method="add", strength=-1.0),
        Intervention(hook=H1, vector=tuple(float(i) for i in range(64)), strength=0.5),
        Intervention(hook=H0, source=sae_dir, index=9, method="clamp", strength=4.0),
        Intervention(hook=H0, source=sae_dir, index=11, method="ablate"),
        Intervention(hook=H0, source="some-codebook", index=2, method="code"),
        Intervention(hook=H0, source="some-codebook", index=5, method="code", strength=2.0, code_mode="replace_all"),
    ))
    again = SteeringSpec.from_json(spec.to_json())
    assert again == spec
    assert SteeringSpec.load(spec.save(tmp_path / "spec.json")) == spec
    units = [iv["unit"] for iv in json.loads(spec.to_json())["interventions"]]
    assert units == ["feature_max", "feature_p99", "raw", "raw", "raw", "raw", "raw"]  # the unit is written in the spec
    assert again.interventions[4].strength == 0.0  # ablate = clamp to 0
    modes = [iv.get("code_mode") for iv in json.loads(spec.to_json())["interventions"]]
    assert modes == [None] * 5 + ["replace_lowest", "replace_all"]  # written for codes only, default explicit


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"interventions": [{"source": "s", "index": 1, "method": "boost"}]}', "unknown steering method 'boost'"),
        ('{"interventions": [', "malformed steering spec JSON"),
        ("[1, 2", "malformed steering spec JSON"),
        ('{"interventions": [{"source": "s", "index": 1, "strength": NaN}]}', "strength must be a finite number within ±10000"),
        ('{"interventions": [{"source": "s", "index": 1, "strength": Infinity}]}', "strength must be a finite number within ±10000"),
        ('{"interventions": [{"source": "s", "index": 1, "strength": 1e30}]}', "strength must be a finite number within ±10000"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="nested-100k-deep"),
        ('{"interventions": [{"source": "s", "index": 1, "strength": "2"}]}', "strength must be a number"),
        ('{"interventions": [{"source": "s", "index": 1, "colour": "red"}]}', "unknown intervention field(s) colour"),
        ('{"interventions": [{"source": "s", "index": -1}]}', "non-negative integer"),
        ('{"interventions": [{"source": "s", "index": 1, "unit": "sigma"}]}', "unknown strength unit 'sigma'"),
        ('{"interventions": [{"source": "s", "index": 1, "method": "ablate", "unit": "feature_max"}]}', "use unit 'raw'"),
        ('{"interventions": [{"method": "add"}]}', "needs an SAE"),
        ('{"version": 7, "interventions": []}', "version 7"),
        ('"add"', "is a JSON object"),
        ('{"interventions": [{"source": "s", "index": 1, "method": "code", "code_mode": "some"}]}', "unknown code_mode 'some'"),
        ('{"interventions": [{"source": "s", "index": 1, "method": "add", "code_mode": "replace_all"}]}',
         "code_mode applies to method 'code' only"),
        ('{"interventions": [{"source": "s", "index": 1, "method": "code", "code_mode": 3}]}', "must be a string"),
    ],
)
def test_bad_spec_is_one_line_steering_error(text, expected):
    with pytest.raises(SteeringError) as err:
        SteeringSpec.from_json(text)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_inputs_against_the_model(tiny, sae_dir):
    cases = [
        (dict(hook=H0, source=sae_dir, index=128, unit="raw"), "feature 128 out of range"),
        (dict(hook="blocks.0.hook_resid_pst", source=sae_dir, index=1, unit="raw"), "closest: blocks.0.hook_resid_post"),
        (dict(hook=H0, source=sae_dir, index=1), "needs a workspace"),  # feature_p99 default, no workspace
        (dict(hook=H0, source=sae_dir, index=1, method="code"), "needs a codebook"),
        (dict(hook=H0, source="/no/such/sae", index=1, unit="raw"), "not a folder with cfg.json"),
        (dict(hook=H0, vector=(1.0, 2.0)), "vector has 2 dimensions"),
    ]
    for fields, expected in cases:
        with pytest.raises(SteeringError) as err:
            with steer(tiny.model, SteeringSpec.single(**fields)):
                pytest.fail("entered a steering context with a bad spec")
        assert expected in str(err.value) and "\n" not in str(err.value), (fields, str(err.value))
        assert all(not tiny.model.hook_dict[h].fwd_hooks for h in (H0, H1))


# -- hooks -----------------------------------------------------------------------------------
def test_hooks_are_removed_after_the_block_and_when_it_raises(tiny, sae_dir):
    model, tokens = tiny.model, tokens_of(tiny)
    spec = SteeringSpec((Intervention(hook=H0, source=sae_dir, index=3, strength=0.5, unit="raw"),
                         Intervention(hook=H1, source=sae_dir, index=5, method="clamp", strength=1.0)))
    clean = logits(model, tokens)
    with steer(model, spec):
        assert len(model.hook_dict[H0].fwd_hooks) == 1 and len(model.hook_dict[H1].fwd_hooks) == 1
        steered = logits(model, tokens)
    assert not (steered - clean).abs().max() < 1e-3  # it did steer
    assert not model.hook_dict[H0].fwd_hooks and not model.hook_dict[H1].fwd_hooks
    assert torch.equal(logits(model, tokens), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, spec):
            raise RuntimeError("boom")
    assert not model.hook_dict[H0].fwd_hooks and not model.hook_dict[H1].fwd_hooks
    assert torch.equal(logits(model, tokens), clean)


def test_clamp_to_the_current_value_leaves_the_output_unchanged(tiny, const_sae_dir):
    """z_CONST = 10 at every position, so clamping it to 10 must change nothing — although x̂ is
    nowhere near x (the SAE is untrained and latent CONST alone has norm 10 ≫ |x| ≈ 0.2)."""
    model, tokens = tiny.model, tokens_of(tiny)
    sae = saes.load_sae(const_sae_dir)
    before, after, out = around(model, SteeringSpec.single(hook=H0, source=const_sae_dir, index=CONST, method="clamp", strength=10.0),
                                tokens, H0)
    z = sae.encode(before)
    assert torch.allclose(z[:, CONST], torch.full_like(z[:, CONST], 10.0))  # the premise
    assert (before - sae.decode(z)).norm(dim=-1).min() > 5 * before.norm(dim=-1).max()  # a large error term
    # the hook returns x̂ + (x − x̂): in float32 that is x only up to an ulp of |x̂| (<= 5e-7, x̂ ≫ x), and elementwise
    # float ops round the same on every CPU; through the two layers that moves the logits by far less than 1e-4
    assert (after - before).abs().max() < 1e-5
    assert torch.allclose(out, logits(model, tokens), atol=1e-4)


def test_clamp_changes_the_activation_only_along_the_decoder_direction(tiny, const_sae_dir):
    model, tokens = tiny.model, tokens_of(tiny)
    sae = saes.load_sae(const_sae_dir)
    before, after, _ = around(model, SteeringSpec.single(hook=H0, source=const_sae_dir, index=CONST, method="clamp", strength=10.5),
                              tokens, H0)
    expected = before + 0.5 * sae.W_dec[CONST] / sae.input_scale  # (10.5 − 10) · decoder row
    # the hook computes x̂' + (x − x̂), the reference x + 0.5·d: equal up to float32 ulps of |x̂| (<= 5e-7): atol 1e-5
    assert torch.allclose(after, expected, atol=1e-5)
    # and a reference clamp written out naively: encode, set, decode, add x − x̂
    _, after_any, _ = around(model, SteeringSpec.single(hook=H0, source=const_sae_dir, index=3, method="clamp", strength=0.7), tokens, H0)
    z = sae.encode(before)
    z_set = z.clone()
    z_set[:, 3] = 0.7
    assert torch.allclose(after_any, sae.decode(z_set) + (before - sae.decode(z)), atol=1e-5)


def test_ablating_a_silent_feature_is_a_no_op(tiny, sae_dir):
    model, tokens = tiny.model, tokens_of(tiny)
    sae = saes.load_sae(sae_dir)
    probe = {}
    logits(model, tokens, [(H0, lambda a, hook=None: probe.__setitem__("x", a[0].clone()))])
    fired = (sae.encode(probe["x"]) > 0).any(dim=0)  # (width,)
    silent, active = int((~fired).nonzero()[0]), int(fired.nonzero()[0])
    before, after, out = around(model, SteeringSpec.single(hook=H0, source=sae_dir, index=silent, method="ablate"), tokens, H0)
    assert (after - before).abs().max() < 1e-6  # x̂ + (x − x̂) with x̂ unchanged: x up to an ulp of |x̂|
    assert torch.allclose(out, logits(model, tokens), atol=1e-5)
    before, after, _ = around(model, SteeringSpec.single(hook=H0, source=sae_dir, index=active, method="ablate"), tokens, H0)
    assert (after - before).abs().max() > 1e-3  # ablating a feature that fires does change x


def test_code_forces_a_codebook_code_in_place_of_the_lowest_scoring_one(tiny, tmp_path):
    torch.manual_seed(0)
    cb = saes.build(saes.SAEConfig(d_in=64, width=16, k=3, arch="codebook")).eval()
    path = str(saes.save_sae(cb, tmp_path / "codebook"))
    cb = saes.load_sae(path)
    model, tokens = tiny.model, tokens_of(tiny)
    probe = {}
    logits(model, tokens, [(H0, lambda a, hook=None: probe.__setitem__("x", a[0].clone()))])
    x = probe["x"]
    z = cb.encode(x)  # (L, 16) indicator of the 3 selected codes
    scores = torch.nn.functional.layer_norm(x * cb.input_scale, (64,)) @ torch.nn.functional.normalize(cb.codebook, dim=1).T
    lowest = scores.masked_fill(z == 0, float("inf")).argmin(dim=1)  # (L,)
    code = int((z.sum(0) < z.shape[0]).nonzero()[0])  # a code not selected at every position
    before, after, _ = around(model, SteeringSpec.single(hook=H0, source=path, index=code, method="code"), tokens, H0)
    selected = z[:, code] > 0
    expected = before + (cb.codebook[code] - cb.codebook[lowest]) / cb.input_scale * (~selected)[:, None]
    # the same float32 vector arithmetic in another order (decode of the new codes plus x − x̂): ulps of |x̂| ~ 1
    assert torch.allclose(after, expected, atol=1e-5)


def test_threshold_variants_encode_as_sae_encode_without_reading_values():
    torch.manual_seed(0)
    sae = saes.build(saes.SAEConfig(d_in=64, width=128, k=4, arch="batchtopk")).eval()
    sae.threshold.fill_(0.05)
    sae.threshold_updates.fill_(1)
    x = torch.randn(50, 64) * 0.3
    assert torch.equal(steering.encoder(sae)(x), sae.encode(x))


def test_hooks_never_read_tensor_values(tiny):
    """A proxy for "no host synchronisation on CUDA" that runs on CPU: meta tensors have no values,
    so any .item(), bool(tensor) or data-dependent shape inside a hook raises."""
    meta = torch.device("meta")
    act = torch.empty(2, 5, 64, device=meta)
    topk = saes.build(saes.SAEConfig(d_in=64, width=32, k=4)).to(meta)
    jump = saes.build(saes.SAEConfig(d_in=64, width=32, k=1, arch="jumprelu")).to(meta)
    code = saes.build(saes.SAEConfig(d_in=64, width=16, k=3, arch="codebook")).to(meta)
    fns = [
        steering.hooks._add_fn(torch.empty(64, device=meta), H0),
        steering.hooks._clamp_fn(topk, 3, 1.5, H0, meta),
        steering.hooks._clamp_fn(jump, 3, 0.0, H0, meta),
        steering.hooks._code_fn(code, 2, 1.0, H0),
        steering.hooks._code_fn(code, 2, 3.0, H0, "replace_all"),
    ]
    for fn in fns:
        out = fn(act)
        assert out.shape == act.shape and out.device == meta


# -- generation ------------------------------------------------------------------------------
@pytest.mark.parametrize("method, strength", [("add", 0.5), ("clamp", 3.0)])
def test_kv_cache_generation_steers_every_new_position(tiny, sae_dir, method, strength):
    """With a KV cache each new token is a 1-position forward; it must be steered like the prompt.
    Reference: the no-cache generation, and a full steered forward over the generated sequence."""
    model, tokens = tiny.model, tokens_of(tiny)
    spec = SteeringSpec.single(hook=H0, source=sae_dir, index=3, method=method, strength=strength, unit="raw")
    fn = resolve_spec(model, spec)[0].fn

    def prompt_only(act, hook=None):  # what a hook that missed the cached positions would do
        return fn(act) if act.shape[1] > 1 else act

    def run(hook_fn, cache):
        steps = []
        record = (("unembed.hook_out", lambda a, hook=None: steps.append(a[0, -1].float().clone())),)
        with attached(model, [(H0, hook_fn), *record]):
            new = steering.generate_tokens(model, tokens, max_new_tokens=8, temperature=0, use_past_kv_cache=cache, stop_at_eos=False)
        return new, torch.stack(steps)

    cached, cached_steps = run(fn, True)
    uncached, _ = run(fn, False)
    assert cached.tolist() == uncached.tolist()  # same greedy tokens
    full = torch.cat([tokens[0], cached])[None]
    reference = logits(model, full, [(H0, fn)])[tokens.shape[1] - 1 : -1]  # (8, vocab) steered at every position
    # one-position forwards with a KV cache against one full forward: other attention shapes and summation orders,
    # float32 logits (|l| ~ 1) apart by ~1e-6; a missed steering step moves them by > 1e-2 (checked below)
    assert torch.allclose(cached_steps, reference, atol=1e-4)
    _, missed = run(prompt_only, True)
    assert (missed[1:] - reference[1:]).abs().max() > 1e-2  # the check would catch unsteered new positions
    baseline = steering.generate_tokens(model, tokens, max_new_tokens=8, temperature=0, stop_at_eos=False)
    assert baseline.tolist() != cached.tolist()


def test_generate_returns_baseline_and_steered_with_the_same_seed(tiny, sae_dir):
    spec = SteeringSpec.single(hook=H0, source=sae_dir, index=3, strength=0.5, unit="raw")
    a = steering.generate(tiny, PROMPT, spec, max_new_tokens=6, seed=5, temperature=1.0)
    b = steering.generate(tiny, PROMPT, spec, max_new_tokens=6, seed=5, temperature=1.0)
    assert a == b and a.baseline != a.steered
    plain = steering.generate(tiny, PROMPT, SteeringSpec(), max_new_tokens=6, seed=5, temperature=1.0)
    assert plain.baseline == plain.steered == a.baseline  # an empty spec steers nothing; the seed fixes the sample
    assert not tiny.model.hook_dict[H0].fwd_hooks


# -- measurement -----------------------------------------------------------------------------
def test_add_moves_logits_along_the_decoder_logit_effect(tiny, sae_dir):
    model, tokens = tiny.model, tokens_of(tiny)
    sae = saes.load_sae(sae_dir)
    direction = sae.W_dec[3] / sae.W_dec[3].norm()
    effect = steering.logit_effect(model, direction)  # (vocab,)
    clean = logits(model, tokens)
    with steer(model, SteeringSpec.single(hook=H1, source=sae_dir, index=3, strength=0.02, unit="raw")):
        moved = logits(model, tokens)
    delta = moved - clean  # (L, vocab)
    cos = torch.nn.functional.cosine_similarity(delta - delta.mean(-1, keepdim=True), (effect - effect.mean())[None], dim=-1)
    assert cos.min() > 0.8, cos
    up = measure(tiny, SteeringSpec.single(hook=H1, source=sae_dir, index=3, strength=0.2, unit="raw"), [PROMPT])
    down = measure(tiny, SteeringSpec.single(hook=H1, source=sae_dir, index=3, strength=-0.2, unit="raw"), [PROMPT])
    assert up["delta_logprob_top"] > 0.1 and down["delta_logprob_top"] < -0.1
    assert up["feature_act_steered"] > up["feature_act_baseline"]
    assert up["top_tokens"] == [tiny.tokenizer.decode([t]) for t in effect.topk(10).indices.tolist()]


def test_sweep_gives_a_monotone_curve_from_zero(tiny, sae_dir):
    spec = SteeringSpec.single(hook=H0, source=sae_dir, index=3, strength=1.0, unit="raw")
    rows = sweep(tiny, spec, [0.0, 0.1, 0.3], [PROMPT], neutral_texts=["Some neutral words about nothing.", "A second one."])
    assert [r.strength for r in rows] == [0.0, 0.1, 0.3]
    zero = rows[0].metrics
    assert abs(zero["kl_neutral"]) < 1e-6 and abs(zero["delta_logprob_top"]) < 1e-5
    kl = [r.metrics["kl_neutral"] for r in rows]
    act = [r.metrics["feature_act_steered"] for r in rows]
    assert kl[0] < kl[1] < kl[2] and act[0] < act[1] < act[2]


# -- workspace: feature units, SAE names, the CLI ----------------------------------------------
def test_feature_scales_match_a_naive_reference_and_are_cached(ws_db):
    from workbench.activations import iter_activations

    with Workspace(ws_db, read_only=True) as ws:
        sae = steering.load_steering_sae("steer-topk", ws).sae
        stats = feature_scale_stats(ws, sae, H0)
        assert feature_scale_stats(ws, sae, H0) is stats  # cached in memory
        z = torch.cat([sae.encode(b) for b in iter_activations(ws, H0, 4096, split="all", drop_last=False)])  # (N, F)
    assert stats.n_tokens == z.shape[0]
    assert torch.allclose(stats.max, z.max(0).values)  # the same batches through the same encoder: equal in fact
    for f in range(0, 128, 9):
        nonzero = z[:, f][z[:, f] > 0]
        want = torch.quantile(nonzero, 0.99) if nonzero.numel() else torch.tensor(0.0)
        assert torch.allclose(stats.p99[f], want, atol=1e-5), f  # two interpolations of the same float32 values
    assert (stats.p99 <= stats.max + 1e-6).all()


@pytest.fixture(scope="module")
def analysed_db(ws_db, tmp_path_factory):
    """A copy of ``ws_db`` with 'steer-topk' analysed (feature_stats and the sparse store filled)."""
    import shutil

    db = tmp_path_factory.mktemp("analysed") / "ws.duckdb"
    shutil.copy(ws_db, db)
    shutil.copytree(ws_db.with_suffix(".saes"), db.with_suffix(".saes"))
    with Workspace(db) as ws:  # the copy's SAE row must point at the copied folder
        ws.con.execute("UPDATE saes SET path = ? WHERE name = 'steer-topk'", [str(db.with_suffix(".saes") / "steer-topk")])
    assert main(["analyze", "--db", str(db), "--sae", "steer-topk"]) == 0
    return db


def test_feature_scales_from_the_analysis_store_agree_with_the_cache(analysed_db):
    """Both measure σ over the same tokens (every cached token at positions ≥ 1: 4,096 − 64 < SCALE_TOKENS)
    with the same encoder, so max, p99 and firing counts agree to float tolerance."""
    with Workspace(analysed_db, read_only=True) as ws:
        sae = steering.load_steering_sae("steer-topk", ws).sae
        assert steering.analysed_sae_id(ws, sae, H0) == 1
        store = feature_scale_stats(ws, sae, H0)  # auto: the store, since the SAE is analysed
        cache = feature_scale_stats(ws, sae, H0, source="cache")
        forced = feature_scale_stats(ws, sae, H0, source="store")
        assert forced.source == "store" and torch.equal(forced.p99, store.p99)
    assert (store.source, cache.source) == ("store", "cache")
    assert store.n_tokens == cache.n_tokens == 64 * 63
    assert torch.equal(store.fired, cache.fired)
    # the analysis encoded the tokens in other batches than the cache path (other matmul shapes): latents (~1) differ
    # by float32 ulps, and the p99s interpolate between neighbouring values of those, by DuckDB and by torch
    assert torch.allclose(store.max, cache.max, atol=1e-5)
    assert torch.allclose(store.p99, cache.p99, atol=1e-4, rtol=1e-4)
    assert (store.p99 > 0).sum() > 10  # a real comparison, not of zeros


def test_feature_scales_fall_back_to_the_cache_without_an_analysis(ws_db, tmp_path):
    with Workspace(ws_db, read_only=True) as ws:
        sae = steering.load_steering_sae("steer-topk", ws).sae
        assert steering.analysed_sae_id(ws, sae, H0) is None
        assert feature_scale_stats(ws, sae, H0).source == "cache"
        with pytest.raises(SteeringError, match="no finished analysis"):
            feature_scale_stats(ws, sae, H0, source="store")
        with pytest.raises(SteeringError, match="source must be one of"):
            feature_scale_stats(ws, sae, H0, source="histogram")
        unsaved = _topk_sae(3)  # a module not loaded from the workspace: never the store
        assert steering.analysed_sae_id(ws, unsaved, H0) is None


def test_feature_units_scale_the_added_vector_by_the_feature_scale(tiny, ws_db):
    model = tiny.model
    with Workspace(ws_db, read_only=True) as ws:
        sae = steering.load_steering_sae("steer-topk", ws).sae
        feature = int(steering.feature_scales(ws, sae, H0, "feature_max").argmax())
        for unit in ("feature_max", "feature_p99"):
            spec = SteeringSpec.single(source="steer-topk", index=feature, strength=1.5, unit=unit)  # hook from the workspace
            (r,) = resolve_spec(model, spec, ws)
            scale = float(steering.feature_scales(ws, sae, H0, unit)[feature])
            assert r.hook == H0 and r.amount == pytest.approx(1.5 * scale)
            act = torch.zeros(1, 1, 64)
            # the same three float32 products in another order: an ulp or two of entries below 1
            assert torch.allclose(r.fn(act)[0, 0], 1.5 * scale * sae.W_dec[feature] / sae.input_scale, atol=1e-6)


def test_cli_steer_prints_both_generations_and_the_effect(ws_db, capsys):
    assert main(["steer", "--db", str(ws_db), "--sae", "steer-topk", "--feature", "5", "--strength", "4",
                 "--prompt", "The weather today is", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    for text in ("baseline: ", "steered:  ", "feature 5 activation at blocks.0.hook_resid_post", "log P(top tokens", "KL(baseline"):
        assert text in out, out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--feature", "128"], "feature 128 out of range"),
        (["--feature", "1", "--hook", "blocks.9.hook_resid_post", "--sae", "DIR", "--unit", "raw"],
         "was trained on 'blocks.0.hook_resid_post', not 'blocks.9.hook_resid_post'"),  # cfg.json's metadata.hook_name
        (["--spec", "VECTOR_UNKNOWN_HOOK"], "unknown hook 'blocks.9.hook_resid_post'"),
        (["--feature", "1", "--strength", "nan"], "strength must be a finite number within ±10000"),
        (["--feature", "1", "--strength", "inf"], "strength must be a finite number within ±10000"),
        (["--spec", "BAD_METHOD"], "unknown steering method 'boost'"),
        (["--spec", "MALFORMED"], "malformed steering spec JSON"),
        (["--feature", "1", "--method", "steer"], "argument --method: invalid choice: 'steer'"),
        (["--feature", "1", "--sae", "nope"], "SAE 'nope' is neither a trained SAE"),
    ],
)
def test_cli_steer_bad_input_is_one_line(ws_db, tmp_path, capsys, args, expected):
    files = {"BAD_METHOD": '{"interventions": [{"source": "steer-topk", "index": 1, "method": "boost"}]}',
             "MALFORMED": '{"interventions": [{"source": ',
             "VECTOR_UNKNOWN_HOOK": json.dumps({"interventions": [{"vector": [0.5] * 64, "hook": "blocks.9.hook_resid_post"}]})}
    sae_dir = str(ws_db.with_suffix(".saes") / "steer-topk")
    args = [sae_dir if a == "DIR" else a for a in args]
    for name, text in files.items():
        if name in args:
            (tmp_path / name).write_text(text)
            args[args.index(name)] = str(tmp_path / name)
    base = ["steer", "--db", str(ws_db), "--sae", "steer-topk", "--prompt", "x", "--model", "tiny-llama"]
    for flag in ("--sae",):
        if flag in args:
            i = base.index(flag)
            base = base[:i] + base[i + 2 :]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: ") and "\n" not in err and expected in err, err


# -- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_kv_cache_steering_on_the_default_model(smollm2, tmp_path):
    """SmolLM2-135M, an untrained SAE at block 15: cached and uncached steered generations agree."""
    model = smollm2.model
    torch.manual_seed(0)
    sae = saes.build(saes.SAEConfig(d_in=576, width=1024, k=16)).eval()
    hook = "blocks.15.hook_resid_post"
    spec = SteeringSpec.single(hook=hook, source=str(saes.save_sae(sae, tmp_path / "sae")), index=3, strength=8.0, unit="raw")
    tokens = model.to_tokens("The capital of France is")
    base = steering.generate_tokens(model, tokens, max_new_tokens=8, temperature=0, stop_at_eos=False)
    with steer(model, spec):
        cached = steering.generate_tokens(model, tokens, max_new_tokens=8, temperature=0, stop_at_eos=False)
        uncached = steering.generate_tokens(model, tokens, max_new_tokens=8, temperature=0, use_past_kv_cache=False, stop_at_eos=False)
    assert cached.tolist() == uncached.tolist() != base.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hooks_do_not_synchronise_on_cuda():
    torch.cuda.set_sync_debug_mode("error")
    try:
        dev = torch.device("cuda")
        act = torch.randn(2, 7, 64, device=dev)
        topk = saes.build(saes.SAEConfig(d_in=64, width=32, k=4)).to(dev)
        code = saes.build(saes.SAEConfig(d_in=64, width=16, k=3, arch="codebook")).to(dev)
        for fn in (steering.hooks._add_fn(torch.randn(64, device=dev), H0), steering.hooks._clamp_fn(topk, 3, 1.5, H0, dev),
                   steering.hooks._code_fn(code, 2, 1.0, H0), steering.hooks._code_fn(code, 2, 3.0, H0, "replace_all")):
            assert fn(act).device.type == "cuda"
    finally:
        torch.cuda.set_sync_debug_mode("default")
