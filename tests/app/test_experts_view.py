"""The Experts page's pure helpers on hand-made rows: selectivity by grouping and budget, the k curve's
reference, the concept-purge figure and correlation table, and the per-token routing HTML."""

import base64
import json
import math
import re

import numpy as np
import pytest

from workbench.app import experts_data as data
from workbench.app import experts_figures as figures
from workbench.app import experts_view as view


def sel_row(kind, grouping, budget, target, measured, delta, n_masked=2, selectivity=0.1):
    return {"kind": kind, "grouping": grouping, "budget": budget, "target": target, "measured": measured,
            "n_masked": n_masked, "loss_before": 3.0, "loss_after": 3.0 + delta, "delta_loss": delta,
            "selectivity": selectivity}


SELECTIVITY = [
    *(sel_row("moefied", "domain", "skew", t, m, 0.1 if t == m else 0.0, n_masked=2)
      for t in ("code", "prose") for m in ("code", "prose")),
    *(sel_row("moefied", "domain", "matched", t, m, 0.3 if t == m else 0.01, n_masked=1)
      for t in ("code", "prose") for m in ("code", "prose")),
    *(sel_row("moefied", "concept", "skew", t, m, 0.0, n_masked=0, selectivity=0.0)
      for t in ("digits",) for m in ("digits", "other")),
    *(sel_row("sae", "domain", "skew", t, m, 0.5 if t == m else 0.0, n_masked=40) for t in ("code", "prose")
      for m in ("code", "prose")),
]
COMPARISON = [{"kind": "moefied", "layer": 1, "grouping": g, "experts": 8} for g in ("domain", "concept")] + \
             [{"kind": "sae", "layer": 1, "grouping": g, "experts": 64} for g in ("domain", "concept")]


def test_selectivity_figure_shows_one_grouping_and_budget():
    fig = figures.selectivity_figure(SELECTIVITY, "moefied", "domain", "matched")
    (heat,) = fig.data
    assert list(heat.x) == ["code", "prose"] and list(heat.y) == ["code (1 removed)", "prose (1 removed)"]
    assert heat.z.tolist() == [[0.3, 0.01], [0.01, 0.3]]
    assert "MoEfied experts (by domain, matched budget)" in fig.layout.title.text
    concept = figures.selectivity_figure(SELECTIVITY, "moefied", "concept", "skew").data[0]
    assert list(concept.x) == ["digits", "other"] and list(concept.y) == ["digits (0 removed)"]
    default = figures.selectivity_figure(SELECTIVITY, "moefied").data[0]  # domain / skew, as before budgets existed
    assert default.z.tolist() == [[0.1, 0.0], [0.0, 0.1]]


def test_selection_pairs_and_the_table_report_the_share_each_kind_removed():
    assert data.selection_pairs(SELECTIVITY) == (["domain", "concept"], ["skew", "matched"])
    assert data.selection_pairs([sel_row("moe", "domain", "skew", "code", "code", 0.1)]) == (["domain"], ["skew"])
    units = data.units_per_kind(COMPARISON + [{"kind": "moefied", "layer": 2, "grouping": "domain", "experts": 8}])
    assert units == {"moefied": 16, "sae": 64}  # layers add up, groupings do not
    table = data.selectivity_table(SELECTIVITY, data.units_per_kind(COMPARISON), "domain", "skew")
    assert [(r["kind"], r["target"], r["removed"], r["share removed"]) for r in table] == [
        ("moefied", "code", 2, 0.25), ("moefied", "prose", 2, 0.25), ("sae", "code", 40, 0.625), ("sae", "prose", 40, 0.625)]
    assert table[0]["Δ target"] == 0.1 and table[0]["selectivity"] == 0.1
    concept = data.selectivity_table(SELECTIVITY, {}, "concept", "skew")
    assert concept == [{"kind": "moefied", "target": "digits", "removed": 0, "share removed": None, "Δ target": 0.0,
                        "selectivity": None}]  # nothing removed: the stored 0 says nothing


