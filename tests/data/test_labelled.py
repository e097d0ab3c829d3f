"""Labelled datasets for sparse probing: every format round-trips, and every bad input is one line."""

import csv
import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workbench.data.documents import CorpusError
from workbench.data.labelled import LabelledError, LabelledTexts, load_labelled

TEXTS = [
    "plain text",
    'a "quoted", comma-separated\nmulti-line text',
    "tab\there, ünïcödé ✓",
    "  leading spaces",
]
LABELS = ["pos", "neg", "pos", "neutral"]


def write_jsonl(path, rows, *, blank_lines=True):
    lines = [json.dumps(row) for row in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def write_delimited(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_format(tmp_path, fmt, columns: dict[str, list]) -> str:
    """The same columns written as ``fmt``; returns the spec that loads them."""
    names = list(columns)
    rows = [dict(zip(names, values)) for values in zip(*columns.values())]
    if fmt == "jsonl":
        return str(write_jsonl(tmp_path / "data.jsonl", rows))
    if fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        return str(write_delimited(tmp_path / f"data.{fmt}", names, [list(r.values()) for r in rows], delimiter))
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.table(columns), path)
        return str(path)
    if fmt == "hf":
        folder = tmp_path / "hf_data"
        datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
        return f"hf:{folder}"
    raise AssertionError(fmt)


FORMATS = ["jsonl", "csv", "tsv", "parquet", "hf"]


def _error(spec, **kwargs) -> str:
    with pytest.raises(LabelledError) as info:
        load_labelled(spec, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_the_same_dataset(tmp_path, fmt):
    # an extra column placed first: fields are found by name, not position
    spec = write_format(tmp_path, fmt, {"id": ["a", "b", "c", "d"], "label": LABELS, "text": TEXTS})
    loaded = load_labelled(spec)
    assert loaded == LabelledTexts(TEXTS, LABELS, spec)
    texts, labels, source = loaded  # unpacks like the (texts, labels) pair the CLI used
    assert (texts, labels, source) == (TEXTS, LABELS, spec)


def test_csv_quoting_survives_commas_quotes_and_newlines(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('text,label\n"one, two",a\n"say ""hi""\nthen leave",b\r\nplain,a\n', encoding="utf-8")
    assert load_labelled(str(path)).texts == ["one, two", 'say "hi"\nthen leave', "plain"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
@pytest.mark.parametrize("labels", [[0, 1, 1, 2], [True, False, False, True], ["x", "y", "x", "y"]])
def test_typed_formats_keep_the_label_type(tmp_path, fmt, labels):
    loaded = load_labelled(write_format(tmp_path, fmt, {"text": TEXTS, "label": labels}))
    assert loaded.labels == labels
    assert [type(v) for v in loaded.labels] == [type(v) for v in labels]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_labels_are_strings(tmp_path, fmt):
    assert load_labelled(write_format(tmp_path, fmt, {"text": TEXTS, "label": [0, 1, 1, 2]})).labels == [
        "0", "1", "1", "2"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_custom_field_names(tmp_path, fmt):
    spec = write_format(tmp_path, fmt, {"sentence": TEXTS, "sentiment": LABELS})
    assert load_labelled(spec, text_field="sentence", label_field="sentiment") == (TEXTS, LABELS, spec)
    message = _error(spec)  # the defaults are not there: the message names what is
    assert "'text'" in message and "sentence" in message and "sentiment" in message


def test_hf_dataset_dict_split_and_class_label(tmp_path):
    folder = tmp_path / "dd"
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"], "label": [0, 1]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["e1", "e2", "e3"], "label": [1, 0, 1]}, features=features),
    }).save_to_disk(str(folder))
    assert load_labelled(f"hf:{folder}:test") == (["e1", "e2", "e3"], [1, 0, 1], f"hf:{folder}:test")
    assert load_labelled(f"hf:{folder}").texts == ["t1", "t2"]  # split defaults to train
    assert "no split 'dev'; splits: train, test" in _error(f"hf:{folder}:dev")


def test_hf_hub_dataset_served_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A Hub dataset loaded once before is read from the datasets cache with the hub unreachable."""
    from datasets.packaged_modules.json.json import Json

    source = write_jsonl(tmp_path / "src.jsonl", [{"text": t, "label": v} for t, v in zip(TEXTS, LABELS)])
    cache = tmp_path / "cache"
    # what a first, online load_dataset("test-org/reviews") leaves in the cache
    Json(cache_dir=str(cache), dataset_name="reviews", data_files={"train": str(source)}, config_id="default",
         hash="0123abcd").download_and_prepare()
    (cache / "reviews").rename(cache / "test-org___reviews")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert load_labelled("hf:test-org/reviews") == (TEXTS, LABELS, "hf:test-org/reviews")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_become_replacement_characters_with_a_warning(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    body = (b'{"text": "caf\xe9", "label": "a"}\n{"text": "ok", "label": "b"}\n' if suffix == ".jsonl"
            else b"text,label\ncaf\xe9,a\nok,b\n")
    path.write_bytes(body)
    with pytest.warns(UnicodeWarning, match=r"latin1.*1 undecodable"):
        loaded = load_labelled(str(path))
    assert loaded.texts == ["caf\ufffd", "ok"]


# -- errors: one line each, naming the file, the place and what is valid -------------------------

def test_errors_are_corpus_errors():
    assert issubclass(LabelledError, CorpusError)  # the CLI already reports CorpusError as one line


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet", "no/such/file.tsv"])
def test_missing_file_is_named_with_the_valid_forms(tmp_path, name):
    spec = str(tmp_path / name)
    message = _error(spec)
    assert "not found" in message and spec in message
    assert all(form in message for form in (".jsonl", ".csv", ".tsv", ".parquet", "hf:NAME"))


def test_unknown_extension_lists_the_valid_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text\tlabel\n")
    message = _error(str(path))
    assert "'.txt'" in message and str(path) in message
    assert all(form in message for form in (".jsonl", ".csv", ".tsv", ".parquet", "hf:NAME"))


def test_directory_points_to_hf_folder(tmp_path):
    assert "is a directory" in _error(str(tmp_path)) and "hf:FOLDER" in _error(str(tmp_path))


def test_jsonl_row_missing_a_field_names_line_field_and_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "y": 2}], blank_lines=False)
    message = _error(str(path))
    assert "d.jsonl' line 2" in message and "no 'label' field" in message and "(fields: text, y)" in message


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"label": 2}])  # blank line between
    message = _error(str(path))
    assert "line 3" in message and "no 'text' field" in message and "(fields: label)" in message


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "hf"])
@pytest.mark.parametrize("missing", ["text", "label"])
def test_columnar_formats_missing_a_field_list_the_columns(tmp_path, fmt, missing):
    columns = {"text": ["a", "b"], "label": ["x", "y"]}
    columns["other"] = columns.pop(missing)
    message = _error(write_format(tmp_path, fmt, columns))
    assert f"no {missing!r}" in message and "other" in message
    assert {"csv": "line 1", "tsv": "line 1", "parquet": "data.parquet", "hf": "row 0"}[fmt] in message


def test_non_string_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": 5, "label": 2}], blank_lines=False)
    message = _error(str(path))
    assert "line 2" in message and "'text' is an integer, not a string" in message


def test_non_string_parquet_column(tmp_path):
    message = _error(write_format(tmp_path, "parquet", {"text": [1, 2], "label": ["a", "b"]}))
    assert "row 0" in message and "'text' is an integer" in message


def test_empty_text(tmp_path):
    message = _error(write_format(tmp_path, "csv", {"text": ["a", ""], "label": ["x", "y"]}))
    assert "line 3" in message and "empty 'text'" in message


@pytest.mark.parametrize(("fmt", "place"), [("jsonl", "line 3"), ("csv", "line 3"), ("parquet", "row 1"),
                                             ("hf", "row 1")])
def test_null_or_empty_label(tmp_path, fmt, place):
    labels = ["x", "" if fmt == "csv" else None, "y"]
    message = _error(write_format(tmp_path, fmt, {"text": ["a", "b", "c"], "label": labels}))
    assert place in message and "null or empty 'label'" in message


def test_whitespace_label_is_empty(tmp_path):
    assert "empty 'label'" in _error(write_format(tmp_path, "jsonl", {"text": ["a", "b"], "label": ["x", "  "]}))


@pytest.mark.parametrize(("label", "kind"), [(0.5, "a float"), ([1], "an array"), ({"a": 1}, "an object")])
def test_label_of_another_type(tmp_path, label, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": label}])
    message = _error(str(path))
    assert f"'label' is {kind}" in message and "string, integer or boolean" in message


@pytest.mark.parametrize("labels", [["1", 1], [True, 1], [0, False]])
def test_mixed_label_types(tmp_path, labels):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": labels[0]}, {"text": "b", "label": labels[1]}],
                       blank_lines=False)
    message = _error(str(path))
    assert "mixes label types" in message and "line 1" in message and "line 2" in message


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_empty_dataset(tmp_path, fmt):
    assert "has no rows" in _error(write_format(tmp_path, fmt, {"text": [], "label": []}))


def test_empty_jsonl_has_no_rows(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n  \n")
    assert "has no rows" in _error(str(path))


def test_empty_hf_dataset_has_no_rows(tmp_path):
    folder = tmp_path / "empty"  # datasets cannot reload a 0-shard save, so keep one empty shard
    datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]}).select([]).save_to_disk(str(folder), num_shards=1)
    assert "has no rows" in _error(f"hf:{folder}")


def test_empty_csv_file_has_no_rows(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("")
    assert "has no rows" in _error(str(path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_than_two_labels(tmp_path, fmt):
    spec = write_format(tmp_path, fmt, {"text": ["a", "b", "c"], "label": ["same"] * 3})
    message = _error(spec)
    assert "1 distinct 'label' ('same') in 3 rows" in message and "at least 2" in message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    message = _error(str(path))
    assert "line 2 is not valid JSON" in message and "'text'" in message


def test_non_object_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", 1]\n')
    assert "line 1 is an array, not a JSON object" in _error(str(path))


def test_csv_row_with_the_wrong_number_of_fields_names_its_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",a\nunquoted, comma,b\n')
    message = _error(str(path))
    assert "line 4 has 3 fields but the header has 2 (text, label)" in message


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet")
    assert "cannot read" in _error(str(path)) and "bad.parquet" in _error(str(path))


@pytest.mark.parametrize("spec", ["hf:", "hf:name:", "hf::train", "hf:a:b:c:d"])
def test_bad_hf_spec_gives_the_valid_forms(spec):
    message = _error(spec)
    assert repr(spec) in message and "hf:NAME:CONFIG:SPLIT" in message


def test_missing_hub_dataset_offline_gives_one_line(monkeypatch):
    # Offline mode fails at once instead of retrying the network for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "'no-such-org/no-such-dataset'" in _error("hf:no-such-org/no-such-dataset:train")


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"text_field": ""}, "text_field must be a non-empty field name"),
    ({"label_field": "text"}, "both 'text'"),
])
def test_bad_field_names(tmp_path, kwargs, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}])
    assert expected in _error(str(path), **kwargs)


def test_csv_header_after_blank_lines_is_named_by_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\n\ntext,y\na,b\n")
    assert "header (line 3) has no 'label' column (columns: text, y)" in _error(str(path))
