"""The tiny LM's tokenizer: a byte-level BPE trained on the corpus (vocab ~4096, deterministic).

The special tokens take ids 0-3 (``SPECIAL_TOKENS``, in order); the model config
(``workbench.tinylm.config``) uses the same ids for BOS, EOS and padding, and the trainer
refuses token data made with other ids. The 256 byte symbols are always in the vocabulary, so
any text round-trips through encode/decode exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS: dict[str, str] = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
"""The tokenizer's special tokens, with ids 0, 1, 2, 3 in this order."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, model_max_length: int | None = None) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts in the same order).

    Specials <unk>, <s>, </s>, <pad> take ids 0-3; the 256 byte symbols are always in the
    vocabulary, so any text round-trips through encode/decode exactly. ``tokenizer(text)`` puts
    <s> in front (as the training rows have); ``add_special_tokens=False`` does not. On a small
    corpus the vocabulary can come out smaller than ``vocab_size`` (BPE runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {eos} $B", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS, **kwargs)
