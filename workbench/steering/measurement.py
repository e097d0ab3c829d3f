"""Measure a spec's effect instead of eyeballing generations (docs/algorithms.md §7).

Teacher-forced, one text per forward, p = the baseline and q = the steered next-token distribution:

- feature activation: z_i of the SAE encoding of the hook's activation after every intervention on
  that hook, mean over prompt positions ≥ 1 (BOS is not what the SAE was trained on);
- top-token log-probability: log Σ_{t ∈ T} q(t) at every prompt position, T = the ``top_n`` tokens
  most promoted by the intervention's direction through the final norm's weight γ and the
  unembedding, (v ⊙ γ) W_Uᵀ (the norm's input-dependent scale left out, as in ``analysis.py``);
- side-effect cost on neutral text, nats per position, every position included:
      KL(p ‖ q) = Σ_t p(t) (log p(t) − log q(t))
      JS(p, q)  = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = (p + q)/2      (0 ≤ JS ≤ ln 2; the codebook-features
                                                                 paper's measure of a code's effect)
``sweep`` runs ``measure`` at each strength, sharing the unsteered forwards.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.analysis import logit_effects
from workbench.models import model_device

from .hooks import bridge_of, resolve_spec
from .sources import encoder
from .spec import SteeringError, SteeringSpec

TOP_TOKENS = 10
MEASURE_TOKENS = 64  # texts are truncated to this many tokens (BOS included) in measure()
NEUTRAL_TEXTS = (  # fallback side-effect texts when no workspace is given (ordinary prose, no topic)
    "The meeting was moved to Thursday afternoon because several people were travelling.",
    "She opened the window, made a cup of tea and sat down to read the morning paper.",
    "Most libraries lend books for three weeks, and you can usually renew them online.",
    "The train left the station a few minutes late, but it arrived on time.",
)
LN2 = math.log(2.0)


def logit_effect(model, direction: Tensor) -> Tensor:
    """(vocab,) direct logit effect (v ⊙ γ) W_Uᵀ of a direction (or (n, vocab) for (n, d)); γ = the final norm's weight."""
    if direction.dim() == 1:
        return logit_effects(direction[None], bridge_of(model))[0]
    return logit_effects(direction, bridge_of(model))


