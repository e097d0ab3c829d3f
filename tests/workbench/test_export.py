"""`workbench export`: activations as Parquet read by pyarrow, DuckDB and Hugging Face datasets; as sae-lens's
cached-activation datasets read by sae-lens's ActivationsStore; feature data as SAEDashboard's Neuronpedia batch
files, checked against a JSON Schema of that layout and against the workspace's feature store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import jsonschema
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import yaml

from workbench import features as fx
from workbench.activations import context_ids, read_contexts
from workbench.cli import main
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"
SAE, RAW = "base", "raw"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One cache run, an SAE trained and analysed with logit effects, and one trained but not analysed."""
    db = tmp_path_factory.mktemp("export") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "4096", "--ctx", "32", "--db", str(db)]) == 0
    train = ["train", "--db", str(db), "--hook", HOOK, "--k", "4", "--batch-size", "256", "--warmup-steps", "2", "--no-downstream"]
    assert main([*train, "--width", "96", "--tokens", "8192", "--name", SAE]) == 0
    assert main(["analyze", "--db", str(db), "--sae", SAE]) == 0
    assert main([*train, "--width", "64", "--tokens", "1024", "--name", RAW]) == 0
    return db


@pytest.fixture(scope="module")
def expected(built):
    """The first three contexts' activations (storage dtype), ids and token ids, read through the workspace API."""
    with Workspace(built, read_only=True) as ws:
        ids = context_ids(ws, HOOK)
        acts = read_contexts(ws, HOOK, ids[:3], dtype=None)
        tokens = ws.query("SELECT token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[])) ORDER BY context_id, position",
                          [ids[:3]])
    return ids, acts, torch.tensor([t for (t,) in tokens]).view(3, -1)


# -- activations as Parquet -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_export(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parquet") / "export"
    assert main(["export", "--db", str(built), "--out", str(out)]) == 0
    return out


def test_parquet_hive_reads_get_one_column_per_partition_key(parquet_export, expected):
    ids, acts, _ = expected
    table = pads.dataset(parquet_export / "activations", format="parquet", partitioning="hive").to_table(
        filter=(pads.field("hook") == HOOK) & pads.field("context_id").isin(ids[:3]))
    assert table.column_names == ["run_id", "hook", "context_id", "position", "activation"]  # the keys merged, not doubled
    assert set(table.column("run_id").to_pylist()) == {1} and set(table.column("hook").to_pylist()) == {HOOK}
    order = np.lexsort((table.column("position").to_numpy(), table.column("context_id").to_numpy()))
    values = np.stack(table.column("activation").to_numpy(zero_copy_only=False))[order]
    assert np.array_equal(values.reshape(acts.shape), acts.numpy())
    plain = pads.dataset(parquet_export / "activations", format="parquet")  # no partitioning: the columns are in the files
    assert plain.schema.names == table.column_names

    for hive in ("true", "false"):
        rows = duckdb.sql(
            f"""SELECT run_id, hook, activation FROM read_parquet('{parquet_export}/activations/**/*.parquet', hive_partitioning = {hive})
                WHERE hook = '{HOOK}' AND context_id IN ({ids[0]}, {ids[1]}, {ids[2]}) ORDER BY context_id, position"""
        ).fetchall()
        assert {(r, h) for r, h, _ in rows} == {(1, HOOK)}
        torch.testing.assert_close(torch.tensor([a for _, _, a in rows]).view(acts.shape), acts.float())
        columns = [c for c, *_ in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{parquet_export}/activations/**/*.parquet', "
                                             f"hive_partitioning = {hive})").fetchall()]
        assert columns == ["run_id", "hook", "context_id", "position", "activation"]
    contexts = duckdb.sql(f"SELECT DISTINCT run_id FROM read_parquet('{parquet_export}/contexts/*/*.parquet', hive_partitioning = false)")
    assert contexts.fetchall() == [(1,)]


