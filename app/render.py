"""Presentation only: HTML for highlighted contexts and the plotly figures. No workspace access.

Token text is always escaped: ``html.escape`` for markup, and the characters Streamlit's
markdown would otherwise interpret (``$ * _ ` [ ] ~ : |`` and backslash) as numeric entities,
so a token is shown exactly as the tokenizer's display string. Newlines, carriage returns and
tabs are drawn as visible symbols (↵ ␍ ⇥) instead of breaking the line. Generated continuations
(the steering page) are running text instead: their newlines become ``<br>``, never a raw newline
that would end Streamlit's HTML block.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go

VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
_MARKDOWN_SPECIALS = {ord(c): f"&#{ord(c)};" for c in "$*_`[]~:|\\"}
HIGHLIGHT = (255, 145, 0)  # orange, alpha by activation
TOKEN_CLASS = "wb-token"


def visible(token: str) -> str:
    """A token's text with whitespace control characters made visible (for tables and labels)."""
    for char, symbol in VISIBLE.items():
        token = token.replace(char, symbol)
    return token


def escape(text: str) -> str:
    return html.escape(visible(text)).translate(_MARKDOWN_SPECIALS)


def token_spans(tokens: list[str], values: list[float], vmax: float, focus: int | None = None) -> str:
    """One line of tokens, each on a background whose opacity is its activation / ``vmax``."""
    scale = vmax if vmax and vmax > 0 else max([v for v in values if v > 0] or [1.0])
    r, g, b = HIGHLIGHT
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        alpha = 0.0 if value <= 0 else min(1.0, value / scale) * 0.85 + 0.15
        style = f"background:rgba({r},{g},{b},{alpha:.2f});border-radius:2px;padding:1px 0"
        if i == focus:
            style += ";outline:2px solid #c0392b;font-weight:600"
        spans.append(f'<span class="{TOKEN_CLASS}" title="{value:.3f}" style="{style}">{escape(token)}</span>')
    return "".join(spans)


def example_html(example, vmax: float) -> str:
    """One ``features.Example`` as a single-line HTML block: value, then the highlighted window."""
    line = token_spans(example.tokens, example.values, vmax, example.focus)
    return (
        '<div class="wb-example" style="font-family:ui-monospace,monospace;font-size:0.85rem;'
        'white-space:pre-wrap;line-height:1.9;margin:0 0 0.35rem 0">'
        f'<span style="display:inline-block;min-width:4.5em;color:#666">{example.value:.3f}</span>{line}</div>'
    )


def examples_html(examples, vmax: float) -> str:
    return "".join(example_html(e, vmax) for e in examples)


def legend_html(vmax: float) -> str:
    steps = [0.25, 0.5, 0.75, 1.0]
    cells = token_spans([f" {vmax * s:.2f} " for s in steps], [vmax * s for s in steps], vmax)
    return (f'<div style="font-size:0.8rem;color:#666">activation scale: {cells} '
            '(hover a token for its value; outlined: the example\'s token)</div>')


# -- figures ----------------------------------------------------------------------------------
def activation_histogram(summary: dict) -> go.Figure:
    """Bars of ``hist_counts`` over (0, max] from ``feature_summary``."""
    edges, counts = summary["hist_edges"], summary["hist_counts"]
    fig = go.Figure()
    if edges:
        centres = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
        fig.add_bar(x=centres, y=counts, width=edges[1] - edges[0], marker_color="rgb(255,145,0)",
                    hovertemplate="%{x:.3f}: %{y} tokens<extra></extra>")
    fig.update_layout(title="Activations where it fires", xaxis_title="activation", yaxis_title="tokens",
                      height=300, margin=dict(l=10, r=10, t=40, b=10), bargap=0.02)
    return fig


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (L0, FVU) points no other point beats on both (lower is better), by L0."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    best, keep = math.inf, []
    for i in order:
        if points[i][1] < best:
            best = points[i][1]
            keep.append(i)
    return keep