def top_tokens(model, direction: Tensor, n: int = TOP_TOKENS) -> list[int]:
    """The ``n`` tokens the direction promotes most."""
    return logit_effect(model, direction).topk(n).indices.tolist()


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """(...,) KL(p ‖ q) in nats from log-probabilities (..., vocab)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """(...,) Jensen–Shannon divergence in nats (≤ ln 2) from log-probabilities (..., vocab)."""
    # With d = log q − log p: log p − log m = ln 2 − softplus(d) and log q − log m = ln 2 − softplus(−d),
    # which are exactly 0 where p = q (log m written out would leave ~1 ulp of |log p| per token).
    p, q = logp.exp(), logq.exp()  # (..., vocab)
    d = logq - logp
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    from_p = torch.where(p > 0, p * (LN2 - F.softplus(d)), zero)
    from_q = torch.where(q > 0, q * (LN2 - F.softplus(-d)), zero)
    return (0.5 * (from_p + from_q).sum(-1)).clamp_min(0.0)  # rounding can leave −1e-9 where p ≈ q


def _as_tokens(bridge, text: str | Tensor, max_tokens: int) -> Tensor:
    if isinstance(text, Tensor):
        tokens = text.reshape(1, -1).to(model_device(bridge))
    else:
        tokens = bridge.to_tokens(text)  # (1, L)
    return tokens[:, :max_tokens]


def _run(bridge, tokens: Tensor, hooks: list, captures: dict, capture_hooks: Sequence[str]) -> Tensor:
    from workbench.hooks import Capture, attached

    capture = Capture(capture_hooks)  # attached after ``hooks``: sees every intervention on its hook
    with torch.inference_mode(), attached(bridge, [*hooks, *capture.hooks()]):
        logprobs = bridge(tokens)[0].float().log_softmax(-1)  # (L, vocab)
    captures.update({name: act[0].float() for name, act in capture.latest.items()})  # (L, d) each
    return logprobs


def measure(model, spec: SteeringSpec, prompts: Sequence[str | Tensor], neutral_texts: Sequence[str | Tensor] | None = None, *,
            ws=None, top_n: int = TOP_TOKENS, max_tokens: int = MEASURE_TOKENS, baseline_cache: dict | None = None) -> dict:
    """Teacher-forced effect of ``spec``: feature activation, top-token log-probability, KL and JS on neutral text.

    Returns ``kl_neutral``, ``js_neutral`` (nats per position) and, for the first intervention,
    ``feature_act_baseline``, ``feature_act_steered``, ``logprob_top_baseline``,
    ``logprob_top_steered``, ``delta_logprob_top`` and ``top_tokens``; ``interventions`` has the
    same keys for each one. ``baseline_cache``: a dict kept across calls on the same texts, so the
    unsteered forwards run once (``sweep`` shares one across strengths).
    """
    bridge = bridge_of(model)
    if not prompts:
        raise SteeringError("measure needs at least one prompt")
    neutral_texts = NEUTRAL_TEXTS if neutral_texts is None else neutral_texts
    resolved = resolve_spec(bridge, spec, ws)
    hooks = [(r.hook, r.fn) for r in resolved]
    capture_hooks = sorted({r.hook for r in resolved if r.sae is not None})
    baseline = {} if baseline_cache is None else baseline_cache
    tops = [top_tokens(bridge, r.direction, top_n) for r in resolved]

    def baseline_run(kind: str, i: int, tokens: Tensor) -> tuple[Tensor, dict]:
        key = (kind, i, tuple(tokens[0].tolist()))
        entry = baseline.get(key)
        if entry is None or not set(capture_hooks) <= entry[1].keys():
            caps: dict = {}
            entry = (_run(bridge, tokens, [], caps, capture_hooks), caps)
            baseline[key] = entry
        return entry

    acts = [[[], []] for _ in resolved]  # per intervention: baseline / steered feature values
    logp = [[[], []] for _ in resolved]
    for i, prompt in enumerate(prompts):
        tokens = _as_tokens(bridge, prompt, max_tokens)
        base_logp, base_caps = baseline_run("prompt", i, tokens)
        caps: dict = {}
        steer_logp = _run(bridge, tokens, hooks, caps, capture_hooks)
        for j, r in enumerate(resolved):
            top = torch.tensor(tops[j], device=base_logp.device)
            logp[j][0].append(base_logp[:, top].logsumexp(-1))  # (L,)
            logp[j][1].append(steer_logp[:, top].logsumexp(-1))
            if r.sae is not None and tokens.shape[1] > 1:
                enc = encoder(r.sae)
                with torch.inference_mode():
                    acts[j][0].append(enc(base_caps[r.hook][1:])[:, r.intervention.index].float())  # (L-1,)
                    acts[j][1].append(enc(caps[r.hook][1:])[:, r.intervention.index].float())
    kls, jss = [], []
    for i, text in enumerate(neutral_texts):
        tokens = _as_tokens(bridge, text, max_tokens)
        base_logp, _ = baseline_run("neutral", i, tokens)
        steer_logp = _run(bridge, tokens, hooks, {}, ())
        kls.append(kl_divergence(base_logp, steer_logp))  # (L,)
        jss.append(js_divergence(base_logp, steer_logp))  # (L,)

    def mean(parts: list) -> float:
        return float(torch.cat(parts).mean()) if parts else float("nan")

    decode = bridge.tokenizer.decode
    rows = []
    for j, r in enumerate(resolved):
        row = {
            "method": r.intervention.method, "hook": r.hook, "source": r.label, "index": r.intervention.index,
            "strength": r.intervention.strength, "unit": r.intervention.unit, "amount": r.amount,
            "code_mode": r.intervention.code_mode,
            "feature_act_baseline": mean(acts[j][0]), "feature_act_steered": mean(acts[j][1]),
            "logprob_top_baseline": mean(logp[j][0]), "logprob_top_steered": mean(logp[j][1]),
            "top_tokens": [decode([t]) for t in tops[j]],
        }
        row["delta_logprob_top"] = row["logprob_top_steered"] - row["logprob_top_baseline"]
        rows.append(row)
    result = {"kl_neutral": mean(kls), "js_neutral": mean(jss), "n_neutral_positions": sum(k.numel() for k in kls),
              "interventions": rows}
    if rows:
        result.update({k: rows[0][k] for k in ("feature_act_baseline", "feature_act_steered", "logprob_top_baseline",
                                                "logprob_top_steered", "delta_logprob_top", "top_tokens")})
    return result


class SweepRow(NamedTuple):
    strength: float
    metrics: dict


def sweep(model, spec: SteeringSpec | Callable[[float], SteeringSpec], strengths: Iterable[float],
          prompts: Sequence[str | Tensor], neutral_texts: Sequence[str | Tensor] | None = None, *, ws=None, **kwargs) -> list[SweepRow]:
    """``measure`` at each strength (a spec's interventions all take the strength, or ``spec(strength)``)."""
    factory = spec.with_strength if isinstance(spec, SteeringSpec) else spec
    baseline: dict = {}  # unsteered forwards are shared by every strength
    return [SweepRow(float(s), measure(model, factory(s), prompts, neutral_texts, ws=ws, baseline_cache=baseline, **kwargs))
            for s in strengths]


def neutral_from_workspace(ws, hook: str, n: int = 4, max_tokens: int = MEASURE_TOKENS) -> list[Tensor]:
    """Token ids of up to ``n`` held-out contexts cached at ``hook`` (real corpus text)."""
    from workbench.training import held_out_tokens

    run_id = ws.resolve_hook_run(hook)
    tokens = held_out_tokens(ws, hook, run_id, limit=n)  # (n, L)
    return [row[:max_tokens] for row in tokens]