def test_budget_captions_say_what_differs_between_kinds():
    skew = data.budget_caption("skew", {"factor": 3.0})
    assert "3× the runner-up" in skew and "compare selectivity within a kind" in skew
    matched = data.budget_caption("matched", {"matched_share": 0.0625})
    assert "⌈0.0625 × units⌉ per layer" in matched and "same share" in matched
    assert "same share of units per layer" in data.budget_caption("matched", {})  # a config from before budgets


def curve_rows(ks, reference_k):
    loss = {k: 3.0 + 0.1 / k for k in {*ks, reference_k}}
    return [{"k": k, "grp": g, "loss": loss[k] + (0.2 if g == "code" else 0.0),
             "dense_loss": loss[reference_k] + (0.2 if g == "code" else 0.0)} for g in ("all", "code") for k in ks]


def test_curve_figure_names_the_reference_dense_for_moefied_and_own_routing_for_moe():
    fig = figures.curve_figure(curve_rows([1, 2, 4], 8), 8)
    assert "dashed: dense" in fig.layout.title.text
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 4, 8] and list(fig.layout.xaxis.ticktext) == ["1", "2", "4", "8 (dense)"]
    assert [t.name for t in fig.data] == ["all", "all dense", "code", "code dense"]
    moe = figures.curve_figure(curve_rows([1, 2, 4], 2), 4, source="router", k=2)
    assert "dashed: own top-2 routing" in moe.layout.title.text and "dense" not in moe.layout.title.text
    assert list(moe.layout.xaxis.tickvals) == [1, 2, 4]  # E = 4 is on the curve: one tick, not two
    assert list(moe.layout.xaxis.ticktext) == ["1", "2 (own)", "4"]
    reference = [t for t in moe.data if t.line.dash == "dash"]
    assert [t.name for t in reference] == ["all own top-2 routing", "code own top-2 routing"]
    assert list(reference[0].x) == [1, 4] and list(reference[0].y) == [pytest.approx(3.05)] * 2


def purge_row(kind, concept, tau, n, share, d_concept, d_other):
    return {"kind": kind, "concept": concept, "tau": tau, "n_removed": n, "share_removed": share,
            "concept_loss": 2.0 + d_concept, "other_loss": 3.0 + d_other, "concept_before": 2.0, "other_before": 3.0}


PURGE = [
    purge_row("moefied", "digits", 0.5, 0, 0.0, 0.0, 0.0),
    purge_row("moefied", "digits", 0.1, 2, 0.25, 0.4, 0.05),
    purge_row("moefied", "digits", 0.3, 1, 0.125, 0.2, 0.01),
    purge_row("sae", "digits", 0.3, 3, 0.05, 0.6, 0.02),
    purge_row("sae", "digits", 0.1, 6, 0.1, 0.9, 0.1),
    purge_row("sae", "punctuation", 0.1, 1, 0.02, 0.1, 0.0),
]


def test_purge_figure_has_a_solid_concept_line_and_a_dashed_other_line_per_kind():
    assert data.purge_concepts(PURGE) == ["digits", "punctuation"]
    fig = figures.purge_figure(PURGE, "digits")
    assert len(fig.data) == 4
    names = [t.name for t in fig.data]
    assert names == ["MoEfied experts: Δ loss on 'digits' tokens", "MoEfied experts: Δ loss on the other tokens",
                     "SAE latents: Δ loss on 'digits' tokens", "SAE latents: Δ loss on the other tokens"]
    solid, dashed = fig.data[0], fig.data[1]
    assert solid.line.dash == "solid" and dashed.line.dash == "dash"
    assert "other tokens" in dashed.name and solid.line.color == dashed.line.color == figures.KIND_COLOURS["moefied"]
    assert fig.data[2].line.color == figures.KIND_COLOURS["sae"]
    assert list(solid.x) == [0.0, 0.125, 0.25]  # ordered by share removed
    assert list(solid.y) == pytest.approx([0.0, 0.2, 0.4]) and list(dashed.y) == pytest.approx([0.0, 0.01, 0.05])
    assert [c[0] for c in solid.customdata] == [0.5, 0.3, 0.1] and "τ = %{customdata[0]" in solid.hovertemplate
    assert fig.layout.xaxis.type == "linear"
    assert figures.purge_figure(PURGE, "digits", log_x=True).layout.xaxis.type == "log"
    assert len(figures.purge_figure(PURGE, "punctuation").data) == 2
    assert figures.purge_figure([], "digits").data == ()  # nothing stored: an empty figure, no error


