"""hf: corpora: spec parsing, local save_to_disk datasets, and one-line failures offline."""

import datasets
import huggingface_hub.constants
import pytest

from workbench.data import CorpusError, Document, load_corpus
from workbench.data.hf_loader import HFSpec, parse_hf_spec


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("hf:wikitext", HFSpec("wikitext", None, "train")),
        ("hf:org/name:validation", HFSpec("org/name", None, "validation")),
        ("hf:wikitext:wikitext-2-raw-v1:test", HFSpec("wikitext", "wikitext-2-raw-v1", "test")),
    ],
)
def test_spec_forms(spec, parsed):
    assert parse_hf_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["hf:", "hf:name:", "hf::train", "hf:a:b:c:d"])
def test_bad_specs_give_one_line_with_valid_forms(spec):
    with pytest.raises(CorpusError) as info:
        load_corpus(spec)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message and "hf:NAME:CONFIG:SPLIT" in message


def test_local_dataset_saved_to_disk(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {"text": ["one", None, "three", " "], "domain": ["code", "prose", None, "code"]}
    ).save_to_disk(str(folder))
    spec = f"hf:{folder}"
    corpus = load_corpus(spec)
    assert corpus.documents == (
        Document("one", "code", f"hf:{folder}:train:0"),
        Document("three", "text", f"hf:{folder}:train:2"),
    )


def test_local_dataset_dict_picks_the_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        "test": datasets.Dataset.from_dict({"text": ["e1"]}),
    }).save_to_disk(str(folder))
    assert [d.text for d in load_corpus(f"hf:{folder}:test").documents] == ["e1"]
    assert [d.text for d in load_corpus(f"hf:{folder}", max_documents=1).documents] == ["t1"]
    with pytest.raises(CorpusError, match=r"no split 'dev'; splits: train, test$"):
        load_corpus(f"hf:{folder}:dev")


def test_dataset_without_text_column(tmp_path):
    folder = tmp_path / "notext"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(folder))
    with pytest.raises(CorpusError, match=r"no string 'text' column \(columns: body\)"):
        load_corpus(f"hf:{folder}")


def test_missing_hub_dataset_gives_one_line(monkeypatch):
    # Offline mode fails at once instead of retrying the network for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError) as info:
        load_corpus("hf:no-such-org/no-such-dataset:train")
    message = str(info.value)
    assert "\n" not in message and "'no-such-org/no-such-dataset'" in message
