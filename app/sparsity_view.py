"""Sparsity page helpers: one cached read of the sparsity tables and the plotly figures.

Reads go through ``workbench.app.cached`` conventions (read-only connection per call, keyed by the
workspace's change stamp); figures take plain rows and never touch the workspace.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from workbench.app import cached


@cached.per_workspace_version(max_entries=16)
def sparsity(path: str) -> dict:
    """Every measurement with its per-layer ratios and trade-off curve, and every stored law fit."""
    from probes import records

    with cached._open(path) as ws:
        if ws.schema_version() < 4:
            return {"measurements": [], "layers": {}, "curves": {}, "fits": []}
        rows = records.measurements(ws)
        return {
            "measurements": rows,
            "layers": {r["measurement_id"]: records.layer_ratios(ws, r["measurement_id"]) for r in rows},
            "curves": {r["measurement_id"]: records.tradeoff_curve(ws, r["measurement_id"]) for r in rows},
            "fits": [(series, label, fit.to_dict()) for series, label, fit in records.fits(ws)],
        }


def layer_figure(rows: list[dict], layers: dict) -> go.Figure:
    fig = go.Figure()
    for row in rows:
        points = layers[row["measurement_id"]]
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                        name=f"{row['label']} (mean {row['activation_ratio']:.3f})")
    fig.update_layout(title="Activation ratio per layer", xaxis_title="layer", yaxis_title="activation ratio (kept neurons)",
                      yaxis_range=[0, 1.02], legend_title="metric")
    return fig


def tradeoff_figure(rows: list[dict], curves: dict) -> go.Figure:
    fig = go.Figure()
    for row in rows:
        points = curves[row["measurement_id"]]
        if not points:
            continue
        fig.add_scatter(x=[p[2] for p in points], y=[100 * (p[1] / row["ppl_dense"] - 1) for p in points],
                        mode="lines+markers", name=row["metric"])
        fig.add_scatter(x=[row["activation_ratio"]], y=[100 * (row["ppl"] / row["ppl_dense"] - 1)], mode="markers",
                        marker=dict(size=13, symbol="star"), name=f"{row['label']} result")
    fig.update_layout(title="Perplexity cost of truncation", xaxis_title="activation ratio",
                      yaxis_title="PPL increase over dense (%)", yaxis_type="log")
    return fig


def law_figure(points: list[tuple[int, float]], fits: list, title: str) -> go.Figure:
    """Checkpoint points (tokens, ratio) and each fitted law as a curve over the same range."""
    from probes.laws import LawFit

    fig = go.Figure()
    fig.add_scatter(x=[t for t, _ in points], y=[a for _, a in points], mode="markers", name="checkpoints",
                    marker=dict(size=9))
    if points:
        grid = np.geomspace(min(t for t, _ in points), max(t for t, _ in points), 200)
        for fit_dict in fits:
            fit = LawFit.from_dict(fit_dict)
            fig.add_scatter(x=grid, y=fit.predict(grid), mode="lines", name=f"{fit.law} law (R² {fit.r2:.3f})")
    fig.update_layout(title=title, xaxis_title="training tokens", xaxis_type="log", yaxis_title="activation ratio")
    return fig


def width_depth_figure(points: list[tuple[float, float, str]], fit_dict: dict | None) -> go.Figure:
    """Final activation ratio against d_model / n_layers, with the width/depth fit if stored."""
    from probes.laws import LawFit

    fig = go.Figure()
    fig.add_scatter(x=[r for r, _, _ in points], y=[a for _, a, _ in points], text=[s for _, _, s in points],
                    mode="markers+text", textposition="top center", name="series (last checkpoint)")
    if fit_dict and points:
        fit = LawFit.from_dict(fit_dict)
        grid = np.linspace(min(r for r, _, _ in points), max(r for r, _, _ in points), 200)
        fig.add_scatter(x=grid, y=fit.predict(grid), mode="lines", name=f"width/depth law (R² {fit.r2:.3f})")
    fig.update_layout(title="Limit activation ratio against width/depth", xaxis_title="d_model / n_layers",
                      yaxis_title="activation ratio")
    return fig
