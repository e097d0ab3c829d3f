"""Deduplication of the built-in corpus and the token-balanced variant ``stdlib:balanced``."""

import collections

import pytest

from workbench.data import CorpusError, Document, chunk_and_tokenize, load_corpus
from workbench.data.corpus import PIECE_TOKENS, balance_by_tokens, corpus_report, estimate_tokens
from workbench.data.dedup import NEAR_THRESHOLD, SHINGLE_WORDS, deduplicate, jaccard, shingles
from workbench.data.stdlib_corpus import raw_stdlib_documents, stdlib_dedup_report, stdlib_documents

LICENCE = (
    "Copyright (c) {year} {holder}\n\n"
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    "associated documentation files (the Software), to deal in the Software without restriction, including "
    "without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell "
    "copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the "
    "following conditions: The above copyright notice and this permission notice shall be included in all "
    "copies or substantial portions of the Software. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY "
    "KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A "
    "PARTICULAR PURPOSE AND NONINFRINGEMENT."
)
WORDS = [f"word{i}" for i in range(100)]


def _near_miss(text_words: list[str], every: int) -> str:
    """The words with every ``every``-th one replaced: each change breaks SHINGLE_WORDS shingles."""
    return " ".join(f"other{i}" if i % every == every // 2 else w for i, w in enumerate(text_words))


def _jaccard(a: str, b: str) -> float:
    vocabulary: dict[str, int] = {}
    return jaccard(shingles(a, vocabulary), shingles(b, vocabulary))


def test_planted_exact_and_near_duplicates_are_dropped_and_distinct_texts_kept():
    base = " ".join(WORDS)
    near_miss = _near_miss(WORDS, 25)  # 4 words changed of 100
    near = LICENCE.format(year=2019, holder="Ada Lovelace")
    near_copy = LICENCE.format(year=2024, holder="The Analytical Engine Project")
    assert _jaccard(near, near_copy) >= NEAR_THRESHOLD  # the premises of the planted pairs
    assert 0.5 < _jaccard(base, near_miss) < NEAR_THRESHOLD
    docs = [
        Document(near, "license", "license:a"),
        Document(base, "prose", "prose:base"),
        Document("  " + base.replace(" ", "\n\t "), "prose", "prose:base-reflowed"),  # exact after whitespace collapse
        Document(near_copy, "license", "license:b"),  # near: another copyright line
        Document(near, "license", "license:c"),  # exact
        Document(near_miss, "prose", "prose:near-miss"),  # below the threshold: kept
        Document("def f(x):\n    return x + 1\n", "code", "code:f"),
        Document("def g(y):\n    return y * 2\n", "code", "code:g"),
        Document(base.upper(), "prose", "prose:upper"),  # not exact, but words are compared lower-cased: near
    ]
    result = deduplicate(docs)
    assert [d.source for d in result.documents] == ["license:a", "prose:base", "prose:near-miss", "code:f", "code:g"]
    assert result.report == {"code": (2, 0, 0), "license": (1, 1, 1), "prose": (2, 1, 1)}
    kept, exact, near_dropped = result.report["prose"]
    assert (kept, exact, near_dropped) == (2, 1, 1)


def test_first_document_of_each_group_is_kept_whatever_the_text_order():
    a, b = LICENCE.format(year=1, holder="A"), LICENCE.format(year=2, holder="B")
    forward = deduplicate([Document(a, "license", "x"), Document(b, "license", "y")]).documents
    backward = deduplicate([Document(b, "license", "y"), Document(a, "license", "x")]).documents
    assert [d.source for d in forward] == ["x"] and [d.source for d in backward] == ["y"]


def test_short_and_wordless_documents():
    docs = [Document("a b", "prose", "1"), Document("a  b", "prose", "2"), Document("b a", "prose", "3"),
            Document("+++", "code", "4"), Document("---", "code", "5")]
    result = deduplicate(docs)
    assert [d.source for d in result.documents] == ["1", "3", "4", "5"]  # fewer than SHINGLE_WORDS words: one shingle
    assert SHINGLE_WORDS == 5


def test_stdlib_corpus_is_deduplicated_and_reports_it(stdlib_corpus):
    raw = raw_stdlib_documents()
    report = stdlib_dedup_report()
    assert stdlib_corpus.dedup_report == report
    raw_per_domain = collections.Counter(d.domain for d in raw)
    kept_per_domain = collections.Counter(d.domain for d in stdlib_corpus.documents)
    for domain, (kept, exact, near) in report.items():
        assert kept == kept_per_domain[domain]
        assert kept + exact + near == raw_per_domain[domain]
    assert report["license"].dropped_exact + report["license"].dropped_near > report["license"].kept  # mostly copies
    texts = [" ".join(d.text.split()) for d in stdlib_corpus.documents]
    assert len(set(texts)) == len(texts)
    assert stdlib_documents() == deduplicate(raw).documents
    line = corpus_report(stdlib_corpus)
    assert line.startswith(f"corpus stdlib: {len(stdlib_corpus.documents):,} documents") and "exact" in line and "\n" not in line
    assert load_corpus("stdlib", max_documents=3).dedup_report == report


def test_other_corpora_have_no_dedup_report(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("same\n\nsame\n")
    corpus = load_corpus(str(path))
    assert corpus.dedup_report is None and len(corpus.documents) == 2  # only the built-in corpus is deduplicated
    assert "deduplicated" not in corpus_report(corpus)


def test_balanced_every_prefix_holds_each_domain_within_one_piece(stdlib_corpus):
    balanced = load_corpus("stdlib:balanced")
    assert balanced.domains == stdlib_corpus.domains
    emitted = dict.fromkeys(balanced.domains, 0)
    largest = 0
    for doc in balanced.documents:
        size = estimate_tokens(doc.text)
        largest = max(largest, size)
        emitted[doc.domain] += size
        assert max(emitted.values()) - min(emitted.values()) <= largest
    assert largest <= 4 * PIECE_TOKENS  # only a single overlong line makes a piece larger than PIECE_TOKENS
    totals = list(emitted.values())
    assert max(totals) - min(totals) <= largest
    originals = {d.source: d.text for d in stdlib_corpus.documents}
    for doc in balanced.documents[:200]:
        assert doc.text in originals[doc.source.rsplit("#", 1)[0] if doc.source not in originals else doc.source]


def test_balanced_is_deterministic_by_seed():
    docs = stdlib_documents()
    assert balance_by_tokens(docs, seed=3) == balance_by_tokens(docs, seed=3)
    assert balance_by_tokens(docs, seed=3) != balance_by_tokens(docs, seed=4)
    assert load_corpus("stdlib:balanced").documents == load_corpus("stdlib:balanced:0").documents
    assert load_corpus("stdlib:balanced:7").name == "stdlib:balanced:7"


@pytest.mark.parametrize("spec", ["stdlib:balance", "stdlib:balanced:x", "stdlib:balanced:-1"])
def test_bad_builtin_variants_are_one_line_errors(spec):
    with pytest.raises(CorpusError, match="stdlib:balanced") as info:
        load_corpus(spec)
    assert "\n" not in str(info.value)


SHARE_TOLERANCE = 0.07  # each domain's share of the real tokens in a 65,024-token prefix: 1/4 ± this


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_token_shares_in_the_shuffled_stream(tokenizer, seed):
    """The stream chunk_and_tokenize cuts (it shuffles documents again) gives every domain about a quarter of
    the real SmolLM2 tokens of a demo-sized prefix; the plain corpus gives prose about 1-6%."""
    shares = {}
    for spec in ("stdlib", "stdlib:balanced"):
        corpus = load_corpus(spec)
        counts = collections.Counter()
        for context in chunk_and_tokenize(corpus.documents, tokenizer, 128, seed=seed, max_contexts=512):
            counts.update(corpus.documents[d].domain for d in context.doc_ids if d >= 0)
        total = sum(counts.values())
        shares[spec] = {domain: counts[domain] / total for domain in corpus.domains}
    assert shares["stdlib"]["prose"] < 0.1
    for domain, share in shares["stdlib:balanced"].items():
        assert abs(share - 0.25) <= SHARE_TOLERANCE, shares