def frontier_figure(rows: list[dict]) -> go.Figure:
    """L0 against FVU, one marker per SAE (colour by architecture), the Pareto frontier as a line."""
    fig = go.Figure()
    for arch in sorted({r["arch"] for r in rows}):
        sub = [r for r in rows if r["arch"] == arch]
        fig.add_scatter(x=[r["l0"] for r in sub], y=[r["fvu"] for r in sub], mode="markers", name=arch,
                        text=[r["name"] for r in sub], marker=dict(size=11),
                        hovertemplate="%{text}<br>L0 %{x:.2f}<br>FVU %{y:.4f}<extra></extra>")
    on = [rows[i] for i in frontier([(r["l0"], r["fvu"]) for r in rows])]
    if len(on) > 1:
        fig.add_scatter(x=[r["l0"] for r in on], y=[r["fvu"] for r in on], mode="lines", name="frontier",
                        line=dict(dash="dot", color="#888"), hoverinfo="skip")
    fig.update_layout(title="Sparsity–reconstruction frontier", xaxis_title="L0 (active latents per token)",
                      yaxis_title="FVU (fraction of variance unexplained)", height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def fractions_figure(rows: list[dict]) -> go.Figure:
    """Dead and dense (>1 %, >10 % of tokens) latent fractions per SAE, grouped bars."""
    names = [r["name"] for r in rows]
    fig = go.Figure()
    for key, label in (("dead_fraction", "dead"), ("dense_fraction_1pct", "dense > 1 %"), ("dense_fraction_10pct", "dense > 10 %")):
        fig.add_bar(x=names, y=[r.get(key) for r in rows], name=label)
    fig.update_layout(title="Dead and dense latents", yaxis_title="fraction of latents", barmode="group",
                      yaxis_range=[0, 1], height=340, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def density_figure(densities: dict[str, list[float]]) -> go.Figure:
    """Overlaid histograms of log10(firing density), one per SAE; never-firing latents are left out."""
    fig = go.Figure()
    for name, values in densities.items():
        logs = [math.log10(d) for d in values if d > 0]
        fig.add_histogram(x=logs, name=name, opacity=0.6, nbinsx=40,
                          hovertemplate="log10 density %{x}<br>%{y} latents<extra></extra>")
    fig.update_layout(title="Feature density", xaxis_title="log10(firing density)", yaxis_title="latents",
                      barmode="overlay", height=340, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def heatmap_order(result: dict) -> list[int]:
    """Every feature in any token's top list, strongest first (largest activation, then summed activation, then id)."""
    peak: dict[int, float] = {}
    total: dict[int, float] = {}
    for row_f, row_v in zip(result["features"], result["values"]):
        for f, v in zip(row_f, row_v):
            if v > 0:
                peak[f] = max(peak.get(f, 0.0), v)
                total[f] = total.get(f, 0.0) + v
    return sorted(peak, key=lambda f: (-peak[f], -total[f], f))


def short(text: str, width: int = 40) -> str:
    """One line of at most ``width`` characters (an ellipsis marks a cut)."""
    text = " ".join(visible(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def prompt_heatmap(result: dict, max_features: int = 40, labels: dict | None = None) -> go.Figure:
    """Tokens (x) × the ``max_features`` strongest features in any token's top list (y, ``heatmap_order``).

    A cell is blank where the feature was not among that token's top features (it may still have fired,
    more weakly). Every filled cell also carries an invisible marker whose ``customdata`` is the feature id,
    so a click on a cell selects it (the page opens that feature). ``labels``: feature -> (label, ...).
    """
    labels = labels or {}
    tokens, features, values = result["tokens"], result["features"], result["values"]
    shown = heatmap_order(result)[:max_features]
    index = {f: i for i, f in enumerate(shown)}
    z = [[None] * len(tokens) for _ in shown]
    for t, (row_f, row_v) in enumerate(zip(features, values)):
        for f, v in zip(row_f, row_v):
            if v > 0 and f in index:
                z[index[f]][t] = v
    token_labels = [visible(t) for t in tokens]
    rows = [str(f) for f in shown]
    names = [f"{f} · {short(labels[f][0], 30)}" if f in labels else str(f) for f in shown]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(tokens))), y=rows, colorscale="Oranges", hoverongaps=False, hoverinfo="skip",
        colorbar=dict(title="activation"),
    ))
    cells = [(t, i) for i in range(len(shown)) for t in range(len(tokens)) if z[i][t] is not None]
    fig.add_scatter(
        x=[t for t, _ in cells], y=[rows[i] for _, i in cells], mode="markers", showlegend=False, name="cells",
        customdata=[shown[i] for _, i in cells],
        text=[f"{token_labels[t]}<br>{names[i]}<br>activation {z[i][t]:.3f}" for t, i in cells],
        hovertemplate="token %{x}: %{text}<br>(click to open the feature)<extra></extra>",
        marker=dict(symbol="square", size=14, opacity=0), selected=dict(marker=dict(opacity=0)),
        unselected=dict(marker=dict(opacity=0)),
    )
    fig.update_layout(
        title="Top features on each token", height=max(300, 22 * len(shown) + 160), margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))), ticktext=token_labels, tickangle=-60, title="token"),
        yaxis=dict(type="category", categoryorder="array", categoryarray=rows, autorange="reversed", title="feature",
                   tickmode="array", tickvals=rows, ticktext=names),
        clickmode="event+select", dragmode=False,
    )
    return fig


