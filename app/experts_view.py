"""Experts page helpers: cached reads of the MoE / probing tables, table shaping, the plotly figures
and the per-token routing HTML.

Reads follow ``app.cached``: a read-only connection per call, cached under the workspace path and
its change stamp. Figures and tables take plain rows and never touch the workspace; token text in
HTML is escaped by ``app.render.escape``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import cached, render

KIND_LABELS = {"moe": "MoE experts", "moefied": "MoEfied experts", "sae": "SAE latents", "neuron": "MLP neurons"}
KIND_COLOURS = {"moe": "#7b3294", "moefied": "#1f77b4", "sae": "#d62728", "neuron": "#7f7f7f"}  # one colour per kind everywhere
HEATMAP_EXPERTS = 64  # experts shown in the expert × group heatmap
CORRELATED_UNITS = 20  # rows of the "most correlated units" table
UNMEASURED = "#d0d0d0"  # BOS and separators in the routing view: left out of every metric


@st.cache_data(show_spinner=False, max_entries=16)
def _experts(path: str, version: tuple) -> dict:
    from probes import moe_records

    with cached._open(path) as ws:
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


def experts(path: str) -> dict:
    """Every MoE run with its comparison, group, selectivity, purge and k-curve rows; every probing run and row."""
    return _experts(path, cached.stamp(path))


@st.cache_data(show_spinner=False, max_entries=64)
def _mass(path: str, version: tuple, run_id: int, layer: int, kind: str, grouping: str) -> dict:
    from probes import moe_records

    with cached._open(path) as ws:
        return {"mass": moe_records.mass(ws, run_id, layer, kind, grouping),
                "experts": moe_records.experts(ws, run_id, layer, kind, grouping)}


def mass(path: str, run_id: int, layer: int, kind: str, grouping: str) -> dict:
    """r_{e,d} rows and per-expert purity/specialist rows of one kind at one layer."""
    return _mass(path, cached.stamp(path), run_id, layer, kind, grouping)


@st.cache_data(show_spinner=False, max_entries=64)
def _correlation(path: str, version: tuple, run_id: int, kind: str, concept: str, limit: int) -> list[dict]:
    from probes import moe_records

    with cached._open(path) as ws:
        return moe_records.correlation(ws, run_id, kind, concept, limit)


def correlation(path: str, run_id: int, kind: str, concept: str, limit: int = CORRELATED_UNITS) -> list[dict]:
    """The ``limit`` units of one kind most correlated with a concept (layer, expert, rho), ρ descending."""
    return _correlation(path, cached.stamp(path), run_id, kind, concept, int(limit))


@st.cache_data(show_spinner=False, max_entries=64)
def _route_contexts(path: str, version: tuple, run_id: int, layer: int) -> list[dict]:
    with cached._open(path) as ws:
        rows = ws.query("SELECT row, mode(grp) FILTER (WHERE grp IS NOT NULL), count(*) FROM moe_routes "
                        "WHERE moe_run_id = ? AND layer = ? GROUP BY row ORDER BY row", [run_id, layer])
    return [{"row": r, "grp": g, "tokens": n} for r, g, n in rows]


def route_contexts(path: str, run_id: int, layer: int) -> list[dict]:
    """The evaluation contexts with stored routes at one layer: row, its domain, tokens."""
    return _route_contexts(path, cached.stamp(path), run_id, int(layer))


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


@st.cache_data(show_spinner=False, max_entries=128)
def _route_context(path: str, version: tuple, run_id: int, layer: int, row: int, model: str) -> dict:
    with cached._open(path) as ws:
        cursor = ws.con.execute("SELECT position, token_id, grp, experts, weights FROM moe_routes WHERE moe_run_id = ? "
                                "AND layer = ? AND row = ? ORDER BY position", [run_id, layer, row])
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


def route_context(path: str, run_id: int, layer: int, row: int, model: str) -> dict:
    """One evaluation context's routes at one layer (``routes``: position, token_id, grp, experts, weights), its
    token strings (``tokens``) and where they came from (``strings``: "vocab" — the workspace's vocabulary of
    the run's model —, "tokenizer" — the model folder's tokenizer —, or "ids" when neither is at hand)."""
    return _route_context(path, cached.stamp(path), run_id, int(layer), int(row), model)


def run_label(run: dict) -> str:
    layers = ", ".join(map(str, run["layers"]))
    sae = f", SAE {run['sae']}" if run["sae"] else ""
    return f"run {run['moe_run_id']}: {run['model']} ({run['source']}) layer {layers}, E={run['n_experts']}, k={run['k']}{sae}"


# -- figures -----------------------------------------------------------------------------------
def heatmap_figure(mass_rows: list[dict], expert_rows: list[dict], title: str, limit: int = HEATMAP_EXPERTS) -> tuple[go.Figure, int]:
    """p(group | expert) with every group weighted equally (r_{e,d} / Σ_d r_{e,d}) for the experts
    with the highest purity (specialised ones first); returns the figure and how many are shown."""
    groups = list(dict.fromkeys(r["grp"] for r in mass_rows))
    n_experts = 1 + max((r["expert"] for r in mass_rows), default=-1)
    m = np.zeros((len(groups), n_experts))
    gi = {g: i for i, g in enumerate(groups)}
    for r in mass_rows:
        m[gi[r["grp"]], r["expert"]] = r["mass"]
    total = m.sum(axis=0)
    alive = np.flatnonzero(total > 0)
    p = np.divide(m, total, out=np.zeros_like(m), where=total > 0)
    purity = {r["expert"]: (r["purity"] if r["purity"] is not None else -1.0) for r in expert_rows}
    specialist = {r["expert"]: r["specialist"] for r in expert_rows}
    order = sorted(alive.tolist(), key=lambda e: (specialist.get(e) is None, groups.index(specialist[e]) if specialist.get(e) in gi
                                                  else len(groups), -purity.get(e, -1.0), e))
    if len(order) > limit:
        top = sorted(alive.tolist(), key=lambda e: (-purity.get(e, -1.0), e))[:limit]
        order = [e for e in order if e in set(top)]
    fig = go.Figure(go.Heatmap(z=p[:, order], x=[str(e) for e in order], y=groups, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title="p(group | expert)")))
    fig.update_layout(title=title, xaxis_title="expert (specialised first, by group, then purity)", yaxis_title="group",
                      xaxis_type="category")
    return fig, len(order)


def shares_figure(group_rows: list[dict], grouping: str) -> go.Figure:
    """Share of each kind's experts specialised in each group (Monet skew test)."""
    fig = go.Figure()
    rows = [r for r in group_rows if r["grouping"] == grouping]
    for kind, layer in dict.fromkeys((r["kind"], r["layer"]) for r in rows):
        mine = [r for r in rows if (r["kind"], r["layer"]) == (kind, layer)]
        fig.add_bar(x=[r["grp"] for r in mine], y=[r["specialised_share"] for r in mine],
                    name=f"{KIND_LABELS.get(kind, kind)} (layer {layer})", marker_color=KIND_COLOURS.get(kind))
    fig.update_layout(title=f"Specialisation share by {grouping}", barmode="group", yaxis_title="share of experts specialised",
                      xaxis_title=grouping)
    return fig


