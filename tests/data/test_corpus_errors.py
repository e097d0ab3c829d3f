"""Every bad corpus input raises CorpusError with one line naming the problem."""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workbench.data import CorpusError, load_corpus


def _error(spec, **kwargs) -> str:
    with pytest.raises(CorpusError) as info:
        load_corpus(spec, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_unknown_spec_lists_valid_forms():
    message = _error("wikitext")
    assert "'wikitext'" in message
    assert all(form in message for form in ("stdlib", ".txt", ".jsonl", ".parquet", "hf:"))


def test_empty_spec_is_unknown():
    assert "unknown corpus spec" in _error("")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.parquet", "no/such/dir"])
def test_missing_file_is_named(tmp_path, name):
    spec = str(tmp_path / name)
    message = _error(spec)
    assert "not found" in message and spec in message


def test_unsupported_extension_lists_supported(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n")
    message = _error(str(path))
    assert "'.csv'" in message
    assert all(suffix in message for suffix in (".txt", ".jsonl", ".parquet"))


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the refusal instead
        real_open = Path.open

        def refusing_open(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refusing_open)
    message = _error(str(path))
    assert "permission denied" in message and "secret.txt" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("blank.txt", "  \n\n\t\n"),
        ("empty.jsonl", '{"text": ""}\n\n{"text": " "}\n'),
        ("none.txt", ""),
    ],
)
def test_empty_corpus(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert "empty" in _error(str(path))


def test_directory_without_txt_files(tmp_path):
    (tmp_path / "readme.md").write_text("not text")
    assert "no .txt files" in _error(str(tmp_path))


@pytest.mark.parametrize(
    ("lines", "line_number", "problem"),
    [
        (['{"text": "ok"}', "{not json"], 2, "not valid JSON"),
        (['{"text": "ok"}', "", '{"body": "x"}'], 3, "no 'text' field"),
        (['["text"]'], 1, "no 'text' field"),
        (['{"text": 5}'], 1, "non-string"),
        (['{"text": "ok", "domain": null}'], 1, "non-string"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, lines, line_number, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = _error(str(path))
    assert f"line {line_number}" in message and problem in message and "bad.jsonl" in message


def test_parquet_without_text_column_lists_columns(tmp_path):
    path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["x"], "domain": ["prose"]}), path)
    message = _error(str(path))
    assert "no 'text' column" in message and "body" in message and "notext.parquet" in message


def test_parquet_with_non_string_text_column(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    assert "'text' has type int64" in _error(str(path))


def test_corrupt_parquet_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"this is not parquet at all")
    message = _error(str(path))
    assert "cannot read" in message and "corrupt.parquet" in message


@pytest.mark.parametrize("bad", [0, -3])
def test_max_documents_must_be_positive(bad):
    assert "max_documents" in _error("stdlib", max_documents=bad)
