"""chunk_and_tokenize against an eager reference, plus order, laziness and argument checks."""

import random

import pytest

from workbench.data import Context, Document, chunk_and_tokenize, load_corpus


def reference_contexts(documents, tokenizer, ctx_len, seed):
    """Naive eager version: tokenize everything, join with EOS, slice, prefix BOS."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    tokens, doc_ids = [], []
    for j in order:
        ids = tokenizer(documents[j].text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if tokens:
            tokens.append(tokenizer.eos_token_id)
            doc_ids.append(-1)
        tokens += ids
        doc_ids += [j] * len(ids)
    body = ctx_len - 1
    return [
        Context(i, [tokenizer.bos_token_id, *tokens[s : s + body]], [-1, *doc_ids[s : s + body]])
        for i, s in enumerate(range(0, len(tokens) - body + 1, body))
    ]


class CountingTokenizer:
    """Wraps a tokenizer and counts the documents it was asked to tokenize."""

    def __init__(self, inner, bos_token_id="inner"):
        self.inner, self.calls = inner, 0
        self.eos_token_id = inner.eos_token_id
        self.bos_token_id = inner.bos_token_id if bos_token_id == "inner" else bos_token_id

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)


@pytest.fixture(scope="module")
def documents():
    """About 60 real documents of mixed domains and lengths, one of them with no tokens."""
    docs = load_corpus("stdlib").documents
    sample = [Document(d.text[: 50 + 37 * i], d.domain, d.source) for i, d in enumerate(docs[::27])]
    return [*sample, Document("", "text", "empty")]


@pytest.mark.parametrize(("ctx_len", "seed"), [(2, 0), (17, 1), (64, 2), (257, 3)])
def test_matches_the_eager_reference(documents, tokenizer, ctx_len, seed):
    contexts = list(chunk_and_tokenize(documents, tokenizer, ctx_len, seed=seed))
    assert contexts == reference_contexts(documents, tokenizer, ctx_len, seed)
    assert len(contexts) > 5
    for i, context in enumerate(contexts):
        assert context.index == i
        assert len(context.token_ids) == len(context.doc_ids) == ctx_len
        assert context.token_ids[0] == tokenizer.bos_token_id and context.doc_ids[0] == -1


def test_doc_ids_map_tokens_back_to_their_documents(documents, tokenizer):
    contexts = list(chunk_and_tokenize(documents, tokenizer, 33, seed=7))
    labelled: dict[int, list[int]] = {}
    for context in contexts:
        for position, (token, doc_id) in enumerate(zip(context.token_ids, context.doc_ids)):
            if doc_id == -1:
                expected = tokenizer.bos_token_id if position == 0 else tokenizer.eos_token_id
                assert token == expected
            else:
                labelled.setdefault(doc_id, []).append(token)
    last = contexts[-1].doc_ids[-1]
    for doc_id, tokens in labelled.items():
        full = tokenizer(documents[doc_id].text, add_special_tokens=False)["input_ids"]
        assert tokens == (full[: len(tokens)] if doc_id == last else full)


def test_same_seed_same_contexts_different_seed_different_order(documents, tokenizer):
    def first_docs(seed):
        contexts = chunk_and_tokenize(documents, tokenizer, 64, seed=seed, max_contexts=20)
        return [c.doc_ids for c in contexts]

    assert first_docs(0) == first_docs(0)
    assert first_docs(0) != first_docs(1)


def test_max_contexts_tokenizes_only_what_it_needs(tokenizer):
    corpus = load_corpus("stdlib")
    counting = CountingTokenizer(tokenizer)
    contexts = list(chunk_and_tokenize(corpus.documents, counting, 64, seed=0, max_contexts=1))
    assert len(contexts) == 1
    assert counting.calls <= 3
    none = CountingTokenizer(tokenizer)
    assert list(chunk_and_tokenize(corpus.documents, none, 64, seed=0, max_contexts=0)) == []
    assert none.calls == 0


def test_generator_is_lazy_until_iterated(documents, tokenizer):
    counting = CountingTokenizer(tokenizer)
    stream = chunk_and_tokenize(documents, counting, 64, seed=0)
    assert counting.calls == 0
    next(stream)
    assert counting.calls < len(documents)


def test_tokenizer_without_bos_starts_contexts_with_eos(documents, tokenizer):
    no_bos = CountingTokenizer(tokenizer, bos_token_id=None)
    contexts = list(chunk_and_tokenize(documents, no_bos, 16, seed=0, max_contexts=4))
    assert [c.token_ids[0] for c in contexts] == [tokenizer.eos_token_id] * 4


def test_long_documents_are_not_truncated(tokenizer):
    text = "word " * 5000  # far beyond any per-call limit
    contexts = list(chunk_and_tokenize([Document(text, "text", "long")], tokenizer, 1001, seed=0))
    assert len(contexts) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) // 1000


@pytest.mark.parametrize("ctx_len", [1, 0, -5])
def test_ctx_len_below_two_is_rejected_in_one_line(documents, tokenizer, ctx_len):
    with pytest.raises(ValueError) as info:
        chunk_and_tokenize(documents, tokenizer, ctx_len, seed=0)
    assert "ctx_len" in str(info.value) and "\n" not in str(info.value)
