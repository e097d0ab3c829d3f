"""`workbench moe run/show` and `workbench probe` end to end on tiny models: a tiny-llama workspace
(three-domain JSONL corpus plus one too short to use, 4,096 cached tokens at blocks.1.hook_resid_post, a TopK
SAE of width 64) MoEfied into 8 experts, and a tiny random Mixtral routed by its own routers."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from probes import moe_records
from probes.concepts import CONCEPTS
from probes.moe_kinds import routed
from probes.moefy import Partition, mask_to_topk
from workbench.caching import ActivationCacher, CacheRequest
from workbench.data import load_corpus
from workbench.workspace import Workspace

HOOK = "blocks.1.hook_resid_post"
SAE = "moe-topk"


@pytest.fixture
def main():
    from workbench.cli import main

    return main


def write_corpus(path: Path, n_per_domain: int = 40, seed: int = 0, domains=("code", "prose", "numbers")) -> Path:
    rng = random.Random(seed)
    words = "the a river city old young walked quietly over bridge morning evening letter friend garden rain".split()
    idents = "value count items result index total buffer name key node".split()
    make = {
        "code": lambda i: f"def f{i}(items):\n" + "\n".join(
            f"    {rng.choice(idents)} = {rng.choice(idents)}[{rng.randint(0, 99)}] + {rng.randint(0, 9)}" for _ in range(4))
            + "\n    return result",
        "prose": lambda i: " ".join(rng.choice(words) for _ in range(30)).capitalize() + ".",
        "numbers": lambda i: ", ".join(str(rng.randint(0, 10_000)) for _ in range(12)),
    }
    docs = [(d, make[d](i)) for i in range(n_per_domain) for d in domains]
    docs.append(("rare", "Copyright (c) the authors."))  # shorter than one context: skipped with a notice
    path.write_text("\n".join(json.dumps({"domain": d, "text": t}) for d, t in docs))
    return path


MOE_ARGS = ["--tokens", "128", "--fit-tokens", "256", "--ctx", "32", "--experts", "8", "--k", "2", "--batch", "16", "--quiet"]


@pytest.fixture(scope="module")
def moe_db(tmp_path_factory, tiny) -> Path:
    from workbench.cli import main as plain_main

    root = tmp_path_factory.mktemp("moe_runs")
    corpus = write_corpus(root / "corpus.jsonl")
    db = root / "ws.duckdb"
    request = CacheRequest(model="tiny-llama", hooks=(HOOK,), corpus=str(corpus), tokens=4096, ctx_len=16, batch_size=64)
    with Workspace(db) as ws:
        ActivationCacher(ws, tiny, load_corpus(str(corpus)), request).run(progress=False)
    assert plain_main(["train", "--db", str(db), "--hook", HOOK, "--arch", "topk", "--width", "64", "--k", "4",
                       "--tokens", "4096", "--batch-size", "256", "--no-downstream", "--name", SAE]) == 0
    return db


@pytest.fixture(scope="module")
def moefied_run(moe_db):
    """One `moe run` with the SAE; the model and corpus default to the workspace's."""
    from probes.moe_request import MoeRequest
    from probes.moe_runs import run_moe

    request = MoeRequest(sae=SAE, eval_tokens=128, fit_tokens=256, ctx=32, n_experts=8, k=2, batch_size=16)
    run_id, result = run_moe(moe_db, request, progress=False)
    return run_id, result


def test_moefied_topk_with_nothing_removed_is_mask_to_topk_and_removed_experts_stay_off():
    generator = torch.Generator().manual_seed(0)
    part = Partition.from_labels(torch.randperm(24, generator=generator) % 6, seed=0)
    acts = torch.randn(3, 5, 24, generator=generator)
    torch.testing.assert_close(routed(acts, part, 2), mask_to_topk(acts, part, 2))
    out = routed(acts, part, 2, remove=[1, 4])
    removed = torch.isin(part.expert_of_neuron, torch.tensor([1, 4]))
    assert (out[..., removed] == 0).all()
    kept_experts = (out != 0).reshape(-1, 24)[:, part.neurons_of_expert[:, 0]]  # (n, E): is the expert on
    assert (kept_experts.sum(-1) == 2).all()  # still two experts per token, from the rest
    everything_but_one = routed(acts, part, 6, remove=[0])  # k > experts left: the removed stay off, the rest pass
    torch.testing.assert_close(everything_but_one, torch.where(part.expert_of_neuron == 0, 0.0, acts))


