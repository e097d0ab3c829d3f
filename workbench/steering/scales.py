"""Feature scales σ_i: the unit that makes steering strengths comparable across features.

    feature_max:  σ_i = max_t z_i(t)
    feature_p99:  σ_i = the 99th percentile of {z_i(t) : z_i(t) > 0}   (linear interpolation)

over the cached tokens t of the SAE's hook, BOS (position 0) left out, with z = encode(x) in the
batch-independent inference form. The p99 is taken over the tokens where feature i fires: over all
tokens it would be 0 for most sparse features.

Two sources measure this same quantity:

- ``store``: the SAE has been analysed (``workbench analyze``). σ_max and the firing counts come from
  ``feature_stats`` (max_value, n_fired over every cached token of the SAE's run at positions ≥ 1);
  σ_p99 is ``quantile_cont(value, 0.99)`` over the feature's rows in the sparse store
  ``feature_acts`` (its nonzeros), since ``feature_stats`` keeps only a 30-bin histogram.
- ``cache``: encode the cached activations again (at most ``SCALE_TOKENS`` of them, a seeded random
  subset beyond that).

On a workspace of at most ``SCALE_TOKENS`` tokens both cover the same tokens and agree to float
tolerance (tested); on a larger one the cache source is a subsample estimate. ``source="auto"``
(the default) reads the store when the SAE was loaded from a workspace SAE folder whose analysis is
done and covers the current cache, and computes from the cache otherwise. Results are cached in
memory per (SAE module, workspace file and its modification time, hook, source).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from workbench.workspace import change_stamp

from .sources import decoder_vectors, encoder, origin
from .spec import SteeringError

SCALE_TOKENS = 131_072  # cached tokens encoded for feature scales (a seeded random subset when more)
SOURCES = ("auto", "store", "cache")

_SCALES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class FeatureScales(NamedTuple):
    max: Tensor
    """(width,) largest activation of each feature."""
    p99: Tensor
    """(width,) 99th percentile of each feature's nonzero activations (linear interpolation)."""
    fired: Tensor
    """(width,) tokens on which the feature fired."""
    n_tokens: int
    source: str = "cache"
    """Where they were read: ``store`` (feature_stats / feature_acts) or ``cache`` (re-encoded)."""


def feature_scales(ws, sae, hook: str, unit: str = "feature_p99", *, max_tokens: int = SCALE_TOKENS, source: str = "auto") -> Tensor:
    """(width,) each feature's observed activation scale at ``hook``: its max or p99 (where it fires)."""
    if unit not in ("feature_max", "feature_p99"):
        raise SteeringError(f"feature scales are 'feature_max' or 'feature_p99', got {unit!r}")
    stats = feature_scale_stats(ws, sae, hook, max_tokens=max_tokens, source=source)
    return stats.max if unit == "feature_max" else stats.p99


def feature_scale_stats(ws, sae, hook: str, *, max_tokens: int = SCALE_TOKENS, source: str = "auto") -> FeatureScales:
    """σ_max, σ_p99 and firing counts of every feature, from the analysis store or the cache."""
    if source not in SOURCES:
        raise SteeringError(f"feature scale source must be one of {', '.join(SOURCES)}, got {source!r}")
    per_sae = _SCALES.setdefault(sae, {})
    key = (str(ws.path), change_stamp(ws.path), hook, max_tokens, source)
    if key in per_sae:
        return per_sae[key]
    stats = None
    if source != "cache":
        sae_id = analysed_sae_id(ws, sae, hook)
        if sae_id is not None:
            stats = _from_store(ws, sae_id, sae.cfg.width)
        elif source == "store":
            raise SteeringError(f"no finished analysis of this SAE at '{hook}' in {ws.path.name}: run `workbench analyze`")
    if stats is None:
        stats = _from_cache(ws, sae, hook, max_tokens)
    per_sae[key] = stats
    return stats


