"""Baseline and steered continuations of one prompt, sampled with the same seed.

    baseline = sample(p_θ(· | prompt, t_<n))              steered = sample(p_θ^spec(· | prompt, t_<n))

both drawn with ``torch.manual_seed(seed)`` (the global RNG is forked and restored), so at
temperature > 0 the two differ only through the steering. With a KV cache every new token is a
1-position forward through the same hooks, so it is steered like the prompt.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from workbench.models import model_device

from .hooks import bridge_of, resolve_spec, steer
from .spec import SteeringError, SteeringSpec


class Generation(NamedTuple):
    prompt: str
    baseline: str
    steered: str
    baseline_tokens: list[int]
    steered_tokens: list[int]


def generate_tokens(model, tokens: Tensor, *, max_new_tokens: int = 40, seed: int = 0, temperature: float = 0.7,
                    top_p: float | None = None, use_past_kv_cache: bool = True, stop_at_eos: bool = True) -> Tensor:
    """New token ids (n,) after ``tokens`` (1, L); temperature 0 is greedy; the RNG is seeded and restored."""
    bridge = bridge_of(model)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SteeringError(f"temperature must be ≥ 0, got {temperature}")
    if max_new_tokens <= 0:
        raise SteeringError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    device = model_device(bridge)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = bridge.generate(
            tokens, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_p=top_p, stop_at_eos=stop_at_eos, use_past_kv_cache=use_past_kv_cache, return_type="tokens", verbose=False,
        )  # (1, L + n)
    return out[0, tokens.shape[1]:]


def generate(model, prompt: str, spec: SteeringSpec, *, max_new_tokens: int = 40, seed: int = 0, temperature: float = 0.7,
             top_p: float | None = None, ws=None, use_past_kv_cache: bool = True) -> Generation:
    """Baseline and steered continuations of ``prompt`` with the same sampling seed."""
    bridge = bridge_of(model)
    if not isinstance(prompt, str) or not prompt.strip():
        raise SteeringError("the prompt is empty: give some text to continue")
    resolve_spec(bridge, spec, ws)  # fail before spending time on the baseline
    tokens = bridge.to_tokens(prompt)  # (1, L), BOS prepended
    kwargs = dict(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p, use_past_kv_cache=use_past_kv_cache)
    base = generate_tokens(bridge, tokens, **kwargs)
    with steer(bridge, spec, ws=ws):
        steered = generate_tokens(bridge, tokens, **kwargs)
    decode = bridge.tokenizer.decode
    return Generation(prompt, decode(base, skip_special_tokens=True), decode(steered, skip_special_tokens=True),
                      base.tolist(), steered.tolist())
