"""`workbench analyze` and the feature query API against naive recomputations."""

import re

import pytest
import torch

import saes
from workbench import analysis, features
from workbench.activations import context_ids, read_contexts
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    db = tmp_path_factory.mktemp("analysis") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "6400", "--ctx", "64", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "16384",
                 "--batch-size", "512", "--no-downstream", "--name", "tiny"]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "tiny", "--batch", "16"]) == 0
    return db


@pytest.fixture(scope="module")
def dense(analysed):
    """Naive reference: every cached token (BOS left out) encoded at once: [contexts, L-1, width]."""
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        acts = read_contexts(ws, HOOK, context_ids(ws, HOOK))[:, 1:]
    sae = saes.load_sae(record.path)
    with torch.no_grad():
        return sae, sae.encode(acts.reshape(-1, 64)).view(acts.shape[0], acts.shape[1], -1)


def test_store_holds_exactly_the_nonzeros(analysed, dense):
    _, z = dense
    with Workspace(analysed, read_only=True) as ws:
        ids = context_ids(ws, HOOK)
        rows = ws.query("SELECT context_id, position, feature, value FROM feature_acts")
    stored = torch.zeros_like(z)
    index = {cid: i for i, cid in enumerate(ids)}
    for cid, pos, f, v in rows:
        stored[index[cid], pos - 1, f] = v
    assert len(rows) == int((z != 0).sum())
    torch.testing.assert_close(stored, z)


def test_statistics_and_examples_match_the_dense_reference(analysed, dense):
    _, z = dense
    flat = z.reshape(-1, z.shape[-1])
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        feature = int((flat > 0).sum(0).argmax())
        summary = features.feature_summary(ws, record, feature)
        top = features.examples(ws, record, feature, band=-1, limit=20)
        bands = features.examples(ws, record, feature, band=None, limit=500)
    fired = flat[:, feature][flat[:, feature] > 0]
    assert summary["n_fired"] == fired.numel()
    assert summary["density"] == pytest.approx(fired.numel() / flat.shape[0])
    # the store's mean is correctly rounded; torch's float32 mean of the fired values is ulps off (~1e-6 relative)
    assert summary["max"] == pytest.approx(float(fired.max())) and summary["mean"] == pytest.approx(float(fired.mean()), rel=1e-5)
    assert sum(summary["hist_counts"]) == fired.numel()
    assert [e.value for e in top] == pytest.approx(fired.sort(descending=True).values[:20].tolist())
    assert all(e.values[e.focus] == pytest.approx(e.value) for e in top)
    for e in bands:
        if e.band >= 0:
            low, high = e.band * summary["max"] / 10, (e.band + 1) * summary["max"] / 10
            assert low - 1e-6 <= e.value <= high + 1e-6


def test_logit_effects_and_related_features(analysed, dense, tiny):
    sae, z = dense
    directions = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    hf = tiny.model.original_model
    effects = (directions * hf.model.norm.weight.detach()) @ hf.get_output_embeddings().weight.detach().T
    feature = 7
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        logits = ws.query("SELECT token_id, effect FROM feature_logits WHERE feature = ? AND rank > 0 ORDER BY rank", [feature])
        related = features.related_features(ws, record, feature)
    assert [t for t, _ in logits] == effects[feature].topk(10).indices.tolist()
    cosine = directions @ directions[feature]
    cosine[feature] = -2
    assert [r["feature"] for r in related] == cosine.topk(5).indices.tolist()
    fires = (z.reshape(-1, z.shape[-1]) > 0)
    g = related[0]["feature"]
    both, either = (fires[:, feature] & fires[:, g]).sum(), (fires[:, feature] | fires[:, g]).sum()
    assert related[0]["cooccurrence"] == pytest.approx(float(both) / max(1, float(either)))


def test_search_by_pattern_scores_precision_and_recall(analysed, dense):
    _, z = dense
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        ids = context_ids(ws, HOOK)
        tokens = ws.query(
            """SELECT v.token FROM tokens t JOIN vocab v ON v.token_id = t.token_id
               WHERE t.context_id IN (SELECT unnest(?::BIGINT[])) AND t.position > 0 ORDER BY t.context_id, t.position""",
            [ids],
        )
        results = features.search_by_pattern(ws, record, r"^\s*def$")
    matches = torch.tensor([bool(re.search(r"^\s*def$", t)) for (t,) in tokens])
    fires = z.reshape(-1, z.shape[-1]) > 0
    best = results[0]
    hit = (fires[:, best["feature"]] & matches).sum()
    assert best["precision"] == pytest.approx(float(hit / fires[:, best["feature"]].sum()))
    assert best["recall"] == pytest.approx(float(hit / matches.sum()))
    assert results == sorted(results, key=lambda r: -r["f1"])


