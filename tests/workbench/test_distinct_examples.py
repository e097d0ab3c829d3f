"""A feature page never shows the same window text twice: top and band examples are distinct by window."""

import pytest

from workbench import analysis, features
from workbench.analysis import N_BANDS, N_TOP, PER_BAND, WINDOW_AFTER, WINDOW_BEFORE
from workbench.cli import main
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"
PASSAGE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
           "and associated documentation files, to deal in the Software without restriction.")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A workspace cached from a corpus where one licence passage is repeated between distinct texts,
    so many tokens of many features sit in identical windows."""
    folder = tmp_path_factory.mktemp("distinct")
    distinct = [f"Note {i}: the value {i * 7919 % 1000} of item {i} goes to register {i % 13} before step {i * 3}."
                for i in range(120)]
    documents = []
    for i, text in enumerate(distinct):
        documents.append(text)
        if i % 3 == 0:
            documents.append(PASSAGE)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(documents) + "\n")
    db = folder / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--corpus", str(corpus), "--tokens", "4096",
                 "--ctx", "64", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", HOOK, "--width", "64", "--k", "4", "--tokens", "8192",
                 "--batch-size", "512", "--no-downstream", "--name", "tiny"]) == 0
    assert main(["analyze", "--db", str(db), "--sae", "tiny", "--batch", "16"]) == 0
    return db


def _windows(ws, sae_id: int) -> dict[tuple[int, int], tuple[int, ...]]:
    """(context, position) -> token ids of the window the feature page shows, for every stored nonzero."""
    by_context: dict[int, list[int]] = {}
    for cid, _, token in ws.query("SELECT context_id, position, token_id FROM tokens ORDER BY context_id, position"):
        by_context.setdefault(cid, []).append(token)
    out = {}
    for cid, pos in ws.query("SELECT DISTINCT context_id, position FROM feature_acts WHERE sae_id = ?", [sae_id]):
        row = by_context[cid]
        out[cid, pos] = tuple(row[max(0, pos - WINDOW_BEFORE) : pos + WINDOW_AFTER + 1])
    return out


def test_window_is_the_one_the_feature_page_shows(planted):
    """The page's examples show exactly the window they are distinct by."""
    with Workspace(planted, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        windows = _windows(ws, record.sae_id)
        shown = [e for f in range(8) for e in features.examples(ws, record, f, band=None, limit=1000)]
        vocab = dict(ws.query("SELECT token_id, token FROM vocab"))
    assert len(shown) > 20
    for example in shown:
        assert example.tokens == [vocab[t] for t in windows[example.context_id, example.position]]


def test_the_corpus_plants_repeated_windows(planted):
    """Without the rule, features' top lists would repeat windows: the test below is not vacuous."""
    with Workspace(planted, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        windows = _windows(ws, record.sae_id)
        rows = ws.query("""SELECT feature, context_id, position FROM feature_acts WHERE sae_id = ?
                           ORDER BY feature, value DESC, context_id, position""", [record.sae_id])
    naive: dict[int, list] = {}
    for f, cid, pos in rows:
        if len(naive.setdefault(f, [])) < N_TOP:
            naive[f].append(windows[cid, pos])
    repeating = [f for f, w in naive.items() if len(set(w)) < len(w)]
    assert len(repeating) >= 5, repeating


def test_no_feature_page_shows_a_window_twice(planted):
    with Workspace(planted, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        checked = 0
        for feature in range(record.width):
            if features.feature_summary(ws, record, feature)["n_fired"] == 0:
                continue
            every = features.examples(ws, record, feature, band=None, limit=N_TOP + N_BANDS * PER_BAND)  # as app/cached.py reads
            texts = ["".join(e.tokens) + f"|{e.focus}" for e in every]
            ids = [tuple(e.tokens) for e in every]
            assert len(set(ids)) == len(ids), (feature, texts)
            top = [e for e in every if e.band == -1]
            assert len(top) <= N_TOP and all(sum(e.band == b for e in every) <= PER_BAND for b in range(N_BANDS))
            assert all(e.values[e.focus] == pytest.approx(e.value) for e in every)
            checked += 1
    assert checked > 10


def test_selection_matches_a_naive_greedy_reference(planted):
    """Top: the first N_TOP windows not seen before in (value desc, context, position) order; then each band,
    highest first, the first PER_BAND windows in none of the feature's lists in (hash, context, position) order."""
    with Workspace(planted, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        windows = _windows(ws, record.sae_id)
        rows = ws.query(
            """SELECT a.feature, a.context_id, a.position, a.value, hash(a.context_id, a.position),
                      least(9, floor(a.value / s.max_value * 10))::INTEGER
               FROM feature_acts a JOIN feature_stats s USING (sae_id, feature) WHERE a.sae_id = ?""", [record.sae_id])
        stored = ws.query("""SELECT feature, band, rank, context_id, position FROM feature_examples
                             WHERE sae_id = ? ORDER BY feature, band DESC, rank""", [record.sae_id])
    by_feature: dict[int, list] = {}
    for row in rows:
        by_feature.setdefault(row[0], []).append(row)
    expected = []
    for f in sorted(by_feature):
        used: set = set()

        def take(candidates, band, limit, f=f, used=used):
            rank = 0
            for _, cid, pos, *_ in candidates:
                if rank == limit:
                    break
                if windows[cid, pos] not in used:
                    used.add(windows[cid, pos])
                    rank += 1
                    expected.append((f, band, rank, cid, pos))

        take(sorted(by_feature[f], key=lambda r: (-r[3], r[1], r[2])), -1, N_TOP)
        for band in range(N_BANDS - 1, -1, -1):
            take(sorted((r for r in by_feature[f] if r[5] == band), key=lambda r: (r[4], r[1], r[2])), band, PER_BAND)
    expected.sort(key=lambda r: (r[0], -r[1], r[2]))
    assert stored == expected


def test_refetching_short_features_changes_nothing(planted, tmp_path, monkeypatch):
    """With one candidate per example almost every feature runs short and is refetched; the store is the same."""
    with Workspace(planted, read_only=True) as ws:
        record = resolve_sae(ws, "tiny")
        before = ws.query("SELECT * FROM feature_examples WHERE sae_id = ? ORDER BY feature, band, rank", [record.sae_id])
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(planted.read_bytes())
    monkeypatch.setattr(analysis, "_OVERSAMPLE", 1)
    rounds = []
    real = analysis._example_candidates
    monkeypatch.setattr(analysis, "_example_candidates", lambda *a: rounds.append(a[3]) or real(*a))
    with Workspace(copy) as ws:
        with ws.transaction() as con:
            con.execute("DELETE FROM feature_examples WHERE sae_id = ?", [record.sae_id])
            analysis._store_examples(con, record.sae_id)
        after = ws.query("SELECT * FROM feature_examples WHERE sae_id = ? ORDER BY feature, band, rank", [record.sae_id])
    assert len(rounds) >= 2 and rounds[:2] == [1, 4]
    assert after == before
