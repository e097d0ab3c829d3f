"""The tiny LM's token data: the BPE tokenizer trained on a corpus and the training and held-out rows.

    corpus ──train_tokenizer──▶ byte-level BPE (vocab ~4096, deterministic)
           ──prepare_token_data──▶ BOS-prefixed rows of `context` tokens (data.chunk_and_tokenize);
                                   every `heldout_every`-th row is held out, training never sees it

With a directory, the result is a snapshot (token_data.json, rows.safetensors, tokenizer/),
published crash-safe and loaded on later calls, so an interrupted series resumes on the same
rows; its sha256 fingerprint (tokenizer and rows) ties every checkpoint to the data it saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import first_line
from workbench.publish import publish_dir
from workbench.tinylm.config import SeriesError
from workbench.tinylm.tokenizer import train_tokenizer

DATA_JSON = "token_data.json"
DATA_ROWS = "rows.safetensors"
TOKENIZER_SUBDIR = "tokenizer"


class TokenData(NamedTuple):
    tokenizer: "PreTrainedTokenizerFast"  # noqa: F821
    """The BPE tokenizer the rows were made with; saved into every checkpoint."""
    train: torch.Tensor
    """(n_train, context) int64 training rows, each starting with BOS."""
    heldout: torch.Tensor
    """(n_heldout, context) int64 rows training never sees (every heldout_every-th row)."""
    fingerprint: str
    """sha256 of the tokenizer and the rows; a series refuses to resume on different data."""
    info: dict
    """How the data was made: corpus, documents, vocab_size, context, seed, heldout_every, tokens."""


def prepare_token_data(
    corpus,
    directory: str | Path | None = None,
    *,
    vocab_size: int = 4096,
    context: int = 128,
    seed: int = 0,
    heldout_every: int = 20,
) -> TokenData:
    """Tokenizer + training and held-out rows for ``corpus`` (a ``data.Corpus``).

    The tokenizer is trained on every document; ``data.chunk_and_tokenize`` (seeded document
    shuffle, EOS between documents, BOS-prefixed rows of ``context`` tokens) makes the rows, and
    rows with index % heldout_every == heldout_every - 1 are held out. With ``directory``, the
    result is built once (written to a temporary sibling, then renamed) and later calls with the
    same corpus name and arguments load that snapshot, even if the corpus has changed since
    (``stdlib`` grows when packages are installed), so an interrupted series resumes on the
    same rows; other arguments raise SeriesError.
    """
    from workbench.data import chunk_and_tokenize

    if heldout_every < 2:
        raise SeriesError(f"heldout_every must be at least 2, got {heldout_every}")
    info = {"corpus": corpus.name, "vocab_size": vocab_size, "context": context, "seed": seed, "heldout_every": heldout_every}
    if directory is not None and (Path(directory) / DATA_JSON).is_file():
        data = load_token_data(directory)
        stored = {k: data.info.get(k) for k in info}
        if stored != info:
            raise SeriesError(f"{directory} holds token data made with {stored}, not {info}; use another directory")
        return data

    tokenizer = train_tokenizer((doc.text for doc in corpus.documents), vocab_size, model_max_length=context)
    rows = [c.token_ids for c in chunk_and_tokenize(corpus.documents, tokenizer, context, seed=seed)]
    if len(rows) < heldout_every:
        raise SeriesError(f"corpus {corpus.name!r} gives {len(rows)} rows of {context} tokens; "
                          f"at least heldout_every={heldout_every} are needed")
    all_rows = torch.tensor(rows, dtype=torch.int64)  # (n_rows, context)
    is_heldout = torch.arange(len(rows)) % heldout_every == heldout_every - 1
    train, heldout = all_rows[~is_heldout].contiguous(), all_rows[is_heldout].contiguous()
    info = {**info, "documents": len(corpus.documents), "tokenizer_vocab": len(tokenizer), "train_rows": len(train),
            "heldout_rows": len(heldout), "train_tokens": train.numel()}
    data = TokenData(tokenizer, train, heldout, _fingerprint(tokenizer, train, heldout), info)
    if directory is not None:
        publish_dir(Path(directory), lambda tmp: _save_token_data(data, tmp))
        return load_token_data(directory)
    return data


def load_token_data(directory: str | Path) -> TokenData:
    """Token data written by ``prepare_token_data(..., directory)``."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        info = json.loads((directory / DATA_JSON).read_text())
        rows = load_file(str(directory / DATA_ROWS))
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_SUBDIR))
    except (OSError, ValueError) as err:
        raise SeriesError(f"no readable token data in {directory}: {first_line(err)}") from None
    train, heldout = rows["train"].long(), rows["heldout"].long()
    fingerprint = _fingerprint(tokenizer, train, heldout)
    if fingerprint != info.get("fingerprint"):
        raise SeriesError(f"token data in {directory} does not match its recorded fingerprint (corrupted?)")
    return TokenData(tokenizer, train, heldout, fingerprint, {k: v for k, v in info.items() if k != "fingerprint"})


def _save_token_data(data: TokenData, out: Path) -> None:
    data.tokenizer.save_pretrained(str(out / TOKENIZER_SUBDIR))
    save_file({"train": data.train.to(torch.int32), "heldout": data.heldout.to(torch.int32)}, str(out / DATA_ROWS))
    (out / DATA_JSON).write_text(json.dumps({**data.info, "fingerprint": data.fingerprint}, indent=2))


def _fingerprint(tokenizer, train: torch.Tensor, heldout: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True).encode())
    for rows in (train, heldout):
        h.update(str(tuple(rows.shape)).encode())
        h.update(rows.to(torch.int32).numpy().tobytes())
    return h.hexdigest()