def test_parquet_export_loads_in_hf_datasets_with_its_card(parquet_export, expected, tmp_path):
    from datasets import load_dataset

    ids, acts, tokens = expected
    card = (parquet_export / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    names = [c["config_name"] for c in front["configs"]]
    assert names == [f"activations-run1-{HOOK}", "tokens", "contexts", "documents"]
    for needle in ("tiny-llama", HOOK, "stdlib", "| 32 |", "float16", "4,096", "sparse-workbench"):
        assert needle in card
    config = load_dataset(str(parquet_export), names[0], split="train", cache_dir=str(tmp_path / "hf"))
    assert config.column_names == ["run_id", "hook", "context_id", "position", "activation"]  # the partition keys survive
    first = config.filter(lambda row: row["context_id"] in ids[:3]).sort(["context_id", "position"]).with_format("torch")[:]
    assert set(first["run_id"].tolist()) == {1} and set(first["hook"]) == {HOOK}
    assert torch.equal(first["activation"].view(acts.shape).to(acts.dtype), acts)
    by_glob = load_dataset("parquet", data_files=str(parquet_export / "activations/**/*.parquet"), split="train",
                           cache_dir=str(tmp_path / "hf2"))
    assert "hook" in by_glob.column_names and "run_id" in by_glob.column_names and len(by_glob) == len(ids) * 32
    token_rows = load_dataset(str(parquet_export), "tokens", split="train", cache_dir=str(tmp_path / "hf3")).with_format("torch")
    first_tokens = token_rows.filter(lambda row: row["context_id"] in ids[:3]).sort(["context_id", "position"])[:]["token_id"]
    assert torch.equal(first_tokens.view(3, -1), tokens.to(first_tokens.dtype))


# -- activations in sae-lens's cache layout ---------------------------------------------------------------------------------


def test_saelens_layout_feeds_activations_store(built, expected, tmp_path):
    from datasets import load_from_disk
    from sae_lens.training.activations_store import ActivationsStore

    ids, acts, tokens = expected
    out = tmp_path / "saelens"
    assert main(["export", "--db", str(built), "--out", str(out), "--layout", "saelens", "--hook", HOOK]) == 0
    path = out / "run_id=1" / f"hook={HOOK}"
    dataset = load_from_disk(str(path))
    assert len(dataset) == len(ids) and dataset.features[HOOK].shape == (32, 64) and dataset.features[HOOK].dtype == "float16"
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None, context_size=32, d_in=64,
        n_batches_in_buffer=2, total_training_tokens=len(ids) * 32, store_batch_size_prompts=3, train_batch_size_tokens=32,
        prepend_bos=True, normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(path),
    )
    batch, token_ids = store.get_raw_llm_batch()
    assert batch.shape == (3 * 32, 64) and batch.dtype == torch.float32
    assert torch.equal(batch, acts.float().reshape(-1, 64))
    assert torch.equal(token_ids.long(), tokens.reshape(-1).long())
    assert "| 1 | `blocks.1.hook_resid_post` |" in (out / "README.md").read_text()