def feature_map_figure(layout: dict, table: dict, labels: dict, colour: str = "density") -> tuple[go.Figure, list[list[int]]]:
    """The decoder directions in 2-D (``cached.feature_map``), one marker per feature, coloured by log10 density
    (``colour="density"``) or by dominant domain (``"domain"``); never-firing features are grey. Hover: id and
    label. Returns the figure and each trace's feature ids (a selection's curve and point index -> feature)."""
    row = {f: i for i, f in enumerate(table["feature"])}
    ids = layout["features"]
    x = dict(zip(ids, layout["x"]))
    y = dict(zip(ids, layout["y"]))

    def density(f: int) -> float:
        return table["density"][row[f]] if f in row else 0.0

    def label(f: int) -> str:
        return labels[f][0] if f in labels else ""

    groups: list[tuple[str, list[int]]] = []
    live = [f for f in ids if density(f) > 0]
    if colour == "domain":
        domains: dict[str, list[int]] = {}
        for f in live:
            domains.setdefault(table["domain"][row[f]] or "no domain", []).append(f)
        groups += sorted(domains.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    else:
        groups.append(("fired", live))
    groups.append(("never fired", [f for f in ids if density(f) <= 0]))

    fig = go.Figure()
    traces = []
    for name, members in groups:
        if not members:
            continue
        marker: dict = dict(size=6, line=dict(width=0))
        if name == "never fired":
            marker.update(color="#bbbbbb")
        elif colour != "domain":
            marker.update(color=[math.log10(density(f)) for f in members], colorscale="Viridis", showscale=True,
                          colorbar=dict(title="log10 density"))
        fig.add_scatter(
            x=[x[f] for f in members], y=[y[f] for f in members], mode="markers", name=name, marker=marker,
            customdata=members, hovertext=[html.escape(short(label(f), 60)) for f in members],
            hovertemplate="feature %{customdata}<br>%{hovertext}<extra></extra>",
        )
        traces.append(members)
    fig.update_layout(
        title=f"Decoder directions ({layout['method']})", height=560, margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(showticklabels=False, title=None, zeroline=False), yaxis=dict(showticklabels=False, title=None, zeroline=False),
        legend=dict(orientation="h", y=-0.05), clickmode="event+select",
    )
    return fig, traces


def preview_html(example, width: int = 8) -> str:
    """A feature's strongest example as one short line: a few tokens around its own, that token highlighted."""
    lo = max(0, example.focus - width)
    tokens, values = example.tokens[lo: example.focus + 3], example.values[lo: example.focus + 3]
    line = token_spans(tokens, values, example.value, example.focus - lo)
    return ('<div class="wb-preview" style="font-family:ui-monospace,monospace;font-size:0.8rem;white-space:nowrap;'
            f'overflow:hidden;text-overflow:ellipsis;color:#444">…{line}…</div>')


# -- steering ----------------------------------------------------------------------------------------
def _running_text(text: str) -> str:
    return html.escape(text.replace("\r", "")).translate(_MARKDOWN_SPECIALS).replace("\n", "<br>")


def continuation_html(prompt: str, continuation: str) -> str:
    """The prompt (grey) followed by the generated continuation, escaped, in one pre-wrapped block."""
    return (
        '<div class="wb-continuation" style="font-family:ui-monospace,monospace;font-size:0.85rem;white-space:pre-wrap;'
        'line-height:1.6;border:1px solid #ddd;border-radius:4px;padding:0.5rem">'
        f'<span style="color:#888">{_running_text(prompt)}</span><span>{_running_text(continuation)}</span></div>'
    )


def sweep_figure(rows: list[dict], unit_label: str = "strength") -> go.Figure:
    """Δ log P of each intervention's top tokens (left axis) and KL on neutral text (right axis) vs strength.

    ``rows`` are ``{"strength": s, **measure(...)}`` as ``steering.sweep`` returns them.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = [r["strength"] for r in rows]
    n = len(rows[0]["interventions"]) if rows else 0
    for j in range(n):
        first = rows[0]["interventions"][j]
        name = f"{first['method']} {first['index']}" if first["index"] is not None else f"{first['method']} vector"
        fig.add_scatter(x=x, y=[r["interventions"][j]["delta_logprob_top"] for r in rows], mode="lines+markers",
                        name=f"Δ log P top tokens · {name}", secondary_y=False,
                        hovertemplate="strength %{x}<br>Δ log P %{y:.3f}<extra></extra>")
    fig.add_scatter(x=x, y=[r["kl_neutral"] for r in rows], mode="lines+markers", name="KL on neutral text",
                    line=dict(dash="dash", color="#555"), secondary_y=True,
                    hovertemplate="strength %{x}<br>KL %{y:.4f} nats/token<extra></extra>")
    fig.update_layout(title="Strength sweep: effect on the top tokens vs side-effect cost", height=380,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text=unit_label)
    fig.update_yaxes(title_text="Δ log P(top tokens) on the prompt", secondary_y=False)
    fig.update_yaxes(title_text="KL(baseline ‖ steered), nats/token", secondary_y=True)
    return fig