def test_a_moefied_run_stores_the_table_the_matrix_and_the_curve(moe_db, moefied_run):
    run_id, result = moefied_run
    with Workspace(moe_db, read_only=True) as ws:
        (run,) = [r for r in moe_records.runs(ws) if r["moe_run_id"] == run_id]
        assert run["model"] == "tiny-llama" and run["source"] == "moefied" and run["layers"] == [1]  # the SAE's layer
        assert run["n_experts"] == 8 and run["k"] == 2 and run["sae"] == SAE and run["corpus"].endswith("corpus.jsonl")
        assert run["domains"] == ["code", "numbers", "prose"]
        assert any("domain rare: skipped" in n for n in run["notices"])
        assert any("the same layer" in n for n in run["notices"])
        comparison = moe_records.comparison(ws, run_id)
        assert {(r["kind"], r["grouping"]) for r in comparison} == {(k, g) for k in ("moefied", "sae", "neuron")
                                                                     for g in ("domain", "concept")}
        widths = {r["kind"]: r["experts"] for r in comparison}
        assert widths == {"moefied": 8, "sae": 64, "neuron": 192}
        for r in comparison:
            assert 0 <= r["specialised_share"] <= 1 and 0 <= r["mi_norm"] <= 1
            n_groups = 3 if r["grouping"] == "domain" else 6  # purity is at least 1 / (number of groups)
            assert r["mean_purity"] is None or 1 / n_groups - 1e-9 <= r["mean_purity"] <= 1
        every = moe_records.selectivity(ws, run_id)
        assert {(r["grouping"], r["budget"]) for r in every} == {(g, b) for g in ("domain", "concept") for b in ("skew", "matched")}
        sel = [r for r in every if (r["grouping"], r["budget"]) == ("domain", "skew")]
        for kind in ("moefied", "sae", "neuron"):
            rows = [r for r in sel if r["kind"] == kind]
            assert len(rows) == 9  # 3 targets × 3 measured domains
            for r in rows:
                assert r["delta_loss"] == pytest.approx(r["loss_after"] - r["loss_before"])
                if r["n_masked"] == 0:
                    assert r["delta_loss"] == 0 and r["selectivity"] is None  # nothing removed: no selectivity
            for target in ("code", "numbers", "prose"):
                mine = {r["measured"]: r["delta_loss"] for r in rows if r["target"] == target}
                others = np.mean([v for d, v in mine.items() if d != target])
                stored = next(r for r in rows if r["target"] == target)
                if stored["n_masked"]:
                    assert stored["selectivity"] == pytest.approx(mine[target] - others)
        assert any(r["n_masked"] and r["selectivity"] is not None for r in sel)
        curve = moe_records.k_curve(ws, run_id)
        assert sorted({r["k"] for r in curve}) == [1, 2, 4]  # powers of two below E, and k
        assert {r["grp"] for r in curve} == {"all", "code", "numbers", "prose"}
        moefied_before = {r["measured"]: r["loss_before"] for r in sel if r["kind"] == "moefied"}
        at_k = {r["grp"]: r["loss"] for r in curve if r["k"] == 2}
        assert all(at_k[d] == pytest.approx(v) for d, v in moefied_before.items())  # baseline: the top-k model
        dense = {r["grp"]: r["dense_loss"] for r in curve}
        neuron_before = {r["measured"]: r["loss_before"] for r in sel if r["kind"] == "neuron"}
        assert all(dense[d] == pytest.approx(v) for d, v in neuron_before.items())
        routes = moe_records.routes(ws, run_id, 1, limit=10_000)
        n_rows = result.tokens.eval_tokens.shape[0]
        assert len(routes) == n_rows * 32 and all(len(r["experts"]) == 2 for r in routes)
        assert all(r["weights"][0] >= r["weights"][1] for r in routes)
        mass = moe_records.mass(ws, run_id, 1, "moefied", "domain")
        assert len(mass) == 8 * 3
        groups = moe_records.groups(ws, run_id)
        assert {r["grp"] for r in groups if r["grouping"] == "domain"} == {"code", "numbers", "prose"}
        assert sum(r["tokens"] for r in groups if r["grouping"] == "domain" and r["kind"] == "neuron") == run["eval_tokens"]


