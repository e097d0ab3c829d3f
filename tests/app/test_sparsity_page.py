"""The app's Sparsity page (Streamlit AppTest) on ``sparsity_db`` (tests/conftest.py: tiny-llama measured,
a synthetic relu and silu series and a silu-law fit), and the empty state."""

from pathlib import Path

from workbench.workspace import Workspace

HOME = Path(__file__).resolve().parents[2] / "app" / "Home.py"


def test_sparsity_page_shows_layers_tradeoff_and_laws(sparsity_db, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_DB", str(sparsity_db))
    at = AppTest.from_file(str(HOME), default_timeout=60)
    at.switch_page("pages/5_Sparsity.py")
    at.run()
    assert not at.exception and not at.error
    titles = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("Activation ratio per layer" in t for t in titles)
    assert any("Perplexity cost of truncation" in t for t in titles)
    law_figures = {name: [t for t in titles if f"{name}: cett@PPL-1%" in t] for name in ("relu-d128-l4", "silu-d128-l4")}
    assert all(len(found) == 1 for found in law_figures.values())  # one figure per series
    assert "silu law (R" in law_figures["silu-d128-l4"][0]  # with its fitted curve
    assert not any("width/depth" in t for t in titles)  # both series have one shape
    assert "silu" in at.dataframe[-1].value["law"].tolist()


def test_sparsity_page_without_measurements_says_how_to_make_them(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    db = tmp_path / "empty.duckdb"
    with Workspace(db):
        pass
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    at = AppTest.from_file(str(HOME), default_timeout=60)
    at.switch_page("pages/5_Sparsity.py")
    at.run()
    assert not at.exception
    assert "workbench sparsity measure" in at.info[0].value