def test_exports_stream_in_chunks_and_widen_bfloat16(tmp_path, monkeypatch):
    """Tiny chunk and shard limits force one Parquet part and one arrow chunk per context and several arrow shards; a
    bfloat16 cache (which neither Parquet nor Arrow can hold) comes out as float32 with the same values."""
    from datasets import load_from_disk

    from workbench import export

    db = tmp_path / "bf16.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "512", "--ctx", "32", "--dtype", "bfloat16",
                 "--db", str(db)]) == 0
    monkeypatch.setattr(export, "CHUNK_BYTES", 1)
    monkeypatch.setattr(export, "SHARD_BYTES", 3 * 32 * 64 * 4)
    with Workspace(db, read_only=True) as ws:
        ids = context_ids(ws, HOOK)
        acts = read_contexts(ws, HOOK, ids, dtype=None)
        assert acts.dtype == torch.bfloat16
        parquet = export.export_activations(ws, tmp_path / "pq", layout="parquet")
        saelens = export.export_activations(ws, tmp_path / "sl", layout="saelens")
    parts = sorted((parquet / "activations" / "run_id=1" / f"hook={HOOK}").glob("*.parquet"))
    assert len(parts) == len(ids)
    table = pads.dataset(parquet / "activations", format="parquet", partitioning="hive").to_table()
    order = np.lexsort((table.column("position").to_numpy(), table.column("context_id").to_numpy()))
    values = np.stack(table.column("activation").to_numpy(zero_copy_only=False))[order]
    assert values.dtype == np.float32 and np.array_equal(values.reshape(acts.shape), acts.float().numpy())
    folder = saelens / "run_id=1" / f"hook={HOOK}"
    assert len(list(folder.glob("data-*.arrow"))) == -(-len(ids) // 3)
    dataset = load_from_disk(str(folder)).with_format("torch")
    assert dataset.features[HOOK].dtype == "float32"
    assert torch.equal(dataset[:][HOOK], acts.float())


# -- feature data for Neuronpedia / SAEDashboard ----------------------------------------------------------------------------

_FLOATS = {"type": "array", "items": {"type": "number"}}
_INTS = {"type": "array", "items": {"type": "integer"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_ACTIVATION = {
    "type": "object",
    "required": ["bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"],
    "additionalProperties": False,
    "properties": {
        "bin_min": {"type": "number"}, "bin_max": {"type": "number"}, "bin_contains": {"type": "number"},
        "tokens": _STRINGS, "values": _FLOATS, "qualifying_token_index": {"type": "integer", "minimum": 0},
        "dfa_values": _FLOATS, "dfa_maxValue": {"type": "number"}, "dfa_targetIndex": {"type": "integer"},
    },
}
_FEATURE_LISTS = {
    "neuron_alignment_indices": _INTS, "neuron_alignment_values": _FLOATS, "neuron_alignment_l1": _FLOATS,
    "correlated_neurons_indices": _INTS, "correlated_neurons_l1": _FLOATS, "correlated_neurons_pearson": _FLOATS,
    "correlated_features_indices": _INTS, "correlated_features_l1": _FLOATS, "correlated_features_pearson": _FLOATS,
    "neg_str": _STRINGS, "neg_values": _FLOATS, "pos_str": _STRINGS, "pos_values": _FLOATS,
    "freq_hist_data_bar_values": _FLOATS, "freq_hist_data_bar_heights": _FLOATS,
    "logits_hist_data_bar_heights": _FLOATS, "logits_hist_data_bar_values": _FLOATS,
    "decoder_weights_dist": _FLOATS, "vector": _FLOATS,
}
# The layout of SAEDashboard's NeuronpediaRunner `batch-N.json` (NeuronpediaDashboardBatch.to_dict with its features'
# and activations' to_dict): exactly these keys, since SAEDashboard rebuilds its dataclasses from them by keyword.
NEURONPEDIA_BATCH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["model_id", "layer", "sae_set", "features"],
    "additionalProperties": False,
    "properties": {
        "model_id": {"type": "string", "minLength": 1},
        "layer": {"type": "integer", "minimum": 0},
        "sae_set": {"type": "string", "minLength": 1},
        "sae_id_suffix": {"type": ["string", "null"]},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["feature_index", *_FEATURE_LISTS, "frac_nonzero", "n_prompts_total", "n_tokens_in_prompt",
                             "dataset", "activations"],
                "additionalProperties": False,
                "properties": {
                    "feature_index": {"type": "integer", "minimum": 0},
                    **_FEATURE_LISTS,
                    "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
                    "n_prompts_total": {"type": "integer", "minimum": 0},
                    "n_tokens_in_prompt": {"type": "integer", "minimum": 0},
                    "dataset": {"type": "string"},
                    "activations": {"type": "array", "items": _ACTIVATION},
                },
            },
        },
    },
}
SKIPPED_SCHEMA = {
    "type": "object",
    "required": ["model_id", "layer", "sae_set", "log_sparsity", "skipped_indexes"],
    "properties": {"layer": {"type": "string"}, "skipped_indexes": _INTS},
}


def _export_features(built, out: Path, *extra: str) -> list[dict]:
    assert main(["export", "--db", str(built), "--sae", SAE, "--out", str(out), *extra]) == 0
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]