def test_correlation_table_names_the_unit_and_the_first_tau_that_removes_it():
    rows = [{"layer": 1, "expert": 5, "rho": 0.42}, {"layer": 1, "expert": 2, "rho": 0.2}, {"layer": -1, "expert": 9, "rho": 0.05}]
    table = data.correlation_table(rows, "sae", taus=[0.1, 0.3, 0.5])
    assert table == [{"layer": 1, "latent": 5, "ρ": 0.42, "removed from τ": 0.3},
                     {"layer": 1, "latent": 2, "ρ": 0.2, "removed from τ": 0.1},
                     {"layer": None, "latent": 9, "ρ": 0.05, "removed from τ": None}]
    assert list(data.correlation_table(rows[:1], "moe")[0]) == ["layer", "expert", "ρ"]
    assert "neuron" in data.correlation_table(rows[:1], "neuron")[0]


ROUTES = [
    {"position": 0, "token_id": 1, "grp": None, "experts": [3, 1], "weights": [0.7, 0.3]},
    {"position": 1, "token_id": 10, "grp": "code", "experts": [2, 3], "weights": [0.6, 0.4]},
    {"position": 2, "token_id": 11, "grp": "code", "experts": [3, 0], "weights": [0.9, 0.1]},
    {"position": 3, "token_id": 12, "grp": "code", "experts": [2, 1], "weights": [0.5, 0.5]},
]
TOKENS = ["<s>", "<script>alert('x')</script>", "\n", 'say "$1"']


def spans(html):
    return re.findall(r'<span class="wb-route" title="([^"]*)" style="([^"]*)">(.*?)</span>', html)


def test_routing_html_escapes_tokens_and_colours_by_top_expert_with_bos_grey():
    html = view.routing_html(TOKENS, ROUTES)
    assert "<script>" not in html and "&lt;script&gt;" in html and "\n" not in html
    assert html.startswith('<div class="wb-routing"') and html.count('class="wb-route"') == 4
    found = spans(html)
    assert len(found) == 4  # no token text or tooltip broke out of its attribute
    (bos_tip, bos_style, bos_text), (tip, style, text), (_, nl_style, nl_text), (_, quote_style, quote_text) = found
    assert f"background:{view.UNMEASURED}" in bos_style and "BOS / separator" in bos_tip
    assert f"background:{view.expert_colour(2)}" in style and f"background:{view.expert_colour(3)}" in nl_style
    assert quote_style.split(";")[0] == style.split(";")[0]  # the same top-1 expert, the same colour
    assert "expert 2: 0.600&#10;expert 3: 0.400" in tip and "position 1" in tip and "code" in tip
    assert nl_text == "↵" and "&quot;" in quote_text and "&#36;" in quote_text
    assert len({view.expert_colour(e) for e in range(64)}) == 64


def test_routing_html_highlights_one_expert_by_weight():
    html = view.routing_html(TOKENS, ROUTES, highlight=3)
    styles = [s for _, s, _ in spans(html)]
    alphas = [float(re.search(r"rgba\(255,145,0,([0-9.]+)\)", s).group(1)) for s in styles]
    assert alphas[3] == 0.0 and alphas[2] == 1.0  # not selected / the context's largest weight of expert 3
    assert 0.15 < alphas[1] < alphas[0] < 1.0
    assert "dashed" in styles[0] and "dashed" not in styles[1]  # BOS still marked as not measured
    fixed = view.routing_html(TOKENS, ROUTES, highlight=3, vmax=1.0)
    assert "rgba(255,145,0,0.92)" in fixed  # 0.9 of a routing weight of 1: 0.9·0.85 + 0.15
    unrouted = view.routing_html(TOKENS, ROUTES, bos_routed=False, weight_name="expert score ‖a‖")
    bos_tip = spans(unrouted)[0][0]
    assert "not routed" in bos_tip and "expert 3" not in bos_tip and "expert score ‖a‖s" in bos_tip


