"""Experts page data: cached reads of the MoE / probing tables and the table rows and captions shaped
from them.

Reads follow ``workbench.app.cached``: a read-only connection per call, cached under the workspace path and
its change stamp (``per_workspace_version``). Shaping functions take plain rows and never touch the
workspace.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from workbench.app.cached import _open, per_workspace_version

CORRELATED_UNITS = 20  # rows of the "most correlated units" table


# -- reads -------------------------------------------------------------------------------------
@per_workspace_version(max_entries=16)
def experts(path: str) -> dict:
    """Every MoE run with its comparison, group, selectivity, purge and k-curve rows; every probing run and row."""
    from probes import moe_records

    with _open(path) as ws:
        if not moe_records.has_tables(ws):
            return {"runs": [], "probes": [], "probe_rows": []}
        runs = moe_records.runs(ws)
        for run in runs:
            rid = run["moe_run_id"]
            run["created_at"] = str(run["created_at"])
            run["comparison"] = moe_records.comparison(ws, rid)
            run["groups"] = moe_records.groups(ws, rid)
            run["selectivity"] = moe_records.selectivity(ws, rid)
            run["purge"] = moe_records.purge(ws, rid)
            run["curve"] = moe_records.k_curve(ws, rid)
        probes = moe_records.probe_runs(ws)
        for p in probes:
            p["created_at"] = str(p["created_at"])
        return {"runs": runs, "probes": probes, "probe_rows": moe_records.probe_results(ws)}


@per_workspace_version(max_entries=64)
def mass(path: str, run_id: int, layer: int, kind: str, grouping: str) -> dict:
    """r_{e,d} rows and per-expert purity/specialist rows of one kind at one layer."""
    from probes import moe_records

    with _open(path) as ws:
        return {"mass": moe_records.mass(ws, run_id, layer, kind, grouping),
                "experts": moe_records.experts(ws, run_id, layer, kind, grouping)}


@per_workspace_version(max_entries=64)
def correlation(path: str, run_id: int, kind: str, concept: str, limit: int = CORRELATED_UNITS) -> list[dict]:
    """The ``limit`` units of one kind most correlated with a concept (layer, expert, rho), ρ descending."""
    from probes import moe_records

    with _open(path) as ws:
        return moe_records.correlation(ws, run_id, kind, concept, int(limit))


@per_workspace_version(max_entries=64)
def route_contexts(path: str, run_id: int, layer: int) -> list[dict]:
    """The evaluation contexts with stored routes at one layer: row, its domain, tokens."""
    with _open(path) as ws:
        rows = ws.query("SELECT row, mode(grp) FILTER (WHERE grp IS NOT NULL), count(*) FROM moe_routes "
                        "WHERE moe_run_id = ? AND layer = ? GROUP BY row ORDER BY row", [run_id, int(layer)])
    return [{"row": r, "grp": g, "tokens": n} for r, g, n in rows]


@st.cache_resource(show_spinner=False, max_entries=4)
def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _local_tokenizer(model: str):
    """The tokenizer of a run whose model is a local directory with tokenizer files (cheap to load, no weights);
    None otherwise (an alias or a hub id: building or downloading a model is not the app's job)."""
    directory = Path(model).expanduser()
    if not (directory.is_dir() and any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))):
        return None
    try:
        return _tokenizer(str(directory.resolve()))
    except Exception:  # a broken tokenizer folder: show ids instead  # noqa: BLE001
        return None


@per_workspace_version(max_entries=128)
def route_context(path: str, run_id: int, layer: int, row: int, model: str) -> dict:
    """One evaluation context's routes at one layer (``routes``: position, token_id, grp, experts, weights), its
    token strings (``tokens``) and where they came from (``strings``: "vocab" — the workspace's vocabulary of
    the run's model —, "tokenizer" — the model folder's tokenizer —, or "ids" when neither is at hand)."""
    with _open(path) as ws:
        cursor = ws.con.execute("SELECT position, token_id, grp, experts, weights FROM moe_routes WHERE moe_run_id = ? "
                                "AND layer = ? AND row = ? ORDER BY position", [run_id, int(layer), int(row)])
        names = [c[0] for c in cursor.description]
        routes = [dict(zip(names, r)) for r in cursor.fetchall()]
        ids = sorted({r["token_id"] for r in routes})
        vocab = dict(ws.query("SELECT token_id, token FROM vocab WHERE tokenizer = ? AND token_id IN "
                              "(SELECT unnest(?::INTEGER[]))", [model, ids])) if ids else {}
    source = "vocab"
    if not vocab and ids:
        tokenizer = _local_tokenizer(model)
        if tokenizer is not None:
            vocab = {i: tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids}
            source = "tokenizer"
        else:
            source = "ids"
    tokens = [vocab.get(r["token_id"], f"⟨{r['token_id']}⟩") for r in routes]
    return {"routes": routes, "tokens": tokens, "strings": source}


