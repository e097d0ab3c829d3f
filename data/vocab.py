"""Human-readable strings for every token id of a tokenizer."""

from __future__ import annotations


def token_strings(tokenizer) -> list[str]:
    """The display string of each id in ``range(len(tokenizer))``: the id decoded on its own.

    Byte-level BPE markers become real characters (``"Ġthe"`` -> ``" the"``, ``"Ċ"`` -> ``"\\n"``)
    and special tokens keep their names. A token holding only part of a UTF-8 character shows as
    U+FFFD; a SentencePiece word-start marker decoded alone may lose its leading space.
    """
    ids = [[token_id] for token_id in range(len(tokenizer))]
    return tokenizer.batch_decode(
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
