"""Every page of the Streamlit app under ``AppTest`` on a small analysed workspace.

Each page must render without an exception; bad input (out-of-range feature, unknown SAE,
invalid regex, a newer schema, a busy workspace) must show one line, never a traceback.
"""

import subprocess
import sys

import duckdb
import pytest

SAE = "tiny-topk"  # the SAE tests/app/conftest.py trains
PAGES = ("home", "feature", "compare", "prompt", "steering")  # the names open_page takes


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def plotly_charts(at):
    return at.get("plotly_chart")


def page_links(at) -> dict[str, str]:
    return {p.proto.label: p.proto.query_string for p in at.get("page_link")}


# -- Workspace (Home) ------------------------------------------------------------------------------
def test_home_lists_runs_corpora_hooks_and_saes_with_metrics(app_workspace, open_page):
    at = open_page(app_workspace)
    no_exception(at)
    assert not errors(at)
    assert [t.value for t in at.title] == ["Workspace"]
    assert len(at.dataframe) == 4  # runs, corpora, hooks, SAEs
    runs, corpora, hooks, saes = (d.value for d in at.dataframe)
    assert runs["model"].tolist() == ["tiny-llama"] and runs["tokens"].tolist() == [8192]
    assert corpora["spec"].tolist() == ["stdlib"]
    assert hooks["hook"].tolist() == ["blocks.1.hook_resid_post"]
    assert saes["name"].tolist() == [SAE] and saes["analysed"].tolist() == ["done"]
    assert saes["L0"].iloc[0] == pytest.approx(4.0) and 0 < saes["FVU"].iloc[0] < 1.5
    assert {"dead", "dense >1%", "dense >10%"} <= set(saes.columns)
    assert page_links(at) == {f"{SAE}: feature 0": f"sae={SAE}&feature=0"}


def test_missing_workbench_db_is_one_error_line(open_page, monkeypatch):
    at = open_page("unused")
    monkeypatch.delenv("WORKBENCH_DB")
    at.run()
    no_exception(at)
    assert errors(at) == ["WORKBENCH_DB is not set: start the browser with `workbench app --db WORKSPACE`"]


@pytest.mark.parametrize("page", ["feature", "features", "compare", "prompt", "steering"])
def test_pages_of_a_workspace_without_saes_say_what_to_run(page, open_page, tmp_path):
    from workbench.workspace import Workspace

    db = tmp_path / "empty.duckdb"
    with Workspace(db):
        pass
    at = open_page(db, page)
    no_exception(at)
    assert not errors(at)
    notes = [i.value for i in at.info]
    assert len(notes) == 1 and notes[0].startswith("No trained SAE in this workspace yet: train") and "`workbench train`" in notes[0]
    assert len(at.title) == 1


# -- Feature -------------------------------------------------------------------------------------
def test_feature_page_from_url(app_workspace, busiest_feature, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=busiest_feature)
    no_exception(at)
    assert not errors(at)
    assert at.title[0].value == f"Feature {busiest_feature}"
    assert at.sidebar.selectbox[0].value == SAE and at.sidebar.number_input[0].value == busiest_feature
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) == {"Density", "Tokens fired", "Mean activation", "Max activation"}
    assert metrics["Density"].endswith("%") and int(metrics["Tokens fired"].replace(",", "")) > 0
    assert len(plotly_charts(at)) == 1  # activation histogram
    promoted, suppressed = (d.value for d in at.dataframe)
    assert len(promoted) == 10 and (promoted["effect"] > 0).all()
    assert len(suppressed) == 10 and (suppressed["effect"] < 0).all()
    highlighted = [m.value for m in at.markdown if 'class="wb-example"' in m.value]
    assert highlighted and all('class="wb-token"' in h and "background:rgba(255,145,0," in h for h in highlighted)
    assert any("outline:2px solid" in h for h in highlighted)  # the example's own token
    assert "\n" not in "".join(highlighted)  # newlines are drawn as ↵, never break the HTML block
    # the highest band is an expander, or (its windows all among the top examples) named as empty
    assert any(e.label.startswith("band 10 of 10") for e in at.expander) or \
        any("No further windows in band" in c.value and "10" in c.value.split(" of ")[0] for c in at.caption)
    related = page_links(at)
    assert related.pop("Steer with this") == f"sae={SAE}&feature={busiest_feature}"  # to the Steering page
    assert len(related) == 5 and all(q.startswith(f"sae={SAE}&feature=") for q in related.values())


