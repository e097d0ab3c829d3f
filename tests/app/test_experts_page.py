"""The app's Experts page (Streamlit AppTest) on one workspace with a tiny random Mixtral routed by its own
routers (run 1), a MoEfied tiny-llama run (run 2, the default), a probing run and tiny-llama's vocabulary; the
same runs in a workspace migrated from schema v5 (no purge, no concept or matched masking, no k curve for the
MoE); and the empty state. None of the runs has an SAE."""

import json
import random
from pathlib import Path

import duckdb
import pytest

from probes import moe_records
from probes.probing import ProbeRow, ProbingResult
from workbench.workspace import MIGRATIONS, Workspace

HOME = Path(__file__).resolve().parents[2] / "app" / "Home.py"
ROUTER, MOEFIED = 1, 2  # moe_run_id of each run in the fixture
TAUS = (0.3, 0.1)


@pytest.fixture(scope="module")
def experts_db(tmp_path_factory, tiny, tiny_mixtral) -> Path:
    from probes.moe_request import MoeRequest
    from probes.moe_runs import run_moe
    from workbench.caching import ActivationCacher, CacheRequest
    from workbench.data import load_corpus

    root = tmp_path_factory.mktemp("experts_page")
    rng = random.Random(0)
    words = "the a river city old young walked over bridge morning letter friend garden rain".split()
    docs = []
    for i in range(30):
        docs.append({"domain": "code", "text": f"def f{i}(x):\n    return x * {i} + len([y for y in range({i})])"})
        docs.append({"domain": "prose", "text": " ".join(rng.choice(words) for _ in range(25)).capitalize() + "."})
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs))
    db = root / "ws.duckdb"
    with Workspace(db) as ws:  # a small cache run: the workspace's vocabulary of tiny-llama
        ActivationCacher(ws, tiny, load_corpus(str(corpus)), CacheRequest(
            model="tiny-llama", hooks=("blocks.1.hook_resid_post",), corpus=str(corpus), tokens=256, ctx_len=16,
            batch_size=64)).run(progress=False)
    mixtral = tiny_mixtral
    assert run_moe(db, MoeRequest(model=str(mixtral), corpus=str(corpus), eval_tokens=64, fit_tokens=128, ctx=32,
                                  batch_size=16, purge_taus=TAUS, concepts=("punctuation", "capitalised")),
                   progress=False)[0] == ROUTER
    request = MoeRequest(model="tiny-llama", corpus=str(corpus), eval_tokens=96, fit_tokens=192, ctx=32, n_experts=8, k=2,
                         batch_size=16, mask=("moefied",), purge_taus=TAUS)
    assert run_moe(db, request, loaded=tiny, progress=False)[0] == MOEFIED
    rows = [ProbeRow("domain=code", source, k, 0.75 + 0.05 * k, 40, 10, "stratified", tuple(range(k)))
            for source in ("sae", "residual") for k in (1, 2)]
    rows.append(ProbeRow("domain=code", "full", 64, 0.95, 40, 10, "stratified", ()))
    with Workspace(db) as ws:
        moe_records.save_probing(ws, ProbingResult("demo", "blocks.1.hook_resid_post", (1, 2), 0, rows,
                                                   ["domain=rare: skipped, 1 positive / 99 negative examples"]))
    return db


V5_TABLES = ("vocab", "moe_runs", "moe_groups", "moe_mass", "moe_experts", "moe_comparison", "moe_selectivity",
             "moe_k_curve", "moe_routes", "probe_runs", "probe_results")


@pytest.fixture(scope="module")
def v5_db(experts_db, tmp_path_factory) -> Path:
    """The fixture's rows as schema v5 stored them (no MoE k curve, domain/skew masking only, no purge or
    correlations), then migrated to v6 by opening the workspace for writing."""
    db = tmp_path_factory.mktemp("experts_v5") / "v5.duckdb"
    con = duckdb.connect(str(db))
    try:
        for version in range(1, 6):
            con.execute(MIGRATIONS[version])
        con.execute("UPDATE schema_version SET version = 5")
        con.execute(f"ATTACH '{experts_db}' AS src (READ_ONLY)")
        only = {"moe_selectivity": "WHERE grouping = 'domain' AND budget = 'skew'",
                "moe_k_curve": "WHERE moe_run_id IN (SELECT moe_run_id FROM src.moe_runs WHERE source = 'moefied')"}
        for table in V5_TABLES:
            columns = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_catalog = "
                                                 "current_database() AND table_name = ? ORDER BY ordinal_position",
                                                 [table]).fetchall()]
            con.execute(f"INSERT INTO {table} SELECT {', '.join(columns)} FROM src.{table} {only.get(table, '')}")
    finally:
        con.close()
    with Workspace(db) as ws:
        assert ws.schema_version() == 9 and ws.query("SELECT count(*) FROM moe_purge") == [(0,)]
        assert {tuple(r) for r in ws.query("SELECT DISTINCT grouping, budget FROM moe_selectivity")} == {("domain", "skew")}
    return db


