"""Read-side API of the feature browser: everything a feature page or a search shows.

All functions take an open (read-only is enough) ``Workspace`` and an ``SAERecord`` from
``workspace.resolve_sae``; every query is parameterised and touches only precomputed tables or
a few contexts, so a feature page answers in milliseconds whatever the number of stored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import torch

from workbench.analysis import HIST_BINS, WINDOW_AFTER, WINDOW_BEFORE, AnalysisError
from workbench.workspace import SAERecord, Workspace, fetch_one


@dataclass(frozen=True)
class Example:
    """One token where a feature fired, with the window of tokens around it.

    ``tokens`` and ``values`` cover positions ``start .. start + len(tokens) - 1`` of the
    context; ``values`` is the feature's activation at each (0 where it did not fire);
    ``focus`` indexes the example's own token inside the window.
    """

    context_id: int
    position: int
    value: float
    band: int
    tokens: list[str]
    values: list[float]
    focus: int
    start: int


def check_feature(ws: Workspace, sae: SAERecord, feature: int) -> None:
    if not 0 <= feature < sae.width:
        raise AnalysisError(f"feature {feature} is out of range for SAE '{sae.name}': valid ids are 0..{sae.width - 1}")
    status = fetch_one(ws.con, "SELECT status FROM analyses WHERE sae_id = ?", [sae.sae_id])
    if not status or status[0] != "done":
        raise AnalysisError(f"SAE '{sae.name}' is not analysed yet: run `workbench analyze --db {ws.path} --sae {sae.name}`")


def feature_summary(ws: Workspace, sae: SAERecord, feature: int) -> dict:
    """Density, firing count, mean and max activation, and the histogram (counts, bin edges)."""
    check_feature(ws, sae, feature)
    n_fired, density, mean, peak, counts = fetch_one(
        ws.con, "SELECT n_fired, density, mean_value, max_value, hist_counts FROM feature_stats WHERE sae_id = ? AND feature = ?",
        [sae.sae_id, feature],
    )
    edges = [peak * i / HIST_BINS for i in range(HIST_BINS + 1)] if peak else []
    return {"feature": feature, "n_fired": n_fired, "density": density, "mean": mean, "max": peak,
            "hist_counts": list(counts or []), "hist_edges": edges}


def _token_strings(ws: Workspace, sae: SAERecord, token_ids: list[int]) -> list[str]:
    model = ws.run_model(sae.run_id)
    rows = dict(ws.query(
        "SELECT token_id, token FROM vocab WHERE tokenizer = ? AND token_id IN (SELECT unnest(?::INTEGER[]))", [model, token_ids]
    ))
    return [rows.get(t, f"<{t}>") for t in token_ids]


def examples(ws: Workspace, sae: SAERecord, feature: int, *, band: int | None = -1, before: int = WINDOW_BEFORE,
             after: int = WINDOW_AFTER, limit: int = 20) -> list[Example]:
    """Top examples (``band=-1``), one quantile band (0 = weakest), or all bands (``None``), each with ``before``
    tokens of context before its token and ``after`` after (by default the window the examples are distinct by)."""
    check_feature(ws, sae, feature)
    band_sql = "" if band is None else "AND band = ?"
    params = [sae.sae_id, feature] + ([] if band is None else [band]) + [limit]
    picked = ws.query(
        f"""SELECT context_id, position, value, band FROM feature_examples
            WHERE sae_id = ? AND feature = ? {band_sql} ORDER BY band DESC, value DESC, rank LIMIT ?""",
        params,
    )
    if not picked:
        return []
    ids = sorted({r[0] for r in picked})
    tokens = ws.query(
        "SELECT context_id, position, token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[])) ORDER BY context_id, position",
        [ids],
    )
    acts = ws.query(
        """SELECT context_id, position, value FROM feature_acts
           WHERE sae_id = ? AND feature = ? AND context_id IN (SELECT unnest(?::BIGINT[]))""",
        [sae.sae_id, feature, ids],
    )
    by_context: dict[int, list[int]] = {}
    for cid, _, token_id in tokens:
        by_context.setdefault(cid, []).append(token_id)
    value_at = {(cid, pos): v for cid, pos, v in acts}
    unique = sorted({t for _, _, t in tokens})
    strings = dict(zip(unique, _token_strings(ws, sae, unique)))
    out = []
    for cid, pos, value, b in picked:
        row = by_context[cid]
        start, stop = max(0, pos - before), min(len(row), pos + after + 1)
        out.append(Example(
            context_id=cid, position=pos, value=value, band=b,
            tokens=[strings[t] for t in row[start:stop]],
            values=[float(value_at.get((cid, p), 0.0)) for p in range(start, stop)],
            focus=pos - start, start=start,
        ))
    return out


def logit_effects(ws: Workspace, sae: SAERecord, feature: int) -> dict[str, list[tuple[str, float]]]:
    """The tokens the feature's direction most promotes and most suppresses, with their effect."""
    check_feature(ws, sae, feature)
    rows = ws.query(
        "SELECT rank, token_id, effect FROM feature_logits WHERE sae_id = ? AND feature = ? ORDER BY rank", [sae.sae_id, feature]
    )
    strings = _token_strings(ws, sae, [t for _, t, _ in rows])
    promoted = [(s, e) for (rank, _, e), s in zip(rows, strings) if rank > 0]
    suppressed = [(s, e) for (rank, _, e), s in zip(rows, strings) if rank < 0]
    return {"promoted": sorted(promoted, key=lambda p: -p[1]), "suppressed": sorted(suppressed, key=lambda p: p[1])}