def analysed_sae_id(ws, sae, hook: str) -> int | None:
    """The workspace SAE this module was loaded from, if its analysis at ``hook`` is done and current."""
    folder = origin(sae)
    if folder is None:
        return None
    rows = ws.query(
        """SELECT s.sae_id, s.path, s.run_id, a.n_contexts FROM saes s JOIN analyses a USING (sae_id)
           WHERE s.status = 'done' AND a.status = 'done' AND s.hook = ? AND s.width = ?""",
        [hook, sae.cfg.width],
    )
    for sae_id, path, run_id, n_contexts in rows:
        if Path(path).expanduser().resolve() != folder:
            continue
        from workbench.activations import context_ids

        if len(context_ids(ws, hook, run_id=run_id, split="all")) == n_contexts:  # the cache did not grow since
            return int(sae_id)
    return None


def _from_store(ws, sae_id: int, width: int) -> FeatureScales:
    vmax, fired, p99 = torch.zeros(width), torch.zeros(width, dtype=torch.long), torch.zeros(width)
    for feature, n_fired, max_value in ws.query("SELECT feature, n_fired, max_value FROM feature_stats WHERE sae_id = ?", [sae_id]):
        fired[feature] = int(n_fired)
        vmax[feature] = float(max_value) if max_value is not None and n_fired else 0.0
    for feature, q in ws.query(
        "SELECT feature, quantile_cont(value, 0.99) FROM feature_acts WHERE sae_id = ? GROUP BY feature", [sae_id]
    ):
        p99[feature] = float(q)
    (n_tokens,) = ws.query("SELECT n_tokens FROM analyses WHERE sae_id = ?", [sae_id])[0]
    return FeatureScales(vmax, p99, fired, int(n_tokens), "store")


def _from_cache(ws, sae, hook: str, max_tokens: int) -> FeatureScales:
    """Encode (up to ``max_tokens`` of) the cached activations of ``hook``, BOS left out."""
    from workbench.activations import iter_activations
    from workbench.workspace import WorkspaceError

    encode = encoder(sae)
    device = decoder_vectors(sae).device
    values, features, n = [], [], 0
    try:
        batches = iter_activations(ws, hook, 4096, seed=0, split="all", epochs=1, drop_last=False)
        with torch.inference_mode():
            for batch in batches:
                batch = batch[: max_tokens - n]  # (B, d)
                if batch.shape[-1] != sae.cfg.d_in:
                    raise SteeringError(f"the SAE reads d={sae.cfg.d_in} but '{hook}' is cached with d={batch.shape[-1]}")
                z = encode(batch.to(device)).float()  # (B, F)
                rows, cols = z.nonzero(as_tuple=True)
                values.append(z[rows, cols].cpu())
                features.append(cols.cpu())
                n += batch.shape[0]
                if n >= max_tokens:
                    break
    except WorkspaceError as err:
        raise SteeringError(f"feature units need cached activations at '{hook}': {err}") from None
    width = sae.cfg.width
    vals, feats = torch.cat(values), torch.cat(features)  # (nnz,), (nnz,)
    vals, order = vals.sort(stable=True)
    feats, order2 = feats[order].sort(stable=True)  # grouped by feature, ascending values inside each group
    vals = vals[order2]
    counts = torch.bincount(feats, minlength=width)  # (F,)
    starts = counts.cumsum(0) - counts
    has = counts > 0
    last = (starts + counts - 1).clamp_min(0)
    pos = 0.99 * (counts - 1).clamp_min(0).double()  # (F,) fractional rank of the p99 inside each group
    lo, hi = pos.floor().long(), pos.ceil().long()
    zero = torch.zeros(width)
    if vals.numel():
        v_lo, v_hi = vals[(starts + lo).clamp(max=vals.numel() - 1)], vals[(starts + hi).clamp(max=vals.numel() - 1)]
        p99 = torch.where(has, v_lo + (pos - lo).float() * (v_hi - v_lo), zero)
        vmax = torch.where(has, vals[last.clamp(max=vals.numel() - 1)], zero)
    else:
        p99, vmax = zero, zero.clone()
    return FeatureScales(vmax, p99, counts, n, "cache")