def selectivity_figure(rows: list[dict], kind: str, grouping: str = "domain", budget: str = "skew") -> go.Figure:
    """ΔLoss heatmap of one kind, grouping and budget: rows = target whose units were removed, columns =
    measured group. Rows without ``grouping``/``budget`` (none are stored so) count as domain / skew."""
    mine = [r for r in rows if r["kind"] == kind and r.get("grouping", "domain") == grouping
            and r.get("budget", "skew") == budget]
    targets = list(dict.fromkeys(r["target"] for r in mine))
    measured = list(dict.fromkeys(r["measured"] for r in mine))
    z = np.full((len(targets), len(measured)), np.nan)
    for r in mine:
        z[targets.index(r["target"]), measured.index(r["measured"])] = r["delta_loss"]
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    removed = {r["target"]: r["n_masked"] for r in mine}
    fig = go.Figure(go.Heatmap(z=z, x=measured, y=[f"{t} ({removed[t]} removed)" for t in targets], colorscale="RdBu_r",
                               zmid=0, zmin=-bound or -1, zmax=bound or 1, text=np.round(z, 3), texttemplate="%{text}",
                               colorbar=dict(title="ΔLoss")))
    what = "specialists" if budget == "skew" else "most skewed units"
    fig.update_layout(title=f"Masking selectivity: {KIND_LABELS.get(kind, kind)} (by {grouping}, {budget} budget)",
                      xaxis_title="loss measured on", yaxis_title=f"{what} removed of", yaxis_autorange="reversed")
    return fig


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


