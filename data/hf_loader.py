"""Hugging Face ``datasets`` corpora: ``hf:NAME``, ``hf:NAME:SPLIT``, ``hf:NAME:CONFIG:SPLIT``.

NAME is a Hub dataset (streamed with ``datasets.load_dataset``) or a local folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``).
Rows need a string ``text`` column; an optional string ``domain`` column labels them. Every
failure inside ``datasets`` (no network, unknown name, bad split) becomes a one-line CorpusError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench.data.documents import CorpusError, Document
from workbench.data.hub import hub_unreachable
from workbench.data.loaders import DEFAULT_DOMAIN, first_line

HF_SPEC_FORMS = "hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"
DEFAULT_SPLIT = "train"
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:`` corpus spec."""

    name: str
    config: str | None
    split: str


def parse_hf_spec(spec: str) -> HFSpec:
    """Parse ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT`` (split defaults to ``train``)."""
    parts = spec.removeprefix("hf:").split(":")
    if not spec.startswith("hf:") or len(parts) > 3 or not all(p.strip() for p in parts):
        raise CorpusError(f"bad Hugging Face corpus spec {spec!r}; use {HF_SPEC_FORMS}")
    if len(parts) == 3:
        return HFSpec(parts[0], parts[1], parts[2])
    return HFSpec(parts[0], None, parts[1] if len(parts) == 2 else DEFAULT_SPLIT)


def load_hf(spec: HFSpec) -> Iterator[Document]:
    """Stream documents from the dataset's ``text`` column; source ``hf:NAME:SPLIT:ROW``."""
    for row, record in enumerate(records(spec)):
        text, domain = record.get("text"), record.get("domain") or DEFAULT_DOMAIN
        if "text" not in record or not isinstance(text, (str, type(None))):
            raise CorpusError(f"Hugging Face dataset {spec.name!r} row {row} has no string 'text' "
                              f"column (columns: {', '.join(record)}); a corpus needs one")
        if text is not None:
            yield Document(text, str(domain), f"hf:{spec.name}:{spec.split}:{row}")


def records(spec: HFSpec) -> Iterator[dict]:
    """The dataset's rows as dicts, in order; a failure while streaming is one CorpusError line."""
    rows = iter(_open_dataset(spec))
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as err:  # network or format failures surface while streaming
            raise _wrap(spec, err) from None
        yield record


def _open_dataset(spec: HFSpec):
    try:
        import datasets
    except ImportError:
        raise CorpusError("hf: corpora need the 'datasets' package; pip install datasets") from None
    local = Path(spec.name).expanduser()
    try:
        if local.is_dir() and any((local / m).is_file() for m in _SAVE_TO_DISK_MARKERS):
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if spec.split not in dataset:
                    raise CorpusError(f"Hugging Face dataset {spec.name!r} has no split "
                                      f"{spec.split!r}; splits: {', '.join(dataset)}")
                dataset = dataset[spec.split]
            return dataset
        hub_unreachable()  # offline: the libraries read their caches without retrying
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except CorpusError:
        raise
    except Exception as err:  # datasets raises many unrelated types; report each in one line
        raise _wrap(spec, err) from None


def _wrap(spec: HFSpec, err: Exception) -> CorpusError:
    config = f", config {spec.config!r}" if spec.config else ""
    offline = hub_unreachable()
    why = (f"{offline} and it is not in the local datasets cache; use a local file or a folder written by save_to_disk"
           if offline else f"{first_line(err)}; check the name, or use {HF_SPEC_FORMS}")
    return CorpusError(f"cannot load Hugging Face dataset {spec.name!r}{config}, split {spec.split!r}: {why}")
