"""MoEfication: balanced, seeded partitions that recover planted co-activation groups; top-k routing."""

import json

import numpy as np
import pytest
import torch

from probes.expert_summary import summarise
from probes.moefy import (
    MoefyError,
    Partition,
    balanced_assign,
    coactivation,
    mask_to_topk,
    moefy,
    route,
    topk_scores,
)


def planted(d_mlp=48, n_experts=6, n_tokens=300, seed=0, relu=False):
    """Activations where hidden groups of d_mlp/E neurons (scattered by a permutation) fire together."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(d_mlp, generator=g).view(n_experts, -1)  # (E, m)
    active = torch.rand(n_tokens, n_experts, generator=g) < 0.3  # which groups fire per token
    acts = torch.randn(n_tokens, d_mlp, generator=g) * 0.05
    for e, neurons in enumerate(groups):
        sign = 1.0 if relu else torch.sign(torch.randn(n_tokens, len(neurons), generator=g))
        acts[:, neurons] += active[:, e : e + 1] * (1 + torch.rand(n_tokens, len(neurons), generator=g)) * sign
    return (acts.relu() if relu else acts), groups, active


def as_sets(neurons_of_expert):
    return {frozenset(row) for row in neurons_of_expert.tolist()}


@pytest.mark.parametrize("n_experts", [1, 4, 6, 16, 48])
def test_partition_is_balanced_and_covers_every_neuron_once(n_experts):
    acts = torch.randn(200, 48, generator=torch.Generator().manual_seed(1))
    part = moefy(acts, n_experts, seed=3)
    assert part.neurons_of_expert.shape == (n_experts, 48 // n_experts) and part.seed == 3
    assert sorted(part.neurons_of_expert.flatten().tolist()) == list(range(48))
    assert torch.bincount(part.expert_of_neuron, minlength=n_experts).tolist() == [48 // n_experts] * n_experts
    for e, neurons in enumerate(part.neurons_of_expert):
        assert (part.expert_of_neuron[neurons] == e).all()


def test_partition_is_deterministic_by_seed():
    acts = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    a, b, c = moefy(acts, 8, seed=0), moefy(acts, 8, seed=0), moefy(acts, 8, seed=1)
    assert torch.equal(a.expert_of_neuron, b.expert_of_neuron)
    assert as_sets(a.neurons_of_expert) != as_sets(c.neurons_of_expert)  # random data: the seed matters


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_recovers_planted_co_activation_groups(seed):
    acts, groups, _ = planted(seed=seed)
    assert as_sets(moefy(acts, 6, seed=seed).neurons_of_expert) == as_sets(groups)
    relu_acts, relu_groups, _ = planted(d_mlp=32, n_experts=4, seed=seed + 10, relu=True)
    assert as_sets(moefy(relu_acts, 4, seed=seed, binary=True).neurons_of_expert) == as_sets(relu_groups)


def test_chunks_give_the_same_partition_and_correlations_match_numpy():
    acts, groups, _ = planted()
    acts = acts + 5.0  # an offset must not cost accuracy in the accumulated correlations
    gram = coactivation(acts.view(3, 100, 48))
    torch.testing.assert_close(gram, coactivation(iter(acts.split(37))))
    torch.testing.assert_close(gram, torch.from_numpy(np.corrcoef(acts.abs().numpy().T.astype(np.float64))), atol=1e-6, rtol=1e-6)
    whole, chunked = moefy(acts, 6, seed=4), moefy(acts.split(64), 6, seed=4)
    assert torch.equal(whole.expert_of_neuron, chunked.expert_of_neuron)


def test_bad_expert_counts_and_k_are_one_line_errors():
    acts = torch.randn(20, 48)
    with pytest.raises(MoefyError) as err:
        moefy(acts, 5)
    assert str(err.value) == "E=5 does not divide d_mlp=48; valid E: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"
    with pytest.raises(MoefyError, match="E=0 does not divide"):
        moefy(acts, 0)
    part = moefy(acts, 4)
    for k in (0, 5):
        with pytest.raises(MoefyError) as err:
            route(acts, part, k)
        assert "\n" not in str(err.value) and f"k={k} is out of range for E=4 experts" in str(err.value)
    with pytest.raises(MoefyError, match="width 40"):
        mask_to_topk(torch.randn(3, 40), part, 2)
    with pytest.raises(MoefyError, match="at least one token"):
        moefy(torch.zeros(0, 48), 4)


def test_route_scores_are_neuron_norms_and_selection_is_top_k():
    torch.manual_seed(0)
    part = Partition.from_labels(torch.arange(12) % 3, seed=0)  # expert e = neurons e, e+3, e+6, e+9
    acts = torch.randn(10, 12)
    scores, selected = route(acts, part, 2)
    naive = torch.stack([acts[:, [e, e + 3, e + 6, e + 9]].norm(dim=1) for e in range(3)], 1)
    torch.testing.assert_close(scores, naive)
    assert torch.equal(selected, naive.argsort(1, descending=True)[:, :2])
    gated = topk_scores(scores, selected)
    assert ((gated > 0).sum(1) == 2).all() and torch.equal(gated.max(1).values, scores.max(1).values)


def test_mask_to_topk_is_identity_at_k_equal_E_and_zeros_exactly_the_unselected_experts():
    acts, _, _ = planted()
    part = moefy(acts, 6)
    batched = acts.view(3, 100, 48)
    assert torch.equal(mask_to_topk(batched, part, 6), batched)
    out = mask_to_topk(batched, part, 2)
    assert out.shape == batched.shape
    for x, y in zip(acts, out.view(-1, 48)):
        norms = [x[n].norm().item() for n in part.neurons_of_expert]
        kept = sorted(range(6), key=lambda e: -norms[e])[:2]
        for e, neurons in enumerate(part.neurons_of_expert):
            assert torch.equal(y[neurons], x[neurons] if e in kept else torch.zeros(8))
    half = mask_to_topk(acts.half(), part, 3)
    assert half.dtype == torch.float16


def test_partition_round_trips_through_json_and_rejects_unbalanced_labels():
    part = moefy(torch.randn(100, 24, generator=torch.Generator().manual_seed(5)), 4, seed=7)
    back = Partition.from_dict(json.loads(json.dumps(part.to_dict())))
    assert torch.equal(back.expert_of_neuron, part.expert_of_neuron)
    assert torch.equal(back.neurons_of_expert, part.neurons_of_expert) and back.seed == 7
    with pytest.raises(MoefyError, match="not a balanced partition"):
        Partition.from_labels([0, 0, 0, 1], seed=0)
    with pytest.raises(MoefyError, match="partition says d_mlp=12"):
        Partition.from_dict({**part.to_dict(), "d_mlp": 12})


def test_greedy_assignment_respects_capacity():
    dist = np.array([[0.0, 1.0], [0.1, 1.0], [0.2, 0.9], [0.3, 0.0]])  # three neurons want expert 0
    assert balanced_assign(dist, 2).tolist() == [0, 0, 1, 1]


def test_moefied_experts_of_planted_domains_are_specialised():
    """End to end: domains that each light up one planted group give pure, specialised experts."""
    g = torch.Generator().manual_seed(9)
    groups = torch.randperm(32, generator=g).view(4, 8)
    labels = torch.arange(400) % 4
    acts = torch.randn(400, 32, generator=g) * 0.05
    for d in range(4):
        rows = torch.nonzero(labels == d).flatten()
        acts[rows[:, None], groups[d]] += 1 + torch.rand(len(rows), 8, generator=g)
    part = moefy(acts, 4)
    scores, selected = route(acts, part, 1)
    s = summarise(topk_scores(scores, selected), labels, ["a", "b", "c", "d"], kind="moefied")
    assert sorted(s.specialist.tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(s.purity, 1.0)
    assert s.mi.normalised == pytest.approx(1.0)
