"""The Features page (``app/pages/1_Features.py``) under ``AppTest`` on the small analysed workspace.

Every feature of the SAE as a table (filters, sort, a random live feature), the map of decoder directions
with and without labels, and what a click on a row or a point opens. A plotly or dataframe selection
cannot be made under ``AppTest``, so the selection-to-feature step is tested on ``features_view``
directly and the page is checked to ask for selections; the switch to the Feature page itself is
driven through the random-feature button, which takes the same path.
"""

import json
import math
from pathlib import Path

import pytest
from streamlit.proto.Dataframe_pb2 import Dataframe as DataframeProto
from streamlit.proto.PlotlyChart_pb2 import PlotlyChart as PlotlyChartProto

from workbench.app import cached
from workbench.app import features_view as view

SAE = "tiny-topk"
HOME = Path(__file__).resolve().parents[2] / "app" / "Home.py"
PAGE = "pages/1_Features.py"
LABELS = {3: ("closing brackets", 0.91, "llm"), 17: ("license words", 0.42, "pattern"), 40: ("Python keywords", None, "pattern")}


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture
def open_features(monkeypatch):
    """``open_features(db, **query)``: an AppTest run of the Features page with WORKBENCH_DB=db."""
    from streamlit.testing.v1 import AppTest

    def run(db, **query):
        monkeypatch.setenv("WORKBENCH_DB", str(db))
        at = AppTest.from_file(str(HOME), default_timeout=120)
        at.switch_page(PAGE)
        at.query_params.update({k: str(v) for k, v in query.items()})
        return at.run()

    return run


@pytest.fixture
def with_labels(monkeypatch):
    """The labels adapter answering as a workspace with three labelled features would."""
    monkeypatch.setattr(cached, "labels", lambda path, sae: dict(LABELS))


def table(at):
    return at.dataframe[0].value


def map_traces(at) -> list[dict]:
    (chart,) = at.get("plotly_chart")
    return json.loads(chart.proto.spec)["data"]


# -- the table --------------------------------------------------------------------------------------
def test_table_lists_every_feature_with_its_statistics_and_domain(app_workspace, open_features):
    at = open_features(app_workspace, sae=SAE)
    no_exception(at)
    assert not errors(at)
    assert at.title[0].value == "Features" and at.selectbox(key="features_sae").value == SAE
    rows = table(at)
    assert rows["feature"].tolist() == list(range(128))
    assert {"density", "fired", "max activation", "dominant domain", "domain share"} <= set(rows.columns)
    assert (rows["density"] > 0).sum() > 0 and (rows["max activation"].dropna() > 0).all()
    fired = rows[rows["fired"] > 0]
    assert fired["dominant domain"].notna().all() and fired["domain share"].between(0, 1).all()
    # without labels the label and score columns are hidden and the page says so
    assert "label" not in at.dataframe[0].proto.column_order
    assert any("no labels stored" in c.value for c in at.caption)
    assert at.dataframe[0].proto.selection_mode == [DataframeProto.SelectionMode.SINGLE_ROW]  # a click opens a feature


def test_dominant_domain_is_where_most_firings_fall(app_workspace, open_features):
    """The page's single query against a direct count for one busy feature."""
    from workbench.workspace import Workspace

    at = open_features(app_workspace, sae=SAE)
    rows = table(at).set_index("feature")
    with Workspace(app_workspace, read_only=True) as ws:
        feature, = ws.query("SELECT feature FROM feature_stats WHERE sae_id = 1 ORDER BY n_fired DESC, feature LIMIT 1")[0]
        counts = ws.query(
            """SELECT d.domain, count(*) FROM feature_acts a
               JOIN tokens t USING (context_id, position) JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
               JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
               WHERE a.sae_id = 1 AND a.feature = ? GROUP BY ALL ORDER BY 2 DESC, 1""", [feature])
    assert rows.loc[feature, "dominant domain"] == counts[0][0]
    assert rows.loc[feature, "domain share"] == pytest.approx(counts[0][1] / sum(n for _, n in counts))


def test_filters_and_sort(app_workspace, open_features):
    at = open_features(app_workspace, sae=SAE)
    at.text_input(key="features_filter").input("17").run()
    no_exception(at)
    assert table(at)["feature"].tolist() == [17]
    assert any(c.value.startswith("1 of 128 features") for c in at.caption)
    at.text_input(key="features_filter").input("").run()
    at.selectbox(key="features_sort").set_value("density (highest first)").run()
    rows = table(at)
    assert rows["density"].tolist() == sorted(rows["density"], reverse=True)
    domain = rows["dominant domain"].dropna().iloc[0]
    at.selectbox(key="features_domain").set_value(domain).run()
    assert set(table(at)["dominant domain"]) == {domain}
    at.selectbox(key="features_domain").set_value("any").run()
    at.checkbox(key="features_live").check().run()
    assert (table(at)["fired"] > 0).all()
    slider = at.slider(key=f"features_density_{SAE}")
    lo, hi = slider.value
    cut = round(math.log10(rows["density"].median()), 1)
    slider.set_value((cut, hi)).run()
    no_exception(at)
    kept = table(at)
    assert 0 < len(kept) < len(rows) and (kept["density"] >= 10 ** cut * (1 - 1e-6)).all()


