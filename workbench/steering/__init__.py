"""Steering: interventions on hook activations, scoped by one context manager (docs/algorithms.md §7, §2).

    with steer(model, spec):            # hooks installed for the block, always removed
        model.generate(...)             # every position steered, KV-cache positions included

A spec is a list of interventions on one or more hooks: ``add`` x ← x + s·v, ``clamp`` / ``ablate``
x ← x̂(z with z_i := a) + (x − x̂(z)), ``code`` (force a codebook code, replacing the lowest-scoring
selected code or all k). Strengths are raw or in units of the feature's own activation scale σ_i.

Modules, one job each:
    spec.py         Intervention, SteeringSpec, JSON, SteeringError
    sources.py      SAEs/codebooks by workspace name or folder; decoder vectors and encoders
    scales.py       feature scales σ_i (max / p99) from the analysis store or the cache
    hooks.py        the hook function of each method; resolve_spec; steer()
    generation.py   baseline vs steered continuations with the same seed
    measurement.py  measure / sweep: feature activation, Δ log P of top tokens, KL and JS on neutral text
"""

from .generation import Generation, generate, generate_tokens
from .hooks import Resolved, check_spec, code_weight, resolve_spec, steer
from .measurement import (
                          MEASURE_TOKENS,
                          NEUTRAL_TEXTS,
                          TOP_TOKENS,
                          SweepRow,
                          js_divergence,
                          kl_divergence,
                          logit_effect,
                          measure,
                          neutral_from_workspace,
                          sweep,
                          top_tokens,
)
from .scales import SCALE_TOKENS, FeatureScales, analysed_sae_id, feature_scale_stats, feature_scales
from .sources import SAERef, decoder_vectors, encoder, is_codebook, load_steering_sae
from .spec import (
                          CODE_MODES,
                          DEFAULT_CODE_MODE,
                          METHODS,
                          SPEC_VERSION,
                          UNITS,
                          Intervention,
                          SteeringError,
                          SteeringSpec,
                          default_unit,
                          parse_indices,
                          parse_strengths,
)

__all__ = [
    "CODE_MODES", "DEFAULT_CODE_MODE", "METHODS", "SPEC_VERSION", "UNITS", "Intervention", "SteeringError", "SteeringSpec",
    "default_unit", "parse_indices", "parse_strengths", "SAERef", "decoder_vectors", "encoder", "is_codebook", "load_steering_sae",
    "SCALE_TOKENS",
    "FeatureScales", "analysed_sae_id", "feature_scale_stats", "feature_scales", "Resolved", "check_spec", "code_weight",
    "resolve_spec", "steer", "Generation", "generate", "generate_tokens", "MEASURE_TOKENS", "NEUTRAL_TEXTS", "TOP_TOKENS",
    "SweepRow", "js_divergence", "kl_divergence", "logit_effect", "measure", "sweep", "top_tokens",
    "neutral_from_workspace",
]