def comparison_figure(rows: list[dict], grouping: str) -> go.Figure:
    """Specialised share, mean entropy, mean purity and normalised MI per kind."""
    metrics = (("specialised_share", "specialised share"), ("mean_entropy", "mean entropy"),
               ("mean_purity", "mean purity"), ("mi_norm", "MI (normalised)"))
    fig = go.Figure()
    for r in (r for r in rows if r["grouping"] == grouping):
        fig.add_bar(x=[label for _, label in metrics], y=[r[key] for key, _ in metrics],
                    name=f"{KIND_LABELS.get(r['kind'], r['kind'])} (layer {r['layer']})", marker_color=KIND_COLOURS.get(r["kind"]))
    fig.update_layout(title=f"Experts vs latents vs neurons, by {grouping}", barmode="group", yaxis_range=[0, 1.02])
    return fig


def curve_figure(rows: list[dict], n_experts: int, source: str = "moefied", k: int | None = None) -> go.Figure:
    """Loss against k, one line per domain and a thick one for all; the reference loss dashed.

    ``source`` "moefied": the MoEfied model routed top-k, reference = the dense model (k = E). "router": a MoE
    re-routed top-k in every MoE layer, reference = its own top-``k`` routing (the run's k).
    """
    fig = go.Figure()
    ks = sorted({r["k"] for r in rows})
    router = source == "router"
    reference = f"own top-{k} routing" if router else "dense"
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    groups = ["all"] + [g for g in dict.fromkeys(r["grp"] for r in rows) if g != "all"]
    right = max(ks + [n_experts]) if ks else n_experts
    for i, grp in enumerate(groups):
        mine = sorted((r for r in rows if r["grp"] == grp), key=lambda r: r["k"])
        if not mine:
            continue
        colour = "#000000" if grp == "all" else palette[i % len(palette)]
        fig.add_scatter(x=[r["k"] for r in mine], y=[r["loss"] for r in mine], mode="lines+markers", name=grp,
                        line=dict(width=4 if grp == "all" else 2, color=colour))
        fig.add_scatter(x=[ks[0], right], y=[mine[0]["dense_loss"]] * 2, mode="lines", showlegend=False,
                        line=dict(dash="dash", width=1, color=colour), name=f"{grp} {reference}")
    ticks = sorted(set(ks) | {n_experts})
    marked = k if router else n_experts
    labels = [f"{t} ({'own' if router else 'dense'})" if t == marked else str(t) for t in ticks]
    what = "re-routed" if router else "experts kept"
    fig.update_layout(title=f"Loss of top-k routing vs k (dashed: {reference})", xaxis_title=f"k ({what} of {n_experts})",
                      yaxis_title="next-token loss (nats)", xaxis=dict(type="log", tickvals=ticks, ticktext=labels))
    return fig


# -- concept purge -----------------------------------------------------------------------------
def purge_concepts(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["concept"] for r in rows))


def purge_figure(rows: list[dict], concept: str, log_x: bool = False) -> go.Figure:
    """Monet's purge for one concept: share of each kind's units removed (ρ > τ) against Δ loss, a solid line
    for the concept's tokens and a dashed one for the rest, in the kind's colour; hover gives τ."""
    fig = go.Figure()
    mine = [r for r in rows if r["concept"] == concept]
    for kind in dict.fromkeys(r["kind"] for r in mine):
        points = sorted((r for r in mine if r["kind"] == kind), key=lambda r: (r["share_removed"], -r["tau"]))
        label = KIND_LABELS.get(kind, kind)
        custom = [[r["tau"], r["n_removed"]] for r in points]
        for which, dash, delta in (("concept", "solid", lambda r: r["concept_loss"] - r["concept_before"]),
                                   ("other", "dash", lambda r: r["other_loss"] - r["other_before"])):
            on = f"'{concept}' tokens" if which == "concept" else "the other tokens"
            fig.add_scatter(x=[r["share_removed"] for r in points], y=[delta(r) for r in points], mode="lines+markers",
                            name=f"{label}: Δ loss on {on}", legendgroup=kind, customdata=custom,
                            line=dict(color=KIND_COLOURS.get(kind), dash=dash),
                            marker=dict(symbol="circle" if which == "concept" else "circle-open", size=8),
                            hovertemplate=f"{label}<br>τ = %{{customdata[0]:g}}: %{{customdata[1]}} removed "
                                          f"(%{{x:.2%}})<br>Δ loss on {on} %{{y:+.4f}}<extra></extra>")
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    fig.update_layout(title=f"Concept purge: {concept} (solid: its tokens, dashed: the rest)",
                      xaxis_title="share of the kind's units removed (ρ > τ)" + (", log" if log_x else ""),
                      yaxis_title="Δ next-token loss (nats)", xaxis=dict(type="log" if log_x else "linear",
                                                                          tickformat=".1%" if not log_x else None))
    return fig


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