def test_routing_legend_counts_top_experts_of_measured_tokens():
    legend = view.routing_legend_html(ROUTES)
    assert legend.index("expert 2 · 2") < legend.index("expert 3 · 1") and "expert 1 ·" not in legend
    assert view.UNMEASURED in legend and "BOS / separator" in legend


def strict_json(fig) -> dict:
    """The figure as the browser gets it: strict JSON (a bare NaN or Infinity does not parse in JavaScript)."""
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(fig.to_json(), parse_constant=reject)


def decoded(value) -> list:
    """An array as plotly writes it: a list (NaN as null), or a base64 typed array {"dtype", "bdata", "shape"}."""
    if isinstance(value, dict):
        shape = [int(n) for n in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]).newbyteorder("<")) \
            .reshape(shape).tolist()
    return [decoded(v) if isinstance(v, list) else (math.nan if v is None else v) for v in value]


def test_figures_serialise_to_strict_json_with_their_data():
    purge = strict_json(figures.purge_figure(PURGE, "digits"))
    assert purge["layout"]["title"]["text"] == "Concept purge: digits (solid: its tokens, dashed: the rest)"
    moefied_concept, moefied_other, sae_concept, sae_other = purge["data"]  # 'punctuation' rows left out
    # MoEfied by share removed: τ 0.5 removes none, 0.3 one expert (Δ 0.2, 0.01), 0.1 two (Δ 0.4, 0.05)
    assert decoded(moefied_concept["x"]) == decoded(moefied_other["x"]) == [0.0, 0.125, 0.25]
    assert decoded(moefied_concept["customdata"]) == [[0.5, 0], [0.3, 1], [0.1, 2]]
    assert decoded(moefied_concept["y"]) == pytest.approx([0.0, 0.2, 0.4])
    assert decoded(moefied_other["y"]) == pytest.approx([0.0, 0.01, 0.05])
    assert decoded(sae_concept["x"]) == [0.05, 0.1] and decoded(sae_concept["customdata"]) == [[0.3, 3], [0.1, 6]]
    assert decoded(sae_concept["y"]) == pytest.approx([0.6, 0.9]) and decoded(sae_other["y"]) == pytest.approx([0.02, 0.1])

    curve = strict_json(figures.curve_figure(curve_rows([1, 2], 2), 2, "router", 2))  # loss 3 + 0.1/k, code 0.2 above
    assert [(t["name"], decoded(t["x"])) for t in curve["data"]] == [
        ("all", [1, 2]), ("all own top-2 routing", [1, 2]), ("code", [1, 2]), ("code own top-2 routing", [1, 2])]
    assert [decoded(t["y"]) for t in curve["data"]] == [
        pytest.approx([3.1, 3.05]), pytest.approx([3.05, 3.05]), pytest.approx([3.3, 3.25]), pytest.approx([3.25, 3.25])]
    assert curve["layout"]["xaxis"]["ticktext"] == ["1", "2 (own)"] and curve["layout"]["xaxis"]["type"] == "log"

    (full,) = strict_json(figures.selectivity_figure(SELECTIVITY, "sae"))["data"]
    assert full["x"] == ["code", "prose"] and full["y"] == ["code (40 removed)", "prose (40 removed)"]
    assert decoded(full["z"]) == [[0.5, 0.0], [0.0, 0.5]] and decoded(full["text"]) == [[0.5, 0.0], [0.0, 0.5]]
    gap = [r for r in SELECTIVITY if r["kind"] == "sae" and (r["target"], r["measured"]) != ("prose", "code")]
    (heat,) = strict_json(figures.selectivity_figure(gap, "sae"))["data"]  # a cell never measured stays a gap, not 0
    (code_row, (missing, prose_cell)) = decoded(heat["z"])
    assert code_row == [0.5, 0.0] and math.isnan(missing) and prose_cell == 0.5
