"""Labelled text datasets for sparse probing: ``load_labelled(spec)`` from a spec to LabelledTexts.

A spec is a ``.jsonl`` file (one JSON object per line, blank lines ignored), a ``.csv`` or
``.tsv`` file (a header row naming the fields; the csv module's quoting, so a quoted field may
hold commas, tabs, quotes and newlines), a ``.parquet`` file, or ``hf:NAME[:SPLIT]`` /
``hf:NAME:CONFIG:SPLIT`` for a Hugging Face dataset (parsed and opened by ``workbench.data.hf_loader``: a
Hub dataset, streamed, or served from the local ``datasets`` cache when offline, or a
``save_to_disk`` folder). Every row needs a text field (``text``) and a label field (``label``).

Labels keep their type: JSONL, parquet and Hugging Face labels may be strings, integers or
booleans (one type per dataset); CSV and TSV cells are always strings. Files are decoded as
UTF-8 as the corpus loaders do: undecodable bytes become U+FFFD and a UnicodeWarning names the
file and the number of replacements (such files load; they are not refused). Every bad input
raises LabelledError, a CorpusError whose message is one line naming the file, the line or row,
and what is valid.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from workbench.data.documents import CorpusError
from workbench.data.hf_loader import HF_SPEC_FORMS, parse_hf_spec, records
from workbench.data.loaders import _open_binary, first_line, jsonl_values, read_text

LABEL_TYPES = (str, int, bool)
LABELLED_SPEC_HELP = (
    "a .jsonl file (one JSON object per line), a .csv or .tsv file (header row), a .parquet "
    f"file, or {HF_SPEC_FORMS} (a Hugging Face dataset); each row has a text and a label field"
)

Row = tuple[str, str, Mapping]  # (origin, place, fields by name): "'f.jsonl'", "line 3", {...}


class LabelledError(CorpusError):
    """Bad labelled-dataset input; str(err) is one line naming the problem and what is valid."""


class LabelledTexts(NamedTuple):
    """Texts with one label each, in the dataset's own order."""

    texts: list[str]
    """Each row's text field: a non-empty string."""
    labels: list
    """Each row's label field, its type kept (str, int or bool; one type per dataset)."""
    source: str
    """The spec the dataset was loaded from."""