def test_concept_masking_matched_budgets_and_purge_curves_are_stored(moe_db, moefied_run):
    run_id, result = moefied_run
    widths = {"moefied": 8, "sae": 64, "neuron": 192}
    with Workspace(moe_db, read_only=True) as ws:
        sel = moe_records.selectivity(ws, run_id)
        purge = moe_records.purge(ws, run_id)
        correlation = {(kind, concept): moe_records.correlation(ws, run_id, kind, concept, limit=10_000)
                       for kind in widths for concept in ("digits", "punctuation")}
    for kind, width in widths.items():
        concept_rows = [r for r in sel if (r["kind"], r["grouping"], r["budget"]) == (kind, "concept", "skew")]
        targets = {r["target"] for r in concept_rows}
        assert "other" not in targets and targets <= set(CONCEPTS)  # concepts are targets; the rest is only measured
        assert "other" in {r["measured"] for r in concept_rows}
        matched = [r for r in sel if (r["kind"], r["budget"]) == (kind, "matched")]
        assert matched and all(r["n_masked"] <= math.ceil(width / 16) for r in matched)
        assert any(r["n_masked"] == math.ceil(width / 16) for r in matched)  # the budget is used where experts exist
    for kind, width in widths.items():
        for concept in ("digits", "punctuation"):
            points = [r for r in purge if (r["kind"], r["concept"]) == (kind, concept)]
            assert [r["tau"] for r in points] == [0.5, 0.3, 0.2, 0.1]
            rho = [r["rho"] for r in correlation[(kind, concept)]]
            for r in points:  # the stored correlations say how many units each τ removes
                assert r["n_removed"] == sum(v > r["tau"] for v in rho)
                assert r["share_removed"] == pytest.approx(r["n_removed"] / width)
                if r["n_removed"] == 0:
                    assert (r["concept_loss"], r["other_loss"]) == (r["concept_before"], r["other_before"])
            assert [r["n_removed"] for r in points] == sorted(r["n_removed"] for r in points)  # lower τ removes more
            assert all(-1 <= v <= 1 for v in rho)


def test_the_neuron_purge_equals_zeroing_those_neurons_in_the_hugging_face_mlp(moe_db, moefied_run, tiny):
    """An independent path: a forward pre-hook on the HF down_proj zeroes the purged neurons (BOS untouched)."""
    from probes.concepts import concept_masks
    from workbench.data.vocab import token_strings

    run_id, result = moefied_run
    with Workspace(moe_db, read_only=True) as ws:
        purge = [r for r in moe_records.purge(ws, run_id) if r["kind"] == "neuron" and 0 < r["n_removed"]]
        point = max(purge, key=lambda r: r["n_removed"])
        rho = moe_records.correlation(ws, run_id, "neuron", point["concept"], limit=10_000)
    removed = torch.tensor([r["expert"] for r in rho if r["rho"] > point["tau"]])
    tokens = result.tokens.eval_tokens
    proj = tiny.model.original_model.model.layers[1].mlp.down_proj

    def zero(module, inputs):
        (a,) = inputs
        a = a.clone()
        a[:, 1:, removed] = 0.0
        return (a,)

    handle = proj.register_forward_pre_hook(zero)
    try:
        with torch.inference_mode():
            logits = tiny.model.original_model(tokens).logits[:, :-1].float()
    finally:
        handle.remove()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    # the loss at t predicts t+1 and counts for the concept of the input token t; both t and t+1 must be labelled
    strings = np.asarray(token_strings(tiny.tokenizer), dtype=object)[tokens[:, :-1].reshape(-1).numpy()]
    hit = torch.from_numpy(concept_masks(strings, [point["concept"]])[point["concept"]])
    labels = result.tokens.eval_labels
    labelled = ((labels[:, :-1] >= 0) & (labels[:, 1:] >= 0)).reshape(-1)
    flat = losses.reshape(-1).double()
    # the run's masked forward against this one (batched differently): float32 losses ~11, a few ulps (~1e-6) apart
    assert point["concept_loss"] == pytest.approx(float(flat[hit & labelled].mean()), abs=2e-5)
    assert point["other_loss"] == pytest.approx(float(flat[~hit & labelled].mean()), abs=2e-5)