def test_sidebar_drives_the_url(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=1)
    at.sidebar.number_input[0].set_value(2).run()
    no_exception(at)
    assert at.title[0].value == "Feature 2"
    assert at.query_params == {"sae": SAE, "feature": "2"}


def test_defaults_without_query_params(app_workspace, open_page):
    at = open_page(app_workspace, "feature")
    no_exception(at)
    assert at.title[0].value == "Feature 0" and at.query_params == {"sae": SAE, "feature": "0"}


@pytest.mark.parametrize("query, message", [
    ({"feature": 999}, f"feature 999 is out of range for SAE '{SAE}': valid ids are 0..127"),
    ({"feature": -1}, f"feature -1 is out of range for SAE '{SAE}': valid ids are 0..127"),
    ({"feature": "abc"}, "feature id in the URL must be a whole number, got 'abc'"),
    ({"sae": "nope", "feature": 1}, f"no SAE 'nope' in ws.duckdb; available: 1:{SAE}"),
])
def test_bad_feature_url_is_one_error_line(app_workspace, open_page, query, message):
    at = open_page(app_workspace, "feature", **{"sae": SAE, **query})
    no_exception(at)
    assert errors(at) == [message]
    assert not [m for m in at.markdown if "wb-example" in m.value]


def test_sae_by_id_in_url(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=1, feature=3)
    no_exception(at)
    assert at.sidebar.selectbox[0].value == SAE and at.title[0].value == "Feature 3"