# -- shaping -----------------------------------------------------------------------------------
def run_label(run: dict) -> str:
    """A run's entry in the run choice: model, source, layers, E, k and its SAE."""
    layers = ", ".join(map(str, run["layers"]))
    sae = f", SAE {run['sae']}" if run["sae"] else ""
    return f"run {run['moe_run_id']}: {run['model']} ({run['source']}) layer {layers}, E={run['n_experts']}, k={run['k']}{sae}"


def selection_pairs(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The groupings and budgets present in selectivity rows (domain and skew first)."""
    groupings = sorted({r.get("grouping", "domain") for r in rows}, key=lambda g: (g != "domain", g))
    budgets = sorted({r.get("budget", "skew") for r in rows}, key=lambda b: (b != "skew", b))
    return groupings, budgets


def units_per_kind(comparison_rows: list[dict]) -> dict[str, int]:
    """Units (experts, latents, neurons) of each kind over all its layers: what a masking's share is a share of."""
    seen = {(r["kind"], r["layer"]): r["experts"] for r in comparison_rows}
    out: dict[str, int] = {}
    for (kind, _), n in seen.items():
        out[kind] = out.get(kind, 0) + int(n)
    return out


def selectivity_table(rows: list[dict], units: dict[str, int], grouping: str = "domain", budget: str = "skew") -> list[dict]:
    """One row per (kind, target) of one grouping and budget: units removed, their share of the kind's units,
    ΔLoss on the target and the selectivity (ΔTarget − mean ΔOthers). Where nothing was removed the stored 0 is
    vacuous (the baseline itself), so the selectivity is left blank."""
    out = []
    for r in rows:
        if r.get("grouping", "domain") != grouping or r.get("budget", "skew") != budget or r["measured"] != r["target"]:
            continue
        total = units.get(r["kind"])
        out.append({"kind": r["kind"], "target": r["target"], "removed": r["n_masked"],
                    "share removed": round(r["n_masked"] / total, 4) if total else None,
                    "Δ target": round(r["delta_loss"], 4),
                    "selectivity": None if r["selectivity"] is None or not r["n_masked"] else round(r["selectivity"], 4)})
    return out


def budget_caption(budget: str, config: dict) -> str:
    """What one masking budget removes, with the run's own factor and share."""
    if budget == "skew":
        factor = config.get("factor", 2.0)
        return (f"**skew budget**: each row removes the kind's specialists of the target (Monet's skew test on separate fit "
                f"tokens: mass on the target ≥ {factor:g}× the runner-up's), as many as pass it. Kinds therefore remove "
                "different numbers and shares of their units (see 'share removed'): compare selectivity within a kind, "
                "not across kinds.")
    share = config.get("matched_share")
    how = f"⌈{share:.4g} × units⌉ per layer" if share is not None else "the same share of units per layer"
    return (f"**matched budget**: each row removes {how} of every kind, the units most skewed towards the target "
            "first, so kinds are compared at the same share of their units. Fewer are removed where fewer units have the "
            "target as their strongest group, and the rounding up weighs on kinds with few units (e.g. 8 experts): "
            "'share removed' gives the actual share.")


def purge_concepts(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["concept"] for r in rows))


def correlation_table(rows: list[dict], kind: str, taus: list[float] | None = None) -> list[dict]:
    """The most correlated units as table rows; ``taus`` (the purge's thresholds) add the largest τ whose purge
    removes the unit (ρ > τ), None when none does."""
    unit = {"sae": "latent", "neuron": "neuron"}.get(kind, "expert")
    out = []
    for r in rows:
        row = {"layer": r["layer"] if r["layer"] >= 0 else None, unit: r["expert"], "ρ": round(r["rho"], 4)}
        if taus is not None:
            removing = [t for t in taus if r["rho"] > t]
            row["removed from τ"] = max(removing) if removing else None
        out.append(row)
    return out


def probing_table(rows: list[dict]) -> list[dict]:
    """One row per (SAE, task): accuracy per source@k, plus sizes and split."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["probe_run_id"], r["task"])
        row = out.setdefault(key, {"sae": r["sae"], "hook": r["hook"], "dataset": r["dataset"], "task": r["task"], "train": r["n_train"],
                                   "test": r["n_test"], "split": r["split"]})
        column = "full" if r["source"] == "full" else f"{r['source']}@{r['k']}"
        row[column] = round(r["accuracy"], 3)
    return list(out.values())