# -- per-token routing -------------------------------------------------------------------------
def expert_colour(expert: int) -> str:
    """A light categorical colour per expert id (golden-angle hues, so neighbours differ for any E)."""
    return f"hsl({(expert * 137.508) % 360:.1f},70%,78%)"


def routing_html(tokens: list[str], routes: list[dict], *, highlight: int | None = None, vmax: float | None = None,
                 bos_routed: bool = True, weight_name: str = "weight") -> str:
    """One context's tokens as one HTML block. Without ``highlight`` each token's background is its top-1 expert's
    colour (BOS and separators, ``grp`` None, grey); with it the background is orange with opacity ∝ the weight of
    expert ``highlight`` on that token / ``vmax`` (default: the context's largest), 0 where it was not selected.
    The tooltip lists the token's experts and weights, best first (``bos_routed`` False: position 0 is said to
    pass unrouted, as a MoEfied model's BOS does)."""
    if highlight is not None and vmax is None:
        vmax = max((w for r in routes for e, w in zip(r["experts"], r["weights"]) if e == highlight), default=0.0)
    r_, g_, b_ = render.HIGHLIGHT
    spans = []
    for token, route in zip(tokens, routes):
        measured = route["grp"] is not None
        if not bos_routed and route["position"] == 0:
            listing = "not routed: BOS passes the MLP unchanged"
        else:
            listing = "&#10;".join(f"expert {e}: {w:.3f}" for e, w in zip(route["experts"], route["weights"]))
        where = route["grp"] if measured else "BOS / separator, left out of every metric"
        # render.escape also quotes " and ', so the tooltip cannot leave its attribute; &#10; is a line break
        tip = (f"“{render.escape(token)}” · position {route['position']} · {render.escape(where)}"
               f"&#10;{weight_name}s:&#10;{listing}")
        if highlight is None:
            top = route["experts"][0] if route["experts"] else None
            colour = expert_colour(top) if measured and top is not None else UNMEASURED
            style = f"background:{colour}"
        else:
            weight = next((w for e, w in zip(route["experts"], route["weights"]) if e == highlight), 0.0)
            alpha = 0.0 if weight <= 0 or not vmax else min(1.0, weight / vmax) * 0.85 + 0.15
            style = f"background:rgba({r_},{g_},{b_},{alpha:.2f})"
            if not measured:
                style += f";outline:1px dashed {UNMEASURED}"
        spans.append(f'<span class="wb-route" title="{tip}" style="{style};border-radius:2px;padding:1px 0">'
                     f'{render.escape(token)}</span>')
    return ('<div class="wb-routing" style="font-family:ui-monospace,monospace;font-size:0.85rem;white-space:pre-wrap;'
            f'line-height:1.9;margin:0 0 0.5rem 0">{"".join(spans)}</div>')


def routing_legend_html(routes: list[dict]) -> str:
    """The top-1 experts of a context with their colours and token counts (most frequent first), and the grey."""
    counts: dict[int, int] = {}
    for r in routes:
        if r["grp"] is not None and r["experts"]:
            counts[r["experts"][0]] = counts.get(r["experts"][0], 0) + 1
    chips = [f'<span style="background:{expert_colour(e)};border-radius:2px;padding:1px 4px;margin-right:4px">'
             f"expert {e} · {n}</span>" for e, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    chips.append(f'<span style="background:{UNMEASURED};border-radius:2px;padding:1px 4px">BOS / separator</span>')
    return f'<div style="font-size:0.8rem;color:#444;line-height:1.9">top-1 expert (tokens): {"".join(chips)}</div>'


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
