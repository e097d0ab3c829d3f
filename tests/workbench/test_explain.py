"""Feature explanations: the pattern explainer's exact regex scores, delphi's detection and fuzzing
scorers with a deterministic judge, ``workbench explain`` end to end (resume, bad input), and the
real local model's Yes/No log-probability path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.activations import context_ids
from workbench.cli import main
from workbench.errors import BAD_INPUT
from workbench.explain_data import Corpus, Firing
from workbench.explain_llm import Question
from workbench.explain_pattern import PatternIndex, explain_pattern, held_out_scores
from workbench.explain_scoring import DetectionScorer, FuzzingScorer, balanced_accuracy, held_out_sample
from workbench.explanations import feature_labels, parse_features, search_labels
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"
VOCAB = ["<s>", " cat", " dog", " the", " sat", ".", " on", " mat", "\n", "1", "2", " a", " big", " red", " ran",
         " and", " it", " was", ",", " very"]


# -- a synthetic feature with a known rule -----------------------------------------------------------
def synthetic(n_contexts: int = 240, ctx_len: int = 32, seed: int = 0) -> tuple[Corpus, Firing]:
    """Random tokens over ``VOCAB``; the feature fires on every " cat" (value 1 + noise)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, len(VOCAB), size=(n_contexts, ctx_len))
    tokens[:, 0] = 0
    domains = np.full(tokens.shape, "prose", dtype=object)
    corpus = Corpus(np.arange(n_contexts), tokens, np.zeros_like(tokens), np.arange(n_contexts) % 4 == 3,
                    np.array(VOCAB, dtype=object), domains)
    values = np.where(tokens == 1, 1.0 + rng.random(tokens.shape), 0.0).astype(np.float32)
    return corpus, Firing(7, values)


class StubJudge:
    """Deterministic judge: the explanation names one quoted token; detection says yes when the window
    holds it, fuzzing when every marked token is it."""

    def ask(self, questions: list[Question]) -> list[float]:
        out = []
        for q in questions:
            named = re.findall(r'"([^"]*)"', q.explanation)
            target = named[0] if named else None
            window = q.window
            if q.kind == "detection":
                out.append(1.0 if target in window.tokens else 0.0)
            else:
                marked = [t for t, m in zip(window.tokens, window.marked) if m]
                out.append(1.0 if marked and all(t == target for t in marked) else 0.0)
        return out


def naive_scores(tokens: list[list[str]], fired: list[list[bool]], regex: str | None, context_regex: str | None) -> dict:
    """Precision / recall / F1 by a plain loop over every token at positions >= 1."""
    tp = fp = fn = 0
    for row, hits in zip(tokens, fired):
        for pos in range(1, len(row)):
            predicted = (regex is None or re.fullmatch(regex, row[pos]) is not None) and (
                context_regex is None or re.fullmatch(context_regex, row[pos - 1]) is not None)
            tp += predicted and hits[pos]
            fp += predicted and not hits[pos]
            fn += hits[pos] and not predicted
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None}


def test_pattern_finds_the_rule_and_its_scores_are_the_regex_scores():
    corpus, firing = synthetic()
    index = PatternIndex(corpus)
    rule, detail = explain_pattern(index, firing)
    assert rule.kind == "tokens" and re.fullmatch(rule.regex, " cat") and not re.fullmatch(rule.regex, " dog")
    assert '" cat"' in rule.phrase and detail["top_tokens"][0] == [" cat", 1.0]
    scores = held_out_scores(index, rule, firing)
    test = corpus.test
    strings = [[VOCAB[t] for t in row] for row in corpus.tokens[test]]
    expected = naive_scores(strings, firing.fired[test].tolist(), rule.regex, rule.context_regex)
    assert scores["f1"] == expected["f1"] == 1.0
    assert scores["precision"] == expected["precision"] and scores["recall"] == expected["recall"]


def test_pattern_uses_the_preceding_token_when_that_is_the_rule():
    corpus, _ = synthetic(seed=1)
    tokens = corpus.tokens
    values = np.zeros(tokens.shape, np.float32)
    values[:, 1:] = np.where((tokens[:, 1:] == 2) & (tokens[:, :-1] == 3), 1.0, 0.0)  # " dog" after " the"
    index = PatternIndex(corpus)
    rule, _ = explain_pattern(index, Firing(3, values))
    assert rule.kind == "tokens after" and re.fullmatch(rule.context_regex, " the") and re.fullmatch(rule.regex, " dog")
    assert held_out_scores(index, rule, Firing(3, values))["f1"] == 1.0