def test_analysis_resumes_after_a_crash(analysed, monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "copy.duckdb"
    shutil.copy(analysed, copy)
    with Workspace(copy) as ws:
        ws.con.execute("DELETE FROM analyses; DELETE FROM feature_acts")
        calls = {"n": 0}
        real = analysis.read_contexts

        def crash_on_third(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(analysis, "read_contexts", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            analysis.analyze(ws, "tiny", batch_contexts=16, progress=False)
        assert ws.query("SELECT contexts_done, status, error FROM analyses") == [(32, "failed", "interrupted")]
        monkeypatch.setattr(analysis, "read_contexts", real)
        summary = analysis.analyze(ws, "tiny", batch_contexts=16, progress=False)
        assert summary.resumed_from == 32
        resumed = ws.query("SELECT * FROM feature_acts ORDER BY context_id, position, feature")
    with Workspace(analysed, read_only=True) as ws:
        assert resumed == ws.query("SELECT * FROM feature_acts ORDER BY context_id, position, feature")


def test_search_accepts_re2_classes(analysed, dense):
    """RE2's ``\\p{Lu}`` (Python's re has no \\p classes) matches tokens starting with an upper-case letter:
    the ranking equals a naive one over tokens whose first character is in Unicode category Lu."""
    import unicodedata

    _, z = dense
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        tokens = ws.query(
            """SELECT v.token FROM tokens t JOIN vocab v ON v.token_id = t.token_id
               WHERE t.context_id IN (SELECT unnest(?::BIGINT[])) AND t.position > 0 ORDER BY t.context_id, t.position""",
            [context_ids(ws, HOOK)],
        )
        results = features.search_by_pattern(ws, record, r"^\p{Lu}", limit=10_000)
        first = features.search_by_pattern(ws, record, r"^\p{Lu}")
    matches = torch.tensor([t[:1] != "" and unicodedata.category(t[0]) == "Lu" for (t,) in tokens])
    fires = z.reshape(-1, z.shape[-1]) > 0
    assert 0 < int(matches.sum()) < len(tokens)  # the class matched some tokens, not none and not all
    hits, n_fired = (fires & matches[:, None]).sum(0), fires.sum(0)
    expected = []
    for f in torch.nonzero(hits).flatten().tolist():
        precision, recall = int(hits[f]) / int(n_fired[f]), int(hits[f]) / int(matches.sum())
        expected.append({"feature": f, "precision": precision, "recall": recall,
                         "f1": 2 * precision * recall / (precision + recall), "n_fired": int(n_fired[f])})
    expected.sort(key=lambda r: (-r["f1"], r["feature"]))
    assert expected and [r["feature"] for r in results] == [r["feature"] for r in expected]
    assert results == [pytest.approx(r) for r in expected]
    assert first == results[:20]  # the default limit


def test_prompt_inspector_truncates_long_prompts(analysed, dense, tiny):
    sae, _ = dense
    out = features.features_for_prompt(tiny, sae, HOOK, "hello world " * 400, top=3)
    assert out["truncated"] and len(out["tokens"]) == 511 and len(out["features"][0]) == 3


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda ws, r: features.feature_summary(ws, r, 96), "valid ids are 0..95"),
        (lambda ws, r: features.search_by_pattern(ws, r, "(["), "invalid regular expression"),
        (lambda ws, r: features.search_by_pattern(ws, r, "(?=a)b"), "invalid regular expression"),  # RE2: no lookahead
        (lambda ws, r: features.search_by_pattern(ws, r, r"(a)\1"), "invalid regular expression"),  # nor backreferences
        (lambda ws, r: resolve_sae(ws, "nope"), "available: 1:tiny"),
    ],
)
def test_bad_queries_are_one_line_errors(analysed, call, expected):
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        with pytest.raises(WorkbenchError) as err:
            call(ws, record)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_analyze_cli_rejects_an_unknown_sae(analysed, capsys):
    assert main(["analyze", "--db", str(analysed), "--sae", "nope", "--no-logits"]) == 2
    assert "no SAE 'nope'" in capsys.readouterr().err


def test_codebook_codes_get_the_same_treatment(analysed):
    assert main(["train", "--db", str(analysed), "--hook", HOOK, "--arch", "codebook", "--width", "64", "--k", "2",
                 "--tokens", "8192", "--batch-size", "512", "--no-downstream", "--name", "codes"]) == 0
    assert main(["analyze", "--db", str(analysed), "--sae", "codes"]) == 0
    with Workspace(analysed, read_only=True) as ws:
        record = resolve_sae(ws, "codes")
        (n_tokens,) = ws.query("SELECT n_tokens FROM analyses WHERE sae_id = ?", [record.sae_id])[0]
        (nonzeros,) = ws.query("SELECT count(*) FROM feature_acts WHERE sae_id = ?", [record.sae_id])[0]
        used = [f for (f,) in ws.query("SELECT feature FROM feature_stats WHERE sae_id = ? AND n_fired > 0", [record.sae_id])]
        assert nonzeros == 2 * n_tokens  # exactly k codes per token
        assert features.examples(ws, record, used[0]) and features.logit_effects(ws, record, used[0])["promoted"]
