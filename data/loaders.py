"""Loaders for local corpus files: each yields Documents, raising CorpusError on bad input.

Text is decoded as UTF-8; undecodable bytes become U+FFFD and a UnicodeWarning names the
file and the number of replacements (a documented choice: such files load, they are not refused).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from workbench.data.documents import CorpusError, Document

DEFAULT_DOMAIN = "text"
_REPLACEMENT_UTF8 = "\ufffd".encode()


def load_txt_file(path: Path) -> Iterator[Document]:
    """One document per block of consecutive non-blank lines; source ``NAME:FIRST_LINE``."""
    lines = read_text(path).split("\n")
    block: list[str] = []
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            block.append(line)
        elif block:
            first_line = number - len(block)
            yield Document("\n".join(block), DEFAULT_DOMAIN, f"{path.name}:{first_line}")
            block = []


def load_txt_dir(path: Path) -> Iterator[Document]:
    """One document per ``.txt`` file under ``path`` (recursively), sorted by relative path."""
    files = sorted((p for p in path.rglob("*") if p.suffix.lower() == ".txt" and p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CorpusError(f"directory {str(path)!r} has no .txt files; a corpus directory holds "
                          "one .txt file per document")
    for file in files:
        yield Document(read_text(file), DEFAULT_DOMAIN, file.relative_to(path).as_posix())


def jsonl_values(path: Path, expected: str) -> Iterator[tuple[int, str, object]]:
    """(line number, "'path' line N", parsed value) per non-blank line; invalid JSON is one CorpusError line."""
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{where} is not valid JSON ({err.msg}); {expected}") from None


def load_jsonl(path: Path) -> Iterator[Document]:
    """One document per non-blank line: an object with a string ``text`` and optional ``domain``."""
    expected = "each line must be a JSON object with a string 'text' field and optional 'domain'"
    for number, where, record in jsonl_values(path, expected):
        if not isinstance(record, dict) or "text" not in record:
            raise CorpusError(f"{where} has no 'text' field; {expected}")
        text, domain = record["text"], record.get("domain", DEFAULT_DOMAIN)
        if not isinstance(text, str) or not isinstance(domain, str):
            raise CorpusError(f"{where} has a non-string 'text' or 'domain'; {expected}")
        yield Document(text, domain, f"{path.name}:{number}")


def load_parquet(path: Path) -> Iterator[Document]:
    """One document per row with a non-null string ``text`` column; optional ``domain`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = "a parquet corpus needs a string 'text' column and an optional string 'domain'"
    with _open_binary(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"cannot read {str(path)!r} as parquet ({first_line(err)}); "
                              f"{expected}") from None
        schema = parquet.schema_arrow
        if "text" not in schema.names:
            raise CorpusError(f"{str(path)!r} has no 'text' column (columns: "
                              f"{', '.join(schema.names) or 'none'}); {expected}")
        columns = [c for c in ("text", "domain") if c in schema.names]
        for column in columns:
            kind = schema.field(column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise CorpusError(f"{str(path)!r} column {column!r} has type {kind}; {expected}")
        row = 0
        for batch in parquet.iter_batches(columns=columns):
            texts = batch.column("text").to_pylist()
            domains = (batch.column("domain").to_pylist() if "domain" in columns
                       else [None] * len(texts))
            for text, domain in zip(texts, domains):
                if text is not None:
                    yield Document(text, domain or DEFAULT_DOMAIN, f"{path.name}:{row}")
                row += 1


def read_text(path: Path) -> str:
    """The file decoded as UTF-8 with ``\\n`` newlines; bad bytes become U+FFFD with a warning."""
    with _open_binary(path) as handle:
        try:
            raw = handle.read()
        except OSError as err:
            raise CorpusError(f"cannot read {str(path)!r}: {first_line(err)}") from None
    text = raw.decode("utf-8-sig", errors="replace")
    replaced = text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
    if replaced:
        warnings.warn(f"{str(path)!r} is not valid UTF-8: {replaced} undecodable byte sequence(s) "
                      "replaced with U+FFFD", UnicodeWarning, stacklevel=2)
    return text.replace("\r\n", "\n").replace("\r", "\n")


@contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {str(path)!r}") from None
    except PermissionError:
        raise CorpusError(f"cannot read {str(path)!r}: permission denied; the corpus file must "
                          "be readable by this user") from None
    except OSError as err:
        raise CorpusError(f"cannot read {str(path)!r}: {first_line(err)}") from None
    with handle:
        yield handle


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, for one-line error reports."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