@pytest.mark.parametrize("domain, said", [("code", "mostly in code text"), ("", "mostly between documents")])
def test_a_dominant_domain_is_named(domain, said):
    """A feature firing on " cat", whose firings sit in one domain that holds a third of all tokens."""
    corpus, firing = synthetic()
    corpus.domains[: len(corpus.domains) // 3] = domain
    rows = firing.values[: len(corpus.domains) // 3]
    values = np.zeros_like(firing.values)
    values[: len(rows)] = rows
    rule, detail = explain_pattern(PatternIndex(corpus), Firing(7, values))
    assert detail["domains"][0] == [domain, 1.0]
    assert rule.phrase.endswith(f"{said} (100%)") and "  " not in rule.phrase, rule.phrase


def test_a_dead_feature_gets_a_dead_label():
    corpus, firing = synthetic()
    rule, detail = explain_pattern(PatternIndex(corpus), Firing(1, np.zeros_like(firing.values)))
    assert rule.kind == "none" and rule.phrase.startswith("dead") and detail["n_train_fired"] == 0


@pytest.mark.parametrize("scorer", [DetectionScorer, FuzzingScorer])
def test_scorers_separate_the_right_explanation_from_a_wrong_one(scorer):
    corpus, firing = synthetic()
    sample = held_out_sample(corpus, firing, np.random.default_rng(0), n=30)
    assert len(sample.positives) == len(sample.negatives) >= 20 and len(sample.correct) >= 10 and len(sample.wrong) >= 10
    assert all(w.fires for w in sample.positives) and not any(w.fires for w in sample.negatives)
    assert not any(any(w.marked) for w in sample.positives + sample.negatives)
    right = scorer(StubJudge()).score('fires on the token " cat"', sample)
    wrong = scorer(StubJudge()).score('fires on the token " mat"', sample)
    assert right >= 0.9
    assert abs(wrong - 0.5) <= 0.15


def test_balanced_accuracy():
    assert balanced_accuracy([1.0, 0.9], [0.1, 0.0]) == 1.0
    assert balanced_accuracy([0.0, 0.0], [0.0, 0.0]) == 0.5
    assert balanced_accuracy([0.9, 0.2], [0.6, 0.1]) == 0.5
    assert balanced_accuracy([], [0.1]) is None


def test_parse_features():
    assert parse_features("all", 4) == [0, 1, 2, 3]
    assert parse_features("2", 4) == [2] and parse_features("1-3", 4) == [1, 2, 3] and parse_features("3,0-1", 4) == [0, 1, 3]
    for bad in ("4", "2-1", "x", "-1"):
        with pytest.raises(ValueError):
            parse_features(bad, 4)


# -- the command end to end on a tiny workspace ------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One cache run, an analysed SAE ('base') and one that is trained but not analysed ('raw')."""
    db = tmp_path_factory.mktemp("explain") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "4096", "--ctx", "32", "--db", str(db)]) == 0
    for name in ("base", "raw"):
        assert main(["train", "--db", str(db), "--hook", HOOK, "--width", "96", "--k", "4", "--tokens", "8192",
                     "--batch-size", "256", "--warmup-steps", "2", "--no-downstream", "--name", name]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "base", "--no-logits"]) == 0
    return db


@pytest.fixture
def ws_path(built, tmp_path) -> Path:
    shutil.copy(built, tmp_path / built.name)
    shutil.copytree(built.with_suffix(".saes"), tmp_path / built.with_suffix(".saes").name)
    return tmp_path / built.name


def rows(db: Path, explainer: str = "pattern") -> dict[int, tuple]:
    with Workspace(db, read_only=True) as ws:
        found = ws.query("SELECT feature, label, detail, scores, created_at FROM feature_explanations WHERE explainer = ?", [explainer])
    return {f: (label, json.loads(detail), json.loads(scores), at) for f, label, detail, scores, at in found}


def test_explain_resumes_and_the_labels_reproduce_their_regex_scores(ws_path, capsys):
    base = ["explain", "--db", str(ws_path), "--sae", "base", "--quiet"]
    assert main([*base, "--features", "0-9"]) == 0
    first = rows(ws_path)
    assert sorted(first) == list(range(10))
    assert main([*base, "--features", "0-19"]) == 0
    assert "(10 already done)" in capsys.readouterr().out
    second = rows(ws_path)
    assert sorted(second) == list(range(20)) and all(second[f][3] == first[f][3] for f in first)  # not redone

    with Workspace(ws_path, read_only=True) as ws:
        record = resolve_sae(ws, "base")
        test = context_ids(ws, HOOK, split="test")
        strings = dict(ws.query("SELECT token_id, token FROM vocab"))
        tokens: dict[int, list[str]] = {}
        for cid, _, token_id in ws.query("SELECT context_id, position, token_id FROM tokens WHERE context_id IN "
                                         "(SELECT unnest(?::BIGINT[])) ORDER BY context_id, position", [test]):
            tokens.setdefault(cid, []).append(strings[token_id])
        checked = 0
        for feature, (label, detail, scores, _) in second.items():
            if detail["kind"] == "none":
                continue
            fired_at = {(c, p) for c, p in ws.query("SELECT context_id, position FROM feature_acts WHERE sae_id = ? AND feature = ?",
                                                    [record.sae_id, feature])}
            fired = [[(cid, pos) in fired_at for pos in range(len(tokens[cid]))] for cid in test]
            expected = naive_scores([tokens[cid] for cid in test], fired, detail["regex"], detail["context_regex"])
            for key in ("precision", "recall", "f1"):
                assert scores[key] == pytest.approx(expected[key]), (feature, key)
            assert scores["headline"] == scores["f1"] and label
            checked += 1
        assert checked >= 10
        labels = feature_labels(ws, record.sae_id)
        assert set(labels) == set(range(20)) and all(e == "pattern" for _, _, e in labels.values())
        word = labels[0][0].split('"')[1] if '"' in labels[0][0] else labels[0][0][:4]
        hits = search_labels(ws, record.sae_id, word.upper(), 50)
        assert 0 in [f for f, _, _ in hits] and all(word.lower() in lab.lower() for _, lab, _ in hits)
        assert search_labels(ws, record.sae_id, "no label says this", 5) == []