def test_search_by_token_regex_links_features(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.text_input(key="search_text").input(r"^ (the|The)$").run()
    no_exception(at)
    assert not errors(at)
    links = page_links(at)
    found = [label for label in links if label.startswith("feature ")]
    assert len(found) > 5  # search results, then the 5 related features
    assert any("F1 " in c.value and "precision" in c.value for c in at.caption)


@pytest.mark.parametrize("pattern, detail", [
    ("(unclosed", "missing ): (unclosed"),
    ("(?=lookahead)", "invalid perl operator"),  # RE2 (DuckDB) has no lookarounds
])
def test_search_with_invalid_regex_is_one_error_line(app_workspace, open_page, pattern, detail):
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.text_input(key="search_text").input(pattern).run()
    no_exception(at)
    assert len(errors(at)) == 1 and errors(at)[0].startswith(f"invalid regular expression '{pattern}': {detail}")
    assert at.title[0].value == "Feature 0"  # the feature itself still shows


def test_search_by_feature_id_jumps(app_workspace, open_page):
    at = open_page(app_workspace, "feature", sae=SAE, feature=0)
    at.radio(key="search_mode").set_value("feature id").run()
    at.text_input(key="search_text").input("17").run()
    no_exception(at)
    assert at.title[0].value == "Feature 17" and at.query_params["feature"] == "17"
    at.text_input(key="search_text").input("seventeen").run()
    assert errors(at) == ["feature id must be a whole number, got 'seventeen'"]


# -- Compare SAEs and Prompt inspector ---------------------------------------------------------------
def test_compare_page(app_workspace, open_page):
    at = open_page(app_workspace, "compare")
    no_exception(at)
    assert not errors(at)
    assert at.selectbox[0].value == "blocks.1.hook_resid_post"
    assert at.dataframe[0].value["name"].tolist() == [SAE]
    charts = plotly_charts(at)
    assert len(charts) == 3  # frontier, dead/dense fractions, density histograms
    titles = [c.proto.spec for c in charts]
    assert "Sparsity" in titles[0] and "Dead and dense" in titles[1] and "log10(firing density)" in titles[2]


def test_prompt_inspector_heatmap(app_workspace, open_page):
    at = open_page(app_workspace, "prompt")
    no_exception(at)
    assert not errors(at) and not at.warning
    (chart,) = plotly_charts(at)
    assert '"type":"heatmap"' in chart.proto.spec.replace(" ", "")
    table = at.dataframe[0].value
    assert list(table.columns[:3]) == ["#", "token", "top 1"] and len(table) > 10
    assert "↵" in table["token"].tolist()  # the default prompt's newline, made visible
    assert all(q.startswith(f"sae={SAE}&feature=") for q in page_links(at).values())


def test_prompt_longer_than_the_context_is_truncated_with_a_notice(app_workspace, open_page):
    at = open_page(app_workspace, "prompt")
    at.slider[0].set_value(3)
    at.text_area[0].input("word " * 700).run()  # tiny-llama's context is 512 positions
    no_exception(at)
    assert [w.value for w in at.warning] == [
        "The prompt is longer than the model's context: only its first 511 tokens (after BOS) were run and are shown."]
    assert len(at.dataframe[0].value) == 511 and "top 3" in at.dataframe[0].value.columns


# -- workspace problems on every page ------------------------------------------------------------------
@pytest.fixture
def writer(workspace_copy):
    """Another process holding the workspace open for writing, as `workbench cache` would."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, time; c = duckdb.connect({str(workspace_copy)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_busy_workspace_warns_and_retries_on_every_page(workspace_copy, writer, open_page):
    opened = {}
    for page in PAGES:
        at = opened[page] = open_page(workspace_copy, page, sae=SAE, feature=1)
        no_exception(at)
        assert not errors(at)
        (warning,) = at.warning
        assert warning.value.startswith("workspace busy:") and f"(pid {writer.pid})" in warning.value
        assert [b.label for b in at.button] == ["Retry"]
    writer.kill()
    writer.wait()
    at = opened["home"]
    at.button[0].click().run()  # the same session, once the writer is gone
    no_exception(at)
    assert not at.warning and len(at.dataframe) == 4


def test_newer_schema_is_one_error_line_on_every_page(workspace_copy, open_page):
    con = duckdb.connect(str(workspace_copy))
    con.execute("UPDATE schema_version SET version = 99")
    con.close()
    for page in PAGES:
        at = open_page(workspace_copy, page, sae=SAE, feature=1)
        no_exception(at)
        (message,) = errors(at)
        assert "has schema version 99, newer than this workbench's" in message


def test_sae_not_analysed_yet(workspace_copy, open_page):
    from workbench.cli import main

    assert main(["train", "--db", str(workspace_copy), "--hook", "blocks.1.hook_resid_post", "--arch", "topk",
                 "--width", "32", "--k", "2", "--tokens", "2048", "--batch-size", "512", "--no-downstream",
                 "--name", "fresh"]) == 0
    at = open_page(workspace_copy, "feature", sae="fresh", feature=0)
    no_exception(at)
    (message,) = errors(at)
    assert message.startswith("SAE 'fresh' is not analysed yet: run `workbench analyze --db ")

    at = open_page(workspace_copy, "home")
    no_exception(at)
    assert at.dataframe[3].value["analysed"].tolist() == ["done", "no"]
    assert any("`fresh` is not analysed yet" in c.value for c in at.caption)

    at = open_page(workspace_copy, "compare")
    no_exception(at)
    assert at.dataframe[0].value["name"].tolist() == [SAE, "fresh"]
    frontier = at.get("plotly_chart")[0].proto.spec
    assert frontier.count('"fresh"') == 1 and "tiny-topk" in frontier
    assert any("Not analysed yet" in c.value and "fresh" in c.value for c in at.caption)