def test_random_live_feature_opens_its_page(app_workspace, open_features):
    at = open_features(app_workspace, sae=SAE)
    live = set(table(at).query("fired > 0")["feature"])
    at.button(key="features_random").click().run()
    no_exception(at)
    assert not errors(at)
    title = at.title[0].value
    assert title.startswith("Feature ") and int(title.split()[1]) in live
    assert at.query_params == {"sae": SAE, "feature": title.split()[1]}


def test_unknown_sae_is_one_error_line(app_workspace, open_features):
    at = open_features(app_workspace, sae="nope")
    no_exception(at)
    assert errors(at) == [f"no SAE 'nope' in ws.duckdb; available: 1:{SAE}"]


# -- the map ----------------------------------------------------------------------------------------
def test_map_of_decoder_directions_without_labels(app_workspace, open_features):
    at = open_features(app_workspace, sae=SAE)
    no_exception(at)
    (chart,) = at.get("plotly_chart")
    assert chart.proto.selection_mode == [PlotlyChartProto.SelectionMode.POINTS]  # a click selects a point
    traces = map_traces(at)
    drawn = sorted(f for t in traces for f in t["customdata"])
    assert drawn == list(range(128))  # every feature once: 128 is under the sampling limit
    assert all(math.isfinite(v) for t in traces for v in t["x"] + t["y"])
    assert "log10 density" in json.dumps(traces[0]["marker"])
    assert any("t-SNE" in c.value and "sample" not in c.value for c in at.caption)
    at.radio(key="features_colour").set_value("dominant domain").run()
    no_exception(at)
    names = [t["name"] for t in map_traces(at)]
    assert set(names) - {"never fired"} == set(table(at)["dominant domain"].dropna())


def test_map_and_table_with_labels(app_workspace, open_features, with_labels):
    at = open_features(app_workspace, sae=SAE)
    no_exception(at)
    assert not errors(at)
    rows = table(at).set_index("feature")
    assert rows.loc[3, "label"] == "closing brackets" and rows.loc[3, "score"] == pytest.approx(0.91)
    assert "label" in at.dataframe[0].proto.column_order and "score" in at.dataframe[0].proto.column_order
    assert any("3 labelled" in c.value for c in at.caption)
    hover = {f: text for t in map_traces(at) for f, text in zip(t["customdata"], t["hovertext"])}
    assert hover[17] == "license words" and hover[5] == ""
    at.text_input(key="features_filter").input("KEYWORD").run()  # a part of a label, any case
    assert table(at)["feature"].tolist() == [40]
    at.text_input(key="features_filter").input("").run()
    at.checkbox(key="features_labelled").check().run()
    assert sorted(table(at)["feature"]) == [3, 17, 40]
    at.selectbox(key="features_sort").set_value("label score (highest first)").run()
    assert table(at)["feature"].tolist() == [3, 17, 40]  # no score last


def test_a_sampled_map_says_so(app_workspace, open_features, monkeypatch):
    monkeypatch.setattr(cached, "MAP_LIMIT", 40)
    at = open_features(app_workspace, sae=SAE)
    no_exception(at)
    drawn = [f for t in map_traces(at) for f in t["customdata"]]
    assert len(drawn) == 40 == len(set(drawn))
    assert any("A seeded sample of 40 of the 128 features" in c.value for c in at.caption)


# -- selections ------------------------------------------------------------------------------------
def test_selected_point_and_row_name_the_feature():
    traces = [[4, 9, 11], [2, 7]]
    assert view.selected_feature({"selection": {"points": [{"curve_number": 1, "point_index": 0, "customdata": 2}]}}, traces) == 2
    assert view.selected_feature({"selection": {"points": [{"customdata": [7]}]}}, traces) == 7
    assert view.selected_feature({"selection": {"points": [{"curve_number": 0, "point_index": 2}]}}, traces) == 11
    assert view.selected_feature({"selection": {"points": []}}, traces) is None
    assert view.selected_feature(None, traces) is None
    shown = [{"feature": 30}, {"feature": 12}]
    assert view.selected_row({"selection": {"rows": [1], "columns": []}}, shown) == 12
    assert view.selected_row({"selection": {"rows": [], "columns": []}}, shown) is None


def test_rows_filters_and_sorts():
    table_ = {"feature": [0, 1, 2, 3], "density": [0.0, 0.1, 0.001, 0.02], "n_fired": [0, 10, 1, 2],
              "mean": [None, 1.0, 2.0, 3.0], "max": [None, 2.0, 3.0, 4.0], "domain": [None, "code", "prose", "code"],
              "domain_share": [None, 1.0, 1.0, 0.5]}
    rows = view.rows(table_, {2: ("digits", 0.5, "llm")})
    assert [r["label"] for r in rows] == ["", "", "digits", ""]
    assert view.log_density_bounds(table_) == (-3.0, 0.0)
    assert [r["feature"] for r in view.filtered(rows, live_only=True)] == [1, 2, 3]
    assert [r["feature"] for r in view.filtered(rows, domain="code")] == [1, 3]
    assert [r["feature"] for r in view.filtered(rows, log_density=(-2.0, 0.0))] == [0, 1, 3]  # the dead one passes
    assert [r["feature"] for r in view.filtered(rows, text="DIG")] == [2]
    assert [r["feature"] for r in view.sorted_rows(rows, "max activation (highest first)")] == [3, 2, 1, 0]
    assert [r["feature"] for r in view.sorted_rows(rows, "label (A to Z)")] == [2, 0, 1, 3]