def test_a_schema_v5_run_is_migrated_and_still_shown(moe_db, moefied_run, main, capsys, tmp_path):
    import duckdb

    db = tmp_path / "v5.duckdb"
    db.write_bytes(moe_db.read_bytes())
    con = duckdb.connect(str(db))  # roll back to v5: selectivity without grouping / budget, no purge tables
    con.execute("DELETE FROM moe_selectivity WHERE grouping <> 'domain' OR budget <> 'skew'")
    con.execute("ALTER TABLE moe_selectivity DROP COLUMN grouping")
    con.execute("ALTER TABLE moe_selectivity DROP COLUMN budget")
    con.execute("ALTER TABLE moe_selectivity DROP COLUMN target_pos")
    con.execute("ALTER TABLE moe_selectivity DROP COLUMN measured_pos")
    con.execute("DROP TABLE moe_purge")
    con.execute("DROP TABLE moe_correlation")
    for table in ("runs", "saes", "analyses"):  # v7's failure reasons
        con.execute(f"ALTER TABLE {table} DROP COLUMN error")
    for column in ("store", "store_url", "chunk_contexts"):  # v8's Parquet store
        con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    con.execute("DROP TABLE shards")
    con.execute("DROP TABLE feature_explanations")  # v9
    con.execute("UPDATE schema_version SET version = 5")
    con.close()
    with Workspace(db) as ws:  # a writer migrates
        assert ws.schema_version() == 9
        rows = moe_records.selectivity(ws, moefied_run[0])
        assert rows and {(r["grouping"], r["budget"]) for r in rows} == {("domain", "skew")}
        assert moe_records.purge(ws, moefied_run[0]) == []
    assert main(["moe", "show", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "by domain, skew budget" in out and "concept purge" not in out


def test_stored_mass_matches_a_naive_recomputation(moe_db, moefied_run, tiny):
    """The neurons' r_{e,d}: mean |a| over each domain's eval tokens, from a fresh forward."""
    run_id, result = moefied_run
    with torch.inference_mode():
        _, cache = tiny.model.run_with_cache(result.tokens.eval_tokens, names_filter=["blocks.1.mlp.out.hook_in"])
    a = cache["blocks.1.mlp.out.hook_in"].reshape(-1, 192).abs()
    labels = result.tokens.eval_labels.reshape(-1)
    with Workspace(moe_db, read_only=True) as ws:
        stored = moe_records.mass(ws, run_id, 1, "neuron", "domain")
    for d, name in enumerate(result.tokens.names):
        expected = a[labels == d].double().mean(0)
        got = torch.tensor([r["mass"] for r in stored if r["grp"] == name], dtype=torch.float64)
        # a fresh float32 forward against the run's (other batches): the means of |a| differ by float32 ulps
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_run_prints_the_table_and_a_rerun_replaces_it(moe_db, moefied_run, main, capsys):
    db = moe_db.with_name("cli.duckdb")
    db.write_bytes(moe_db.read_bytes())
    args = ["moe", "run", "--db", str(db), "--sae", SAE, "--mask", "moefied", "--layer", "0", "--layer", "1", *MOE_ARGS]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "comparison" in out and "masking selectivity, MoEfied experts" in out and "k vs loss" in out
    assert "masking selectivity, SAE latents" not in out  # only the moefied kind was masked
    with Workspace(db, read_only=True) as ws:
        run_id = moe_records.runs(ws)[-1]["moe_run_id"]
        units = {(r["kind"], r["layer"]) for r in moe_records.comparison(ws, run_id)}
        assert units == {("moefied", 0), ("moefied", 1), ("neuron", 0), ("neuron", 1), ("sae", 1)}
        assert ws.query("SELECT DISTINCT layer FROM moe_routes WHERE moe_run_id = ? ORDER BY 1", [run_id]) == [(0,), (1,)]
        removed = {r["target"]: r["n_masked"] for r in moe_records.selectivity(ws, run_id)}
        assert sum(removed.values()) > 0  # specialists of both layers are masked together
    assert main(args) == 0  # same config: replaces the earlier run
    capsys.readouterr()
    with Workspace(db, read_only=True) as ws:
        configs = [json.dumps(r["config"], sort_keys=True) for r in moe_records.runs(ws)]
        assert len(configs) == len(set(configs)) == 2  # the fixture's run and this one
        orphans = ws.query("SELECT count(*) FROM moe_comparison WHERE moe_run_id NOT IN (SELECT moe_run_id FROM moe_runs)")
        assert orphans == [(0,)]
    assert main(["moe", "show", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("moe run ") == 2 and "E=8, k=2" in shown


def test_a_moe_model_is_routed_by_its_own_routers(tmp_path, main, capsys, tiny_mixtral):
    model = tiny_mixtral
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    db = tmp_path / "moe.duckdb"
    run = ["moe", "run", "--db", str(db), "--model", str(model), "--corpus", str(corpus), "--tokens", "64",
           "--fit-tokens", "128", "--ctx", "32", "--quiet"]
    assert "--experts 8 does not match MixtralForCausalLM's routing (E=4, k=2)" in bad(main, [*run, "--experts", "8"], capsys)
    assert "curve k=5 is out of range; choose 1 ≤ k ≤ 4" in bad(main, [*run, "--curve", "5"], capsys)
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "mixtral MoE: E=4, top-2" in out and "masking selectivity, MoE experts" in out
    with Workspace(db, read_only=True) as ws:
        (stored,) = moe_records.runs(ws)
        assert stored["source"] == "router" and stored["layers"] == [0, 1] and (stored["n_experts"], stored["k"]) == (4, 2)
        assert {(r["kind"], r["layer"]) for r in moe_records.comparison(ws, 1)} == {("moe", 0), ("moe", 1)}
        curve = moe_records.k_curve(ws, 1)  # re-routed top-k of every MoE layer; k=2 is the model itself
        assert sorted({r["k"] for r in curve}) == [1, 2, 4]
        at = {(r["k"], r["grp"]): (r["loss"], r["dense_loss"]) for r in curve}
        assert all(at[(2, g)][0] == at[(2, g)][1] for g in ("all", "code", "numbers", "prose"))
        assert all(at[(k, "all")][0] != at[(2, "all")][0] for k in (1, 4))
        assert {r["kind"] for r in moe_records.selectivity(ws, 1)} == {"moe"}
        for layer in (0, 1):
            routes = moe_records.routes(ws, 1, layer, limit=10_000)
            assert routes and all(len(r["experts"]) == 2 and abs(sum(r["weights"]) - 1) < 1e-5 for r in routes)
            assert all(r["weights"][0] >= r["weights"][1] for r in routes)
        freq = {r["expert"]: r["freq"] for r in moe_records.experts(ws, 1, 0, "moe", "domain")}
        assert sum(freq.values()) == pytest.approx(2.0)  # two experts selected per token


def bad(main, argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_writes_no_rows(moe_db, moefied_run, main, capsys, tmp_path):
    db = tmp_path / "bad.duckdb"
    db.write_bytes(moe_db.read_bytes())
    before = db.read_bytes()
    run = ["moe", "run", "--db", str(db), "--quiet"]
    assert "E=7 does not divide d_mlp=192; valid E: 1, 2, 3, 4, 6, 8" in bad(main, [*run, "--experts", "7"], capsys)
    assert "k=9 is out of range for E=8 experts" in bad(main, [*run, "--experts", "8", "--k", "9"], capsys)
    assert "curve k=9 is out of range; choose 1 ≤ k ≤ 8" in bad(main, [*run, "--experts", "8", "--curve", "9"], capsys)
    assert "layer 5 is out of range: LlamaForCausalLM has layers 0..1" in bad(main, [*run, "--layer", "5"], capsys)
    assert f"no SAE 'nope' in bad.duckdb; available: 1:{SAE}" in bad(main, [*run, "--sae", "nope"], capsys)
    assert "argument --mask: invalid choice: 'latent'" in bad(main, [*run, "--mask", "latent"], capsys)
    assert "argument --concept: invalid choice: 'emoji'" in bad(main, [*run, "--concept", "emoji"], capsys)
    assert "argument --budget: invalid choice: 'equal'" in bad(main, [*run, "--budget", "equal"], capsys)
    assert "--matched-share must be in (0, 1), got 1.0" in bad(main, [*run, "--matched-share", "1"], capsys)
    assert "--purge-tau 1.5 is out of range; a correlation threshold is in [-1, 1)" in bad(
        main, [*run, "--purge-tau", "1.5"], capsys)
    one_domain = write_corpus(tmp_path / "one.jsonl", domains=("code",))
    assert "has 1 usable domain(s) (code); expert metrics need at least 2" in bad(
        main, [*run, "--corpus", str(one_domain), *MOE_ARGS], capsys)
    assert "no workspace at" in bad(main, ["moe", "show", "--db", str(tmp_path / "missing.duckdb")], capsys)
    assert "k must be between 1 and the number of latents" in bad(main, ["probe", "--db", str(db), "--sae", SAE, "--k", "0"], capsys)
    assert db.read_bytes() == before
    with Workspace(db, read_only=True) as ws:
        assert ws.query("SELECT count(*) FROM probe_runs") == [(0,)]
        assert len(moe_records.runs(ws)) == 1  # only the fixture's run


def test_probe_stores_and_prints_sparse_probing(moe_db, moefied_run, main, capsys, tmp_path):
    db = tmp_path / "probe.duckdb"
    db.write_bytes(moe_db.read_bytes())
    assert main(["probe", "--db", str(db), "--sae", SAE, "--k", "1", "--k", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"sparse probing: SAE '{SAE}'" in out and "sae@1" in out and "stored as probe run 1" in out
    with Workspace(db, read_only=True) as ws:
        rows = moe_records.probe_results(ws)
        tasks = {r["task"] for r in rows}
        assert tasks == {"domain=code", "domain=numbers", "domain=prose"}
        assert {(r["source"], r["k"]) for r in rows} == {("sae", 1), ("sae", 2), ("residual", 1), ("residual", 2), ("full", 64)}
        assert all(0 <= r["accuracy"] <= 1 and r["sae"] == SAE for r in rows)
    assert main(["probe", "--db", str(db), "--sae", SAE, "--k", "1", "--k", "2", "--quiet"]) == 0  # replaces
    capsys.readouterr()
    with Workspace(db, read_only=True) as ws:
        assert len(moe_records.probe_runs(ws)) == 1
    texts = tmp_path / "texts.jsonl"  # any labelled dataset: run live through the SAE's model
    lines = [{"text": f"def f{i}(x):\n    return x + {i}", "label": "code"} for i in range(14)]
    lines += [{"text": f"The river walked over the old bridge on morning {i}.", "label": "prose"} for i in range(14)]
    texts.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["probe", "--db", str(db), "--sae", SAE, "--k", "1", "--texts", str(texts), "--quiet"]) == 0
    assert "label=prose" in capsys.readouterr().out
    assert main(["moe", "show", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "on domains:" in shown and f"on {texts}:" in shown
    with Workspace(db, read_only=True) as ws:
        assert {r["task"] for r in moe_records.probe_results(ws) if r["dataset"] == str(texts)} == {"label=prose"}
    texts.write_text('{"text": "no label"}')
    assert f"'{texts}' line 1 has no 'label' field (fields: text)" in bad(
        main, ["probe", "--db", str(db), "--sae", SAE, "--texts", str(texts)], capsys)
    csv_texts = tmp_path / "texts.csv"  # the same dataset as CSV with other column names
    csv_texts.write_text("body,topic\n" + "\n".join(f'"{line["text"]}",{line["label"]}' for line in lines))
    assert main(["probe", "--db", str(db), "--sae", SAE, "--k", "1", "--texts", str(csv_texts), "--text-field", "body",
                 "--label-field", "topic", "--quiet"]) == 0
    assert "label=prose" in capsys.readouterr().out


def test_masking_never_removes_every_expert_of_a_moe_layer():
    """A matched share that would take all of a layer's experts is skipped with a notice, not sent to the router."""
    from probes.expert_summary import summarise
    from probes.moe_groups import TokenGroups
    from probes.moe_masking import masking_matrices
    from probes.moe_request import MoeRequest

    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])  # (rows, ctx)
    domain = torch.tensor([[-1, 0, 0, 0], [-1, 1, 1, 1]])
    vocab = np.asarray([f"t{i}" for i in range(16)], dtype=object)
    groups = TokenGroups.of(ids, domain, ("a", "b"), vocab, None)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.1, 0.1, 0.1, 0.1]])  # every expert peaks on "a"
    fitted = {("moe", 0, g): summarise(scores, torch.tensor([0, 1]), ["a", "b"]) for g in ("domain", "concept")}
    calls = []

    def ablated(kind, remove, desc):
        calls.append({L: len(v) for L, v in remove.items()})
        return torch.zeros(2, 3)

    notices: list[str] = []
    request = MoeRequest(budgets=("matched",), matched_share=0.99)
    masking = masking_matrices({"moe": [0]}, fitted, {"moe": torch.zeros(2, 3)}, groups, ablated, request, notices)
    assert all(n < 4 for call in calls for n in call.values())
    assert any("mask moe of a (matched): skipped, it would remove every expert of a layer" in n for n in notices)
    (domain_masking,) = [m for m in masking if m.grouping == "domain"]
    assert "a" not in domain_masking.matrix.targets
