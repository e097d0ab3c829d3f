"""Local corpus files: .txt, directories of .txt, .jsonl and .parquet."""

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workbench.data import CORPUS_SPEC_HELP, Document, load_corpus


def test_txt_file_gives_one_document_per_blank_line_separated_block(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n\n  \nnext block\r\n\r\n\nlast\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.name == str(path)
    assert corpus.documents == (
        Document("first line\nsecond line", "text", "notes.txt:1"),
        Document("next block", "text", "notes.txt:5"),
        Document("last", "text", "notes.txt:8"),
    )


def test_directory_gives_one_document_per_txt_file_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n\nstill bee", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("nested", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not a txt file", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path))
    assert [(d.source, d.text) for d in corpus.documents] == [
        ("a.txt", "ay"), ("b.txt", "bee\n\nstill bee"), ("sub/a.txt", "nested")]
    assert corpus.domains == ("text",)


def test_jsonl_reads_text_and_optional_domain(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "def f(): pass", "domain": "code"}, {"text": "plain", "id": 7}, {"text": "  "}]
    lines = [json.dumps(rows[0]), json.dumps(rows[1]), "", json.dumps(rows[2])]
    path.write_text("\n".join(lines) + "\n")
    corpus = load_corpus(str(path))
    assert corpus.documents == (
        Document("def f(): pass", "code", "docs.jsonl:1"),
        Document("plain", "text", "docs.jsonl:2"),
    )


def test_parquet_reads_text_and_optional_domain(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": ["alpha", None, "gamma", "delta"],
                      "domain": ["prose", "code", None, "code"], "other": [1, 2, 3, 4]})
    pq.write_table(table, path, row_group_size=2)
    corpus = load_corpus(str(path))
    assert corpus.documents == (
        Document("alpha", "prose", "docs.parquet:0"),
        Document("gamma", "text", "docs.parquet:2"),
        Document("delta", "code", "docs.parquet:3"),
    )


def test_parquet_without_domain_column_labels_text(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), path)
    assert load_corpus(str(path)).domains == ("text",)


def test_max_documents_stops_early(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert [d.text for d in load_corpus(str(path), max_documents=2).documents] == ["a", "b"]


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ok\n\nna\u00efve".encode("latin-1") + b" \xff\xfe end")
    with pytest.warns(UnicodeWarning) as record:
        corpus = load_corpus(str(path))
    assert [d.text for d in corpus.documents] == ["caf\ufffd ok", "na\ufffdve \ufffd\ufffd end"]
    assert len(record) == 1
    message = str(record[0].message)
    assert "latin1.txt" in message and "4 " in message and "\n" not in message


def test_valid_utf8_with_a_literal_replacement_character_does_not_warn(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("a real \ufffd character and \u00e9", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(str(path)).documents[0].text == "a real \ufffd character and \u00e9"


def test_spec_help_names_every_form():
    for form in ("stdlib", ".txt", "directory", ".jsonl", ".parquet", "hf:NAME"):
        assert form in CORPUS_SPEC_HELP
    assert "\n" not in CORPUS_SPEC_HELP
