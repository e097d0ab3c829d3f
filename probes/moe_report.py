"""The text report of one stored `workbench moe run` (`workbench moe run` and `moe show`): the
comparison table, the k curve, the masking matrices and the purge curves, from the rows of
``probes.moe_records``.
"""

from __future__ import annotations

import math

from probes.unit_kinds import KIND_LABELS


def _f(x, digits=3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def describe(run: dict, comparison: list[dict], curve: list[dict], selectivity: list[dict], purge: list[dict] = ()) -> str:
    """The comparison table, the k curve, the masking matrices and the purge curves of one stored run, as text."""
    lines = [f"moe run {run['moe_run_id']}: {run['model']} ({run['architecture']}, {run['source']}), layers "
             f"{', '.join(map(str, run['layers']))}, E={run['n_experts']}, k={run['k']}"
             + (f", SAE {run['sae']}" if run["sae"] else "") + f"; corpus {run['corpus']}, "
             f"{run['eval_tokens']:,} eval tokens over {', '.join(run['domains'])}",
             f"  {run['balance']}"]
    lines += [f"  note: {n}" for n in run["notices"]]
    if curve:
        reference = "dense" if run["source"] == "moefied" else f"own top-{run['k']}"
        dense = next(c["dense_loss"] for c in curve if c["grp"] == "all")
        parts = [f"k={c['k']}: {c['loss']:.3f} ({c['loss'] - dense:+.3f})" for c in curve if c["grp"] == "all"]
        lines.append(f"k vs loss (all domains; {reference} {dense:.3f}): " + ", ".join(parts))
    lines.append("comparison (means over live experts; purity with per-group-normalised mass):")
    head = (f"  {'kind':<8} {'layer':>5} {'grouping':<8} {'experts':>7} {'dead':>5} "
            f"{'specialised':>11} {'entropy':>7} {'purity':>6} {'MI nats':>7} {'MI norm':>7}")
    lines.append(head)
    for row in comparison:
        lines.append(f"  {row['kind']:<8} {row['layer']:>5} {row['grouping']:<8} {row['experts']:>7} {row['dead']:>5} "
                     f"{_f(row['specialised_share']):>11} {_f(row['mean_entropy']):>7} {_f(row['mean_purity']):>6} "
                     f"{_f(row['mi_nats'], 4):>7} {_f(row['mi_norm'], 4):>7}")
    for kind, grouping, budget in dict.fromkeys((r["kind"], r["grouping"], r["budget"]) for r in selectivity):
        rows = [r for r in selectivity if (r["kind"], r["grouping"], r["budget"]) == (kind, grouping, budget)]
        measured = list(dict.fromkeys(r["measured"] for r in rows))
        targets = list(dict.fromkeys(r["target"] for r in rows))
        width = max(len(m) for m in measured + ["target"]) + 1
        removed = "Monet's specialists" if budget == "skew" else "⌈share·units⌉ per layer, most skewed first"
        lines.append(f"masking selectivity, {KIND_LABELS.get(kind, kind)} by {grouping}, {budget} budget "
                     f"(ΔLoss; row: {removed} of the target removed):")
        lines.append(f"  {'target':<{width}} {'removed':>7} " + " ".join(f"{m:>{width}}" for m in measured) + f" {'selectivity':>11}")
        for target in targets:
            cells = {r["measured"]: r for r in rows if r["target"] == target}
            first = cells[measured[0]]
            lines.append(f"  {target:<{width}} {first['n_masked']:>7} "
                         + " ".join(f"{cells[m]['delta_loss']:>+{width}.3f}" for m in measured)
                         + f" {_f(first['selectivity']):>11}")
    for kind in dict.fromkeys(r["kind"] for r in purge):
        lines.append(f"concept purge, {KIND_LABELS.get(kind, kind)} (remove units with ρ > τ; Δ loss on the concept's "
                     "tokens / on the rest):")
        for concept in dict.fromkeys(r["concept"] for r in purge if r["kind"] == kind):
            points = [r for r in purge if (r["kind"], r["concept"]) == (kind, concept)]
            parts = [f"τ={r['tau']:g}: {r['n_removed']} ({100 * r['share_removed']:.1f} %) "
                     f"{r['concept_loss'] - r['concept_before']:+.3f} / {r['other_loss'] - r['other_before']:+.3f}"
                     for r in points]
            lines.append(f"  {concept:<14} " + "; ".join(parts))
    return "\n".join(lines)