def test_feature_batches_follow_the_schema_and_the_feature_store(built, tmp_path):
    batches = _export_features(built, tmp_path / "np", "--features", "10-29", "--format", "neuronpedia", "--batch-size", "8")
    for batch in batches:
        jsonschema.validate(batch, NEURONPEDIA_BATCH_SCHEMA)
    skipped = json.loads((tmp_path / "np" / "skipped_indexes.json").read_text())
    jsonschema.validate(skipped, SKIPPED_SCHEMA)
    exported = [f["feature_index"] for b in batches for f in b["features"]]
    assert [len(b["features"]) for b in batches][:-1] == [8] * (len(batches) - 1)
    assert sorted(exported + skipped["skipped_indexes"]) == list(range(10, 30))
    assert batches[0]["model_id"] == "tiny-llama" and batches[0]["layer"] == 1 and batches[0]["sae_set"] == SAE

    with Workspace(built, read_only=True) as ws:
        sae = resolve_sae(ws, SAE)
        for feature in (b["features"][0] for b in batches):
            index = feature["feature_index"]
            summary = fx.feature_summary(ws, sae, index)
            assert feature["frac_nonzero"] == pytest.approx(summary["density"])
            assert feature["freq_hist_data_bar_heights"] == summary["hist_counts"] and sum(summary["hist_counts"]) == summary["n_fired"]
            assert feature["n_tokens_in_prompt"] == 32 and feature["dataset"] == "stdlib"
            logits = fx.logit_effects(ws, sae, index)
            assert feature["pos_str"] == [s for s, _ in logits["promoted"]] and len(feature["pos_str"]) > 0
            assert feature["neg_values"] == pytest.approx([e for _, e in logits["suppressed"]], abs=1e-5)
            related = fx.related_features(ws, sae, index)
            assert feature["correlated_features_indices"] == [r["feature"] for r in related]
            assert feature["correlated_features_l1"] == pytest.approx([r["cosine"] for r in related], abs=1e-5)
            top = fx.examples(ws, sae, index, band=-1, limit=100)
            tops = [a for a in feature["activations"] if a["bin_min"] == -1]
            assert len(tops) == len(top) and all(a["bin_max"] == pytest.approx(summary["max"], abs=1e-5) for a in tops)
            for activation, example in zip(tops, top):
                assert len(activation["tokens"]) == len(activation["values"]) == 31  # BOS left out
                q = activation["qualifying_token_index"]
                assert activation["values"][q] == pytest.approx(example.value, abs=1e-5)
                assert activation["tokens"][q] == example.tokens[example.focus]
                with_bos = [0.0, *activation["values"]]  # the analysis leaves BOS out: it never fires there
                window = with_bos[example.start : example.start + len(example.values)]
                assert window == pytest.approx(example.values, abs=1e-5)
            bands = [a for a in feature["activations"] if a["bin_min"] != -1]
            assert len(bands) == len(fx.examples(ws, sae, index, band=None, limit=1000)) - len(top)
            for activation in bands:
                value = activation["values"][activation["qualifying_token_index"]]
                assert activation["bin_min"] - 1e-4 <= value <= activation["bin_max"] + 1e-4
                assert 0 < activation["bin_contains"] <= 1


def test_saedashboard_format_is_the_same_files(built, tmp_path):
    neuronpedia = _export_features(built, tmp_path / "a", "--features", "0-5", "--format", "neuronpedia")
    saedashboard = _export_features(built, tmp_path / "b", "--features", "0-5", "--format", "saedashboard")
    assert neuronpedia == saedashboard and len(neuronpedia) == 1
    every = _export_features(built, tmp_path / "c", "--features")
    dead = json.loads((tmp_path / "c/skipped_indexes.json").read_text())["skipped_indexes"]
    assert sum(len(b["features"]) for b in every) + len(dead) == 96


