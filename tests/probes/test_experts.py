"""Expert monosemanticity metrics against hand-built routers with known answers."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from probes import concept_purge, score_matrix
from probes.concept_purge import concept_correlation, purge_curve
from probes.concepts import CONCEPTS, concept_groups, concept_masks
from probes.expert_masking import mask_logits, masked_routing, masking_selectivity, selectivity_matrix, topk_routing
from probes.expert_metrics import mutual_information, purity, skew_ranking, specialists
from probes.expert_summary import summarise
from probes.score_matrix import ExpertsError, dense_scores, routing_stats

NAMES = ["code", "empty", "prose", "math"]  # "empty" gets no tokens


def hand_router():
    """Top-2 routing over 4 experts: e0 only on code, e1 only on prose, e3 only on math, e2 everywhere.

    code  (30 tokens): e0 0.7, e2 0.3      prose (20): e1 0.6, e2 0.4      math (10): e2 0.5, e3 0.5
    """
    rows, labels = [], []
    for label, n, weights in ((0, 30, [0.7, 0, 0.3, 0]), (2, 20, [0, 0.6, 0.4, 0]), (3, 10, [0, 0, 0.5, 0.5])):
        rows += [weights] * n
        labels += [label] * n
    return torch.tensor(rows), torch.tensor(labels)


def test_hand_built_router_gives_the_known_masses_specialists_and_purity():
    scores, labels = hand_router()
    s = summarise(scores, labels, NAMES, layer=3, kind="moe")
    assert s.names == ("code", "prose", "math") and s.skipped == ("empty",)
    assert s.counts.tolist() == [30, 20, 10]
    np.testing.assert_allclose(s.mass, [[0.7, 0, 0.3, 0], [0, 0.6, 0.4, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(s.freq, [[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    # e0, e1, e3 are perfectly specialised; e2's best (0.5 on math) is < 2 × 0.4 (prose)
    assert s.specialist.tolist() == [0, 1, -1, 2]
    np.testing.assert_allclose(s.share, [0.25, 0.25, 0.25])
    assert s.specialised_in("math").tolist() == [3] and s.specialised_in("code").tolist() == [0]
    # purity: p(d|e) ∝ n_d r_{e,d}; e2 has joint mass 9, 8, 5
    np.testing.assert_allclose(s.purity, [1, 1, 9 / 22, 1])
    np.testing.assert_allclose(purity(s.mass, s.counts, balanced=True), [1, 1, 0.5 / 1.2, 1])
    # entropy of p(e|d) = the routing weights themselves, over log 4
    h = lambda *p: -sum(x * math.log(x) for x in p) / math.log(4)
    np.testing.assert_allclose(s.entropy, [h(0.7, 0.3), h(0.6, 0.4), h(0.5, 0.5)])


def test_skew_ranking_orders_an_experts_own_group_by_its_ratio_to_the_runner_up():
    mass = np.array([  # (D=3, E=6)
        [0.9, 0.6, 0.3, 0.0, 0.2, 0.5],
        [0.3, 0.1, 0.0, 0.4, 0.2, 0.5],
        [0.0, 0.2, 0.0, 0.1, 0.1, 0.0],
    ])
    # group 0: expert 2 has no other mass (ratio ∞), then 0 (0.9/0.3 = 3, more mass first), then 1 (0.6/0.2 = 3);
    # experts 4 and 5 tie between groups 0 and 1 and so belong to neither
    assert skew_ranking(mass, 0).tolist() == [2, 0, 1]
    assert skew_ranking(mass[:, [4, 5]], 1).tolist() == []
    assert skew_ranking(mass, 1).tolist() == [3]
    assert skew_ranking(mass, 2).tolist() == []
    scores = dense_scores(torch.tensor([[0], [1], [1]]), torch.tensor([[1.0], [1.0], [1.0]]), 6)  # (3 tokens, 6)
    summary = summarise(scores, torch.tensor([0, 1, 0]), ["a", "b"])  # expert 1: mass 0.5 on a, 1.0 on b
    assert summary.most_specialised_in("a", 3).tolist() == [0] and summary.most_specialised_in("b", 3).tolist() == [1]
    assert summary.most_specialised_in("b", 0).size == 0
    with pytest.raises(ExpertsError, match="group 3 is out of range for 3 groups"):
        skew_ranking(mass, 3)


def test_skew_factor_is_a_parameter_and_the_boundary_counts():
    mass = np.array([[0.4, 0.30, 0.0], [0.2, 0.15, 0.0]])  # (D=2, E=3); e0 exactly 2×, e1 exactly 2×, e2 dead
    assert specialists(mass).tolist() == [0, 0, -1]
    assert specialists(mass, factor=2.01).tolist() == [-1, -1, -1]
    scores, labels = hand_router()
    assert summarise(scores, labels, NAMES, factor=1.2).specialist.tolist() == [0, 1, 2, 2]  # 0.5 ≥ 1.2 × 0.4
    tie = np.array([[0.5], [0.5]])
    assert specialists(tie, factor=1.001).tolist() == [-1]  # a tie is never a specialisation
    with pytest.raises(ExpertsError, match="factor must be > 1"):
        specialists(mass, factor=1.0)


def test_uniform_routing_has_entropy_one_and_no_information():
    n, n_experts = 60, 8
    scores = torch.full((n, n_experts), 1 / n_experts)
    labels = torch.arange(n) % 3
    s = summarise(scores, labels, ["a", "b", "c"])
    np.testing.assert_allclose(s.entropy, 1.0)
    assert s.mi.nats == pytest.approx(0.0, abs=1e-12) and s.mi.normalised == pytest.approx(0.0, abs=1e-9)
    assert (s.specialist == -1).all()
    np.testing.assert_allclose(s.purity, 1 / 3)


def test_mutual_information_matches_a_hand_computation_and_sklearn():
    # domain A: 8 tokens to e0, 2 to e1; domain B: 2 to e0, 8 to e1 -> p(e, d) = [[.4, .1], [.1, .4]]
    experts_hit = [0] * 8 + [1] * 2 + [0] * 2 + [1] * 8
    domains = [0] * 10 + [1] * 10
    scores = dense_scores(torch.tensor(experts_hit)[:, None], torch.ones(20, 1), 2)
    stats = routing_stats(scores, torch.tensor(domains), ["A", "B"])
    mi = mutual_information(stats.mass, stats.counts)
    by_hand = 0.8 * math.log(0.4 / 0.25) + 0.2 * math.log(0.1 / 0.25)
    assert mi.nats == pytest.approx(by_hand, rel=1e-12)
    assert mi.nats == pytest.approx(mutual_info_score(domains, experts_hit), rel=1e-9)
    assert mi.normalised == pytest.approx(by_hand / math.log(2), rel=1e-12)
    # two experts per domain, each exclusive: the experts determine the domain
    exclusive = dense_scores(torch.tensor([0, 1] * 5 + [2, 3] * 5)[:, None], torch.ones(20, 1), 4)
    stats = routing_stats(exclusive, torch.tensor(domains), ["A", "B"])
    mi = mutual_information(stats.mass, stats.counts)
    assert mi.nats == pytest.approx(math.log(2)) and mi.normalised == pytest.approx(1.0)


def test_empty_domain_is_skipped_and_reported_not_raised():
    scores, labels = hand_router()
    s = summarise(scores, labels, NAMES)
    assert s.notice == "skipped groups with no tokens: empty"
    assert [r["group"] for r in s.summary_rows()] == ["code", "prose", "math"]
    nothing = summarise(scores, torch.full_like(labels, -1), NAMES)  # every token ignored
    assert nothing.names == () and nothing.skipped == tuple(NAMES)
    assert np.isnan(nothing.purity).all() and nothing.mi.nats == 0.0 and (nothing.specialist == -1).all()
    assert summarise(scores, labels, NAMES[:1] + NAMES[2:] + ["unused"]).notice is not None


def test_rows_are_plain_json_and_the_layer_row_averages_live_experts():
    scores, labels = hand_router()
    scores[:, 3] = 0  # kill e3: math now routes to e2 only
    s = summarise(scores, labels, NAMES, layer=5, kind="moe")
    json.dumps([s.summary_rows(), s.expert_rows(), s.layer_row()])
    row = s.layer_row()
    assert row["experts"] == 4 and row["dead"] == 1 and row["layer"] == 5 and row["kind"] == "moe"
    assert row["mean_purity"] == pytest.approx((1 + 1 + 9 / 22) / 3)  # e2 keeps joint mass 9, 8, 5
    assert s.expert_rows()[3]["specialist"] is None and s.expert_rows()[0]["specialist"] == "code"
    assert s.expert_rows()[0]["freq"] == pytest.approx(0.5)


def test_stats_accept_numpy_an_explicit_selection_and_chunking(monkeypatch):
    scores, labels = hand_router()
    whole = routing_stats(scores, labels, NAMES)
    selected = np.ones(scores.shape, bool)
    freq_all = routing_stats(scores.numpy(), labels.numpy(), NAMES, selected=selected)
    np.testing.assert_allclose(freq_all.freq, 1.0)
    monkeypatch.setattr(score_matrix, "CHUNK_ROWS", 7)
    chunked = routing_stats(scores, labels, NAMES)
    np.testing.assert_allclose(chunked.mass, whole.mass)
    np.testing.assert_allclose(chunked.freq, whole.freq)
    with pytest.raises(ExpertsError, match="label 3 has no name"):
        routing_stats(scores, labels, ["a", "b", "c"])


def reference_routing(logits, remove, k, normalise=True):
    """Row by row: drop removed experts, softmax over the rest, keep the k largest, renormalise."""
    out = torch.zeros_like(logits, dtype=torch.float64)
    for i, row in enumerate(logits.double()):
        keep = [e for e in range(len(row)) if e not in remove]
        p = torch.softmax(row[keep], 0)
        top = sorted(range(len(keep)), key=lambda j: -p[j])[:k]
        z = sum(p[j] for j in top) if normalise else 1.0
        for j in top:
            out[i, keep[j]] = p[j] / z
    return out


def test_masking_removes_exactly_the_chosen_experts_and_renormalises():
    torch.manual_seed(0)
    logits = torch.randn(50, 8, dtype=torch.float64)
    original = logits.clone()
    weights = masked_routing(logits, {1, 5}, k=2)
    assert torch.equal(logits, original)  # input untouched
    assert (weights[:, [1, 5]] == 0).all()
    assert ((weights > 0).sum(1) == 2).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(weights, reference_routing(logits, {1, 5}, 2))
    raw = masked_routing(logits, [1, 5], 2, normalise_topk=False)
    torch.testing.assert_close(raw, reference_routing(logits, {1, 5}, 2, normalise=False))
    # tokens whose top-2 never used e1 or e5 route exactly as before
    before = topk_routing(logits, 2)
    untouched = (before[:, [1, 5]] == 0).all(1)
    assert untouched.any() and not untouched.all()
    torch.testing.assert_close(weights[untouched], before[untouched])
    assert torch.isinf(mask_logits(logits, [3])[:, 3]).all() and torch.isfinite(mask_logits(logits, [3])[:, [0, 1, 2]]).all()


def test_masking_edge_cases():
    logits = torch.randn(4, 4)
    few = masked_routing(logits, [0, 1, 2], k=2)  # one expert left: it takes all the weight
    torch.testing.assert_close(few, torch.tensor([[0.0, 0, 0, 1]] * 4))
    with pytest.raises(ExpertsError, match="nothing left"):
        masked_routing(logits, range(4), k=1)
    with pytest.raises(ExpertsError, match="0..3"):
        mask_logits(logits, [4])
    with pytest.raises(ExpertsError, match="k=5 is out of range for E=4"):
        topk_routing(logits, 5)


def test_selectivity_arithmetic_and_matrix():
    before = {"code": 2.0, "prose": 3.0, "math": 4.0}
    after_code = {"code": 2.9, "prose": 3.1, "math": 4.3}
    assert masking_selectivity(before, after_code, "code") == pytest.approx(0.9 - (0.1 + 0.3) / 2)
    after_math = {"code": 2.0, "prose": 3.2, "math": 4.5}
    m = selectivity_matrix(before, {"code": after_code, "math": after_math})
    assert m.targets == ("code", "math") and m.measured == ("code", "prose", "math")
    np.testing.assert_allclose(m.delta, [[0.9, 0.1, 0.3], [0.0, 0.2, 0.5]])
    np.testing.assert_allclose(m.selectivity, [0.7, 0.5 - 0.1])
    assert len(m.rows()) == 6 and m.rows()[1] == {"target": "code", "measured": "prose", "delta_loss": pytest.approx(0.1)}
    with pytest.raises(ExpertsError, match="at least one other"):
        masking_selectivity({"code": 1.0}, {"code": 2.0}, "code")
    with pytest.raises(ExpertsError, match="needs a loss"):
        masking_selectivity(before, after_code, "poetry")
    with pytest.raises(ExpertsError, match="no loss on 'math'"):
        selectivity_matrix(before, {"code": {"code": 1.0, "prose": 1.0}})


def test_concept_predicates_on_a_few_tokens():
    tokens = [" 42", "7", ",", " ...", " def", "return", " Hello", "world", " ", "\n", "ĠThe", "True", "x1", "3.5", "Ċ"]
    masks = concept_masks(tokens)
    assert list(masks) == list(CONCEPTS)
    picked = {name: [t for t, hit in zip(tokens, m) if hit] for name, m in masks.items()}
    assert picked == {
        "whitespace": [" ", "\n", "Ċ"],
        "digits": [" 42", "7"],
        "punctuation": [",", " ..."],
        "code_keywords": [" def", "return", "True"],
        "capitalised": [" Hello", "ĠThe", "True"],
    }
    labels, names = concept_groups(tokens)
    assert names == (*CONCEPTS, "other")
    assert [names[i] for i in labels] == [
        "digits", "digits", "punctuation", "punctuation", "code_keywords", "code_keywords", "capitalised",
        "other", "whitespace", "whitespace", "capitalised", "code_keywords", "other", "other", "whitespace",
    ]  # fmt: skip
    assert list(concept_masks(tokens, ["digits"])) == ["digits"]
    with pytest.raises(ExpertsError, match="unknown concept 'emoji'; valid: whitespace, digits"):
        concept_masks(tokens, ["emoji"])


def test_concept_correlation_matches_numpy_and_drives_the_purge_curve(monkeypatch):
    rng = np.random.default_rng(0)
    concept = (rng.random(200) < 0.3).astype(float)
    scores = np.stack([concept * 2 + rng.random(200) * 0.1, rng.random(200), -concept + rng.random(200), np.full(200, 0.5)], 1)
    monkeypatch.setattr(concept_purge, "CHUNK_ROWS", 33)
    rho = concept_correlation(scores + 1e3, concept)  # a large offset must not cost accuracy
    expected = [np.corrcoef(scores[:, e], concept)[0, 1] for e in range(3)]
    np.testing.assert_allclose(rho[:3], expected, atol=1e-9)
    assert np.isnan(rho[3])  # a constant expert has no correlation
    curve = purge_curve(rho)
    assert curve.order.tolist() == [0, 1, 2] and curve.n_experts == 4
    np.testing.assert_allclose(curve.share_removed, [0.25, 0.5, 0.75])
    assert curve.at(0.5).tolist() == [0] and curve.share_at(0.5) == 0.25
    assert curve.at(float(rho[0])).tolist() == []  # strictly above τ
    assert curve.at(-2).tolist() == [0, 1, 2]


def test_neurons_and_latents_run_through_the_same_summary():
    torch.manual_seed(0)
    acts = torch.randn(90, 16)  # neurons: g = |a|, selection = a > 0
    labels = torch.arange(90) % 3
    acts[labels == 1, 4] += 10  # neuron 4 fires for group 1
    s = summarise(acts.abs(), labels, ["a", "b", "c"], selected=acts > 0, kind="neuron")
    assert s.specialist[4] == 1 and s.mass.shape == (3, 16)
    assert s.freq[1, 4] == 1.0
