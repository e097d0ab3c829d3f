"""token_strings: a readable string for every vocabulary id."""

import time

from workbench.data import token_strings


def test_every_id_has_a_readable_string(tokenizer):
    start = time.perf_counter()
    strings = token_strings(tokenizer)
    assert time.perf_counter() - start < 3
    assert len(strings) == len(tokenizer) == 49152
    assert strings[tokenizer.convert_tokens_to_ids("Ġthe")] == " the"
    assert strings[tokenizer.convert_tokens_to_ids("Ċ")] == "\n"
    assert strings[tokenizer.eos_token_id] == tokenizer.eos_token


def test_token_strings_concatenate_back_to_ascii_text(tokenizer):
    text = "def f(x):\n    return x  # two  spaces\n\tTab!"
    strings = token_strings(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(strings[i] for i in ids) == text