def test_labels_are_exported_beside_the_batches(built, tmp_path):
    """`explanations.json` holds one row per stored label of an exported feature, in Neuronpedia's fields."""
    db = tmp_path / "labelled.duckdb"
    db.write_bytes(built.read_bytes())
    assert main(["explain", "--db", str(db), "--sae", SAE, "--features", "0-40"]) == 0
    llm_rows = {"openai:http://user:token@10.0.0.5:8000/v1#qwen-7b": "qwen-7b", "openai:http://localhost:8080/v1": "openai",
                "hf:HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M-Instruct", "hf:/home/me/models/my-judge": "my-judge"}
    with Workspace(db) as ws:
        live = ws.query("SELECT min(feature) FROM feature_stats WHERE n_fired > 0 AND feature BETWEEN 30 AND 49")[0][0]
        for explainer in llm_rows:
            ws.con.execute("INSERT INTO feature_explanations (sae_id, feature, explainer, label, scores) VALUES "
                           "((SELECT sae_id FROM saes WHERE name = ?), ?, ?, 'numbers', '{\"headline\": 0.75}')", [SAE, live, explainer])
    batches = _export_features(db, tmp_path / "np", "--features", "30-49")
    labels = json.loads((tmp_path / "np" / "explanations.json").read_text())
    exported = {f["feature_index"] for b in batches for f in b["features"]}
    with Workspace(db, read_only=True) as ws:
        stored = ws.query("""SELECT feature, label, scores->>'f1' FROM feature_explanations
                             WHERE explainer = 'pattern' AND feature BETWEEN 30 AND 49 ORDER BY feature""")
    expected = [(f, label, None if f1 is None else float(f1)) for f, label, f1 in stored if f in exported]
    patterns = [r for r in labels if r["typeName"] == "workbench-pattern"]
    assert expected and [(int(r["index"]), r["description"], r["scoreV1"]) for r in patterns] == expected
    assert {(r["modelId"], r["layer"], r["explanationModelName"]) for r in patterns} == {("tiny-llama", f"1-{SAE}", "pattern")}
    llm = [r for r in labels if r["typeName"] != "workbench-pattern"]  # the model's name, never its endpoint or path
    assert sorted(r["explanationModelName"] for r in llm) == sorted(llm_rows.values())
    assert {(r["index"], r["description"], r["scoreV1"]) for r in llm} == {(str(live), "numbers", 0.75)}
    text = (tmp_path / "np" / "explanations.json").read_text()
    assert "token@" not in text and "localhost" not in text and "/home/me" not in text
    assert json.loads((tmp_path / "np" / "run_settings.json").read_text())["n_explanations"] == len(labels)
    _export_features(built, tmp_path / "bare", "--features", "30-49")  # a workspace without labels: an empty list
    assert json.loads((tmp_path / "bare" / "explanations.json").read_text()) == []


# -- bad input ---------------------------------------------------------------------------------------------------------------

BAD = {
    "unknown-format": (["--sae", SAE, "--features", "--format", "html"], "unknown --format 'html'; valid: neuronpedia, saedashboard"),
    "features-out-of-range": (["--sae", SAE, "--features", "90-96"], "valid ids are 0..95"),
    "features-not-a-range": (["--sae", SAE, "--features", "ten"], "use all, N, A-B"),
    "features-backwards": (["--sae", SAE, "--features", "9-3"], "ends before it starts"),
    "not-analysed": (["--sae", RAW, "--features"], f"SAE '{RAW}' is not analysed yet"),
    "unknown-sae": (["--sae", "nope", "--features"], "no SAE 'nope'"),
    "batch-size-zero": (["--sae", SAE, "--features", "--batch-size", "0"], "--batch-size must be a positive"),
    "features-without-sae": (["--features", "0-3"], "name it with --sae"),
    "layout-with-sae": (["--sae", SAE, "--layout", "saelens"], "apply to activation exports"),
    "unknown-layout": (["--layout", "zarr"], "unknown export layout 'zarr'; valid: parquet, saelens"),
    "unknown-hook": (["--layout", "saelens", "--hook", "blocks.9.hook_x"], "hook 'blocks.9.hook_x' is not cached"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_changes_nothing(case, built, tmp_path, capsys):
    argv, phrase = BAD[case]
    before = hashlib.md5(built.read_bytes()).hexdigest()
    out = tmp_path / "out"
    code = main(["export", "--db", str(built), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("workbench: error: ") and "\n" not in err and phrase in err, err
    assert not out.exists() and hashlib.md5(built.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("kind", ["features", "activations"])
def test_unwritable_out_is_bad_input(kind, built, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    extra = ["--sae", SAE, "--features"] if kind == "features" else ["--layout", "saelens"]
    for out, phrase in ((blocker, "is not a folder"), (blocker / "below", "cannot create export folder")):
        assert main(["export", "--db", str(built), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("workbench: error: ") and "\n" not in err and phrase in err, err
    assert blocker.read_text() == "x"