def load_labelled(spec: str, *, text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """Load the labelled dataset named by ``spec`` (see the module docstring and LABELLED_SPEC_HELP).

    Raises LabelledError (one line) on a missing file, an unknown extension, a row without
    ``text_field`` or ``label_field`` (naming the fields it has), a text that is not a non-empty
    string, a label that is None, empty or not a str/int/bool, labels of mixed types, no rows,
    or fewer than 2 distinct labels.
    """
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if not isinstance(value, str) or not value:
            raise LabelledError(f"{name} must be a non-empty field name, got {value!r}")
    if text_field == label_field:
        raise LabelledError(f"text_field and label_field are both {text_field!r}; they must differ")
    expected = (f"each row needs a string {text_field!r} field and a {label_field!r} field "
                "(string, integer or boolean)")
    texts: list[str] = []
    labels: list = []
    first_of_type: dict[type, tuple[object, str]] = {}  # label type -> (first such label, its place)
    try:
        for origin, place, record in _rows(spec, (text_field, label_field), expected):
            where = f"{origin} {place}"
            for field in (text_field, label_field):
                if field not in record:
                    raise LabelledError(f"{where} has no {field!r} field (fields: {_names(record)}); {expected}")
            text, label = record[text_field], record[label_field]
            if not isinstance(text, str):
                raise LabelledError(f"{where}: {text_field!r} is {_kind(text)}, not a string; {expected}")
            if not text:
                raise LabelledError(f"{where} has an empty {text_field!r}; every text needs at least one "
                                    "character")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise LabelledError(f"{where} has a null or empty {label_field!r} ({label!r}); every row "
                                    "needs a label")
            if not isinstance(label, LABEL_TYPES):
                raise LabelledError(f"{where}: {label_field!r} is {_kind(label)} ({_short(label)}); "
                                    "labels name classes: a string, integer or boolean")
            first_of_type.setdefault(type(label), (label, place))
            if len(first_of_type) > 1:  # 1 and "1", or True and 1, would be one class to the probe
                (a, at_a), (b, at_b) = first_of_type.values()
                raise LabelledError(f"{origin} mixes label types: {_kind(a)} at {at_a} ({_short(a)}) and "
                                    f"{_kind(b)} at {at_b} ({_short(b)}); the labels of one dataset must "
                                    "share one type")
            texts.append(text)
            labels.append(label)
    except LabelledError:
        raise
    except CorpusError as err:  # from the shared corpus helpers (unreadable file, invalid JSON, hf failures)
        raise LabelledError(str(err)) from None
    if not texts:
        raise LabelledError(f"labelled dataset {spec!r} has no rows; {expected}")
    distinct = set(labels)
    if len(distinct) < 2:
        raise LabelledError(f"labelled dataset {spec!r} has 1 distinct {label_field!r} ({_short(labels[0])}) "
                            f"in {len(texts)} rows; probing needs at least 2 classes")
    return LabelledTexts(texts, labels, spec)


# -- one reader per format: each yields (origin, place, record) ----------------------------

def _rows(spec: str, fields: tuple[str, str], expected: str) -> Iterator[Row]:
    if spec.startswith("hf:"):
        return _hf_rows(spec)
    path = Path(spec).expanduser()
    valid = f"expected an existing {', '.join(_FILE_READERS)} file, or {HF_SPEC_FORMS}"
    if not spec.strip() or not path.exists():
        raise LabelledError(f"labelled dataset not found: {spec!r}; {valid}")
    if path.is_dir():
        raise LabelledError(f"{spec!r} is a directory; {valid} (hf:FOLDER reads a datasets "
                            "save_to_disk folder)")
    suffix = path.suffix.lower()
    if suffix not in _FILE_READERS:
        raise LabelledError(f"unsupported labelled file type {path.suffix or '(none)'!r} for {spec!r}; "
                            f"supported: {', '.join(_FILE_READERS)} files, or {HF_SPEC_FORMS}")
    return _FILE_READERS[suffix](path, fields, expected)


def _jsonl_rows(path: Path, fields: tuple[str, str], expected: str) -> Iterator[Row]:
    for number, where, record in jsonl_values(path, expected):  # its CorpusError becomes a LabelledError in load_labelled
        if not isinstance(record, dict):
            raise LabelledError(f"{where} is {_kind(record)}, not a JSON object; {expected}")
        yield repr(str(path)), f"line {number}", record


def _delimited_rows(delimiter: str) -> Callable[[Path, tuple[str, str], str], Iterator[Row]]:
    def rows(path: Path, fields: tuple[str, str], expected: str) -> Iterator[Row]:
        reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                header = next(reader, None)
            if header is None:
                return
            for field in fields:
                if field not in header:
                    raise LabelledError(f"{str(path)!r} header (line {reader.line_num}) has no {field!r} column "
                                        f"(columns: {_names(header)}); {expected}")
            while True:
                start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
                cells = next(reader, None)
                if cells is None:
                    return
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):
                    raise LabelledError(f"{str(path)!r} line {start} has {len(cells)} fields but the header "
                                        f"has {len(header)} ({_names(header)}); quote fields that contain "
                                        f"{delimiter!r}")
                yield repr(str(path)), f"line {start}", dict(zip(header, cells))
        except csv.Error as err:
            raise LabelledError(f"{str(path)!r} line {reader.line_num}: {first_line(err)}; {expected}") from None
    return rows


def _parquet_rows(path: Path, fields: tuple[str, str], expected: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open_binary(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise LabelledError(f"cannot read {str(path)!r} as parquet ({first_line(err)}); {expected}") from None
        names = parquet.schema_arrow.names
        for field in fields:
            if field not in names:
                raise LabelledError(f"{str(path)!r} has no {field!r} column (columns: {_names(names)}); "
                                    f"{expected}")
        row = 0
        for batch in parquet.iter_batches(columns=list(fields)):
            columns = [batch.column(field).to_pylist() for field in fields]
            for values in zip(*columns):
                yield repr(str(path)), f"row {row}", dict(zip(fields, values))
                row += 1


def _hf_rows(spec_text: str) -> Iterator[Row]:
    try:
        spec = parse_hf_spec(spec_text)
    except CorpusError:
        raise LabelledError(f"bad Hugging Face dataset spec {spec_text!r}; use {HF_SPEC_FORMS}") from None
    origin = f"Hugging Face dataset {spec.name!r} split {spec.split!r}"
    for row, record in enumerate(records(spec)):
        yield origin, f"row {row}", record


_FILE_READERS: dict[str, Callable[[Path, tuple[str, str], str], Iterator[Row]]] = {
    ".jsonl": _jsonl_rows,
    ".csv": _delimited_rows(","),
    ".tsv": _delimited_rows("\t"),
    ".parquet": _parquet_rows,
}


def _kind(value: object) -> str:
    """'an integer', 'null', ...: the value's type as a message says it."""
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a float", dict: "an object",
             list: "an array", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _names(names) -> str:
    """Field names joined for a one-line message."""
    return ", ".join(str(name).replace("\n", "\\n") for name in names) or "none"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"