def test_an_llm_explainer_is_preferred_and_scored(ws_path):
    assert main(["explain", "--db", str(ws_path), "--sae", "base", "--quiet", "--features", "0-1"]) == 0
    assert main(["explain", "--db", str(ws_path), "--sae", "base", "--quiet", "--features", "0-1",
                 "--explainer", "hf:tiny-llama", "--scorer", "detection,fuzzing"]) == 0
    llm = rows(ws_path, "hf:tiny-llama")
    assert sorted(llm) == [0, 1]
    for _, _, scores, _ in llm.values():
        for key in ("detection", "fuzzing"):
            assert scores[key] is None or 0.0 <= scores[key] <= 1.0
    with Workspace(ws_path, read_only=True) as ws:
        labels = feature_labels(ws, 1)
    assert {labels[f][2] for f in (0, 1)} == {"hf:tiny-llama"}


@pytest.fixture
def chat_server():
    """A local OpenAI-compatible server: one-token requests get Yes/No log-probabilities, others a label."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({"data": [{"id": "stub"}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(request)
            if request.get("max_tokens") == 1:
                top = [{"token": "Yes", "logprob": -0.2}, {"token": "No", "logprob": -1.7}]
                self.reply({"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}]})
            else:
                self.reply({"choices": [{"message": {"content": "Description: code keywords."}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_an_openai_compatible_server_explains_and_judges(ws_path, chat_server):
    url, seen = chat_server
    assert main(["explain", "--db", str(ws_path), "--sae", "base", "--quiet", "--features", "0-1",
                 "--explainer", f"openai:{url}", "--llm-model", "stub"]) == 0
    found = rows(ws_path, f"openai:{url}#stub")
    assert sorted(found) == [0, 1] and {label for label, *_ in found.values()} == {"code keywords"}
    assert all(r["model"] == "stub" for r in seen)
    for _, _, scores, _ in found.values():  # the judge always says yes: TPR 1, TNR 0
        assert scores["detection"] in (None, 0.5) and scores["fuzzing"] in (None, 0.5)


def no_template_model(tmp_path: Path) -> Path:
    from workbench.models import tiny_llama_dir

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir(), folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_bad_input_is_one_line_and_changes_nothing(ws_path, tmp_path, capsys, table_digest):
    base = ["explain", "--db", str(ws_path), "--quiet"]
    cases = {
        "out of range": ([*base, "--sae", "base", "--features", "90-96"], "out of range"),
        "not analysed": ([*base, "--sae", "raw"], "not analysed yet"),
        "unknown explainer": ([*base, "--sae", "base", "--explainer", "gpt"], "unknown explainer"),
        "unreachable": ([*base, "--sae", "base", "--explainer", "openai:http://127.0.0.1:9"], "cannot reach"),
        "no chat template": ([*base, "--sae", "base", "--explainer", f"hf:{no_template_model(tmp_path)}"], "no chat template"),
        "unknown scorer": ([*base, "--sae", "base", "--scorer", "vibes"], "unknown scorer"),
        "unknown sae": ([*base, "--sae", "nope"], "no SAE 'nope'"),
    }
    before = table_digest(ws_path)
    for name, (argv, words) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == BAD_INPUT, (name, err)
        assert err.startswith("workbench: error: ") and "\n" not in err and words in err, (name, err)
    assert table_digest(ws_path) == before


# -- the real local model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_local_model_reads_yes_no_log_probabilities():
    from workbench.explain_llm import HFChat, LLMJudge

    chat = HFChat("default")
    corpus, firing = synthetic(n_contexts=80)
    sample = held_out_sample(corpus, firing, np.random.default_rng(0), n=2)
    judge = LLMJudge(chat)
    p = judge.ask([Question("detection", 'the token " cat"', w) for w in sample.positives + sample.negatives])
    assert len(p) == 4 and all(0.0 <= x <= 1.0 for x in p)
    for scorer in (DetectionScorer, FuzzingScorer):
        score = scorer(judge).score('the token " cat"', sample)
        assert score is None or 0.0 <= score <= 1.0