def open_page(db: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_DB", str(db))
    at = AppTest.from_file(str(HOME), default_timeout=60)
    at.switch_page("pages/6_Experts.py")
    at.run()
    return at


def charts(at) -> dict[str, dict]:
    """Every plotly chart's spec by its title."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def chart(at, prefix: str) -> dict:
    (spec,) = [s for title, s in charts(at).items() if title.startswith(prefix)]
    return spec


def choose_run(at, run_id: int):
    box = at.selectbox(key="moe-run")
    (label,) = [o for o in box.options if o.startswith(f"run {run_id}:")]
    return box.set_value(label).run()


def routing_html(at) -> str:
    (html,) = [m.value for m in at.markdown if 'class="wb-routing"' in m.value]
    return html


def test_moefied_run_shows_curve_comparison_heatmap_selectivity_purge_routing_and_probing(experts_db, monkeypatch):
    at = open_page(experts_db, monkeypatch)  # the newest run: MoEfied tiny-llama
    assert not at.exception and not at.error
    titles = list(charts(at))
    for expected in ("Loss of top-k routing vs k (dashed: dense)", "Experts vs latents vs neurons, by domain",
                     "Specialisation share by domain", "p(domain | expert)",
                     "Masking selectivity: MoEfied experts (by domain, skew budget)", "Concept purge: "):
        assert any(expected in t for t in titles), expected
    assert "8 (dense)" in chart(at, "Loss of top-k")["layout"]["xaxis"]["ticktext"]
    comparison = at.dataframe[0].value
    assert set(comparison["kind"]) == {"moefied", "neuron"} and set(comparison["grouping"]) == {"domain"}
    probing = at.dataframe[-1].value
    assert probing["task"].tolist() == ["domain=code"] and probing["full"].tolist() == [0.95]
    assert probing["sae@2"].tolist() == [0.85]
    assert any("domain=rare: skipped" in c.value for c in at.caption)

    at.radio(key=f"grouping-{MOEFIED}").set_value("concept").run()  # regroup by token concept
    assert not at.exception
    assert any("p(concept | expert)" in t for t in charts(at))
    assert set(at.dataframe[0].value["grouping"]) == {"concept"}
    heatmap = at.selectbox(key=f"heatmap-units-{MOEFIED}")
    heatmap.set_value(heatmap.options[-1]).run()  # the neurons' heatmap: 64 purest of 192
    assert not at.exception
    assert any("Showing the 64 purest of 192 experts" in c.value for c in at.caption)


def test_selectivity_switches_grouping_and_budget(experts_db, monkeypatch):
    at = open_page(experts_db, monkeypatch)
    grouping, budget = at.radio(key=f"sel-grouping-{MOEFIED}"), at.radio(key=f"sel-budget-{MOEFIED}")
    assert grouping.options == ["domain", "concept"] and budget.options == ["skew", "matched"]
    table = next(d.value for d in at.dataframe if "share removed" in d.value.columns)
    assert set(table["target"]) == {"code", "prose"} and set(table["kind"]) == {"moefied"}
    assert any("**skew budget**" in c.value for c in at.caption)

    grouping.set_value("concept")
    budget.set_value("matched")
    at.run()
    assert not at.exception
    heat = chart(at, "Masking selectivity: MoEfied experts (by concept, matched budget)")["data"][0]
    assert "other" in heat["x"] and not {"code", "prose"} & set(heat["x"])
    table = next(d.value for d in at.dataframe if "share removed" in d.value.columns)
    assert "code" not in set(table["target"]) and (table["share removed"] == table["removed"] / 8).all()
    assert (table["removed"] <= 1).all()  # ⌈8 / 16⌉ = 1 expert per target, fewer when none leans towards it
    assert any("**matched budget**" in c.value and "⌈0.0625 × units⌉" in c.value for c in at.caption)


def test_purge_figure_and_correlated_units(experts_db, monkeypatch):
    at = open_page(experts_db, monkeypatch)
    concept = at.selectbox(key=f"purge-concept-{MOEFIED}")
    assert concept.value == concept.options[0] and len(concept.options) == 5  # every default concept
    spec = chart(at, f"Concept purge: {concept.value}")
    assert [t["name"] for t in spec["data"]] == [f"MoEfied experts: Δ loss on '{concept.value}' tokens",
                                                 "MoEfied experts: Δ loss on the other tokens"]
    assert [t["line"]["dash"] for t in spec["data"]] == ["solid", "dash"]
    assert [c[0] for c in spec["data"][0]["customdata"]] and {c[0] for c in spec["data"][0]["customdata"]} <= set(TAUS)
    units = at.dataframe[-2].value  # the correlated units, before the probing table
    assert list(units.columns) == ["layer", "expert", "ρ", "removed from τ"] and len(units) == 8
    assert units["ρ"].is_monotonic_decreasing

    concept.set_value(concept.options[-1]).run()
    assert not at.exception and any(t.startswith(f"Concept purge: {concept.options[-1]}") for t in charts(at))
    at.selectbox(key=f"purge-kind-{MOEFIED}").set_value("MLP neurons").run()  # correlations of a kind not purged
    assert not at.exception
    units = at.dataframe[-2].value
    assert list(units.columns) == ["layer", "neuron", "ρ"] and len(units) == 20
    at.checkbox(key=f"purge-log-{MOEFIED}").check().run()
    assert chart(at, "Concept purge")["layout"]["xaxis"]["type"] == "log"


def test_moefied_routing_shows_words_from_the_workspace_vocabulary(experts_db, monkeypatch):
    from workbench.app.experts_view import UNMEASURED

    at = open_page(experts_db, monkeypatch)
    assert f"route-layer-{MOEFIED}" not in {w.key for w in at.selectbox}  # one layer: no layer choice
    rows = at.selectbox(key=f"route-row-{MOEFIED}-1")
    assert len(rows.options) >= 2 and any("code" in o for o in rows.options) and any("prose" in o for o in rows.options)
    html = routing_html(at)
    assert html.count('class="wb-route"') == 32 and "⟨" not in html  # tokens as words, from the vocab table
    first = html.split("</span>")[0]
    assert f"background:{UNMEASURED}" in first and "not routed" in first  # a MoEfied BOS passes unchanged
    assert "expert score ‖a‖s" in html and "def" in html
    assert any("top-1 expert" in m.value for m in at.markdown)

    rows.set_value(rows.options[-1]).run()
    assert not at.exception and "return" not in routing_html(at)  # the last context is prose
    at.checkbox(key=f"route-highlight-on-{MOEFIED}").check().run()
    at.number_input(key=f"route-highlight-{MOEFIED}").set_value(3).run()
    assert not at.exception
    assert "rgba(255,145,0," in routing_html(at) and any("expert 3's score" in c.value for c in at.caption)


def test_moe_router_run_labels_its_own_routing_and_routes_every_layer(experts_db, monkeypatch):
    at = choose_run(open_page(experts_db, monkeypatch), ROUTER)
    assert not at.exception and not at.error
    curve = chart(at, "Loss of top-k routing vs k (dashed: own top-2 routing)")
    assert curve["layout"]["xaxis"]["ticktext"] == ["1", "2 (own)", "4"]
    assert {t["name"] for t in curve["data"] if t.get("line", {}).get("dash") == "dash"} >= {"all own top-2 routing"}
    assert set(at.dataframe[0].value["kind"]) == {"moe"}  # no neurons, no SAE
    assert "Masking selectivity: MoE experts (by domain, skew budget)" in charts(at)
    purge = next(s for t, s in charts(at).items() if t.startswith("Concept purge"))
    assert [t["line"]["dash"] for t in purge["data"]] == ["solid", "dash"] and "MoE experts" in purge["data"][0]["name"]
    assert at.selectbox(key=f"purge-kind-{ROUTER}").options == ["MoE experts"]

    html = routing_html(at)
    assert "⟨" not in html and "routing weights" in html  # words from the model folder's tokenizer
    assert "not routed" not in html  # the MoE's routers do route BOS
    at.selectbox(key=f"route-layer-{ROUTER}").set_value(1).run()
    assert not at.exception and routing_html(at) != html
    at.checkbox(key=f"route-highlight-on-{ROUTER}").check().run()
    highlight = at.number_input(key=f"route-highlight-{ROUTER}")
    assert highlight.max == 3
    highlight.set_value(3).run()
    assert not at.exception and "rgba(255,145,0," in routing_html(at)
    assert any("routing weight (1 = all of the token's routing)" in c.value for c in at.caption)


def test_runs_migrated_from_schema_v5_render_without_purge(v5_db, monkeypatch):
    at = open_page(v5_db, monkeypatch)
    assert not at.exception and not at.error
    assert any("No concept purge in this run" in i.value for i in at.info)
    assert not any(t.startswith("Concept purge") for t in charts(at))
    assert at.radio(key=f"sel-grouping-{MOEFIED}").options == ["domain"]
    assert at.radio(key=f"sel-budget-{MOEFIED}").options == ["skew"]
    assert "Masking selectivity: MoEfied experts (by domain, skew budget)" in charts(at)
    assert 'class="wb-routing"' in routing_html(at)

    at = choose_run(at, ROUTER)
    assert not at.exception and not at.error
    assert not any(t.startswith("Loss of top-k") for t in charts(at))  # v5 had no k curve for MoE models
    assert "Masking selectivity: MoE experts (by domain, skew budget)" in charts(at)
    assert any("No concept purge in this run" in i.value for i in at.info)


def test_experts_page_without_results_says_how_to_make_them(tmp_path, monkeypatch):
    db = tmp_path / "empty.duckdb"
    with Workspace(db):
        pass
    at = open_page(db, monkeypatch)
    assert not at.exception
    assert "workbench moe run" in at.info[0].value and "workbench probe" in at.info[0].value
