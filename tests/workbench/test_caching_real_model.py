"""Integration: the default model's cached residual equals an independent PyTorch hook on the HF layer."""

import pytest
import torch

from workbench.activations import context_ids, read_contexts
from workbench.caching import ActivationCacher, CacheRequest
from workbench.data import chunk_and_tokenize
from workbench.workspace import Workspace

pytestmark = pytest.mark.slow


def test_cached_resid_post_equals_a_plain_forward_hook(smollm2, stdlib_corpus, tmp_path):
    hook, layer = "blocks.15.hook_resid_post", 15
    request = CacheRequest(model="smollm2-135m", hooks=(hook,), corpus="stdlib", tokens=4 * 64, ctx_len=64, batch_size=2)
    with Workspace(tmp_path / "ws.duckdb") as ws:
        ActivationCacher(ws, smollm2, stdlib_corpus, request).run(progress=False)
        stored = read_contexts(ws, hook, context_ids(ws, hook))  # [4, 64, 576]

    contexts = list(chunk_and_tokenize(stdlib_corpus.documents, smollm2.tokenizer, 64, seed=0, max_contexts=4))
    tokens = torch.tensor([c.token_ids for c in contexts])
    seen = {}
    hf = smollm2.model.original_model
    handle = hf.model.layers[layer].register_forward_hook(
        lambda module, args, output: seen.setdefault("out", output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.inference_mode():
            hf(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    direct = seen["out"].float()
    assert stored.shape == direct.shape == (4, 64, 576)
    # float16 storage: relative error ≤ 2^-11 per element, plus rounding near zero
    torch.testing.assert_close(stored, direct, rtol=2**-10, atol=1e-2)