def related_features(ws: Workspace, sae: SAERecord, feature: int) -> list[dict]:
    """Nearest decoder directions with cosine and co-occurrence Jaccard."""
    check_feature(ws, sae, feature)
    rows = ws.query(
        """SELECT r.other, r.cosine, r.cooccurrence, s.density FROM feature_related r
           JOIN feature_stats s ON s.sae_id = r.sae_id AND s.feature = r.other
           WHERE r.sae_id = ? AND r.feature = ? ORDER BY r.cosine DESC, r.other""",
        [sae.sae_id, feature],
    )
    return [{"feature": o, "cosine": c, "cooccurrence": j, "density": d} for o, c, j, d in rows]


def density_histogram(ws: Workspace, sae: SAERecord) -> list[float]:
    """Every feature's firing density (for the compare page)."""
    return [d for (d,) in ws.query("SELECT density FROM feature_stats WHERE sae_id = ? ORDER BY feature", [sae.sae_id])]


def search_by_pattern(ws: Workspace, sae: SAERecord, pattern: str, *, limit: int = 20) -> list[dict]:
    """Features ranked by how well "fires" matches "token matches ``pattern``" (codebook-features' search).

    precision = |fires ∧ matches| / |fires|, recall = |fires ∧ matches| / |matches|, ranked by
    their harmonic mean (F1). The regex runs on each token's display string, in DuckDB, so its
    syntax is RE2's (no lookarounds or backreferences; ``\\p{L}`` classes work).
    """
    try:
        ws.con.execute("SELECT regexp_matches('', ?)", [pattern]).fetchall()
    except duckdb.Error as err:
        reason = str(err).splitlines()[0].split(": ", 1)[-1]
        raise AnalysisError(f"invalid regular expression '{pattern}': {reason}") from None
    rows = ws.query(
        """WITH matched AS (
               SELECT t.context_id, t.position FROM tokens t
               JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
               JOIN vocab v ON v.tokenizer = r.model AND v.token_id = t.token_id
               WHERE c.run_id = ? AND t.position > 0 AND regexp_matches(v.token, ?)),
           hits AS (
               SELECT a.feature, count(*) AS both_ FROM feature_acts a
               JOIN matched m ON m.context_id = a.context_id AND m.position = a.position
               WHERE a.sae_id = ? GROUP BY a.feature),
           n_matched AS (SELECT count(*) AS n FROM matched),
           scored AS (
               SELECT h.feature, h.both_ / s.n_fired AS precision, h.both_ / n_matched.n AS recall, s.n_fired
               FROM hits h CROSS JOIN n_matched JOIN feature_stats s ON s.sae_id = ? AND s.feature = h.feature)
           SELECT * FROM scored ORDER BY 2 * precision * recall / (precision + recall) DESC, feature LIMIT ?""",
        [sae.run_id, pattern, sae.sae_id, sae.sae_id, limit],
    )
    return [{"feature": f, "precision": p, "recall": r, "f1": 2 * p * r / (p + r), "n_fired": n} for f, p, r, n in rows]


def features_for_prompt(loaded, sae_module: torch.nn.Module, hook: str, text: str, *, top: int = 5, max_tokens: int | None = None) -> dict:
    """Run ``text`` through the model live and list the top features on each token.

    Returns tokens, a [n_tokens, top] table of feature ids and values, and ``truncated`` when the
    prompt was cut to the model's context length. The SAE encodes on its own device (the
    activations move there); only the [n_tokens, top] table comes to the host. Not thread-safe: it attaches a hook to the
    shared model for the duration of the forward, so concurrent callers must serialise.
    """
    from workbench.hooks import attached
    from workbench.models import max_context

    limit = min(max_tokens or max_context(loaded.model), max_context(loaded.model))
    ids = [loaded.tokenizer.bos_token_id or loaded.tokenizer.eos_token_id] + loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > limit
    ids = ids[:limit]
    seen = {}
    with torch.inference_mode(), attached(loaded.model, [(hook, lambda acts, hook: seen.setdefault("acts", acts))]):
        loaded.model(torch.tensor([ids], device=loaded.model.cfg.device))
    param = next(sae_module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        z = sae_module.encode(seen["acts"][0, 1:].to(device).float())  # [n, width] on the SAE's device, BOS left out
        values, features = z.topk(min(top, z.shape[1]), dim=1)  # [n, top]
    tokens = [loaded.tokenizer.decode([t]) for t in ids[1:]]
    return {"tokens": tokens, "features": features.tolist(), "values": values.tolist(), "truncated": truncated}
