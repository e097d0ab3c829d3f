"""Experts page figures: plotly figures of MoE / MoEfied experts, SAE latents and MLP neurons.

Each takes plain rows (as ``workbench.app.experts_data`` reads them) and never touches the workspace. A kind
has one colour (``KIND_COLOURS``) and one label (``probes.unit_kinds.KIND_LABELS``) everywhere.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from probes.unit_kinds import KIND_LABELS

KIND_COLOURS = {"moe": "#7b3294", "moefied": "#1f77b4", "sae": "#d62728", "neuron": "#7f7f7f"}  # one colour per kind everywhere
HEATMAP_EXPERTS = 64  # experts shown in the expert × group heatmap


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
