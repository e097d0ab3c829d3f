"""Regression tests for the app's usability fixes of issue #16, and labels wherever a feature is named.

Labels come through one adapter (``cached.labels`` / ``cached.label_search``); the ``with_labels`` fixture
monkeypatches it, so these tests do not depend on ``workbench.explanations`` or a labelled workspace.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.app import cached, render
from workbench.workspace import Workspace

SAE = "tiny-topk"
HOME = Path(__file__).resolve().parents[2] / "app" / "Home.py"


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def link_labels(at) -> dict[str, str]:
    return {p.proto.label: p.proto.query_string for p in at.get("page_link")}


@pytest.fixture
def labelled():
    """A label for every feature: 'topic N', scored 0.5 + N / 1000."""
    return {f: (f"topic {f}", 0.5 + f / 1000, "pattern") for f in range(128)}


@pytest.fixture
def with_labels(monkeypatch, labelled):
    monkeypatch.setattr(cached, "labels", lambda path, sae: dict(labelled))
    monkeypatch.setattr(cached, "label_search", lambda path, sae, text, limit=20: [
        (f, label, score) for f, (label, score, _) in labelled.items() if text.lower() in label.lower()][:limit])


# -- Steering keeps its settings across an invalid Features entry ------------------------------------------
def test_steering_keeps_prompt_strength_and_temperature_after_an_invalid_entry(app_workspace, open_page):
    at = open_page(app_workspace, "steering", sae=SAE, feature=1)
    at.text_area(key="steer_prompt").input("Once upon a time")
    at.slider(key="steer_temperature").set_value(0.3)
    at.slider(key="steer_strength_1_add_feature_p99").set_value(7.5)
    at.number_input(key="steer_new_tokens").set_value(12)
    at.run()
    at.text_input(key="steer_features").input("1, x").run()
    no_exception(at)
    assert errors(at) == ["feature ids must be whole numbers separated by commas, got 'x'"]
    at.text_input(key="steer_features").input("1").run()
    no_exception(at)
    assert not errors(at)
    # The server kept the values all along; what went wrong was the browser, which draws a widget that comes back
    # at its default unless the value is sent with it (set_value). AppTest reads the server's values, so check both.
    prompt, temperature = at.text_area(key="steer_prompt"), at.slider(key="steer_temperature")
    strength, new_tokens = at.slider(key="steer_strength_1_add_feature_p99"), at.number_input(key="steer_new_tokens")
    assert (prompt.value, temperature.value, strength.value, new_tokens.value) == ("Once upon a time", 0.3, 7.5, 12)
    assert prompt.proto.set_value and prompt.proto.value == "Once upon a time"
    assert temperature.proto.set_value and list(temperature.proto.value) == [pytest.approx(0.3)]
    assert strength.proto.set_value and list(strength.proto.value) == [7.5]
    assert new_tokens.proto.set_value and new_tokens.proto.value == 12
    at.run()  # an ordinary rerun after that sends nothing extra
    assert not at.text_area(key="steer_prompt").proto.set_value


# -- the prompt inspector's heatmap ---------------------------------------------------------------------
def test_heatmap_says_how_many_features_it_shows_and_cells_are_clickable(app_workspace, open_page):
    at = open_page(app_workspace, "prompt")
    no_exception(at)
    (chart,) = at.get("plotly_chart")
    heatmap, cells = json.loads(chart.proto.spec)["data"]
    rows = heatmap["y"]
    caption = next(c.value for c in at.caption if "features in any token's top list" in c.value)
    total = int(caption.split(" of ")[1].split()[0]) if " of " in caption else len(rows)
    assert len(rows) == min(40, total) and total > 40  # the default prompt has more than 40
    assert caption.startswith(f"The 40 strongest of {total} features")
    # rows by largest activation, strongest first
    peaks = [max(v for v in row if v is not None) for row in heatmap["z"]]
    assert peaks == sorted(peaks, reverse=True)
    # every filled cell has a marker naming its feature, so a click selects it
    filled = sum(v is not None for row in heatmap["z"] for v in row)
    assert len(cells["customdata"]) == filled and set(map(str, cells["customdata"])) == set(rows)
    assert chart.proto.selection_mode  # on_select: a click reruns the page with the selection
    links = [label for label in link_labels(at) if label.startswith("feature ")]
    assert len(links) == 36 and any("(the 36 strongest of" in m.value for m in at.markdown)


def test_heatmap_order_and_overlay():
    result = {"tokens": ["a", "b"], "features": [[5, 7], [7, 9]], "values": [[1.0, 0.5], [3.0, 0.0]]}
    assert render.heatmap_order(result) == [7, 5]  # 9 never fired
    fig = render.prompt_heatmap(result, max_features=1, labels={7: ("seven", None, "x")})
    heatmap, cells = fig.data
    assert list(heatmap.y) == ["7"] and list(cells.customdata) == [7, 7]
    assert list(fig.layout.yaxis.ticktext) == ["7 · seven"]


# -- search results: label, preview, collapse -------------------------------------------------------------
def test_search_results_show_a_preview_and_collapse_once_one_is_opened(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.text_input(key="search_text").input(r"^ (the|The)$").run()
    no_exception(at)
    (results,) = [e for e in at.expander if "results for" in e.label]
    assert results.proto.expanded
    previews = [m.value for m in at.markdown if 'class="wb-preview"' in m.value]
    assert previews and all("wb-token" in p and "\n" not in p for p in previews)
    first = next(label for label in link_labels(at) if label.startswith("feature "))
    at.query_params["feature"] = first.split()[1]  # what following the result's link does
    at.run()
    no_exception(at)
    assert at.title[0].value == f"Feature {first.split()[1]}"
    (results,) = [e for e in at.expander if "results for" in e.label]
    assert not results.proto.expanded and "(opened one)" in results.label


def test_search_by_label_text(app_workspace, open_page, with_labels):
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.radio(key="search_mode").set_value("label text").run()
    at.text_input(key="search_text").input("topic 12").run()
    no_exception(at)
    assert not errors(at)
    links = link_labels(at)
    assert "feature 12 · topic 12" in links and "feature 120 · topic 120" in links
    assert links["feature 12 · topic 12"] == f"sae={SAE}&feature=12"
    assert any(c.value == "label score 0.51" for c in at.caption)


def test_search_by_label_text_without_labels_says_how_to_make_them(app_workspace, open_page, monkeypatch):
    monkeypatch.setattr(cached, "labels", lambda path, sae: {})
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.radio(key="search_mode").set_value("label text").run()
    at.text_input(key="search_text").input("python").run()
    no_exception(at)
    assert any("No feature labels stored" in i.value and f"workbench explain --db {app_workspace} --sae {SAE}" in i.value
               for i in at.info)


def test_the_label_adapter_answers_without_labels(app_workspace, monkeypatch):
    """No labels stored, or no ``workbench.explanations`` module at all: the adapters answer 'no labels'."""
    import importlib.util

    path = str(app_workspace)
    assert cached.labels.__wrapped__(path, SAE) == {}  # whether or not the workspace has the (empty) table
    assert cached.label_search.__wrapped__(path, SAE, "x", 5) == []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == cached.LABELS_MODULE else find_spec(name, *a))
    with Workspace(app_workspace, read_only=True) as ws:
        assert not cached._labels_stored(ws)
    assert cached.labels.__wrapped__(path, SAE) == {}
    assert cached.label_search.__wrapped__(path, SAE, "x", 5) == []


# -- labels wherever a feature is named ---------------------------------------------------------------------
def test_labels_on_the_feature_page_prompt_inspector_and_steering(app_workspace, busiest_feature, open_page, with_labels):
    at = open_page(app_workspace, "feature", sae=SAE, feature=busiest_feature)
    no_exception(at)
    assert at.title[0].value == f"Feature {busiest_feature}"
    assert any('class="wb-label"' in m.value and f"topic {busiest_feature}" in m.value for m in at.markdown)
    related = [label for label in link_labels(at) if label.startswith("feature ")]
    assert len(related) == 5 and all(" · topic " in label for label in related)

    at = open_page(app_workspace, "prompt")
    no_exception(at)
    assert all(" · topic " in label for label in link_labels(at))
    assert " · topic " in str(at.dataframe[0].value["top 1"].iloc[1])
    (chart,) = at.get("plotly_chart")
    ticks = json.loads(chart.proto.spec)["layout"]["yaxis"]["ticktext"]
    assert ticks and all(" · topic " in t for t in ticks)

    at = open_page(app_workspace, "steering", sae=SAE, feature=busiest_feature)
    no_exception(at)
    assert any(c.value == f"topic {busiest_feature}" for c in at.caption)


# -- Home shows every column ----------------------------------------------------------------------------------
def test_home_sae_table_fits_with_more_columns_in_an_expander(app_workspace, open_page):
    at = open_page(app_workspace)
    no_exception(at)
    saes = at.dataframe[3]
    assert "KL" in saes.value.columns and "CE loss recovered" in saes.value.columns
    assert len(saes.value.columns) <= 10  # ~75 px each: fits beside the sidebar at 1280 px
    assert saes.value["dictionary"].tolist() == ["topk · 128 · k=4"]
    config = json.loads(saes.proto.columns)
    assert all(config[title]["width"] == "small" for title in ("L0", "FVU", "dead", "KL"))
    assert config["CE loss recovered"]["label"] == "CE rec." and config["CE loss recovered"]["help"] == "CE loss recovered"
    assert len([e for e in at.expander if e.label.startswith("More columns")]) == 1
    (details,) = at.table
    assert {"id", "hook", "arch", "width", "k", "status", "explained var.", "train tokens"} <= set(details.value.columns)


# -- empty Sparsity and Experts pages name the workspace and the SAE ----------------------------------------
@pytest.mark.parametrize("page, commands", [
    ("sparsity", ["workbench sparsity measure --db {db} --model tiny-llama", "workbench sparsity series --db {db}"]),
    ("experts", ["workbench moe run --db {db} --sae {sae}", "workbench probe --db {db} --sae {sae}"]),
])
def test_empty_sparsity_and_experts_pages_name_the_workspace_and_sae(page, commands, app_workspace, open_page):
    at = open_page(app_workspace, page)
    no_exception(at)
    (info,) = at.info
    for command in commands:
        assert command.format(db=app_workspace, sae=SAE) in info.value
    assert "minutes" in info.value and "WORKSPACE" not in info.value


# -- the sidebar's + stops at the last feature ---------------------------------------------------------------
def test_sidebar_steps_stop_at_the_first_and_last_feature(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=127)
    at.sidebar.number_input[0].increment().run()
    no_exception(at)
    assert not errors(at)
    assert at.title[0].value == "Feature 127" and at.query_params["feature"] == "127"
    at.sidebar.number_input[0].set_value(0).run()
    at.sidebar.number_input[0].decrement().run()
    no_exception(at)
    assert not errors(at) and at.title[0].value == "Feature 0"


def test_preview_is_one_line_around_the_example_token():
    ex = SimpleNamespace(tokens=[str(i) for i in range(20)], values=[0.0] * 12 + [2.0] + [0.0] * 7, focus=12, value=2.0)
    html = render.preview_html(ex, width=4)
    assert html.count('class="wb-token"') == 7 and "outline:" in html and "white-space:nowrap" in html  # tokens 8..14
